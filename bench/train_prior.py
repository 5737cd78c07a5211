"""Prior training throughput: our GPT vs a `transformers` LlamaForCausalLM of the same size.

Both models get the same width, depth, heads, SwiGLU width, vocabulary, batch, sequence length,
optimizer (AdamW, LlamaGen settings) and precision (bf16 autocast on CUDA, fp32 on CPU). Rounds
alternate between the two so both see the same machine state; the medians and their ratio are
printed as JSON. On CUDA the MFU uses the prior's own `flops_per_token` and a peak-FLOPs table.

    python bench/train_prior.py                      # ~2 min on a 2-core CPU (compile ~1 min)
    python bench/train_prior.py --preset B --batch 32   # LlamaGen GPT-B on a GPU

The last line is {"train_vs_transformers": ...}: our best step (eager, or compiled with fused
AdamW) over transformers' eager step, paired per round.
"""

from __future__ import annotations

import argparse
import copy
import json
import statistics
import sys
from collections.abc import Callable
from pathlib import Path

import torch
import torch.nn.functional as F
from transformers import LlamaConfig, LlamaForCausalLM

from prior import GPT, GPTConfig
from prior.configs import ARCH_PRESETS

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from bench.common import device_name, emit, timed  # noqa: E402

# dense bf16 tensor-core peaks (no sparsity), FLOP/s
PEAK_BF16 = {
    "H200": 989e12,
    "H100 SXM": 989e12,
    "H100 PCIe": 756e12,
    "H100": 989e12,
    "A100": 312e12,
}


def peak_flops(name: str) -> float | None:
    if "H100" in name and "PCIe" in name:
        return PEAK_BF16["H100 PCIe"]
    for key, value in PEAK_BF16.items():
        if key.split()[0] in name:
            return value
    return None


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument(
        "--preset", default=None, help=f"one of {sorted(ARCH_PRESETS)} (overrides sizes)"
    )
    p.add_argument("--dim", type=int, default=128)
    p.add_argument("--layers", type=int, default=4)
    p.add_argument("--heads", type=int, default=4)
    p.add_argument("--vocab", type=int, default=1024)
    p.add_argument("--grid", type=int, default=16, help="codes per side: N = grid^2")
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--steps", type=int, default=4, help="timed optimizer steps per round")
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--threads", type=int, default=0, help="CPU threads (0 = torch default)")
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument(
        "--compile",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="also time our step compiled, with fused AdamW (first steps compile)",
    )
    p.add_argument("--seed", type=int, default=0)
    return p.parse_args()


def build(args: argparse.Namespace, device: torch.device) -> tuple[GPT, LlamaForCausalLM]:
    dim, layers, heads, multiple_of = (args.dim, args.layers, args.heads, 16)
    if args.preset:
        dim, layers, heads, multiple_of = ARCH_PRESETS[args.preset]
    cfg = GPTConfig(
        vocab_size=args.vocab, grid=[args.grid, args.grid], cond="class", num_classes=10,
        cond_dropout=0.1, dim=dim, n_layers=layers, n_heads=heads, multiple_of=multiple_of,
        rope="1d",  # Llama's positions: the same rotary work on both sides
    )  # fmt: skip
    torch.manual_seed(args.seed)
    ours = GPT(cfg).to(device)
    llama_cfg = LlamaConfig(
        vocab_size=args.vocab, hidden_size=dim, intermediate_size=cfg.ffn_dim, num_hidden_layers=layers,
        num_attention_heads=heads, num_key_value_heads=heads, max_position_embeddings=cfg.seq_len + 1,
        rms_norm_eps=cfg.norm_eps, tie_word_embeddings=False, attention_dropout=0.0,
    )  # fmt: skip
    llama_cfg._attn_implementation = "sdpa"
    llama = LlamaForCausalLM(llama_cfg).to(device)
    return ours, llama


def step_fns(
    ours: GPT, llama: LlamaForCausalLM, args: argparse.Namespace, device: torch.device
) -> dict[str, Callable[[], float]]:
    """One optimizer step each on the same tokens: class prefix + N-1 codes in, N targets."""
    g = torch.Generator().manual_seed(args.seed)
    n = args.grid * args.grid
    codes = torch.randint(0, args.vocab, (args.batch, n), generator=g).to(device)  # [B, N]
    labels = torch.randint(0, 10, (args.batch,), generator=g).to(device)
    ids = torch.cat([labels[:, None], codes[:, :-1]], dim=1)  # [B, N]: Llama sees N tokens too
    amp = (
        torch.autocast("cuda", torch.bfloat16)
        if device.type == "cuda"
        else torch.autocast("cpu", enabled=False)
    )

    def adamw(m: torch.nn.Module, fused: bool = False) -> torch.optim.AdamW:
        kw = dict(lr=1e-4, betas=(0.9, 0.95), weight_decay=0.05)
        return torch.optim.AdamW(m.parameters(), fused=fused or None, **kw)

    opts = {"ours": adamw(ours), "llama": adamw(llama)}

    def our_step(model: GPT, opt: torch.optim.Optimizer, fwd: Callable) -> float:
        with amp:
            logits = fwd(codes, model.condition(class_ids=labels, drop=True))  # [B, N, V]
            loss = F.cross_entropy(logits.reshape(-1, args.vocab).float(), codes.reshape(-1))
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        return loss.item()

    def llama_step() -> float:
        with amp:
            logits = llama(input_ids=ids).logits  # [B, N, V]
            loss = F.cross_entropy(logits.reshape(-1, args.vocab).float(), codes.reshape(-1))
        loss.backward()
        torch.nn.utils.clip_grad_norm_(llama.parameters(), 1.0)
        opts["llama"].step()
        opts["llama"].zero_grad(set_to_none=True)
        return loss.item()

    fns = {"ours": lambda: our_step(ours, opts["ours"], ours), "llama": llama_step}
    if args.compile:  # a copy of the same weights: compiled forward + backward, fused AdamW
        twin = copy.deepcopy(ours)
        fused, fwd = adamw(twin, fused=True), torch.compile(twin)
        fns["ours_compiled"] = lambda: our_step(twin, fused, fwd)
    return fns


def main() -> None:
    args = parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = True
    ours, llama = build(args, device)
    fns = step_fns(ours, llama, args, device)
    for fn in fns.values():
        for _ in range(args.warmup):
            fn()
    tokens = args.batch * args.grid * args.grid * args.steps
    rates: dict[str, list[float]] = {name: [] for name in fns}
    for _ in range(args.rounds):
        for name, fn in fns.items():
            # each step's .item() syncs, for both models alike
            steps = lambda fn=fn: [fn() for _ in range(args.steps)]  # noqa: E731
            rates[name].append(tokens / timed(steps, device))
    med = {name: statistics.median(r) for name, r in rates.items()}
    cfg = ours.config
    result = {
        "bench": "prior_training_tokens_per_s",
        "device": device_name(device),
        "precision": "bf16 autocast" if device.type == "cuda" else "fp32",
        "compile": args.compile,
        "model": {"dim": cfg.dim, "n_layers": cfg.n_layers, "n_heads": cfg.n_heads, "ffn_dim": cfg.ffn_dim,
                  "vocab": cfg.vocab_size, "seq_len": cfg.seq_len, "batch": args.batch,
                  "params_ours": sum(p.numel() for p in ours.parameters()),
                  "params_llama": sum(p.numel() for p in llama.parameters())},
        "tokens_per_s": {name: round(m, 1) for name, m in med.items()},
        "rounds": {name: [round(x, 1) for x in r] for name, r in rates.items()},
        # paired per round (same machine state), then the median: robust to drifting load
        "ratio_ours_over_llama": paired(rates, "ours"),
    }  # fmt: skip
    if args.compile:
        result["ratio_ours_compiled_over_llama"] = paired(rates, "ours_compiled")
    if device.type == "cuda":
        flops = ours.flops_per_token(training=True)
        peak = peak_flops(result["device"])
        result["flops_per_token"] = flops
        result["peak_bf16_flops"] = peak
        if peak:
            result["mfu"] = {name: round(flops * med[name] / peak, 4) for name in med}
        result["max_memory_gb"] = round(torch.cuda.max_memory_allocated() / 2**30, 2)
    emit(result)
    best = max(result.get("ratio_ours_compiled_over_llama", 0.0), result["ratio_ours_over_llama"])
    print(json.dumps({"train_vs_transformers": best, "device": result["device"],
                      "compile": args.compile}))  # fmt: skip


def paired(rates: dict[str, list[float]], name: str) -> float:
    """Median over rounds of (our tokens/s / Llama's tokens/s) in the same round."""
    return round(statistics.median(a / b for a, b in zip(rates[name], rates["llama"])), 3)


if __name__ == "__main__":
    main()

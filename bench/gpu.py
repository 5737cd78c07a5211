"""One short GPU run that proves the fast paths: `make bench-gpu` (<= 8 min on one H100/H200).

Prints one JSON line (last line) with:
- attention: bf16 max error against the fp32 math path, for flash-attn (when importable) and
  PyTorch SDPA's flash kernel, without and with a KV cache;
- decode: tokens/s of a LlamaGen-B-sized GPT (12 x 768, 16 x 16 = 256 tokens, 16384 codes) at
  batch 1 / 16 / 64, eager vs the compiled engine (CUDA graphs, mode="reduce-overhead") vs
  `transformers` generate on the same weights; at batch 1 the fraction of the HBM bound
  (weight bytes x steps/s over the measured device copy bandwidth);
- train: tokens/s and MFU of that GPT at sequence 257 in bf16 (compiled, fused AdamW);
- zero2: one DeepSpeed ZeRO-2 optimizer step under NCCL (skipped, saying why, without
  deepspeed).

`--smoke` runs the same code on CPU with tiny sizes (the test suite does, so it cannot rot):
fp32 instead of bf16, gloo instead of NCCL, and torch.compile traced without code generation.
"""

from __future__ import annotations

import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
for entry in [p for p in sys.path if Path(p or ".").resolve() == ROOT / "bench"]:
    sys.path.remove(entry)
sys.path.insert(0, str(ROOT))

import argparse  # noqa: E402
import contextlib  # noqa: E402
import json  # noqa: E402
import os  # noqa: E402
import statistics  # noqa: E402
import time  # noqa: E402
from collections.abc import Callable  # noqa: E402
from typing import Any  # noqa: E402

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

from bench.common import device_name, synchronize, timed  # noqa: E402
from bench.train_prior import peak_flops  # noqa: E402
from prior import GPT, GPTConfig  # noqa: E402
from prior.attention import HAS_FLASH_ATTN, attention  # noqa: E402
from prior.hf_export import llama_input_ids, to_llama  # noqa: E402
from sampling import RowNoise, SamplingConfig, generate_ar  # noqa: E402
from training.distributed import shutdown_distributed  # noqa: E402

FULL = dict(dim=768, layers=12, heads=12, grid=16, vocab=16384, batches=(1, 16, 64))
SMOKE = dict(dim=32, layers=2, heads=2, grid=4, vocab=64, batches=(1, 2))


def seconds(fn: Callable[[], Any], device: torch.device, repeats: int = 3) -> float:
    """Median wall time of fn after one untimed call (which compiles / captures)."""
    fn()
    return statistics.median(timed(fn, device) for _ in range(repeats))


def attention_errors(device: torch.device, dtype: torch.dtype) -> dict[str, float | str]:
    """Max |out - math fp32| for the fast kernels, plain and with a KV cache."""
    g = torch.Generator(device="cpu").manual_seed(0)
    b, lq, h, d, cache = 2, 64, 8, 64, 128

    def rand(*shape: int) -> torch.Tensor:
        return torch.randn(*shape, generator=g).to(device)

    q, k, v = rand(b, lq, h, d), rand(b, lq, h, d), rand(b, lq, h, d)
    ref = attention(q, k, v, causal=True, backend="math")
    out: dict[str, float | str] = {}
    backends = ["sdpa"] + (["flash"] if HAS_FLASH_ATTN and device.type == "cuda" else [])
    for backend in backends:
        flash_only = backend == "sdpa" and device.type == "cuda"
        with (
            torch.nn.attention.sdpa_kernel([torch.nn.attention.SDPBackend.FLASH_ATTENTION])
            if flash_only
            else contextlib.nullcontext()
        ):
            plain = attention(q.to(dtype), k.to(dtype), v.to(dtype), causal=True, backend=backend)
        out[f"{backend}_max_err"] = float((plain.float() - ref).abs().max())
        kc, vc = (
            torch.zeros(b, cache, h, d, device=device),
            torch.zeros(b, cache, h, d, device=device),
        )
        seqlens = torch.tensor([10, 40], device=device)
        ref_c = attention(q[:, :4], k[:, :4], v[:, :4], causal=True, k_cache=kc.clone(),
                          v_cache=vc.clone(), cache_seqlens=seqlens, backend="math")  # fmt: skip
        cached = attention(q[:, :4].to(dtype), k[:, :4].to(dtype), v[:, :4].to(dtype), causal=True,
                           k_cache=kc.to(dtype), v_cache=vc.to(dtype), cache_seqlens=seqlens,
                           backend=backend)  # fmt: skip
        out[f"{backend}_kv_cache_max_err"] = float((cached.float() - ref_c).abs().max())
    if not HAS_FLASH_ATTN:
        out["flash"] = "flash-attn not importable (optional extra): SDPA only"
    return out


def build_gpt(size: dict, device: torch.device, dtype: torch.dtype) -> GPT:
    torch.manual_seed(0)
    cfg = GPTConfig(vocab_size=size["vocab"], grid=[size["grid"]] * 2, cond="class",
                    num_classes=1000, dim=size["dim"], n_layers=size["layers"],
                    n_heads=size["heads"], rope="1d")  # fmt: skip
    return GPT(cfg).to(device=device, dtype=dtype).eval()


def copy_bandwidth(device: torch.device) -> float:
    """Bytes/s of a large device-to-device copy (read + write counted)."""
    x = torch.empty(2**28 if device.type == "cuda" else 2**22, dtype=torch.uint8, device=device)
    y = torch.empty_like(x)
    t = seconds(lambda: y.copy_(x), device)
    return 2 * x.numel() / t


@torch.no_grad()
def decode(size: dict, device: torch.device, dtype: torch.dtype, smoke: bool) -> dict[str, Any]:
    model = build_gpt(size, device, dtype)
    llama = to_llama(model).to(device=device, dtype=dtype)
    n, sampling = model.config.seq_len, SamplingConfig(top_k=0)
    mode = "trace" if smoke else "reduce-overhead"
    out: dict[str, Any] = {"model": f"{size['layers']} x {size['dim']}, {n} tokens",
                           "params": model.num_params(), "compile_mode": mode}  # fmt: skip
    for batch in size["batches"]:
        ids = torch.arange(batch, device=device) % 1000
        cond = model.condition(class_ids=ids)
        noise = RowNoise.from_seeds(list(range(batch)), device=device)

        def ours(compiled: bool, cond=cond, noise=noise) -> None:
            generate_ar(model, cond, None, n, sampling, compile=compiled, compile_mode=mode,
                        noise=noise)  # fmt: skip

        start = llama_input_ids(torch.zeros(batch, 0, dtype=torch.long, device=device), ids,
                                model.config.vocab_size)  # fmt: skip

        def theirs(start=start) -> None:
            llama.generate(start, attention_mask=torch.ones_like(start), do_sample=True,
                           top_k=0, max_new_tokens=n)  # fmt: skip

        row = {name: batch * n / seconds(fn, device) for name, fn in
               (("eager", lambda: ours(False)), ("compiled", lambda: ours(True)),
                ("transformers", theirs))}  # fmt: skip
        row = {k: round(v, 1) for k, v in row.items()}
        row["compiled_vs_transformers"] = round(row["compiled"] / row["transformers"], 2)
        out[f"batch_{batch}_tokens_per_s"] = row
    weight_bytes = sum(p.numel() * p.element_size() for p in model.parameters())
    steps_per_s = out[f"batch_{size['batches'][0]}_tokens_per_s"]["compiled"]
    out["hbm_bound_fraction_b1"] = round(weight_bytes * steps_per_s / copy_bandwidth(device), 3)
    return out


def train(size: dict, device: torch.device, dtype: torch.dtype, smoke: bool) -> dict[str, Any]:
    """Tokens/s and MFU of the GPT's training step at sequence P + N (257 for the full size)."""
    model = build_gpt(size, device, torch.float32).train()
    batch, n = (2 if smoke else 32), model.config.seq_len
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4, fused=device.type == "cuda" or None)
    fwd = torch.compile(model, backend="eager" if smoke else "inductor")
    g = torch.Generator(device="cpu").manual_seed(0)
    codes = torch.randint(0, size["vocab"], (batch, n), generator=g).to(device)
    labels = torch.randint(0, 1000, (batch,), generator=g).to(device)
    amp = torch.autocast(device.type, dtype, enabled=dtype != torch.float32)

    def step() -> None:
        with amp:
            logits = fwd(codes, model.condition(class_ids=labels))
            loss = F.cross_entropy(logits.float().flatten(0, 1), codes.flatten())
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    t = seconds(step, device)
    tokens_per_s = batch * n / t
    peak = peak_flops(device_name(device)) if device.type == "cuda" else None
    flops = model.flops_per_token(training=True)
    return {"sequence": model.config.prefix_len + n, "batch": batch,
            "tokens_per_s": round(tokens_per_s, 1),
            "mfu": round(flops * tokens_per_s / peak, 4) if peak else None}  # fmt: skip


def zero2_step(size: dict, device: torch.device) -> dict[str, Any]:
    """One DeepSpeed ZeRO-2 step, world size 1 (NCCL on CUDA, gloo on CPU)."""
    try:
        import deepspeed
    except Exception as error:  # not in every image: carry a wheel (see README)
        return {"skipped": f"deepspeed not importable: {type(error).__name__}: {error}"}
    os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
    os.environ.setdefault("MASTER_PORT", "29533")
    os.environ.setdefault("RANK", "0")
    os.environ.setdefault("LOCAL_RANK", "0")
    os.environ.setdefault("WORLD_SIZE", "1")
    backend = "nccl" if device.type == "cuda" else "gloo"
    deepspeed.init_distributed(dist_backend=backend, verbose=False)
    model = build_gpt(size, device, torch.float32).train()
    config = {
        "train_micro_batch_size_per_gpu": 2,
        "zero_optimization": {"stage": 2},
        "bf16": {"enabled": device.type == "cuda"},
        "zero_allow_untested_optimizer": True,
    }
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4)
    engine, *_ = deepspeed.initialize(model=model, optimizer=opt, config=config)
    codes = torch.randint(0, size["vocab"], (2, model.config.seq_len), device=device)
    labels = torch.zeros(2, dtype=torch.long, device=device)
    start = time.perf_counter()
    logits = engine(codes, model.condition(class_ids=labels))
    loss = F.cross_entropy(logits.float().flatten(0, 1), codes.flatten())
    engine.backward(loss)
    engine.step()
    synchronize(device)
    seconds_taken = time.perf_counter() - start
    shutdown_distributed()  # a live gloo/NCCL group held the process ~70 s at exit
    return {"backend": backend, "loss": round(float(loss), 4), "step_s": round(seconds_taken, 3)}


def main(argv: list[str] | None = None) -> dict[str, Any]:
    p = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--smoke", action="store_true", help="tiny sizes on CPU (the test suite)")
    p.add_argument(
        "--skip", nargs="*", default=[], choices=["attention", "decode", "train", "zero2"]
    )
    args = p.parse_args(argv)
    device = torch.device("cpu" if args.smoke or not torch.cuda.is_available() else "cuda")
    if not args.smoke and device.type != "cuda":
        raise SystemExit("bench/gpu.py needs a CUDA device (or --smoke for the CPU check)")
    size, dtype = (SMOKE, torch.float32) if args.smoke else (FULL, torch.bfloat16)
    begin = time.perf_counter()
    report: dict[str, Any] = {"benchmark": "gpu", "device": device_name(device),
                              "torch": torch.__version__, "smoke": args.smoke}  # fmt: skip
    parts = {"attention": lambda: attention_errors(device, dtype if not args.smoke else torch.float32),
             "decode": lambda: decode(size, device, dtype, args.smoke),
             "train": lambda: train(size, device, dtype, args.smoke),
             "zero2": lambda: zero2_step(size, device)}  # fmt: skip
    for name, part in parts.items():
        if name not in args.skip:
            report[name] = part()
            print(f"# {name} done at {time.perf_counter() - begin:.0f} s", flush=True)
    report["elapsed_s"] = round(time.perf_counter() - begin, 1)
    print(json.dumps(report))
    return report


if __name__ == "__main__":
    main()

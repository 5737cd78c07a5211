"""Sampling benchmark: our decoders vs `transformers` generate on identical weights.

1. AR decode tokens/s: `generate_ar` (static KV cache, optionally compiled) vs
   `LlamaForCausalLM.generate(do_sample=True)` on the prior exported with `prior.hf_export`
   (same batch, same number of new tokens, class tokens suppressed by the export's
   generation_config, default dynamic cache). No CFG here: transformers' CFG processor runs the
   unconditional branch as a separate forward and cannot be matched exactly.
2. Speculative (exact), relaxed (LANTERN) and Jacobi decoding: wall-time speed-up, acceptance
   rate and tokens per target call vs our plain AR, at batch 1 and batch > 1, with and without
   CFG; and vs transformers assisted generation (`assistant_model=`, batch 1, no CFG) with the
   draft exported too and the same draft length.
3. MaskGIT images/s vs AR images/s for a MaskGIT of the target's size.

Candidates of one setting run round-robin in one process (see bench/common.py); medians and
their ratios are reported. `cfg_overhead_b1` has a pair of its own (guidance 1 and --cfg timed
round-robin together), so both sides of that ratio are also measured side by side. Greedy
speculative, relaxed and Jacobi decoding must reproduce greedy AR, and the export must
reproduce our logits and greedy tokens: checked in fp32 before timing.

    python bench/sampling.py                  # trained demo models if present, else random; CPU
    python bench/sampling.py --quick          # seconds: 8x8 tokens, one timed repeat
    python bench/sampling.py --device cuda --compile --out outputs/bench/sampling.json
"""

from __future__ import annotations

import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
# run as a script, this file's folder comes first on sys.path and would shadow `sampling`
for entry in [p for p in sys.path if Path(p or ".").resolve() == ROOT / "bench"]:
    sys.path.remove(entry)
sys.path.insert(0, str(ROOT))

import argparse  # noqa: E402
import functools  # noqa: E402
import itertools  # noqa: E402
import json  # noqa: E402
import time  # noqa: E402
from collections.abc import Callable, Iterator  # noqa: E402
from typing import Any  # noqa: E402

import torch  # noqa: E402
import transformers  # noqa: E402
from torch import Tensor  # noqa: E402

from bench.common import Timing, device_name, emit, interleaved, paired_spread  # noqa: E402
from bench.sampling_models import HF, Models, build_models, conditions, export  # noqa: E402
from prior import GPT  # noqa: E402
from prior.blocks import num_params  # noqa: E402
from prior.hf_export import llama_input_ids  # noqa: E402
from sampling import (  # noqa: E402
    GuidanceSchedule,
    RelaxedAcceptance,
    RowNoise,
    SamplingConfig,
    SpeculativeStats,
    generate_ar,
    generate_jacobi,
    generate_maskgit,
    generate_speculative,
    generate_tree,
)
from sampling.engine import EngineBatch, engine_for  # noqa: E402
from sampling.generate import DecodeOptions, generate_codes  # noqa: E402
from sampling.noise import DRAW  # noqa: E402
from sampling.row_settings import RowSettings  # noqa: E402
from sampling.tree import TreeShape, tree_round  # noqa: E402
from sampling.tree_draft import TreeDraft  # noqa: E402

RANDOM_NOTE = (
    "random weights: the untrained target and draft are both close to uniform, so the draft "
    "agrees with the target far more than a real draft would and Jacobi's random guesses are "
    "accepted far more often than on a trained prior (relaxed acceptance even reaches 1: a "
    "draft token borrows its k neighbours' mass). Acceptance rates and the speed-ups of "
    "speculative / relaxed / Jacobi decoding are therefore NOT meaningful here; the AR vs "
    "transformers and MaskGIT vs AR timings are (they depend on sizes only)."
)
OURS = ["ar", "speculative", "relaxed", "jacobi", "mc_sjd"]
COMPILED = ["ar_compiled", "speculative_compiled", "speculative_cost_compiled", "mc_sjd_compiled"]
LOSSLESS = ["speculative", "jacobi", "mc_sjd", "speculative_compiled", "speculative_cost_compiled",
            "mc_sjd_compiled", "tree", "tree_small"]  # fmt: skip
TREES = ["tree", "tree_small"]  # --tree-size and --tree-size-small nodes, compiled with --compile
SETTINGS = (
    "batch", "cfg", "draft_len", "relaxed_k", "relaxed_delta", "jacobi_window", "maskgit_steps",
    "temperature", "top_k", "hf_cache", "compile", "compile_mode", "repeats", "warmup", "seed",
    "tree_size", "tree_size_small", "tree_draft", "threads",
)  # fmt: skip
MASKGIT_NOTE = (
    "MaskGIT makes T full passes over all N tokens (about T times the FLOPs of AR's N cached "
    "one-token steps) instead of N small calls: compute-bound CPUs see little gain, GPUs a lot."
)
ASSISTED = ["ar", "speculative", "transformers", "transformers_assisted"]
CFG_NOTE = (
    "transformers is compared without CFG only: its CFG processor runs the unconditional branch "
    "as a separate unbatched forward with its own cache (not our doubled [cond; uncond] batch), "
    "guides log-softmaxed scores, and is not rolled back by assisted generation."
)


def candidates(
    target: GPT, draft: GPT, batch: int, scale: float, methods: list[str], models: Models,
    hf: HF | None, args, device: torch.device,
) -> dict[str, Callable[[], Any]]:  # fmt: skip
    """Closures for one (batch, guidance) setting; every call samples with fresh seeds, and
    every candidate's k-th call with the same ones: exact methods decode the very images AR
    does, so their times and codes per call compare like for like, run after run."""
    n = target.config.seq_len
    tc, tu, ids = conditions(target, batch)
    dc, du, _ = conditions(draft, batch)
    guidance = GuidanceSchedule(scale)
    sampling = SamplingConfig(temperature=args.temperature, top_k=args.top_k)
    running: list[Iterator[int]] = []  # the seed counter of the candidate being called

    def next_seed() -> int:
        return next(running[-1])

    def noise() -> RowNoise:
        return RowNoise.from_seeds([next_seed() for _ in range(batch)], device=device)

    def spec(
        relaxed: RelaxedAcceptance | None, compiled: bool, adaptive: bool | str = False
    ) -> SpeculativeStats:
        return generate_speculative(
            target, draft, tc, dc, n, tu, du, args.draft_len, adaptive, sampling=sampling,
            guidance=guidance, relaxed=relaxed, noise=noise(), compile=compiled,
        )[1]  # fmt: skip

    def jacobi(coupling: str, compiled: bool) -> SpeculativeStats:
        return generate_jacobi(
            target, tc, tu, n, args.jacobi_window, sampling, guidance, coupling=coupling,
            noise=noise(), compile=compiled,
        )[1]  # fmt: skip

    def hf_generate(assistant: Any = None) -> SpeculativeStats:
        no_codes = torch.zeros(batch, 0, dtype=torch.long, device=device)
        inputs = llama_input_ids(no_codes, ids, target.config.vocab_size)  # [B, 1]
        extra = {"assistant_model": assistant} if assistant is not None else {}
        if args.hf_cache and assistant is None:
            extra["cache_implementation"] = args.hf_cache
        hf.target_calls.reset()
        hf.draft_calls.reset()
        torch.manual_seed(next_seed())  # transformers samples from the global RNG
        out = hf.target.generate(
            inputs, attention_mask=torch.ones_like(inputs), do_sample=True,
            temperature=args.temperature, top_k=args.top_k, top_p=1.0, max_new_tokens=n, **extra,
        )  # fmt: skip
        if out.shape[1] != n + 1 or int(out[:, 1:].max()) >= target.config.vocab_size:
            raise AssertionError(f"transformers generated {tuple(out.shape)} / a prefix token")
        calls = hf.target_calls.calls
        return SpeculativeStats(
            rows=batch, num_tokens=n, target_calls=calls, draft_calls=hf.draft_calls.calls,
            drafted=hf.target_calls.fed - calls, accepted=n - calls, iterations=calls,
        )  # fmt: skip

    def tree(size: int) -> SpeculativeStats:
        return generate_tree(
            target, tc, tu, n, models.tree_draft, ids, size, sampling, guidance, noise=noise(),
            compile=args.compile,
        )[1]  # fmt: skip

    def ar(compiled: bool, mode: str = args.compile_mode) -> None:
        generate_ar(target, tc, tu, n, sampling, guidance, compile=compiled, compile_mode=mode,
                    noise=noise())  # fmt: skip

    c = args.compile
    table: dict[str, Callable[[], Any]] = {
        "ar": lambda: ar(False),
        "ar_compiled": lambda: ar(True),
        # the same graphs with inductor's Python wrapper (what the C++ one saves)
        "ar_compiled_python_wrapper": lambda: ar(True, "python-wrapper"),
        "speculative": lambda: spec(None, False),
        "speculative_compiled": lambda: spec(None, True),
        "speculative_cost_compiled": lambda: spec(None, True, "cost"),  # draft length from costs
        "relaxed": lambda: spec(models.relaxed, c),
        "jacobi": lambda: jacobi("independent", c),
        "mc_sjd": lambda: jacobi("gumbel", False),
        "mc_sjd_compiled": lambda: jacobi("gumbel", True),
        "tree": lambda: tree(args.tree_size),
        "tree_small": lambda: tree(args.tree_size_small),
        "transformers": lambda: hf_generate(),
        "transformers_assisted": lambda: hf_generate(hf.draft),
    }
    if "maskgit" in methods:
        mc, mu, _ = conditions(models.maskgit, batch)
        table["maskgit"] = lambda: generate_maskgit(
            models.maskgit, mc, mu, n, args.maskgit_steps, sampling, guidance=guidance,
            noise=noise(), compile=c,
        )[1]  # fmt: skip
    return {name: own_seeds(table[name], itertools.count(args.seed * 1_000_003), running)
            for name in methods}  # fmt: skip


def own_seeds(
    fn: Callable[[], Any], seeds: Iterator[int], running: list[Iterator[int]]
) -> Callable[[], Any]:
    """fn drawing its seeds from `seeds` (its own counter) while it runs."""

    def call() -> Any:
        running.append(seeds)
        try:
            return fn()
        finally:
            running.pop()

    return call


def ratio(baseline: Timing, candidate: Timing) -> float:
    """Speed-up of candidate over baseline from the medians (> 1: candidate faster)."""
    return round(baseline.median / candidate.median, 3)


def summary(t: Timing, baseline: Timing | None, rows: int, n: int) -> dict[str, Any]:
    """Times, throughput, speed-up over `baseline` and pooled decoding statistics."""
    out: dict[str, Any] = t.as_dict()
    out["images_per_s"] = round(rows / t.median, 4)
    out["tokens_per_s"] = round(rows * n / t.median, 2)
    if baseline is not None and baseline is not t:
        out["speedup_vs_ar"] = ratio(baseline, t)
    stats = [s for s in t.results if isinstance(s, SpeculativeStats)]
    if stats:
        drafted, calls = sum(s.drafted for s in stats), sum(s.target_calls for s in stats)
        accepted = sum(s.accepted for s in stats)
        if drafted:
            out["acceptance_rate"] = round(accepted / drafted, 4)
        out["tokens_per_target_call"] = round(sum(s.num_tokens for s in stats) / calls, 3)
        out["target_calls"] = round(calls / len(stats), 1)
        if any(s.draft_calls for s in stats):
            out["draft_calls"] = round(sum(s.draft_calls for s in stats) / len(stats), 1)
    return out


def sanity(models: Models, hf: HF, args, device: torch.device) -> dict[str, Any]:
    """fp32 checks that make the timings comparable: greedy equalities and the export's logits."""
    greedy, guidance = SamplingConfig(temperature=0.0), GuidanceSchedule(args.cfg)
    t, d = models.target, models.draft
    n = t.config.seq_len
    tc, tu, tids = conditions(t, 2)
    dc, du, _ = conditions(d, 2)
    ar = generate_ar(t, tc, tu, n, greedy, guidance)

    def spec(relaxed: RelaxedAcceptance | None) -> Tensor:
        return generate_speculative(
            t, d, tc, dc, n, tu, du, args.draft_len, sampling=greedy, guidance=guidance,
            relaxed=relaxed,
        )[0]  # fmt: skip

    decoded = {
        "speculative": spec(None),
        "relaxed": spec(models.relaxed),
        "jacobi": generate_jacobi(t, tc, tu, n, args.jacobi_window, greedy, guidance)[0],
    }
    if models.tree_draft is not None:
        tree = generate_tree(
            t, tc, tu, n, models.tree_draft, tids, args.tree_size, greedy, guidance
        )
        decoded["tree"] = tree[0]
    for name, codes in decoded.items():
        if not torch.equal(codes, ar):
            bad = int((codes != ar).sum())
            raise AssertionError(f"greedy {name} != greedy AR at {bad} of {ar.numel()} tokens")
    src, vocab = models.hf_target_src, models.hf_target_src.config.vocab_size
    cond, _, ids = conditions(src, 2)
    codes = torch.randint(vocab, (2, n), generator=torch.Generator().manual_seed(0)).to(device)
    with torch.no_grad():
        ours = src(codes, cond)
        theirs = hf.target(llama_input_ids(codes, ids, vocab)).logits[:, :n, :vocab]
        diff = float((ours - theirs).abs().max())
        if diff > 1e-3:
            raise AssertionError(f"exported Llama logits differ from ours by {diff:.2e}")
        start = llama_input_ids(codes[:, :0], ids, vocab)
        mask = torch.ones_like(start)
        hf_greedy = hf.target.generate(
            start, attention_mask=mask, do_sample=False, max_new_tokens=n
        )
    if not torch.equal(hf_greedy[:, 1:], generate_ar(src, cond, None, n, greedy)):
        raise AssertionError("transformers greedy generate differs from our greedy AR")
    return {
        "greedy_methods_equal_greedy_ar": sorted(decoded),
        "greedy_check": f"batch 2, cfg {args.cfg}, fp32",
        "export_logits_max_abs_diff": diff,
        "transformers_greedy_equals_ours": True,
    }


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    raw = argparse.RawDescriptionHelpFormatter
    p = argparse.ArgumentParser(description=__doc__, formatter_class=raw)
    a = p.add_argument
    a("--prior", default="outputs/demo/prior/final", help="trained GPT prior (if present)")
    a("--draft", default="outputs/demo/draft/final", help="trained draft GPT (if present)")
    a("--tokenizer", default="outputs/demo/tokenizer/final", help="for LANTERN neighbours")
    a("--random", action="store_true", help="ignore trained models, use random weights")
    a("--target-dim", type=int, default=256)
    a("--target-layers", type=int, default=8)
    a("--target-heads", type=int, default=4)
    a("--draft-dim", type=int, default=64)
    a("--draft-layers", type=int, default=2)
    a("--draft-heads", type=int, default=2)
    a("--grid", type=int, default=16, help="random models: codes per side (N = grid^2)")
    a("--vocab", type=int, default=1024, help="random models: codebook size")
    a("--num-classes", type=int, default=10, help="random models: classes")
    a("--batch", type=int, default=8, help="the batch > 1 setting (and AR vs transformers)")
    a("--cfg", type=float, default=3.0, help="guidance scale of the CFG runs")
    a("--draft-len", type=int, default=4, help="gamma, also transformers' num_assistant_tokens")
    a("--relaxed-k", type=int, default=8, help="LANTERN neighbours per code")
    a("--relaxed-delta", type=float, default=0.1, help="LANTERN budget")
    a("--jacobi-window", type=int, default=8)
    a("--tree-draft", default="outputs/demo/tree_draft", help="distilled tree draft (if present)")
    a("--tree-size", type=int, default=4, help="candidate nodes of method tree")
    a(
        "--tree-size-small",
        type=int,
        default=1,
        help="the second tree size timed (1: the fastest tree at batch 8 here, runs 14-15)",
    )
    a("--maskgit-steps", type=int, default=8)
    a("--temperature", type=float, default=1.0)
    a("--top-k", type=int, default=0, help="0 = off (on both sides)")
    a("--hf-cache", default="", choices=["", "static", "dynamic"], help="'' = its default")
    a("--compile", action=argparse.BooleanOptionalAction, default=True,
      help="also time the compiled engine (AR, speculative, MC-SJD; first call compiles)")  # fmt: skip
    a("--maskgit-batch", type=int, default=16, help="batch of the MaskGIT vs AR setting")
    a("--compile-mode", default="default", help="e.g. reduce-overhead (CUDA graphs) on GPU")
    a("--repeats", type=int, default=12, help="timed rounds (median; spread: per-round ratios)")
    a("--warmup", type=int, default=1, help="untimed calls per candidate first")
    a("--quick", action="store_true", help="one timed repeat; random models get 8x8 codes")
    a("--device", default="cpu", choices=["cpu", "cuda"])
    a("--dtype", default="auto", choices=["auto", "fp32", "bf16"], help="auto: bf16 on CUDA")
    a("--threads", type=int, default=1, help="CPU threads (0 = torch default); 1 is steadiest")
    a("--seed", type=int, default=0)
    a("--out", default=None, help="also write the JSON here")
    a("--tree-draft-ranks-only", action="store_true",
      help="only measure how often the tree draft's k-th candidate is AR's code, and print that")  # fmt: skip
    a("--call-costs-only", action="store_true",
      help="only time a speculative round's calls in target steps (batch 1) and print that")  # fmt: skip
    args = p.parse_args(argv)
    if args.quick:
        args.grid, args.repeats = 8, 1
    if args.batch < 2:
        raise ValueError(f"--batch is the batch > 1 setting, got {args.batch}")
    if args.device == "cuda" and not torch.cuda.is_available():
        raise ValueError("--device cuda requested but CUDA is not available")
    return args


def transformers_sections(
    big: dict[str, Timing], one: dict[str, Timing], models: Models, args, n: int
) -> tuple[dict[str, Any], dict[str, Any]]:
    """AR vs generate at batch B; speculative vs assisted generation at batch 1."""
    ar_vs: dict[str, Any] = {
        "weights": models.hf_weights,
        "batch": args.batch,
        "new_tokens": n,
        "ours": summary(big["ar"], None, args.batch, n),
        "transformers": summary(big["transformers"], None, args.batch, n),
        "ours_speedup_vs_transformers": ratio(big["transformers"], big["ar"]),
        "transformers_settings": (
            f"generate(do_sample=True, temperature={args.temperature}, top_k={args.top_k}), "
            f"cache {args.hf_cache or 'default (dynamic)'}, prefix ids suppressed"
        ),
        "note": CFG_NOTE,
    }
    if args.compile:
        ar_vs["ours_compiled"] = summary(big["ar_compiled"], None, args.batch, n)
        ar_vs["ours_compiled_speedup_vs_transformers"] = ratio(
            big["transformers"], big["ar_compiled"]
        )
    assisted = {
        "weights": models.hf_weights,
        "batch": 1,
        "draft_len": args.draft_len,
        **{name: summary(one[name], None, 1, n) for name in ASSISTED},
        "ours_speculative_speedup_vs_ours_ar": ratio(one["ar"], one["speculative"]),
        "transformers_assisted_speedup_vs_transformers": ratio(
            one["transformers"], one["transformers_assisted"]
        ),
        "ours_speculative_speedup_vs_transformers_assisted": ratio(
            one["transformers_assisted"], one["speculative"]
        ),
        "note": (
            "transformers: num_assistant_tokens = draft_len, constant schedule, no confidence "
            "stop; its first target call is also the prefill, ours counts the prefill as a call"
        ),
    }
    return ar_vs, assisted


def ours_sections(
    groups: dict[tuple[int, float], dict[str, Timing]], args, n: int
) -> tuple[dict[str, Any], dict[str, Any]]:
    """Speculative / relaxed / Jacobi vs AR per (batch, cfg); MaskGIT vs AR at batch B."""
    scales, big, mb = (1.0, args.cfg), args.batch, args.maskgit_batch
    speculative = {
        f"batch_{b}": {
            f"cfg_{s:g}": {
                m: summary(t, fastest_ar(groups[b, s]), b, n)
                for m, t in groups[b, s].items()
                if not m.startswith("transformers")
            }
            for s in scales
        }
        for b in (1, big)
    }
    g = groups[mb, args.cfg]
    maskgit: dict[str, Any] = {
        "batch": mb, "steps": args.maskgit_steps, "cfg": args.cfg, "note": MASKGIT_NOTE,
        "maskgit_images_per_s": round(mb / g["maskgit"].median, 4),
        "ar_images_per_s": round(mb / fastest_ar(g).median, 4),
        "maskgit_speedup_vs_ar": ratio(fastest_ar(g), g["maskgit"]),
    }  # fmt: skip
    return speculative, maskgit


def fastest_ar(group: dict[str, Timing]) -> Timing:
    """Our fastest plain AR of a setting (compiled or eager): every speed-up is against it."""
    return min((group[m] for m in ("ar", "ar_compiled") if m in group), key=lambda t: t.median)


def best_lossless(group: dict[str, Timing]) -> tuple[str, float, list[float]]:
    """(method, speed-up over our fastest AR, its per-round [q25, q75]) of the fastest exact
    method of a setting."""
    base = fastest_ar(group)
    speedups = {m: ratio(base, group[m]) for m in LOSSLESS if m in group}
    name = max(speedups, key=speedups.get)
    return name, speedups[name], paired_spread(base, group[name])


@torch.no_grad()
def batch_invariant(models: Models, args, device: torch.device) -> bool:
    """Every row of a mixed batch equals its prompt and seed generated alone (fp32), for AR
    and every exact method, on the target prior."""
    t, d = models.target, models.draft
    batch, guidance = 6, GuidanceSchedule(args.cfg)
    noise = RowNoise.from_seeds(list(range(100, 100 + batch)), device=device)
    decodes = [DecodeOptions("ar"), DecodeOptions("speculative", draft_len=args.draft_len),
               DecodeOptions("jacobi", jacobi_window=args.jacobi_window),
               DecodeOptions("jacobi", jacobi_window=args.jacobi_window,
                             jacobi_coupling="independent")]  # fmt: skip
    if models.tree_draft is not None:
        decodes.append(DecodeOptions("tree", tree_size=args.tree_size))

    def run(decode: DecodeOptions, rows: list[int]) -> Tensor:
        index = torch.tensor(rows, device=device)
        tc, tu, ids = conditions(t, batch)
        dc, du, _ = conditions(d, batch)
        return generate_codes(
            t, tc.select(index), tu.select(index), decode=decode, sampling=SamplingConfig(),
            guidance=guidance, draft=d, draft_conds=(dc.select(index), du.select(index)),
            noise=noise.select(index), tree_draft=models.tree_draft,
            class_ids=None if ids is None else ids[index],
        ).codes  # fmt: skip

    for decode in decodes:
        together = run(decode, list(range(batch)))
        if not all(torch.equal(run(decode, [r])[0], together[r]) for r in range(batch)):
            return False
    return True


@torch.no_grad()
def tree_draft_ranks(models: Models, args, device: torch.device, rows: int = 400) -> dict[str, Any]:
    """How often the tree draft's first / second ... candidate is the code AR draws (guidance
    --cfg, `rows` samples of the target): candidates ranked by q / E (what method tree does,
    E the rows' own noise) and by q alone."""
    t, draft = models.target, models.tree_draft
    n, vocab = t.config.seq_len, t.config.vocab_size
    cond, uncond, ids = conditions(t, rows)
    noise = RowNoise.from_seeds(list(range(rows)), device=device)
    codes = generate_ar(t, cond, uncond, n, SamplingConfig(), GuidanceSchedule(args.cfg),
                        noise=noise)  # fmt: skip
    positions = torch.arange(n, device=device).expand(rows, n)
    context = TreeDraft.context_of(codes, draft.config.offsets, vocab)
    classes = draft.row_classes(ids, rows, device)
    q = draft(classes, positions, context).softmax(-1)  # [rows, N, V]
    e = -torch.log(noise.uniform(positions, DRAW, vocab))  # the noise AR draws with
    out: dict[str, Any] = {"rows": rows, "guidance": args.cfg, "positions": "1..N-1"}
    for name, score in (("by_q_over_e", q / e), ("by_q", q)):
        order = score[:, 1:].argsort(-1, descending=True)  # position 0 comes from the prefill
        rank = (order == codes[:, 1:, None]).float().argmax(-1)
        out[name] = [round(float((rank == k).float().mean()), 3) for k in range(4)]
    return out


def call_costs(models: Models, args, device: torch.device, calls: int = 20) -> dict[str, Any]:
    """A speculative round's price in target steps (batch 1, guidance --cfg, the engine every
    method runs on): one target pass over draft_len + 1 tokens and draft_len one-token draft
    calls. Returns the tokens a round must yield for 1.5x over AR with this draft, and with a
    free one; a round yields at most draft_len + 1 (every draft accepted plus the bonus)."""
    g, n = args.draft_len, models.target.config.seq_len
    sampling = SamplingConfig(temperature=args.temperature, top_k=args.top_k)
    settings = RowSettings.build(1, n, sampling, GuidanceSchedule(args.cfg), device)
    one = torch.ones(1, dtype=torch.long, device=device)
    fns: dict[str, Callable[[], Any]] = {}
    parts = (("target_verify", models.target, g + 1), ("draft_call", models.draft, 1))
    for name, model, width in parts:
        engine = engine_for(model, rows=1, num_tokens=n, guided=settings.guided,
                            filtered=settings.filtered, compile=args.compile,
                            compile_mode=args.compile_mode)  # fmt: skip
        cond, uncond, _ = conditions(model, 1)
        engine.admit(None, cond, uncond, settings, RowNoise.from_seeds([args.seed], device=device))
        engine.warm_up((width,))
        fed = torch.zeros(1, width, dtype=torch.long, device=device)
        fns[name] = lambda e=engine, f=fed: [e.distributions(f, one) for _ in range(calls)]
        if name == "target_verify":
            fns["target_step"] = lambda e=engine: [e.step(one, one) for _ in range(calls)]
    timings = interleaved(fns, args.repeats, args.warmup, device)
    step = timings["target_step"].median  # all three in target steps from here on
    verify, draft = timings["target_verify"].median / step, timings["draft_call"].median / step
    return {
        "batch": 1, "guidance": args.cfg, "draft_len": g, "compiled": args.compile,
        "verify_over_step": round(verify, 3),
        "draft_call_over_target_step": round(draft, 3),
        "tokens_per_round_for_1.5x_free_draft": round(1.5 * verify, 2),
        "tokens_per_round_for_1.5x_this_draft": round(1.5 * (verify + g * draft), 2),
        "tokens_per_round_at_most": g + 1,
    }  # fmt: skip


def tree_round_costs(
    models: Models,
    groups: dict[tuple[int, float], dict[str, Timing]],
    args,
    device: torch.device,
    calls: int = 20,
) -> dict[str, Any]:
    """A tree round's price in AR steps at batch 1 and --batch (guidance --cfg, each tree size
    timed): alone (the engine's round and step called back to back, nothing else in between)
    and inside generation (a generation's median time per target call over AR's per step, from
    the speculative groups). A tree beats AR when its tokens per call exceed the price it pays
    in generation; the gap between the two prices is what a round costs outside its graph."""
    target, n = models.target, models.target.config.seq_len
    sampling = SamplingConfig(temperature=args.temperature, top_k=args.top_k)
    report: dict[str, Any] = {"guidance": args.cfg, "compiled": args.compile}
    for batch in (1, args.batch):
        settings = RowSettings.build(batch, n, sampling, GuidanceSchedule(args.cfg), device)
        cond, uncond, ids = conditions(target, batch)
        ids = torch.zeros(batch, dtype=torch.long, device=device) if ids is None else ids
        noise = RowNoise.from_seeds(list(range(batch)), device=device)
        fns: dict[str, Callable[[], Any]] = {}
        for label, size in (("tree", args.tree_size), ("tree_small", args.tree_size_small)):
            shape = TreeShape.build(size)
            rows = EngineBatch(target, cond, uncond, settings, noise, num_tokens=n,
                               compile=args.compile, scratch=shape.size)  # fmt: skip
            rows.prefill()
            out = torch.zeros(batch, n + shape.max_depth + 1, dtype=torch.long, device=device)
            at = torch.full((batch,), n // 2, dtype=torch.long, device=device)
            rounds = torch.zeros(batch, dtype=torch.long, device=device)
            args_ = tuple(rows.padded(x) for x in (out, at, ids, rounds))
            name = f"tree {id(models.tree_draft)} {shape.parents} {shape.ranks}"  # generation's
            step = functools.partial(tree_round, rows.engine, shape, models.tree_draft)
            fns[label] = lambda r=rows, s=step, a=args_, k=name: [
                r.run(k, s, *a) for _ in range(calls)
            ]
        ar = EngineBatch(
            target, cond, uncond, settings, noise, num_tokens=n, compile=args.compile
        )  # generate_ar's engine: the price unit
        ar.prefill()
        tokens = torch.zeros(batch, dtype=torch.long, device=device)
        where = torch.full((batch,), n // 2, dtype=torch.long, device=device)
        fns["ar_step"] = lambda r=ar, t=tokens, w=where: [r.step(t, w) for _ in range(calls)]
        timings = interleaved(fns, args.repeats, args.warmup, device)
        group = groups[batch, args.cfg]
        ar_per_step = fastest_ar(group).median / n  # a prefill and N - 1 steps: N calls
        entry: dict[str, Any] = {}
        for label, size in (("tree", args.tree_size), ("tree_small", args.tree_size_small)):
            stats = group[label].results
            calls_per_generation = sum(st.target_calls for st in stats) / len(stats)
            entry[label] = {
                "nodes": size,
                "alone_round_over_step": round(
                    timings[label].median / timings["ar_step"].median, 3),
                "in_generation_call_over_step": round(
                    group[label].median / calls_per_generation / ar_per_step, 3),
                "tokens_per_call": round(n / calls_per_generation, 3),
            }  # fmt: skip
        report[f"batch_{batch}"] = entry
    return report


def cfg_overhead(models: Models, name: str, args, device: torch.device) -> dict[str, Timing]:
    """AR method `name` at batch 1 with guidance 1 and with --cfg, interleaved with each other
    alone (10x --repeats: a cheap pair, and the machine's noise is as large as the gap it
    measures), so the ratio compares calls made side by side, not calls from two groups timed
    minutes apart among different company."""
    target, draft = models.target, models.draft
    fns = {
        key: candidates(target, draft, 1, scale, [name], models, None, args, device)[name]
        for key, scale in (("guidance_1", 1.0), ("guidance_cfg", args.cfg))
    }
    return interleaved(fns, 10 * args.repeats, args.warmup, device)


def on_their_own(
    models: Models, names: list[str], repeats: int, args, device: torch.device
) -> dict[int, dict[str, Timing]]:
    """Methods `names` at batch 1 and --batch, guidance --cfg, timed round-robin among
    themselves only (`repeats` rounds), so their ratios compare calls made side by side."""
    return {
        batch: interleaved(
            candidates(
                models.target, models.draft, batch, args.cfg, names, models, None, args, device
            ),
            repeats,
            args.warmup,
            device,
        )
        for batch in (1, args.batch)
    }


def lossless_pairs(models: Models, args, device: torch.device) -> dict[int, dict[str, Timing]]:
    """Our fastest AR and the exact methods that can beat it (the compiled ones and the trees,
    or the eager ones without --compile) on their own (3x --repeats): the headline speed-ups
    then compare calls made side by side, not calls spread across a round of slow eager
    methods."""
    ar = "ar_compiled" if args.compile else "ar"
    trees = TREES if models.tree_draft is not None else []
    exact = [m for m in LOSSLESS if m not in TREES and m.endswith("_compiled") == args.compile]
    return on_their_own(models, [ar, *exact, *trees], 3 * args.repeats, args, device)


def cpp_wrapper_pairs(models: Models, args, device: torch.device) -> dict[int, dict[str, Timing]]:
    """Compiled AR with the engine's C++ graph wrapper vs inductor's Python one, on their own
    (CPU only)."""
    names = ["ar_compiled", "ar_compiled_python_wrapper"]
    return on_their_own(models, names, args.repeats, args, device)


def describe(model: torch.nn.Module) -> dict[str, Any]:
    cfg = model.config
    return {
        "dim": cfg.dim, "n_layers": cfg.n_layers, "n_heads": cfg.n_heads, "rope": cfg.rope,
        "params": model.num_params(),
    }  # fmt: skip


def describe_tree_draft(draft: TreeDraft | None) -> dict[str, Any] | None:
    """The tree draft's widths and the guidance it was distilled for (it sets the tree's codes
    per call)."""
    if draft is None:
        return None
    cfg = draft.config
    return {"dim": cfg.dim, "hidden": cfg.hidden, "offsets": cfg.offsets,
            "guidance_scale": cfg.guidance_scale, "params": num_params(draft)}  # fmt: skip


def main(argv: list[str] | None = None) -> dict[str, Any]:
    args = parse_args(argv)
    begin = time.perf_counter()
    device = torch.device(args.device)
    if device.type == "cpu" and args.threads > 0:
        torch.set_num_threads(args.threads)
    bf16 = args.dtype == "bf16" or (args.dtype == "auto" and device.type == "cuda")
    dtype = torch.bfloat16 if bf16 else torch.float32
    models = build_models(args)
    ours_models = [models.target, models.draft, models.maskgit]
    ours_models += [models.hf_target_src, models.hf_draft_src]
    for m in ours_models:
        m.to(device)
    if args.tree_draft_ranks_only:
        ranks = {"device": device_name(device), "weights": models.weights}
        ranks |= tree_draft_ranks(models, args, device)
        emit(ranks, args.out)
        print(json.dumps(ranks))  # the last line, as in the full run
        return ranks
    if args.call_costs_only:
        costs = {"device": device_name(device), "weights": models.weights}
        costs |= call_costs(models, args, device)
        emit(costs, args.out)
        print(json.dumps(costs))
        return costs
    models.relaxed.table = models.relaxed.table.to(device)
    hf = export(models, args, device)
    checks = sanity(models, hf, args, device)  # in fp32, before any cast
    for m in [*ours_models, hf.target, hf.draft]:
        m.to(dtype)
    n, big = models.target.config.seq_len, args.batch

    def run(target: GPT, draft: GPT, batch: int, scale: float, methods: list[str]):
        fns = candidates(target, draft, batch, scale, methods, models, hf, args, device)
        return interleaved(fns, args.repeats, args.warmup, device)

    compiled = COMPILED if args.compile else []
    ar_hf = ["ar", "transformers"] + (["ar_compiled"] if args.compile else [])
    groups: dict[tuple[int, float], dict[str, Timing]] = {}
    for batch, scale in itertools.product([1, big], [1.0, args.cfg]):
        methods = OURS + compiled
        if scale == args.cfg and models.tree_draft is not None:
            methods = methods + TREES  # the draft is distilled at this guidance
        if models.hf_is_main and scale == 1.0:  # transformers joins the same round-robin
            extra = ar_hf if batch == big else ASSISTED + ["ar_compiled"] * args.compile
            methods += [m for m in extra if m not in methods]
        groups[batch, scale] = run(models.target, models.draft, batch, scale, methods)
    mb = args.maskgit_batch
    groups[mb, args.cfg] = run(models.target, models.draft, mb, args.cfg,
                               ["ar", "maskgit"] + ["ar_compiled"] * args.compile)  # fmt: skip
    if models.hf_is_main:
        hf_big, hf_one = groups[big, 1.0], groups[1, 1.0]
    else:  # ours runs on the exported (fresh 1D-RoPE) weights beside transformers
        src = (models.hf_target_src, models.hf_draft_src)
        one_hf = ASSISTED + ["ar_compiled"] * args.compile
        hf_big, hf_one = run(*src, big, 1.0, ar_hf), run(*src, 1, 1.0, one_hf)
    ar_vs, assisted = transformers_sections(hf_big, hf_one, models, args, n)
    speculative, maskgit = ours_sections(groups, args, n)
    costs = call_costs(models, args, device)
    round_costs = (tree_round_costs(models, groups, args, device)
                   if models.tree_draft is not None else None)  # fmt: skip
    ar_name = "ar_compiled" if args.compile else "ar"
    guidance_pair = cfg_overhead(models, ar_name, args, device)
    lossless = lossless_pairs(models, args, device)
    wrappers = (cpp_wrapper_pairs(models, args, device)
                if args.compile and device.type == "cpu" and args.compile_mode == "default"
                else {})  # fmt: skip
    cfg = models.target.config
    report = {
        "benchmark": "sampling",
        "device": device_name(device),
        "dtype": str(dtype).replace("torch.", ""),
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "weights": models.weights,
        "models": {
            "target": describe(models.target),
            "draft": describe(models.draft),
            "maskgit": describe(models.maskgit),
            "tree_draft": describe_tree_draft(models.tree_draft),
        },
        "tokens": {"grid": cfg.grid, "num_tokens": n, "vocab": cfg.vocab_size},
        "settings": {key: getattr(args, key) for key in SETTINGS},
        "sanity": checks,
        "ar_vs_transformers": ar_vs,
        "speculative": speculative,
        "vs_transformers_assisted": assisted,
        "maskgit_vs_ar": maskgit,
        "lossless": {
            "guidance": args.cfg,
            "note": "the exact methods that can beat AR, timed among themselves only; the "
            "best_lossless keys come from here",
            **{
                f"batch_{b}": {m: summary(t, fastest_ar(group), b, n) for m, t in group.items()}
                for b, group in lossless.items()
            },
        },
        "call_costs": costs,
        "tree_round_costs": round_costs,
        "cfg_overhead": {
            "batch": 1,
            "method": ar_name,
            "guidance": args.cfg,
            **{key: summary(t, None, 1, n) for key, t in guidance_pair.items()},
        },  # fmt: skip
        "cpp_wrapper": {
            f"batch_{batch}": {
                "guidance": args.cfg,
                **{key: summary(t, None, batch, n) for key, t in pair.items()},
                "cpp_over_python_wrapper": ratio(
                    pair["ar_compiled_python_wrapper"], pair["ar_compiled"]
                ),
                "spread_q25_q75": paired_spread(
                    pair["ar_compiled_python_wrapper"], pair["ar_compiled"]
                ),
            }
            for batch, pair in wrappers.items()
        },
        "tree_draft_ranks": tree_draft_ranks(models, args, device) if models.tree_draft else None,
        "ratios": "speedup = baseline median time / candidate median time (> 1: candidate faster)",
        "note": " ".join(models.notes + ([RANDOM_NOTE] if models.weights == "random" else [])),
        "elapsed_s": round(time.perf_counter() - begin, 1),
    }
    method_1, best_1, spread_1 = best_lossless(lossless[1])
    method_b, best_b, spread_b = best_lossless(lossless[big])
    pairs = {  # headline key -> (baseline, candidate)
        "ar_vs_transformers_b1": (hf_one["transformers"], fastest_ar(hf_one)),
        f"ar_vs_transformers_b{big}": (hf_big["transformers"], fastest_ar(hf_big)),
        "cfg_overhead_b1": (guidance_pair["guidance_1"], guidance_pair["guidance_cfg"]),
    }
    report["summary"] = {
        **{key: ratio(*pair) for key, pair in pairs.items()},
        "best_lossless_vs_ar_b1": best_1,
        f"best_lossless_vs_ar_b{big}": best_b,
        "best_lossless_method": method_1 if method_1 == method_b else f"{method_1} / {method_b}",
        f"maskgit_vs_ar_b{mb}": maskgit["maskgit_speedup_vs_ar"],
        "tokens_per_round_for_1.5x_free_draft": costs["tokens_per_round_for_1.5x_free_draft"],
        "batch_invariant": batch_invariant(models, args, device)
        if dtype == torch.float32
        else None,
        "spread_q25_q75": {
            **{key: paired_spread(*pair) for key, pair in pairs.items()},
            "best_lossless_vs_ar_b1": spread_1,
            f"best_lossless_vs_ar_b{big}": spread_b,
        },
        "device": report["device"],
        "weights": models.weights,
    }
    emit(report, args.out)
    print(json.dumps(report["summary"]))
    return report


if __name__ == "__main__":
    main()

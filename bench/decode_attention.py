"""Compiled AR on CPU with the fused decode attention vs SDPA's CPU kernel, side by side.

`prior/attention.py` writes a compiled CPU decode call (<= 16 queries over the cache) as
broadcast products and sums that inductor fuses (`CPU_COMPILED_DECODE = "fused"`); this times
`generate_ar` both ways on the trained demo prior (random weights of its size without one),
interleaved round by round, at batch 1 and 8 with guidance 1 and 3.

    python bench/decode_attention.py      # ~3 min on a 2-core CPU (8 compiles, then timing)

The last line is {"fused_vs_sdpa_b1_cfg1": ..., ...}: SDPA's median time over fused's (> 1:
fused faster), with the quartiles of the per-round ratios.
"""

from __future__ import annotations

import argparse
import itertools
import json
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import prior.attention as attention  # noqa: E402
from bench.common import device_name, emit, interleaved, paired_spread  # noqa: E402
from bench.sampling_models import conditions, load_gpt, resolve  # noqa: E402
from prior import GPT, GPTConfig  # noqa: E402
from sampling.autoregressive import generate_ar  # noqa: E402
from sampling.guidance import GuidanceSchedule  # noqa: E402
from sampling.logits import SamplingConfig  # noqa: E402
from sampling.noise import RowNoise  # noqa: E402


def target_prior(path: str) -> tuple[GPT, str]:
    found = resolve(path)
    if found is not None:
        return load_gpt(found).eval(), f"trained ({found})"
    cfg = GPTConfig(vocab_size=128, grid=[4, 4], cond="class", num_classes=10, dim=128,
                    n_layers=4, n_heads=4)  # fmt: skip
    torch.manual_seed(0)
    return GPT(cfg).eval(), "random (no trained prior found)"


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--prior", default="outputs/demo/prior/final")
    p.add_argument("--repeats", type=int, default=10)
    p.add_argument("--batches", type=int, nargs="+", default=[1, 8])
    p.add_argument("--scales", type=float, nargs="+", default=[1.0, 3.0])
    p.add_argument("--out", default=None, help="also write the JSON here")
    args = p.parse_args(argv)
    torch.set_num_threads(1)
    model, weights = target_prior(args.prior)
    n, seeds = model.config.seq_len, itertools.count()
    report: dict = {"benchmark": "decode_attention", "device": device_name("cpu"),
                    "weights": weights, "repeats": args.repeats, "settings": {}}  # fmt: skip
    summary = {}
    for batch, scale in itertools.product(args.batches, args.scales):
        cond, uncond, _ = conditions(model, batch)
        guidance = GuidanceSchedule(scale)

        def run(kind: str, cond=cond, uncond=uncond, guidance=guidance, batch=batch):
            def generate() -> None:
                attention.CPU_COMPILED_DECODE = kind
                noise = RowNoise.from_seeds([next(seeds) for _ in range(batch)])
                generate_ar(model, cond, uncond, n, SamplingConfig(), guidance, compile=True,
                            noise=noise)  # fmt: skip

            return generate

        with torch.no_grad():
            t = interleaved({"sdpa": run("sdpa"), "fused": run("fused")}, args.repeats, 1, "cpu")
        attention.CPU_COMPILED_DECODE = "fused"
        key = f"b{batch}_cfg{scale:g}"
        report["settings"][key] = {name: t[name].as_dict() for name in t}
        summary[f"fused_vs_sdpa_{key}"] = round(t["sdpa"].median / t["fused"].median, 3)
        summary[f"fused_vs_sdpa_{key}_q25_q75"] = paired_spread(t["sdpa"], t["fused"])
    report["summary"] = summary
    emit(report, args.out)
    print(json.dumps(summary))
    return report


if __name__ == "__main__":
    main()

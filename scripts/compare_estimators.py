"""Straight-through vs rotation-trick gradients: one config trained with each, nothing else changed.

    python scripts/compare_estimators.py [--config configs/tokenizer/photos.yaml] \
        [--output-dir outputs/compare_estimators] [--max-steps N] [--seeds 0 1 2] [key.sub=value ...]

For each seed, both runs use the same config, seed (`runtime.seed`), data order and number of
steps; only `model.quantizer.estimator` differs. Prints and writes
`OUTPUT_DIR/compare_estimators.json` with the held-out PSNR, SSIM, codebook usage and perplexity
of each run (from its eval.json), and over the seeds the mean ± sample std of each estimator's
scores and of the paired difference rotation - STE (one seed swings the gap by about 1 dB on
photos, so a single pair proves nothing). Each run is a separate `scripts/train_tokenizer.py`
process, so no run inherits another's state; a run this command already finished is reused.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout, uninstalled

from scripts.tokenizer_seeds import train_run  # noqa: E402
from tokenizer.train_config import TokenizerTrainConfig  # noqa: E402
from training import cli  # noqa: E402
from training.config import load_config  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
ESTIMATORS = ("ste", "rotation")
METRICS = ("psnr", "ssim", "codebook_usage", "perplexity")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = cli.parser(__doc__)
    parser.add_argument(
        "--config", type=Path, default=ROOT / "configs" / "tokenizer" / "photos.yaml"
    )
    parser.add_argument("--output-dir", type=Path, default=ROOT / "outputs" / "compare_estimators")
    parser.add_argument("--max-steps", "--steps", dest="steps", type=int, default=None,
                        help="runtime.max_steps for both runs (--steps: the old name)")  # fmt: skip
    parser.add_argument("--seeds", type=int, nargs="+", default=[0], help="runtime.seed values")
    parser.add_argument("overrides", nargs="*", help="key.sub=value overrides for both runs")
    args = parser.parse_args(argv)
    if args.steps is not None and args.steps < 1:
        parser.error(f"--max-steps must be >= 1, got {args.steps}")
    for key in ("model.quantizer.estimator", "runtime.seed"):
        if any(o.startswith(f"{key}=") for o in args.overrides):
            parser.error(f"{key} is what this script varies; do not override it")
    if len(set(args.seeds)) != len(args.seeds):
        raise ValueError(f"--seeds must be different, got {args.seeds}")
    return args


def run_one(args: argparse.Namespace, estimator: str, seed: int) -> dict[str, float]:
    """Train one run in a fresh process; returns its eval.json plus the wall time."""
    out = args.output_dir / (estimator if args.seeds == [0] else f"seed{seed}/{estimator}")
    overrides = [*args.overrides, f"model.quantizer.estimator={estimator}", f"runtime.seed={seed}"]
    if args.steps is not None:
        overrides.append(f"runtime.max_steps={args.steps}")
    results = train_run(args.config, out, overrides)
    return {k: results[k] for k in (*METRICS, "codebook_size", "images", "step", "seconds")}


def difference(runs: dict[str, dict[str, float]]) -> dict[str, float]:
    return {k: runs["rotation"][k] - runs["ste"][k] for k in METRICS}


def mean_std(values: list[dict[str, float]]) -> dict[str, list[float]]:
    """[mean, sample std] of each metric over the seeds."""
    return {
        k: [statistics.fmean(v[k] for v in values), statistics.stdev(v[k] for v in values)]
        for k in METRICS
    }


def main(argv: list[str] | None = None) -> dict:
    args = parse_args(argv)
    load_config(TokenizerTrainConfig, args.config, args.overrides)  # a bad key fails here, once
    per_seed = {s: {e: run_one(args, e, s) for e in ESTIMATORS} for s in args.seeds}
    first = per_seed[args.seeds[0]]
    report = {
        "config": str(
            args.config.relative_to(ROOT) if args.config.is_relative_to(ROOT) else args.config
        ),
        "overrides": list(args.overrides),
        "steps": int(first["ste"]["step"]),
        "held_out_images": int(first["ste"]["images"]),
        "seeds": args.seeds,
        "runs": {str(s): runs for s, runs in per_seed.items()},
        "rotation_minus_ste": {str(s): difference(runs) for s, runs in per_seed.items()},
    }
    if len(args.seeds) > 1:
        report["mean_std"] = {
            **{e: mean_std([runs[e] for runs in per_seed.values()]) for e in ESTIMATORS},
            "rotation_minus_ste": mean_std([difference(r) for r in per_seed.values()]),
        }
    text = json.dumps(report, indent=2)
    args.output_dir.mkdir(parents=True, exist_ok=True)
    (args.output_dir / "compare_estimators.json").write_text(text + "\n")
    print(text)
    return report


def console() -> None:
    """The installed command's entry point: user errors as one line."""
    cli.run(main)


if __name__ == "__main__":
    console()

"""Straight-through vs rotation-trick gradients: one config trained twice, nothing else changed.

    python scripts/compare_estimators.py [--config configs/tokenizer/photos.yaml] \
        [--output-dir outputs/compare_estimators] [--max-steps N] [key.sub=value ...]

Both runs use the same config, seed, data order and number of steps; only
`model.quantizer.estimator` differs. Prints and writes `OUTPUT_DIR/compare_estimators.json` with
the held-out PSNR, SSIM, codebook usage and perplexity of each run (from its eval.json).
Each run is a separate `scripts/train_tokenizer.py` process, so neither inherits the other's state.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout, uninstalled

from tokenizer.train_config import TokenizerTrainConfig  # noqa: E402
from training import cli  # noqa: E402
from training.config import load_config  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
TRAIN = ROOT / "scripts" / "train_tokenizer.py"
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
    parser.add_argument("overrides", nargs="*", help="key.sub=value overrides for both runs")
    args = parser.parse_args(argv)
    if args.steps is not None and args.steps < 1:
        parser.error(f"--max-steps must be >= 1, got {args.steps}")
    if any(o.startswith("model.quantizer.estimator=") for o in args.overrides):
        parser.error("model.quantizer.estimator is what this script varies; do not override it")
    return args


def run_one(args: argparse.Namespace, estimator: str) -> dict[str, float]:
    """Train one run in a fresh process; returns its eval.json plus the wall time."""
    out = args.output_dir / estimator
    overrides = [
        *args.overrides,
        f"model.quantizer.estimator={estimator}",
        "runtime.progress=false",
    ]
    if args.steps is not None:
        overrides.append(f"runtime.max_steps={args.steps}")
    cmd = [sys.executable, str(TRAIN), "--config", str(args.config), "--output-dir", str(out),
           "--overwrite"]  # fmt: skip
    start = time.perf_counter()
    subprocess.run([*cmd, *overrides], cwd=ROOT, check=True)
    seconds = time.perf_counter() - start
    results = json.loads((out / "eval.json").read_text())
    return {
        **{k: results[k] for k in (*METRICS, "codebook_size", "images", "step")},
        "seconds": seconds,
    }


def main(argv: list[str] | None = None) -> dict:
    args = parse_args(argv)
    load_config(TokenizerTrainConfig, args.config, args.overrides)  # a bad key fails here, once
    runs = {estimator: run_one(args, estimator) for estimator in ESTIMATORS}
    report = {
        "config": str(
            args.config.relative_to(ROOT) if args.config.is_relative_to(ROOT) else args.config
        ),
        "overrides": list(args.overrides),
        "steps": int(runs["ste"]["step"]),
        "held_out_images": int(runs["ste"]["images"]),
        "runs": runs,
        "rotation_minus_ste": {k: runs["rotation"][k] - runs["ste"][k] for k in METRICS},
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

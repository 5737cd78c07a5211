"""Tokenizer configs over several seeds: held-out PSNR / SSIM / usage as mean ± std.

    python scripts/tokenizer_seeds.py --configs configs/tokenizer/digits_fsq.yaml \\
        configs/tokenizer/digits_rq.yaml --seeds 0 1 2 [--output-dir outputs/tokenizer_seeds] \\
        [--out bench/results/tokenizer_seeds.json] [key.sub=value ...]

Each (config, seed) is a fresh `scripts/train_tokenizer.py` process with `runtime.seed=seed`
into OUTPUT_DIR/<config name>/seed<s>; its eval.json (the held-out scores the trainer writes
at the end) is read back. A finished run made by the same command and config text is reused,
so an interrupted table resumes. Writes the per-seed scores and mean,
sample std, min and max per config to --out and prints one markdown table per config. The
README's single-config tokenizer figures come from this (`make tokenizer-seeds`).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout, uninstalled

from scripts.demo_seeds import spread, table  # noqa: E402
from tokenizer.train_config import TokenizerTrainConfig  # noqa: E402
from training import cli  # noqa: E402
from training.config import load_config  # noqa: E402
from training.serialization import atomic_write_text  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
TRAIN = ROOT / "scripts" / "train_tokenizer.py"
METRICS = ("psnr", "ssim", "codebook_usage", "perplexity")
COMMAND = "command.json"  # beside eval.json: the command line and config text that made the run


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = cli.parser(__doc__)
    p.add_argument("--configs", type=Path, nargs="+", required=True)
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    p.add_argument("--output-dir", type=Path, default=ROOT / "outputs" / "tokenizer_seeds")
    p.add_argument("--out", type=Path, default=None, help="JSON (default: OUTPUT_DIR/seeds.json)")
    p.add_argument("overrides", nargs="*", help="key.sub=value overrides for every run")
    args = p.parse_args(argv)
    if len(set(args.seeds)) != len(args.seeds) or len(args.seeds) < 2:
        raise ValueError(f"--seeds needs at least two different seeds, got {args.seeds}")
    if any(o.startswith("runtime.seed=") for o in args.overrides):
        raise ValueError("runtime.seed is what this script varies; do not override it")
    names = [c.stem for c in args.configs]
    if len(set(names)) != len(names):
        raise ValueError(f"--configs must have different file names, got {names}")
    return args


def train_run(config: Path, out: Path, overrides: list[str]) -> dict[str, float]:
    """Train one tokenizer in a fresh process (reused when this command already finished it);
    returns its eval.json scores plus the wall time of the training process."""
    cmd = [sys.executable, str(TRAIN), "--config", str(config), "--output-dir", str(out),
           "--overwrite", *overrides, "runtime.progress=false"]  # fmt: skip
    made_by, scores = out / COMMAND, out / "eval.json"
    key = {"cmd": cmd[1:], "config_sha256": hashlib.sha256(Path(config).read_bytes()).hexdigest()}
    if scores.is_file() and made_by.is_file() and json.loads(made_by.read_text()) == key:
        return json.loads(scores.read_text()) | json.loads((out / "seconds.json").read_text())
    start = time.perf_counter()
    subprocess.run(cmd, cwd=ROOT, check=True)
    seconds = {"seconds": round(time.perf_counter() - start, 1)}
    atomic_write_text(out / "seconds.json", json.dumps(seconds) + "\n")
    atomic_write_text(made_by, json.dumps(key) + "\n")  # last: marks the run finished
    return json.loads(scores.read_text()) | seconds


def run_scores(results: dict) -> dict[str, float]:
    """The scores of one eval.json that the table reports."""
    return {k: float(results[k]) for k in (*METRICS, "seconds") if k in results}


def main(argv: list[str] | None = None) -> dict:
    args = parse_args(argv)
    report: dict = {"seeds": args.seeds, "overrides": list(args.overrides), "configs": {}}
    for config in args.configs:
        load_config(TokenizerTrainConfig, config, args.overrides)  # a bad key fails here, once
        runs = []
        for seed in args.seeds:
            out = args.output_dir / config.stem / f"seed{seed}"
            results = train_run(config, out, [*args.overrides, f"runtime.seed={seed}"])
            runs.append(run_scores(results))
        summary = spread(runs)
        report["configs"][config.stem] = {"config": str(config), "runs": runs, "summary": summary}
        print(f"\n{config.stem}\n{table(summary, args.seeds)}", flush=True)
    path = args.out or args.output_dir / "seeds.json"
    atomic_write_text(path, json.dumps(report, indent=2) + "\n")
    print(f"\nwrote {path}")
    return report


def console() -> None:
    """The installed command's entry point: user errors as one line."""
    cli.run(main)


if __name__ == "__main__":
    console()

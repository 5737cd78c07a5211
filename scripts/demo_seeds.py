"""The demo over several seeds: every figure the README takes from training, as mean ± std.

    python scripts/demo_seeds.py --config configs/demo/digits.yaml --output-dir outputs/demo \\
        --seeds 0 1 2 [--out bench/results/demo_seeds_digits.json]

Seed s runs `scripts/demo.py` with `seed=s` (tokenizer, token views, prior, draft and sampling
seeds all follow it) into OUTPUT_DIR for seed 0 (what `make demo` leaves) and OUTPUT_DIR-seed<s>
otherwise, so a finished `make demo` is reused. Then it reads each run's metrics.json and writes
mean, sample standard deviation, min and max of every score (tokenizer PSNR/SSIM/usage, judge
accuracy, class accuracy, Fréchet distance and its ratio to the real-vs-real floor, shapes'
prompt checks, stage times) to --out as JSON, and prints a markdown table. With --collect-only
it runs nothing and tables runs made apart (`scripts/demo.py ... seed=s` per core, say).
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout, uninstalled

from training import cli  # noqa: E402
from training.serialization import atomic_write_text  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = cli.parser(__doc__)
    p.add_argument("--config", type=Path, default=Path("configs/demo/digits.yaml"))
    p.add_argument("--output-dir", type=Path, default=Path("outputs/demo"))
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    p.add_argument("--out", type=Path, default=None, help="JSON (default: OUTPUT_DIR-seeds.json)")
    p.add_argument("--collect-only", action="store_true",
                   help="run nothing: table the seeds' finished metrics.json (runs made apart, "
                        "e.g. one seed per core or machine)")  # fmt: skip
    args = p.parse_args(argv)
    if len(set(args.seeds)) < 2:
        raise ValueError(
            f"--seeds needs at least two different seeds for a spread, got {args.seeds}"
        )
    return args


def run_dir(base: Path, seed: int) -> Path:
    return base if seed == 0 else base.with_name(f"{base.name}-seed{seed}")


def scores(metrics: dict) -> dict[str, float]:
    """The flat scores of one demo run's metrics.json."""
    tok, gen = metrics["tokenizer"], metrics["generation"]
    floor = gen["floor"]["train_vs_heldout"]
    out = {
        "tokenizer_psnr": tok["psnr"],
        "tokenizer_ssim": tok["ssim"],
        "codebook_usage": tok["codebook_usage"],
        "judge_heldout_accuracy": metrics["judge"]["heldout_accuracy"],
        "frechet_floor": floor,
    }
    for run in gen["runs"]:
        key = f"g{run['guidance_scale']:g}"
        out[f"{key}_frechet"] = run["frechet"]
        out[f"{key}_frechet_vs_floor"] = run["frechet"] / floor
        if "accuracy" in run:
            out[f"{key}_accuracy"] = run["accuracy"]["overall"]
        for attr, value in run.get("prompt_check", {}).items():
            if attr in ("color", "shape", "position", "size", "overall"):
                out[f"{key}_prompt_{'all_four' if attr == 'overall' else attr}"] = value
    out |= {f"seconds_{k}": v for k, v in metrics.get("timings_s", {}).items()}
    return out


def spread(runs: list[dict[str, float]]) -> dict[str, dict[str, float]]:
    """mean, sample std, min, max of each score present in every run."""
    keys = [k for k in runs[0] if all(k in r for r in runs)]
    return {
        k: {
            "mean": statistics.fmean(r[k] for r in runs),
            "std": statistics.stdev(r[k] for r in runs),
            "min": min(r[k] for r in runs),
            "max": max(r[k] for r in runs),
        }
        for k in keys
    }


def table(summary: dict[str, dict[str, float]], seeds: list[int]) -> str:
    lines = [
        f"| score (seeds {', '.join(map(str, seeds))}) | mean ± std | min | max |",
        "|---|---|---|---|",
    ]
    for k, s in summary.items():
        lines.append(
            f"| {k} | {s['mean']:.4g} ± {s['std']:.2g} | {s['min']:.4g} | {s['max']:.4g} |"
        )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> dict:
    args = parse_args(argv)
    base = args.output_dir.resolve()
    runs = []
    for seed in args.seeds:
        out = run_dir(base, seed)
        cmd = [sys.executable, "scripts/demo.py", "--config", str(args.config), "--output-dir",
               str(out), f"seed={seed}"]  # fmt: skip
        if not args.collect_only:
            print("$ " + " ".join(cmd), flush=True)
            subprocess.run(cmd, cwd=ROOT, check=True)
        elif not (out / "metrics.json").is_file():
            raise FileNotFoundError(
                f"--collect-only: seed {seed} has no {out / 'metrics.json'}; run "
                f"`{' '.join(cmd[1:])}` first"
            )
        runs.append(scores(json.loads((out / "metrics.json").read_text())))
    summary = spread(runs)
    report = {"config": str(args.config), "seeds": args.seeds, "summary": summary, "runs": runs}
    path = args.out or base.with_name(f"{base.name}-seeds.json")
    atomic_write_text(path, json.dumps(report, indent=2) + "\n")
    print(table(summary, args.seeds))
    print(f"\nwrote {path}")
    return report


def console() -> None:
    """The installed command's entry point: user errors as one line."""
    cli.run(main)


if __name__ == "__main__":
    console()

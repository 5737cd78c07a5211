"""Evaluate a tokenizer (and optionally a prior) offline on an embedded dataset.

    python scripts/evaluate.py --tokenizer outputs/tok/final --data digits
    python scripts/evaluate.py --tokenizer outputs/tok/final --prior outputs/prior/final \\
        --data digits --guidance 1 2 3 --n-per-class 20 --out outputs/eval/metrics.json

Tokenizer: PSNR, SSIM, codebook usage and perplexity on the held-out split (rFID with
--inception-weights). Prior: class-balanced samples with fixed seeds at each guidance scale,
scored by a judge CNN trained on the real training images (cached in <out dir>/judge, trained
once): class accuracy per class and a Fréchet distance in judge features vs held-out real
images, beside the real-vs-real floor; for shapes, each image is checked against its prompt.
Writes JSON (--out) and a PNG of accuracy and Fréchet distance vs guidance (--plot).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout, uninstalled

import torch  # noqa: E402
from omegaconf import OmegaConf  # noqa: E402

from evaluation.judge import JudgeTrainConfig, dataset_images  # noqa: E402
from evaluation.judge_cache import load_or_train_judge  # noqa: E402
from evaluation.plots import plot_guidance  # noqa: E402
from evaluation.real_data import real_data  # noqa: E402
from evaluation.runner import SampleOptions, evaluate_generation  # noqa: E402
from sampling.logits import SamplingConfig  # noqa: E402
from tokenizer.images import image_grid, to_pil  # noqa: E402
from tokenizer.metrics import reconstruction_metrics  # noqa: E402
from tokenizer.model import Tokenizer  # noqa: E402
from training import cli  # noqa: E402
from training.serialization import atomic_write_text  # noqa: E402


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = cli.parser(__doc__)
    p.add_argument("--tokenizer", type=Path, required=True, help="trained tokenizer directory")
    p.add_argument("--prior", type=Path, default=None, help="prior directory (generation scores)")
    p.add_argument("--data", default=None,
                   help="any source the trainers accept (embedded name, image folder, saved "
                        "dataset, parquet); default: the tokenizer's own training data")  # fmt: skip
    p.add_argument("--guidance", type=float, nargs="+", default=[1.0, 3.0], help="CFG scales")
    p.add_argument(
        "--plausibility", type=float, default=0.0, help="CFG cutoff alpha (0 = off), see guidance"
    )
    p.add_argument("--n-per-class", type=int, default=20, help="samples per class and scale")
    p.add_argument("--method", default="auto", help="ar | maskgit | jacobi (auto: by prior type)")
    p.add_argument("--num-steps", type=int, default=8, help="MaskGIT decoding steps")
    p.add_argument("--temperature", type=float, default=1.0)
    p.add_argument("--top-k", type=int, default=0)
    p.add_argument("--top-p", type=float, default=1.0)
    p.add_argument("--out", type=Path, default=Path("outputs/eval/metrics.json"), help="JSON")
    p.add_argument("--plot", type=Path, default=None, help="PNG (default: <out dir>/guidance.png)")
    p.add_argument("--judge-dir", type=Path, default=None, help="default: <out dir>/judge")
    p.add_argument("--judge-steps", type=int, default=JudgeTrainConfig.steps)
    p.add_argument("--inception-weights", type=Path, default=None, help="local weights (rFID)")
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--print-config", action="store_true", help="print the options (YAML), exit")
    return p.parse_args(argv)


def data_source(tokenizer_dir: Path, requested: str | None) -> str:
    """The dataset to score on: `requested`, else the one recorded in the tokenizer's run
    (config.yaml beside final/). Scoring on another dataset is allowed, and said."""
    recorded = tokenizer_dir.parent / "config.yaml"
    trained_on = (
        OmegaConf.select(OmegaConf.load(recorded), "data.source") if recorded.is_file() else None
    )
    if requested is None:
        if trained_on is None:
            raise ValueError(
                f"--data is needed: {recorded} does not say what {tokenizer_dir} was trained on"
            )
        return str(trained_on)
    if trained_on is not None and str(trained_on) != requested:
        print(f"note: {tokenizer_dir} was trained on {trained_on}; scoring it on {requested}",
              file=sys.stderr)  # fmt: skip
    return requested


def main(argv: list[str] | None = None) -> dict[str, Any]:
    args = parse_args(argv)
    if args.print_config:
        print(cli.options_yaml(args), end="")
        return {}
    if args.n_per_class < 1:
        raise ValueError(f"--n-per-class must be >= 1, got {args.n_per_class}")
    tokenizer = Tokenizer.from_pretrained(str(args.tokenizer)).to(args.device).eval()
    args.data = data_source(args.tokenizer, args.data)
    data = real_data(args.data, tokenizer.config.resolution, seed=args.seed)
    metrics: dict[str, Any] = {"data": args.data, "resolution": tokenizer.config.resolution}
    out_dir = args.out.parent
    out_dir.mkdir(parents=True, exist_ok=True)

    pairs: list[tuple[torch.Tensor, torch.Tensor]] = []
    start = time.perf_counter()
    held = dataset_images(data.heldout)
    keep = None if args.inception_weights is None else lambda x, r: pairs.append((x.cpu(), r.cpu()))
    metrics["tokenizer"] = reconstruction_metrics(
        tokenizer, held.split(args.batch_size), on_batch=keep
    )
    inception = None
    if args.inception_weights is not None:
        from evaluation.inception import fid, load_inception

        inception = load_inception(args.inception_weights).to(args.device)
        real, recon = (torch.cat(t) for t in zip(*pairs))
        metrics["tokenizer"]["rfid"] = fid(inception, real, recon, args.batch_size)
    metrics["tokenizer"]["seconds"] = time.perf_counter() - start
    print("tokenizer:", json.dumps(metrics["tokenizer"]))

    if args.prior is not None:
        from evaluation.inception import generation_scores
        from sampling.pipeline import Pipeline

        train_cfg = JudgeTrainConfig(steps=args.judge_steps, seed=args.seed)
        judge, report = load_or_train_judge(args.judge_dir or out_dir / "judge", data, train_cfg)
        metrics["judge"] = report
        print(f"judge: held-out accuracy {report['heldout_accuracy']:.4f}")
        pipe = Pipeline.from_pretrained(args.tokenizer, args.prior, device=args.device)
        sampling = SamplingConfig(args.temperature, args.top_k, args.top_p)
        options = SampleOptions(
            args.method, args.num_steps, sampling, args.batch_size, args.plausibility, progress=True
        )

        inception_runs: dict[float, dict[str, float]] = {}

        def save_grid(scale: float, images: torch.Tensor) -> None:
            path = out_dir / f"samples_g{scale:g}.png"
            image_grid(to_pil(images), cols=args.n_per_class).save(path)
            if inception is not None:  # FID and Inception Score of this guidance scale's samples
                inception_runs[scale] = generation_scores(inception, held, images, args.batch_size)

        start = time.perf_counter()
        gen = evaluate_generation(
            pipe, judge, data, args.guidance, args.n_per_class,
            mode=pipe.prior.config.cond, seed=args.seed, options=options, on_samples=save_grid,
        )  # fmt: skip
        gen["seconds"] = time.perf_counter() - start
        for run in gen["runs"]:
            run.update(inception_runs.get(run["guidance_scale"], {}))
        metrics["generation"] = gen
        for run in gen["runs"]:
            line = f"guidance {run['guidance_scale']:g}: frechet {run['frechet']:.3f}"
            if "accuracy" in run:
                line += f" accuracy {run['accuracy']['overall']:.3f}"
            if "prompt_check" in run:
                line += f" prompt check {run['prompt_check']['overall']:.3f}"
            print(line)
        print(f"real floor: frechet train vs held-out {gen['floor']['train_vs_heldout']:.3f}")
        plot = args.plot or out_dir / "guidance.png"
        plot_guidance(gen, plot)
        metrics["plot"] = str(plot)

    atomic_write_text(args.out, json.dumps(metrics, indent=2))
    print(f"wrote {args.out}")
    return metrics


def console() -> None:
    """The installed command's entry point: user errors as one line."""
    cli.run(main)


if __name__ == "__main__":
    console()

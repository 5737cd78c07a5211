"""Encode an image dataset with a trained tokenizer into a token export (see tokenizer/export.py).

    python scripts/export_tokens.py --tokenizer outputs/tok/final --data digits --out outputs/tokens
    accelerate launch scripts/export_tokens.py ...   # every process encodes a shard

Options are ExportConfig's keys (tokenizer/export.py): `--config FILE` and/or `key.sub=value`
overrides, e.g. `views=8 augment.flip=true`; the old flags (--views, --flip, ...) still work.
Views > 1 add augmented crops (small rotation / scale / shift; --flip for mirror images) after
the clean view 0, so a prior trained on a small dataset does not just memorise it.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout, uninstalled

from omegaconf import OmegaConf  # noqa: E402

from tokenizer.export import ExportConfig, export_tokens  # noqa: E402
from tokenizer.model import Tokenizer  # noqa: E402
from tokenizer.sources import DataConfig, SplitNotFoundError, load_split  # noqa: E402
from training import cli  # noqa: E402
from training.config import load_config  # noqa: E402
from training.runtime import RuntimeConfig, build_accelerator  # noqa: E402

# one-release aliases: old flags -> ExportConfig keys (the config is the one place they live)
FLAG_ALIASES = {
    "--views": "views", "--batch-size": "batch_size", "--seed": "seed",
    "--num-workers": "num_workers", "--interpolation": "image_interpolation",
    "--max-rotation": "augment.max_rotation", "--min-scale": "augment.min_scale",
    "--max-scale": "augment.max_scale", "--max-shift": "augment.max_shift",
    "--view-interpolation": "augment.interpolation", "--padding": "augment.padding",
}  # fmt: skip
SWITCH_ALIASES = {"--flip": "augment.flip=true", "--no-progress": "progress=false"}


def parse_args(argv: list[str] | None = None) -> tuple[argparse.Namespace, ExportConfig]:
    p = cli.parser(__doc__)
    p.add_argument("--tokenizer", type=Path, required=True, help="trained tokenizer directory")
    p.add_argument("--data", required=True, help="digits | photos | shapes | a path | a Hub name")
    p.add_argument("--output-dir", "--out", dest="out", type=Path, required=True,
                   help="export directory, created atomically (--out: the old name)")  # fmt: skip
    p.add_argument("--split", default="train", help="source split (default: train)")
    p.add_argument("--max-samples", type=int, default=None, help="only the first N source images")
    p.add_argument("--config", type=Path, default=None, help="YAML file of ExportConfig keys")
    p.add_argument("--overwrite", action="store_true", help="replace an existing export")
    p.add_argument(
        "--holdout",
        action="store_true",
        help="a source without a 'test' split: carve one (10%% of the images, seeded, as the "
        "tokenizer trainer does) for --split test, and leave it out of --split train",
    )
    p.add_argument("--print-config", action="store_true", help="print the resolved config, exit")
    for flag, key in FLAG_ALIASES.items():
        p.add_argument(flag, dest=key, default=None, help=f"same as {key}=VALUE")
    for flag, override in SWITCH_ALIASES.items():
        p.add_argument(flag, dest=override, action="store_true", help=f"same as {override}")
    p.add_argument("overrides", nargs="*", help="ExportConfig key.sub=value overrides")
    args = p.parse_intermixed_args(argv)
    overrides = [f"{k}={getattr(args, k)}" for k in FLAG_ALIASES.values() if getattr(args, k)]
    overrides += [o for o in SWITCH_ALIASES.values() if getattr(args, o)]
    return args, load_config(ExportConfig, args.config, [*overrides, *args.overrides])


def main(argv: list[str] | None = None) -> None:
    args, cfg = parse_args(argv)
    if args.print_config:
        print(OmegaConf.to_yaml(OmegaConf.structured(cfg)), end="")
        return
    if args.out.exists() and not args.overwrite:
        raise SystemExit(f"error: {args.out} already exists; pass --overwrite to replace it")
    acc = build_accelerator(RuntimeConfig(seed=cfg.seed, tracker="none"), args.out.parent)
    tokenizer = Tokenizer.from_pretrained(str(args.tokenizer))
    data_cfg = DataConfig(
        source=args.data,
        resolution=tokenizer.config.resolution,
        interpolation=cfg.image_interpolation,
        max_samples=args.max_samples,
        eval_split="test" if args.holdout else None,
    )
    try:
        dataset = load_split(data_cfg, args.split)
    except SplitNotFoundError as err:
        raise SplitNotFoundError(f"{err}; --holdout carves a held-out 'test' split") from None
    source = {
        "data": args.data,
        "split": args.split,
        "resolution": data_cfg.resolution,
        "max_samples": args.max_samples,
        "tokenizer_dir": str(args.tokenizer.resolve()),
    }
    out = export_tokens(tokenizer, dataset, args.out, cfg, source, acc, overwrite=args.overwrite)
    acc.print(f"wrote {out} ({len(dataset)} images x {cfg.views} views)")


def console() -> None:
    """The installed command's entry point: user errors as one line."""
    cli.run(main)


if __name__ == "__main__":
    console()

"""Encode an image dataset with a trained tokenizer into a token export (see tokenizer/export.py).

    python scripts/export_tokens.py --tokenizer outputs/tok/final --data digits --out outputs/tokens
    accelerate launch scripts/export_tokens.py ...   # every process encodes a shard

Views > 1 add augmented crops (small rotation / scale / shift; --flip for mirror images) after
the clean view 0, so a prior trained on a small dataset does not just memorise it.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from tokenizer.data import DataConfig, load_image_dataset
from tokenizer.export import AugmentConfig, ExportConfig, export_tokens
from tokenizer.model import Tokenizer
from training.runtime import RuntimeConfig, build_accelerator


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--tokenizer", type=Path, required=True, help="trained tokenizer directory")
    p.add_argument("--data", required=True, help="digits | photos | shapes | a path | a Hub name")
    p.add_argument("--out", type=Path, required=True, help="export directory (created atomically)")
    p.add_argument("--split", default="train")
    p.add_argument("--views", type=int, default=1, help="views per image; view 0 is the clean one")
    p.add_argument("--batch-size", type=int, default=64, help="images per encoder call")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--max-samples", type=int, default=None, help="only the first N source images")
    p.add_argument("--num-workers", type=int, default=0)
    p.add_argument("--interpolation", default="bicubic", help="resizing of source images")
    p.add_argument("--max-rotation", type=float, default=10.0, help="degrees")
    p.add_argument("--min-scale", type=float, default=0.9)
    p.add_argument("--max-scale", type=float, default=1.1)
    p.add_argument("--max-shift", type=float, default=0.06, help="fraction of the side")
    p.add_argument("--flip", action="store_true", help="random horizontal flips in views >= 1")
    p.add_argument("--view-interpolation", default="bilinear", choices=["bilinear", "nearest"])
    p.add_argument("--padding", default="border", choices=["border", "reflection", "zeros"])
    p.add_argument("--overwrite", action="store_true", help="replace an existing export")
    p.add_argument("--no-progress", action="store_true")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    cfg = ExportConfig(
        views=args.views,
        batch_size=args.batch_size,
        seed=args.seed,
        num_workers=args.num_workers,
        image_interpolation=args.interpolation,
        progress=not args.no_progress,
        augment=AugmentConfig(
            max_rotation=args.max_rotation,
            min_scale=args.min_scale,
            max_scale=args.max_scale,
            max_shift=args.max_shift,
            flip=args.flip,
            interpolation=args.view_interpolation,
            padding=args.padding,
        ),
    )
    if args.out.exists() and not args.overwrite:
        raise SystemExit(f"error: {args.out} already exists; pass --overwrite to replace it")
    acc = build_accelerator(RuntimeConfig(seed=args.seed, tracker="none"), args.out.parent)
    tokenizer = Tokenizer.from_pretrained(str(args.tokenizer))
    data_cfg = DataConfig(
        source=args.data,
        resolution=tokenizer.config.resolution,
        interpolation=args.interpolation,
        max_samples=args.max_samples,
    )
    dataset = load_image_dataset(data_cfg, args.split)
    source = {
        "data": args.data,
        "split": args.split,
        "resolution": data_cfg.resolution,
        "max_samples": args.max_samples,
        "tokenizer_dir": str(args.tokenizer.resolve()),
    }
    out = export_tokens(tokenizer, dataset, args.out, cfg, source, acc, overwrite=args.overwrite)
    acc.print(f"wrote {out} ({len(dataset)} images x {cfg.views} views)")


if __name__ == "__main__":
    main()

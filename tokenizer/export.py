"""Token export: images -> codes once, saved as a `datasets` directory a prior trains on quickly.

An export directory holds a dataset readable by plain `datasets.load_from_disk` (columns `codes`
uint16 Array2D [h, w] or Array3D [h, w, D], `label`, `caption`, `view`, `index`), a
`manifest.json` (tokenizer identity, class names, source, counts) and `codebook.safetensors`.

Augmented views (small rotation / scale / shift, optional flip) are drawn from a generator seeded
by (seed, index, view), so an export is the same whatever the batch size or number of processes.
View 0 is always the clean image. Under `accelerate launch` every rank encodes a contiguous shard
of the source rows and the main process merges them in rank order (= single-process order).
The directory appears in one rename at the end; a failed or interrupted export leaves only a
hidden `.tmp-*` folder behind (removed on ordinary errors).
"""

from __future__ import annotations

import math
import shutil
import sys
import uuid
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import datasets
import numpy as np
import torch
from accelerate import Accelerator
from accelerate.utils import broadcast_object_list
from datasets.arrow_writer import ArrowWriter
from einops import rearrange, repeat
from safetensors.torch import save_file
from tqdm.auto import tqdm

from tokenizer.data import ImageTransform, make_dataloader
from tokenizer.images import affine_warp
from tokenizer.manifest import (
    CODEBOOK,
    MAX_CODES,
    TokenizerIdentity,
    build_manifest,
    write_manifest,
)
from tokenizer.model import Tokenizer
from training.serialization import atomic_dir


@dataclass
class AugmentConfig:
    """Random view geometry for views >= 1 (view 0 is the clean image)."""

    max_rotation: float = 10.0  # degrees, uniform in [-max, max]
    min_scale: float = 0.9
    max_scale: float = 1.1
    max_shift: float = 0.06  # fraction of the image side, uniform in [-max, max] per axis
    flip: bool = False  # horizontal flip with p = 0.5 (off for digits and text)
    interpolation: str = "bilinear"  # "bilinear" | "nearest"
    padding: str = "border"  # "border" | "reflection" | "zeros" (zeros = mid grey in [-1, 1])

    def __post_init__(self) -> None:
        if self.max_rotation < 0 or self.max_shift < 0:
            raise ValueError("augment.max_rotation and augment.max_shift must be >= 0")
        if not 0 < self.min_scale <= self.max_scale:
            raise ValueError(
                f"augment scales must satisfy 0 < min_scale <= max_scale, got "
                f"{self.min_scale}, {self.max_scale}"
            )
        if self.interpolation not in ("bilinear", "nearest"):
            raise ValueError(
                f"augment.interpolation must be 'bilinear' or 'nearest', got {self.interpolation!r}"
            )
        if self.padding not in ("border", "reflection", "zeros"):
            raise ValueError(
                f"augment.padding must be border|reflection|zeros, got {self.padding!r}"
            )


@dataclass
class ExportConfig:
    """How an export runs: views per image, batch, seed and the view geometry."""

    views: int = 1
    batch_size: int = 64  # images (rows x views) per encoder call
    seed: int = 0
    num_workers: int = 0
    image_interpolation: str = "bicubic"  # resizing of source images to the tokenizer resolution
    progress: bool = True
    augment: AugmentConfig = field(default_factory=AugmentConfig)

    def __post_init__(self) -> None:
        if self.views < 1:
            raise ValueError(f"views must be >= 1, got {self.views}")
        if self.batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {self.batch_size}")


# ---- augmented views ----------------------------------------------------------------------------
def view_params(seed: int, index: int, view: int, aug: AugmentConfig) -> list[float]:
    """[angle (rad), scale, shift_x, shift_y, flip] for one (image, view); view 0 is the identity."""
    if view == 0:
        return [0.0, 1.0, 0.0, 0.0, 0.0]
    rng = np.random.default_rng([seed, index, view])
    u = rng.uniform(size=5)
    angle = math.radians(aug.max_rotation) * (2 * u[0] - 1)
    scale = aug.min_scale * (aug.max_scale / aug.min_scale) ** u[1]  # log-uniform
    shift = aug.max_shift * 2 * (2 * u[2:4] - 1)  # in [-1, 1] grid units: side = 2
    flip = float(aug.flip and u[4] < 0.5)
    return [angle, scale, float(shift[0]), float(shift[1]), flip]


def augment_views(images: torch.Tensor, params: torch.Tensor, aug: AugmentConfig) -> torch.Tensor:
    """Warp images [B, C, H, W] by params [B, 5] (see `view_params`); identity rows stay exact."""
    angle, scale, tx, ty, flip = params.to(images.device, torch.float32).unbind(-1)  # each [B]
    shift = torch.stack([tx, ty], -1)  # [B, 2]
    warped = affine_warp(
        images.float(), angle, scale, shift, flip=flip, mode=aug.interpolation, padding=aug.padding
    )
    identity = (params == torch.tensor([0.0, 1.0, 0.0, 0.0, 0.0])).all(-1).to(images.device)
    return torch.where(identity[:, None, None, None], images, warped.to(images.dtype))


# ---- features and files -------------------------------------------------------------------------
def export_features(identity: TokenizerIdentity) -> datasets.Features:
    """Columns of a token export (codes uint16 of the identity's code shape)."""
    shape = tuple(identity.code_shape)
    codes = (
        datasets.Array2D(shape, "uint16") if len(shape) == 2 else datasets.Array3D(shape, "uint16")
    )
    class_names = identity.class_names
    label = datasets.ClassLabel(names=class_names) if class_names else datasets.Value("int64")
    return datasets.Features(
        {
            "codes": codes,
            "label": label,
            "caption": datasets.Value("string"),
            "view": datasets.Value("int32"),
            "index": datasets.Value("int64"),
        }
    )


@torch.no_grad()
def codebook_tensors(tokenizer: Tokenizer) -> dict[str, torch.Tensor]:
    """ "codebook" [K, d] lookup vectors; "embedding" [K, latent] decoder-side latents (depth 1)."""
    out = {"codebook": tokenizer.codebook().detach().float().cpu().contiguous()}
    if tokenizer.depth == 1:
        k = tokenizer.codebook_size
        device = next(tokenizer.parameters()).device
        codes = torch.arange(k, device=device).reshape(1, k, 1)  # [1, K, 1]: a K x 1 "grid"
        latents = tokenizer.quantizer.embed(codes)  # [1, C, K, 1]
        out["embedding"] = rearrange(latents, "1 c k 1 -> k c").float().cpu().contiguous()
    return out


# ---- the export ---------------------------------------------------------------------------------
def _shard(n: int, rank: int, world: int) -> range:
    """Contiguous rows of `rank`: concatenating shards in rank order restores the source order."""
    start, stop = n * rank // world, n * (rank + 1) // world
    return range(start, stop)


def _encode_shard(
    tokenizer: Tokenizer,
    rows: datasets.Dataset,
    cfg: ExportConfig,
    features: datasets.Features,
    path: Path,
    device: torch.device,
    show: bool,
) -> int:
    """Encode `rows` x `cfg.views` into the Arrow file `path`; returns the number of samples."""
    transform = ImageTransform(tokenizer.config.resolution, interpolation=cfg.image_interpolation)
    rows_per_batch = max(1, cfg.batch_size // cfg.views)
    loader = make_dataloader(
        rows, rows_per_batch, False, cfg.seed, cfg.num_workers, transform=transform
    )
    views = torch.arange(cfg.views)
    written = 0
    writer = ArrowWriter(features=features, path=str(path))
    show = show and sys.stderr.isatty()  # a bar where a person sees it redrawn; files get "wrote"
    bar = tqdm(total=len(rows) * cfg.views, disable=not show, desc="export", unit="img")
    for batch in loader:
        index = batch["index"]  # [b]
        images = repeat(batch["image"], "b c h w -> (b v) c h w", v=cfg.views)
        view_ids = repeat(views, "v -> (b v)", b=len(index))
        sample_ids = repeat(index, "b -> (b v)", v=cfg.views)
        params = torch.tensor(
            [
                view_params(cfg.seed, int(i), int(v), cfg.augment)
                for i, v in zip(sample_ids, view_ids)
            ]
        )  # [b*v, 5]
        images = augment_views(images.to(device), params, cfg.augment)
        codes = tokenizer.encode(images)  # [b*v, h, w(, D)]
        if codes.numel() and (int(codes.min()) < 0 or int(codes.max()) >= tokenizer.codebook_size):
            raise ValueError("tokenizer.encode returned codes outside [0, codebook_size)")
        writer.write_batch(
            {
                "codes": codes.cpu().numpy().astype(np.uint16),
                "label": repeat(batch["label"], "b -> (b v)", v=cfg.views).tolist(),
                "caption": [c for c in batch["caption"] for _ in range(cfg.views)],
                "view": view_ids.tolist(),
                "index": sample_ids.tolist(),
            }
        )
        written += len(view_ids)
        bar.update(len(view_ids))
    writer.finalize()
    bar.close()
    return written


def _check_complete(merged: datasets.Dataset, num_rows: int, views: int) -> None:
    """Every (index, view) exactly once: what a correct merge of the shards must give."""
    cols = merged.with_format("numpy", columns=["index", "view"])[:]
    key = np.asarray(cols["index"], np.int64) * views + np.asarray(cols["view"], np.int64)
    expected = np.arange(num_rows * views)
    if key.shape != expected.shape or not np.array_equal(np.sort(key), expected):
        raise RuntimeError(
            f"merged export has {len(key)} samples with {len(np.unique(key))} distinct "
            f"(index, view) pairs; expected each of {num_rows} x {views} exactly once"
        )


def export_tokens(
    tokenizer: Tokenizer,
    dataset: datasets.Dataset,
    out: str | Path,
    cfg: ExportConfig,
    source: dict[str, Any],
    accelerator: Accelerator | None = None,
    overwrite: bool = False,
) -> Path:
    """Encode a standardised image dataset (`tokenizer.data.load_image_dataset`) into `out`.

    Every process of `accelerator` encodes its shard; the main process merges, checks that every
    (index, view) appears once, writes manifest + codebook and renames the folder into place.
    """
    out = Path(out)
    acc = accelerator or Accelerator(cpu=not torch.cuda.is_available())
    if out.exists() and not overwrite:
        raise FileExistsError(f"{out} already exists; pass --overwrite to replace it")
    if tokenizer.codebook_size > MAX_CODES:
        raise ValueError(
            f"codebook_size {tokenizer.codebook_size} does not fit uint16 codes (max {MAX_CODES})"
        )
    for col in ("image", "label", "caption", "index"):
        if col not in dataset.column_names:
            raise ValueError(
                f"dataset lacks column {col!r}: load it with tokenizer.data.load_image_dataset"
            )
    label_feature = dataset.features["label"]
    class_names = list(getattr(label_feature, "names", []) or [])
    identity = tokenizer.identity().with_classes(class_names)
    features = export_features(identity)
    token = [uuid.uuid4().hex[:8] if acc.is_main_process else None]
    broadcast_object_list(token)
    work = out.parent / f".tmp-{out.name}-shards-{token[0]}"
    tokenizer = tokenizer.to(acc.device).eval()
    try:
        if acc.is_main_process:
            work.mkdir(parents=True)
        acc.wait_for_everyone()
        rows = dataset.select(_shard(len(dataset), acc.process_index, acc.num_processes))
        shard_file = work / f"shard-{acc.process_index:05d}.arrow"
        with torch.no_grad():
            _encode_shard(
                tokenizer, rows, cfg, features, shard_file, acc.device,
                cfg.progress and acc.is_local_main_process,
            )  # fmt: skip
        acc.wait_for_everyone()
        if acc.is_main_process:
            _merge(
                tokenizer, identity, work, out, cfg, source, len(dataset), acc.num_processes,
                overwrite,
            )  # fmt: skip
    finally:  # success or failure: the shards never outlive the export
        if acc.is_main_process:
            shutil.rmtree(work, ignore_errors=True)
    acc.wait_for_everyone()
    return out


def _merge(
    tokenizer: Tokenizer,
    identity: TokenizerIdentity,
    work: Path,
    out: Path,
    cfg: ExportConfig,
    source: dict[str, Any],
    num_rows: int,
    world: int,
    overwrite: bool,
) -> None:
    parts = [datasets.Dataset.from_file(str(work / f"shard-{r:05d}.arrow")) for r in range(world)]
    merged = datasets.concatenate_datasets(parts)
    _check_complete(merged, num_rows, cfg.views)
    manifest = build_manifest(
        identity, source=source, num_images=num_rows, views=cfg.views,
        num_samples=len(merged), export=asdict(cfg),
    )  # fmt: skip
    bars = datasets.is_progress_bar_enabled()
    if not (cfg.progress and sys.stderr.isatty()):
        datasets.disable_progress_bars()
    try:
        with atomic_dir(out, overwrite=overwrite) as tmp:
            merged.save_to_disk(str(tmp))
            save_file(codebook_tensors(tokenizer), str(tmp / CODEBOOK))
            write_manifest(tmp, manifest)
    finally:
        if bars:
            datasets.enable_progress_bars()

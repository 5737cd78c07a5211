"""Token batches for stage 2: from a token export (fast, prior/tokens.py) or by encoding
images on the fly.

Batches are {"codes": Long[B, N] or [B, N, D] (raster order), "label": Long[B], "caption":
list[str]}.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import datasets
import torch
from torch.utils.data import DataLoader

from prior.tokens import TokenDataset, split_by_image, token_loader, view0_rows
from tokenizer.data import ImageTransform, make_dataloader
from tokenizer.manifest import TokenizerIdentity, flatten_codes, read_manifest
from tokenizer.model import Tokenizer
from tokenizer.sources import DataConfig, load_split
from training.runtime import RuntimeConfig


@dataclass
class PriorDataConfig:
    """Token export (fast) or image source + tokenizer (encoded on the fly); the held-out split."""

    tokens: str = ""  # token export directory
    val_tokens: str | None = None  # separate held-out export (view 0 rows); else val_fraction
    val_fraction: float = 0.05  # of source images (all their views leave the training set)
    max_val_samples: int = 512
    source: str = ""  # image source for on-the-fly encoding when tokens == ""
    split: str = "train"
    val_split: str = "test"  # on-the-fly held-out split
    tokenizer: str = ""  # tokenizer dir: on-the-fly encoding and sample grids
    in_memory: bool = True  # hold the uint16 codes in RAM (else memory-mapped Arrow reads)

    def __post_init__(self) -> None:
        if bool(self.tokens) == bool(self.source):
            raise ValueError(
                "data: set exactly one of data.tokens (an export) or data.source (images)"
            )
        if self.source and not self.tokenizer:
            raise ValueError("data.tokenizer is required to encode data.source on the fly")
        if not 0.0 <= self.val_fraction < 1.0:
            raise ValueError(f"data.val_fraction must be in [0, 1), got {self.val_fraction}")


# ---- on the fly ---------------------------------------------------------------------------------
class OnTheFlyTokens:
    """Images -> token batches with the tokenizer, for users without an export (slower).

    `loader(split)` yields image batches; `encode(batch)` turns one into a token batch on the
    tokenizer's device. No augmented views: export with --views for those.
    """

    def __init__(self, tokenizer: Tokenizer, source: str, interpolation: str = "bicubic") -> None:
        self.tokenizer = tokenizer.eval().requires_grad_(False)
        self.data_cfg = DataConfig(
            source=source, resolution=tokenizer.config.resolution, interpolation=interpolation
        )
        self.transform = ImageTransform.from_config(self.data_cfg, train=False)
        self._identity = tokenizer.identity()
        self.class_names: list[str] = []

    def dataset(self, split: str) -> datasets.Dataset:
        ds = load_split(self.data_cfg, split)
        self.class_names = list(getattr(ds.features["label"], "names", []) or [])
        return ds

    @property
    def info(self) -> TokenizerIdentity:
        return self._identity.with_classes(self.class_names)

    def loader(
        self, ds: datasets.Dataset, batch_size: int, shuffle: bool, seed: int, num_workers: int = 0
    ) -> DataLoader:
        return make_dataloader(
            ds, batch_size, shuffle, seed, num_workers, transform=self.transform, drop_last=shuffle
        )

    @torch.no_grad()
    def encode(self, batch: dict[str, Any]) -> dict[str, Any]:
        device = next(self.tokenizer.parameters()).device
        codes = self.tokenizer.encode(batch["image"].to(device))  # [B, h, w(, D)]
        return {"codes": flatten_codes(codes), "label": batch["label"], "caption": batch["caption"]}


# ---- what a training run reads ---------------------------------------------------------------------------------------
@dataclass
class PriorData:
    """What the run trains and validates on, and how a loader batch becomes a token batch."""

    info: TokenizerIdentity
    train_loader: Any
    val_loader: Any
    captions: list[str]  # training captions (text vocabulary, sample prompts)
    to_tokens: Callable[[dict[str, Any]], dict[str, Any]]
    tokenizer_dir: str


def load_data(d: PriorDataConfig, rt: RuntimeConfig, device: torch.device) -> PriorData:
    """Train / held-out loaders from an export (fast) or from images encoded on the fly."""
    paths = {"tokens": d.tokens, "val_tokens": d.val_tokens}
    if d.source:  # encoding on the fly needs the tokenizer; sample grids only skip without it
        paths["tokenizer"] = d.tokenizer
    for key, path in paths.items():
        if path and not Path(path).is_dir():
            what = "tokenizer folder" if key == "tokenizer" else "token export"
            raise FileNotFoundError(f"data.{key}: {what} {path} not found")
    if d.tokens:
        manifest = read_manifest(d.tokens)
        info = TokenizerIdentity.from_manifest(manifest)
        if d.val_tokens:
            train_rows, val_rows = None, view0_rows(d.val_tokens, d.max_val_samples)
        elif d.val_fraction > 0:
            train_rows, val_rows = split_by_image(
                d.tokens, d.val_fraction, rt.seed, d.max_val_samples
            )
        else:
            train_rows, val_rows = None, None
        train = TokenDataset(d.tokens, None, train_rows, d.in_memory)
        val = None
        if val_rows is not None:
            val = TokenDataset(d.val_tokens or d.tokens, info, val_rows, d.in_memory)
        train_loader = token_loader(train, rt.batch_size, True, rt.seed, True, rt.num_workers)
        val_loader = token_loader(val, rt.batch_size, False, rt.seed) if val is not None else None
        tok_dir = d.tokenizer or str(manifest.get("source", {}).get("tokenizer_dir", ""))
        return PriorData(info, train_loader, val_loader, train.captions, lambda b: b, tok_dir)
    tokenizer = Tokenizer.from_pretrained(d.tokenizer).to(device)
    otf = OnTheFlyTokens(tokenizer, d.source)
    train_images = otf.dataset(d.split)
    val_images = otf.dataset(d.val_split) if d.val_split else None
    if val_images is not None and len(val_images) > d.max_val_samples:
        val_images = val_images.select(range(d.max_val_samples))
    train_loader = otf.loader(train_images, rt.batch_size, True, rt.seed, rt.num_workers)
    val_loader = otf.loader(val_images, rt.batch_size, False, rt.seed) if val_images else None
    return PriorData(
        otf.info, train_loader, val_loader, list(train_images["caption"]), otf.encode, d.tokenizer
    )


def check_labels(data: PriorData, num_classes: int) -> None:
    """Class-conditional training needs every label in [0, num_classes)."""
    dataset = data.train_loader.dataset
    labels = getattr(dataset, "labels", None)
    if labels is not None and len(labels) and (labels.min() < 0 or labels.max() >= num_classes):
        raise ValueError(f"labels must lie in [0, {num_classes}) for cond='class', got "
                         f"[{labels.min()}, {labels.max()}]")  # fmt: skip

"""Token batches for stage 2: from a token export (fast) or by encoding images on the fly.

Batches are {"codes": Long[B, N] or [B, N, D] (raster order), "label": Long[B], "caption":
list[str]}. An export is checked once at load time: its manifest must describe the tokenizer the
prior expects (every differing field is named), and every code must lie in [0, codebook_size).
Held-out splits are drawn by source image (`index`), never by row: the augmented views of one
image all land on the same side, and validation uses only the clean view 0.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import datasets
import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset

from tokenizer.data import DataConfig, ImageTransform, load_image_dataset, make_dataloader
from tokenizer.manifest import TokenizerIdentity, flatten_codes, read_manifest
from tokenizer.model import Tokenizer
from training.runtime import RuntimeConfig

CHECK_ROWS = 1 << 16  # rows per chunk of the load-time range check (arrow-backed path)


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


class TokenDataset(Dataset):
    """A token export held as uint16 codes in memory (or read from the memory-mapped Arrow files).

    `rows` restricts the dataset to some rows (see `split_by_image`); `expected` is the
    TokenizerIdentity of the prior that will train on it (None = accept whatever the manifest says).
    """

    def __init__(
        self,
        path: str | Path,
        expected: TokenizerIdentity | None = None,
        rows: np.ndarray | None = None,
        in_memory: bool = True,
    ) -> None:
        self.path = Path(path)
        self.manifest = read_manifest(self.path)
        self.info = TokenizerIdentity.from_manifest(self.manifest)
        if expected is not None:
            expected.check_matches(self.info, f"token export {self.path}")
        table = datasets.load_from_disk(str(self.path))
        if not isinstance(table, datasets.Dataset):
            raise ValueError(f"{self.path}: expected a single dataset, got {type(table).__name__}")
        self._check_schema(table)
        if rows is not None:
            table = table.select(rows)
        self.table = table.with_format("numpy", columns=["codes"], dtype=np.uint16)
        meta = table.with_format("numpy", columns=["label", "view", "index"], dtype=np.int64)[:]
        self.labels = np.asarray(meta["label"], np.int64)
        self.views = np.asarray(meta["view"], np.int64)
        self.index = np.asarray(meta["index"], np.int64)
        self.captions: list[str] = list(table["caption"])
        self.codes = self.table[:]["codes"] if in_memory else None  # uint16 [M, h, w(, D)]
        self._check_range()

    # ---- checks ---------------------------------------------------------------------------------
    def _check_schema(self, table: datasets.Dataset) -> None:
        missing = {"codes", "label", "caption", "view", "index"} - set(table.column_names)
        if missing:
            raise ValueError(f"{self.path}: token export lacks columns {sorted(missing)}")
        feature = table.features["codes"]
        shape = list(getattr(feature, "shape", ()))
        want = self.info.code_shape
        if shape != want:
            raise ValueError(f"{self.path}: codes have shape {shape}, manifest says {want}")
        if getattr(feature, "dtype", None) != "uint16":
            raise ValueError(
                f"{self.path}: codes dtype {getattr(feature, 'dtype', None)}, expected uint16"
            )
        names = list(getattr(table.features["label"], "names", []) or [])
        if names != self.info.class_names:
            raise ValueError(
                f"{self.path}: label names {names} differ from manifest class_names {self.info.class_names}"
            )
        if len(table) != self.manifest.get("num_samples", len(table)):
            raise ValueError(
                f"{self.path}: {len(table)} rows but manifest says {self.manifest['num_samples']}"
            )

    def _check_range(self) -> None:
        """Every code in [0, codebook_size): one vectorised max per chunk, once at load time."""
        k = self.info.codebook_size
        chunks = [self.codes] if self.codes is not None else (
            b["codes"] for b in self.table.iter(batch_size=CHECK_ROWS)
        )  # fmt: skip
        start = 0
        for chunk in chunks:
            chunk = np.asarray(chunk)
            if chunk.size and int(chunk.max()) >= k:
                per_row = chunk.reshape(len(chunk), -1).max(1)
                bad = start + int(np.argmax(per_row >= k))
                raise ValueError(
                    f"{self.path}: codes outside [0, {k}) (codebook_size in the manifest): row {bad} "
                    f"(source index {self.index[bad]}) has code {int(per_row[bad - start])}"
                )
            start += len(chunk)

    # ---- access ---------------------------------------------------------------------------------
    def __len__(self) -> int:
        return len(self.labels)

    def _codes(self, rows: np.ndarray) -> np.ndarray:
        if self.codes is not None:
            return self.codes[rows]
        return self.table[rows]["codes"]

    def __getitems__(self, rows: Sequence[int]) -> dict[str, Any]:
        """A whole batch in one lookup (DataLoader calls this with the sampler's indices)."""
        rows = np.asarray(rows, dtype=np.int64)
        codes = torch.from_numpy(self._codes(rows).astype(np.int64))  # [B, h, w(, D)]
        return {
            "codes": flatten_codes(codes),
            "label": torch.from_numpy(self.labels[rows]),
            "caption": [self.captions[i] for i in rows.tolist()],
        }

    def __getitem__(self, row: int) -> dict[str, Any]:
        batch = self.__getitems__([row])
        return {
            "codes": batch["codes"][0],
            "label": batch["label"][0],
            "caption": batch["caption"][0],
        }

    @staticmethod
    def collate(batch: dict[str, Any] | list[dict[str, Any]]) -> dict[str, Any]:
        """Batches from `__getitems__` pass through; lists of single samples are stacked."""
        if isinstance(batch, dict):
            return batch
        return {
            "codes": torch.stack([b["codes"] for b in batch]),
            "label": torch.stack([b["label"] for b in batch]),
            "caption": [b["caption"] for b in batch],
        }


def split_by_image(
    path: str | Path, val_fraction: float, seed: int, max_val: int | None = None
) -> tuple[np.ndarray, np.ndarray]:
    """(train rows, val rows) of an export: a seeded fraction of source images is held out;
    train keeps all their other images' views, val keeps the held-out images' view 0."""
    if not 0.0 < val_fraction < 1.0:
        raise ValueError(f"val_fraction must be in (0, 1), got {val_fraction}")
    table = datasets.load_from_disk(str(path))
    meta = table.with_format("numpy", columns=["view", "index"], dtype=np.int64)[:]
    index, views = np.asarray(meta["index"]), np.asarray(meta["view"])
    images = np.unique(index)
    n_val = max(1, round(val_fraction * len(images)))
    if n_val >= len(images):
        raise ValueError(
            f"val_fraction {val_fraction} leaves no training images out of {len(images)}"
        )
    held = np.random.default_rng(seed).permutation(images)[:n_val]
    is_val = np.isin(index, held)
    val_rows = np.flatnonzero(is_val & (views == 0))
    if max_val is not None:
        val_rows = val_rows[:max_val]
    return np.flatnonzero(~is_val), val_rows


def view0_rows(path: str | Path, max_rows: int | None = None) -> np.ndarray:
    """Rows of the clean views of an export (a separate held-out export)."""
    table = datasets.load_from_disk(str(path))
    views = np.asarray(table.with_format("numpy", columns=["view"], dtype=np.int64)[:]["view"])
    rows = np.flatnonzero(views == 0)
    return rows if max_rows is None else rows[:max_rows]


def token_loader(
    dataset: TokenDataset, batch_size: int, shuffle: bool, seed: int, drop_last: bool = False,
    num_workers: int = 0,
) -> DataLoader:  # fmt: skip
    """Seeded DataLoader of whole-batch lookups (its own generator, so resume is exact)."""
    return DataLoader(
        dataset,
        batch_size=batch_size,
        shuffle=shuffle,
        drop_last=drop_last,
        collate_fn=TokenDataset.collate,
        num_workers=num_workers,
        generator=torch.Generator().manual_seed(seed),
    )


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
        ds = load_image_dataset(self.data_cfg, split)
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

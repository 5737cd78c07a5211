"""A token export as a torch Dataset: uint16 codes checked once at load time, split by image.

An export is checked when it is opened: its manifest must describe the tokenizer the prior
expects (every differing field is named), and every code must lie in [0, codebook_size).
Held-out splits are drawn by source image (`index`), never by row: the augmented views of one
image all land on the same side, and validation uses only the clean view 0.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import datasets
import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset

from tokenizer.manifest import TokenizerIdentity, flatten_codes, read_manifest

CHECK_ROWS = 1 << 16  # rows per chunk of the load-time range check (arrow-backed path)


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

"""Image batches for the tokenizer: pixels -> tensors, resize/crop/flip, seeded loaders.

The datasets themselves come from `tokenizer.sources` (`DataConfig`, `load_image_dataset`,
re-exported here).

Batches: {"image": [B, 3, H, W] in [-1, 1], "label": Long[B], "caption": list[str], "index": Long[B]}.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import datasets
import numpy as np
import torch
from PIL import Image
from torch.utils.data import DataLoader

from tokenizer.sources import INTERPOLATIONS, DataConfig, load_image_dataset

__all__ = ["DataConfig", "ImageTransform", "load_image_dataset", "make_dataloader", "to_rgb"]


# ---- pixels -------------------------------------------------------------------------------------
def _array_to_pil(arr: np.ndarray) -> Image.Image:
    if arr.ndim == 3 and arr.shape[-1] == 1:
        arr = arr[..., 0]
    if arr.ndim not in (2, 3) or (arr.ndim == 3 and arr.shape[-1] not in (3, 4)):
        raise ValueError(
            f"an image array must be [H, W] or [H, W, C] with C in (1, 3, 4), got shape {arr.shape}"
        )
    if arr.dtype == np.bool_:
        arr = arr.astype(np.uint8) * 255
    elif arr.dtype == np.uint16:
        arr = (arr >> 8).astype(np.uint8)
    elif np.issubdtype(arr.dtype, np.floating):
        arr = np.rint(np.clip(arr, 0.0, 1.0) * 255.0).astype(np.uint8)  # floats are taken as [0, 1]
    elif arr.dtype != np.uint8:
        raise ValueError(
            f"image arrays must be uint8, uint16, bool or float in [0, 1], got {arr.dtype}"
        )
    return Image.fromarray(np.ascontiguousarray(arr))


def to_rgb(image: Any) -> Image.Image:
    """PIL image or array -> RGB PIL image; transparency is composited over white."""
    if isinstance(image, np.ndarray):
        image = _array_to_pil(image)
    if not isinstance(image, Image.Image):
        raise ValueError(f"expected a PIL image or a numpy array, got {type(image).__name__}")
    if image.mode == "RGB":
        return image
    if image.mode.startswith("I;16"):
        image = _array_to_pil(np.asarray(image).astype(np.uint16))
    if image.mode == "P" and "transparency" in image.info:
        image = image.convert("RGBA")
    if image.mode in ("RGBA", "LA", "PA", "RGBa", "La"):
        rgba = image.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(background, rgba).convert("RGB")
    return image.convert("RGB")


def _name(image: Image.Image) -> str:
    filename = getattr(image, "filename", "")
    return f"image {filename}" if filename else "image"


class ImageTransform:
    """Image (PIL or array) -> float [3, R, R] in [-1, 1]: resize shorter side, crop, flip."""

    def __init__(
        self,
        resolution: int,
        *,
        resize: bool = True,
        upscale: bool = False,
        random_crop: bool = False,
        flip: bool = False,
        interpolation: str = "bicubic",
    ) -> None:
        if interpolation not in INTERPOLATIONS:
            raise ValueError(
                f"interpolation must be one of {tuple(INTERPOLATIONS)}, got {interpolation!r}"
            )
        self.resolution = resolution
        self.resize, self.upscale = resize, upscale
        self.random_crop, self.flip = random_crop, flip
        self.resample = INTERPOLATIONS[interpolation]

    @classmethod
    def from_config(cls, cfg: DataConfig, train: bool) -> ImageTransform:
        """Random crop and flip only for training; evaluation is deterministic."""
        return cls(
            cfg.resolution,
            resize=cfg.resize,
            upscale=cfg.upscale,
            random_crop=cfg.random_crop and train,
            flip=cfg.flip and train,
            interpolation=cfg.interpolation,
        )

    def _resized(self, img: Image.Image) -> Image.Image:
        r, (w, h) = self.resolution, img.size
        short = min(w, h)
        too_small = short < r if self.resize else (w < r or h < r)
        if too_small and not self.upscale:
            raise ValueError(
                f"{_name(img)} is {w}x{h}, smaller than the {r}x{r} crop (set upscale=True to enlarge it)"
            )
        if self.resize or too_small:
            scale = r / short
            size = (max(r, round(w * scale)), max(r, round(h * scale)))
            if size != (w, h):
                img = img.resize(size, self.resample)
        return img

    def __call__(self, image: Any, generator: torch.Generator | None = None) -> torch.Tensor:
        img = self._resized(to_rgb(image))
        r, (w, h) = self.resolution, img.size
        if self.random_crop:
            x0 = int(torch.randint(0, w - r + 1, (), generator=generator))
            y0 = int(torch.randint(0, h - r + 1, (), generator=generator))
        else:
            x0, y0 = (w - r) // 2, (h - r) // 2
        img = img.crop((x0, y0, x0 + r, y0 + r))
        arr = np.array(img, dtype=np.uint8)  # [R, R, 3]
        out = torch.from_numpy(arr).permute(2, 0, 1).float() / 127.5 - 1.0  # [3, R, R]
        if self.flip and bool(torch.rand((), generator=generator) < 0.5):
            out = out.flip(-1)
        return out


# ---- loading ------------------------------------------------------------------------------------
def _array_dtype(feature: Any) -> str | None:
    """Element dtype of an array-valued image column (Array2D/3D or nested lists), else None."""
    nested = isinstance(feature, datasets.Array2D | datasets.Array3D)
    while isinstance(feature, datasets.List | datasets.LargeList):
        feature, nested = feature.feature, True
    return getattr(feature, "dtype", None) if nested else None


class ImageDataset(torch.utils.data.Dataset):
    """A standardised `datasets.Dataset` + transform whose random crops/flips are a function of
    (seed, epoch, sample index) alone: a resumed run, any worker count and any rank draw the
    same augmentation for the same sample, so nothing about it needs checkpointing."""

    def __init__(self, data: datasets.Dataset, transform: ImageTransform, seed: int = 0) -> None:
        self.data, self.transform = data, transform
        self.seed, self.epoch = seed, 0
        self.array_dtype = _array_dtype(data.features.get("image"))

    def set_epoch(self, epoch: int) -> None:
        """Called by the training loop before each epoch's iterator is made."""
        self.epoch = epoch

    def _generator(self, index: int) -> torch.Generator | None:
        if not (self.transform.random_crop or self.transform.flip):
            return None
        seed = np.random.default_rng([self.seed % 2**32, self.epoch, index]).integers(2**63)
        return torch.Generator().manual_seed(int(seed))  # as export.view_params seeds its views

    def __len__(self) -> int:
        return len(self.data)

    def __getitem__(self, i: int) -> dict[str, Any]:
        row = self.data[int(i)]
        index = int(row["index"]) if row.get("index") is not None else int(i)
        try:
            image = row["image"]  # array columns (Array2D/3D, lists) come back as nested lists
            if isinstance(image, list) and self.array_dtype is not None:
                image = np.asarray(image, dtype=self.array_dtype)
            image = self.transform(image, self._generator(index))
        except ValueError as err:
            raise ValueError(f"sample {index}: {err}") from err
        label = row.get("label")
        return {
            "image": image,
            "label": -1 if label is None else int(label),
            "caption": row.get("caption") or "",
            "index": index,
        }


def collate(rows: Sequence[dict[str, Any]]) -> dict[str, Any]:
    return {
        "image": torch.stack([r["image"] for r in rows]),  # [B, 3, R, R]
        "label": torch.tensor([r["label"] for r in rows], dtype=torch.long),
        "caption": [r["caption"] for r in rows],
        "index": torch.tensor([r["index"] for r in rows], dtype=torch.long),
    }


def make_dataloader(
    dataset: datasets.Dataset,
    batch_size: int,
    shuffle: bool,
    seed: int,
    num_workers: int = 0,
    *,
    transform: ImageTransform,
    drop_last: bool = False,
) -> DataLoader:
    """Seeded loader of {"image", "label", "caption", "index"} batches. Workers are not kept
    between epochs, so each epoch's iterator sends them the dataset's current epoch."""
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    return DataLoader(
        ImageDataset(dataset, transform, seed),
        batch_size=batch_size,
        shuffle=shuffle,
        num_workers=num_workers,
        collate_fn=collate,
        drop_last=drop_last,
        generator=torch.Generator().manual_seed(seed),
    )

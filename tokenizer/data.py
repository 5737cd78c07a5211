"""Image datasets for the tokenizer: one config, every source, one batch format.

Sources: an embedded name ("digits" | "photos" | "shapes"), an image folder (labels from
first-level subfolders, captions from metadata.jsonl), a `save_to_disk` directory, a parquet file
or folder, or a Hub dataset name (only when online). Every source becomes a `datasets.Dataset`
with columns image, label (-1 = none), caption ("" = none) and index (row id, recorded by exports).
A source without named splits has only the "train" split; its folders may be split into
train/ test/ validation/ subfolders.

Batches: {"image": [B, 3, H, W] in [-1, 1], "label": Long[B], "caption": list[str], "index": Long[B]}.
"""

from __future__ import annotations

import io
import json
import warnings
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import datasets
import numpy as np
import torch
from PIL import Image
from torch.utils.data import DataLoader

from tokenizer.embedded import NAMES, load_embedded

INTERPOLATIONS = {
    "nearest": Image.Resampling.NEAREST,
    "bilinear": Image.Resampling.BILINEAR,
    "bicubic": Image.Resampling.BICUBIC,
    "lanczos": Image.Resampling.LANCZOS,
    "box": Image.Resampling.BOX,
}
IMAGE_EXTENSIONS = {".png", ".jpg", ".jpeg", ".bmp", ".gif", ".webp", ".tif", ".tiff"}
SPLIT_DIRS = ("train", "test", "validation", "valid", "val", "eval")


@dataclass
class DataConfig:
    """Where images come from and how they become [3, R, R] tensors.

    The shorter side is resized to `resolution` (`resize`), then a centre or random crop of
    R x R is taken, then an optional horizontal flip. An image smaller than the crop is an error
    naming it unless `upscale`. Unreadable images are skipped with a warning and a count, or are
    an error naming the file when `strict`.
    """

    source: str = "digits"
    resolution: int = 32
    train_split: str = "train"
    eval_split: str | None = "test"
    resize: bool = True
    upscale: bool = False
    random_crop: bool = False
    flip: bool = False
    interpolation: str = "bicubic"
    strict: bool = False
    verify_images: bool = True  # decode every image once at load time (skip/raise on bad ones)
    image_column: str = "image"
    label_column: str | None = "label"
    caption_column: str | None = "caption"
    max_samples: int | None = None

    def __post_init__(self) -> None:
        if self.resolution < 1:
            raise ValueError(f"resolution must be >= 1, got {self.resolution}")
        if self.interpolation not in INTERPOLATIONS:
            raise ValueError(
                f"interpolation must be one of {tuple(INTERPOLATIONS)}, got {self.interpolation!r}"
            )
        if self.max_samples is not None and self.max_samples < 1:
            raise ValueError(f"max_samples must be >= 1 or None, got {self.max_samples}")
        if not self.source:
            raise ValueError("source must not be empty")


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


# ---- sources ------------------------------------------------------------------------------------
def _pick_split(splits: dict[str, Any], split: str, source: str) -> Any:
    if split not in splits:
        raise ValueError(f"split {split!r} not found in {source}; available: {sorted(splits)}")
    return splits[split]


def _read_metadata(root: Path, caption_key: str) -> dict[Path, str]:
    """Captions from every metadata.jsonl under root; file_name is relative to that file."""
    captions: dict[Path, str] = {}
    for meta in sorted(root.rglob("metadata.jsonl")):
        for n, line in enumerate(meta.read_text(encoding="utf-8").splitlines(), 1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
                name = row["file_name"]
            except (json.JSONDecodeError, KeyError, TypeError) as err:
                raise ValueError(
                    f"{meta}:{n}: expected a JSON object with 'file_name' ({err})"
                ) from err
            text = row.get(caption_key, row.get("text", ""))
            captions[(meta.parent / name).resolve()] = "" if text is None else str(text)
    return captions


def _folder_dataset(path: Path, split: str, cfg: DataConfig) -> datasets.Dataset:
    split_dirs = {d.name: d for d in path.iterdir() if d.is_dir() and d.name in SPLIT_DIRS}
    root = _pick_split(split_dirs or {"train": path}, split, str(path))
    files = sorted(
        p
        for p in root.rglob("*")
        if p.is_file()
        and p.suffix.lower() in IMAGE_EXTENSIONS
        and not any(part.startswith(".") for part in p.relative_to(root).parts)
    )
    if not files:
        raise ValueError(f"no images ({', '.join(sorted(IMAGE_EXTENSIONS))}) found in {root}")
    files, labelled = _labelled_files(files, root, cfg.strict)
    rel = [p.relative_to(root).parts for p in files]
    names = sorted({parts[0] for parts in rel}) if labelled else []
    captions = _read_metadata(root, cfg.caption_column or "caption")
    features = datasets.Features(
        {
            "image": datasets.Image(),
            "label": datasets.ClassLabel(names=names),
            "caption": datasets.Value("string"),
        }
    )
    return datasets.Dataset.from_dict(
        {
            "image": [str(p) for p in files],
            "label": [names.index(parts[0]) if labelled else -1 for parts in rel],
            "caption": [captions.get(p.resolve(), "") for p in files],
        },
        features=features,
    )


def _labelled_files(files: list[Path], root: Path, strict: bool) -> tuple[list[Path], bool]:
    """(files to use, labelled?). Class subfolders label their images; images at the root of a
    folder that also has class subfolders are strays: named in a warning and left out (an error
    when `strict`), rather than silently turning every label off. When the root holds more
    images than the subfolders, the folder is taken as unlabelled (also with a warning)."""
    at_root = [p for p in files if p.parent == root]
    if not at_root or len(at_root) == len(files):
        return files, not at_root
    shown = ", ".join(p.name for p in at_root[:5]) + (" ..." if len(at_root) > 5 else "")
    if strict:
        raise ValueError(
            f"{root}: {len(at_root)} image(s) at the root of a folder with class subfolders "
            f"({shown}): move them into a class folder or remove them"
        )
    if len(at_root) > len(files) - len(at_root):
        warnings.warn(f"{root}: images both at the root and in subfolders; treating the folder as "
                      f"unlabelled (subfolders ignored as classes)", stacklevel=4)  # fmt: skip
        return files, False
    warnings.warn(
        f"{root}: skipped {len(at_root)} image(s) at the root of a folder with class "
        f"subfolders ({shown}); labels come from the subfolders",
        stacklevel=4,
    )
    return [p for p in files if p.parent != root], True


def _hub_offline() -> bool:
    from huggingface_hub import constants

    return bool(constants.HF_HUB_OFFLINE or datasets.config.HF_HUB_OFFLINE)


def _load_source(cfg: DataConfig, split: str) -> tuple[datasets.Dataset, bool]:
    """(dataset, already standard) for cfg.source."""
    source = cfg.source
    if source in NAMES:
        return load_embedded(source, split, cfg.resolution), True
    path = Path(source).expanduser()
    if path.is_file():
        if path.suffix != ".parquet":
            raise ValueError(f"source file {path} is not a .parquet file")
        splits = {"train": datasets.Dataset.from_parquet(str(path))}
        return _pick_split(splits, split, str(path)), False
    if path.is_dir():
        if (path / "dataset_dict.json").is_file() or (path / "state.json").is_file():
            try:
                loaded = datasets.load_from_disk(str(path))
            except IndexError as err:  # datasets cannot reload a dataset saved without rows
                raise ValueError(f"no usable images in {path}: the saved dataset is empty") from err
            splits = dict(loaded) if isinstance(loaded, datasets.DatasetDict) else {"train": loaded}
            return _pick_split(splits, split, str(path)), False
        if any(path.rglob("*.parquet")):
            loaded = datasets.load_dataset("parquet", data_dir=str(path))
            return _pick_split(dict(loaded), split, str(path)), False
        return _folder_dataset(path, split, cfg), True
    if source.startswith(("/", ".", "~")) or path.suffix:
        raise ValueError(f"source path {source} does not exist")
    if _hub_offline():
        raise ValueError(
            f"source {source!r} is not embedded ({NAMES}) nor a local path, and the Hub is offline"
        )
    return datasets.load_dataset(source, split=split), False


def _standardise(ds: datasets.Dataset, cfg: DataConfig, source: str) -> datasets.Dataset:
    """Rename the configured columns to image / label / caption; fill missing label/caption."""
    if cfg.image_column not in ds.column_names:
        raise ValueError(
            f"{source}: image column {cfg.image_column!r} not found; columns: {ds.column_names}"
        )
    wanted = {"image": cfg.image_column, "label": cfg.label_column, "caption": cfg.caption_column}
    present = {
        std: col for std, col in wanted.items() if col is not None and col in ds.column_names
    }
    clash = [std for std, col in present.items() if std != col and std in ds.column_names]
    ds = ds.remove_columns(clash)
    ds = ds.rename_columns({col: std for std, col in present.items() if std != col})
    if "label" not in present:
        ds = ds.add_column("label", [-1] * len(ds))
    elif (
        isinstance(ds.features["label"], datasets.Value) and ds.features["label"].dtype == "string"
    ):
        ds = ds.class_encode_column("label")
    if "caption" not in present:
        ds = ds.add_column("caption", [""] * len(ds))
    return ds


def _check_image(item: dict[str, Any], where: str, cfg: DataConfig) -> str | None:
    """None if readable, else the reason; raises for an image smaller than the crop."""
    try:  # PIL raises many exception types for bad files (OSError, SyntaxError, ValueError, ...)
        with Image.open(io.BytesIO(item["bytes"]) if item.get("bytes") else item["path"]) as img:
            img.load()
            w, h = img.size
    except Exception as err:  # noqa: BLE001 - any decoding failure makes the file unreadable
        return f"{type(err).__name__}: {err}"
    r = cfg.resolution
    if not cfg.upscale and (min(w, h) < r if cfg.resize else (w < r or h < r)):
        raise ValueError(
            f"{where} is {w}x{h}, smaller than the {r}x{r} crop (set upscale=True to enlarge it)"
        )
    return None


def _verify(ds: datasets.Dataset, cfg: DataConfig, source: str) -> datasets.Dataset:
    if not isinstance(ds.features["image"], datasets.Image):
        return ds
    raw = ds.cast_column("image", datasets.Image(decode=False))
    good, bad = [], []
    items = (item for batch in raw.iter(batch_size=256) for item in batch["image"])
    for i, item in enumerate(items):
        where = item.get("path") or f"{source} row {i}"
        reason = _check_image(item, where, cfg)
        if reason is None:
            good.append(i)
        elif cfg.strict:
            raise ValueError(f"unreadable image {where}: {reason}")
        else:
            bad.append(where)
    if bad:
        shown = ", ".join(bad[:5]) + (" ..." if len(bad) > 5 else "")
        warnings.warn(f"skipped {len(bad)} unreadable image(s) in {source}: {shown}", stacklevel=3)
        ds = ds.select(good)
    return ds


def load_image_dataset(cfg: DataConfig, split: str = "train") -> datasets.Dataset:
    """The standardised dataset of `cfg.source`'s `split` (see the module docstring)."""
    ds, standard = _load_source(cfg, split)
    where = f"{cfg.source} (split {split!r})"
    if not standard:
        ds = _standardise(ds, cfg, where)
    if cfg.max_samples is not None and len(ds) > cfg.max_samples:
        ds = ds.select(range(cfg.max_samples))
    if cfg.verify_images and cfg.source not in NAMES:
        ds = _verify(ds, cfg, where)
    if len(ds) == 0:
        raise ValueError(f"no usable images in {where}")
    if "index" in ds.column_names:
        ds = ds.remove_columns("index")
    return ds.add_column("index", list(range(len(ds))))


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

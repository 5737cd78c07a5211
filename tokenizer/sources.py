"""Where the tokenizer's images come from: one config, every source, one standard dataset.

Sources: an embedded name ("digits" | "photos" | "shapes"), an image folder (labels from
first-level subfolders, captions from metadata.jsonl), a `save_to_disk` directory, a parquet file
or folder, or a Hub dataset name (only when online). Every source becomes a `datasets.Dataset`
with columns image, label (-1 = none), caption ("" = none) and index (row id, recorded by exports).
A source without named splits has only the "train" split; its folders may be split into
train/ test/ validation/ subfolders. Unreadable images are skipped with a warning and a count,
or are an error naming the file with `strict`.
"""

from __future__ import annotations

import io
import json
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import datasets
from PIL import Image

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


# ---- sources ------------------------------------------------------------------------------------
class SplitNotFoundError(ValueError):
    """The source has no split of that name."""


def _pick_split(splits: dict[str, Any], split: str, source: str) -> Any:
    if split not in splits:
        raise SplitNotFoundError(
            f"split {split!r} not found in {source}; available: {sorted(splits)} (the trainers "
            f"and scripts carve a held-out split themselves; data.eval_split=null skips it)"
        )
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


HOLDOUT_FRACTION = 0.1  # of the images, when a source has no held-out split of its own
HOLDOUT_SEED = 0


def has_split(cfg: DataConfig, split: str) -> bool:
    """Whether `cfg.source` has `split` of its own (Hub datasets are assumed to)."""
    if cfg.source in NAMES:
        return split in ("train", "test")
    path = Path(cfg.source).expanduser()
    if path.is_file():
        return split == "train"
    if not path.is_dir():
        return True  # a Hub name: let the load say what it has
    if (path / "dataset_dict.json").is_file():
        return split in json.loads((path / "dataset_dict.json").read_text()).get("splits", [])
    if (path / "state.json").is_file() or any(path.rglob("*.parquet")):
        return split == "train"
    dirs = {d.name for d in path.iterdir() if d.is_dir() and d.name in SPLIT_DIRS}
    return split in dirs if dirs else split == "train"


def load_split(cfg: DataConfig, split: str) -> datasets.Dataset:
    """`split` of the source, like `load_image_dataset`, except that a source without the
    held-out split `cfg.eval_split` gets one carved from its training split: 10 % of the images,
    seeded, the same every call, so the training split (`cfg.train_split`) leaves them out."""
    held = cfg.eval_split
    if held is None or split not in (held, cfg.train_split) or has_split(cfg, held):
        return load_image_dataset(cfg, split)
    full = load_image_dataset(cfg, cfg.train_split)
    if len(full) < 2:
        raise ValueError(
            f"{cfg.source}: {len(full)} image(s) cannot be split into train and {held!r}"
        )
    parts = full.train_test_split(test_size=HOLDOUT_FRACTION, seed=HOLDOUT_SEED)
    warnings.warn(
        f"{cfg.source} has no {held!r} split: held out {len(parts['test'])} of {len(full)} images "
        f"({HOLDOUT_FRACTION:.0%}, seed {HOLDOUT_SEED}) as {held!r}; the training split keeps "
        f"{len(parts['train'])}",
        stacklevel=2,
    )
    part = parts["test"] if split == held else parts["train"]
    return part.remove_columns("index").add_column("index", list(range(len(part))))  # per split

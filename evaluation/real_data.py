"""Real images to judge generations against: a training split that teaches the judge and a
held-out split that is the reference for Fréchet distances.

Any source the trainers accept works (embedded name, image folder, saved dataset, parquet); a
source without a held-out split gets one carved (tokenizer.sources.load_split), and images are
brought to the tokenizer's resolution the way the tokenizer saw them (resize + centre crop).
"""

from __future__ import annotations

from dataclasses import dataclass

import datasets

from tokenizer.data import ImageTransform
from tokenizer.embedded import NAMES, load_embedded
from tokenizer.images import to_pil
from tokenizer.sources import DataConfig, load_split


@dataclass
class RealData:
    """Real images of one dataset: `train` teaches the judge, `heldout` is the reference."""

    name: str
    resolution: int
    train: datasets.Dataset
    heldout: datasets.Dataset
    class_names: list[str]


def real_data(
    name: str, resolution: int, holdout_fraction: float = 0.15, seed: int = 0
) -> RealData:
    """Train and held-out splits of source `name`. For embedded data whose test split holds
    other classes (photos), a seeded `holdout_fraction` of the training split is held out."""
    if name in NAMES:
        train, test = (
            load_embedded(name, "train", resolution),
            load_embedded(name, "test", resolution),
        )
        if not set(test["label"]) <= set(train["label"]):
            split = train.train_test_split(test_size=holdout_fraction, seed=seed)
            train, test = split["train"], split["test"]
    else:
        cfg = DataConfig(source=name, resolution=resolution, interpolation="bicubic")
        transform = ImageTransform.from_config(cfg, train=False)
        train, test = (_at_resolution(load_split(cfg, s), transform) for s in ("train", "test"))
    label = train.features["label"]
    names = list(getattr(label, "names", []) or [])
    return RealData(name, resolution, train, test, names)


def _at_resolution(ds: datasets.Dataset, transform: ImageTransform) -> datasets.Dataset:
    """Images resized and centre-cropped to the tokenizer's resolution (as PIL images)."""

    def convert(batch: dict) -> dict:
        return {"image": [to_pil(transform(im)[None])[0] for im in batch["image"]]}

    features = ds.features.copy()
    features["image"] = datasets.Image()
    return ds.map(convert, batched=True, batch_size=64, features=features, desc="resize")

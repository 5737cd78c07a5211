"""Real images to judge generations against: a training split that teaches the judge and a
held-out split that is the reference for Fréchet distances."""

from __future__ import annotations

from dataclasses import dataclass

import datasets

from tokenizer.embedded import load_embedded


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
    """Train and held-out splits; when the test split holds other classes (photos), a seeded
    `holdout_fraction` of the training split is held out instead."""
    train, test = load_embedded(name, "train", resolution), load_embedded(name, "test", resolution)
    if not set(test["label"]) <= set(train["label"]):
        split = train.train_test_split(test_size=holdout_fraction, seed=seed)
        train, test = split["train"], split["test"]
    return RealData(name, resolution, train, test, list(train.features["label"].names))

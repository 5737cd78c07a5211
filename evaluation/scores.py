"""Scores of generated images: judge class accuracy and the real-vs-real Fréchet floor."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
import torch

from evaluation.frechet import frechet_distance
from evaluation.judge import Judge, dataset_images
from evaluation.real_data import RealData


def accuracy_from_predictions(
    predicted: torch.Tensor, labels: torch.Tensor, class_names: Sequence[str]
) -> dict[str, Any]:
    """Overall top-1 accuracy, per-class accuracy (classes present in `labels` only) and their mean."""
    predicted, labels = (
        torch.as_tensor(predicted).long().cpu(),
        torch.as_tensor(labels).long().cpu(),
    )
    if predicted.shape != labels.shape or predicted.ndim != 1 or len(labels) == 0:
        raise ValueError(
            f"need two equal non-empty [N] tensors, got {tuple(predicted.shape)} and {tuple(labels.shape)}"
        )
    if labels.min() < 0 or labels.max() >= len(class_names):
        raise ValueError(
            f"labels must lie in [0, {len(class_names)}), got [{int(labels.min())}, {int(labels.max())}]"
        )
    correct = (predicted == labels).float()
    per_class = {
        class_names[c]: float(correct[labels == c].mean()) for c in sorted(set(labels.tolist()))
    }
    return {
        "overall": float(correct.mean()),
        "per_class": per_class,
        "mean_per_class": float(np.mean(list(per_class.values()))),
        "count": len(labels),
    }


def class_accuracy(judge: Judge, images: torch.Tensor, labels: torch.Tensor) -> dict[str, Any]:
    """Judge accuracy of images [N, 3, H, W] meant to show classes `labels` [N]: overall, per class."""
    return accuracy_from_predictions(judge.predict(images).argmax(-1), labels, judge.class_names)


def real_floor(judge: Judge, data: RealData, n: int, seed: int = 0) -> dict[str, float]:
    """Fréchet distances between real sets: what a perfect generator of `n` images would score
    (n training images vs the held-out set, and the held-out set's two halves)."""
    gen = torch.Generator().manual_seed(seed)
    held = judge.features(dataset_images(data.heldout))
    pick = torch.randperm(len(data.train), generator=gen)[: min(n, len(data.train))]
    train = judge.features(dataset_images(data.train.select(pick.tolist())))
    halves = torch.randperm(len(held), generator=gen)
    return {
        "train_vs_heldout": frechet_distance(train, held),
        "heldout_halves": frechet_distance(
            held[halves[: len(held) // 2]], held[halves[len(held) // 2 :]]
        ),
        "n_train": int(len(pick)),
        "n_heldout": int(len(held)),
    }

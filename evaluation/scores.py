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


def real_floor(
    judge: Judge, data: RealData, n: int, seed: int = 0, draws: int = 10
) -> dict[str, float]:
    """Fréchet distances between real sets: what a perfect generator of `n` images would score
    (n training images vs the held-out set, and the held-out set's two halves), each the mean
    over `draws` random subsets (with its std): one subset of a few hundred images moves the
    floor by about 20 %, which would move every ratio to it. `seed` picks the subsets; the
    floor is a property of the data, so callers keep it fixed across training seeds."""
    if draws < 1:
        raise ValueError(f"draws must be >= 1, got {draws}")
    gen = torch.Generator().manual_seed(seed)
    held = judge.features(dataset_images(data.heldout))
    train_all = judge.features(dataset_images(data.train))
    count = min(n, len(train_all))
    vs_train, halves = [], []
    for _ in range(draws):
        pick = torch.randperm(len(train_all), generator=gen)[:count]
        vs_train.append(frechet_distance(train_all[pick], held))
        order = torch.randperm(len(held), generator=gen)
        half = len(held) // 2
        halves.append(frechet_distance(held[order[:half]], held[order[half:]]))
    return {
        "train_vs_heldout": float(np.mean(vs_train)),
        "train_vs_heldout_std": float(np.std(vs_train, ddof=1)) if draws > 1 else 0.0,
        "heldout_halves": float(np.mean(halves)),
        "draws": draws,
        "n_train": int(count),
        "n_heldout": int(len(held)),
    }

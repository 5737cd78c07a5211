"""Class-balanced prompt sets: the same classes, counts and seeds at every guidance scale."""

from __future__ import annotations

import numpy as np
import torch

from evaluation.real_data import RealData

MODES = ("class", "text", "none")


def balanced_prompts(
    mode: str, data: RealData, n_per_class: int, seed: int = 0
) -> tuple[list[int | str], torch.Tensor, list[str]]:
    """(prompts, labels [N], prompt texts) with `n_per_class` prompts for every class of the
    training split. mode "class": class ids; "text": held-out captions of that class (cycled);
    "none" (unconditional prior): empty prompts, labels kept only to size the set."""
    if mode not in MODES:
        raise ValueError(f"mode must be one of {MODES}, got {mode!r}")
    if n_per_class < 1:
        raise ValueError(f"n_per_class must be >= 1, got {n_per_class}")
    classes = sorted(set(data.train["label"]))
    held_labels = np.asarray(data.heldout["label"])
    rng = np.random.default_rng(seed)
    prompts: list[int | str] = []
    labels: list[int] = []
    texts: list[str] = []
    for c in classes:
        if mode == "class":
            prompts += [c] * n_per_class
            texts += [data.class_names[c]] * n_per_class
        elif mode == "none":
            prompts += [""] * n_per_class
            texts += [""] * n_per_class
        else:
            rows = np.flatnonzero(held_labels == c)
            if len(rows) == 0:
                raise ValueError(f"no held-out caption for class {data.class_names[c]!r}")
            rows = rng.permutation(rows)[np.arange(n_per_class) % len(rows)]
            caps = [data.heldout[int(i)]["caption"] for i in rows]
            prompts += caps
            texts += caps
        labels += [c] * n_per_class
    return prompts, torch.tensor(labels), texts

"""Learning-rate schedule: linear warmup then cosine decay to a floor."""

from __future__ import annotations

import math

from torch.optim import Optimizer
from torch.optim.lr_scheduler import LambdaLR


def warmup_cosine_factor(step: int, warmup: int, total: int, min_ratio: float = 0.1) -> float:
    """Multiplier of the base LR at optimizer step `step`."""
    if warmup > 0 and step < warmup:
        return (step + 1) / warmup
    progress = min(1.0, (step - warmup) / max(1, total - warmup))
    return min_ratio + (1.0 - min_ratio) * 0.5 * (1.0 + math.cos(math.pi * progress))


def warmup_cosine(
    optimizer: Optimizer, warmup: int, total: int, min_ratio: float = 0.1
) -> LambdaLR:
    """LambdaLR with `warmup_cosine_factor`; step it once per optimizer step."""
    return LambdaLR(optimizer, lambda step: warmup_cosine_factor(step, warmup, total, min_ratio))

"""Classifier-free guidance: logits u + s * (c - u) with a scale that depends on position only.

Optional plausibility cutoff alpha (the adaptive plausibility constraint of contrastive decoding,
Li et al. 2023): where guidance applies, tokens whose conditional probability is below alpha times
the most likely token's are removed before u + s * (c - u) can promote them. A sharply trained
prior gives most tokens tiny, noisy probabilities under both branches; s * (c - u) turns their
small differences into large logits, and sampling them wrecks images (the shapes text prior falls
from 84 % to 4 % prompt accuracy at s = 3 without the cutoff).

Schedules depend only on the token position i (or the MaskGIT step) and the length N, never on
what has been sampled: speculative and Jacobi decoding evaluate several positions in one pass
and must see the same scale a one-token-at-a-time decoder would have used.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import Tensor

GUIDANCE_KINDS = ("constant", "linear", "cosine")


@dataclass
class GuidanceSchedule:
    """Guidance scale per position.

    constant: s everywhere; linear: 0 -> s over positions 0..N-1; cosine: s * (1 - cos(pi r)) / 2
    with r = i / (N - 1). stop_after (a fraction of N): positions i >= stop_after * N use 1
    (conditional only). A schedule that is 1 everywhere needs no unconditional pass at all.
    plausibility: the cutoff alpha in [0, 1] (0 = off), applied where the scale is not 1.
    """

    scale: float = 1.0
    kind: str = "constant"
    stop_after: float | None = None
    plausibility: float = 0.0

    def __post_init__(self) -> None:
        if not 0.0 <= self.scale < math.inf:
            raise ValueError(
                f"guidance scale must be a finite number >= 0 (1 = no guidance), got {self.scale}"
            )
        if self.kind not in GUIDANCE_KINDS:
            raise ValueError(f"kind must be one of {GUIDANCE_KINDS}, got {self.kind!r}")
        if self.stop_after is not None and not 0.0 <= self.stop_after <= 1.0:
            raise ValueError(f"stop_after must be in [0, 1] or None, got {self.stop_after}")
        if not 0.0 <= self.plausibility <= 1.0:
            raise ValueError(f"plausibility must be in [0, 1], got {self.plausibility}")

    def scale_at(self, i: int, n: int) -> float:
        """Scale for position (or step) i of n."""
        if n < 1 or not 0 <= i < n:
            raise ValueError(f"position {i} is outside 0..{n - 1}")
        if self.stop_after is not None and i >= self.stop_after * n:
            return 1.0
        r = i / (n - 1) if n > 1 else 1.0
        if self.kind == "constant":
            return float(self.scale)
        if self.kind == "linear":
            return float(self.scale * r)
        return float(self.scale * (1.0 - math.cos(math.pi * r)) / 2.0)

    def table(
        self, n: int, length: int | None = None, device: torch.device | None = None
    ) -> Tensor:
        """Scales for positions 0..length-1 as fp32 [length]; positions >= n repeat position n-1
        (speculative decoders look a few positions past the end and discard those tokens)."""
        length = n if length is None else length
        values = [self.scale_at(min(i, n - 1), n) for i in range(length)]
        return torch.tensor(values, dtype=torch.float32, device=device)

    def needs_unconditional(self, n: int) -> bool:
        """False when every position's scale is exactly 1: callers skip the doubled batch."""
        return any(self.scale_at(i, n) != 1.0 for i in range(n))


def guide(
    cond_logits: Tensor, uncond_logits: Tensor, scale: float | Tensor, plausibility: float = 0.0
) -> Tensor:
    """u + s * (c - u) in fp32; `scale` is a float or broadcasts against the logits. With
    `plausibility` alpha > 0, tokens with p_c < alpha * max p_c get -inf where s != 1."""
    c, u = cond_logits.float(), uncond_logits.float()
    guided = u + scale * (c - u)
    if plausibility <= 0.0:
        return guided
    log_p = c.log_softmax(-1)
    implausible = log_p < log_p.amax(-1, keepdim=True) + math.log(plausibility)  # [..., V]
    implausible = implausible & torch.as_tensor(scale != 1.0, device=c.device)  # s = 1: plain c
    return guided.masked_fill(implausible, float("-inf"))


def guide_batch(logits: Tensor, scale: float | Tensor, plausibility: float = 0.0) -> Tensor:
    """Guide a doubled batch [cond; uncond] on dim 0: [2B, ...] -> [B, ...]."""
    if logits.shape[0] % 2:
        raise ValueError(
            f"a guided batch must have even size [cond; uncond], got {logits.shape[0]}"
        )
    cond_logits, uncond_logits = logits.chunk(2, dim=0)
    return guide(cond_logits, uncond_logits, scale, plausibility)

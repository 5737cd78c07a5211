"""The prior's training objective: condition + (MaskGIT masking) + cross-entropy in one forward.

Everything runs inside the wrapped module's forward, so DDP and DeepSpeed engines see one call
per micro-batch and ZeRO-3 gathers every parameter the condition uses.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from prior.conditioning import Condition
from prior.maskgit import random_mask


class PriorObjective(nn.Module):
    """prior + condition + loss in one forward: returns the mean loss and per-row sums."""

    def __init__(self, prior: nn.Module) -> None:
        super().__init__()
        self.prior = prior
        self.kind = prior.config.model_type

    def _condition(self, labels: Tensor, captions: list[str], batch: int) -> Condition:
        cond = self.prior.config.cond
        if cond == "class":
            return self.prior.condition(class_ids=labels, drop=self.training)
        if cond == "text":
            return self.prior.condition(texts=list(captions), drop=self.training)
        return self.prior.condition(batch_size=batch)

    def forward(
        self,
        codes: Tensor,
        labels: Tensor,
        captions: list[str],
        generator: torch.Generator | None = None,
    ) -> dict[str, Tensor]:
        """codes Long [B, N] or [B, N, D]; MaskGIT masks with `generator` (fixed masks for eval)."""
        cond = self._condition(labels, captions, codes.shape[0])
        smoothing = 0.0
        if self.kind == "maskgit":
            mask = random_mask(codes.shape[0], codes.shape[1], codes.device, generator)  # [B, N]
            inputs = torch.where(mask, torch.full_like(codes, self.prior.mask_token_id), codes)
            logits = self.prior(inputs, cond)  # [B, N, V]
            weight = mask.float()
            smoothing = self.prior.config.label_smoothing
        else:
            logits = self.prior(codes, cond)  # [B, N, V] or [B, N, D, V]
            weight = torch.ones(codes.shape, device=codes.device)
        vocab = logits.shape[-1]
        nll = F.cross_entropy(
            logits.reshape(-1, vocab).float(),
            codes.reshape(-1),
            reduction="none",
            label_smoothing=smoothing,
        ).reshape(codes.shape)
        correct = (logits.argmax(-1) == codes).float()
        weight = weight.flatten(1)  # [B, N*D]
        nll_sum = (nll.flatten(1) * weight).sum(1)  # [B]
        count = weight.sum(1)  # [B]
        return {
            "loss": nll_sum.sum() / count.sum().clamp(min=1.0),
            "nll_sum": nll_sum.detach(),
            "correct": (correct.flatten(1) * weight).sum(1).detach(),
            "count": count.detach(),
        }

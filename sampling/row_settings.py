"""Decoding settings per row, as tensors: what lets rows with different prompts, guidance
scales, sampling settings and seeds share one batch (the engine's slots, the server's batch).

`guided_distribution` is the one function that turns a prior's raw logits into the distribution
a row's token is drawn from: CFG with the row's scale at each position, the plausibility cutoff,
then temperature / top-k / top-p. Every method (AR, speculative, relaxed, Jacobi) reads it.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, fields

import torch
from torch import Tensor

from sampling.guidance import GuidanceSchedule
from sampling.logits import SamplingConfig, filter_rows


@dataclass
class RowSettings:
    """R rows' settings: scales fp32 [R, L] (guidance scale at positions 0..L-1; past the end
    the last one repeats), plausibility / temperature / top_p fp32 [R], top_k Long [R]."""

    scales: Tensor
    plausibility: Tensor
    temperature: Tensor
    top_k: Tensor
    top_p: Tensor

    @classmethod
    def build(
        cls,
        rows: int,
        num_tokens: int,
        sampling: SamplingConfig,
        guidance: GuidanceSchedule,
        device: torch.device | str | None = None,
    ) -> RowSettings:
        """`rows` rows with the same (already validated) settings."""
        table = guidance.table(num_tokens, num_tokens + 1, device=device)  # [N + 1]

        def full(value: float, dtype: torch.dtype = torch.float32) -> Tensor:
            return torch.full((rows,), value, dtype=dtype, device=device)

        return cls(
            scales=table[None].expand(rows, -1).contiguous(),
            plausibility=full(guidance.plausibility),
            temperature=full(sampling.temperature),
            top_k=full(sampling.top_k, torch.long),
            top_p=full(sampling.top_p),
        )

    @classmethod
    def cat(cls, parts: list[RowSettings]) -> RowSettings:
        return cls(*(torch.cat([getattr(p, f.name) for p in parts]) for f in fields(cls)))

    @property
    def rows(self) -> int:
        return int(self.temperature.shape[0])

    @property
    def guided(self) -> bool:
        """True when some row's scale is not 1 somewhere (a host check, made once per batch)."""
        return bool((self.scales != 1.0).any())

    @property
    def filtered(self) -> bool:
        """True when some row uses top-k or top-p (the distribution then needs a sort)."""
        return bool(((self.top_k > 0) | (self.top_p < 1.0)).any())

    def select(self, rows: Tensor | slice) -> RowSettings:
        return RowSettings(*(getattr(self, f.name)[rows] for f in fields(self)))

    def write(self, slots: Tensor, values: RowSettings) -> None:
        """In place: rows `slots` of self take `values` (same table length)."""
        for f in fields(self):
            getattr(self, f.name)[slots] = getattr(values, f.name).to(getattr(self, f.name).dtype)


def guided_distribution(
    logits: Tensor,
    where: Tensor,
    settings: RowSettings,
    *,
    guided: bool,
    filtered: bool,
) -> Tensor:
    """Raw logits -> the rows' distributions [R, T, V] for predicted positions where Long[R, T].

    logits: [2R, T, V] ([cond; uncond]) when guided, else [R, T, V]. A row whose scale is 1 at a
    position gets its conditional logits exactly (so it matches an unguided run bit for bit).
    """
    logits = logits.float()
    if guided:
        c, u = logits.chunk(2, dim=0)
        table = settings.scales
        scale = table.gather(1, where.clamp(max=table.shape[1] - 1))[..., None]  # [R, T, 1]
        mixed = u + scale * (c - u)
        alpha = settings.plausibility[:, None, None]  # [R, 1, 1]
        log_p = c.log_softmax(-1)
        floor = log_p.amax(-1, keepdim=True) + torch.log(alpha.clamp_min(0.0))
        implausible = (log_p < floor) & (scale != 1.0)
        logits = torch.where(scale == 1.0, c, mixed.masked_fill(implausible, -math.inf))
    settings_rt = [
        getattr(settings, name)[:, None].expand(where.shape)
        for name in ("temperature", "top_k", "top_p")
    ]
    return filter_rows(logits, *settings_rt, filtered=filtered).softmax(-1)

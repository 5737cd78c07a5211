"""The draft length that maximises tokens per second, from measured call costs.

Speculative decoding pays only when a round's expected yield beats its cost. With acceptance
rate a (each drafted token accepted independently, Leviathan et al. 2023, §3.1), a round that
drafts k tokens yields (1 - a^(k+1)) / (1 - a) tokens (the accepted run plus the target's own
token) and costs k draft calls plus one target call. `CallCosts` keeps running estimates of both
call times and of a, measured on the decode engines while decoding, and `best_draft_len`
picks argmax_k yield / cost. Any draft length chosen from past rounds keeps the output exact;
but a choice made from timings varies between runs, so the exact sample of a seed does too
(pass a fixed draft length for bit-reproducible runs).
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TypeVar

import torch

T = TypeVar("T")


def expected_tokens(acceptance: float, draft_len: int) -> float:
    """Tokens per round: E[accepted run] + 1 = (1 - a^(k+1)) / (1 - a); k + 1 when a = 1."""
    if not 0.0 <= acceptance <= 1.0:
        raise ValueError(f"acceptance must be in [0, 1], got {acceptance}")
    if draft_len < 0:
        raise ValueError(f"draft_len must be >= 0, got {draft_len}")
    if acceptance == 1.0:
        return float(draft_len + 1)
    return (1.0 - acceptance ** (draft_len + 1)) / (1.0 - acceptance)


def best_draft_len(
    acceptance: float, draft_cost: float, target_cost: float, *, max_len: int
) -> int:
    """argmax over k in [1, max_len] of expected_tokens(a, k) / (k * draft_cost + target_cost)."""
    if max_len < 1:
        raise ValueError(f"max_len must be >= 1, got {max_len}")
    if draft_cost < 0 or target_cost <= 0:
        raise ValueError(
            f"call costs must be draft >= 0, target > 0; got {draft_cost}, {target_cost}"
        )
    rate = [expected_tokens(acceptance, k) / (k * draft_cost + target_cost)
            for k in range(1, max_len + 1)]  # fmt: skip
    return 1 + max(range(max_len), key=rate.__getitem__)


@dataclass
class CallCosts:
    """Running (exponential) means of draft and target call seconds and of the acceptance rate.

    The first call of each kind and input width is not counted: on a compiled engine it
    includes the compilation of that shape."""

    draft_s: float = 0.0
    target_s: float = 0.0
    acceptance: float = 0.5  # prior belief until a round has been verified
    decay: float = 0.7  # weight of the old mean
    _widths: set[tuple[str, int]] = field(default_factory=set)  # (kind, width) seen

    def timed(self, kind: str, device: torch.device, call: Callable[..., T], *args: object) -> T:
        """Run `call(tokens [B, W], ...)` and fold its wall time into `kind`'s mean ("draft" or
        "target"), unless it is the first call of that kind with width W."""
        key = (kind, int(args[0].shape[1]))  # type: ignore[attr-defined]
        if key not in self._widths:
            self._widths.add(key)
            return call(*args)
        sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
        sync()
        start = time.perf_counter()
        out = call(*args)
        sync()
        self._fold(kind, time.perf_counter() - start)
        return out

    def _fold(self, kind: str, seconds: float) -> None:
        old = getattr(self, f"{kind}_s")
        setattr(
            self,
            f"{kind}_s",
            seconds if old == 0 else self.decay * old + (1 - self.decay) * seconds,
        )

    def observe_acceptance(self, rate: float) -> None:
        self.acceptance = self.decay * self.acceptance + (1 - self.decay) * rate

    def choose(self, current: int, max_len: int) -> int:
        """The best draft length once both costs are measured; else keep `current`."""
        if self.draft_s <= 0 or self.target_s <= 0:
            return current
        return best_draft_len(
            min(self.acceptance, 1.0), self.draft_s, self.target_s, max_len=max_len
        )

"""Counters that speculative, relaxed and Jacobi decoding report (and benchmarks print)."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field


@dataclass
class SpeculativeStats:
    """What one draft-and-verify generation did.

    A "target call" is one forward of the target over the whole batch (prefill included), so
    tokens_per_target_call is per row (num_tokens / target_calls): plain AR gives exactly 1, and
    in a batch the slowest row sets it. drafted counts proposals that fell inside the image
    (rows still running), accepted those of them that were accepted.
    """

    rows: int = 0
    num_tokens: int = 0
    drafted: int = 0
    accepted: int = 0
    target_calls: int = 0
    draft_calls: int = 0
    iterations: int = 0
    draft_lengths: list[int] = field(default_factory=list)

    @property
    def tokens(self) -> int:
        return self.rows * self.num_tokens

    @property
    def acceptance_rate(self) -> float:
        return self.accepted / self.drafted if self.drafted else 0.0

    @property
    def tokens_per_target_call(self) -> float:
        return self.num_tokens / self.target_calls if self.target_calls else 0.0

    @property
    def target_calls_per_token(self) -> float:
        return self.target_calls / self.num_tokens if self.num_tokens else 0.0

    def as_dict(self) -> dict[str, float | int | list[int]]:
        """Plain numbers for JSON (benchmarks, logs)."""
        out: dict[str, float | int | list[int]] = asdict(self)
        out["acceptance_rate"] = self.acceptance_rate
        out["tokens_per_target_call"] = self.tokens_per_target_call
        out["target_calls_per_token"] = self.target_calls_per_token
        return out

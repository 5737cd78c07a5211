"""Counter-based per-row randomness: noise as a pure function of (seed, index, position, stream).

A sample's codes must depend only on its prompt, settings and seed: not on what else shares the
batch, on the batch's order, or on how many calls a decoding method makes. A `torch.Generator`
cannot give that (its draws are consumed in batch order), so every random number here is a hash
of integers: uniform(seed, index, position, stream, vocab entry). Streams keep the draws of
different jobs independent (drafts, acceptance tests, residual resamples, MaskGIT steps), which
the exactness of speculative and Jacobi decoding needs; reusing the DRAW stream of a position
across Jacobi iterations is MC-SJD's Gumbel coupling.

The hash is a 32-bit integer mixer (xor-shift-multiply, constants < 2^27) in int64 tensor ops:
no product overflows, so eager, compiled and CUDA code give the same bits. Uniforms carry 24 bits.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from sampling.logits import check_generator

MASK32 = 0xFFFFFFFF
_MULTIPLIER = 0x45D9F3B  # a well-tested 32-bit mixer constant (small: products stay < 2^59)
_GOLDEN = 0x61C88647  # 2^32 - golden ratio * 2^32 (< 2^31: no overflow); spreads counters
MAX_SEED = 2**63 - 1

# streams: one per job a random number does
DRAW = 0  # a token drawn from a distribution: AR steps, draft proposals, Jacobi guesses
ACCEPT = 1  # the uniform of an accept / reject test
RESIDUAL = 2  # the resample after a rejection, or the bonus token
CONFIDENCE = 3  # MaskGIT's Gumbel confidence noise
STEP_STREAMS = 16  # streams >= this are per iteration: STEP_STREAMS + 4 * step + job


def step_stream(step: int | Tensor, job: int) -> int | Tensor:
    """A stream of its own for `job` (DRAW / ... / CONFIDENCE) at iteration `step`."""
    return STEP_STREAMS + 4 * step + job


def _mix(x: Tensor) -> Tensor:
    """A bijective 32-bit mixer on int64 tensors holding values in [0, 2^32)."""
    x = ((x >> 16) ^ x) * _MULTIPLIER & MASK32
    x = ((x >> 16) ^ x) * _MULTIPLIER & MASK32
    return (x >> 16) ^ x


def _combine(h: Tensor, value: Tensor | int) -> Tensor:
    return _mix((h + (value & MASK32) * _GOLDEN) & MASK32 ^ 0x5BD1E995)


def row_keys(seeds: Tensor, indices: Tensor) -> Tensor:
    """One 32-bit key per row from its seed (< 2^63) and sample index: Long[R] -> Long[R]."""
    h = _mix(seeds & MASK32)
    h = _combine(h, seeds >> 32)
    return _combine(h, indices)


def uniform(keys: Tensor, positions: Tensor, stream: int | Tensor, size: int) -> Tensor:
    """Uniforms in (0, 1): keys Long[R], positions Long[R, ...] -> fp32 [R, ..., size].

    Entry [r, ..., v] is a pure function of (keys[r], positions[r, ...], stream, v)."""
    extra = positions.dim() - 1
    k = keys.reshape(keys.shape + (1,) * extra)
    h = _combine(_combine(k, positions), stream)[..., None]  # [R, ..., 1]
    v = torch.arange(size, device=positions.device)
    bits = _mix(_combine(h, v)) >> 8  # [R, ..., size], 24 bits
    return (bits.float() + 0.5) * (1.0 / 2**24)


def race(probs: Tensor, u: Tensor) -> Tensor:
    """The index an exponential race picks: argmax p / E with E = -log u, Long[...].

    Picks i with probability p_i / sum(p); zero-probability entries never win; a one-hot row
    (greedy) returns its index whatever the noise."""
    return (probs.float() / -torch.log(u)).argmax(-1)


@dataclass
class RowNoise:
    """The randomness of R rows: seeds and sample indices, Long[R] each."""

    seeds: Tensor
    indices: Tensor

    def __post_init__(self) -> None:
        self.keys = row_keys(self.seeds, self.indices)

    @classmethod
    def from_seeds(
        cls,
        seeds: list[int] | Tensor,
        indices: list[int] | Tensor | None = None,
        device: torch.device | str | None = None,
    ) -> RowNoise:
        seeds = torch.as_tensor(seeds, dtype=torch.long, device=device)
        if seeds.dim() != 1:
            raise ValueError(f"seeds must be one per row, got shape {tuple(seeds.shape)}")
        if bool((seeds < 0).any()):
            raise ValueError(f"seeds must be in 0..{MAX_SEED}, got {seeds.min().item()}")
        if indices is None:
            indices = torch.zeros_like(seeds)
        indices = torch.as_tensor(indices, dtype=torch.long, device=seeds.device)
        if indices.shape != seeds.shape or bool((indices < 0).any()):
            raise ValueError("indices must be >= 0, one per seed")
        return cls(seeds, indices)

    @classmethod
    def from_generator(
        cls, rows: int, generator: torch.Generator | None, device: torch.device | str | None = None
    ) -> RowNoise:
        """Per-row seeds drawn from `generator` (or torch's global generator when None)."""
        check_generator(generator, torch.device(device or "cpu"))
        gen_device = generator.device if generator is not None else "cpu"
        seeds = torch.randint(0, 2**62, (rows,), generator=generator, device=gen_device)
        return cls.from_seeds(seeds.to(device))

    @property
    def rows(self) -> int:
        return int(self.seeds.shape[0])

    def select(self, rows: Tensor | slice) -> RowNoise:
        return RowNoise(self.seeds[rows], self.indices[rows])

    def uniform(self, positions: Tensor, stream: int, size: int = 1) -> Tensor:
        """[R, ..., size] uniforms for each row's positions [R, ...]."""
        return uniform(self.keys, positions, stream, size)

    def sample(self, probs: Tensor, positions: Tensor, stream: int = DRAW) -> Tensor:
        """One draw per row and position: probs [R, ..., V], positions Long[R, ...] -> Long."""
        return race(probs, self.uniform(positions, stream, probs.shape[-1]))

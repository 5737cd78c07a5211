"""Next-token distributions: temperature, top-k, top-p and seeded, batched sampling.

Every decoding algorithm in `sampling/` turns (already guided) logits into probabilities with
`probabilities` and draws tokens with `sample`, so "the target distribution p" means exactly the
same thing in plain AR, speculative, Jacobi and MaskGIT decoding.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import Tensor


@dataclass
class SamplingConfig:
    """How logits become a distribution. temperature 0 = greedy; top_k 0 and top_p 1 = off."""

    temperature: float = 1.0
    top_k: int = 0
    top_p: float = 1.0

    def __post_init__(self) -> None:
        if not 0.0 <= self.temperature < math.inf:
            raise ValueError(
                f"temperature must be a finite number >= 0 (0 = greedy), got {self.temperature}"
            )
        if self.top_k < 0:
            raise ValueError(f"top_k must be >= 0 (0 = off), got {self.top_k}")
        if not 0.0 < self.top_p <= 1.0:
            raise ValueError(f"top_p must be in (0, 1] (1 = off), got {self.top_p}")

    @property
    def greedy(self) -> bool:
        return self.temperature == 0

    def probabilities(self, logits: Tensor) -> Tensor:
        """`probabilities(logits, ...)` with this config's settings."""
        return probabilities(logits, self.temperature, self.top_k, self.top_p)


def process_logits(
    logits: Tensor, temperature: float = 1.0, top_k: int = 0, top_p: float = 1.0
) -> Tensor:
    """Apply temperature, then top-k, then top-p over the last axis (fp32; removed -> -inf).

    temperature 0 keeps only the argmax, so the softmax is the greedy one-hot distribution and
    every algorithm built on distributions (speculative acceptance included) becomes greedy.
    """
    if not 0.0 <= temperature < math.inf or top_k < 0 or not 0.0 < top_p <= 1.0:
        raise ValueError(
            f"bad sampling settings: temperature={temperature} (>= 0), top_k={top_k} (>= 0), "
            f"top_p={top_p} (in (0, 1])"
        )
    logits = logits.float()
    vocab = logits.shape[-1]
    if temperature == 0:
        keep = torch.zeros_like(logits, dtype=torch.bool)
        keep.scatter_(-1, logits.argmax(-1, keepdim=True), True)
        return logits.masked_fill(~keep, float("-inf"))
    logits = logits / temperature
    if 0 < top_k < vocab:
        kth = torch.topk(logits, top_k, dim=-1).values[..., -1:]  # [..., 1]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_p < 1.0:
        sorted_logits, order = torch.sort(logits, dim=-1, descending=True)
        sorted_probs = sorted_logits.softmax(-1)
        # drop a token when the mass strictly before it already reaches top_p (keeps >= 1 token)
        drop_sorted = (sorted_probs.cumsum(-1) - sorted_probs) >= top_p
        drop = torch.zeros_like(drop_sorted).scatter(-1, order, drop_sorted)
        logits = logits.masked_fill(drop, float("-inf"))
    return logits


def probabilities(
    logits: Tensor, temperature: float = 1.0, top_k: int = 0, top_p: float = 1.0
) -> Tensor:
    """softmax(process_logits(...)) in fp32: the distribution tokens are actually drawn from."""
    return process_logits(logits, temperature, top_k, top_p).softmax(-1)


def check_generator(generator: torch.Generator | None, device: torch.device) -> None:
    """Random draws happen where the model runs: a generator elsewhere is a clear error here
    rather than a confusing one deep inside a decoding loop."""
    if generator is not None and torch.device(generator.device).type != torch.device(device).type:
        raise ValueError(
            f"generator is on {generator.device} but the model runs on {device}: "
            f"use torch.Generator(device={str(device)!r}).manual_seed(seed)"
        )


def sample(probs: Tensor, generator: torch.Generator | None = None) -> Tensor:
    """Draw one index per row of `probs` [..., V] -> Long[...] (exponential race, no host sync).

    argmax_i p_i / E_i with E_i ~ Exp(1) picks i with probability p_i / sum(p); zero-probability
    entries can never win, and a one-hot row returns its index (greedy) whatever the noise.
    """
    noise = torch.empty_like(probs, dtype=torch.float32).exponential_(1.0, generator=generator)
    noise.clamp_min_(torch.finfo(torch.float32).tiny)
    return (probs.float() / noise).argmax(-1)

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
    vocab = logits.shape[-1]
    filtered = 0 < top_k < vocab or top_p < 1.0
    settings = [torch.tensor(x, device=logits.device) for x in (temperature, top_k, top_p)]
    return filter_rows(logits, *settings, filtered=filtered)


def filter_rows(
    logits: Tensor, temperature: Tensor, top_k: Tensor, top_p: Tensor, *, filtered: bool = True
) -> Tensor:
    """`process_logits` with settings per row: tensors broadcastable to logits.shape[:-1].

    No host sync and no branching on values, so the engine's compiled step can run it for rows
    with different settings. filtered=False skips the sort (every row has top_k 0, top_p 1).
    Ties at the top-k or top-p threshold are kept.
    """
    logits = logits.float()
    temperature, top_k, top_p = (t[..., None] for t in (temperature, top_k, top_p))
    greedy = temperature == 0
    x = logits / torch.where(greedy, 1.0, temperature)
    if filtered:
        vocab = logits.shape[-1]
        ordered = x.sort(dim=-1, descending=True).values  # [..., V]
        k = torch.where((top_k > 0) & (top_k < vocab), top_k, vocab)  # [..., 1]
        kth = ordered.gather(-1, (k - 1).expand(ordered.shape[:-1] + (1,)))
        ordered = ordered.masked_fill(ordered < kth, float("-inf"))
        probs = ordered.softmax(-1)
        # keep a token while the mass strictly before it is below top_p (>= 1 token survives)
        keep = ((probs.cumsum(-1) - probs) < top_p) | (top_p >= 1.0)
        last = keep.sum(-1, keepdim=True).clamp_min(1) - 1
        cutoff = torch.maximum(kth, ordered.gather(-1, last))
        x = x.masked_fill(x < cutoff, float("-inf"))
    best = x.argmax(-1, keepdim=True)
    one_hot = torch.zeros_like(x, dtype=torch.bool).scatter_(-1, best, True)
    return torch.where(greedy & ~one_hot, float("-inf"), x)


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

"""LANTERN relaxed acceptance: let a draft token borrow target mass from its latent neighbours.

Image tokens have many near-synonyms (codes close in the tokenizer's latent space), so the
target often spreads its mass over codes the draft picked only a neighbour of. For draft token
x with neighbours n_1..n_k (nearest first): cs_j = p(n_1) + ... + p(n_j); the largest cs_m
within the budget (delta, or (lam - 1) * p(x) for LANTERN++) moves to x:
p~(x) = p(x) + cs_m and p~(n_1..n_m) = 0. Acceptance is min(1, p~(x)/q(x)); on rejection the
resample is norm(max(0, p~ - q)), which is zero at x and at the neighbours it borrowed from.
delta = 0 or k = 0 gives p~ = p exactly: plain speculative decoding, sample for sample.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

METRICS = ("cosine", "l2")


@torch.no_grad()
def neighbours(codebook: Tensor, k: int, metric: str = "cosine", chunk: int = 2048) -> Tensor:
    """k nearest codes of every code, nearest first, self excluded: codebook [K, d] -> Long[K, k].

    Distances are computed in fp32 chunks of rows so K = 16384 never builds a K x K matrix.
    """
    if metric not in METRICS:
        raise ValueError(f"metric must be one of {METRICS}, got {metric!r}")
    size = codebook.shape[0]
    if not 0 <= k < size:
        raise ValueError(f"k must be in [0, {size - 1}] for a codebook of {size} codes, got {k}")
    vectors = codebook.float()
    if metric == "cosine":
        vectors = F.normalize(vectors, dim=-1)
    out = []
    for start in range(0, size, chunk):
        rows = vectors[start : start + chunk]  # [c, d]
        if metric == "cosine":
            score = rows @ vectors.T  # [c, K] similarity
        else:
            score = -torch.cdist(rows, vectors).square()  # [c, K] negative squared distance
        own = torch.arange(start, start + rows.shape[0], device=score.device)
        score[torch.arange(rows.shape[0], device=score.device), own] = float("-inf")
        out.append(torch.topk(score, k, dim=-1).indices)
    return torch.cat(out).long()


class RelaxedAcceptance:
    """Relaxed target p~ for LANTERN (budget delta) or LANTERN++ (budget (lam - 1) * p(x))."""

    def __init__(self, table: Tensor, delta: float = 0.1, lam: float | None = None) -> None:
        if table.dim() != 2:
            raise ValueError(f"neighbour table must be [K, k], got shape {tuple(table.shape)}")
        if delta < 0:
            raise ValueError(f"delta must be >= 0, got {delta}")
        if lam is not None and lam < 1:
            raise ValueError(f"lam must be >= 1 (LANTERN++ budget (lam - 1) * p(x)), got {lam}")
        self.table = table.long()
        self.delta = delta
        self.lam = lam

    @classmethod
    def from_codebook(
        cls,
        codebook: Tensor,
        k: int,
        delta: float = 0.1,
        metric: str = "cosine",
        lam: float | None = None,
    ) -> RelaxedAcceptance:
        return cls(neighbours(codebook, k, metric), delta=delta, lam=lam)

    @property
    def k(self) -> int:
        return self.table.shape[1]

    def relax(self, p: Tensor, drafts: Tensor) -> Tensor:
        """p [..., V] and drafts Long[...] -> p~ [..., V] (one relaxed distribution per draft)."""
        if p.shape[-1] != self.table.shape[0]:
            raise ValueError(
                f"vocabulary {p.shape[-1]} != neighbour table size {self.table.shape[0]}"
            )
        if self.k == 0:
            return p
        table = self.table.to(p.device)
        near = table[drafts]  # [..., k] neighbour ids, nearest first
        p_near = p.gather(-1, near)  # [..., k]
        if self.lam is None:
            budget = torch.full_like(p_near[..., :1], self.delta)
        else:
            budget = (self.lam - 1.0) * p.gather(-1, drafts[..., None])  # [..., 1]
        within = p_near.cumsum(-1) <= budget  # a prefix: the cumulative sum never decreases
        borrowed = torch.where(within, p_near, torch.zeros_like(p_near))  # [..., k]
        relaxed = p.scatter(-1, near, p_near - borrowed)  # zero where mass was borrowed
        return relaxed.scatter_add(-1, drafts[..., None], borrowed.sum(-1, keepdim=True))

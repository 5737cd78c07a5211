"""Gradient estimators through the non-differentiable nearest-code lookup.

Both return a tensor whose value is exactly the codeword q (bit for bit: `x - x.detach()` is an
exact zero), so `embed(codes)` reproduces the forward output. They differ in the backward:
- straight-through: identity, the decoder's gradient is copied onto e;
- rotation trick (Fifty et al., 2025): the Jacobian is lambda * R with R the rotation taking
  e/|e| onto q/|q| and lambda = |q|/|e|, both treated as constants, so the gradient keeps its
  angle to the vector and carries where inside the Voronoi cell e lies.
"""

from __future__ import annotations

import torch
from torch import Tensor

from tokenizer.quantizers import ESTIMATORS


def straight_through(e: Tensor, q: Tensor) -> Tensor:
    """Value q, gradient copied to e unchanged. e, q [..., d]."""
    return e - e.detach() + q.detach()


def rotation_trick(e: Tensor, q: Tensor, eps: float = 1e-6) -> Tensor:
    """Value q, backward lambda * R applied to the incoming gradient. e, q [..., d] fp32.

    q~ = lambda * (e - 2 (r.e) r + 2 (ê.e) q̂), r = (ê + q̂)/|ê + q̂|, with r, ê, q̂, lambda detached.
    Rows where |e| or |q| is ~0, or ê ≈ -q̂ (r undefined), fall back to straight-through.
    """
    e_det, q_det = e.detach(), q.detach()
    e_norm = e_det.norm(dim=-1, keepdim=True)  # [..., 1]
    q_norm = q_det.norm(dim=-1, keepdim=True)
    e_hat = e_det / e_norm.clamp_min(eps)
    q_hat = q_det / q_norm.clamp_min(eps)
    s = e_hat + q_hat
    s_norm = s.norm(dim=-1, keepdim=True)
    r = s / s_norm.clamp_min(eps)
    lam = q_norm / e_norm.clamp_min(eps)
    rotated = lam * (
        e
        - 2.0 * (r * e).sum(dim=-1, keepdim=True) * r
        + 2.0 * (e_hat * e).sum(dim=-1, keepdim=True) * q_hat
    )
    ok = (e_norm > eps) & (q_norm > eps) & (s_norm > eps)  # [..., 1]
    grad_path = torch.where(ok, rotated, e)
    return grad_path - grad_path.detach() + q_det


def rotation_matrix(e: Tensor, q: Tensor) -> Tensor:
    """R [d, d] for single vectors e, q [d]: the matrix rotation_trick applies (for tests)."""
    e_hat = e / e.norm()
    q_hat = q / q.norm()
    r = (e_hat + q_hat) / (e_hat + q_hat).norm()
    eye = torch.eye(e.shape[-1], dtype=e.dtype, device=e.device)
    return eye - 2.0 * torch.outer(r, r) + 2.0 * torch.outer(q_hat, e_hat)


def apply_estimator(name: str, e: Tensor, q: Tensor) -> Tensor:
    """Dispatch on `QuantizerConfig.estimator`."""
    if name == "ste":
        return straight_through(e, q)
    if name == "rotation":
        return rotation_trick(e, q)
    raise ValueError(f"estimator must be one of {ESTIMATORS}, got {name!r}")

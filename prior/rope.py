"""Rotary position embeddings, 1D and 2D, as per-slot (cos, sin) tables.

Convention: HF Llama's `rotate_half` (non-interleaved): head dim j pairs with dim j + hd/2 and
the pair rotates by angle pos * f_j, f_j = base^(-2j/hd). So a 1D-RoPE prior exports to
`LlamaForCausalLM` without permuting q/k weights.

2D: half of the rotation pairs (j < hd/4) turn with the row, the other half with the column,
each axis using the frequencies of a hd/2-dim 1D RoPE. Condition (prefix) tokens get the
identity rotation (cos 1, sin 0): LlamaGen zeroes their table entry, which silences their keys.
"""

import torch
from torch import Tensor


def inv_freq(rot_dim: int, base: float) -> Tensor:
    """Frequencies [rot_dim / 2] of a rot_dim-dim rotary embedding (float64)."""
    return 1.0 / (base ** (torch.arange(0, rot_dim, 2, dtype=torch.float64) / rot_dim))


def angles_1d(positions: Tensor, head_dim: int, base: float) -> Tensor:
    """Pair angles [L, head_dim / 2] for integer positions [L]."""
    return positions.double()[:, None] * inv_freq(head_dim, base)[None]


def angles_2d(rows: Tensor, cols: Tensor, head_dim: int, base: float) -> Tensor:
    """Pair angles [L, head_dim / 2]: the first half of the pairs follow `rows`, the rest `cols`."""
    half = head_dim // 2
    return torch.cat([angles_1d(rows, half, base), angles_1d(cols, half, base)], dim=-1)


def rope_table(
    kind: str, head_dim: int, prefix_len: int, grid: list[int], base: float
) -> tuple[Tensor, Tensor]:
    """(cos, sin) [P + N, head_dim] in fp32 indexed by sequence slot.

    Slot s < P is condition token s; slot P + i carries image token i (raster order, grid [h, w]).
    1D: slot s has position s (what HF Llama computes). 2D: prefix -> identity, image token i ->
    (row, col) = divmod(i, w).
    """
    h, w = grid
    n = h * w
    if kind == "1d":
        pair = angles_1d(torch.arange(prefix_len + n), head_dim, base)
    elif kind == "2d":
        idx = torch.arange(n)
        img = angles_2d(idx // w, idx % w, head_dim, base)  # [N, hd/2]
        pair = torch.cat([torch.zeros(prefix_len, head_dim // 2, dtype=img.dtype), img], dim=0)
    else:
        raise ValueError(f"rope kind must be '1d' or '2d', got {kind!r}")
    ang = torch.cat([pair, pair], dim=-1)  # [P + N, hd]: dim j and j + hd/2 share an angle
    return ang.cos().float(), ang.sin().float()


def rotate_half(x: Tensor) -> Tensor:
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat([-x2, x1], dim=-1)


def apply_rope(x: Tensor, cos: Tensor, sin: Tensor) -> Tensor:
    """Rotate x [B, L, H, hd] by cos/sin [L, hd] or [B, L, hd] (computed in fp32)."""
    if cos.dim() == 2:
        cos, sin = cos[None], sin[None]
    cos, sin = cos[:, :, None, :].float(), sin[:, :, None, :].float()  # [B|1, L, 1, hd]
    xf = x.float()
    return (xf * cos + rotate_half(xf) * sin).to(x.dtype)

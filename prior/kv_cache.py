"""Static key/value cache: preallocated, never saved, addressed by explicit slots.

The cache does not track a length: every call says where its tokens go (`cache_seqlens`), and
attention only reads slots below each row's end. So per-row positions and rollback (pass an
earlier position) need no bookkeeping, and the buffers keep fixed shapes, which is what
`torch.compile` and CUDA-graph capture need (not yet exercised by a test here).
"""

import torch
from torch import Tensor, nn


class KVCache(nn.Module):
    """Keys and values of one attention layer, [B, S, H, hd] (flash-attn's cache layout)."""

    def __init__(
        self,
        batch_size: int,
        max_slots: int,
        n_heads: int,
        head_dim: int,
        dtype: torch.dtype,
        device: torch.device | str | None = None,
    ) -> None:
        super().__init__()
        if batch_size < 1 or max_slots < 1:
            raise ValueError(
                f"KVCache needs batch_size >= 1 and max_slots >= 1, got {batch_size}, {max_slots}"
            )
        shape = (batch_size, max_slots, n_heads, head_dim)
        self.register_buffer("k", torch.zeros(shape, dtype=dtype, device=device), persistent=False)
        self.register_buffer("v", torch.zeros(shape, dtype=dtype, device=device), persistent=False)

    @property
    def batch_size(self) -> int:
        return self.k.shape[0]

    @property
    def max_slots(self) -> int:
        return self.k.shape[1]

    def reset(self) -> None:
        """Zero the buffers (not needed for correctness: unread slots are masked by position)."""
        self.k.zero_()
        self.v.zero_()


def cache_dtype(param: Tensor) -> torch.dtype:
    """Default cache dtype: the autocast dtype when autocast is on (keys come out in it), else the weights'."""
    device_type = param.device.type
    if param.is_floating_point() and torch.is_autocast_enabled(device_type):
        return torch.get_autocast_dtype(device_type)
    return param.dtype


def prefix_key_mask(key_valid: Tensor, query_slots: Tensor, num_slots: int) -> Tensor:
    """Attention mask [B, 1, T, S] that hides padded prefix keys but lets a query see itself.

    key_valid: Bool [B, P] (True = real condition token); slots >= P are image tokens (always
    valid). query_slots: Long [B, T] or [T]. Causality is left to `attention(causal=True)`.
    """
    b, p = key_valid.shape
    s = num_slots
    valid = torch.ones(b, s, dtype=torch.bool, device=key_valid.device)
    valid[:, :p] = key_valid
    if query_slots.dim() == 1:
        query_slots = query_slots[None].expand(b, -1)
    slots = torch.arange(s, device=key_valid.device)
    itself = slots[None, None, :] == query_slots[..., None]  # [B, T, S]
    return (valid[:, None, :] | itself)[:, None]  # [B, 1, T, S]

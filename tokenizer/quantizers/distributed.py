"""Collectives that keep codebook statistics identical on every rank.

The process group is looked up at call time, never cached: a quantizer built before
`init_process_group` (as accelerate and DDP wrappers do) must still sync once training starts.
Without an initialised group every helper is a no-op, so single-process code needs no branches.
"""

from __future__ import annotations

import torch.distributed as dist
from torch import Tensor


def is_distributed() -> bool:
    """True when a process group with more than one rank is live right now."""
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def rank() -> int:
    """This process's rank (0 when not distributed)."""
    return dist.get_rank() if is_distributed() else 0


def all_reduce_sum_(tensor: Tensor) -> Tensor:
    """Sum `tensor` over ranks in place; returns it for chaining."""
    if is_distributed():
        dist.all_reduce(tensor, op=dist.ReduceOp.SUM)
    return tensor


def broadcast_(tensor: Tensor, src: int = 0) -> Tensor:
    """Overwrite `tensor` with rank `src`'s copy in place; returns it for chaining."""
    if is_distributed():
        dist.broadcast(tensor, src=src)
    return tensor

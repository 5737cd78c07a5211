"""Inference-time fused projections: each block's [wq; wk; wv] and [w1; w3] as one weight.

A one-token decode step of a small prior costs per-kernel overhead, not arithmetic: the q, k, v
matmuls and the gate / up matmuls are five launches per block where two do the same products
(one matmul over the stacked weight). Parameters keep their layout, so checkpoints, training,
DeepSpeed and the Llama export never see this. The decode engine owns the stacked copies and
switches them on only around its own calls (`active`); `refresh` re-stacks them when a weight
was changed in place (an optimizer step, load_state_dict) or moved (`.to(dtype)`, DeepSpeed)
since the last refresh, in place when the shapes allow, so compiled steps stay valid.
"""

from __future__ import annotations

import weakref
from collections.abc import Iterator
from contextlib import contextmanager

import torch
from torch import nn

from prior.blocks import SelfAttention, SwiGLU


class FusionSwitch:
    """One flag all blocks of a model read: on only inside the engine's calls."""

    on: bool = False


def _parts(module: nn.Module) -> list[nn.Parameter]:
    """The weights a module's fused projection stacks, in output order."""
    if isinstance(module, SelfAttention):
        return [module.wq.weight, module.wk.weight, module.wv.weight]
    return [module.w1.weight, module.w3.weight]


class FusedProjections:
    """The stacked q/k/v and gate/up weights of every block of one model."""

    def __init__(self, model: nn.Module) -> None:
        self.modules = [m for m in model.modules() if isinstance(m, SelfAttention | SwiGLU)]
        self.switch = FusionSwitch()
        self._params: list[nn.Parameter] = []
        self._stamp: tuple = ()

    def _stamp_now(self) -> tuple:
        """What changes when a weight does: its storage and its version counter."""
        return tuple((p.data_ptr(), p._version) for p in self._params)

    @torch.no_grad()
    def refresh(self) -> None:
        """Re-stack the weights when one changed since the last refresh (microseconds when
        none did: a version check)."""
        if self._params and self._stamp_now() == self._stamp:
            return
        for module in self.modules:
            stacked = torch.cat(_parts(module))
            old = module.fused_weight
            if old is not None and (old.shape, old.dtype, old.device) == (
                stacked.shape, stacked.dtype, stacked.device,
            ):  # fmt: skip
                old.copy_(stacked)  # the same tensor: compiled graphs that read it stay valid
            else:
                module.fused_weight = stacked
            module.fusion = self.switch
        self._params = [p for m in self.modules for p in _parts(m)]
        self._stamp = self._stamp_now()

    @contextmanager
    def active(self) -> Iterator[None]:
        """Blocks use the stacked weights inside (after `refresh`); outside, every forward
        (training, evaluation) uses the parameters."""
        self.switch.on = True
        try:
            yield
        finally:
            self.switch.on = False


_FUSED: weakref.WeakKeyDictionary[nn.Module, FusedProjections] = weakref.WeakKeyDictionary()


def fused_projections(model: nn.Module) -> FusedProjections:
    """The model's one FusedProjections (shared by all its engines: one stacked copy)."""
    if model not in _FUSED:
        _FUSED[model] = FusedProjections(model)
    return _FUSED[model]

"""Exponential moving average of model weights, checkpointed with the run."""

from __future__ import annotations

import contextlib
import copy

import torch
from torch import nn


class EMA:
    """Keeps a frozen fp32 shadow copy of `model` updated as w_ema = d * w_ema + (1 - d) * w.

    The decay warms up as min(decay, (1 + n) / (10 + n)) so early averages are not dominated
    by the random initialisation.
    """

    def __init__(self, model: nn.Module, decay: float = 0.999) -> None:
        if not 0.0 <= decay < 1.0:
            raise ValueError(f"EMA decay must be in [0, 1), got {decay}")
        self.decay = decay
        self.num_updates = 0
        self.shadow = copy.deepcopy(model).float().eval().requires_grad_(False)

    @torch.no_grad()
    def update(self, model: nn.Module) -> None:
        """Average in `model`'s current weights (gathers ZeRO-3 partitions when needed)."""
        with _gathered(model):
            self._update(model)

    def _update(self, model: nn.Module) -> None:
        self.num_updates += 1
        decay = min(self.decay, (1 + self.num_updates) / (10 + self.num_updates))
        params = dict(model.named_parameters())
        for name, shadow in self.shadow.named_parameters():
            shadow.lerp_(params[name].detach().float(), 1.0 - decay)
        buffers = dict(model.named_buffers())
        for name, shadow in self.shadow.named_buffers():
            if name in buffers:
                shadow.copy_(buffers[name])

    def state_dict(self) -> dict:
        return {
            "decay": self.decay,
            "num_updates": self.num_updates,
            "shadow": self.shadow.state_dict(),
        }

    def load_state_dict(self, state: dict) -> None:
        self.decay = state["decay"]
        self.num_updates = state["num_updates"]
        self.shadow.load_state_dict(state["shadow"])


def _gathered(model: nn.Module) -> contextlib.AbstractContextManager:
    """Under DeepSpeed ZeRO-3 parameters are partitioned across ranks: gather them to read."""
    params = list(model.parameters())
    if params and hasattr(params[0], "ds_id"):
        import deepspeed

        return deepspeed.zero.GatheredParameters(params, modifier_rank=None)
    return contextlib.nullcontext()

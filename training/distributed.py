"""What both trainers need from a distributed run: DeepSpeed config, the optimizer it allows,
sharding, rank-mean logs, per-rank weight digests and gathering full weights to save.

Every function works unchanged in a single process (then the collectives are no-ops).
"""

from __future__ import annotations

import hashlib
from typing import Any

import torch
from accelerate import Accelerator
from accelerate.utils import DistributedType, DummyOptim, DummyScheduler, gather_object
from torch import nn
from torch.distributed.tensor import DTensor

from training.runtime import OptimConfig, RuntimeConfig, build_optimizer
from training.schedule import warmup_cosine


def deepspeed_config(acc: Accelerator) -> dict[str, Any] | None:
    """The live DeepSpeed config dict, or None when not under DeepSpeed."""
    if acc.distributed_type != DistributedType.DEEPSPEED:
        return None
    return acc.state.deepspeed_plugin.deepspeed_config


def fill_deepspeed_config(
    acc: Accelerator, runtime: RuntimeConfig, grad_clip: float, width: int
) -> dict[str, Any] | None:
    """Fill the DeepSpeed config values accelerate leaves to us; None when not under DeepSpeed.

    accelerate sizes ZeRO buckets from `model.config.hidden_size`, which a wrapped objective
    lacks: the same formulas are applied here with the model's `width`.
    """
    ds = deepspeed_config(acc)
    if ds is None:
        return None
    ds["train_micro_batch_size_per_gpu"] = runtime.batch_size
    ds["gradient_accumulation_steps"] = runtime.gradient_accumulation_steps
    ds["train_batch_size"] = (
        runtime.batch_size * runtime.gradient_accumulation_steps * acc.num_processes
    )
    ds["gradient_clipping"] = grad_clip
    zero = ds.setdefault("zero_optimization", {})
    sizes = {
        "reduce_bucket_size": width * width,
        "stage3_prefetch_bucket_size": int(0.9 * width * width),
        "stage3_param_persistence_threshold": 10 * width,
    }
    for key, value in sizes.items():
        if zero.get(key) == "auto":
            zero[key] = value
    if int(zero.get("stage", 0)) == 3:
        zero["stage3_gather_16bit_weights_on_model_save"] = True  # final save gathers weights
    if "optimizer" not in ds:
        ds["zero_allow_untested_optimizer"] = True  # our own AdamW
    return ds


def build_optimization(
    model: nn.Module, optim: OptimConfig, max_steps: int, ds: dict[str, Any] | None
) -> tuple[torch.optim.Optimizer, Any]:
    """AdamW + warmup/cosine; DeepSpeedCPUAdam under optimizer offload; Dummy* when the
    DeepSpeed config defines its own optimizer / scheduler."""
    if ds is not None and "optimizer" in ds:
        optimizer = DummyOptim(model.parameters(), lr=optim.lr, weight_decay=optim.weight_decay)
    else:
        optimizer = build_optimizer(model, optim)
        offload = ((ds or {}).get("zero_optimization", {}).get("offload_optimizer")) or {}
        if offload.get("device") in ("cpu", "nvme"):
            from deepspeed.ops.adam import DeepSpeedCPUAdam

            groups = [
                {"params": g["params"], "weight_decay": g["weight_decay"]}
                for g in optimizer.param_groups
            ]
            optimizer = DeepSpeedCPUAdam(
                groups, lr=optim.lr, betas=tuple(optim.betas), adamw_mode=True
            )
    if ds is not None and "scheduler" in ds:
        return optimizer, DummyScheduler(
            optimizer, total_num_steps=max_steps, warmup_num_steps=optim.warmup_steps
        )
    return optimizer, warmup_cosine(optimizer, optim.warmup_steps, max_steps, optim.min_lr_ratio)


def weights_sharded(acc: Accelerator) -> bool:
    """True when no rank holds whole weights (ZeRO-3, FSDP): gathering them is a collective."""
    if acc.distributed_type == DistributedType.FSDP:
        return True
    ds = deepspeed_config(acc)
    return ds is not None and int(ds["zero_optimization"].get("stage", 0)) == 3


def weights_digest(acc: Accelerator, model: nn.Module) -> str:
    """sha256 of this rank's view of the weights (ZeRO-3 partitions gathered one by one)."""
    digest = hashlib.sha256()
    for name, param in acc.unwrap_model(model).named_parameters():
        if hasattr(param, "ds_id"):
            import deepspeed

            with deepspeed.zero.GatheredParameters([param], modifier_rank=None):
                data = param.detach().float().cpu()
        elif isinstance(param, DTensor):  # FSDP2 shard
            data = param.detach().full_tensor().float().cpu()
        else:
            data = param.detach().float().cpu()
        digest.update(name.encode())
        digest.update(data.contiguous().numpy().tobytes())
    return digest.hexdigest()


def same_weights_on_every_rank(acc: Accelerator, model: nn.Module) -> list[str]:
    """Every rank's weight digest (a collective); RuntimeError on the main process if they differ."""
    digests = gather_object([weights_digest(acc, model)])
    if acc.is_main_process and len(set(digests)) != 1:
        raise RuntimeError(f"ranks hold different weights at the end of training: {digests}")
    return digests


def full_state_dict(acc: Accelerator, model: nn.Module) -> dict[str, torch.Tensor] | None:
    """The whole state dict on the main process (None elsewhere); every rank must call it,
    since sharded weights are gathered with a collective."""
    if weights_sharded(acc):
        state = acc.get_state_dict(model)
    else:
        state = acc.unwrap_model(model).state_dict() if acc.is_main_process else None
    return state if acc.is_main_process else None


def rank_mean(acc: Accelerator, metrics: dict[str, float | torch.Tensor]) -> dict[str, float]:
    """Logged scalars as floats, averaged over ranks so logs describe the global batch: one
    small all-reduce and one device sync per step. Every rank must report the same keys."""
    if not metrics:
        return {}
    keys = sorted(metrics)
    values = torch.stack(
        [torch.as_tensor(metrics[k], device=acc.device).detach().double().reshape(()) for k in keys]
    )
    if acc.num_processes > 1:
        values = acc.reduce(values, reduction="mean")
    return dict(zip(keys, values.tolist()))


def shutdown_distributed() -> None:
    """Leave the process group cleanly at the end of a script (both trainers already end on a
    barrier): a gloo or DeepSpeed comm thread still alive at interpreter exit can abort the
    process after a finished run."""
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        torch.distributed.destroy_process_group()

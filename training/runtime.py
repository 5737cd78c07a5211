"""Accelerate set-up, optimizer and the run-level knobs both trainers share."""

from __future__ import annotations

import json
import math
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from accelerate import Accelerator
from accelerate.utils import (
    DataLoaderConfiguration,
    DistributedDataParallelKwargs,
    InitProcessGroupKwargs,
    ProjectConfiguration,
    set_seed,
)
from torch import nn

from training.serialization import atomic_write_text

MIXED_PRECISION = ("no", "fp16", "bf16")


@dataclass
class RuntimeConfig:
    """How a run executes: steps, batch, precision, logging and checkpoint cadence."""

    seed: int = 0
    max_steps: int = 1000
    batch_size: int = 32  # per process, per micro-batch
    gradient_accumulation_steps: int = 1
    mixed_precision: str = "no"
    log_every: int = 10
    eval_every: int = 200
    sample_every: int = 200
    save_every: int = 500
    keep_last: int = 2
    max_bad_steps: int = 5  # consecutive non-finite losses before the run stops
    tracker: str = "tensorboard"  # tensorboard | none
    progress: bool = True
    num_workers: int = 0
    find_unused_parameters: bool = False  # DDP: set when some parameters may get no gradient

    def __post_init__(self) -> None:
        if self.mixed_precision not in MIXED_PRECISION:
            raise ValueError(
                f"runtime.mixed_precision must be one of {MIXED_PRECISION}, got '{self.mixed_precision}'"
            )
        if self.tracker not in ("tensorboard", "none"):
            raise ValueError(
                f"runtime.tracker must be 'tensorboard' or 'none', got '{self.tracker}'"
            )
        for name in (
            "max_steps",
            "batch_size",
            "gradient_accumulation_steps",
            "log_every",
            "eval_every",
            "sample_every",
            "save_every",
            "keep_last",
            "max_bad_steps",
        ):
            if getattr(self, name) < 1:
                raise ValueError(f"runtime.{name} must be >= 1, got {getattr(self, name)}")
        if self.num_workers < 0:
            raise ValueError(f"runtime.num_workers must be >= 0, got {self.num_workers}")


@dataclass
class OptimConfig:
    """AdamW with warmup + cosine, clipping and an EMA of the weights (LlamaGen defaults)."""

    lr: float = 1e-4
    betas: list[float] = field(default_factory=lambda: [0.9, 0.95])
    weight_decay: float = 0.05
    warmup_steps: int = 100
    min_lr_ratio: float = 0.1
    grad_clip: float = 1.0  # 0 disables
    ema_decay: float = 0.0  # 0 disables the EMA
    fused: bool = False  # fused AdamW kernel (CUDA and CPU in torch >= 2.4): one op per step

    def __post_init__(self) -> None:
        if not math.isfinite(self.lr) or self.lr <= 0:
            raise ValueError(f"optim.lr must be a finite number > 0, got {self.lr}")
        if len(self.betas) != 2 or not all(0.0 <= b < 1.0 for b in self.betas):
            raise ValueError(f"optim.betas must be 2 values in [0, 1), got {self.betas}")
        if not 0.0 <= self.weight_decay < math.inf:
            raise ValueError(f"optim.weight_decay must be finite and >= 0, got {self.weight_decay}")
        if self.warmup_steps < 0:
            raise ValueError(f"optim.warmup_steps must be >= 0, got {self.warmup_steps}")
        if not 0.0 <= self.min_lr_ratio <= 1.0:
            raise ValueError(f"optim.min_lr_ratio must be in [0, 1], got {self.min_lr_ratio}")
        if not 0.0 <= self.grad_clip < math.inf:
            raise ValueError(
                f"optim.grad_clip must be finite and >= 0 (0 = off), got {self.grad_clip}"
            )
        if not 0.0 <= self.ema_decay < 1.0:
            raise ValueError(f"optim.ema_decay must be in [0, 1), got {self.ema_decay}")


def build_accelerator(
    cfg: RuntimeConfig, output_dir: str | Path, *, broadcast_buffers: bool = True
) -> Accelerator:
    """Accelerator for DDP / FSDP / DeepSpeed as chosen by `accelerate launch`; gloo on CPU.
    `broadcast_buffers=False` stops DDP re-broadcasting buffers in every forward."""
    output_dir = Path(output_dir)
    distributed = int(os.environ.get("WORLD_SIZE", "1")) > 1
    handlers: list = [
        DistributedDataParallelKwargs(
            find_unused_parameters=cfg.find_unused_parameters, broadcast_buffers=broadcast_buffers
        )
    ]
    if distributed and not torch.cuda.is_available():
        handlers.append(InitProcessGroupKwargs(backend="gloo"))
    accelerator = Accelerator(
        mixed_precision=cfg.mixed_precision,
        gradient_accumulation_steps=cfg.gradient_accumulation_steps,
        log_with=None if cfg.tracker == "none" else cfg.tracker,
        project_config=ProjectConfiguration(
            project_dir=str(output_dir), logging_dir=str(output_dir / "logs")
        ),
        dataloader_config=DataLoaderConfiguration(use_seedable_sampler=True, data_seed=cfg.seed),
        kwargs_handlers=handlers,
        step_scheduler_with_optimizer=False,
    )
    set_seed(cfg.seed)
    return accelerator


def build_optimizer(model: nn.Module, cfg: OptimConfig) -> torch.optim.AdamW:
    """AdamW with weight decay on matrices only (not on norms, biases or embeddings' gains)."""
    decay, no_decay = [], []
    for _, param in model.named_parameters():
        if param.requires_grad:
            (decay if param.ndim >= 2 else no_decay).append(param)
    groups = [
        {"params": decay, "weight_decay": cfg.weight_decay},
        {"params": no_decay, "weight_decay": 0.0},
    ]
    return torch.optim.AdamW(groups, lr=cfg.lr, betas=tuple(cfg.betas), fused=cfg.fused or None)


def finite_everywhere(accelerator: Accelerator, loss: torch.Tensor) -> bool:
    """True when the loss is finite on every process (all ranks must skip a step together)."""
    bad = (~torch.isfinite(loss.detach())).float().reshape(1)
    return bool(accelerator.reduce(bad, reduction="sum").item() == 0)


class MetricsLog:
    """Appends one JSON line per logged step to `output_dir/metrics.jsonl` (main process only)."""

    def __init__(self, accelerator: Accelerator, output_dir: str | Path) -> None:
        self.accelerator = accelerator
        self.path = Path(output_dir) / "metrics.jsonl"
        if accelerator.is_main_process:
            self.path.parent.mkdir(parents=True, exist_ok=True)

    def truncate_after(self, step: int) -> None:
        """Drop rows logged after `step` (by a run killed later than its last checkpoint), so a
        resumed run leaves one row per step."""
        if not (self.accelerator.is_main_process and self.path.is_file()):
            return
        lines = self.path.read_text().splitlines()
        kept = [line for line in lines if line.strip() and _row_step(line) <= step]
        if len(kept) != len(lines):
            atomic_write_text(self.path, "".join(line + "\n" for line in kept))

    def log(self, step: int, values: dict[str, Any]) -> None:
        values = {k: float(v) for k, v in values.items()}
        self.accelerator.log(values, step=step)
        if self.accelerator.is_main_process:
            with open(self.path, "a") as f:
                f.write(json.dumps({"step": step, **values}) + "\n")


def _row_step(line: str) -> float:
    try:
        return float(json.loads(line).get("step", math.inf))
    except (ValueError, AttributeError):
        return math.inf  # a torn last line of a killed run: dropped

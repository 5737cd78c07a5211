"""Stage-1 training: a VQGAN-style tokenizer under DDP through accelerate.

Two optimizers (generator = the tokenizer, discriminator = the PatchGAN inside the loss) and the
adaptive GAN weight's `torch.autograd.grad` rule out DeepSpeed engines: run with plain
`accelerate launch` / `torchrun` (DDP) or one process.

DDP details that matter here:
- `broadcast_buffers=False`: the quantizers keep their codebook statistics identical on every
  rank themselves (all-reduced counts, broadcast restarts); a buffer broadcast in each forward
  would be one more collective per step and would hang any forward run by one rank alone.
- The discriminator is its own DDP module with its own optimizer and LR schedule. In the
  generator step it is frozen (`requires_grad_(False)`) and called unwrapped, so the generator's
  backward neither fills nor syncs its gradients; it only steps once `loss.disc_start` is reached.
- Both steps sit in one `accelerator.accumulate(model, disc)` context (each `accumulate` call
  advances accelerate's micro-step counter) and each is NaN-guarded by `optimizer_step`.
"""

from __future__ import annotations

import contextlib
import json
import os
from dataclasses import dataclass, field
from pathlib import Path

import torch
from accelerate import Accelerator
from safetensors.torch import save_file
from torch import nn
from torch.nn.parallel import DistributedDataParallel

from tokenizer.data import DataConfig, ImageTransform, load_image_dataset, make_dataloader
from tokenizer.images import image_grid, save_png, to_pil
from tokenizer.losses import LossConfig, TokenizerLoss, hinge_d_loss
from tokenizer.metrics import reconstruction_metrics
from tokenizer.model import Tokenizer, TokenizerConfig
from training.config import CliArgs, save_config
from training.ema import EMA
from training.loop import StepOutput, TrainLoop, optimizer_step
from training.runtime import OptimConfig, RuntimeConfig, build_accelerator, build_optimizer
from training.schedule import warmup_cosine
from training.serialization import atomic_write_text

DEBUG_RANK_STATE = "TESSERA_DEBUG_RANK_STATE"  # =1: each rank dumps its final weights + buffers


@dataclass
class DiscOptimConfig:
    """The discriminator's own AdamW (taming: the generator's lr, betas (0.5, 0.9), no decay)."""

    lr: float = 1e-4
    betas: list[float] = field(default_factory=lambda: [0.5, 0.9])
    weight_decay: float = 0.0
    warmup_steps: int = 0  # counted from loss.disc_start
    grad_clip: float = 0.0  # 0 disables

    def __post_init__(self) -> None:
        if self.lr <= 0:
            raise ValueError(f"disc_optim.lr must be > 0, got {self.lr}")
        if len(self.betas) != 2:
            raise ValueError(f"disc_optim.betas must have 2 values, got {self.betas}")
        if self.warmup_steps < 0:
            raise ValueError(f"disc_optim.warmup_steps must be >= 0, got {self.warmup_steps}")


@dataclass
class EvalConfig:
    """Held-out evaluation (split `data.eval_split`) and the reconstruction grids."""

    max_images: int = 1000  # first N images of the split; 0 = all of it
    batch_size: int = 64
    grid_images: int = 8  # columns of recon_step_XXXXXX.png

    def __post_init__(self) -> None:
        if self.max_images < 0:
            raise ValueError(f"eval.max_images must be >= 0, got {self.max_images}")
        if self.batch_size < 1:
            raise ValueError(f"eval.batch_size must be >= 1, got {self.batch_size}")
        if self.grid_images < 1:
            raise ValueError(f"eval.grid_images must be >= 1, got {self.grid_images}")


@dataclass
class TokenizerTrainConfig:
    """Everything `scripts/train_tokenizer.py` reads; configs/tokenizer/*.yaml mirror it 1:1."""

    runtime: RuntimeConfig = field(default_factory=RuntimeConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    disc_optim: DiscOptimConfig = field(default_factory=DiscOptimConfig)
    data: DataConfig = field(default_factory=DataConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    model: TokenizerConfig = field(default_factory=TokenizerConfig)
    loss: LossConfig = field(default_factory=LossConfig)

    def __post_init__(self) -> None:
        if self.model.in_channels != 3:
            raise ValueError(
                f"model.in_channels must be 3 (tokenizer.data yields RGB images [B, 3, H, W]), "
                f"got {self.model.in_channels}"
            )
        if self.data.resolution != self.model.resolution:
            raise ValueError(
                f"data.resolution ({self.data.resolution}) must equal model.resolution "
                f"({self.model.resolution})"
            )
        disc = self.loss.discriminator
        gan_used = self.loss.disc_weight > 0 and self.loss.disc_start < self.runtime.max_steps
        if gan_used and self.model.resolution < disc.min_resolution:
            raise ValueError(
                f"loss.discriminator.num_layers={disc.num_layers} needs images of at least "
                f"{disc.min_resolution}px, model.resolution is {self.model.resolution}"
            )
        if disc.in_channels != self.model.in_channels:
            raise ValueError(
                f"loss.discriminator.in_channels ({disc.in_channels}) must equal "
                f"model.in_channels ({self.model.in_channels})"
            )


@contextlib.contextmanager
def frozen(module: nn.Module):
    """Parameters stop requiring grad inside (graphs built here get no leaves for them)."""
    flags = [p.requires_grad for p in module.parameters()]
    module.requires_grad_(False)
    try:
        yield module
    finally:
        for p, flag in zip(module.parameters(), flags):
            p.requires_grad_(flag)


def evaluate(acc: Accelerator, model: Tokenizer, loader) -> dict[str, float]:
    """Held-out metrics over this rank's loader, summed across ranks (tokenizer.metrics)."""
    return reconstruction_metrics(
        model,
        (batch["image"] for batch in loader),
        autocast=acc.autocast,
        reduce=lambda t: acc.reduce(t, reduction="sum"),
    )


@torch.no_grad()
def recon_grid(acc: Accelerator, model: Tokenizer, images: torch.Tensor, path: Path) -> None:
    """PNG with the originals on top and their reconstructions below (main process only)."""
    was_training = model.training
    model.eval()
    with acc.autocast():
        recon = model(images.to(acc.device)).recon.float()
    model.train(was_training)
    cells = to_pil(images) + to_pil(recon)  # originals on top, reconstructions below
    save_png(image_grid(cells, len(images), gap=4, border=2, background=(128, 128, 128)), path)


def _eval_data(cfg: TokenizerTrainConfig, acc: Accelerator):
    """(this rank's eval loader, the grid images) from the held-out split (train if none)."""
    split = cfg.data.eval_split or cfg.data.train_split
    with acc.main_process_first():
        dataset = load_image_dataset(cfg.data, split)
    if cfg.eval.max_images:
        dataset = dataset.select(range(min(len(dataset), cfg.eval.max_images)))
    transform = ImageTransform.from_config(cfg.data, train=False)
    grid_rows = dataset.select(range(min(len(dataset), cfg.eval.grid_images)))
    grid = next(iter(make_dataloader(grid_rows, len(grid_rows), False, 0, transform=transform)))
    shard = dataset.shard(acc.num_processes, acc.process_index, contiguous=True)
    loader = make_dataloader(
        shard, cfg.eval.batch_size, False, cfg.runtime.seed, transform=transform
    )
    return loader, grid["image"]


def _scalars(acc: Accelerator, metrics: dict[str, float | torch.Tensor]) -> dict[str, float]:
    """Logged scalars as floats, averaged over ranks so logs describe the global batch: one
    small all-reduce and one device sync per step. Every rank reports the same keys (same path)."""
    if not metrics:
        return {}
    keys = sorted(metrics)
    values = torch.stack(
        [torch.as_tensor(metrics[k], device=acc.device).detach().double().reshape(()) for k in keys]
    )
    if acc.num_processes > 1:
        values = acc.reduce(values, reduction="mean")
    return dict(zip(keys, values.tolist()))


def _dump_rank_state(acc: Accelerator, model: nn.Module, output_dir: Path) -> None:
    """Debug aid (env TESSERA_DEBUG_RANK_STATE=1): every rank writes its own weights and
    buffers, so a test can check that codebooks and statistics agree across ranks."""
    state = {k: v.detach().float().cpu().contiguous() for k, v in model.state_dict().items()}
    path = output_dir / "debug" / f"rank{acc.process_index}.safetensors"
    path.parent.mkdir(parents=True, exist_ok=True)
    save_file(state, str(path))


def train(cfg: TokenizerTrainConfig, args: CliArgs) -> dict[str, float]:
    """Train, evaluate and save `output_dir/final/`; returns the final held-out metrics."""
    output_dir = Path(args.output_dir)
    acc = build_accelerator(cfg.runtime, output_dir)
    with acc.main_process_first():
        train_set = load_image_dataset(cfg.data, cfg.data.train_split)
    loader = make_dataloader(
        train_set,
        cfg.runtime.batch_size,
        True,
        cfg.runtime.seed,
        cfg.runtime.num_workers,
        transform=ImageTransform.from_config(cfg.data, train=True),
        drop_last=True,
    )
    eval_loader, grid_images = _eval_data(cfg, acc)

    model = Tokenizer(cfg.model)
    loss_fn = TokenizerLoss(cfg.loss)
    raw_disc = loss_fn.discriminator
    optimizer = build_optimizer(model, cfg.optim)
    d_optimizer = torch.optim.AdamW(
        raw_disc.parameters(),
        lr=cfg.disc_optim.lr,
        betas=tuple(cfg.disc_optim.betas),
        weight_decay=cfg.disc_optim.weight_decay,
    )
    total = cfg.runtime.max_steps
    scheduler = warmup_cosine(optimizer, cfg.optim.warmup_steps, total, cfg.optim.min_lr_ratio)
    d_total = max(1, total - cfg.loss.disc_start)
    d_scheduler = warmup_cosine(
        d_optimizer, cfg.disc_optim.warmup_steps, d_total, cfg.optim.min_lr_ratio
    )
    ema = EMA(model, cfg.optim.ema_decay) if cfg.optim.ema_decay > 0 else None
    model, disc, optimizer, d_optimizer, loader, scheduler, d_scheduler = acc.prepare(
        model, raw_disc, optimizer, d_optimizer, loader, scheduler, d_scheduler
    )
    for wrapped in (model, disc):  # buffers are synced at init only (see the module docstring)
        if isinstance(wrapped, DistributedDataParallel):
            wrapped.broadcast_buffers = False
    raw_model: Tokenizer = acc.unwrap_model(model)
    if ema is not None:
        ema.shadow.to(acc.device)
        acc.register_for_checkpointing(ema)
    loop = TrainLoop(acc, cfg.runtime, output_dir)
    try:
        loop.resume(args.resume)
        if acc.is_main_process:  # after the data and the resume: a failed start rewrites nothing
            save_config(cfg, output_dir / "config.yaml")
            if cfg.runtime.tracker != "none":
                acc.init_trackers("tokenizer")

        def eval_model() -> Tokenizer:
            return ema.shadow if ema is not None else raw_model

        def train_step(batch: dict) -> StepOutput:
            images = batch["image"]  # [B, 3, H, W] in [-1, 1]
            step = loop.state.step  # optimizer steps done before this one
            metrics: dict[str, float | torch.Tensor] = {}
            with acc.accumulate(model, disc):
                with frozen(raw_disc):
                    out = model(images)
                    g = loss_fn.generator_loss(
                        images, out.recon, out.quant_loss, step, last_layer=raw_model.last_layer
                    )
                result = optimizer_step(
                    acc, model, optimizer, scheduler, g.loss, cfg.optim.grad_clip
                )
                if loss_fn.gan_active(step):
                    recon = out.recon.detach()
                    logits_real, logits_fake = disc(images), disc(recon)  # DDP syncs these grads
                    d_loss = hinge_d_loss(logits_real, logits_fake)
                    d = optimizer_step(
                        acc, disc, d_optimizer, d_scheduler, d_loss, cfg.disc_optim.grad_clip
                    )
                    metrics.update({f"d_{k}": v for k, v in d.metrics.items()})
                    metrics["d_skipped"] = float(d.skipped)
                    metrics["logits_real"] = logits_real.detach().float().mean()
                    metrics["logits_fake"] = logits_fake.detach().float().mean()
            if ema is not None and acc.sync_gradients and not result.skipped:
                ema.update(raw_model)
            if not result.skipped:
                metrics.update(g.logs)
                metrics.update({f"quant/{k}": v for k, v in out.metrics.items()})
            metrics.update(result.metrics)
            return StepOutput(_scalars(acc, metrics), skipped=result.skipped)

        def eval_hook(step: int) -> None:
            values = evaluate(acc, eval_model(), eval_loader)
            loop.log.log(step, {f"eval/{k}": v for k, v in values.items()})
            acc.print(f"step {step}: " + ", ".join(f"{k} {v:.4g}" for k, v in values.items()))

        def sample_hook(step: int) -> None:
            if acc.is_main_process:
                path = output_dir / "samples" / f"recon_step_{step:06d}.png"
                recon_grid(acc, eval_model(), grid_images, path)

        state = loop.run(loader, train_step, hooks={"eval": eval_hook, "sample": sample_hook})

        final = eval_model()
        results = evaluate(acc, final, eval_loader)
        results["step"] = float(state.step)
        sample_hook(state.step)
        if os.environ.get(DEBUG_RANK_STATE) == "1":
            _dump_rank_state(acc, final, output_dir)
        acc.wait_for_everyone()
        if acc.is_main_process:
            loop.log.log(state.step, {f"eval/{k}": v for k, v in results.items()})
            final.save_pretrained(output_dir / "final", overwrite=True)  # atomic_dir inside
            atomic_write_text(output_dir / "eval.json", json.dumps(results, indent=2) + "\n")
            acc.print(json.dumps(results, indent=2))
        acc.wait_for_everyone()
        acc.end_training()
        return results
    finally:
        loop.close()  # the run folder's lock

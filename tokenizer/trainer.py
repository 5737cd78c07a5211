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
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from accelerate import Accelerator
from safetensors.torch import save_file
from torch import nn

from tokenizer.data import ImageTransform, make_dataloader
from tokenizer.images import save_png, to_pil, viewing_grid
from tokenizer.losses import TokenizerLoss
from tokenizer.metrics import reconstruction_metrics
from tokenizer.model import Tokenizer
from tokenizer.sources import load_split
from tokenizer.train_config import DiscOptimConfig, EvalConfig, TokenizerTrainConfig
from training.distributed import rank_mean
from training.ema import EMA
from training.loop import StepOutput, TrainLoop, optimizer_step
from training.runtime import build_accelerator, build_optimizer
from training.schedule import warmup_cosine
from training.serialization import atomic_write_text

DEBUG_RANK_STATE = "TESSERA_DEBUG_RANK_STATE"  # =1: each rank dumps its final weights + buffers
__all__ = ["DiscOptimConfig", "EvalConfig", "TokenizerTrainConfig", "train"]


@dataclass
class TokenizerRun:
    """What the step, eval and sample functions share (built once by `setup`)."""

    cfg: TokenizerTrainConfig
    out: Path
    acc: Accelerator
    model: nn.Module  # DDP-wrapped under DDP
    raw_model: Tokenizer
    disc: nn.Module
    loss_fn: TokenizerLoss
    optimizers: tuple[Any, Any]  # generator, discriminator
    schedulers: tuple[Any, Any]
    loader: Any
    eval_loader: Any
    grid_images: torch.Tensor
    ema: EMA | None

    def eval_model(self) -> Tokenizer:
        """The weights evaluated and saved: the EMA when there is one."""
        return self.ema.shadow if self.ema is not None else self.raw_model


def train(
    cfg: TokenizerTrainConfig,
    output_dir: str | Path,
    resume: str | None = None,
    *,
    overwrite: bool = False,
) -> dict[str, float]:
    """Train, evaluate and save `output_dir/final/`; returns the final held-out metrics.
    `resume`: "latest" or a checkpoint folder; `overwrite`: start over in a folder that holds
    a run."""
    run = setup(cfg, Path(output_dir))
    with TrainLoop(run.acc, cfg.runtime, run.out) as loop:
        loop.start(resume, config=cfg, project="tokenizer", overwrite=overwrite)
        hooks = {"eval": lambda step: eval_hook(run, loop, step),
                 "sample": lambda step: sample_hook(run, step)}  # fmt: skip
        state = loop.run(run.loader, lambda batch: train_step(run, loop.state.step, batch), hooks)
        results = finish(run, loop, state.step)
    return results


def setup(cfg: TokenizerTrainConfig, out: Path) -> TokenizerRun:
    """Data, tokenizer, discriminator, both optimizers and schedules, prepared by accelerate
    (DDP without buffer broadcasts: see the module docstring)."""
    acc = build_accelerator(cfg.runtime, out, broadcast_buffers=False)
    with acc.main_process_first():
        train_set = load_split(cfg.data, cfg.data.train_split)
    transform = ImageTransform.from_config(cfg.data, train=True)
    rt = cfg.runtime
    loader = make_dataloader(train_set, rt.batch_size, True, rt.seed, rt.num_workers,
                             transform=transform, drop_last=True)  # fmt: skip
    eval_loader, grid_images = _eval_data(cfg, acc)
    model, loss_fn = Tokenizer(cfg.model), TokenizerLoss(cfg.loss)
    raw_disc = loss_fn.discriminator
    optimizer = build_optimizer(model, cfg.optim)
    d = cfg.disc_optim
    d_optimizer = torch.optim.AdamW(raw_disc.parameters(), lr=d.lr, betas=tuple(d.betas),
                                    weight_decay=d.weight_decay)  # fmt: skip
    scheduler = warmup_cosine(
        optimizer, cfg.optim.warmup_steps, rt.max_steps, cfg.optim.min_lr_ratio
    )
    d_total = max(1, rt.max_steps - cfg.loss.disc_start)
    d_scheduler = warmup_cosine(d_optimizer, d.warmup_steps, d_total, cfg.optim.min_lr_ratio)
    ema = EMA(model, cfg.optim.ema_decay) if cfg.optim.ema_decay > 0 else None
    model, disc, optimizer, d_optimizer, loader, scheduler, d_scheduler = acc.prepare(
        model, raw_disc, optimizer, d_optimizer, loader, scheduler, d_scheduler
    )
    if ema is not None:
        ema.shadow.to(acc.device)
        acc.register_for_checkpointing(ema)
    return TokenizerRun(cfg, out, acc, model, acc.unwrap_model(model), disc, loss_fn,
                        (optimizer, d_optimizer), (scheduler, d_scheduler), loader, eval_loader,
                        grid_images, ema)  # fmt: skip


def train_step(run: TokenizerRun, step: int, batch: dict) -> StepOutput:
    """Generator step, then (from loss.disc_start on) a discriminator step; `step` = optimizer
    steps done before this one. Logged values are rank means."""
    acc, cfg, raw_disc = run.acc, run.cfg, run.loss_fn.discriminator
    images = batch["image"]  # [B, 3, H, W] in [-1, 1]
    metrics: dict[str, float | torch.Tensor] = {}
    with acc.accumulate(run.model, run.disc):
        with frozen(raw_disc):
            out = run.model(images)
            g = run.loss_fn.generator_loss(images, out.recon, out.quant_loss, step,
                                           last_layer=run.raw_model.last_layer)  # fmt: skip
        result = optimizer_step(acc, run.model, run.optimizers[0], run.schedulers[0], g.loss,
                                cfg.optim.grad_clip)  # fmt: skip
        if run.loss_fn.gan_active(step):
            metrics.update(discriminator_step(run, step, images, out.recon.detach()))
    if run.ema is not None and acc.sync_gradients and not result.skipped:
        run.ema.update(run.raw_model)
    if not result.skipped:
        metrics.update(g.logs)
        metrics.update({f"quant/{k}": v for k, v in out.metrics.items()})
    metrics.update(result.metrics)
    return StepOutput(rank_mean(acc, metrics), skipped=result.skipped)


def discriminator_step(
    run: TokenizerRun, step: int, images: torch.Tensor, recon: torch.Tensor
) -> dict:
    """Hinge loss on real vs reconstructed images through the DDP-wrapped discriminator (so its
    gradients are synced); called from loss.disc_start on."""
    d_out = run.loss_fn.discriminator_loss(images, recon, step, discriminator=run.disc)
    d = optimizer_step(run.acc, run.disc, run.optimizers[1], run.schedulers[1], d_out.loss,
                       run.cfg.disc_optim.grad_clip)  # fmt: skip
    return {
        **d_out.logs,
        **{f"d_{k}": v for k, v in d.metrics.items()},
        "d_skipped": float(d.skipped),
    }


def eval_hook(run: TokenizerRun, loop: TrainLoop, step: int) -> None:
    values = evaluate(run.acc, run.eval_model(), run.eval_loader)
    loop.log.log(step, {f"eval/{k}": v for k, v in values.items()})
    loop.say(f"step {step}: " + ", ".join(f"{k} {v:.4g}" for k, v in values.items()))


def sample_hook(run: TokenizerRun, step: int) -> None:
    if run.acc.is_main_process:
        path = run.out / "samples" / f"recon_step_{step:06d}.png"
        recon_grid(run.acc, run.eval_model(), run.grid_images, path)


def finish(run: TokenizerRun, loop: TrainLoop, step: int) -> dict[str, float]:
    """Final held-out metrics, grid and `final/` (+ eval.json) from the evaluated weights."""
    acc, final = run.acc, run.eval_model()
    results = evaluate(acc, final, run.eval_loader)
    results["step"] = float(step)
    sample_hook(run, step)
    if os.environ.get(DEBUG_RANK_STATE) == "1":
        _dump_rank_state(acc, final, run.out)
    acc.wait_for_everyone()
    if acc.is_main_process:
        loop.log.log(step, {f"eval/{k}": v for k, v in results.items()})
        final.save_pretrained(run.out / "final", overwrite=True)  # atomic_dir inside
        atomic_write_text(run.out / "eval.json", json.dumps(results, indent=2) + "\n")
        acc.print(json.dumps(results, indent=2))
    acc.wait_for_everyone()
    acc.end_training()
    return results


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
    save_png(viewing_grid(cells, len(images), labels=["original", "recon"]), path)


def _eval_data(cfg: TokenizerTrainConfig, acc: Accelerator):
    """(this rank's eval loader, the grid images) from the held-out split (train if none)."""
    split = cfg.data.eval_split or cfg.data.train_split
    with acc.main_process_first():
        dataset = load_split(cfg.data, split)
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


def _dump_rank_state(acc: Accelerator, model: nn.Module, output_dir: Path) -> None:
    """Debug aid (env TESSERA_DEBUG_RANK_STATE=1): every rank writes its own weights and
    buffers, so a test can check that codebooks and statistics agree across ranks."""
    state = {k: v.detach().float().cpu().contiguous() for k, v in model.state_dict().items()}
    path = output_dir / "debug" / f"rank{acc.process_index}.safetensors"
    path.parent.mkdir(parents=True, exist_ok=True)
    save_file(state, str(path))

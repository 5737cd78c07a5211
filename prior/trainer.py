"""Stage-2 training: a GPT / MaskGIT / RQ-Transformer prior on token exports, through accelerate.

One objective module (`prior/objective.py`) wraps the prior so conditioning, masking and the
loss all run inside the wrapped forward; the config lives in `prior/train_config.py`. The run:
manifest -> resolved prior config (vocab, grid, depth, classes and the tokenizer identity come
from the tokens) -> `TrainLoop` with eval (held-out loss, per-token accuracy) and sample-grid
hooks -> `output_dir/final/` gathered under every ZeRO stage, after checking that every rank
holds the same weights. Generic distributed pieces live in `training/distributed.py`.
"""

from __future__ import annotations

import copy
import dataclasses
import json
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from accelerate import Accelerator
from accelerate.utils import DistributedType
from omegaconf import OmegaConf
from torch import Tensor, nn

from prior.conditioning import Condition
from prior.configs import PriorConfig
from prior.data import PriorData, check_labels, load_data
from prior.loading import load_prior, prior_classes
from prior.objective import PriorObjective
from prior.train_config import PriorTrainConfig, SampleConfig, resolve_prior_config
from tokenizer.images import save_png, to_pil, viewing_grid
from tokenizer.manifest import TokenizerIdentity, unflatten_codes
from tokenizer.model import Tokenizer
from training.config import from_dict
from training.distributed import (
    build_optimization,
    fill_deepspeed_config,
    full_state_dict,
    rank_mean,
    same_weights_on_every_rank,
)
from training.ema import EMA
from training.loop import StepOutput, TrainLoop, optimizer_step
from training.runtime import build_accelerator

# sampler(model, cond, uncond, generator) -> codes Long [B, N] or [B, N, D]
Sampler = Callable[[nn.Module, Condition, Condition, torch.Generator], Tensor]


@dataclass
class PriorRun:
    """What the step, eval and sample functions share (built once by `setup`)."""

    cfg: PriorTrainConfig
    out: Path
    acc: Accelerator
    data: PriorData
    prior_cfg: PriorConfig
    objective: nn.Module
    optimizer: Any
    scheduler: Any
    train_loader: Any
    val_loader: Any
    ema: EMA | None
    sampler: Sampler | None
    sample_tokenizer: Tokenizer | None


def train(
    cfg: PriorTrainConfig,
    output_dir: str | Path,
    resume: str | None = None,
    *,
    overwrite: bool = False,
    sampler: Sampler | None = None,
) -> Path:
    """Train a prior as configured; returns `output_dir/final`. `resume`: "latest" or a
    checkpoint folder; `overwrite`: start over in a folder that holds a run; `sampler` draws
    the periodic sample grids (none without it)."""
    run = setup(cfg, Path(output_dir), resume, sampler)
    resolved = resolved_config(cfg, run.prior_cfg)  # what config.yaml records
    with TrainLoop(run.acc, cfg.runtime, run.out) as loop:
        loop.start(resume, config=resolved, project="prior", overwrite=overwrite)
        hooks = {
            "eval": rng_neutral(lambda step: evaluate(run, loop, step), run.acc.device),
            "sample": rng_neutral(lambda step: make_samples(run, step), run.acc.device),
        }
        loop.run(run.train_loader, lambda batch: train_step(run, batch), hooks=hooks)
        final = save_final(run)
        run.acc.end_training()
    return final


def setup(
    cfg: PriorTrainConfig, out: Path, resume: str | None, sampler: Sampler | None
) -> PriorRun:
    """Data, the resolved prior, EMA, optimizer and schedule, all prepared by accelerate; every
    check that can fail runs here, before anything in the run folder is written."""
    acc = build_accelerator(cfg.runtime, out)
    data = load_data(cfg.data, cfg.runtime, acc.device)
    check_resumed_tokens(out, resume, data.info)
    with torch.random.fork_rng(devices=[]):  # checked before any step; its init draws no RNG
        sample_tok = sample_tokenizer(data, acc) if sampler and acc.is_main_process else None
    prior_cfg = resolve_prior_config(
        cfg.model, data.info, data.captions, cfg.gradient_checkpointing
    )
    if prior_cfg.cond == "class":
        check_labels(data, prior_cfg.num_classes)
    prior = build_prior(prior_cfg, cfg.model.init_from, data.info)
    acc.print(f"prior: {prior_cfg.model_type}, {sum(p.numel() for p in prior.parameters()):,} params, "
              f"tokens {data.info.grid} x depth {data.info.depth}, vocab {data.info.codebook_size}")  # fmt: skip
    ds_config = fill_deepspeed_config(acc, cfg.runtime, cfg.optim.grad_clip, prior_cfg.dim)
    if acc.distributed_type == DistributedType.FSDP and cfg.optim.ema_decay > 0:
        raise ValueError("optim.ema_decay > 0 is not supported under FSDP (the EMA copy is not "
                         "sharded): set optim.ema_decay=0 or use DeepSpeed ZeRO")  # fmt: skip
    ema = EMA(prior, cfg.optim.ema_decay) if cfg.optim.ema_decay > 0 else None
    if cfg.compile:
        prior.compile()  # in place: parameter names (and checkpoints) stay unchanged
    objective = PriorObjective(prior)
    optimizer, scheduler = build_optimization(
        objective, cfg.optim, cfg.runtime.max_steps, ds_config
    )
    objective, optimizer, train_loader, scheduler = acc.prepare(
        objective, optimizer, data.train_loader, scheduler
    )
    val_loader = acc.prepare(data.val_loader) if data.val_loader is not None else None
    if ema is not None:
        acc.register_for_checkpointing(ema)
    return PriorRun(cfg, out, acc, data, prior_cfg, objective, optimizer, scheduler, train_loader,
                    val_loader, ema, sampler, sample_tok)  # fmt: skip


def build_prior(
    cfg: PriorConfig, init_from: str = "", info: TokenizerIdentity | None = None
) -> nn.Module:
    """A fresh prior of `cfg`, or one starting from the weights saved in `init_from`."""
    prior = prior_classes()[cfg.model_type](cfg)
    if init_from:
        start = load_prior(init_from)
        if start.config.model_type != cfg.model_type:
            raise ValueError(
                f"model.init_from is a {start.config.model_type}, not a {cfg.model_type}"
            )
        if info is not None:
            start.config.tokenizer.check_matches(info, f"model.init_from {init_from}")
        prior.load_state_dict(start.state_dict())
    return prior


def resolved_config(cfg: PriorTrainConfig, prior_cfg: PriorConfig) -> PriorTrainConfig:
    """The run's config with the prior's fields as resolved from the tokens (config.yaml)."""
    return dataclasses.replace(
        cfg, model=dataclasses.replace(cfg.model, **{cfg.model.type: prior_cfg})
    )


def train_step(run: PriorRun, batch: dict[str, Any]) -> StepOutput:
    """One micro-batch: forward, backward, (optimizer step), EMA; metrics averaged over ranks."""
    acc, batch = run.acc, run.data.to_tokens(batch)
    with acc.accumulate(run.objective):
        res = run.objective(batch["codes"], batch["label"], batch["caption"])
        step = optimizer_step(acc, run.objective, run.optimizer, run.scheduler, res["loss"],
                              run.cfg.optim.grad_clip)  # fmt: skip
    if not step.skipped:
        step.metrics["accuracy"] = res["correct"].sum() / res["count"].sum().clamp(min=1)
        if run.ema is not None and acc.sync_gradients:
            run.ema.update(acc.unwrap_model(run.objective).prior)
    return StepOutput(rank_mean(acc, step.metrics), skipped=step.skipped)


@torch.no_grad()
def evaluate(run: PriorRun, loop: TrainLoop, step: int) -> None:
    """Held-out loss and per-token accuracy over every rank's share (same masks every eval)."""
    if run.val_loader is None:
        return
    acc, objective = run.acc, run.objective
    objective.eval()
    sums = torch.zeros(3, dtype=torch.float64, device=acc.device)
    generator = torch.Generator().manual_seed(run.cfg.runtime.seed + 1)
    for batch in run.val_loader:
        batch = run.data.to_tokens(batch)
        res = objective(batch["codes"], batch["label"], batch["caption"], generator=generator)
        nll, correct, count = acc.gather_for_metrics((res["nll_sum"], res["correct"], res["count"]))
        sums += torch.stack([nll.sum(), correct.sum(), count.sum()]).double()
    objective.train()
    total = max(float(sums[2]), 1.0)
    values = {"val_loss": float(sums[0]) / total, "val_accuracy": float(sums[1]) / total}
    loop.log.log(step, values)
    loop.say(f"step {step}: " + ", ".join(f"{k} {v:.4g}" for k, v in values.items()))


def sampling_model(run: PriorRun) -> nn.Module | None:
    """A plain full copy of the current (EMA) weights on the main process; None elsewhere
    (every rank calls it: gathering sharded weights is a collective)."""
    acc = run.acc
    if run.ema is not None:
        return copy.deepcopy(run.ema.shadow).to(acc.device).eval() if acc.is_main_process else None
    state = full_state_dict(acc, run.objective)
    if state is None:
        return None
    fresh = prior_classes()[run.prior_cfg.model_type](plain_config(run.prior_cfg))
    fresh.load_state_dict(_strip(state))
    return fresh.float().to(acc.device).eval()


@torch.no_grad()
def make_samples(run: PriorRun, step: int) -> None:
    """samples/step_XXXXXX.png: one row per class (or caption) from the current weights."""
    model = sampling_model(run)
    if run.acc.is_main_process and model is not None and run.sample_tokenizer is not None:
        codes = sample_codes(model, run.prior_cfg, run.cfg.sample, run.data.captions, run.sampler,
                             run.acc.device)  # fmt: skip
        images = run.sample_tokenizer.decode(unflatten_codes(codes, run.prior_cfg.grid))
        save_grid(images, run.out / "samples" / f"step_{step:06d}.png", run.cfg.sample.per_row)
    run.acc.wait_for_everyone()


def save_grid(images: Tensor, path: Path, per_row: int) -> None:
    """images [B, 3, H, W] in [-1, 1] -> one PNG, `per_row` per row, enlarged for viewing."""
    save_png(viewing_grid(to_pil(images), per_row), path)


def plain_config(cfg: PriorConfig) -> PriorConfig:
    return dataclasses.replace(cfg, gradient_checkpointing=False)


def _strip(state: dict[str, Tensor]) -> dict[str, Tensor]:
    """Objective state -> prior state ("prior." prefix removed)."""
    return {k.removeprefix("prior."): v for k, v in state.items() if k.startswith("prior.")}


def rng_neutral(hook: Callable[[int], None], device: torch.device) -> Callable[[int], None]:
    """Run a hook without touching the training RNG streams: building a sampling copy or the
    tokenizer draws random inits, which would otherwise make training depend on hook cadence."""

    def wrapped(step: int) -> None:
        with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
            hook(step)

    return wrapped


def check_resumed_tokens(out: Path, resume: str | None, info: TokenizerIdentity) -> None:
    """A resumed run keeps its tokenizer: the identity in the run's config.yaml must match the
    tokens' (checked before anything in the run folder is rewritten)."""
    if resume is None:
        return
    run = out if resume == "latest" else Path(resume).parent.parent
    recorded = run / "config.yaml"
    if not recorded.is_file():
        return
    saved = OmegaConf.load(recorded)
    tok = OmegaConf.select(saved, f"model.{OmegaConf.select(saved, 'model.type')}.tokenizer")
    if tok is not None:
        expected = from_dict(TokenizerIdentity, OmegaConf.to_container(tok), str(recorded))
        expected.check_matches(info, f"--resume {resume}: the run ({recorded}) vs the tokens")


def sample_tokenizer(data: PriorData, acc: Accelerator) -> Tokenizer | None:
    """The tokenizer for sample grids, checked against the tokens' identity; None if unavailable."""
    if not data.tokenizer_dir or not Path(data.tokenizer_dir).is_dir():
        acc.print("no tokenizer directory (data.tokenizer): sample grids are skipped")
        return None
    tok = Tokenizer.from_pretrained(data.tokenizer_dir).to(acc.device).eval()
    identity = tok.identity().with_classes(data.info.class_names)
    data.info.check_matches(identity, f"tokenizer {data.tokenizer_dir} for sample grids")
    return tok


def sample_codes(
    model: nn.Module, prior_cfg: PriorConfig, sample: SampleConfig, captions: list[str],
    sampler: Sampler, device: torch.device,
) -> Tensor:  # fmt: skip
    """Codes for a grid: one row per class (or distinct caption), `per_row` samples each."""
    n = sample.rows * sample.per_row
    if prior_cfg.cond == "class":
        ids = torch.arange(sample.rows) % prior_cfg.num_classes
        cond = model.condition(class_ids=ids.repeat_interleave(sample.per_row).to(device))
    elif prior_cfg.cond == "text":
        prompts = list(dict.fromkeys(captions))[: sample.rows] or [""]
        prompts = [prompts[i % len(prompts)] for i in range(sample.rows)]
        cond = model.condition(texts=[p for p in prompts for _ in range(sample.per_row)])
    else:
        cond = model.condition(batch_size=n)
    generator = torch.Generator(device=device).manual_seed(sample.seed)
    return sampler(model, cond, model.null_condition(n), generator)


def save_final(run: PriorRun) -> Path:
    """Gather the weights (all ranks), check every rank holds the same, save `out/final` (main)."""
    acc = run.acc
    acc.wait_for_everyone()
    state = full_state_dict(acc, run.objective)  # ZeRO-3: gathered on the main process only
    digests = same_weights_on_every_rank(acc, run.objective)
    final = run.out / "final"
    if acc.is_main_process:
        (run.out / "final_weights.json").write_text(
            json.dumps({"sha256_per_rank": digests}, indent=2)
        )
        weights = run.ema.shadow.state_dict() if run.ema is not None else _strip(state)
        model = prior_classes()[run.prior_cfg.model_type](plain_config(run.prior_cfg))
        model.load_state_dict({k: v.float() for k, v in weights.items()})
        model.save_pretrained(final, overwrite=True)  # atomic
        acc.print(f"saved {final}")
    acc.wait_for_everyone()
    return final

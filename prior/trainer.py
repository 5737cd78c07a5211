"""Stage-2 training: a GPT / MaskGIT / RQ-Transformer prior on token exports, through accelerate.

One objective module (`prior/objective.py`) wraps the prior so conditioning, masking and the loss
all run inside the wrapped forward; the config lives in `prior/train_config.py`. The run: manifest -> resolved prior config (vocab,
grid, depth, classes and the tokenizer identity come from the tokens) -> `TrainLoop` with eval
(held-out loss, per-token accuracy) and sample-grid hooks -> `output_dir/final/` gathered under
every ZeRO stage, after checking that every rank holds the same weights.
"""

from __future__ import annotations

import copy
import dataclasses
import hashlib
import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from accelerate import Accelerator
from accelerate.utils import DistributedType, DummyOptim, DummyScheduler, gather_object
from omegaconf import OmegaConf
from torch import Tensor, nn
from torch.distributed.tensor import DTensor

from prior.conditioning import Condition
from prior.configs import PriorConfig
from prior.data import PriorData, check_labels, load_data
from prior.loading import load_prior, prior_classes
from prior.objective import PriorObjective
from prior.train_config import PriorTrainConfig, SampleConfig, resolve_prior_config
from tokenizer.images import image_grid, save_png, to_pil
from tokenizer.manifest import TokenizerIdentity, unflatten_codes
from tokenizer.model import Tokenizer
from training.config import CliArgs, from_dict, save_config
from training.ema import EMA
from training.loop import StepOutput, TrainLoop, optimizer_step
from training.runtime import build_accelerator, build_optimizer
from training.schedule import warmup_cosine

# sampler(model, cond, uncond, generator) -> codes Long [B, N] or [B, N, D]
Sampler = Callable[[nn.Module, Condition, Condition, torch.Generator], Tensor]


def build_prior(cfg: PriorConfig) -> nn.Module:
    return prior_classes()[cfg.model_type](cfg)


def configure_deepspeed(acc: Accelerator, cfg: PriorTrainConfig, dim: int) -> dict[str, Any] | None:
    """Fill the DeepSpeed config values accelerate leaves to us; None when not under DeepSpeed.

    accelerate sizes ZeRO buckets from `model.config.hidden_size`, which our objective lacks: the
    same formulas are applied here with the prior's width `dim`.
    """
    if acc.distributed_type != DistributedType.DEEPSPEED:
        return None
    ds = acc.state.deepspeed_plugin.deepspeed_config
    rt = cfg.runtime
    ds["train_micro_batch_size_per_gpu"] = rt.batch_size
    ds["gradient_accumulation_steps"] = rt.gradient_accumulation_steps
    ds["train_batch_size"] = rt.batch_size * rt.gradient_accumulation_steps * acc.num_processes
    ds["gradient_clipping"] = cfg.optim.grad_clip
    zero = ds.setdefault("zero_optimization", {})
    sizes = {
        "reduce_bucket_size": dim * dim,
        "stage3_prefetch_bucket_size": int(0.9 * dim * dim),
        "stage3_param_persistence_threshold": 10 * dim,
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
    model: nn.Module, cfg: PriorTrainConfig, ds: dict[str, Any] | None
) -> tuple[torch.optim.Optimizer, Any]:
    """AdamW + warmup/cosine; DeepSpeedCPUAdam under optimizer offload; Dummy* when the DS config
    defines its own optimizer / scheduler."""
    o, total = cfg.optim, cfg.runtime.max_steps
    if ds is not None and "optimizer" in ds:
        optimizer = DummyOptim(model.parameters(), lr=o.lr, weight_decay=o.weight_decay)
    else:
        optimizer = build_optimizer(model, o)
        offload = ((ds or {}).get("zero_optimization", {}).get("offload_optimizer") or {}).get(
            "device"
        )
        if offload in ("cpu", "nvme"):
            from deepspeed.ops.adam import DeepSpeedCPUAdam

            groups = [
                {"params": g["params"], "weight_decay": g["weight_decay"]}
                for g in optimizer.param_groups
            ]
            optimizer = DeepSpeedCPUAdam(groups, lr=o.lr, betas=tuple(o.betas), adamw_mode=True)
    if ds is not None and "scheduler" in ds:
        return optimizer, DummyScheduler(
            optimizer, total_num_steps=total, warmup_num_steps=o.warmup_steps
        )
    return optimizer, warmup_cosine(optimizer, o.warmup_steps, total, o.min_lr_ratio)


def _strip(state: dict[str, Tensor]) -> dict[str, Tensor]:
    """Objective state -> prior state ("prior." prefix removed)."""
    return {k.removeprefix("prior."): v for k, v in state.items() if k.startswith("prior.")}


def _sharded(acc: Accelerator) -> bool:
    """True when no rank holds whole weights (ZeRO-3, FSDP): gathering them is a collective."""
    if acc.distributed_type == DistributedType.FSDP:
        return True
    if acc.distributed_type != DistributedType.DEEPSPEED:
        return False
    zero = acc.state.deepspeed_plugin.deepspeed_config["zero_optimization"]
    return int(zero.get("stage", 0)) == 3


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


def save_grid(images: Tensor, path: Path, per_row: int) -> None:
    """images [B, 3, H, W] in [-1, 1] -> one PNG, `per_row` per row, 2 px black gutters."""
    save_png(image_grid(to_pil(images), per_row, gap=2), path)


# ---- the run ------------------------------------------------------------------------------------
def train(cfg: PriorTrainConfig, args: CliArgs, sampler: Sampler | None = None) -> Path:
    """Train a prior as configured; returns `output_dir/final`."""
    out = Path(args.output_dir)
    acc = build_accelerator(cfg.runtime, out)
    data = load_data(cfg.data, cfg.runtime, acc.device)
    check_resumed_tokens(args, data.info)
    with torch.random.fork_rng(devices=[]):  # checked before any step; its init draws no RNG
        sample_tok = _sample_tokenizer(data, acc) if sampler and acc.is_main_process else None
    prior_cfg = resolve_prior_config(
        cfg.model, data.info, data.captions, cfg.gradient_checkpointing
    )
    if prior_cfg.cond == "class":
        check_labels(data, prior_cfg.num_classes)
    prior = build_prior(prior_cfg)
    if cfg.model.init_from:
        start = load_prior(cfg.model.init_from)
        if start.config.model_type != prior_cfg.model_type:
            raise ValueError(
                f"model.init_from is a {start.config.model_type}, not a {prior_cfg.model_type}"
            )
        start.config.tokenizer.check_matches(data.info, f"model.init_from {cfg.model.init_from}")
        prior.load_state_dict(start.state_dict())
    acc.print(f"prior: {prior_cfg.model_type}, {sum(p.numel() for p in prior.parameters()):,} params, "
              f"tokens {data.info.grid} x depth {data.info.depth}, vocab {data.info.codebook_size}")  # fmt: skip
    ds_config = configure_deepspeed(acc, cfg, prior_cfg.dim)
    if acc.distributed_type == DistributedType.FSDP and cfg.optim.ema_decay > 0:
        raise ValueError("optim.ema_decay > 0 is not supported under FSDP (the EMA copy is not "
                         "sharded): set optim.ema_decay=0 or use DeepSpeed ZeRO")  # fmt: skip
    ema = EMA(prior, cfg.optim.ema_decay) if cfg.optim.ema_decay > 0 else None
    if cfg.compile:
        prior.compile()  # in place: parameter names (and checkpoints) stay unchanged
    objective = PriorObjective(prior)
    optimizer, scheduler = build_optimization(objective, cfg, ds_config)
    objective, optimizer, train_loader, scheduler = acc.prepare(
        objective, optimizer, data.train_loader, scheduler
    )
    val_loader = acc.prepare(data.val_loader) if data.val_loader is not None else None
    if ema is not None:
        acc.register_for_checkpointing(ema)
    loop = TrainLoop(acc, cfg.runtime, out)
    try:
        loop.resume(args.resume)
        if acc.is_main_process:  # after every check and the resume: a failed start rewrites nothing
            resolved = dataclasses.replace(
                cfg, model=dataclasses.replace(cfg.model, **{cfg.model.type: prior_cfg})
            )
            save_config(resolved, out / "config.yaml")
        if cfg.runtime.tracker != "none":
            acc.init_trackers("prior")

        def train_step(batch: dict[str, Any]) -> StepOutput:
            batch = data.to_tokens(batch)
            with acc.accumulate(objective):
                res = objective(batch["codes"], batch["label"], batch["caption"])
                step = optimizer_step(
                    acc, objective, optimizer, scheduler, res["loss"], cfg.optim.grad_clip
                )
            if not step.skipped:
                step.metrics["accuracy"] = float(
                    res["correct"].sum() / res["count"].sum().clamp(min=1)
                )
                if ema is not None and acc.sync_gradients:
                    ema.update(acc.unwrap_model(objective).prior)
            return step

        @torch.no_grad()
        def evaluate(step: int) -> None:
            if val_loader is None:
                return
            objective.eval()
            sums = torch.zeros(3, dtype=torch.float64, device=acc.device)
            generator = torch.Generator().manual_seed(cfg.runtime.seed + 1)  # same masks every eval
            for batch in val_loader:
                batch = data.to_tokens(batch)
                res = objective(
                    batch["codes"], batch["label"], batch["caption"], generator=generator
                )
                nll, correct, count = acc.gather_for_metrics(
                    (res["nll_sum"], res["correct"], res["count"])
                )
                sums += torch.stack([nll.sum(), correct.sum(), count.sum()]).double()
            objective.train()
            total = max(float(sums[2]), 1.0)
            loop.log.log(
                step, {"val_loss": float(sums[0]) / total, "val_accuracy": float(sums[1]) / total}
            )

        def sampling_model() -> nn.Module | None:
            """A plain full copy of the current (EMA) weights on the main process; None elsewhere."""
            if ema is not None:
                return (
                    copy.deepcopy(ema.shadow).to(acc.device).eval() if acc.is_main_process else None
                )
            if _sharded(acc):
                state = acc.get_state_dict(objective)  # collective: every rank calls it
            else:
                state = acc.unwrap_model(objective).state_dict() if acc.is_main_process else None
            if not acc.is_main_process:
                return None
            fresh = build_prior(dataclasses.replace(prior_cfg, gradient_checkpointing=False))
            fresh.load_state_dict(_strip(state))
            return fresh.float().to(acc.device).eval()

        @torch.no_grad()
        def make_samples(step: int) -> None:
            model = sampling_model()
            if acc.is_main_process and model is not None and sampler is not None:
                if sample_tok is not None:
                    codes = _sample_codes(
                        model, prior_cfg, cfg.sample, data.captions, sampler, acc.device
                    )
                    codes = unflatten_codes(codes, prior_cfg.grid)  # [B, h, w(, D)]
                    images = sample_tok.decode(codes)
                    save_grid(images, out / "samples" / f"step_{step:06d}.png", cfg.sample.per_row)
            acc.wait_for_everyone()

        hooks = {
            "eval": rng_neutral(evaluate, acc.device),
            "sample": rng_neutral(make_samples, acc.device),
        }
        loop.run(train_loader, train_step, hooks=hooks)
        final = save_final(acc, objective, ema, prior_cfg, out)
        acc.end_training()
        return final
    finally:
        loop.close()  # the run folder's lock


def rng_neutral(hook: Callable[[int], None], device: torch.device) -> Callable[[int], None]:
    """Run a hook without touching the training RNG streams: building a sampling copy or the
    tokenizer draws random inits, which would otherwise make training depend on hook cadence."""

    def wrapped(step: int) -> None:
        with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
            hook(step)

    return wrapped


def check_resumed_tokens(args: CliArgs, info: TokenizerIdentity) -> None:
    """A resumed run keeps its tokenizer: the identity in the run's config.yaml must match the
    tokens' (checked before anything in the run folder is rewritten)."""
    if args.resume is None:
        return
    run = Path(args.output_dir) if args.resume == "latest" else Path(args.resume).parent.parent
    recorded = run / "config.yaml"
    if not recorded.is_file():
        return
    saved = OmegaConf.load(recorded)
    tok = OmegaConf.select(saved, f"model.{OmegaConf.select(saved, 'model.type')}.tokenizer")
    if tok is not None:
        expected = from_dict(TokenizerIdentity, OmegaConf.to_container(tok), str(recorded))
        expected.check_matches(info, f"--resume {args.resume}: the run ({recorded}) vs the tokens")


def _sample_tokenizer(data: PriorData, acc: Accelerator) -> Tokenizer | None:
    """The tokenizer for sample grids, checked against the tokens' identity; None if unavailable."""
    if not data.tokenizer_dir or not Path(data.tokenizer_dir).is_dir():
        acc.print("no tokenizer directory (data.tokenizer): sample grids are skipped")
        return None
    tok = Tokenizer.from_pretrained(data.tokenizer_dir).to(acc.device).eval()
    identity = tok.identity().with_classes(data.info.class_names)
    data.info.check_matches(identity, f"tokenizer {data.tokenizer_dir} for sample grids")
    return tok


def _sample_codes(
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


def save_final(
    acc: Accelerator, objective: nn.Module, ema: EMA | None, prior_cfg: PriorConfig, out: Path
) -> Path:
    """Gather the weights (all ranks), check every rank holds the same, save `out/final` (main)."""
    acc.wait_for_everyone()
    state = acc.get_state_dict(objective)  # ZeRO-3: gathered on the main process only
    digests = gather_object([weights_digest(acc, objective)])
    final = out / "final"
    if acc.is_main_process:
        if len(set(digests)) != 1:
            raise RuntimeError(f"ranks hold different weights at the end of training: {digests}")
        (out / "final_weights.json").write_text(json.dumps({"sha256_per_rank": digests}, indent=2))
        weights = ema.shadow.state_dict() if ema is not None else _strip(state)
        model = build_prior(dataclasses.replace(prior_cfg, gradient_checkpointing=False))
        model.load_state_dict({k: v.float() for k, v in weights.items()})
        model.save_pretrained(final, overwrite=True)  # atomic
        acc.print(f"saved {final}")
    acc.wait_for_everyone()
    return final


__all__ = [
    "Sampler",
    "save_grid",
    "train",
]

"""Autoregressive decoding on a prior's static KV cache (GPT) and RQ-Transformer depth sampling.

Plain AR runs on the decode engine (sampling/engine.py), which knows how a cached prior is driven
under classifier-free guidance; speculative and Jacobi decoding drive the same engine. The
RQ-Transformer's depth loop stays eager here (its step is two transformers).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch
from torch import Tensor

from sampling.engine import EngineBatch
from sampling.guidance import GuidanceSchedule, guide_batch
from sampling.logits import SamplingConfig
from sampling.noise import RowNoise
from sampling.row_settings import RowSettings

if TYPE_CHECKING:
    from prior.conditioning import Condition


def batch_size(cond: Condition) -> int:
    return int(cond.prefix.shape[0])


def guided_condition(cond: Condition, uncond: Condition | None, guided: bool) -> Condition:
    """The condition batch a prior is run on: [cond; uncond] under guidance, else cond."""
    if not guided:
        return cond
    if uncond is None:
        raise ValueError("guidance scale != 1 needs an unconditional condition (uncond is None)")
    if batch_size(uncond) != batch_size(cond):
        raise ValueError(
            f"cond and uncond batch sizes differ: {batch_size(cond)} vs {batch_size(uncond)}"
        )
    return type(cond).cat([cond, uncond])


def row_noise(
    noise: RowNoise | None, generator: torch.Generator | None, rows: int, device: torch.device
) -> RowNoise:
    """The rows' noise: as given (per-row seeds), else per-row seeds drawn from `generator`."""
    if noise is None:
        return RowNoise.from_generator(rows, generator, device)
    if noise.rows != rows:
        raise ValueError(f"noise for {noise.rows} rows, but {rows} rows are decoded")
    return noise


def positions_of(batch: int, position: int, device: torch.device) -> Tensor:
    return torch.full((batch,), position, dtype=torch.long, device=device)


@torch.no_grad()
def generate_ar(
    model: torch.nn.Module,
    cond: Condition,
    uncond: Condition | None,
    num_tokens: int,
    sampling: SamplingConfig | None = None,
    guidance: GuidanceSchedule | None = None,
    generator: torch.Generator | None = None,
    compile: bool | str = False,
    compile_mode: str = "default",
    return_probs: bool = False,
    *,
    noise: RowNoise | None = None,
) -> Tensor | tuple[Tensor, Tensor]:
    """Sample codes Long[B, N] token by token on the decode engine: prefill, then one-token
    steps (one compiled graph each with compile=True; "auto" compiles on CUDA).

    Row b's token at position i is drawn with its own noise (seed, index, i): the codes do not
    depend on the batch. noise: per-row seeds (default: drawn from `generator`).
    return_probs=True also returns the distribution each token was drawn from [B, N, V].
    """
    sampling = sampling if sampling is not None else SamplingConfig()
    guidance = guidance if guidance is not None else GuidanceSchedule()
    if num_tokens < 1:
        raise ValueError(f"num_tokens must be >= 1, got {num_tokens}")
    batch, device = batch_size(cond), cond.prefix.device
    noise = row_noise(noise, generator, batch, device)
    settings = RowSettings.build(batch, num_tokens, sampling, guidance, device)
    rows = EngineBatch(model, cond, uncond, settings, noise, num_tokens=num_tokens,
                       compile=compile, compile_mode=compile_mode)  # fmt: skip
    probs = rows.prefill()  # [B, V]
    tokens = [noise.sample(probs, positions_of(batch, 0, device))]
    history = [probs]
    for i in range(1, num_tokens):
        positions = positions_of(batch, i - 1, device)
        if return_probs:
            probs = rows.decode(tokens[-1][:, None], positions)[:, 0]  # [B, V]
            tokens.append(noise.sample(probs, positions + 1))
            history.append(probs)
        else:
            tokens.append(rows.step(tokens[-1], positions))
    codes = torch.stack(tokens, dim=1)  # [B, N]
    if return_probs:
        return codes, torch.stack(history, dim=1)
    return codes


@torch.no_grad()
def generate_rq(
    model: torch.nn.Module,
    cond: Condition,
    uncond: Condition | None,
    num_tokens: int,
    depth: int,
    sampling: SamplingConfig | None = None,
    guidance: GuidanceSchedule | None = None,
    generator: torch.Generator | None = None,
    return_probs: bool = False,
    *,
    noise: RowNoise | None = None,
) -> Tensor | tuple[Tensor, Tensor]:
    """Sample RQ codes Long[B, N, D]: the spatial transformer runs on the KV cache, the depth
    transformer draws the D codes of each position in turn (CFG with the position's scale on
    every depth step). Code d of position i uses the row's noise at counter i * D + d.
    return_probs=True also returns the distributions [B, N, D, V]."""
    sampling = sampling if sampling is not None else SamplingConfig()
    guidance = guidance if guidance is not None else GuidanceSchedule()
    if num_tokens < 1 or depth < 1:
        raise ValueError(f"num_tokens and depth must be >= 1, got {num_tokens} and {depth}")
    guided = guidance.needs_unconditional(num_tokens)
    cond_rows = guided_condition(cond, uncond, guided)
    batch = batch_size(cond)
    device = cond.prefix.device
    noise = row_noise(noise, generator, batch, device)
    model.setup_caches(batch_size(cond_rows), num_tokens)
    h = model.prefill(cond_rows)  # [R, dim]: context for position 0
    codes, history = [], []
    for i in range(num_tokens):
        scale = guidance.scale_at(i, num_tokens)
        prev = torch.empty(h.shape[0], 0, dtype=torch.long, device=device)  # [R, d]
        for d in range(depth):
            logits = model.depth_logits(h, prev)  # [R, V]
            if guided:
                logits = guide_batch(logits, scale, guidance.plausibility)
            probs = sampling.probabilities(logits)
            token = noise.sample(probs, positions_of(batch, i * depth + d, device))  # [B]
            token = torch.cat([token, token]) if guided else token
            prev = torch.cat([prev, token[:, None]], dim=1)
            if return_probs:
                history.append(probs)
        codes.append(prev[:batch])  # [B, D]
        if i + 1 < num_tokens:
            positions = torch.full((prev.shape[0],), i, dtype=torch.long, device=device)
            h = model.decode(prev[:, None, :], positions)[:, 0]  # [R, dim]
    out = torch.stack(codes, dim=1)  # [B, N, D]
    if return_probs:
        vocab = history[0].shape[-1]
        probs_all = torch.stack(history, dim=1).reshape(batch, num_tokens, depth, vocab)
        return out, probs_all
    return out

"""MaskGIT decoding (Chang et al. 2022): T parallel steps from an all-MASK canvas.

At step t (ratio = (t+1)/T) every masked position is sampled; confidence = log p(sample) +
tau * (1 - ratio) * Gumbel (known tokens: +inf); the n_mask = clamp(floor(U0 cos(pi ratio / 2)),
1, remaining - 1) least confident are re-masked. The last step returns its sample directly
(re-masking after it would leave one MASK). CFG: u + s_t (c - u) with s_t from a schedule over
the steps (linear 0 -> s or cosine).
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING

import torch
from torch import Tensor

from prior.maskgit import cosine_schedule
from sampling.autoregressive import batch_size, guided_condition, row_noise
from sampling.engine import compiled, wants_compile
from sampling.guidance import GuidanceSchedule
from sampling.logits import SamplingConfig
from sampling.noise import CONFIDENCE, DRAW, RowNoise, race, step_stream, uniform
from sampling.row_settings import RowSettings, guided_distribution

if TYPE_CHECKING:
    from prior.conditioning import Condition


def reveal_schedule(num_tokens: int, steps: int) -> list[int]:
    """How many tokens each step reveals (what `generate_maskgit` does, without a model)."""
    counts, remaining = [], num_tokens
    for t in range(steps):
        keep_masked = 0 if t == steps - 1 else masked_after(num_tokens, t, steps, remaining)
        counts.append(remaining - keep_masked)
        remaining = keep_masked
    return counts


def masked_after(num_tokens: int, t: int, steps: int, remaining: int) -> int:
    """n_mask after step t: clamp(floor(U0 * gamma((t+1)/T)), 1, remaining - 1), at least 0."""
    target = math.floor(num_tokens * float(cosine_schedule((t + 1) / steps)))
    return max(0, min(max(target, 1), remaining - 1))


def _maskgit_pass(
    model: torch.nn.Module,
    codes: Tensor,
    cond_rows: Condition,
    settings: RowSettings,
    noise_keys: Tensor,
    step: Tensor,
    gumbel_scale: Tensor,
    guided: bool,
    filtered: bool,
) -> tuple[Tensor, Tensor]:
    """One full pass: (sampled codes [B, N], confidence [B, N]) for canvas codes [B, N]."""
    batch, n = codes.shape
    inputs = torch.cat([codes, codes]) if guided else codes  # [R, N]
    logits = model(inputs, cond_rows)  # [R, N, V]
    where = step.expand(batch, n)  # the guidance table is indexed by step
    probs = guided_distribution(logits, where, settings, guided=guided, filtered=filtered)
    positions = torch.arange(n, device=codes.device).expand(batch, n)
    u = uniform(noise_keys, positions, step_stream(step, DRAW), probs.shape[-1])
    sampled = race(probs, u)  # [B, N]
    log_p = probs.gather(-1, sampled[..., None])[..., 0].clamp_min(1e-30).log()
    g = uniform(noise_keys, positions, step_stream(step, CONFIDENCE), 1)[..., 0]
    return sampled, log_p + gumbel_scale * -torch.log(-torch.log(g))


@torch.no_grad()
def generate_maskgit(
    model: torch.nn.Module,
    cond: Condition,
    uncond: Condition | None,
    num_tokens: int,
    steps: int = 8,
    sampling: SamplingConfig | None = None,
    gumbel_temperature: float = 4.5,
    guidance: GuidanceSchedule | None = None,
    generator: torch.Generator | None = None,
    *,
    noise: RowNoise | None = None,
    compile: bool | str = False,
) -> tuple[Tensor, list[int]]:
    """Sample codes Long[B, N]; also returns the number of tokens revealed at each step.

    Each step's draws and confidence noise come from the rows' own streams for that step, so
    a sample does not depend on its batch. compile=True compiles the pass (one graph per batch
    shape, reused by all T steps)."""
    sampling = sampling if sampling is not None else SamplingConfig()
    guidance = guidance if guidance is not None else GuidanceSchedule()
    if num_tokens < 1 or steps < 1:
        raise ValueError(f"num_tokens and steps must be >= 1, got {num_tokens} and {steps}")
    if gumbel_temperature < 0:
        raise ValueError(f"gumbel_temperature must be >= 0, got {gumbel_temperature}")
    mask_id = int(model.config.vocab_size)
    batch, device = batch_size(cond), cond.prefix.device
    noise = row_noise(noise, generator, batch, device)
    settings = RowSettings.build(batch, steps, sampling, guidance, device)  # scale per step
    guided = settings.guided
    cond_rows = guided_condition(cond, uncond, guided)
    one_pass = _maskgit_pass
    if wants_compile(compile, device):
        one_pass = compiled(_maskgit_pass, "default", device=device)
    codes = torch.full((batch, num_tokens), mask_id, dtype=torch.long, device=device)
    remaining, counts = num_tokens, []
    for t in range(steps):
        ratio = (t + 1) / steps
        step = torch.tensor(t, device=device)
        gumbel_scale = torch.tensor(gumbel_temperature * (1.0 - ratio), device=device)
        sampled, confidence = one_pass(model, codes, cond_rows, settings, noise.keys, step,
                                       gumbel_scale, guided, settings.filtered)  # fmt: skip
        unknown = codes == mask_id
        sampled = torch.where(unknown, sampled, codes)  # [B, N]
        if t == steps - 1:
            codes = sampled
            counts.append(remaining)
            break
        keep_masked = masked_after(num_tokens, t, steps, remaining)
        confidence = confidence.masked_fill(~unknown, float("inf"))
        remask = torch.zeros_like(unknown)
        remask.scatter_(1, confidence.argsort(dim=1)[:, :keep_masked], True)
        codes = sampled.masked_fill(remask, mask_id)
        counts.append(remaining - keep_masked)
        remaining = keep_masked
    return codes, counts

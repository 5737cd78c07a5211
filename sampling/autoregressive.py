"""Autoregressive decoding on a prior's static KV cache (GPT) and RQ-Transformer depth sampling.

`GuidedPrior` is the one place that knows how a cached prior is driven under classifier-free
guidance: the batch is doubled as [cond; uncond], both halves are fed the same tokens at the same
per-row positions, and the caller only ever sees B rows of guided, processed distributions.
Plain AR, speculative and Jacobi decoding all sit on top of it.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING

import torch
from torch import Tensor

from sampling.guidance import GuidanceSchedule, guide_batch
from sampling.logits import SamplingConfig, check_generator, sample

if TYPE_CHECKING:
    from prior.conditioning import Condition

DecodeFn = Callable[[Tensor, Tensor], Tensor]


def compile_decode(model: torch.nn.Module, mode: str = "default") -> DecodeFn:
    """torch.compile the cached decode step. mode "reduce-overhead" adds CUDA graphs on GPU
    (static shapes: one-token steps keep [B, 1]); "max-autotune" also searches kernels."""
    return torch.compile(model.decode, mode=mode, dynamic=False)


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


class GuidedPrior:
    """A cached GPT-style prior seen as B rows of guided, processed next-token distributions.

    decode(tokens [B,T], positions [B]) puts row b's tokens at positions[b]..positions[b]+T-1
    (both CFG halves) and returns the distributions for positions+1..positions+T, each guided
    with the schedule's scale for its own position. Rolling back = decoding at an earlier
    position. `calls` counts model forwards (prefill included).
    """

    def __init__(
        self,
        model: torch.nn.Module,
        cond: Condition,
        uncond: Condition | None,
        guidance: GuidanceSchedule,
        sampling: SamplingConfig,
        num_tokens: int,
        max_len: int,
        decode_fn: DecodeFn | None = None,
    ) -> None:
        self.model = model
        self.sampling = sampling
        self.batch = batch_size(cond)
        self.guided = guidance.needs_unconditional(num_tokens)
        self.cond = guided_condition(cond, uncond, self.guided)
        self.rows = self.batch * (2 if self.guided else 1)
        self.device = cond.prefix.device
        # scale per absolute position; positions past num_tokens repeat the last one
        self.scales = guidance.table(num_tokens, max_len + 1, device=self.device)  # [L]
        self.plausibility = guidance.plausibility
        self.decode_fn = decode_fn if decode_fn is not None else model.decode
        self.calls = 0
        model.setup_caches(self.rows, max_len)

    def _distribution(self, logits: Tensor, scale: Tensor) -> Tensor:
        if self.guided:
            logits = guide_batch(logits, scale, self.plausibility)
        return self.sampling.probabilities(logits)

    def prefill(self) -> Tensor:
        """Reset the cache with the condition prefix -> distribution of token 0, [B, V]."""
        self.calls += 1
        logits = self.model.prefill(self.cond)  # [R, V]
        return self._distribution(logits, self.scales[0])

    def decode(self, tokens: Tensor, positions: Tensor) -> Tensor:
        """tokens Long[B,T] at positions Long[B] -> distributions [B, T, V] for positions+1.."""
        steps = torch.arange(tokens.shape[1], device=self.device)
        where = positions[:, None] + 1 + steps  # [B, T] positions being predicted
        scale = self.scales[where.clamp(max=self.scales.numel() - 1)][..., None]  # [B, T, 1]
        if self.guided:
            tokens = torch.cat([tokens, tokens])  # [2B, T]: both halves see the same tokens
            positions = torch.cat([positions, positions])
        self.calls += 1
        logits = self.decode_fn(tokens, positions)  # [R, T, V]
        return self._distribution(logits, scale)


@torch.no_grad()
def generate_ar(
    model: torch.nn.Module,
    cond: Condition,
    uncond: Condition | None,
    num_tokens: int,
    sampling: SamplingConfig | None = None,
    guidance: GuidanceSchedule | None = None,
    generator: torch.Generator | None = None,
    compile: bool = False,
    compile_mode: str = "default",
    return_probs: bool = False,
) -> Tensor | tuple[Tensor, Tensor]:
    """Sample codes Long[B, N] token by token: prefill, then one-token decode steps.

    Under guidance both CFG halves receive the same sampled token. No host sync inside the
    loop. return_probs=True also returns the distribution each token was drawn from [B, N, V].
    """
    sampling = sampling if sampling is not None else SamplingConfig()
    guidance = guidance if guidance is not None else GuidanceSchedule()
    if num_tokens < 1:
        raise ValueError(f"num_tokens must be >= 1, got {num_tokens}")
    check_generator(generator, cond.prefix.device)
    decode_fn = compile_decode(model, compile_mode) if compile else None
    prior = GuidedPrior(model, cond, uncond, guidance, sampling, num_tokens, num_tokens, decode_fn)
    probs = prior.prefill()  # [B, V]
    tokens = [sample(probs, generator)]
    history = [probs]
    for i in range(1, num_tokens):
        positions = torch.full((prior.batch,), i - 1, dtype=torch.long, device=prior.device)
        probs = prior.decode(tokens[-1][:, None], positions)[:, 0]  # [B, V]
        tokens.append(sample(probs, generator))
        if return_probs:
            history.append(probs)
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
) -> Tensor | tuple[Tensor, Tensor]:
    """Sample RQ codes Long[B, N, D]: the spatial transformer runs on the KV cache, the depth
    transformer draws the D codes of each position in turn (CFG with the position's scale on
    every depth step). return_probs=True also returns the distributions [B, N, D, V]."""
    sampling = sampling if sampling is not None else SamplingConfig()
    guidance = guidance if guidance is not None else GuidanceSchedule()
    if num_tokens < 1 or depth < 1:
        raise ValueError(f"num_tokens and depth must be >= 1, got {num_tokens} and {depth}")
    guided = guidance.needs_unconditional(num_tokens)
    cond_rows = guided_condition(cond, uncond, guided)
    batch = batch_size(cond)
    device = cond.prefix.device
    check_generator(generator, device)
    model.setup_caches(batch_size(cond_rows), num_tokens)
    h = model.prefill(cond_rows)  # [R, dim]: context for position 0
    codes, history = [], []
    for i in range(num_tokens):
        scale = guidance.scale_at(i, num_tokens)
        prev = torch.empty(h.shape[0], 0, dtype=torch.long, device=device)  # [R, d]
        for _ in range(depth):
            logits = model.depth_logits(h, prev)  # [R, V]
            if guided:
                logits = guide_batch(logits, scale, guidance.plausibility)
            probs = sampling.probabilities(logits)
            token = sample(probs, generator)  # [B]
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

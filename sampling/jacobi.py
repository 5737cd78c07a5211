"""Speculative Jacobi decoding (SJD, Teng et al. 2024): draft-free and exact.

Each row keeps a window of W guessed future tokens together with the distribution q each guess
was drawn from (uniform for the random initial guesses). One (CFG) forward over
[last accepted token, window] on the cache gives p at W + 1 positions; guesses are accepted left
to right with min(1, p/q); the first rejection is resampled from norm(max(0, p - q)) (a bonus
token from the last p when the whole window passes). The positions after it keep fresh samples
drawn from this pass's p, which become the next window's guesses (with q = that p), and random
guesses fill the rest. Every guess was drawn from its recorded q given everything verified
before it, so the speculative argument makes the output exactly the target's distribution.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch
from torch import Tensor

from sampling.autoregressive import GuidedPrior
from sampling.guidance import GuidanceSchedule
from sampling.logits import SamplingConfig, check_generator, sample
from sampling.speculative import align, commit, round_layout, round_tokens, verify
from sampling.stats import SpeculativeStats

if TYPE_CHECKING:
    from prior.conditioning import Condition


@torch.no_grad()
def generate_jacobi(
    model: torch.nn.Module,
    cond: Condition,
    uncond: Condition | None,
    num_tokens: int,
    window: int = 8,
    sampling: SamplingConfig | None = None,
    guidance: GuidanceSchedule | None = None,
    generator: torch.Generator | None = None,
) -> tuple[Tensor, SpeculativeStats]:
    """Sample codes Long[B, N] with SJD; stats count one target call per forward."""
    sampling = sampling if sampling is not None else SamplingConfig()
    guidance = guidance if guidance is not None else GuidanceSchedule()
    if num_tokens < 1:
        raise ValueError(f"num_tokens must be >= 1, got {num_tokens}")
    if window < 1:
        raise ValueError(f"window must be >= 1, got {window}")
    prior = GuidedPrior(model, cond, uncond, guidance, sampling, num_tokens, num_tokens)
    batch, device = prior.batch, prior.device
    check_generator(generator, device)
    stats = SpeculativeStats(rows=batch, num_tokens=num_tokens)

    out = torch.zeros(batch, num_tokens + window + 1, dtype=torch.long, device=device)
    p0 = prior.prefill()  # [B, V]
    vocab = p0.shape[-1]
    out[:, 0] = sample(p0, generator)
    uniform = torch.full((batch, window, vocab), 1.0 / vocab, device=device)

    def random_guesses() -> Tensor:
        return torch.randint(vocab, (batch, window), generator=generator, device=device)

    guess, q = random_guesses(), uniform  # [B, W], [B, W, V]
    n = torch.ones(batch, dtype=torch.long, device=device)
    drafted = torch.zeros((), dtype=torch.long, device=device)
    accepted_total = torch.zeros((), dtype=torch.long, device=device)
    while num_tokens > 1:
        active = n < num_tokens
        if not bool(active.any()):  # the one host sync of an iteration
            break
        w = min(window, num_tokens - 1)
        n_eff, limit, shift = round_layout(n, active, w, num_tokens)
        start = n_eff - 1 - shift  # rows near the end shift back and re-feed accepted tokens
        tokens = round_tokens(out, guess[:, :w], n_eff, start)  # [B, w+1]
        p = align(prior.decode(tokens, start), shift)  # [B, w+1, V] for positions n..n+w
        acc, nxt = verify(p, q[:, :w], guess[:, :w], generator, limit=limit)
        fresh = sample(p, generator)  # [B, w+1] this pass's samples at every position
        n = torch.where(active, commit(out, n_eff, active, guess[:, :w], acc, nxt), n)
        # next window starts after the committed token: fresh samples for positions
        # n+acc+1..n+w (index acc+1..w of this pass), then random guesses
        pool = torch.cat([fresh, random_guesses()], dim=1)  # [B, w+1+W]
        pool_q = torch.cat([p, uniform], dim=1)  # [B, w+1+W, V]
        pick = acc[:, None] + 1 + torch.arange(window, device=device)  # [B, W], <= w+W
        guess = pool.gather(1, pick)
        q = pool_q.gather(1, pick[..., None].expand(-1, -1, vocab))
        drafted += limit.sum()
        accepted_total += acc.sum()
        stats.iterations += 1
        stats.draft_lengths.append(w)
    stats.drafted, stats.accepted = int(drafted), int(accepted_total)
    stats.target_calls = prior.calls
    return out[:, :num_tokens], stats

"""Speculative Jacobi decoding (SJD, Teng et al. 2024): draft-free and exact.

Each row keeps a window of W guessed future tokens together with the distribution q each guess
was drawn from (uniform for the random initial guesses). One (CFG) forward over
[last accepted token, window] on the cache gives p at W + 1 positions; guesses are accepted left
to right with min(1, p/q); the first rejection is resampled from norm(max(0, p - q)) (a bonus
token from the last p when the whole window passes). The positions after it keep fresh samples
drawn from this pass's p, which become the next window's guesses (with q = that p), and random
guesses fill the rest. Every guess was drawn from its recorded q given everything verified
before it, so the speculative argument makes the output exactly the target's distribution.

MC-SJD (So et al., arXiv 2510.24211) couples each position's guesses across iterations: with
Gumbel coupling a guess is argmax(q / E) with the same noise E every iteration, so it only
changes where its distribution really moved; drafts stop flickering and acceptance rises.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch
from torch import Tensor

from sampling.autoregressive import batch_size, positions_of, row_noise
from sampling.engine import EngineBatch
from sampling.guidance import GuidanceSchedule
from sampling.logits import SamplingConfig
from sampling.noise import DRAW, RowNoise, step_stream
from sampling.row_settings import RowSettings
from sampling.speculative import align, commit, round_layout, round_tokens, verify
from sampling.stats import SpeculativeStats

if TYPE_CHECKING:
    from prior.conditioning import Condition


COUPLINGS = ("gumbel", "independent")


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
    *,
    coupling: str = "gumbel",
    noise: RowNoise | None = None,
    compile: bool | str = False,
) -> tuple[Tensor, SpeculativeStats]:
    """Sample codes Long[B, N] with SJD; stats count one target call per forward.

    coupling="gumbel" (MC-SJD): a position's guess is redrawn every iteration with the same
    noise (the row's DRAW stream at that position), so a guess whose distribution barely moved
    stays put and is accepted; "independent": fresh noise per iteration (the original SJD).
    Both are exact: only draft noise is shared, accept tests and resamples have their own.
    """
    sampling = sampling if sampling is not None else SamplingConfig()
    guidance = guidance if guidance is not None else GuidanceSchedule()
    if num_tokens < 1:
        raise ValueError(f"num_tokens must be >= 1, got {num_tokens}")
    if window < 1:
        raise ValueError(f"window must be >= 1, got {window}")
    if coupling not in COUPLINGS:
        raise ValueError(f"coupling must be one of {COUPLINGS}, got {coupling!r}")
    batch, device = batch_size(cond), cond.prefix.device
    noise = row_noise(noise, generator, batch, device)
    settings = RowSettings.build(batch, num_tokens, sampling, guidance, device)
    prior = EngineBatch(model, cond, uncond, settings, noise, num_tokens=num_tokens,
                        compile=compile)  # fmt: skip
    stats = SpeculativeStats(rows=batch, num_tokens=num_tokens)

    out = torch.zeros(batch, num_tokens + window + 1, dtype=torch.long, device=device)
    p0 = prior.prefill()  # [B, V]
    vocab = p0.shape[-1]
    out[:, 0] = noise.sample(p0, positions_of(batch, 0, device))
    uniform = torch.full((batch, window, vocab), 1.0 / vocab, device=device)
    steps = torch.arange(window + 1, device=device)

    def draws(probs: Tensor, positions: Tensor, iteration: int) -> Tensor:
        """Guesses drawn from probs [B, K, V] at positions Long[B, K]."""
        stream = DRAW if coupling == "gumbel" else step_stream(iteration, DRAW)
        return noise.sample(probs, positions, stream)

    n = torch.ones(batch, dtype=torch.long, device=device)  # accepted tokens per row
    guess, q = draws(uniform, n[:, None] + steps[:window], 0), uniform  # [B, W], [B, W, V]
    drafted = torch.zeros((), dtype=torch.long, device=device)
    accepted_total = torch.zeros((), dtype=torch.long, device=device)
    iteration = 0
    while num_tokens > 1:
        active = n < num_tokens
        if not bool(active.any()):  # the one host sync of an iteration
            break
        iteration += 1
        w = min(window, num_tokens - 1)
        n_eff, limit, shift = round_layout(n, active, w, num_tokens)
        start = n_eff - 1 - shift  # rows near the end shift back and re-feed accepted tokens
        tokens = round_tokens(out, guess[:, :w], n_eff, start)  # [B, w+1]
        p = align(prior.decode(tokens, start), shift)  # [B, w+1, V] for positions n..n+w
        acc, nxt = verify(p, q[:, :w], guess[:, :w], noise, n_eff, limit=limit)
        # this pass's draws at positions n..n+w (the next guesses after the committed token)
        fresh = draws(p, n_eff[:, None] + steps[: w + 1], iteration)  # [B, w+1]
        n = torch.where(active, commit(out, n_eff, active, guess[:, :w], acc, nxt), n)
        # next window starts after the committed token: fresh draws for positions
        # n+acc+1..n+w (index acc+1..w of this pass), then guesses from uniform beyond
        beyond = draws(uniform, n_eff[:, None] + w + 1 + steps[:window], iteration)
        pool = torch.cat([fresh, beyond], dim=1)  # [B, w+1+W]
        pool_q = torch.cat([p, uniform], dim=1)  # [B, w+1+W, V]
        pick = acc[:, None] + 1 + steps[:window]  # [B, W], <= w+W
        guess = pool.gather(1, pick)
        q = pool_q.gather(1, pick[..., None].expand(-1, -1, vocab))
        drafted += limit.sum()
        accepted_total += acc.sum()
        stats.iterations += 1
        stats.draft_lengths.append(w)
    stats.drafted, stats.accepted = int(drafted), int(accepted_total)
    stats.target_calls = prior.calls
    return out[:, :num_tokens], stats

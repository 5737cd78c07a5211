"""Speculative decoding with a draft prior (Leviathan et al.; Chen et al.): exact, CFG, batched.

p = the target's guided, processed distribution; q = the draft's, guided the same way. Each
iteration the draft proposes gamma tokens, one target pass scores gamma + 1 positions, d_i is
accepted with probability min(1, p_i(d_i) / q_i(d_i)); the first rejection is replaced by a
sample from norm(max(0, p_i - q_i)); when all pass a bonus token comes from p_{gamma+1}.

Rows advance independently: row b has n_b accepted tokens, and both models keep the invariant
"cache valid for positions < n_b - 1, token n_b - 1 not fed yet", so rolling back after a
rejection is just decoding at an earlier per-row position (stale entries are masked/overwritten).
No model ever sees a position past the image (caches hold exactly N slots, as the RoPE tables
do): a row with fewer than g tokens left shifts its round back and re-feeds accepted tokens at
their own positions (which rewrites identical cache entries), and only its in-image drafts count.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch
from torch import Tensor

from sampling.autoregressive import batch_size, positions_of, row_noise
from sampling.draft_length import CallCosts
from sampling.engine import EngineBatch
from sampling.guidance import GuidanceSchedule
from sampling.logits import SamplingConfig
from sampling.noise import ACCEPT, DRAW, RESIDUAL, RowNoise
from sampling.relaxed import RelaxedAcceptance
from sampling.row_settings import RowSettings
from sampling.stats import SpeculativeStats

if TYPE_CHECKING:
    from prior.conditioning import Condition


def _residual(p: Tensor, q: Tensor) -> Tensor:
    """norm(max(0, p - q)) over the last axis; falls back to p where p <= q everywhere
    (rejection then had probability 0, so the fallback is never used in exact arithmetic)."""
    r = (p - q).clamp_min(0.0)
    total = r.sum(-1, keepdim=True)
    return torch.where(total > 0, r / total.clamp_min(torch.finfo(r.dtype).tiny), p)


def acceptance_uniforms(noise: RowNoise, positions: Tensor, drafts: Tensor) -> Tensor:
    """The uniforms of the accept tests of drafts [B, g] at positions Long[B, g]: their own
    stream, independent of the noise the drafts were drawn with (exactness needs that)."""
    return noise.uniform(positions, ACCEPT)[..., 0]  # [B, g]


def verify(
    p: Tensor,
    q: Tensor,
    drafts: Tensor,
    noise: RowNoise,
    start: Tensor,
    relaxed: RelaxedAcceptance | None = None,
    limit: Tensor | None = None,
) -> tuple[Tensor, Tensor]:
    """Accept drafts left to right; returns (accepted count Long[B], next token Long[B]).

    p [B, g+1, V] target distributions at the g draft positions and one past them, q [B, g, V]
    the distributions the drafts [B, g] were drawn from; start Long[B]: position of the first
    draft. The next token is the rejection resample at position `accepted`, or the bonus token
    from p[:, g] when all g pass. Accept uniforms and resamples use the rows' ACCEPT and
    RESIDUAL streams at the positions they decide, so each is used once; the bonus draws with
    DRAW at its position, which no decision has read (drafts there, if any, were discarded).
    With `relaxed`, p at draft positions becomes LANTERN's p~ for the drafted token.
    limit Long[B]: only the first limit[b] drafts of row b may be accepted (the rest lie past
    the end of the sequence; the "next" token then lies past it too and is discarded).
    """
    batch, g = drafts.shape
    p_draft = p[:, :g] if relaxed is None else relaxed.relax(p[:, :g], drafts)  # [B, g, V]
    p_d = p_draft.gather(-1, drafts[..., None])[..., 0]  # [B, g]
    q_d = q.gather(-1, drafts[..., None])[..., 0]
    positions = start[:, None] + torch.arange(g, device=p.device)  # [B, g]
    u = acceptance_uniforms(noise, positions, drafts)
    ok = u * q_d < p_d  # u < min(1, p/q) without dividing
    if limit is not None:
        ok &= torch.arange(g, device=p.device) < limit[:, None]
    accepted = ok.long().cumprod(-1).sum(-1)  # [B] leading run of acceptances
    rows = torch.arange(batch, device=p.device)
    p_all = torch.cat([p_draft, p[:, g:]], dim=1)  # [B, g+1, V]
    q_all = torch.cat([q, torch.zeros_like(q[:, :1])], dim=1)  # q = 0 at the bonus slot
    residual = _residual(p_all[rows, accepted], q_all[rows, accepted])  # [B, V]
    # a bonus token is a plain draw from p: the DRAW stream, as an AR step would draw it
    where = start + accepted
    drawn = noise.sample(residual, where, DRAW)
    return accepted, torch.where(accepted == g, drawn, noise.sample(residual, where, RESIDUAL))


def round_layout(
    n: Tensor, active: Tensor, g: int, num_tokens: int
) -> tuple[Tensor, Tensor, Tensor]:
    """Per-row layout of a round scoring g proposals (g <= num_tokens - 1).

    Returns (n_eff, limit, shift): finished rows act as n_b = N; row b proposes for positions
    n_b.. but only limit_b = min(g, N - n_b) of them lie in the image; its g + 1 input tokens
    start at position n_b - 1 - shift_b with shift_b = g - limit_b >= 0.
    """
    n_eff = torch.where(active, n, num_tokens)
    limit = (num_tokens - n_eff).clamp(max=g)
    return n_eff, limit, g - limit


def round_tokens(out: Tensor, proposals: Tensor, n: Tensor, start: Tensor) -> Tensor:
    """Tokens at positions start_b .. start_b + g: accepted ones from out (positions < n_b),
    proposals from position n_b on. out [B, >= N], proposals [B, g] -> [B, g + 1]."""
    g = proposals.shape[1]
    pos = start[:, None] + torch.arange(g + 1, device=out.device)  # [B, g+1]
    k = pos - n[:, None]  # proposal index where >= 0
    from_proposals = proposals.gather(1, k.clamp(0, max(g - 1, 0)))
    return torch.where(k >= 0, from_proposals, out.gather(1, pos))


def align(p: Tensor, shift: Tensor) -> Tensor:
    """Distributions of a shifted round [B, g+1, V] -> those for positions n_b .. n_b + g
    (entries past the shifted end repeat the last one; they lie beyond the image)."""
    g1, vocab = p.shape[1], p.shape[2]
    index = (torch.arange(g1, device=p.device) + shift[:, None]).clamp(max=g1 - 1)  # [B, g+1]
    return p.gather(1, index[..., None].expand(-1, -1, vocab))


def commit(
    out: Tensor, n: Tensor, active: Tensor, proposed: Tensor, accepted: Tensor, nxt: Tensor
) -> Tensor:
    """Write accepted proposals [B, g] and the next token at out[b, n_b:] (out needs g + 1
    free columns past N); returns n + accepted + 1. Inactive rows' out is left untouched."""
    g = proposed.shape[1]
    new = torch.cat([proposed, torch.zeros_like(proposed[:, :1])], dim=1)  # [B, g+1]
    new.scatter_(1, accepted[:, None], nxt[:, None])
    steps = torch.arange(g + 1, device=out.device)
    index = n[:, None] + steps  # [B, g+1]
    keep = active[:, None] & (steps <= accepted[:, None])
    out.scatter_(1, index, torch.where(keep, new, out.gather(1, index)))
    return n + accepted + 1


@torch.no_grad()
def generate_speculative(
    target: torch.nn.Module,
    draft: torch.nn.Module,
    target_cond: Condition,
    draft_cond: Condition,
    num_tokens: int,
    target_uncond: Condition | None = None,
    draft_uncond: Condition | None = None,
    draft_len: int = 4,
    adaptive: bool | str = False,
    max_draft_len: int | None = None,
    sampling: SamplingConfig | None = None,
    guidance: GuidanceSchedule | None = None,
    generator: torch.Generator | None = None,
    relaxed: RelaxedAcceptance | None = None,
    *,
    noise: RowNoise | None = None,
    compile: bool | str = False,
) -> tuple[Tensor, SpeculativeStats]:
    """Sample codes Long[B, N] from the target with draft proposals; exact unless `relaxed`.

    Target and draft run on decode engines (compiled with compile=True); drafts draw with the
    rows' DRAW noise at their positions, so a draft equal to the target proposes exactly the
    tokens plain AR would draw, and the codes do not depend on the batch.

    adaptive: gamma starts at draft_len and, from the mean accepted run m of the running rows,
    grows by 1 (up to max_draft_len, default 2 * draft_len) when m >= gamma - 0.5 (with one row:
    everything accepted) and shrinks by 1 (down to 1) when m < gamma / 2 (early rejection).
    adaptive="cost": gamma (1 .. max_draft_len, default max(8, 2 * draft_len)) maximises
    expected tokens per second from the measured draft and target call times and the running
    acceptance rate (sampling.draft_length). Any choice made from past rounds keeps the output
    exact; a timing-based one makes the exact sample of a seed vary between runs.
    """
    sampling = sampling if sampling is not None else SamplingConfig()
    guidance = guidance if guidance is not None else GuidanceSchedule()
    if num_tokens < 1:
        raise ValueError(f"num_tokens must be >= 1, got {num_tokens}")
    if draft_len < 1:
        raise ValueError(f"draft_len must be >= 1, got {draft_len}")
    if adaptive not in (False, True, "cost"):
        raise ValueError(f"adaptive must be False, True or 'cost', got {adaptive!r}")
    gmax = draft_len
    if adaptive:
        default_max = max(8, 2 * draft_len) if adaptive == "cost" else 2 * draft_len
        gmax = max_draft_len if max_draft_len is not None else default_max
        if gmax < draft_len:
            raise ValueError(f"max_draft_len ({gmax}) must be >= draft_len ({draft_len})")
    if draft is target:
        raise ValueError("draft and target must be different modules: each needs its own cache")
    batch, device = batch_size(target_cond), target_cond.prefix.device
    if batch_size(draft_cond) != batch:
        raise ValueError(f"draft batch {batch_size(draft_cond)} != target batch {batch}")
    noise = row_noise(noise, generator, batch, device)
    settings = RowSettings.build(batch, num_tokens, sampling, guidance, device)
    tgt = EngineBatch(target, target_cond, target_uncond, settings, noise,
                      num_tokens=num_tokens, compile=compile)  # fmt: skip
    drf = EngineBatch(draft, draft_cond, draft_uncond, settings, noise,
                      num_tokens=num_tokens, compile=compile)  # fmt: skip
    stats = SpeculativeStats(rows=batch, num_tokens=num_tokens)
    costs = CallCosts() if adaptive == "cost" else None

    def call(kind: str, engine: EngineBatch, tokens: Tensor, start: Tensor) -> Tensor:
        """engine.decode, timed into `costs` when the draft length follows measured costs."""
        if costs is None:
            return engine.decode(tokens, start)
        return costs.timed(kind, device, engine.decode, tokens, start)

    out = torch.zeros(batch, num_tokens + gmax + 1, dtype=torch.long, device=device)
    out[:, 0] = noise.sample(tgt.prefill(), positions_of(batch, 0, device))
    drf.prefill()
    n = torch.ones(batch, dtype=torch.long, device=device)  # accepted tokens per row
    drafted = torch.zeros((), dtype=torch.long, device=device)
    accepted_total = torch.zeros((), dtype=torch.long, device=device)
    gamma, first = draft_len, True
    while num_tokens > 1:
        active = n < num_tokens
        if not bool(active.any()):  # the one host sync of a round
            break
        g = min(gamma, num_tokens - 1)
        n_eff, limit, shift = round_layout(n, active, g, num_tokens)
        # draft: feed the last accepted token(s); after the first round feed two, because a
        # fully accepted round leaves the draft one token behind (its last draft was never fed)
        if first:
            q_next = call("draft", drf, out[:, :1], torch.zeros_like(n))[:, 0]
        else:
            last_two = out.gather(1, torch.stack([n_eff - 2, n_eff - 1], dim=1))  # [B, 2]
            q_next = call("draft", drf, last_two, n_eff - 2)[:, -1]  # [B, V]
        qs, ds = [q_next], [noise.sample(q_next, n_eff, DRAW)]
        for j in range(1, g):
            # feed draft j-1 at its position; rows out of room re-feed their token at N - 1
            pos = (n_eff - 1 + j).clamp(max=num_tokens - 1)
            token = round_tokens(out, torch.stack(ds, dim=1), n_eff, pos)[:, 0]
            q_next = call("draft", drf, token[:, None], pos)[:, 0]
            qs.append(q_next)
            ds.append(noise.sample(q_next, n_eff + j, DRAW))
        q, d = torch.stack(qs, dim=1), torch.stack(ds, dim=1)  # [B, g, V], [B, g]
        # verify: one target pass over [x_{n-1}, d_n .. d_{n+g-1}] (shifted back near the end)
        start = n_eff - 1 - shift
        fed = round_tokens(out, d, n_eff, start)  # [B, g+1]
        p = align(call("target", tgt, fed, start), shift)  # [B, g+1, V]
        acc, nxt = verify(p, q, d, noise, n_eff, relaxed, limit)
        n = torch.where(active, commit(out, n_eff, active, d, acc, nxt), n)
        drafted += limit.sum()
        accepted_total += acc.sum()
        stats.iterations += 1
        stats.draft_lengths.append(g)
        first = False
        if costs is not None:
            costs.observe_acceptance(float(acc[active].sum()) / max(1, int(limit[active].sum())))
            gamma = costs.choose(gamma, gmax)
        elif adaptive:
            run = float(acc[active].float().mean())  # mean accepted run of running rows
            if run >= g - 0.5:
                gamma = min(gamma + 1, gmax)
            elif run < g / 2:
                gamma = max(gamma - 1, 1)
    stats.drafted, stats.accepted = int(drafted), int(accepted_total)
    stats.target_calls, stats.draft_calls = tgt.calls, drf.calls
    return out[:, :num_tokens], stats

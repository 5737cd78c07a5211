"""Speculative decoding (exact and LANTERN-relaxed) against plain AR, with stub priors."""

import json

import pytest
import torch
from stub_models import (
    StubConfig,
    StubGPT,
    exactness_pvalue,
    perturbed_copy,
    sequence_probabilities,
    tiny_prior,
)

import sampling.speculative as speculative
from sampling.autoregressive import generate_ar
from sampling.draft_length import CallCosts
from sampling.guidance import GuidanceSchedule, guide
from sampling.logits import SamplingConfig
from sampling.noise import RowNoise
from sampling.relaxed import RelaxedAcceptance, neighbours
from sampling.speculative import generate_speculative, verify

GREEDY = SamplingConfig(temperature=0.0)


def gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def pair(vocab: int = 4, noise: float = 0.6, seed: int = 0):
    target = StubGPT(StubConfig(vocab_size=vocab, seed=seed))
    return target, target.perturbed(noise, seed=seed + 100)


def conds(model, labels):
    labels = torch.as_tensor(labels)
    return model.condition(labels), model.null_condition(len(labels))


def run_spec(target, draft, labels, n, **kwargs):
    tc, tu = conds(target, labels)
    dc, du = conds(draft, labels)
    return generate_speculative(
        target, draft, tc, dc, n, target_uncond=tu, draft_uncond=du, **kwargs
    )


@pytest.mark.parametrize(
    ("gamma", "scale", "adaptive"),
    [(1, 1.0, False), (3, 1.0, False), (5, 3.0, False), (2, 2.0, True), (4, 1.5, False),
     (2, 2.0, "cost")],
)  # fmt: skip
def test_greedy_speculative_equals_greedy_ar(gamma, scale, adaptive):
    target, draft = pair(vocab=8, noise=0.8)
    labels = [0, 1, 2, 0, 1, 2]
    guidance = GuidanceSchedule(scale)
    codes, stats = run_spec(
        target,
        draft,
        labels,
        21,
        draft_len=gamma,
        adaptive=adaptive,
        sampling=GREEDY,
        guidance=guidance,
        generator=gen(0),
    )
    tc, tu = conds(target, labels)
    ar = generate_ar(target, tc, tu, 21, GREEDY, guidance)
    assert torch.equal(codes, ar)
    assert 0.0 < stats.acceptance_rate < 1.0  # rows diverge: some accepted, some rejected
    assert stats.target_calls < 21 and stats.tokens_per_target_call > 1.0


def test_draft_equal_to_target_accepts_everything():
    target = StubGPT(StubConfig(vocab_size=6, seed=1))
    draft = target.perturbed(0.0, seed=0)  # an identical copy with its own cache
    codes, stats = run_spec(
        target,
        draft,
        [0, 1, 2, 1],
        13,
        draft_len=3,
        guidance=GuidanceSchedule(2.0),
        generator=gen(3),
    )
    assert stats.acceptance_rate == 1.0
    assert stats.target_calls == 1 + 12 // 4  # prefill + rounds of gamma + 1 tokens
    assert stats.draft_calls == 1 + 3 * 3
    assert codes.shape == (4, 13)
    summary = json.loads(json.dumps(stats.as_dict()))
    assert summary["tokens_per_target_call"] == 13 / 4 and summary["acceptance_rate"] == 1.0


def exact_probs(target, sampling, guidance, length=3, label=0):
    guided = guidance.needs_unconditional(length)

    def fn(c, u, i):
        scale = guidance.scale_at(i, length)
        logits = guide(c, u, scale, guidance.plausibility) if guided else c
        return sampling.probabilities(logits)

    return sequence_probabilities(target, label, length, fn, guided)[1]


CASES = [  # sampling, guidance, draft_len, adaptive, draft noise, length
    (SamplingConfig(), GuidanceSchedule(1.0), 2, False, 0.6, 3),
    (SamplingConfig(temperature=0.9, top_k=3), GuidanceSchedule(2.5), 2, False, 0.6, 3),
    (SamplingConfig(), GuidanceSchedule(2.0, kind="linear"), 1, True, 0.15, 4),
    (SamplingConfig(top_p=0.95), GuidanceSchedule(1.5), 3, False, 0.3, 4),  # rows shift back
    (SamplingConfig(), GuidanceSchedule(3.0, plausibility=0.3), 2, False, 0.15, 3),  # cutoff
]


@pytest.mark.parametrize(("sampling", "guidance", "gamma", "adaptive", "noise", "length"), CASES)
def test_speculative_is_exact(sampling, guidance, gamma, adaptive, noise, length):
    target, draft = pair(noise=noise)
    codes, stats = run_spec(
        target,
        draft,
        [0] * 100_000,
        length,
        draft_len=gamma,
        adaptive=adaptive,
        sampling=sampling,
        guidance=guidance,
        generator=gen(11),
    )
    assert 0.3 < stats.acceptance_rate < 0.95  # a real mix of acceptances and rejections
    if adaptive:
        assert max(stats.draft_lengths) > gamma  # the draft length really changed
    exact = exact_probs(target, sampling, guidance, length)
    assert exactness_pvalue(codes, exact, 4) > 1e-3


def test_draft_length_from_call_costs_is_exact(monkeypatch):
    """adaptive="cost" with fixed fake call costs (draft 0.1, target 1.0): the length follows the
    measured acceptance (here it leaves its start of 1) and the samples stay exact."""

    def timed(self, kind, device, call, *args):
        self._fold(kind, {"draft": 0.1, "target": 1.0}[kind])
        return call(*args)

    monkeypatch.setattr(CallCosts, "timed", timed)
    sampling, guidance = SamplingConfig(), GuidanceSchedule(2.0)
    target, draft = pair(noise=0.15)
    codes, stats = run_spec(target, draft, [0] * 100_000, 4, draft_len=1, adaptive="cost",
                            sampling=sampling, guidance=guidance, generator=gen(5))  # fmt: skip
    assert len(set(stats.draft_lengths)) > 1
    assert exactness_pvalue(codes, exact_probs(target, sampling, guidance, 4), 4) > 1e-3


@pytest.mark.parametrize("scale", [1.0, 2.5])
def test_negative_control_wrong_residual_fails(monkeypatch, scale):
    monkeypatch.setattr(speculative, "_residual", lambda p, q: p)
    target, draft = pair()
    guidance = GuidanceSchedule(scale)
    codes, _ = run_spec(
        target, draft, [0] * 30_000, 3, draft_len=2, guidance=guidance, generator=gen(11)
    )
    assert exactness_pvalue(codes, exact_probs(target, SamplingConfig(), guidance), 4) < 1e-8


def test_scale_one_never_runs_unconditional():
    target, draft = pair(vocab=6)
    a, _ = run_spec(target, draft, [0, 1, 2], 10, generator=gen(4))
    assert target.batch_sizes == {3} and draft.batch_sizes == {3}
    tc, dc = target.condition(torch.tensor([0, 1, 2])), draft.condition(torch.tensor([0, 1, 2]))
    b, _ = generate_speculative(target, draft, tc, dc, 10, generator=gen(4))
    assert torch.equal(a, b)


def test_overshoot_and_short_sequences_stay_in_cache():
    target, draft = pair(vocab=5)
    for n in (1, 2, 3, 5):
        codes, stats = run_spec(
            target,
            draft,
            [0, 1, 2, 0, 1],
            n,
            draft_len=4,
            guidance=GuidanceSchedule(2.0),
            generator=gen(n),
        )
        assert codes.shape == (5, n) and stats.target_calls <= n


def test_bad_arguments():
    target, draft = pair()
    with pytest.raises(ValueError, match="draft_len"):
        run_spec(target, draft, [0], 4, draft_len=0)
    with pytest.raises(ValueError, match="max_draft_len"):
        run_spec(target, draft, [0], 4, draft_len=4, adaptive=True, max_draft_len=2)
    with pytest.raises(ValueError, match="adaptive"):
        run_spec(target, draft, [0], 4, adaptive="fast")


def test_verify_deterministic_cases():
    one_hot = torch.eye(3)
    # p == q: everything accepted, bonus from p[:, g]
    p = torch.stack([one_hot[0], one_hot[1], one_hot[2]])[None]  # [1, 3, 3]
    noise, start = RowNoise.from_seeds([0]), torch.tensor([1])
    acc, nxt = verify(p, p[:, :2], torch.tensor([[0, 1]]), noise, start)
    assert acc.item() == 2 and nxt.item() == 2
    # target puts no mass on the second draft: rejected there, resampled from p - q
    q = torch.stack([one_hot[0], one_hot[2]])[None]
    acc, nxt = verify(p, q, torch.tensor([[0, 2]]), noise, start)
    assert acc.item() == 1 and nxt.item() == 1


# ---------------------------------------------------------------- relaxed acceptance (LANTERN)


def test_neighbours_l2_and_cosine():
    line = torch.tensor([[0.0], [1.0], [3.0], [10.0]])
    assert neighbours(line, 2, "l2").tolist() == [[1, 2], [0, 2], [1, 0], [2, 1]]
    angles = torch.tensor([0.0, 0.1, 1.0, 3.0])
    circle = torch.stack([angles.cos(), angles.sin()], dim=1) * torch.tensor(
        [[1.0], [5.0], [1.0], [2.0]]
    )
    assert neighbours(circle, 1, "cosine")[:, 0].tolist() == [1, 0, 1, 2]
    same = torch.zeros(3, 2)  # identical codes: self is excluded by index
    table = neighbours(same + torch.tensor([[1.0, 0.0]]), 2, "l2", chunk=2)
    assert all(i not in row for i, row in enumerate(table.tolist()))
    with pytest.raises(ValueError, match="metric"):
        neighbours(line, 1, "manhattan")
    with pytest.raises(ValueError, match="k must"):
        neighbours(line, 4)


def test_relaxed_distribution_respects_bounds():
    g = gen(0)
    p = torch.randn(64, 3, 12, generator=g).mul(2).softmax(-1)
    drafts = torch.randint(12, (64, 3), generator=g)
    table = neighbours(torch.randn(12, 4, generator=g), 5)
    px = p.gather(-1, drafts[..., None])[..., 0]
    previous = px
    for delta in (0.0, 0.05, 0.2, 1.0):
        relaxed = RelaxedAcceptance(table, delta).relax(p, drafts)
        rx = relaxed.gather(-1, drafts[..., None])[..., 0]
        assert (relaxed >= 0).all()
        torch.testing.assert_close(relaxed.sum(-1), torch.ones(64, 3))
        assert (rx >= px).all() and (rx <= px + delta + 1e-6).all()
        assert (rx >= previous).all()  # monotone in delta
        previous = rx
    lam = RelaxedAcceptance(table, lam=2.0).relax(p, drafts).gather(-1, drafts[..., None])[..., 0]
    assert (lam <= 2.0 * px + 1e-6).all()
    exact = RelaxedAcceptance(table, 0.0).relax(p, drafts)
    assert torch.equal(exact, p.scatter(-1, table[drafts], p.gather(-1, table[drafts])))


@pytest.mark.parametrize(("k", "delta"), [(0, 0.3), (3, 0.0)])
def test_relaxed_with_no_budget_is_plain_speculative(k, delta):
    target, draft = pair(vocab=6)
    table = neighbours(torch.randn(6, 3, generator=gen(1)), k)
    kwargs = dict(draft_len=3, guidance=GuidanceSchedule(2.0), sampling=SamplingConfig(top_k=5))
    plain, s1 = run_spec(target, draft, [0, 1, 2] * 50, 12, generator=gen(7), **kwargs)
    relaxed, s2 = run_spec(
        target,
        draft,
        [0, 1, 2] * 50,
        12,
        generator=gen(7),
        relaxed=RelaxedAcceptance(table, delta),
        **kwargs,
    )
    assert torch.equal(plain, relaxed) and s1 == s2


def test_relaxed_acceptance_rises_with_k_and_delta():
    target, draft = pair(vocab=16, noise=0.8, seed=5)
    codebook = torch.randn(16, 4, generator=gen(2))
    rates = {}
    for k, delta in [(0, 0.3), (2, 0.3), (8, 0.0), (8, 0.1), (8, 0.3)]:
        relaxed = RelaxedAcceptance.from_codebook(codebook, k, delta)
        _, stats = run_spec(
            target, draft, [0, 1] * 1000, 8, draft_len=3, generator=gen(1), relaxed=relaxed
        )
        rates[k, delta] = stats.acceptance_rate
    assert rates[0, 0.3] < rates[2, 0.3] < rates[8, 0.3]
    assert rates[8, 0.0] == rates[0, 0.3]  # no budget or no neighbours: plain speculative
    assert rates[8, 0.0] < rates[8, 0.1] < rates[8, 0.3]


# ---------------------------------------------------------------- tiny real GPT


@pytest.mark.parametrize(("rope", "scale", "gamma"), [("2d", 2.0, 3), ("1d", 1.0, 5)])
def test_real_gpt_greedy_speculative_equals_greedy_ar(rope, scale, gamma):
    target = tiny_prior("gpt", rope=rope, seed=0)
    draft = perturbed_copy(target, 0.3, seed=1)
    labels = [0, 1, 2, 0, 1]
    guidance = GuidanceSchedule(scale)
    with torch.no_grad():
        codes, stats = run_spec(
            target, draft, labels, 12, draft_len=gamma, sampling=GREEDY, guidance=guidance
        )
        tc, tu = conds(target, labels)
        assert torch.equal(codes, generate_ar(target, tc, tu, 12, GREEDY, guidance))
    assert 0.0 < stats.acceptance_rate < 1.0  # real accepts and real rejections


def test_real_gpt_sampled_speculative_runs_and_identical_draft_accepts_all():
    target = tiny_prior("gpt", seed=0, sharpen=5.0)
    with torch.no_grad():
        codes, stats = run_spec(
            target,
            perturbed_copy(target, 0.0, seed=0),
            [0, 1, 2],
            12,
            draft_len=4,
            guidance=GuidanceSchedule(2.0),
            generator=gen(0),
        )
    assert codes.shape == (3, 12) and ((codes >= 0) & (codes < 8)).all()
    assert stats.acceptance_rate > 0.99  # p and q agree up to float noise of different T


def test_draft_must_not_share_the_target_cache():
    target = StubGPT(StubConfig())
    with pytest.raises(ValueError, match="different modules"):
        run_spec(target, target, [0], 4)

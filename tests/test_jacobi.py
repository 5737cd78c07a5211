"""Speculative Jacobi decoding: greedy equals AR, samples follow the exact distribution."""

import pytest
import torch
from stub_models import (
    StubConfig,
    StubGPT,
    exactness_pvalue,
    sequence_probabilities,
    tiny_prior,
)

import sampling.speculative as speculative
from sampling.autoregressive import generate_ar
from sampling.guidance import GuidanceSchedule, guide
from sampling.jacobi import generate_jacobi
from sampling.logits import SamplingConfig
from sampling.noise import DRAW


def gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def conds(model, labels):
    labels = torch.as_tensor(labels)
    return model.condition(labels), model.null_condition(len(labels))


@pytest.mark.parametrize(("window", "scale"), [(1, 1.0), (3, 2.0), (6, 1.0), (30, 3.0)])
def test_greedy_jacobi_equals_greedy_ar(window, scale):
    model = StubGPT(StubConfig(vocab_size=5, seed=2, gain=3.0))
    cond, uncond = conds(model, [0, 1, 2, 2, 1])
    greedy, guidance = SamplingConfig(temperature=0.0), GuidanceSchedule(scale)
    codes, stats = generate_jacobi(model, cond, uncond, 20, window, greedy, guidance, gen(0))
    assert torch.equal(codes, generate_ar(model, cond, uncond, 20, greedy, guidance))
    assert stats.target_calls <= 20 and stats.draft_calls == 0


def exact_probs(model, sampling, guidance, length=3):
    guided = guidance.needs_unconditional(length)

    def fn(c, u, i):
        scale = guidance.scale_at(i, length)
        return sampling.probabilities(guide(c, u, scale, guidance.plausibility) if guided else c)

    return sequence_probabilities(model, 0, length, fn, guided)[1]


@pytest.mark.parametrize(
    ("sampling", "guidance", "window", "coupling"),
    [
        (SamplingConfig(), GuidanceSchedule(1.0), 2, "gumbel"),
        (SamplingConfig(temperature=1.5, top_k=3), GuidanceSchedule(2.0), 3, "gumbel"),
        (SamplingConfig(), GuidanceSchedule(2.5, plausibility=0.3), 2, "gumbel"),
        (SamplingConfig(), GuidanceSchedule(2.0), 3, "independent"),
    ],
)
def test_jacobi_is_exact(sampling, guidance, window, coupling):
    model = StubGPT(StubConfig(vocab_size=4, seed=4, gain=1.0))
    cond, uncond = conds(model, [0] * 100_000)
    codes, stats = generate_jacobi(
        model, cond, uncond, 3, window, sampling, guidance, gen(5), coupling=coupling
    )
    assert 0.2 < stats.acceptance_rate < 0.95
    assert exactness_pvalue(codes, exact_probs(model, sampling, guidance), 4) > 1e-3


@torch.no_grad()
def test_mc_sjd_coupling_needs_fewer_calls_than_independent_drafts():
    """On a (tiny, real) GPT, coupled drafts stop flickering: more tokens per target call."""
    model = tiny_prior("gpt", vocab=16, grid=(4, 4), sharpen=3.0)
    cond, uncond = conds(model, [0, 1, 2] * 100)
    rate = {
        coupling: generate_jacobi(model, cond, uncond, 16, 8, generator=gen(0),
                                  coupling=coupling)[1].tokens_per_target_call
        for coupling in ("gumbel", "independent")
    }  # fmt: skip
    assert rate["gumbel"] > 1.2 * rate["independent"]


def test_negative_control_accept_test_reusing_the_draft_noise_fails(monkeypatch):
    """MC-SJD's trap: only the draft noise may be shared; an accept test that reads the noise
    the draft was drawn with (here: the winning uniform of its race) breaks exactness."""

    def reused(noise, positions, drafts):
        u = noise.uniform(positions, DRAW, 4)  # the draft's own race noise [B, g, V]
        return u.gather(-1, drafts[..., None])[..., 0]

    monkeypatch.setattr(speculative, "acceptance_uniforms", reused)
    model = StubGPT(StubConfig(vocab_size=4, seed=4, gain=1.0))
    cond, uncond = conds(model, [0] * 30_000)
    guidance = GuidanceSchedule(2.0)
    codes, _ = generate_jacobi(model, cond, uncond, 3, 2, SamplingConfig(), guidance, gen(5))
    assert exactness_pvalue(codes, exact_probs(model, SamplingConfig(), guidance), 4) < 1e-8


def test_negative_control_wrong_residual_fails(monkeypatch):
    monkeypatch.setattr(speculative, "_residual", lambda p, q: p)
    model = StubGPT(StubConfig(vocab_size=4, seed=4, gain=1.0))
    cond, uncond = conds(model, [0] * 30_000)
    guidance = GuidanceSchedule(2.0)
    codes, _ = generate_jacobi(model, cond, uncond, 3, 2, SamplingConfig(), guidance, gen(5))
    assert exactness_pvalue(codes, exact_probs(model, SamplingConfig(), guidance), 4) < 1e-8


def test_scale_one_never_runs_unconditional():
    model = StubGPT(StubConfig(vocab_size=6, seed=1))
    cond, uncond = conds(model, [0, 1, 2])
    a, _ = generate_jacobi(model, cond, uncond, 9, 4, generator=gen(3))
    assert model.batch_sizes == {3}
    b, _ = generate_jacobi(model, cond, None, 9, 4, generator=gen(3))
    assert torch.equal(a, b)


def test_short_sequences_and_bad_window():
    model = StubGPT(StubConfig(vocab_size=6, seed=1))
    cond, uncond = conds(model, [0, 1])
    for n in (1, 2, 4):
        codes, stats = generate_jacobi(
            model, cond, uncond, n, 3, guidance=GuidanceSchedule(2.0), generator=gen(n)
        )
        assert codes.shape == (2, n) and stats.target_calls <= n
    with pytest.raises(ValueError, match="window"):
        generate_jacobi(model, cond, uncond, 4, 0)


def test_real_gpt_greedy_jacobi_equals_greedy_ar():
    model = tiny_prior("gpt", seed=3)
    cond, uncond = conds(model, [0, 1, 2])
    greedy, guidance = SamplingConfig(temperature=0.0), GuidanceSchedule(2.0)
    with torch.no_grad():
        codes, stats = generate_jacobi(model, cond, uncond, 12, 4, greedy, guidance, gen(0))
        assert torch.equal(codes, generate_ar(model, cond, uncond, 12, greedy, guidance))
        sampled, _ = generate_jacobi(
            model, cond, uncond, 12, 4, guidance=guidance, generator=gen(1)
        )
    assert stats.target_calls <= 12
    assert sampled.shape == (3, 12) and ((sampled >= 0) & (sampled < 8)).all()

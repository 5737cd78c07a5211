"""CFG schedules and the guided AR / RQ decoders on the KV cache (stub priors)."""

import math

import pytest
import torch
from stub_models import (
    StubConfig,
    StubGPT,
    StubRQ,
    exactness_pvalue,
    sequence_probabilities,
    tiny_prior,
)

from sampling.autoregressive import generate_ar, generate_rq
from sampling.guidance import GuidanceSchedule, guide, guide_batch
from sampling.logits import SamplingConfig, probabilities
from sampling.noise import RowNoise


def gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def test_schedule_values():
    n = 11
    const = GuidanceSchedule(3.0)
    assert [const.scale_at(i, n) for i in (0, 5, 10)] == [3.0, 3.0, 3.0]
    lin = GuidanceSchedule(3.0, kind="linear")
    assert lin.scale_at(0, n) == 0.0 and lin.scale_at(10, n) == 3.0
    assert lin.scale_at(5, n) == pytest.approx(1.5)
    cos = GuidanceSchedule(4.0, kind="cosine")
    assert cos.scale_at(0, n) == 0.0 and cos.scale_at(10, n) == pytest.approx(4.0)
    assert cos.scale_at(5, n) == pytest.approx(2.0)
    assert cos.scale_at(2, n) == pytest.approx(4.0 * (1 - math.cos(math.pi * 0.2)) / 2)
    stop = GuidanceSchedule(3.0, stop_after=0.5)
    assert [stop.scale_at(i, 10) for i in (0, 4, 5, 9)] == [3.0, 3.0, 1.0, 1.0]


def test_schedule_table_and_unconditional_need():
    sched = GuidanceSchedule(2.0, kind="linear")
    table = sched.table(5, length=8)
    torch.testing.assert_close(table, torch.tensor([0.0, 0.5, 1.0, 1.5, 2.0, 2.0, 2.0, 2.0]))
    assert not GuidanceSchedule(1.0).needs_unconditional(16)
    assert not GuidanceSchedule(3.0, stop_after=0.0).needs_unconditional(16)
    assert GuidanceSchedule(1.0, kind="linear").needs_unconditional(16)  # ramps 0 -> 1
    assert GuidanceSchedule(1.5).needs_unconditional(1)


def test_schedule_validation():
    with pytest.raises(ValueError, match="kind"):
        GuidanceSchedule(2.0, kind="exponential")
    with pytest.raises(ValueError, match="stop_after"):
        GuidanceSchedule(2.0, stop_after=1.5)
    with pytest.raises(ValueError, match="position"):
        GuidanceSchedule(2.0).scale_at(4, 4)
    with pytest.raises(ValueError, match="plausibility must be in"):
        GuidanceSchedule(2.0, plausibility=1.5)


def test_guide_formula():
    c, u = torch.randn(3, 5), torch.randn(3, 5)
    torch.testing.assert_close(guide(c, u, 1.0), c)
    torch.testing.assert_close(guide(c, u, 0.0), u)
    torch.testing.assert_close(guide(c, u, 2.5), u + 2.5 * (c - u))
    torch.testing.assert_close(guide_batch(torch.cat([c, u]), 2.5), u + 2.5 * (c - u))
    with pytest.raises(ValueError, match="even"):
        guide_batch(torch.randn(3, 5), 2.0)


def test_plausibility_cutoff_removes_only_unlikely_conditional_tokens():
    """p_c < alpha * max p_c -> -inf where s != 1; everything else is the plain guided logit."""
    c = torch.tensor([[4.0, 3.0, 0.0, -8.0], [0.0, 0.0, 0.0, 0.0]])
    u = torch.tensor([[4.0, 3.5, -1.0, -20.0], [1.0, 0.0, -1.0, 0.0]])
    plain = guide(c, u, 3.0)
    assert plain[0].argmax() == 3  # the tail token CFG would promote: 3 * -8 - 2 * -20 = 16
    cut = guide(c, u, 3.0, plausibility=0.1)
    p = c.softmax(-1)
    drop = p < 0.1 * p.amax(-1, keepdim=True)
    assert drop.tolist() == [[False, False, True, True], [False] * 4]
    assert torch.isinf(cut[drop]).all() and (cut[drop] < 0).all()
    assert torch.equal(cut[~drop], plain[~drop])
    assert cut[0].argmax() == 0  # the conditional's own choice stays possible
    torch.testing.assert_close(guide(c, u, 1.0, plausibility=0.5), c)  # s = 1: no cutoff
    scales = torch.tensor([[3.0], [1.0]])  # per row: the cutoff only where s != 1
    per_row = guide(c, u, scales, plausibility=0.1)
    assert torch.equal(per_row[0], cut[0]) and torch.equal(per_row[1], c[1])
    assert torch.equal(guide_batch(torch.cat([c, u]), 3.0, 0.1), cut)


@pytest.fixture
def stub():
    return StubGPT(StubConfig(vocab_size=6, num_classes=3, seed=0))


def reference_ar(model, cond, uncond, n, sampling, guidance, generator):
    """Ancestral sampling by full recomputation (no cache) with the same random stream."""
    batch = cond.prefix.shape[0]
    codes = torch.zeros(batch, n, dtype=torch.long)
    noise = RowNoise.from_generator(batch, generator)  # the per-row seeds generate_ar draws
    all_probs = []
    for i in range(n):
        logits = model(codes, cond)[:, i]
        if uncond is not None:
            scale = guidance.scale_at(i, n)
            logits = guide(logits, model(codes, uncond)[:, i], scale, guidance.plausibility)
        probs = sampling.probabilities(logits)
        codes[:, i] = noise.sample(probs, torch.full((batch,), i))
        all_probs.append(probs)
    return codes, torch.stack(all_probs, dim=1)


@pytest.mark.parametrize(
    ("scale", "kind", "sampling", "alpha"),
    [
        (1.0, "constant", SamplingConfig(), 0.0),
        (3.0, "constant", SamplingConfig(temperature=0.8, top_k=4), 0.0),
        (2.0, "cosine", SamplingConfig(top_p=0.9), 0.0),
        (4.0, "linear", SamplingConfig(temperature=0.0), 0.0),
        (3.0, "cosine", SamplingConfig(), 0.2),
    ],
)
def test_cached_ar_equals_full_recomputation(stub, scale, kind, sampling, alpha):
    cond = stub.condition(torch.tensor([0, 1, 2, 1]))
    uncond = stub.null_condition(4)
    guidance = GuidanceSchedule(scale, kind=kind, plausibility=alpha)
    guided = guidance.needs_unconditional(12)
    codes, probs = generate_ar(
        stub, cond, uncond, 12, sampling, guidance, gen(5), return_probs=True
    )
    ref_codes, ref_probs = reference_ar(
        stub, cond, uncond if guided else None, 12, sampling, guidance, gen(5)
    )
    assert torch.equal(codes, ref_codes)
    torch.testing.assert_close(probs, ref_probs, atol=1e-5, rtol=1e-4)


def test_scale_one_skips_unconditional_pass(stub):
    cond = stub.condition(torch.tensor([0, 2, 1]))
    a = generate_ar(
        stub, cond, stub.null_condition(3), 10, guidance=GuidanceSchedule(1.0), generator=gen(1)
    )
    assert stub.batch_sizes == {3}
    b = generate_ar(stub, cond, None, 10, generator=gen(1))
    assert torch.equal(a, b)
    stub.reset_counters()
    generate_ar(
        stub, cond, stub.null_condition(3), 10, guidance=GuidanceSchedule(2.0), generator=gen(1)
    )
    assert stub.batch_sizes == {6}
    assert stub.prefill_calls == 1 and stub.decode_calls == 9


def test_guidance_without_uncond_is_an_error(stub):
    with pytest.raises(ValueError, match="uncond"):
        generate_ar(
            stub, stub.condition(torch.tensor([0])), None, 4, guidance=GuidanceSchedule(2.0)
        )


def test_ar_sampling_is_exact_with_cfg():
    model = StubGPT(StubConfig(vocab_size=4, seed=3))
    sampling, guidance = SamplingConfig(top_k=3), GuidanceSchedule(2.0)
    batch = 50_000
    codes = generate_ar(
        model,
        model.condition(torch.zeros(batch, dtype=torch.long)),
        model.null_condition(batch),
        3,
        sampling,
        guidance,
        gen(0),
    )

    def fn(c, u, i):
        return sampling.probabilities(guide(c, u, guidance.scale_at(i, 3)))

    _, exact = sequence_probabilities(model, 0, 3, fn, guided=True)
    assert exactness_pvalue(codes, exact, 4) > 1e-3


@pytest.fixture
def rq():
    return StubRQ(StubConfig(vocab_size=5, depth=3, seed=2))


@pytest.mark.parametrize("scale", [1.0, 2.5])
def test_rq_probs_match_teacher_forcing(rq, scale):
    cond, uncond = rq.condition(torch.tensor([0, 1, 2])), rq.null_condition(3)
    guidance = GuidanceSchedule(scale)
    codes, probs = generate_rq(
        rq, cond, uncond, 6, 3, SamplingConfig(top_k=4), guidance, gen(2), return_probs=True
    )
    assert codes.shape == (3, 6, 3) and probs.shape == (3, 6, 3, 5)
    logits = rq(codes, cond)  # [B, N, D, V]
    if scale != 1.0:
        logits = guide(logits, rq(codes, uncond), scale)
        assert rq.batch_sizes == {6}
    else:
        assert rq.batch_sizes == {3}
    torch.testing.assert_close(probs, probabilities(logits, top_k=4), atol=1e-5, rtol=1e-4)
    assert (probs.gather(-1, codes[..., None]) > 0).all()


def test_rq_scale_one_equals_conditional(rq):
    cond = rq.condition(torch.tensor([1, 1]))
    a = generate_rq(rq, cond, rq.null_condition(2), 5, 2, generator=gen(9))
    b = generate_rq(rq, cond, None, 5, 2, generator=gen(9))
    assert torch.equal(a, b)


@pytest.mark.parametrize("rope", ["1d", "2d"])
def test_real_gpt_cached_ar_probs_match_teacher_forcing(rope):
    model = tiny_prior("gpt", rope=rope, seed=1, sharpen=5.0)
    cond, uncond = model.condition(torch.tensor([0, 1, 2])), model.null_condition(3)
    guidance, sampling = GuidanceSchedule(2.0, kind="linear"), SamplingConfig(top_k=6)
    with torch.no_grad():
        codes, probs = generate_ar(
            model, cond, uncond, 12, sampling, guidance, gen(0), return_probs=True
        )
        logits = guide(model(codes, cond), model(codes, uncond), guidance.table(12)[:, None])
    torch.testing.assert_close(probs, sampling.probabilities(logits), atol=1e-4, rtol=1e-3)


def test_real_rq_probs_match_teacher_forcing():
    model = tiny_prior("rq", seed=2, sharpen=5.0, depth=3)
    cond, uncond = model.condition(torch.tensor([0, 2])), model.null_condition(2)
    with torch.no_grad():
        codes, probs = generate_rq(
            model,
            cond,
            uncond,
            12,
            3,
            guidance=GuidanceSchedule(2.0),
            generator=gen(0),
            return_probs=True,
        )
        logits = guide(model(codes, cond), model(codes, uncond), 2.0)
    assert codes.shape == (2, 12, 3)
    torch.testing.assert_close(probs, probabilities(logits), atol=1e-4, rtol=1e-3)


def test_compiled_decode_matches_eager(monkeypatch):
    """compile=True really goes through torch.compile (dynamo tracing of the GPT decode step,
    with the cheap "eager" backend here; inductor / CUDA graphs are for benchmarks)."""
    model = tiny_prior("gpt", seed=4, sharpen=5.0)
    real_compile, modes = torch.compile, []

    def eager_compile(fn, mode=None, dynamic=None, **options):
        modes.append(mode)
        return real_compile(fn, backend="eager", dynamic=dynamic)

    monkeypatch.setattr(torch, "compile", eager_compile)
    cond, uncond = model.condition(torch.tensor([0, 1])), model.null_condition(2)
    guidance = GuidanceSchedule(2.0)
    with torch.no_grad():
        eager = generate_ar(model, cond, uncond, 6, guidance=guidance, generator=gen(0))
        compiled = generate_ar(
            model,
            cond,
            uncond,
            6,
            guidance=guidance,
            generator=gen(0),
            compile=True,
            compile_mode="reduce-overhead",
        )
    torch._dynamo.reset()  # leave no compiled state behind for other tests
    assert torch.equal(eager, compiled) and modes == ["reduce-overhead"] * 2  # prefill, step

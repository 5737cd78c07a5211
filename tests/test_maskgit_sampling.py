"""MaskGIT decoding: reveal schedule, no surviving MASK, CFG schedule over steps."""

import pytest
import torch
from stub_models import (
    StubConfig,
    StubMaskGIT,
    tiny_prior,
)

from sampling.guidance import GuidanceSchedule, guide
from sampling.logits import SamplingConfig
from sampling.maskgit import generate_maskgit, reveal_schedule

VOCAB = 6


def gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


@pytest.fixture
def model():
    return StubMaskGIT(StubConfig(vocab_size=VOCAB, max_positions=256, seed=0))


def conds(model, labels):
    labels = torch.as_tensor(labels)
    return model.condition(labels), model.null_condition(len(labels))


def test_reveal_counts_for_256_tokens_in_8_steps(model):
    expected = [5, 15, 24, 31, 39, 45, 48, 49]
    assert reveal_schedule(256, 8) == expected
    cond, uncond = conds(model, [0, 1])
    codes, counts = generate_maskgit(model, cond, uncond, 256, 8, generator=gen(0))
    assert counts == expected
    assert codes.shape == (2, 256)
    assert ((codes >= 0) & (codes < VOCAB)).all()  # no MASK (id = VOCAB) survives


@pytest.mark.parametrize(("n", "steps"), [(1, 1), (5, 1), (4, 8), (16, 3), (10, 10)])
def test_every_token_revealed_exactly_once(model, n, steps):
    cond, uncond = conds(model, [0, 1, 2])
    codes, counts = generate_maskgit(model, cond, uncond, n, steps, generator=gen(1))
    assert sum(counts) == n and len(counts) == steps and min(counts) >= 0
    assert ((codes >= 0) & (codes < VOCAB)).all()


def test_revealed_tokens_never_change(model):
    seen = []
    original = model.forward

    def spy(codes, cond):
        seen.append(codes.clone())
        return original(codes, cond)

    model.forward = spy
    cond, uncond = conds(model, [0, 1, 2])
    codes, counts = generate_maskgit(model, cond, uncond, 32, 6, generator=gen(2))
    inputs = seen + [codes]
    for before, after in zip(inputs, inputs[1:]):
        known = before != VOCAB
        assert torch.equal(before[known], after[known])
        revealed = (after != VOCAB).sum(1) - known.sum(1)
        assert (revealed == revealed[0]).all()  # every row reveals the same count
    assert [int((b != VOCAB).sum(1)[0]) for b in inputs[1:]] == list(
        torch.tensor(counts).cumsum(0).tolist()
    )


def test_scale_one_skips_unconditional(model):
    cond, uncond = conds(model, [0, 2])
    a, _ = generate_maskgit(
        model, cond, uncond, 16, 4, guidance=GuidanceSchedule(1.0), generator=gen(3)
    )
    assert model.batch_sizes == {2}
    b, _ = generate_maskgit(model, cond, None, 16, 4, generator=gen(3))
    assert torch.equal(a, b)
    model.reset_counters()
    generate_maskgit(
        model, cond, uncond, 16, 4, guidance=GuidanceSchedule(2.0, kind="linear"), generator=gen(3)
    )
    assert model.batch_sizes == {4} and model.forward_calls == 4


def test_guidance_follows_the_step_schedule(model):
    """With one step and greedy sampling the output is the argmax of the guided logits."""
    cond, uncond = conds(model, [0, 1])
    greedy = SamplingConfig(temperature=0.0)
    mask = torch.full((2, 12), VOCAB)
    for sched, scale in [(GuidanceSchedule(3.0), 3.0), (GuidanceSchedule(3.0, kind="linear"), 3.0)]:
        codes, _ = generate_maskgit(model, cond, uncond, 12, 1, greedy, guidance=sched)
        expected = guide(model(mask, cond), model(mask, uncond), scale).argmax(-1)
        assert torch.equal(codes, expected)
    linear = GuidanceSchedule(3.0, kind="linear")
    assert [linear.scale_at(t, 4) for t in range(4)] == [0.0, 1.0, 2.0, 3.0]


def test_seeded_and_validated(model):
    cond, uncond = conds(model, [1, 1])
    a, _ = generate_maskgit(model, cond, uncond, 20, 5, generator=gen(4))
    b, _ = generate_maskgit(model, cond, uncond, 20, 5, generator=gen(4))
    assert torch.equal(a, b)
    with pytest.raises(ValueError, match="steps"):
        generate_maskgit(model, cond, uncond, 20, 0)
    with pytest.raises(ValueError, match="gumbel_temperature"):
        generate_maskgit(model, cond, uncond, 20, 4, gumbel_temperature=-1.0)


def test_real_maskgit():
    model = tiny_prior("maskgit", vocab=8, grid=(4, 4), seed=0, sharpen=5.0)
    cond, uncond = model.condition(torch.tensor([0, 1, 2])), model.null_condition(3)
    with torch.no_grad():
        codes, counts = generate_maskgit(
            model,
            cond,
            uncond,
            16,
            5,
            guidance=GuidanceSchedule(2.0, kind="cosine"),
            generator=gen(0),
        )
    assert counts == reveal_schedule(16, 5) and sum(counts) == 16
    assert codes.shape == (3, 16) and ((codes >= 0) & (codes < 8)).all()

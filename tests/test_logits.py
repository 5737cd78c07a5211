"""Temperature / top-k / top-p processing and seeded batched sampling."""

import pytest
import torch
from scipy.stats import chisquare

from sampling.logits import (
    SamplingConfig,
    check_generator,
    probabilities,
    process_logits,
    sample,
)


def test_temperature_scales_logits():
    logits = torch.randn(3, 7, generator=torch.Generator().manual_seed(0))
    for t in (0.5, 1.0, 2.0):
        torch.testing.assert_close(probabilities(logits, t), (logits / t).softmax(-1))


def test_temperature_zero_is_greedy_one_hot():
    logits = torch.randn(5, 9, generator=torch.Generator().manual_seed(1))
    probs = probabilities(logits, temperature=0.0)
    torch.testing.assert_close(probs, torch.nn.functional.one_hot(logits.argmax(-1), 9).float())
    for seed in range(5):
        drawn = sample(probs, torch.Generator().manual_seed(seed))
        assert torch.equal(drawn, logits.argmax(-1))


def test_top_k_keeps_exactly_the_k_largest():
    logits = torch.randn(4, 20, generator=torch.Generator().manual_seed(2))
    probs = probabilities(logits, 1.0, top_k=5)
    assert ((probs > 0).sum(-1) == 5).all()
    top = logits.topk(5, dim=-1).indices
    assert (probs.gather(-1, top) > 0).all()
    torch.testing.assert_close(probs.sum(-1), torch.ones(4))
    expected = torch.zeros_like(logits).scatter(-1, top, logits.gather(-1, top).softmax(-1))
    torch.testing.assert_close(probs, expected)


@pytest.mark.parametrize(("top_p", "kept"), [(0.5, 1), (0.79, 2), (0.81, 3), (1.0, 4)])
def test_top_p_keeps_smallest_prefix_reaching_p(top_p, kept):
    base = torch.tensor([0.05, 0.5, 0.15, 0.3])
    probs = probabilities(base.log()[None], 1.0, top_p=top_p)[0]
    order = [1, 3, 2, 0]  # descending probability
    assert (probs[order[:kept]] > 0).all() and (probs[order[kept:]] == 0).all()
    torch.testing.assert_close(probs[order[:kept]], base[order[:kept]] / base[order[:kept]].sum())


def test_top_k_then_top_p():
    base = torch.tensor([[0.4, 0.3, 0.2, 0.1]])
    probs = probabilities(base.log(), 1.0, top_k=3, top_p=0.7)
    # after top-k the renormalised mass is [4/9, 3/9, 2/9]; 4/9 + 3/9 >= 0.7 keeps two
    torch.testing.assert_close(probs, torch.tensor([[4 / 7, 3 / 7, 0.0, 0.0]]))


def test_filtered_tokens_are_minus_inf():
    out = process_logits(torch.tensor([[1.0, 2.0, 3.0]]), 1.0, top_k=1)
    assert torch.isinf(out[0, :2]).all() and out[0, 2] == 3.0


def test_sample_matches_distribution_and_is_batched():
    probs = torch.tensor([0.1, 0.0, 0.2, 0.3, 0.4])
    batch = probs.expand(40_000, 2, 5)  # arbitrary leading dims
    drawn = sample(batch, torch.Generator().manual_seed(3))
    assert drawn.shape == (40_000, 2)
    counts = torch.bincount(drawn.flatten(), minlength=5).double()
    assert counts[1] == 0
    keep = probs > 0
    expected = probs[keep].double() / probs[keep].double().sum() * counts.sum()
    assert chisquare(counts[keep], expected).pvalue > 1e-3


def test_sample_is_seeded():
    probs = torch.rand(64, 10).softmax(-1)
    a = sample(probs, torch.Generator().manual_seed(7))
    b = sample(probs, torch.Generator().manual_seed(7))
    c = sample(probs, torch.Generator().manual_seed(8))
    assert torch.equal(a, b) and not torch.equal(a, c)


@pytest.mark.parametrize(
    ("kwargs", "field"),
    [({"temperature": -1.0}, "temperature"), ({"top_k": -2}, "top_k"), ({"top_p": 0.0}, "top_p")],
)
def test_config_validation_names_field(kwargs, field):
    with pytest.raises(ValueError, match=field):
        SamplingConfig(**kwargs)


def test_config_probabilities_matches_function():
    cfg = SamplingConfig(temperature=0.7, top_k=3, top_p=0.9)
    logits = torch.randn(2, 6, generator=torch.Generator().manual_seed(4))
    torch.testing.assert_close(cfg.probabilities(logits), probabilities(logits, 0.7, 3, 0.9))
    assert SamplingConfig(temperature=0.0).greedy


def test_generator_device_must_match_the_model():
    check_generator(None, torch.device("cuda"))
    check_generator(torch.Generator(), torch.device("cpu"))
    with pytest.raises(ValueError, match="generator is on cpu"):
        check_generator(torch.Generator(), torch.device("cuda"))

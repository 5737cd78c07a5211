"""Draft length from call costs: the yield formula, the argmax, the running cost estimates."""

from __future__ import annotations

import pytest
import torch

from sampling.draft_length import CallCosts, best_draft_len, expected_tokens


@pytest.mark.parametrize(("a", "k"), [(0.3, 1), (0.6, 4), (0.9, 7)])
def test_expected_tokens_matches_a_simulation(a, k):
    """Accepted run of k iid Bernoulli(a) drafts (stop at the first rejection) plus one token."""
    gen = torch.Generator().manual_seed(0)
    accept = torch.rand(200_000, k, generator=gen) < a
    run = accept.int().cumprod(dim=1).sum(dim=1).float() + 1
    assert expected_tokens(a, k) == pytest.approx(run.mean().item(), rel=0.01)


def test_expected_tokens_edges_and_errors():
    assert expected_tokens(0.0, 5) == 1.0 and expected_tokens(1.0, 5) == 6.0
    with pytest.raises(ValueError, match="acceptance"):
        expected_tokens(1.5, 2)


@pytest.mark.parametrize(
    ("a", "draft", "target"), [(0.5, 0.1, 1.0), (0.8, 0.05, 1.0), (0.3, 0.9, 1.0)]
)
def test_best_draft_len_is_the_brute_force_argmax(a, draft, target):
    rates = {k: expected_tokens(a, k) / (k * draft + target) for k in range(1, 13)}
    assert best_draft_len(a, draft, target, max_len=12) == max(rates, key=rates.get)


def test_cheap_good_drafts_go_long_and_costly_poor_drafts_go_short():
    assert best_draft_len(0.95, 0.01, 1.0, max_len=8) == 8
    assert best_draft_len(0.2, 1.0, 1.0, max_len=8) == 1
    with pytest.raises(ValueError, match="max_len"):
        best_draft_len(0.5, 0.1, 1.0, max_len=0)


def test_call_costs_keep_a_running_mean():
    costs = CallCosts(decay=0.5)
    assert costs.choose(3, 8) == 3  # nothing measured: keep the current length
    for seconds in (2.0, 4.0):
        costs._fold("target", seconds)
    assert costs.target_s == 3.0
    costs._fold("draft", 0.1)
    costs.observe_acceptance(0.9)
    assert costs.acceptance == pytest.approx(0.7)
    assert costs.choose(3, 8) == best_draft_len(0.7, 0.1, 3.0, max_len=8)


def test_the_first_call_of_each_width_is_not_timed():
    """It may compile that shape: 100 s of compilation must not make drafting look costly."""
    costs, calls = CallCosts(), []

    def call(tokens):
        calls.append(tokens.shape[1])
        return tokens.sum()

    cpu = torch.device("cpu")
    for width in (1, 1, 2, 2):
        costs.timed("draft", cpu, call, torch.ones(3, width))
    assert calls == [1, 1, 2, 2] and 0 < costs.draft_s < 1.0
    costs.timed("target", cpu, call, torch.ones(3, 5))
    assert costs.target_s == 0.0  # the first target call of width 5: not counted

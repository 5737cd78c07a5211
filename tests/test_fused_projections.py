"""Fused q/k/v and gate/up projections: the engine's matmuls, never stale, never outside it."""

import copy

import torch
from stub_models import tiny_prior

from prior.blocks import SelfAttention, SwiGLU
from prior.fused_projections import fused_projections
from sampling.autoregressive import generate_ar
from sampling.engine import DecodeEngine
from sampling.guidance import GuidanceSchedule
from sampling.logits import SamplingConfig
from sampling.noise import RowNoise
from sampling.row_settings import RowSettings


def conditions(model, rows: int = 3):
    ids = torch.arange(rows) % 3
    return model.condition(class_ids=ids), model.null_condition(rows)


def full_logits(model, codes):
    cond, _ = conditions(model, codes.shape[0])
    return model(codes, cond)


@torch.no_grad()
def test_fused_forward_equals_the_parameters_forward_and_is_off_outside():
    model = tiny_prior("gpt", vocab=16)
    codes = torch.randint(0, 16, (3, 12))
    plain = full_logits(model, codes)
    fused = fused_projections(model)
    fused.refresh()
    with fused.active():
        assert torch.allclose(full_logits(model, codes), plain, atol=1e-5, rtol=1e-5)
        for m in fused.modules:  # negative control: inside, the stacked weight is what is used
            m.fused_weight.zero_()
        assert not torch.allclose(full_logits(model, codes), plain, atol=1e-3)
    assert torch.equal(full_logits(model, codes), plain)  # outside: the parameters, as always
    kinds = {type(m) for m in fused.modules}
    assert kinds == {SelfAttention, SwiGLU} and len(fused.modules) == 2 * model.config.n_layers


def test_refresh_follows_in_place_changes_and_moves():
    model = tiny_prior("gpt", vocab=16)
    fused = fused_projections(model)
    fused.refresh()
    attention = fused.modules[0]
    before = attention.fused_weight
    with torch.no_grad():
        attention.wk.weight.add_(0.5)  # an optimizer step / load_state_dict: in place
    fused.refresh()
    assert attention.fused_weight is before  # re-stacked in place: compiled graphs stay valid
    parts = [attention.wq.weight, attention.wk.weight, attention.wv.weight]
    assert torch.equal(attention.fused_weight, torch.cat(parts))
    model.double()  # storage and dtype change: a new stacked tensor
    fused.refresh()
    assert attention.fused_weight.dtype == torch.float64
    assert torch.equal(attention.fused_weight, torch.cat(parts).double())


@torch.no_grad()
def test_engine_never_samples_with_stale_weights():
    """Sample, change the weights in place (as training between sample grids does), sample
    again: the codes are those of a fresh copy of the changed model, not the old one."""
    model = tiny_prior("gpt", vocab=16, sharpen=3.0)
    guidance, noise = GuidanceSchedule(2.0), RowNoise.from_seeds([4, 5, 6])
    first = generate_ar(model, *conditions(model), 12, guidance=guidance, noise=noise)
    for m in fused_projections(model).modules:
        for p in (m.wq.weight, m.wv.weight) if isinstance(m, SelfAttention) else (m.w3.weight,):
            p.mul_(-3.0)
    fresh = copy.deepcopy(model)
    again = generate_ar(model, *conditions(model), 12, guidance=guidance, noise=noise)
    reference = generate_ar(fresh, *conditions(fresh), 12, guidance=guidance, noise=noise)
    assert torch.equal(again, reference)
    assert not torch.equal(again, first)  # the change mattered


def test_training_after_sampling_uses_and_trains_the_parameters():
    model = tiny_prior("gpt", vocab=16)
    with torch.no_grad():
        generate_ar(model, *conditions(model), 12, noise=RowNoise.from_seeds([0, 1, 2]))
    model.train()
    codes = torch.randint(0, 16, (3, 12))
    full_logits(model, codes).logsumexp(-1).mean().backward()
    attention = fused_projections(model).modules[0]
    assert attention.wq.weight.grad is not None and attention.wq.weight.grad.abs().sum() > 0


@torch.no_grad()
def test_the_fused_step_is_one_graph_without_breaks():
    model = tiny_prior("gpt", vocab=16)
    engine = DecodeEngine(model, rows=2, num_tokens=12, guided=True, compile=False)
    zeros = torch.zeros(2, dtype=torch.long)
    settings = RowSettings.build(2, 12, SamplingConfig(), GuidanceSchedule(2.0))
    engine.admit(None, *conditions(model, 2), settings, RowNoise.from_seeds([0, 1]))
    with engine.fused.active():
        explained = torch._dynamo.explain(engine._step)(zeros, zeros)
    assert explained.graph_break_count == 0 and explained.graph_count == 1
    torch._dynamo.reset()

"""The decode engine: per-row noise, batch invariance, slots joining a running batch, one graph."""

import pytest
import torch
from stub_models import perturbed_copy, tiny_prior
from test_gpt import make as make_gpt

from sampling.autoregressive import generate_ar
from sampling.engine import CPU_OPTIONS, DecodeEngine, bucket_rows
from sampling.generate import DecodeOptions, generate_codes
from sampling.guidance import GuidanceSchedule
from sampling.logits import SamplingConfig
from sampling.noise import ACCEPT, DRAW, RowNoise, uniform
from sampling.row_settings import RowSettings


def test_noise_is_a_uniform_pure_function_of_its_counters():
    from scipy.stats import chisquare

    noise = RowNoise.from_seeds([0, 1, 2**62], [0, 0, 7])
    positions = torch.arange(64)[None].expand(3, -1)
    u = noise.uniform(positions, DRAW, 256)  # [3, 64, 256]
    assert u.min() > 0 and u.max() < 1
    counts = torch.histc(u, bins=20, min=0, max=1)
    assert chisquare(counts.numpy()).pvalue > 1e-4
    flat = u.flatten()
    assert abs(torch.corrcoef(torch.stack([flat[:-1], flat[1:]]))[0, 1]) < 0.01
    # the same counters give the same bits, in any batch and on any call
    alone = RowNoise.from_seeds([2**62], [7]).uniform(positions[:1, 5:9], DRAW, 256)
    assert torch.equal(alone[0], u[2, 5:9])
    # every counter matters: seed, index, position, stream
    other_index = RowNoise.from_seeds([0], [1]).uniform(positions[:1], DRAW, 256)
    assert (other_index[0] != u[0]).float().mean() > 0.99
    assert (noise.uniform(positions, ACCEPT, 256) != u).float().mean() > 0.99
    assert (u[:, 1:] != u[:, :-1]).float().mean() > 0.99


def test_seeds_are_checked():
    with pytest.raises(ValueError, match="seeds"):
        RowNoise.from_seeds([-1])
    with pytest.raises(ValueError, match="indices"):
        RowNoise.from_seeds([1, 2], [0])


def models():
    target = tiny_prior("gpt", vocab=16, grid=(3, 4), sharpen=3.0)
    return target, perturbed_copy(target, 0.3, seed=1)


EXACT = [
    DecodeOptions("ar"),
    DecodeOptions("speculative", draft_len=3),
    DecodeOptions("jacobi", jacobi_window=4),
    DecodeOptions("jacobi", jacobi_window=4, jacobi_coupling="independent"),
]


@pytest.mark.parametrize("decode", EXACT, ids=lambda d: f"{d.method}-{d.jacobi_coupling}")
@pytest.mark.parametrize(
    ("scale", "sampling"), [(3.0, SamplingConfig()), (1.0, SamplingConfig(top_k=5, top_p=0.9))]
)
@torch.no_grad()
def test_a_sample_does_not_depend_on_its_batch(decode, scale, sampling):
    """Every row of a mixed batch equals the same prompt and seed generated alone (fp32, CPU)."""
    target, draft = models()
    labels = torch.tensor([0, 2, 1, 2, 0])
    noise = RowNoise.from_seeds([5, 6, 7, 8, 5], [0, 3, 1, 0, 1])
    guidance = GuidanceSchedule(scale)

    def run(rows):
        conds = (target.condition(class_ids=labels[rows]), target.null_condition(len(rows)))
        return generate_codes(
            target, *conds, decode=decode, sampling=sampling, guidance=guidance,
            draft=draft, draft_conds=conds, noise=noise.select(rows),
        ).codes  # fmt: skip

    together = run(list(range(5)))
    for row in range(5):
        assert torch.equal(run([row])[0], together[row]), f"row {row} changed with its company"
    assert not torch.equal(together[0], together[4])  # same prompt, other index: other sample


@torch.no_grad()
def test_maskgit_sample_does_not_depend_on_its_batch():
    model = tiny_prior("maskgit", vocab=16, grid=(3, 4), sharpen=3.0)
    labels, noise = torch.tensor([0, 1, 2]), RowNoise.from_seeds([1, 2, 3])

    def run(rows):
        cond, uncond = model.condition(class_ids=labels[rows]), model.null_condition(len(rows))
        return generate_codes(
            model, cond, uncond, decode=DecodeOptions("maskgit", num_steps=4),
            sampling=SamplingConfig(), guidance=GuidanceSchedule(2.0), noise=noise.select(rows),
        ).codes  # fmt: skip

    together = run([0, 1, 2])
    for row in range(3):
        assert torch.equal(run([row])[0], together[row])


@torch.no_grad()
def test_a_draft_equal_to_the_target_proposes_exactly_the_ar_sample():
    """Drafts and AR steps draw from the same DRAW stream: q = p accepts every draft, and the
    codes are AR's own, token for token."""
    target, _ = models()
    twin = perturbed_copy(target, 0.0, seed=0)
    conds = (target.condition(class_ids=torch.tensor([0, 1])), target.null_condition(2))
    noise, guidance = RowNoise.from_seeds([3, 4]), GuidanceSchedule(2.0)
    ar = generate_ar(target, *conds, 12, guidance=guidance, noise=noise)
    spec = generate_codes(
        target, *conds, decode=DecodeOptions("speculative", draft_len=4),
        sampling=SamplingConfig(), guidance=guidance, draft=twin, draft_conds=conds, noise=noise,
    )  # fmt: skip
    assert torch.equal(spec.codes, ar) and spec.stats.acceptance_rate == 1.0


@torch.no_grad()
def test_rows_join_a_running_engine_and_match_their_solo_runs():
    """Continuous batching at the engine: a row admitted mid-run into a free slot, with other
    settings, leaves the running row untouched, and each equals its solo run."""
    model, _ = models()
    n = model.config.seq_len
    engine = DecodeEngine(model, rows=4, num_tokens=n, guided=True, filtered=True, compile=False)
    rows = {  # slot: (class, guidance, sampling, seed)
        0: (1, GuidanceSchedule(3.0), SamplingConfig(), 11),
        2: (2, GuidanceSchedule(1.0), SamplingConfig(temperature=0.8, top_k=4), 12),
    }

    def admit(slot):
        label, guidance, sampling, seed = rows[slot]
        settings = RowSettings.build(1, n, sampling, guidance)
        cond = model.condition(class_ids=torch.tensor([label]))
        probs = engine.admit(torch.tensor([slot]), cond, model.null_condition(1), settings,
                             RowNoise.from_seeds([seed]))  # fmt: skip
        return RowNoise.from_seeds([seed]).sample(probs, torch.zeros(1, dtype=torch.long))

    codes = {0: [admit(0)]}
    tokens, positions = torch.zeros(4, dtype=torch.long), torch.zeros(4, dtype=torch.long)
    for step in range(1, n + 5):
        if step == 5:
            codes[2] = [admit(2)]
        live = [s for s in codes if len(codes[s]) < n]
        if not live:
            break
        for s in live:
            tokens[s], positions[s] = codes[s][-1], len(codes[s]) - 1
        nxt = engine.step(tokens, positions)
        for s in live:
            codes[s].append(nxt[s : s + 1])
    for slot, (label, guidance, sampling, seed) in rows.items():
        cond = model.condition(class_ids=torch.tensor([label]))
        solo = generate_ar(model, cond, model.null_condition(1), n, sampling, guidance,
                           noise=RowNoise.from_seeds([seed]))  # fmt: skip
        assert torch.equal(torch.cat(codes[slot]), solo[0]), f"slot {slot}"


@pytest.mark.parametrize("guided", [True, False])
def test_the_step_is_one_graph_without_breaks(guided):
    model, _ = models()
    engine = DecodeEngine(model, rows=2, num_tokens=12, guided=guided, filtered=True,
                          compile=False)  # fmt: skip
    zeros = torch.zeros(2, dtype=torch.long)
    cond, uncond = model.condition(class_ids=zeros), model.null_condition(2)
    with torch.no_grad():
        engine.admit(None, cond, uncond,
                     RowSettings.build(2, 12, SamplingConfig(), GuidanceSchedule(2.0)),
                     RowNoise.from_seeds([0, 1]))  # fmt: skip
        slots = type(cond).cat([cond, uncond]) if guided else cond  # what the prefill is fed
        for fn, args in [
            (engine._prefill, (slots.prefix, slots.mask)),
            (engine._step, (zeros, zeros)),
            (engine._distributions, (torch.zeros(2, 4, dtype=torch.long), zeros)),
        ]:
            explained = torch._dynamo.explain(fn)(*args)
            assert explained.graph_break_count == 0 and explained.graph_count == 1
    torch._dynamo.reset()


@pytest.mark.slow
@torch.no_grad()
def test_compiled_engine_gives_the_eager_codes():
    model, draft = models()
    conds = (model.condition(class_ids=torch.tensor([0, 1, 2])), model.null_condition(3))
    noise, guidance = RowNoise.from_seeds([1, 2, 3]), GuidanceSchedule(3.0)
    eager, compiled = (
        generate_ar(model, *conds, 12, guidance=guidance, noise=noise, compile=compile)
        for compile in (False, True)
    )
    assert torch.equal(compiled, eager)
    torch._dynamo.reset()


@torch.no_grad()
def test_compiled_prefill_of_a_padded_text_prefix_keeps_its_key_mask():
    """The compiled prefill stores which prefix keys are padding (a module attribute set inside
    the graph): later steps must still hide them, so the distributions equal eager ones."""
    model = make_gpt("text", "2d")
    cond = model.condition(texts=["a red square", "blue"])  # padded to different lengths
    assert not bool(cond.mask.all())
    runs = [
        generate_ar(model, cond, model.null_condition(2), 6, guidance=GuidanceSchedule(2.0),
                    noise=RowNoise.from_seeds([4, 5]), compile=compile, compile_mode="trace",
                    return_probs=True)
        for compile in (False, True)
    ]  # fmt: skip
    assert torch.equal(runs[0][0], runs[1][0])
    torch.testing.assert_close(runs[1][1], runs[0][1], atol=1e-6, rtol=1e-5)
    torch._dynamo.reset()


@torch.no_grad()
def test_each_engine_keeps_its_graphs_on_a_code_object_of_its_own():
    """Dynamo tries the guards of every graph kept on a code object in turn, on every call: two
    buckets of one model must not share `DecodeEngine._step`'s, or each step pays for both."""
    from torch._C._dynamo.eval_frame import _debug_get_cache_entry_list as cache_entries

    model, _ = models()
    torch._dynamo.reset()
    steps = []
    for rows in (1, 2):
        cond, uncond = model.condition(class_ids=torch.arange(rows)), model.null_condition(rows)
        engine = DecodeEngine(model, rows=rows, num_tokens=12, guided=True, compile=True,
                              compile_mode="trace")  # fmt: skip
        settings = RowSettings.build(rows, 12, SamplingConfig(), GuidanceSchedule(3.0),
                                     torch.device("cpu"))  # fmt: skip
        engine.admit(None, cond, uncond, settings, RowNoise.from_seeds(list(range(rows))))
        engine.warm_up()
        steps.append(engine._compiled["step"]._torchdynamo_orig_callable.__code__)
    assert steps[0] is not steps[1] and "step" in steps[0].co_name
    assert [len(cache_entries(code)) for code in steps] == [1, 1]
    assert not cache_entries(DecodeEngine._step.__code__)
    torch._dynamo.reset()


def test_engine_calls_record_no_autograd_and_keep_one_graph_in_either_grad_mode():
    """A caller outside no_grad (a server handler, a notebook) must neither build autograd
    graphs through the prior's parameters nor compile the step a second time for grad mode."""
    from torch._C._dynamo.eval_frame import _debug_get_cache_entry_list as cache_entries

    model, _ = models()
    torch._dynamo.reset()
    cond, uncond = model.condition(class_ids=torch.arange(2)), model.null_condition(2)
    engine = DecodeEngine(model, rows=2, num_tokens=12, guided=True, compile=True,
                          compile_mode="trace")  # fmt: skip
    settings = RowSettings.build(2, 12, SamplingConfig(), GuidanceSchedule(3.0))
    assert torch.is_grad_enabled()
    first = engine.admit(None, cond, uncond, settings, RowNoise.from_seeds([0, 1]))
    zeros = torch.zeros(2, dtype=torch.long)
    with torch.no_grad():
        quiet = engine.step(zeros, zeros)
    loud = engine.step(zeros, zeros)  # grad mode on
    probs = engine.distributions(torch.zeros(2, 3, dtype=torch.long), zeros)
    assert not first.requires_grad and not probs.requires_grad and torch.equal(quiet, loud)
    step_code = engine._compiled["step"]._torchdynamo_orig_callable.__code__
    assert len(cache_entries(step_code)) == 1
    torch._dynamo.reset()


def test_buckets_and_uniform_helper():
    assert [bucket_rows(r, True) for r in (1, 2, 3, 5, 8, 9)] == [1, 2, 4, 8, 8, 16]
    assert bucket_rows(5, False) == 5
    keys = RowNoise.from_seeds([9]).keys
    assert uniform(keys, torch.tensor([[3]]), DRAW, 4).shape == (1, 1, 4)


@torch.no_grad()
def test_inductor_compiled_step_samples_what_eager_samples():
    """The one test of real code generation (inductor, with the C++ wrapper on CPU; ~20 s cold,
    seconds from the FX graph cache): prefill and step compile, and sample eager's codes."""
    model = tiny_prior("gpt", seed=4, sharpen=5.0)
    cond, uncond = model.condition(torch.tensor([0, 1])), model.null_condition(2)
    built = []
    real_compile = torch.compile

    def recording_compile(fn, **kwargs):
        built.append(kwargs.get("options"))
        return real_compile(fn, **kwargs)

    torch._dynamo.reset()
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(torch, "compile", recording_compile)
        runs = [
            generate_ar(model, cond, uncond, 6, guidance=GuidanceSchedule(2.0),
                        noise=RowNoise.from_seeds([1, 2]), compile=compile, return_probs=True)
            for compile in (False, True)
        ]  # fmt: skip
    torch._dynamo.reset()
    assert built == [CPU_OPTIONS] * 2  # prefill, step
    assert torch.equal(runs[0][0], runs[1][0])
    torch.testing.assert_close(runs[1][1], runs[0][1], atol=1e-5, rtol=1e-4)

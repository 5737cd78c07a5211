"""Tree speculation: the same codes as plain AR for the same noise, whatever the draft; the tree
pass equals causal decoding of each node's path; one graph per round; a distilled draft helps."""

import functools
import json

import pytest
import torch
from stub_models import tiny_prior

from prior import GPT
from sampling.autoregressive import generate_ar
from sampling.engine import EngineBatch
from sampling.generate import DecodeOptions, check_method, generate_codes
from sampling.guidance import GuidanceSchedule
from sampling.logits import SamplingConfig
from sampling.noise import RowNoise
from sampling.row_settings import RowSettings
from sampling.tree import TreeShape, generate_tree, tree_round
from sampling.tree_draft import DistillConfig, TreeDraft, TreeDraftConfig, distill_tree_draft

N, V = 12, 16


@functools.cache
def models() -> tuple[GPT, TreeDraft, TreeDraft]:
    """A sharpened tiny prior, an untrained draft and one distilled from the prior (seconds)."""
    target = tiny_prior("gpt", vocab=V, grid=(3, 4), sharpen=3.0)
    torch.manual_seed(0)
    random = TreeDraft(TreeDraftConfig(vocab_size=V, num_tokens=N, grid_width=4, num_classes=3,
                                       dim=16, hidden=32)).eval()  # fmt: skip
    config = DistillConfig(guidance_scale=3.0, samples=400, sample_batch=400, steps=150,
                           batch_size=512, dim=16, hidden=64)  # fmt: skip
    distilled, _ = distill_tree_draft(target, config, progress=False)
    return target, random, distilled


def conditions(model: GPT, classes: list[int]):
    ids = torch.tensor(classes)
    return model.condition(class_ids=ids), model.null_condition(len(classes)), ids


def test_tree_shapes_are_level_ordered_and_greedy():
    chain = TreeShape.build(3, rank_probs=(0.9, 0.05))
    assert chain.parents == (0, 0, 1, 2) and chain.ranks == (0, 0, 0, 0)
    bush = TreeShape.build(3, rank_probs=(0.3, 0.3, 0.3))
    assert bush.parents == (0, 0, 0, 0) and bush.ranks == (0, 0, 1, 2)
    shape = TreeShape.build(10)
    assert shape.size == 10 and list(shape.depths) == sorted(shape.depths)
    assert all(p < i for i, p in enumerate(shape.parents) if i)
    assert shape.ancestors()[3][shape.parents[3]] and shape.ancestor(3, shape.depths[3]) == 0
    for i, path in enumerate(shape.paths()):  # root .. node i, then node i repeated
        depth = shape.depths[i]
        assert path[0] == 0 and path[depth:] == [i] * (shape.max_depth + 1 - depth)
        assert all(shape.parents[path[d + 1]] == path[d] for d in range(depth))
    assert chain.is_chain and not bush.is_chain and TreeShape((0,), (0,)).is_chain
    assert not TreeShape((0, 0, 1), (0, 1, 0)).is_chain  # one child, but not the best candidate
    assert TreeShape.build(3, rank_probs=[0.9, 0.05]) is chain  # built once, lists accepted
    with pytest.raises(ValueError, match="before it"):
        TreeShape((0, 2, 0), (0, 0, 0))
    with pytest.raises(ValueError, match="same candidate"):
        TreeShape((0, 0, 0), (0, 1, 1))
    with pytest.raises(ValueError, match="level by level"):
        TreeShape((0, 0, 1, 0), (0, 0, 0, 1))
    with pytest.raises(ValueError, match="rank_probs"):
        TreeShape.build(2, rank_probs=(0.0,))


@torch.no_grad()
def test_the_tree_pass_equals_causal_decoding_of_every_path():
    model, _, _ = models()
    shape = TreeShape.build(7, rank_probs=(0.4, 0.3, 0.2))
    model.setup_caches(1, N, scratch=shape.size)
    model.prefill(model.condition(class_ids=torch.tensor([1])))
    prefix = torch.randint(0, V, (1, 4))
    model.decode(prefix, torch.tensor([0]))  # positions 0..3 in the cache
    nodes = torch.randint(0, V, (1, shape.size + 1))
    depths, ancestors = torch.tensor(shape.depths), torch.tensor(shape.ancestors())
    tree = model.decode_tree(nodes, torch.tensor([4]), depths, ancestors)  # [1, T, V]
    for i in range(shape.size + 1):
        path = [j for j in range(shape.size + 1) if shape.ancestors()[i][j]]  # root .. node i
        causal = model.decode(nodes[:, path], torch.tensor([4]))[:, -1]
        torch.testing.assert_close(tree[:, i], causal, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("draft_kind", ["random", "distilled"])
@pytest.mark.parametrize("size", [1, 3, 6])
@pytest.mark.parametrize(
    ("scale", "sampling"), [(3.0, SamplingConfig()), (1.0, SamplingConfig(top_k=5, top_p=0.9))]
)
def test_tree_decoding_draws_exactly_the_ar_codes(draft_kind, size, scale, sampling):
    model, random, distilled = models()
    draft = distilled if draft_kind == "distilled" else random
    cond, uncond, ids = conditions(model, [0, 1, 2, 0, 1])
    noise, guidance = RowNoise.from_seeds([5, 6, 7, 8, 9]), GuidanceSchedule(scale)
    ar = generate_ar(model, cond, uncond, N, sampling, guidance, noise=noise)
    tree, stats = generate_tree(model, cond, uncond, N, draft, ids, size, sampling, guidance,
                                noise=noise)  # fmt: skip
    assert torch.equal(tree, ar)
    assert stats.target_calls == stats.iterations + 1 <= N
    # a row alone gives the same codes as in the batch, in as many of its own rounds: the
    # batch's drafted / accepted counts are the sums of its rows' solo counts
    solos = []
    for r in range(5):
        row = torch.tensor([r])
        solos.append(generate_tree(model, cond.select(row), uncond.select(row), N, draft,
                                   ids[row], size, sampling, guidance,
                                   noise=noise.select(row)))  # fmt: skip
    assert all(torch.equal(codes[0], ar[r]) for r, (codes, _) in enumerate(solos))
    assert stats.drafted == sum(solo.drafted for _, solo in solos)
    assert stats.accepted == sum(solo.accepted for _, solo in solos)
    assert stats.iterations == max(solo.iterations for _, solo in solos)


@torch.no_grad()
def test_a_compiled_padded_batch_stops_with_its_rows_and_counts_their_rounds():
    """3 rows on a compiled bucket of 4 slots: the padding slot repeats row 0, the round's own
    "all done" flag ends the loop, and the codes and counts are the eager run's."""
    model, _, distilled = models()
    cond, uncond, ids = conditions(model, [2, 0, 1])
    noise, guidance = RowNoise.from_seeds([11, 12, 13]), GuidanceSchedule(3.0)
    runs = [
        generate_tree(model, cond, uncond, N, distilled, ids, 3, guidance=guidance, noise=noise,
                      compile=compile, compile_mode="trace")
        for compile in (False, True)
    ]  # fmt: skip
    (eager, eager_stats), (compiled, compiled_stats) = runs
    assert torch.equal(compiled, eager)
    assert torch.equal(eager, generate_ar(model, cond, uncond, N, guidance=guidance, noise=noise))
    for key in ("iterations", "drafted", "accepted", "target_calls"):
        assert getattr(compiled_stats, key) == getattr(eager_stats, key), key
    torch._dynamo.reset()


@torch.no_grad()
def test_the_rounds_fused_draft_equals_its_forward():
    """The round's multiply-sum draft is the same function as the GEMM forward (training's)."""
    _, random, distilled = models()
    classes, positions = torch.tensor([0, 2]), torch.tensor([[1, 5, 11], [3, 3, 7]])
    context = torch.randint(0, V + 1, (2, 3, len(distilled.config.offsets)))
    for draft in (random, distilled):
        fused = draft.round_logits(classes, positions, context)
        torch.testing.assert_close(fused, draft(classes, positions, context), atol=1e-5, rtol=1e-5)


def test_a_chain_needs_no_cache_moves_and_a_bush_does(monkeypatch):
    """A chain's node i is cached in its own position's slot, so its round skips the moves
    (and stays exact); a bushy tree's round must move (the negative control below)."""
    model, _, distilled = models()
    cond, uncond, ids = conditions(model, [0, 1, 2, 0])
    noise, guidance = RowNoise.from_seeds(list(range(4))), GuidanceSchedule(3.0)
    moves, original = [], GPT.move_positions

    def counted(self, source, target):
        moves.append(1)
        original(self, source, target)

    monkeypatch.setattr(GPT, "move_positions", counted)
    ar = generate_ar(model, cond, uncond, N, guidance=guidance, noise=noise)
    chain, stats = generate_tree(model, cond, uncond, N, distilled, ids, 4, guidance=guidance,
                                 noise=noise)  # fmt: skip
    assert TreeShape.build(4).is_chain and not moves and torch.equal(chain, ar)
    rounds = stats.drafted // 4  # rounds of running rows (4 nodes each)
    assert stats.accepted > rounds  # more than one node per round: deeper paths were kept
    bush = TreeShape.build(3, rank_probs=(0.3, 0.3, 0.3))
    tree, _ = generate_tree(model, cond, uncond, N, distilled, ids, guidance=guidance, shape=bush,
                            noise=noise)  # fmt: skip
    assert moves and torch.equal(tree, ar)


def test_a_distilled_draft_commits_more_codes_per_pass():
    model, random, distilled = models()
    cond, uncond, ids = conditions(model, list(range(3)) * 10)
    noise, guidance = RowNoise.from_seeds(list(range(30))), GuidanceSchedule(3.0)
    per_pass = {}
    for name, draft in (("random", random), ("distilled", distilled)):
        _, stats = generate_tree(model, cond, uncond, N, draft, ids, 3, guidance=guidance,
                                 noise=noise)  # fmt: skip
        per_pass[name] = stats.accepted / stats.drafted
    assert per_pass["distilled"] > per_pass["random"] + 0.1, per_pass


def test_a_round_that_forgets_to_move_the_cache_breaks_exactness(monkeypatch):
    """Negative control: the equality above can fail. Without moving the accepted path's keys
    and values to their positions (a bushy tree puts a second candidate in another position's
    slot), later codes read wrong cache entries and drift from AR."""
    model = tiny_prior("gpt", vocab=V, grid=(3, 4), sharpen=30.0)  # peaked: small errors show
    _, draft, _ = models()
    cond, uncond, ids = conditions(model, [0, 1, 2, 0, 1, 2])
    noise, guidance = RowNoise.from_seeds(list(range(6))), GuidanceSchedule(3.0)
    bushy = TreeShape.build(8, rank_probs=(0.125,) * 8)  # 8 candidates for the next code
    ar = generate_ar(model, cond, uncond, N, guidance=guidance, noise=noise)
    tree, _ = generate_tree(model, cond, uncond, N, draft, ids, guidance=guidance,
                            shape=bushy, noise=noise)  # fmt: skip
    assert torch.equal(tree, ar)
    monkeypatch.setattr(GPT, "move_positions", lambda self, source, target: None)
    broken, _ = generate_tree(model, cond, uncond, N, draft, ids, guidance=guidance,
                              shape=bushy, noise=noise)  # fmt: skip
    assert not torch.equal(broken, ar)


def test_a_round_is_one_graph_without_breaks():
    model, _, distilled = models()
    cond, uncond, ids = conditions(model, [0, 1])
    settings = RowSettings.build(2, N, SamplingConfig(), GuidanceSchedule(2.0))
    shape = TreeShape.build(3, rank_probs=(0.5, 0.3))  # two levels, a branch: every code path
    rows = EngineBatch(model, cond, uncond, settings, RowNoise.from_seeds([0, 1]), num_tokens=N,
                       scratch=shape.size)  # fmt: skip
    with torch.no_grad():
        rows.prefill()
        out = torch.zeros(2, N + shape.max_depth + 1, dtype=torch.long)
        step = functools.partial(tree_round, rows.engine, shape, distilled)
        explained = torch._dynamo.explain(step)(out, torch.tensor([1, 5]), ids,
                                                torch.zeros(2, dtype=torch.long))  # fmt: skip
    assert explained.graph_break_count == 0 and explained.graph_count == 1
    torch._dynamo.reset()


def test_the_dispatcher_and_bad_input(tmp_path):
    model, _, distilled = models()
    cond, uncond, ids = conditions(model, [2, 0])
    noise, guidance = RowNoise.from_seeds([3, 4]), GuidanceSchedule(2.0)
    out = generate_codes(model, cond, uncond, decode=DecodeOptions("tree", tree_size=2),
                         sampling=SamplingConfig(), guidance=guidance, noise=noise,
                         tree_draft=distilled, class_ids=ids)  # fmt: skip
    assert torch.equal(
        out.codes, generate_ar(model, cond, uncond, N, guidance=guidance, noise=noise)
    )
    with pytest.raises(ValueError, match="distill_tree_draft"):
        check_method(model, "tree")
    with pytest.raises(ValueError, match="tree_size"):
        DecodeOptions("ar", tree_size=2)
    with pytest.raises(ValueError, match="tree_size must be >= 1"):
        DecodeOptions("tree", tree_size=0)
    with pytest.raises(ValueError, match="class ids"):
        generate_tree(model, cond, uncond, N, distilled, None)
    with pytest.raises(ValueError, match="codes of"):
        distilled.check_fits(vocab_size=V + 1, num_tokens=N, num_classes=3)
    with pytest.raises(ValueError, match="grid_width"):
        TreeDraftConfig(vocab_size=V, num_tokens=N, grid_width=0)
    # save / load round trip
    distilled.save_pretrained(tmp_path / "draft")
    again = TreeDraft.from_pretrained(tmp_path / "draft")
    context = torch.randint(0, V + 1, (2, 3, len(distilled.config.offsets)))
    positions = torch.randint(0, N, (2, 3))
    torch.testing.assert_close(again(ids, positions, context), distilled(ids, positions, context))


def test_the_distill_script_builds_the_draft_it_is_told_to(tmp_path):
    """scripts/distill_tree_draft.py: --dim / --hidden / --steps reach the saved draft and its
    report (the demo's draft width is a DistillConfig default a user may need to change)."""
    from scripts.distill_tree_draft import main

    model, _, _ = models()
    model.save_pretrained(tmp_path / "prior")
    out = main(["--prior", str(tmp_path / "prior"), "--out", str(tmp_path / "draft"),
                "--samples", "40", "--steps", "3", "--dim", "8", "--hidden", "24",
                "--device", "cpu"])  # fmt: skip
    draft = TreeDraft.from_pretrained(out)
    assert (draft.config.dim, draft.config.hidden) == (8, 24)
    assert draft.mlp[1].weight.shape == (24, 8)
    report = json.loads((out / "distill.json").read_text())
    assert (report["distill"]["dim"], report["distill"]["hidden"]) == (8, 24)
    assert report["distill"]["steps"] == 3

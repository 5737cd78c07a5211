"""bench/sampling.py: the whole benchmark runs (--quick, eager, random) and its helpers are right."""

import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def test_paired_spread_is_the_quartiles_of_per_round_ratios():
    sys.path.insert(0, str(ROOT))
    from bench.common import Timing, interleaved, paired_spread

    base, cand = Timing([2.0, 4.0, 6.0, 8.0, 10.0]), Timing([1.0, 1.0, 2.0, 2.0, 5.0])
    assert paired_spread(base, cand) == [2.0, 4.0]  # ratios 2, 4, 3, 4, 2 -> q25 2, q75 4
    assert paired_spread(Timing([3.0]), Timing([2.0])) == [1.5, 1.5]
    with pytest.raises(ValueError):
        paired_spread(Timing([1.0, 2.0]), Timing([1.0]))  # rounds must pair up
    calls: list[str] = []
    timings = interleaved({"a": lambda: calls.append("a"), "b": lambda: calls.append("b")},
                          repeats=3, warmup=1, device="cpu")  # fmt: skip
    assert calls == ["a", "b", "b", "a", "a", "b", "b", "a"]  # who goes first rotates
    assert all(len(t.times) == 3 for t in timings.values())


def test_every_candidate_draws_the_same_seeds_call_for_call():
    """So exact methods decode AR's very images in the k-th round, whatever the call order."""
    import itertools

    sys.path.insert(0, str(ROOT))
    from bench.sampling import own_seeds

    running, seen = [], {"ar": [], "tree": []}
    fns = {
        name: own_seeds(lambda name=name: seen[name].append(next(running[-1])),
                        itertools.count(7), running)
        for name in seen
    }  # fmt: skip
    for name in ("ar", "tree", "tree", "ar", "tree"):
        fns[name]()
    assert seen == {"ar": [7, 8], "tree": [7, 8, 9]} and not running


@pytest.mark.slow
def test_whole_benchmark_prints_every_headline_key_and_times_cfg_side_by_side():
    cmd = [sys.executable, str(ROOT / "bench" / "sampling.py"), "--random", "--quick",
           "--no-compile", "--target-dim", "32", "--target-layers", "2", "--draft-dim", "16",
           "--draft-layers", "1", "--vocab", "64", "--draft-len", "3"]  # fmt: skip
    run = subprocess.run(cmd, capture_output=True, text=True, timeout=300, cwd=ROOT)
    assert run.returncode == 0, run.stderr[-2000:]
    lines = run.stdout.strip().splitlines()
    summary = json.loads(lines[-1])
    keys = ["ar_vs_transformers_b1", "ar_vs_transformers_b8", "cfg_overhead_b1",
            "best_lossless_vs_ar_b1", "best_lossless_vs_ar_b8", "maskgit_vs_ar_b16"]  # fmt: skip
    assert all(summary[k] > 0 for k in keys)
    assert summary["batch_invariant"] is True and summary["best_lossless_method"]
    report = json.loads("\n".join(lines[:-1]))
    pair = report["cfg_overhead"]  # its own round-robin pair: guidance 1 beside --cfg
    assert pair["method"] == "ar" and pair["guidance"] == 3.0
    ratio = pair["guidance_1"]["median_s"] / pair["guidance_cfg"]["median_s"]
    assert summary["cfg_overhead_b1"] == pytest.approx(ratio, abs=0.05)  # medians are rounded
    first, _, second = summary["best_lossless_method"].partition(" / ")  # "a" or "a / b"
    for batch, method in ((1, first), (8, second or first)):
        group = report["lossless"][f"batch_{batch}"]  # exact methods timed among themselves
        assert {"ar", "tree", "tree_small", "mc_sjd"} <= set(group)
        best = max((m for m in group if m != "ar"), key=lambda m: group[m]["speedup_vs_ar"])
        assert method == best
        assert summary[f"best_lossless_vs_ar_b{batch}"] == group[best]["speedup_vs_ar"]
    costs = report["call_costs"]  # a speculative round priced in target steps
    assert costs["draft_len"] == 3 and costs["tokens_per_round_at_most"] == 4
    assert costs["verify_over_step"] > 0 and costs["draft_call_over_target_step"] > 0
    free, real = (costs[f"tokens_per_round_for_1.5x_{k}"] for k in ("free_draft", "this_draft"))
    assert free == pytest.approx(1.5 * costs["verify_over_step"], abs=0.01)
    assert real > free  # drafting is never free
    draft = report["models"]["tree_draft"]  # which draft set the tree's codes per call
    assert draft["dim"] >= 1 and draft["hidden"] >= 1 and draft["params"] > 0
    assert "tree_draft" in report["settings"]
    trees = report["tree_round_costs"]  # a tree round priced in AR steps, alone and in generation
    spec = report["speculative"]
    n, big = report["tokens"]["num_tokens"], report["settings"]["batch"]
    for batch in (1, big):
        for label, nodes in (("tree", 4), ("tree_small", 1)):
            entry = trees[f"batch_{batch}"][label]
            assert entry["nodes"] == nodes
            assert entry["alone_round_over_step"] > 0 and entry["in_generation_call_over_step"] > 0
            timed = spec[f"batch_{batch}"]["cfg_3"][label]  # the same generations' call count
            assert entry["tokens_per_call"] == pytest.approx(n / timed["target_calls"], rel=0.01)
            assert 1 <= entry["tokens_per_call"] <= nodes + 1  # at most every node plus one


def test_call_costs_only_writes_what_it_prints_to_out(tmp_path):
    out = tmp_path / "costs.json"
    cmd = [sys.executable, str(ROOT / "bench" / "sampling.py"), "--random", "--quick",
           "--no-compile", "--target-dim", "32", "--target-layers", "2", "--draft-dim", "16",
           "--draft-layers", "1", "--vocab", "64", "--draft-len", "3", "--call-costs-only",
           "--out", str(out)]  # fmt: skip
    run = subprocess.run(cmd, capture_output=True, text=True, timeout=300, cwd=ROOT)
    assert run.returncode == 0, run.stderr[-2000:]
    printed = json.loads(run.stdout.strip().splitlines()[-1])
    assert json.loads(out.read_text()) == printed and printed["draft_len"] == 3

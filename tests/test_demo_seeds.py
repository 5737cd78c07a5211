"""The seed-spread scripts: scores read from metrics.json, mean ± sample std, paired differences."""

from __future__ import annotations

import json
import statistics
from pathlib import Path

import pytest

from scripts import compare_estimators, demo_seeds, tokenizer_seeds
from training.config import ConfigError

ROOT = Path(__file__).resolve().parents[1]


def metrics(psnr: float, acc2: float, fr2: float, *, shapes: bool = False) -> dict:
    run = {"guidance_scale": 2.0, "frechet": fr2, "accuracy": {"overall": acc2}}
    if shapes:
        run["prompt_check"] = {"color": 1.0, "shape": 0.9, "overall": 0.9, "count": 540}
    return {
        "tokenizer": {"psnr": psnr, "ssim": 0.9, "codebook_usage": 1.0},
        "judge": {"heldout_accuracy": 0.98},
        "generation": {"floor": {"train_vs_heldout": 0.5}, "runs": [run]},
        "timings_s": {"prior": 100.0, "total": 300.0},
    }


def test_scores_flatten_one_run_with_the_floor_ratio():
    s = demo_seeds.scores(metrics(25.0, 0.99, 0.6, shapes=True))
    assert s["tokenizer_psnr"] == 25.0 and s["g2_accuracy"] == 0.99
    assert s["g2_frechet_vs_floor"] == pytest.approx(1.2)
    assert s["g2_prompt_all_four"] == 0.9 and s["g2_prompt_shape"] == 0.9
    assert "g2_prompt_count" not in s  # counts are not scores
    assert s["seconds_total"] == 300.0


def test_spread_is_mean_and_sample_std_over_runs():
    runs = [
        demo_seeds.scores(metrics(p, a, 0.6)) for p, a in ((24.0, 0.98), (25.0, 0.99), (27.0, 1.0))
    ]
    summary = demo_seeds.spread(runs)
    assert summary["tokenizer_psnr"]["mean"] == pytest.approx(25.333333)
    assert summary["tokenizer_psnr"]["std"] == pytest.approx(statistics.stdev([24.0, 25.0, 27.0]))
    assert (summary["g2_accuracy"]["min"], summary["g2_accuracy"]["max"]) == (0.98, 1.0)
    assert summary["g2_frechet"]["std"] == 0.0
    text = demo_seeds.table(summary, [0, 1, 2])
    assert "| tokenizer_psnr | 25.33 ± 1.5 | 24 | 27 |" in text


def test_a_score_missing_from_one_run_is_left_out():
    a, b = demo_seeds.scores(metrics(24.0, 0.98, 0.6)), demo_seeds.scores(metrics(25.0, 0.99, 0.6))
    del b["g2_accuracy"]
    assert "g2_accuracy" not in demo_seeds.spread([a, b])


def test_seed_zero_is_the_demo_folder_itself():
    base = Path("/x/outputs/demo")
    assert demo_seeds.run_dir(base, 0) == base
    assert demo_seeds.run_dir(base, 2) == Path("/x/outputs/demo-seed2")


def test_one_seed_is_refused():
    with pytest.raises(ValueError, match="two different seeds"):
        demo_seeds.parse_args(["--seeds", "3", "3"])
    with pytest.raises(ValueError, match="must be different"):
        compare_estimators.parse_args(["--seeds", "1", "1"])


def test_estimator_comparison_pairs_runs_of_one_seed():
    def run(psnr: float) -> dict:
        return {"psnr": psnr, "ssim": 0.9, "codebook_usage": 0.5, "perplexity": 10.0}

    per_seed = [
        {"ste": run(20.0), "rotation": run(21.0)},
        {"ste": run(19.0), "rotation": run(21.5)},
    ]
    diffs = [compare_estimators.difference(r) for r in per_seed]
    assert [d["psnr"] for d in diffs] == [1.0, 2.5]
    spread = compare_estimators.mean_std(diffs)
    assert spread["psnr"] == pytest.approx([1.75, statistics.stdev([1.0, 2.5])])
    assert spread["ssim"] == [0.0, 0.0]


def test_estimator_comparison_refuses_a_seed_override():
    with pytest.raises(SystemExit):
        compare_estimators.parse_args(["runtime.seed=3"])


def fake_trainer(monkeypatch: pytest.MonkeyPatch, psnr_of_seed: dict[int, float]) -> list[list]:
    """subprocess.run stand-in that writes the eval.json a training run would; returns calls."""
    calls: list[list] = []

    def run(cmd: list[str], **_: object) -> None:
        calls.append(cmd)
        out = Path(cmd[cmd.index("--output-dir") + 1])
        seed = int(next(a for a in cmd if a.startswith("runtime.seed=")).split("=")[1])
        out.mkdir(parents=True, exist_ok=True)
        scores = {"psnr": psnr_of_seed[seed], "ssim": 0.9, "codebook_usage": 1.0,
                  "perplexity": 50.0, "codebook_size": 128, "images": 10, "step": 4}  # fmt: skip
        (out / "eval.json").write_text(json.dumps(scores))

    monkeypatch.setattr(tokenizer_seeds.subprocess, "run", run)
    return calls


def test_tokenizer_seeds_tables_each_config_and_reuses_finished_runs(tmp_path, monkeypatch):
    calls = fake_trainer(monkeypatch, {0: 20.0, 1: 21.0, 2: 23.0})
    config = tmp_path / "digits.yaml"
    config.write_text((ROOT / "configs" / "tokenizer" / "digits.yaml").read_text())
    argv = ["--configs", str(config), "--seeds", "0", "1", "2", "--output-dir", str(tmp_path),
            "runtime.max_steps=4"]  # fmt: skip
    report = tokenizer_seeds.main(argv)
    psnr = report["configs"]["digits"]["summary"]["psnr"]
    assert psnr["mean"] == pytest.approx(64 / 3) and (psnr["min"], psnr["max"]) == (20.0, 23.0)
    assert psnr["std"] == pytest.approx(statistics.stdev([20.0, 21.0, 23.0]))
    assert len(calls) == 3 and all("runtime.max_steps=4" in c for c in calls)
    assert json.loads((tmp_path / "seeds.json").read_text())["seeds"] == [0, 1, 2]
    tokenizer_seeds.main(argv)  # the same command again: nothing retrains
    assert len(calls) == 3
    tokenizer_seeds.main([*argv[:-1], "runtime.max_steps=5"])  # another command: all retrain
    assert len(calls) == 6
    config.write_text(config.read_text() + "# edited\n")  # another config text: all retrain
    tokenizer_seeds.main([*argv[:-1], "runtime.max_steps=5"])
    assert len(calls) == 9


def test_tokenizer_seeds_refuses_bad_arguments(tmp_path):
    base = ["--configs", "configs/tokenizer/digits.yaml", "--output-dir", str(tmp_path)]
    with pytest.raises(ValueError, match="two different seeds"):
        tokenizer_seeds.parse_args([*base, "--seeds", "1"])
    with pytest.raises(ValueError, match="runtime.seed"):
        tokenizer_seeds.parse_args([*base, "runtime.seed=3"])
    with pytest.raises(ValueError, match="different file names"):
        tokenizer_seeds.parse_args(["--configs", "a/digits.yaml", "b/digits.yaml"])
    with pytest.raises(ConfigError, match="no_such_key"):
        tokenizer_seeds.main([*base, "no_such_key.x=1"])


def test_collect_only_tables_finished_runs_and_names_a_missing_one(tmp_path):
    base = tmp_path / "demo"
    for seed, psnr in ((0, 24.0), (1, 26.0)):
        folder = demo_seeds.run_dir(base, seed)
        folder.mkdir()
        (folder / "metrics.json").write_text(json.dumps(metrics(psnr, 0.99, 0.6)))
    out = tmp_path / "table.json"
    argv = ["--output-dir", str(base), "--seeds", "0", "1", "--out", str(out), "--collect-only"]
    report = demo_seeds.main(argv)
    assert report["summary"]["tokenizer_psnr"]["mean"] == 25.0
    assert json.loads(out.read_text())["seeds"] == [0, 1]
    with pytest.raises(FileNotFoundError, match="seed 2 has no .*demo-seed2/metrics.json"):
        demo_seeds.main([*argv[:3], "1", "2", *argv[5:]])

"""bench/gpu.py --smoke: the GPU script's code paths run on CPU with tiny sizes (it cannot rot)."""

import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.slow
def test_gpu_bench_smoke_runs_every_part_and_prints_one_json_line():
    run = subprocess.run(
        [sys.executable, str(ROOT / "bench" / "gpu.py"), "--smoke"],
        capture_output=True, text=True, timeout=300, cwd=ROOT,
    )  # fmt: skip
    assert run.returncode == 0, run.stderr[-2000:]
    report = json.loads(run.stdout.strip().splitlines()[-1])
    assert report["smoke"] is True
    assert report["attention"]["sdpa_max_err"] < 1e-4
    assert report["attention"]["sdpa_kv_cache_max_err"] < 1e-4
    for batch in (1, 2):
        row = report["decode"][f"batch_{batch}_tokens_per_s"]
        assert all(row[k] > 0 for k in ("eager", "compiled", "transformers"))
    assert report["train"]["tokens_per_s"] > 0 and report["train"]["sequence"] == 17
    assert report["zero2"]["backend"] == "gloo" and report["zero2"]["loss"] > 0

"""bench/sampling.py --call-costs-only: a speculative round priced in target steps (cannot rot)."""

import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.slow
def test_call_costs_price_a_round_in_target_steps():
    cmd = [sys.executable, str(ROOT / "bench" / "sampling.py"), "--random", "--quick",
           "--no-compile", "--call-costs-only", "--draft-len", "3", "--target-dim", "32",
           "--target-layers", "2", "--draft-dim", "16", "--draft-layers", "1"]  # fmt: skip
    run = subprocess.run(cmd, capture_output=True, text=True, timeout=300, cwd=ROOT)
    assert run.returncode == 0, run.stderr[-2000:]
    costs = json.loads(run.stdout.strip().splitlines()[-1])
    assert costs["weights"] == "random" and costs["draft_len"] == 3
    assert costs["tokens_per_round_at_most"] == 4
    assert costs["verify_over_step"] > 0 and costs["draft_call_over_target_step"] > 0
    free, real = (costs[f"tokens_per_round_for_1.5x_{k}"] for k in ("free_draft", "this_draft"))
    assert free == pytest.approx(1.5 * costs["verify_over_step"], abs=0.01)
    assert real > free  # drafting is never free

"""The shared runtime: strict configs, schedules, EMA, atomic writes, crash-safe resume."""

import json
import os
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path

import pytest
import torch
from torch import nn

from training.checkpoint import CheckpointManager
from training.config import ConfigError, from_dict, load_config, save_config, to_dict
from training.ema import EMA
from training.runtime import OptimConfig, RuntimeConfig
from training.schedule import warmup_cosine_factor
from training.serialization import atomic_dir, file_sha256

ROOT = Path(__file__).resolve().parents[1]
TOY = ROOT / "tests" / "fixtures" / "toy_train.py"


@dataclass
class Example:
    runtime: RuntimeConfig = field(default_factory=RuntimeConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    name: str = "x"


def test_unknown_key_names_key_and_file(tmp_path):
    path = tmp_path / "bad.yaml"
    path.write_text("runtime:\n  max_stepz: 3\n")
    with pytest.raises(ConfigError, match=r"bad.yaml.*runtime.max_stepz"):
        load_config(Example, path)


def test_wrong_type_and_bad_override_are_errors():
    with pytest.raises(ConfigError, match="runtime.max_steps"):
        load_config(Example, None, ["runtime.max_steps=many"])
    with pytest.raises(ConfigError, match="key.sub=value"):
        load_config(Example, None, ["runtime.max_steps"])
    with pytest.raises(ValueError, match="mixed_precision"):
        load_config(Example, None, ["runtime.mixed_precision=fp8"])


def test_overrides_and_round_trip(tmp_path):
    cfg = load_config(Example, None, ["optim.lr=0.5", "optim.betas=[0.8,0.9]", "name=y"])
    assert cfg.optim.lr == 0.5 and cfg.optim.betas == [0.8, 0.9] and cfg.name == "y"
    save_config(cfg, tmp_path / "c.yaml")
    assert load_config(Example, tmp_path / "c.yaml") == cfg
    assert from_dict(Example, to_dict(cfg)) == cfg


def test_warmup_cosine_shape():
    f = [warmup_cosine_factor(s, warmup=10, total=110, min_ratio=0.1) for s in range(111)]
    assert f[0] == pytest.approx(0.1) and f[9] == pytest.approx(1.0)
    assert all(a >= b for a, b in zip(f[10:], f[11:]))  # monotone decay after warmup
    assert f[110] == pytest.approx(0.1)


def test_ema_tracks_weights():
    model = nn.Linear(3, 2)
    ema = EMA(model, decay=0.5)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(1.0)
    before = {k: v.clone() for k, v in ema.shadow.state_dict().items()}
    ema.update(model)
    d = min(0.5, 2 / 11)
    for name, p in model.named_parameters():
        expected = d * before[name] + (1 - d) * p.detach()
        torch.testing.assert_close(ema.shadow.state_dict()[name], expected)
    with pytest.raises(ValueError, match="decay"):
        EMA(model, decay=1.0)


def test_atomic_dir_keeps_old_content_on_failure(tmp_path):
    target = tmp_path / "out"
    with atomic_dir(target) as tmp:
        (tmp / "a.txt").write_text("v1")
    digest = file_sha256(target / "a.txt")
    with pytest.raises(RuntimeError), atomic_dir(target, overwrite=True) as tmp:
        (tmp / "a.txt").write_text("half")
        raise RuntimeError("interrupted")
    assert file_sha256(target / "a.txt") == digest
    assert [p.name for p in tmp_path.iterdir()] == ["out"]
    with pytest.raises(FileExistsError):
        with atomic_dir(target):
            pass


def test_latest_ignores_half_written(tmp_path):
    manager = CheckpointManager(accelerator=None, output_dir=tmp_path)
    root = tmp_path / "checkpoints"
    (root / "step_000002").mkdir(parents=True)
    (root / "step_000002" / "trainer_state.json").write_text("{}")
    (root / "step_000004").mkdir()  # no trainer_state.json: half-written
    (root / ".tmp-step_000006").mkdir()
    (root / "latest").write_text("step_000004")
    assert manager.latest() == root / "step_000002"
    with pytest.raises(ValueError, match="not a complete checkpoint"):
        manager.resolve(str(root / "step_000004"))


def _run(out: Path, *args: str, env: dict | None = None) -> subprocess.CompletedProcess:
    full_env = {**os.environ, "TOY_DROPOUT": "0.3", **(env or {})}
    cmd = [sys.executable, str(TOY), "--output-dir", str(out), *args]
    return subprocess.run(cmd, cwd=ROOT, env=full_env, capture_output=True, text=True, timeout=120)


def _losses(out: Path) -> dict[int, tuple[float, float]]:
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    return {
        r["step"]: (r["loss"], r["lr"]) for r in rows
    }  # a resumed step overwrites the killed run's


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory) -> Path:
    """One uninterrupted 16-step toy run, the reference of every kill point."""
    out = tmp_path_factory.mktemp("uninterrupted") / "full"
    full = _run(out, "runtime.max_steps=16")
    assert full.returncode == 0, full.stderr
    return out


@pytest.mark.slow
@pytest.mark.parametrize("kill_at", [8, 14])  # mid-epoch, and after an epoch boundary
def test_sigkill_then_resume_equals_uninterrupted(tmp_path, kill_at, uninterrupted):
    overrides = ["runtime.max_steps=16"]
    killed = _run(tmp_path / "killed", *overrides, env={"TOY_KILL_AT": str(kill_at)})
    assert killed.returncode == -9  # SIGKILL
    resumed = _run(tmp_path / "killed", *overrides, "--resume", "latest")
    assert resumed.returncode == 0, resumed.stderr
    assert "resumed from" in resumed.stdout
    a, b = _losses(uninterrupted), _losses(tmp_path / "killed")
    assert sorted(a) == sorted(b) == list(range(1, 17))
    for step in a:
        assert a[step] == pytest.approx(b[step], rel=1e-6, abs=1e-7), f"step {step}"


@pytest.mark.slow
def test_nan_steps_are_skipped_then_stop(tmp_path):
    run = _run(
        tmp_path / "nan",
        "runtime.max_steps=16",
        "runtime.max_bad_steps=3",
        env={"TOY_NAN_FROM": "8"},
    )
    assert run.returncode != 0
    assert "3 consecutive non-finite losses ending at step 10" in run.stderr
    assert "step_000006" in run.stderr  # names the last good checkpoint

"""The command line a user walks: one-line errors, --help with defaults, --print-config, run
folders that are never silently reused, scripts that run from a checkout without an install."""

from __future__ import annotations

import ast
import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from training.config import ConfigError

ROOT = Path(__file__).resolve().parents[1]
SCRIPTS = sorted(p.stem for p in (ROOT / "scripts").glob("*.py") if p.stem != "__init__")


def script(name: str, *args: str, cwd: Path | None = None) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "TESSERA_DEBUG")}
    cmd = [sys.executable, str(ROOT / "scripts" / f"{name}.py"), *args]
    return subprocess.run(
        cmd, cwd=cwd or ROOT, env=env, capture_output=True, text=True, timeout=180
    )


BAD = {
    "train_tokenizer": ["--output-dir", "{tmp}/t", "runtime.keep_last=0"],
    "train_prior": ["--output-dir", "{tmp}/p", "data.tokens={tmp}/no_tokens"],
    "export_tokens": ["--tokenizer", "{tmp}/no_tok", "--data", "digits", "--out", "{tmp}/e"],
    "generate": ["--tokenizer", "{tmp}/no_tok", "--prior", "{tmp}/no_prior"],
    "serve": ["--tokenizer", "{tmp}/no_tok", "--prior", "{tmp}/no_prior"],
    "evaluate": ["--tokenizer", "{tmp}/no_tok"],
    "export_llama": ["--prior", "{tmp}/no_prior", "--out", "{tmp}/l"],
    "distill_tree_draft": ["--prior", "{tmp}/no_prior", "--out", "{tmp}/t"],
    "demo": ["--output-dir", "{tmp}/d", "seed=many"],
    "compare_estimators": ["--output-dir", "{tmp}/c", "runtime.max_stepz=3"],
    "demo_seeds": ["--output-dir", "{tmp}/d", "--seeds", "0"],
    "tokenizer_seeds": ["--configs", "{tmp}/none.yaml", "--output-dir", "{tmp}/s"],
}


@pytest.mark.slow
@pytest.mark.parametrize("name", SCRIPTS)
def test_a_bad_argument_is_one_line_on_stderr(name, tmp_path):
    """Run from another folder (the scripts put their checkout on sys.path themselves)."""
    args = [a.format(tmp=tmp_path) for a in BAD[name]]
    done = script(name, *args, cwd=tmp_path)
    lines = [line for line in done.stderr.splitlines() if line.strip()]
    assert done.returncode == 2, done.stderr
    assert len(lines) == 1 and lines[0].startswith("error: "), done.stderr
    assert "Traceback" not in done.stderr


def test_every_script_is_covered_and_runs_from_its_checkout():
    assert set(BAD) == set(SCRIPTS)
    for name in SCRIPTS:
        tree = ast.parse((ROOT / "scripts" / f"{name}.py").read_text())
        first_project_import = next(
            i for i, node in enumerate(tree.body)
            if isinstance(node, ast.ImportFrom) and (node.module or "").split(".")[0]
            in ("training", "tokenizer", "prior", "sampling", "evaluation")
        )  # fmt: skip
        before = ast.unparse(tree.body[:first_project_import])
        assert "sys.path.insert(0" in before, name  # the checkout, before any project import


def test_help_shows_defaults():
    done = script("generate", "--help")
    assert done.returncode == 0 and "(default: 1.0)" in done.stdout  # --guidance


def test_print_config_prints_resolved_yaml(tmp_path):
    from scripts.train_prior import main

    with pytest.raises(SystemExit) as stop:
        main(["--output-dir", str(tmp_path / "p"), "--print-config", "runtime.max_steps=7"])
    assert stop.value.code == 0
    assert not (tmp_path / "p").exists()  # nothing written
    done = script("export_tokens", "--tokenizer", "t", "--data", "digits", "--out", "o",
                  "--views", "3", "--print-config")  # fmt: skip
    assert yaml.safe_load(done.stdout)["views"] == 3


def test_resume_and_overwrite_exclude_each_other(tmp_path):
    from scripts.train_prior import main

    with pytest.raises(ConfigError, match="exclude each other"):
        main(["--output-dir", str(tmp_path), "--resume", "latest", "--overwrite"])


def test_logs_in_a_file_are_summary_lines_not_a_bar(tmp_path):
    """stdout/stderr to a file (as under CI or nohup): one line every log_every steps."""
    toy = ROOT / "tests" / "fixtures" / "toy_train.py"
    cmd = [sys.executable, str(toy), "--output-dir", str(tmp_path / "run"),
           "runtime.progress=true", "runtime.log_every=4"]  # fmt: skip
    done = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    lines = [line for line in done.stdout.splitlines() if line.startswith("step ")]
    assert [line.split(":")[0] for line in lines] == ["step 4/12", "step 8/12", "step 12/12"]
    assert "loss" in lines[0] and "steps/s" in lines[0]
    assert "\r" not in done.stdout + done.stderr and "it/s" not in done.stderr  # no bar


@pytest.mark.slow
def test_wheel_ships_commands_scripts_and_configs(tmp_path):
    """`pip install .` gives console commands, the scripts and the ready configs; an installed
    command finds `--config configs/...` from any folder (training.config.find_config)."""
    import zipfile

    build = [sys.executable, "-m", "pip", "wheel", str(ROOT), "--no-deps", "--no-build-isolation",
             "-q", "-w", str(tmp_path)]  # fmt: skip
    subprocess.run(build, cwd=tmp_path, check=True, capture_output=True, timeout=300)
    (wheel,) = tmp_path.glob("tessera-*.whl")
    names = set(zipfile.ZipFile(wheel).namelist())
    assert {"configs/tokenizer/digits.yaml", "configs/prior/digits_gpt.yaml",
            "scripts/train_prior.py", "scripts/generate.py"} <= names  # fmt: skip
    entry = (
        zipfile.ZipFile(wheel)
        .read(next(n for n in names if n.endswith("entry_points.txt")))
        .decode()
    )
    for command in ("tessera-train-tokenizer", "tessera-train-prior", "tessera-generate",
                    "tessera-evaluate", "tessera-export-tokens", "tessera-export-llama"):  # fmt: skip
        assert command in entry
    for line in entry.splitlines():  # every target exists
        if "=" in line:
            module, func = line.split("=")[1].strip().split(":")
            assert callable(getattr(__import__(module, fromlist=[func]), func)), line


def test_shipped_configs_are_found_from_any_folder(tmp_path, monkeypatch):
    from training.config import find_config

    monkeypatch.chdir(tmp_path)
    found = find_config(Path("configs/tokenizer/digits.yaml"))
    assert found.is_absolute() and found == ROOT / "configs" / "tokenizer" / "digits.yaml"
    assert (
        find_config(Path("prior/digits_gpt.yaml")) == ROOT / "configs" / "prior" / "digits_gpt.yaml"
    )
    assert find_config(Path("mine.yaml")) == Path("mine.yaml")  # not shipped: left as given

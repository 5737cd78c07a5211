"""Stay up and lose nothing: one test (or more) per finding of the adversarial run (issue 14).

1 empty epochs hang -> test_dataset_smaller_than_one_batch_*;
2 two runs on one folder -> test_second_run_on_a_folder_is_refused_*, test_stale_lock_*;
3 keep_last=0 / incomplete folder -> test_keep_last_zero_*, test_checkpoint_missing_a_file_*;
4 non-finite sampling / images / weights -> test_non_finite_*, test_encode_*, test_weights_*;
5 silently inexact resume -> test_tampered_or_deleted_random_state_*, test_step_claim_*;
6 stray root image -> test_stray_root_image_*;  7 degenerate sizes -> test_degenerate_*;
8 unbounded allocation -> test_huge_sizes_*;  9 anonymous failures -> test_disk_full_*,
test_damaged_checkpoint_files_*, test_missing_tokenizer_folder_*, test_truncated_weights_*;
10 prune / latest / duplicate rows / leftovers / fsync -> test_kill_mid_prune_*,
test_latest_outside_*, test_resume_keeps_one_metrics_row_*, test_leftover_temporaries_*,
test_checkpoint_is_flushed_before_it_becomes_visible.

Disk-full and kill-mid-prune use fault injection (monkeypatched writes / deletes): a small real
filesystem needs mount privileges the test machine may not give.
"""

from __future__ import annotations

import dataclasses
import errno
import importlib.util
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import pytest
import torch
from accelerate import Accelerator
from accelerate.state import AcceleratorState, GradientState
from PIL import Image
from safetensors.torch import load_file, save_file

from prior import GPT, GPTConfig, load_prior
from sampling import Pipeline
from sampling.guidance import GuidanceSchedule
from sampling.logits import SamplingConfig
from tokenizer import Tokenizer, TokenizerConfig
from tokenizer.data import DataConfig, load_image_dataset
from tokenizer.quantizers import QuantizerConfig
from tokenizer.trainer import TokenizerTrainConfig
from training import checkpoint as checkpoint_module
from training.checkpoint import CheckpointError
from training.config import ConfigError, load_config
from training.loop import EmptyEpochError
from training.run_lock import LOCK_FILE, RunFolderBusyError, RunLock
from training.runtime import OptimConfig, RuntimeConfig
from training.serialization import WriteError, file_sha256

ROOT = Path(__file__).resolve().parents[1]
TOY = ROOT / "tests" / "fixtures" / "toy_train.py"
_spec = importlib.util.spec_from_file_location("toy_train", TOY)
toy = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(toy)


def fresh_accelerate() -> None:
    AcceleratorState._reset_state(True)
    GradientState._reset_state()


def toy_run(out: Path, *args: str) -> None:
    """The toy regression run in this process (12 steps, checkpoints every 3, EMA on)."""
    fresh_accelerate()
    toy.main(["--output-dir", str(out), *args])


def toy_process(out: Path, *args: str, env: dict | None = None, **kw) -> subprocess.Popen:
    full_env = {**os.environ, "TOY_DROPOUT": "0.3", **(env or {})}
    cmd = [sys.executable, str(TOY), "--output-dir", str(out), *args]
    return subprocess.Popen(cmd, cwd=ROOT, env=full_env, text=True, **kw)


def checkpoints(out: Path) -> Path:
    return out / "checkpoints"


@contextmanager
def deadline(seconds: int):
    """Fail instead of hanging forever (the regression finding 1 guards against)."""

    def expire(*_):
        raise TimeoutError(f"still running after {seconds} s")

    previous = signal.signal(signal.SIGALRM, expire)
    signal.alarm(seconds)
    try:
        yield
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, previous)


# ---- 1: an epoch without a batch -----------------------------------------------------------------
TOKENIZER_TINY = [
    "runtime.tracker=none", "runtime.progress=false", "runtime.max_steps=2", "data.resolution=16",
    "model.resolution=16", "model.encoder_channels=8", "model.decoder_channels=8",
    "model.ch_mult=[1,2,2]", "model.latent_dim=8", "model.norm_groups=4",
    "model.quantizer.codebook_size=16", "eval.max_images=4", "data.eval_split=null",
]  # fmt: skip


def test_dataset_smaller_than_one_batch_is_an_error_not_a_hang(tmp_path):
    from tokenizer.trainer import train

    cfg = load_config(
        TokenizerTrainConfig,
        ROOT / "configs" / "tokenizer" / "digits.yaml",
        [*TOKENIZER_TINY, "data.max_samples=3", "runtime.batch_size=8"],
    )
    with deadline(120), pytest.raises(EmptyEpochError, match=r"3 rows.*needs 8"):
        train(cfg, tmp_path / "tok")


def test_dataset_smaller_than_one_batch_prior(tmp_path):
    from prior.train_config import PriorTrainConfig
    from prior.trainer import train
    from tokenizer.export import ExportConfig, export_tokens

    tok = _tokenizer()
    data = load_image_dataset(DataConfig(source="digits", resolution=16, max_samples=3))
    tokens = export_tokens(
        tok, data, tmp_path / "tokens", ExportConfig(views=1, progress=False), {"data": "digits"}
    )
    cfg = load_config(
        PriorTrainConfig,
        ROOT / "configs" / "prior" / "digits_gpt.yaml",
        [f"data.tokens={tokens}", "data.val_tokens=", "data.val_fraction=0",
         "runtime.batch_size=16", "runtime.tracker=none", "runtime.progress=false",
         "model.gpt.dim=16", "model.gpt.n_layers=1"],
    )  # fmt: skip
    fresh_accelerate()
    with deadline(120), pytest.raises(EmptyEpochError, match=r"3 rows.*needs 16"):
        train(cfg, tmp_path / "prior")


def _tokenizer(seed: int = 0) -> Tokenizer:
    torch.manual_seed(seed)
    cfg = TokenizerConfig(
        resolution=16, encoder_channels=8, decoder_channels=8, ch_mult=[1, 2, 2], num_res_blocks=1,
        latent_dim=4, norm_groups=4, mid_attention=False,
        quantizer=QuantizerConfig(kind="vq", codebook_size=16),
    )  # fmt: skip
    return Tokenizer(cfg).eval()


# ---- 2: two runs, one folder ---------------------------------------------------------------------
@pytest.mark.slow
def test_second_run_on_a_folder_is_refused_and_the_first_equals_a_lone_run(tmp_path):
    lone = toy_process(tmp_path / "lone")  # the reference, on the other core meanwhile
    shared, go = tmp_path / "shared", tmp_path / "go"
    first = toy_process(
        shared, env={"TOY_WAIT_AT": "5", "TOY_WAIT_FILE": str(go)}, stdout=subprocess.PIPE
    )
    while (line := first.stdout.readline()) and line.strip() != "waiting":
        pass
    assert line.strip() == "waiting"  # alive, holding the folder, at step 5
    second = toy_process(shared, stderr=subprocess.PIPE)
    _, err = second.communicate(timeout=120)
    assert second.returncode != 0
    assert f"in use by another run (pid {first.pid}" in err
    go.touch()
    assert first.wait(timeout=120) == 0 and lone.wait(timeout=120) == 0
    last = "checkpoints/step_000012/model.safetensors"
    assert file_sha256(shared / last) == file_sha256(tmp_path / "lone" / last)
    assert not (shared / LOCK_FILE).exists()  # released at the end


def test_lock_is_exclusive_and_names_its_owner(tmp_path):
    with RunLock(tmp_path):
        with pytest.raises(RunFolderBusyError, match=rf"pid {os.getpid()} on host"):
            RunLock(tmp_path).acquire()
    with RunLock(tmp_path):  # released: free again
        pass


@pytest.mark.slow
def test_stale_lock_of_a_killed_run_is_taken_over(tmp_path):
    out = tmp_path / "run"
    killed = toy_process(out, env={"TOY_KILL_AT": "5"})
    assert killed.wait(timeout=120) == -signal.SIGKILL
    owner = json.loads((out / LOCK_FILE).read_text())
    assert owner["pid"] == killed.pid  # the file stayed behind, its flock died with the process
    resumed = toy_process(out, "--resume", "latest", stdout=subprocess.PIPE)
    stdout, _ = resumed.communicate(timeout=120)
    assert resumed.returncode == 0
    assert f"no longer alive (pid {killed.pid}" in stdout and "resumed from" in stdout


# ---- 3: keep_last=0, a folder missing a file ----------------------------------------------------
def test_keep_last_zero_is_refused_at_config_load():
    with pytest.raises(ConfigError, match="runtime.keep_last must be >= 1"):
        load_config(RuntimeConfig, None, ["keep_last=0"])


@pytest.fixture(scope="module")
def finished_toy(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("toy") / "run"
    toy_run(out)
    return out


def copy_run(run: Path, tmp_path: Path) -> Path:
    target = tmp_path / "run"
    shutil.copytree(run, target)
    return target


def resume(out: Path, spec: str = "latest", *args: str) -> None:
    toy_run(out, "runtime.max_steps=15", "--resume", spec, *args)


def test_checkpoint_missing_a_file_is_refused_naming_it(finished_toy, tmp_path):
    run = copy_run(finished_toy, tmp_path)
    (checkpoints(run) / "step_000012" / "model.safetensors").unlink()
    with pytest.raises(CheckpointError, match=r"step_000012/model\.safetensors: listed .* missing"):
        resume(run)


# ---- 5: silently inexact resume -------------------------------------------------------------------
@pytest.mark.parametrize("damage", ["tamper", "delete"])
def test_tampered_or_deleted_random_state_is_refused(finished_toy, tmp_path, damage):
    run = copy_run(finished_toy, tmp_path)
    rng = checkpoints(run) / "step_000012" / "random_states_0.pkl"
    if damage == "delete":
        rng.unlink()
    else:
        state = torch.load(rng, weights_only=False)  # our own file, written by this test's run
        state["torch_manual_seed"] = torch.ByteTensor(state["torch_manual_seed"]).flip(0)
        torch.save(state, rng)
    with pytest.raises(CheckpointError, match=r"random_states_0\.pkl"):
        resume(run)


def test_step_claim_that_disagrees_with_the_folder_is_refused(finished_toy, tmp_path):
    run = copy_run(finished_toy, tmp_path)
    folder = checkpoints(run) / "step_000012"
    state = json.loads((folder / "trainer_state.json").read_text())
    (folder / "trainer_state.json").write_text(json.dumps({**state, "step": 55}))
    checkpoint_module.write_manifest(folder, 55)  # even a consistent manifest cannot rename it
    with pytest.raises(CheckpointError, match=r"step disagrees.*says 55.*step_000012 says 12"):
        resume(run, str(folder))


# ---- 9: damaged files name themselves -------------------------------------------------------------
@pytest.mark.parametrize("name", ["optimizer.bin", "scheduler.bin", "trainer_state.json"])
def test_damaged_checkpoint_files_are_named(finished_toy, tmp_path, name):
    run = copy_run(finished_toy, tmp_path)
    file = checkpoints(run) / "step_000012" / name
    file.write_bytes(file.read_bytes()[: len(file.read_bytes()) // 2])
    with pytest.raises(CheckpointError, match=rf"step_000012/{name}"):
        resume(run)


def test_bad_trainer_state_without_manifest_help_is_named(finished_toy, tmp_path):
    run = copy_run(finished_toy, tmp_path)
    folder = checkpoints(run) / "step_000012"
    (folder / "trainer_state.json").write_text("{not json")
    checkpoint_module.write_manifest(folder, 12)
    with pytest.raises(CheckpointError, match=r"trainer_state\.json: not valid JSON"):
        resume(run)


def test_disk_full_mid_checkpoint_is_said_and_loses_nothing(finished_toy, tmp_path, monkeypatch):
    run = copy_run(finished_toy, tmp_path)
    before = {p.name: file_sha256(p) for p in (checkpoints(run) / "step_000012").iterdir()}
    real_save = Accelerator.save_state

    def full_disk(self, output_dir=None, **kw):
        real_save(self, output_dir, **kw)
        raise RuntimeError(
            "[enforce fail at inline_container.cc:783] . unexpected pos 473920 vs 473808"
        )

    monkeypatch.setattr(Accelerator, "save_state", full_disk)
    monkeypatch.setattr(shutil, "disk_usage", lambda _: shutil._ntuple_diskusage(10, 10, 0))
    with pytest.raises(WriteError, match=r"step_000015: no space left on device.*intact"):
        resume(run)
    monkeypatch.undo()
    assert {p.name for p in checkpoints(run).iterdir()} == {"latest", "step_000009", "step_000012"}
    after = {p.name: file_sha256(p) for p in (checkpoints(run) / "step_000012").iterdir()}
    assert after == before
    resume(run)  # and the run goes on from there
    assert (checkpoints(run) / "step_000015").is_dir()


def test_enospc_from_a_plain_write_is_said(tmp_path, monkeypatch):
    from training.serialization import atomic_write_text

    def no_space(*_, **__):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(os, "fsync", no_space)
    with pytest.raises(WriteError, match=r"x\.txt: no space left on device"):
        atomic_write_text(tmp_path / "x.txt", "hello")
    assert list(tmp_path.iterdir()) == []


def test_missing_tokenizer_folder_is_not_a_hub_error(tmp_path):
    for path in (tmp_path / "no_such_tok", "tests/no_such_tok", "a/b/c"):  # paths, never repo ids
        start = time.perf_counter()
        with pytest.raises(FileNotFoundError, match="no such local folder"):
            Tokenizer.from_pretrained(path)
        assert time.perf_counter() - start < 5  # refused here, the Hub never asked
    with pytest.raises(FileNotFoundError, match="prior folder .* not found"):
        load_prior(tmp_path / "no_such_prior")


# ---- 10: prune, latest, duplicate rows, leftovers, fsync ------------------------------------------
def test_kill_mid_prune_leaves_no_half_checkpoint(finished_toy, tmp_path, monkeypatch):
    run = copy_run(finished_toy, tmp_path)
    real_rmtree = shutil.rmtree

    def killed_while_deleting(path, *a, **kw):  # a SIGKILL half way through deleting
        if ".trash-" in str(path):
            victim = sorted(Path(path).iterdir())[0]
            victim.unlink()
            raise KeyboardInterrupt("killed mid-prune")
        return real_rmtree(path, *a, **kw)

    monkeypatch.setattr(shutil, "rmtree", killed_while_deleting)
    with pytest.raises(KeyboardInterrupt):
        resume(run)
    monkeypatch.undo()
    names = sorted(p.name for p in checkpoints(run).iterdir())
    assert "step_000009" not in names  # the pruned one is out of sight, renamed first
    assert [n for n in names if n.startswith(".trash-step_000009")]
    with pytest.raises(CheckpointError, match="not a complete checkpoint"):
        resume(run, str(checkpoints(run) / next(n for n in names if n.startswith(".trash"))))
    resume(run)  # the next run removes the half-deleted folder and carries on
    assert not [p for p in checkpoints(run).iterdir() if p.name.startswith(".")]


def test_latest_outside_the_run_folder_is_not_followed(finished_toy, tmp_path):
    run = copy_run(finished_toy, tmp_path)
    elsewhere = copy_run(finished_toy, tmp_path / "other")
    (checkpoints(run) / "latest").write_text("../../other/run/checkpoints/step_000012")
    manager = checkpoint_module.CheckpointManager(None, run)
    assert manager.latest() == checkpoints(run) / "step_000012"
    assert elsewhere.is_dir()


def test_resume_keeps_one_metrics_row_per_step(tmp_path):
    out = tmp_path / "run"
    killed = toy_process(out, env={"TOY_KILL_AT": "8"})
    assert killed.wait(timeout=120) == -signal.SIGKILL
    steps = [json.loads(line)["step"] for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert steps == list(range(1, 8))  # steps 7 logged after the step-6 checkpoint
    resume(out, "latest", "runtime.max_steps=12")
    steps = [json.loads(line)["step"] for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert steps == list(range(1, 13))


def test_leftover_temporaries_are_removed_by_the_next_run(finished_toy, tmp_path):
    run = copy_run(finished_toy, tmp_path)
    (checkpoints(run) / ".tmp-step_000015-0123456789ab").mkdir()
    (checkpoints(run) / ".tmp-step_000015-0123456789ab" / "model.safetensors").write_bytes(b"x")
    resume(run)
    assert not [p for p in checkpoints(run).iterdir() if p.name.startswith(".")]


def test_checkpoint_is_flushed_before_it_becomes_visible(tmp_path, monkeypatch):
    flushed: list[tuple[str, bool]] = []
    real = checkpoint_module.fsync_tree

    def record(path):
        final = Path(path).parent / "step_000003"
        flushed.append((Path(path).name, final.exists()))
        real(path)

    monkeypatch.setattr(checkpoint_module, "fsync_tree", record)
    toy_run(tmp_path / "run", "runtime.max_steps=3")
    assert len(flushed) == 1 and flushed[0][0].startswith(".tmp-step_000003-")
    assert flushed[0][1] is False  # flushed while still under its temporary name


# ---- 4: non-finite numbers ------------------------------------------------------------------------
@pytest.fixture(scope="module")
def pipe() -> Pipeline:
    tok = _tokenizer()
    torch.manual_seed(0)
    cfg = GPTConfig(vocab_size=16, grid=[4, 4], num_classes=2, dim=16, n_layers=1,
                    tokenizer=tok.identity())  # fmt: skip
    return Pipeline(tok, GPT(cfg).eval())


@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"guidance_scale": float("nan")}, "guidance scale"),
        ({"guidance_scale": float("inf")}, "guidance scale"),
        ({"guidance_scale": float("-inf")}, "guidance scale"),
        ({"guidance_scale": -1.0}, "guidance scale"),
        ({"temperature": float("nan")}, "temperature"),
        ({"temperature": float("inf")}, "temperature"),
        ({"top_p": float("nan")}, "top_p"),
    ],
)
def test_non_finite_sampling_settings_are_refused(pipe, kwargs, match):
    with pytest.raises(ValueError, match=match):
        pipe([0], **kwargs)


def test_non_finite_settings_in_the_configs():
    with pytest.raises(ValueError, match="temperature"):
        SamplingConfig(temperature=float("nan"))
    with pytest.raises(ValueError, match="guidance scale"):
        GuidanceSchedule(float("nan"))


def test_generate_cli_refuses_nan_guidance(tmp_path, pipe):
    from scripts.generate import main as generate_main

    pipe.tokenizer.save_pretrained(tmp_path / "tok")
    pipe.prior.save_pretrained(tmp_path / "prior")
    argv = ["--tokenizer", str(tmp_path / "tok"), "--prior", str(tmp_path / "prior"),
            "--prompt", "0", "--out", str(tmp_path / "x.png")]  # fmt: skip
    with pytest.raises((ValueError, SystemExit)):
        generate_main([*argv, "--guidance", "nan"])
    assert not (tmp_path / "x.png").exists()


def test_encode_refuses_nan_and_unscaled_pixels():
    tok = _tokenizer()
    ok = torch.rand(2, 3, 16, 16) * 2 - 1
    assert tok.encode(ok).shape == (2, 4, 4)
    with pytest.raises(ValueError, match="NaN"):
        tok.encode(torch.full((1, 3, 16, 16), float("nan")))
    with pytest.raises(ValueError, match=r"\[-1, 1\].*x / 127\.5 - 1"):
        tok.encode(torch.rand(1, 3, 16, 16) * 255)


def test_weights_full_of_nan_or_bit_flipped_are_refused(pipe, tmp_path):
    for name, model, load in (
        ("prior", pipe.prior, load_prior),
        ("tok", pipe.tokenizer, Tokenizer.from_pretrained),
    ):
        folder = tmp_path / name
        model.save_pretrained(folder)
        weights = folder / "model.safetensors"
        load(folder)  # a clean save loads
        data = bytearray(weights.read_bytes())
        data[-3] ^= 0x10  # one bit of the last tensor
        weights.write_bytes(bytes(data))
        with pytest.raises(ValueError, match=rf"{name}/model\.safetensors: .*checksum"):
            load(folder)
        tensors = {
            k: torch.full_like(v, float("nan")) if v.is_floating_point() else v
            for k, v in load_file(weights).items()
        }
        save_file(tensors, weights)  # no checksum recorded: the finiteness check still holds
        with pytest.raises(ValueError, match=r"model\.safetensors: tensor .* NaN"):
            load(folder)


def test_truncated_weights_are_named(pipe, tmp_path):
    pipe.prior.save_pretrained(tmp_path / "prior")
    weights = tmp_path / "prior" / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:-100])
    with pytest.raises(ValueError, match=r"prior/model\.safetensors: unreadable"):
        load_prior(tmp_path / "prior")


# ---- 6: a stray image at the root of a labelled folder --------------------------------------------
def test_stray_root_image_warns_and_keeps_the_labels(tmp_path):
    rng = np.random.default_rng(0)
    for label in ("cat", "dog"):
        for i in range(3):
            (tmp_path / label).mkdir(exist_ok=True)
            Image.fromarray(rng.integers(0, 255, (16, 16, 3), np.uint8)).save(
                tmp_path / label / f"{i}.png"
            )
    Image.fromarray(rng.integers(0, 255, (16, 16, 3), np.uint8)).save(tmp_path / "stray.png")
    cfg = DataConfig(source=str(tmp_path), resolution=16, eval_split=None)
    with pytest.warns(UserWarning, match=r"skipped 1 image\(s\) at the root.*stray\.png"):
        ds = load_image_dataset(cfg)
    assert ds.features["label"].names == ["cat", "dog"] and len(ds) == 6
    assert sorted(ds["label"]) == [0, 0, 0, 1, 1, 1]
    with pytest.raises(ValueError, match=r"stray\.png"):
        load_image_dataset(DataConfig(source=str(tmp_path), resolution=16, strict=True))


# ---- 7, 8: degenerate and huge sizes --------------------------------------------------------------
@pytest.mark.parametrize(
    "override, match",
    [
        ("model.gpt.dim=0", "dim must be >= 1"),
        ("model.gpt.n_layers=0", "n_layers must be >= 1"),
        ("optim.warmup_steps=-5", "warmup_steps must be >= 0"),
        ("optim.lr=nan", "optim.lr must be a finite number"),
        ("runtime.log_every=0", "log_every must be >= 1"),
        ("runtime.eval_every=0", "eval_every must be >= 1"),
        ("model.gpt.grid=[100000,100000]", "grid must be"),
        ("sample.seed=1", None),
    ],
)
def test_degenerate_sizes_are_refused_at_config_load(override, match):
    from prior.train_config import PriorTrainConfig

    path = ROOT / "configs" / "prior" / "digits_gpt.yaml"
    if match is None:
        load_config(PriorTrainConfig, path, [override])
        return
    with pytest.raises(ConfigError, match=match):
        load_config(PriorTrainConfig, path, [override])


@dataclasses.dataclass
class Nested:
    optim: OptimConfig = dataclasses.field(default_factory=OptimConfig)
    scales: list[float] = dataclasses.field(default_factory=lambda: [1.0, 2.0])


def test_non_finite_float_anywhere_in_a_config_is_named(tmp_path):
    with pytest.raises(ConfigError, match=r"key 'scales\.1' must be a finite number, got nan"):
        load_config(Nested, None, ["scales=[1.0,nan]"])
    with pytest.raises(ConfigError, match="optim.weight_decay must be finite"):
        load_config(Nested, None, ["optim.weight_decay=inf"])


def test_huge_sizes_in_config_json_are_refused_before_allocating(pipe, tmp_path):
    pipe.prior.save_pretrained(tmp_path / "prior")
    config = json.loads((tmp_path / "prior" / "config.json").read_text())
    (tmp_path / "prior" / "config.json").write_text(
        json.dumps({**config, "grid": [100000, 100000]})
    )
    start = time.perf_counter()
    with pytest.raises(ConfigError, match=r"config\.json: grid must be"):
        load_prior(tmp_path / "prior")
    assert time.perf_counter() - start < 5  # refused, not allocated
    pipe.tokenizer.save_pretrained(tmp_path / "tok")
    config = json.loads((tmp_path / "tok" / "config.json").read_text())
    config["quantizer"]["codebook_size"] = 2**31
    (tmp_path / "tok" / "config.json").write_text(json.dumps(config))
    with pytest.raises(ConfigError, match=r"config\.json: .*2147483648 codes, more than 65536"):
        Tokenizer.from_pretrained(tmp_path / "tok")


def test_checkpoint_of_an_older_version_resumes_unverified_with_a_warning(finished_toy, tmp_path):
    """Checkpoints written before manifests existed still resume (and say they are unverified)."""
    run = copy_run(finished_toy, tmp_path)
    (checkpoints(run) / "step_000012" / "checkpoint.json").unlink()
    with pytest.warns(UserWarning, match=r"step_000012 has no checkpoint\.json"):
        resume(run)
    assert (checkpoints(run) / "step_000015" / "checkpoint.json").is_file()


def test_a_second_fresh_run_is_refused_and_overwrite_starts_over(finished_toy, tmp_path):
    from training.loop import RunExistsError

    run = copy_run(finished_toy, tmp_path)
    before = (run / "metrics.jsonl").read_bytes()
    with pytest.raises(RunExistsError, match="already holds a run"):
        toy_run(run)
    assert (run / "metrics.jsonl").read_bytes() == before  # nothing rewritten
    toy_run(run, "--overwrite", "runtime.max_steps=6")
    steps = [json.loads(line)["step"] for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert steps == list(range(1, 7))  # a new run from step 1, the old rows gone
    assert sorted(p.name for p in checkpoints(run).iterdir()) == [
        "latest",
        "step_000003",
        "step_000006",
    ]
    assert not [p for p in run.iterdir() if p.name.startswith(".trash-")]

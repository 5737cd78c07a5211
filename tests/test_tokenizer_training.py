"""Stage-1 training: final save that loads, resume, grids, eval.json, NaN guard, accumulation, DDP."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import load_file

from tokenizer import trainer as trainer_module
from tokenizer.data import ImageTransform, load_image_dataset
from tokenizer.model import Tokenizer
from tokenizer.trainer import TokenizerTrainConfig, train
from training.config import load_config

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "scripts" / "train_tokenizer.py"
DIGITS = ROOT / "configs" / "tokenizer" / "digits.yaml"

# 16 px digits, widths 8, 4x4 codes: a step takes milliseconds.
TINY = [
    "runtime.tracker=none",
    "runtime.progress=false",
    "runtime.log_every=1",
    "runtime.batch_size=4",
    "runtime.eval_every=100",
    "runtime.sample_every=100",
    "runtime.save_every=100",
    "data.resolution=16",
    "model.resolution=16",
    "model.encoder_channels=8",
    "model.decoder_channels=8",
    "model.ch_mult=[1,2,2]",
    "model.latent_dim=8",
    "model.norm_groups=4",
    "model.quantizer.codebook_size=32",
    "model.quantizer.dead_code_threshold=0.0",
    "loss.discriminator.num_layers=1",
    "loss.discriminator.channels=8",
    "eval.max_images=24",
    "eval.batch_size=8",
    "eval.grid_images=3",
    "optim.warmup_steps=0",
    "optim.lr=1e-3",
]
# GAN from step 1 with a batch-independent discriminator norm and a fixed GAN weight: a global
# batch split over ranks or micro-batches must then give the same update as one big batch.
# (DDP also matches with the adaptive weight, whose gradients are averaged over ranks; gradient
# accumulation computes it per micro-batch, as taming does.)
EQUIVALENT = [
    "loss.disc_weight=0.5",
    "loss.disc_start=1",
    "loss.discriminator.norm=group",
    "loss.adaptive_weight=false",
    "model.quantizer.ema=true",  # codebook moved by all-reduced statistics, not by gradients
]


def _cfg(*overrides: str) -> TokenizerTrainConfig:
    return load_config(TokenizerTrainConfig, DIGITS, [*TINY, *overrides])


def _run(out: Path, *overrides: str, resume: str | None = None) -> dict[str, float]:
    return train(_cfg(*overrides), out, resume)


def _rows(out: Path) -> list[dict]:
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


def _train_rows(out: Path) -> dict[int, dict]:
    return {r["step"]: r for r in _rows(out) if "skipped_steps" in r}


def test_train_saves_loadable_model_grid_eval_and_resumes(tmp_path):
    out = tmp_path / "run"
    overrides = [
        "runtime.max_steps=2",
        "runtime.save_every=2",
        "runtime.sample_every=2",
        "runtime.eval_every=2",
        "optim.ema_decay=0.9",
        "loss.disc_weight=0.5",
        "loss.disc_start=1",
    ]
    results = _run(out, *overrides)

    # final/ holds a tokenizer that loads and encodes, with the EMA weights
    tok = Tokenizer.from_pretrained(out / "final")
    assert sorted(p.name for p in (out / "final").iterdir()) == ["config.json", "model.safetensors"]
    images = torch.rand(2, 3, 16, 16) * 2 - 1
    codes = tok.encode(images)
    assert codes.shape == (2, 4, 4) and codes.dtype == torch.long
    assert 0 <= int(codes.min()) and int(codes.max()) < 32
    assert tok.decode(codes).shape == (2, 3, 16, 16)
    ckpt = out / "checkpoints" / "step_000002"
    ema = torch.load(ckpt / "custom_checkpoint_0.pkl", weights_only=True)["shadow"]
    final = load_file(out / "final" / "model.safetensors")
    raw = load_file(ckpt / "model.safetensors")
    key = "decoder.conv_out.weight"
    torch.testing.assert_close(final[key], ema[key], rtol=0, atol=0)
    assert not torch.equal(final[key], raw[key])  # the EMA, not the raw weights

    # eval.json: held-out metrics of the saved model
    saved = json.loads((out / "eval.json").read_text())
    for name in ("psnr", "ssim", "codebook_usage", "perplexity"):
        assert saved[name] == pytest.approx(results[name]) and np.isfinite(saved[name])
    assert saved["images"] == 24 and 0 < saved["codebook_usage"] <= 1
    assert 1 <= saved["perplexity"] <= 32

    # the grid: originals on top (exact pixels of the held-out images), reconstructions below,
    # each 16 px cell enlarged 8x (nearest), 2 px gaps, a left margin for the row labels
    grid = np.array(Image.open(out / "samples" / "recon_step_000002.png"))
    margin = 8 + 6 * len("original")
    assert grid.shape == (2 + 2 * 128 + 2 + 2, margin + 2 + 3 * 128 + 2 * 2 + 2, 3)
    cfg = _cfg()
    first = load_image_dataset(cfg.data, "test")[0]["image"]
    expected = ((ImageTransform.from_config(cfg.data, train=False)(first) + 1) * 127.5).round()
    cell = grid[2 : 2 + 128 : 8, margin + 2 : margin + 2 + 128 : 8]  # one pixel per source pixel
    top_left = torch.from_numpy(cell.astype(np.float32)).permute(2, 0, 1)
    torch.testing.assert_close(top_left, expected, atol=1, rtol=0)

    # the GAN: discriminator steps only from disc_start on
    rows = _train_rows(out)
    assert "d_loss" not in rows[1] and "g_loss" not in rows[1]
    assert np.isfinite(rows[2]["d_loss"]) and rows[2]["disc_adaptive_weight"] > 0

    # resume from latest continues the step count (no step is redone)
    resumed = _run(out, *overrides[1:], "runtime.max_steps=4", resume="latest")
    assert resumed["step"] == 4
    steps = [r["step"] for r in _rows(out) if "skipped_steps" in r]
    assert steps == [1, 2, 3, 4]
    assert (out / "checkpoints" / "step_000004" / "trainer_state.json").is_file()
    assert (out / "samples" / "recon_step_000004.png").is_file()
    assert json.loads((out / "eval.json").read_text())["step"] == 4


def test_resume_with_random_augmentation_equals_uninterrupted(tmp_path):
    """Random flips (the same generator as crops) are redrawn identically after a resume
    mid-epoch and across an epoch boundary (24 digits, batch 4: 6 steps an epoch)."""
    aug = [
        "data.max_samples=24",
        "data.flip=true",
        "runtime.max_steps=9",
        "runtime.save_every=4",
        "runtime.keep_last=3",
    ]
    _run(tmp_path / "full", *aug)
    start = tmp_path / "full" / "checkpoints" / "step_000004"
    _run(tmp_path / "resumed", *aug, resume=str(start))
    a, b = _train_rows(tmp_path / "full"), _train_rows(tmp_path / "resumed")
    assert sorted(b) == list(range(5, 10))
    for step in b:
        assert b[step]["loss"] == pytest.approx(a[step]["loss"], rel=1e-6), step
    assert _max_diff(tmp_path / "full", tmp_path / "resumed")["max"] == 0.0


def test_non_finite_loss_skips_the_update(tmp_path, monkeypatch):
    original = trainer_module.TokenizerLoss.generator_loss

    def poisoned(self, images, recon, quant_loss, step, last_layer=None):
        out = original(self, images, recon, quant_loss, step, last_layer)
        if step == 1:  # the second optimizer step
            out.loss = out.loss * float("nan")
        return out

    monkeypatch.setattr(trainer_module.TokenizerLoss, "generator_loss", poisoned)
    out = tmp_path / "nan"
    _run(out, "runtime.max_steps=3")
    rows = _train_rows(out)
    assert rows[1]["skipped_steps"] == 0 and rows[2]["skipped_steps"] == 1
    assert rows[3]["skipped_steps"] == 1 and np.isfinite(rows[3]["loss"])
    assert Tokenizer.from_pretrained(out / "final") is not None


def _max_diff(a: Path, b: Path, skip: tuple[str, ...] = ()) -> dict[str, float]:
    wa, wb = (
        load_file(a / "final" / "model.safetensors"),
        load_file(b / "final" / "model.safetensors"),
    )
    keys = [k for k in wa if not any(s in k for s in skip)]
    diffs = torch.cat([(wa[k].float() - wb[k].float()).abs().flatten() for k in keys])
    return {"max": float(diffs.max()), "mean": float(diffs.mean())}


def test_gradient_accumulation_equals_one_big_batch(tmp_path):
    common = [*EQUIVALENT, "runtime.max_steps=3", "model.quantizer.ema=false"]
    _run(tmp_path / "big", *common, "runtime.batch_size=8")
    _run(tmp_path / "acc", *common, "runtime.batch_size=4", "runtime.gradient_accumulation_steps=2")
    assert (
        sorted(_train_rows(tmp_path / "big")) == sorted(_train_rows(tmp_path / "acc")) == [1, 2, 3]
    )
    # code statistics are kept per micro-batch (usage window, EMA counts): compare the weights
    diff = _max_diff(tmp_path / "big", tmp_path / "acc", skip=("cluster_size", "usage."))
    assert diff["mean"] < 1e-6 and diff["max"] < 1e-3, diff


@pytest.mark.slow
def test_ddp_two_processes_share_codebooks_and_match_one_process(tmp_path):
    """2 CPU ranks x batch 4 == 1 process x batch 8: identical state on both ranks (codebook and
    its statistics), and the same weights and losses as one process, within float tolerance,
    with the adaptive GAN weight on (its gradient norms are taken over the global batch)."""
    shared = [*EQUIVALENT, "loss.adaptive_weight=true", "runtime.max_steps=3"]
    env = {
        **os.environ,
        "ACCELERATE_USE_CPU": "true",
        "OMP_NUM_THREADS": "1",
        trainer_module.DEBUG_RANK_STATE: "1",
    }
    ddp = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
         str(SCRIPT), "--config", str(DIGITS), "--output-dir", str(tmp_path / "ddp"),
         *TINY, *shared, "runtime.batch_size=4"],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert ddp.returncode == 0, ddp.stderr[-3000:]
    _run(tmp_path / "one", *shared, "runtime.batch_size=8")

    rank0 = load_file(tmp_path / "ddp" / "debug" / "rank0.safetensors")
    rank1 = load_file(tmp_path / "ddp" / "debug" / "rank1.safetensors")
    assert rank0.keys() == rank1.keys()
    assert "quantizer.embedding.cluster_size" in rank0 and "quantizer.embedding.embed_sum" in rank0
    for key in rank0:
        assert torch.equal(rank0[key], rank1[key]), key

    diff = _max_diff(tmp_path / "ddp", tmp_path / "one")
    assert diff["mean"] < 1e-6 and diff["max"] < 1e-3, diff
    one = load_file(tmp_path / "one" / "final" / "model.safetensors")
    torch.testing.assert_close(
        rank0["quantizer.embedding.weight"], one["quantizer.embedding.weight"], atol=1e-5, rtol=1e-5
    )
    a, b = _train_rows(tmp_path / "ddp"), _train_rows(tmp_path / "one")
    assert sorted(a) == sorted(b) == [1, 2, 3]
    for step in a:  # logged metrics are means over ranks = the global batch's
        for name in ("rec_loss", "loss", "quant/perplexity"):
            assert a[step][name] == pytest.approx(b[step][name], rel=1e-4), (step, name)
    for name in ("d_loss", "disc_adaptive_weight"):  # the GAN runs from the second step
        assert a[3][name] == pytest.approx(b[3][name], rel=1e-4), name
    assert a[2]["disc_adaptive_weight"] == pytest.approx(b[2]["disc_adaptive_weight"], rel=1e-4)


def test_config_rejects_inconsistent_sizes():
    with pytest.raises(ValueError, match="data.resolution"):
        load_config(TokenizerTrainConfig, DIGITS, ["data.resolution=64"])
    with pytest.raises(ValueError, match="num_layers=3 needs images of at least 24px"):
        _cfg("loss.disc_weight=0.5", "loss.discriminator.num_layers=3")

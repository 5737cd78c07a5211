"""Stage-2 training end to end on tiny exports: GPT, MaskGIT, RQ; checks, resume, loading."""

import importlib.util
import json
from pathlib import Path

import datasets
import numpy as np
import pytest
import torch
from test_export import export, tiny_tokenizer

from prior import load_prior
from prior.configs import TokenizerInfo
from prior.tokens import TokenDataset, split_by_image
from tokenizer.manifest import TokenizerIdentity, read_manifest

ROOT = Path(__file__).resolve().parents[1]
_spec = importlib.util.spec_from_file_location(
    "train_prior_script", ROOT / "scripts" / "train_prior.py"
)
train_script = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(train_script)

TINY = [
    "runtime.batch_size=8", "runtime.log_every=1", "runtime.eval_every=2", "runtime.sample_every=4",
    "runtime.save_every=2", "runtime.tracker=none", "runtime.progress=false", "optim.lr=0.01",
    "optim.warmup_steps=1", "sample.rows=2", "sample.per_row=2", "data.val_fraction=0.2",
]  # fmt: skip


@pytest.fixture(scope="module")
def exports(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("tokens")
    vq, rq = tiny_tokenizer("vq"), tiny_tokenizer("rq")
    vq.save_pretrained(root / "tok-vq")
    rq.save_pretrained(root / "tok-rq")
    return {
        "vq": export(vq, root / "vq", n=20, views=2),
        "rq": export(rq, root / "rq", n=20, views=1),
        "other": export(tiny_tokenizer("vq", seed=1), root / "other", n=4, views=1),
        "tok-vq": root / "tok-vq",
        "tok-rq": root / "tok-rq",
    }


def train(
    out: Path, tokens: Path, *overrides: str, steps: int = 4, resume: str | None = None
) -> Path:
    """scripts/train_prior.py in this process (sample grids need data.tokenizer, else skipped)."""
    argv = ["--output-dir", str(out), f"data.tokens={tokens}", f"runtime.max_steps={steps}", *TINY]
    argv += list(overrides) + (["--resume", resume] if resume else [])
    train_script.main(argv)
    return out


def metrics(out: Path) -> list[dict]:
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


def check_run(out: Path, tokens: Path, kind: str, steps: int) -> None:
    prior = load_prior(out / "final")
    manifest = read_manifest(tokens)
    assert prior.config.model_type == kind
    assert prior.config.tokenizer == TokenizerIdentity.from_manifest(
        manifest
    )  # identity travels with the prior
    assert prior.config.vocab_size == manifest["tokenizer"]["codebook_size"]
    rows = metrics(out)
    val_rows = [r for r in rows if "val_loss" in r]
    assert [r["step"] for r in val_rows] == list(range(2, steps + 1, 2))
    assert all(np.isfinite(r["val_loss"]) and 0 <= r["val_accuracy"] <= 1 for r in val_rows)
    assert all(np.isfinite(r["loss"]) and "accuracy" in r for r in rows if "loss" in r)


# warmup longer than the run: the LR of steps 1..4 does not depend on max_steps, so a run stopped
# at step 2 and resumed must equal the uninterrupted one bit for bit (dropout, EMA and all)
RESUMABLE = ("optim.ema_decay=0.9", "model.gpt.dropout=0.1", "optim.warmup_steps=10")


@pytest.fixture(scope="module")
def gpt_run(tmp_path_factory, exports) -> Path:
    out = tmp_path_factory.mktemp("gpt") / "run"
    return train(out, exports["vq"], *RESUMABLE, f"data.tokenizer={exports['tok-vq']}")


def test_gpt_trains_samples_and_saves_a_loadable_final(gpt_run, exports):
    check_run(gpt_run, exports["vq"], "gpt", 4)
    assert (gpt_run / "samples" / "step_000004.png").is_file()  # decoded with the tokenizer


@pytest.mark.parametrize("kind,tokens", [("maskgit", "vq"), ("rq_transformer", "rq")])
def test_maskgit_and_rq_train_and_save(tmp_path, exports, kind, tokens):
    tok = f"data.tokenizer={exports['tok-' + tokens]}"
    out = train(
        tmp_path / kind,
        exports[tokens],
        f"model.type={kind}",
        tok,
        "runtime.sample_every=2",
        steps=2,
    )
    check_run(out, exports[tokens], kind, 2)
    assert (out / "samples" / "step_000002.png").is_file()


def test_resume_equals_uninterrupted_run(tmp_path, exports, gpt_run):
    # the first half also samples and evaluates every step: hooks must not move the RNG streams
    hooks = (
        "runtime.sample_every=1",
        "runtime.eval_every=1",
        f"data.tokenizer={exports['tok-vq']}",
    )
    split = train(tmp_path / "b", exports["vq"], *RESUMABLE, *hooks, steps=2)
    assert (split / "samples" / "step_000001.png").is_file()
    train(split, exports["vq"], *RESUMABLE, "runtime.sample_every=100", steps=4, resume="latest")
    a = (gpt_run / "final" / "model.safetensors").read_bytes()
    b = (split / "final" / "model.safetensors").read_bytes()
    assert a == b
    assert [r["step"] for r in metrics(split) if "loss" in r] == [1, 2, 3, 4]


def test_mismatched_tokens_are_refused_naming_the_fields(tmp_path, exports):
    info = TokenizerIdentity.from_manifest(read_manifest(exports["vq"]))
    wrong = TokenizerInfo(hash="0" * 64, codebook_size=64, grid=[2, 2], depth=2)
    with pytest.raises(ValueError) as err:
        TokenDataset(exports["vq"], expected=wrong)
    for name in ("hash", "codebook_size", "grid", "depth"):
        assert name in str(err.value)
    TokenDataset(exports["vq"], expected=info)  # the matching identity is accepted
    # a held-out export from another tokenizer (same geometry, other weights): the hash differs
    with pytest.raises(ValueError, match="hash") as err:
        train(tmp_path / "x", exports["vq"], f"data.val_tokens={exports['other']}")
    assert "codebook_size" not in str(err.value)
    with pytest.raises(ValueError, match="rq_transformer"):
        train(tmp_path / "y", exports["rq"], "model.type=gpt")


def test_out_of_range_codes_are_refused(tmp_path, exports):
    src = exports["vq"]
    ds = datasets.load_from_disk(str(src))
    codes = ds.with_format("numpy", dtype=np.uint16)["codes"][:]
    codes[5, 1, 2] = 40  # codebook_size is 32
    bad = ds.map(lambda row, i: {"codes": codes[i]}, with_indices=True, features=ds.features)
    bad.save_to_disk(str(tmp_path / "bad"))
    for name in ("manifest.json", "codebook.safetensors"):
        (tmp_path / "bad" / name).write_bytes((src / name).read_bytes())
    with pytest.raises(ValueError, match=r"outside \[0, 32\).*row 5.*code 40"):
        TokenDataset(tmp_path / "bad")
    with pytest.raises(ValueError, match="outside"):
        TokenDataset(tmp_path / "bad", in_memory=False)


def test_batches_and_held_out_split(exports):
    train_rows, val_rows = split_by_image(exports["vq"], 0.2, seed=0)
    full = TokenDataset(exports["vq"])
    held = set(full.index[val_rows].tolist())
    assert len(held) == 4 and held.isdisjoint(full.index[train_rows].tolist())
    assert (full.views[val_rows] == 0).all() and len(train_rows) == 32
    batch = TokenDataset(exports["vq"], rows=train_rows).__getitems__([0, 3, 5])
    assert batch["codes"].dtype == torch.long and batch["codes"].shape == (3, 16)
    assert batch["label"].dtype == torch.long and len(batch["caption"]) == 3
    rq = TokenDataset(exports["rq"]).__getitems__([0, 1])
    assert rq["codes"].shape == (2, 16, 2)
    lazy = TokenDataset(exports["vq"], in_memory=False).__getitems__([0, 3])
    assert torch.equal(lazy["codes"], full.__getitems__([0, 3])["codes"])


def test_on_the_fly_encoding_trains_from_images(tmp_path, exports):
    out = tmp_path / "otf"
    argv = ["--output-dir", str(out), "data.tokens=''", "data.source=digits", "runtime.max_steps=2"]
    argv += [*TINY, f"data.tokenizer={exports['tok-vq']}", "data.max_val_samples=8"]
    train_script.main(argv)
    prior = load_prior(out / "final")
    identity = read_manifest(exports["vq"])["tokenizer"]  # same tokenizer as that export
    assert prior.config.tokenizer.hash == identity["hash"]
    assert [r["step"] for r in metrics(out) if "val_loss" in r] == [2]

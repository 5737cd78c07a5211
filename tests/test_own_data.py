"""A new user's own images, end to end by the command line: a folder with class subfolders,
captions for some images in metadata.jsonl and no test/ split goes through tokenizer -> export
-> prior -> generate -> evaluate, and every step's output is checked. Tiny sizes throughout."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from accelerate.state import AcceleratorState, GradientState
from PIL import Image, ImageDraw

from prior import load_prior
from scripts.evaluate import main as evaluate_main
from scripts.export_tokens import main as export_main
from scripts.generate import main as generate_main
from scripts.train_prior import main as train_prior_main
from scripts.train_tokenizer import main as train_tokenizer_main
from tokenizer import Tokenizer
from tokenizer.manifest import read_manifest
from training.loop import RunExistsError

ROOT = Path(__file__).resolve().parents[1]
CLASSES = ("circle", "cross", "square")
TOKENIZER = [
    "--config", str(ROOT / "configs" / "tokenizer" / "digits.yaml"), "runtime.max_steps=6",
    "runtime.tracker=none", "runtime.progress=false", "runtime.batch_size=8",
    "runtime.eval_every=100", "runtime.sample_every=100", "runtime.save_every=3",
    "data.resolution=16", "model.resolution=16", "model.encoder_channels=8",
    "model.decoder_channels=8", "model.ch_mult=[1,2,2]", "model.latent_dim=8",
    "model.norm_groups=4", "model.quantizer.codebook_size=32", "eval.batch_size=8",
    "eval.grid_images=2",
]  # fmt: skip
PRIOR = [
    "--config", str(ROOT / "configs" / "prior" / "digits_gpt.yaml"), "runtime.max_steps=4",
    "runtime.tracker=none", "runtime.progress=false", "runtime.batch_size=8",
    "runtime.eval_every=2", "runtime.sample_every=4", "runtime.save_every=2",
    "model.gpt.dim=16", "model.gpt.n_layers=1", "sample.rows=3", "sample.per_row=2",
]  # fmt: skip


def draw(kind: str, seed: int) -> Image.Image:
    rng = np.random.default_rng(seed)
    img = Image.new("RGB", (24, 24), tuple(int(c) for c in rng.integers(0, 60, 3)))
    d, c, r = ImageDraw.Draw(img), 12 + int(rng.integers(-2, 3)), 6 + int(rng.integers(0, 3))
    box, ink = (c - r, c - r, c + r, c + r), tuple(int(v) for v in rng.integers(150, 256, 3))
    if kind == "circle":
        d.ellipse(box, fill=ink)
    elif kind == "square":
        d.rectangle(box, fill=ink)
    else:
        d.line(box, fill=ink, width=3)
        d.line((box[0], box[3], box[2], box[1]), fill=ink, width=3)
    return img


@pytest.fixture(scope="module")
def folder(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("own") / "images"
    rows = []
    for k, kind in enumerate(CLASSES):
        (root / kind).mkdir(parents=True)
        for i in range(20):
            name = f"{kind}/{i:02d}.png"
            draw(kind, 100 * k + i).save(root / name)
            if i % 2 == 0:  # captions for half of them
                rows.append({"file_name": name, "caption": f"a bright {kind}"})
    (root / "metadata.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    return root


def fresh() -> None:
    AcceleratorState._reset_state(True)
    GradientState._reset_state()


def test_own_folder_end_to_end(folder, tmp_path):
    runs = tmp_path / "runs"
    # 1. tokenizer: the folder has no test/ split: 10 % of the images are held out, said once
    fresh()
    with pytest.warns(UserWarning, match=r"no 'test' split: held out 6 of 60 images"):
        train_tokenizer_main(
            [*TOKENIZER, "--output-dir", str(runs / "tok"), f"data.source={folder}"]
        )
    assert json.loads((runs / "tok" / "eval.json").read_text())["images"] == 6
    tok = Tokenizer.from_pretrained(runs / "tok" / "final")
    # 2. a second run into the same folder without --resume is refused, nothing rewritten
    before = (runs / "tok" / "config.yaml").read_bytes()
    fresh()
    with pytest.raises(RunExistsError, match="already holds a run.*--resume latest.*--overwrite"):
        train_tokenizer_main(
            [*TOKENIZER, "--output-dir", str(runs / "tok"), f"data.source={folder}"]
        )
    assert (runs / "tok" / "config.yaml").read_bytes() == before
    # ... and resuming with another model size names the keys that differ
    fresh()
    with pytest.raises(ValueError, match=r"model.latent_dim: run has 8, config has 16"):
        train_tokenizer_main([*TOKENIZER, "--output-dir", str(runs / "tok"), f"data.source={folder}",
                              "model.latent_dim=16", "runtime.max_steps=8", "--resume", "latest"])  # fmt: skip
    # 3. export: the training split leaves the held-out images out, the test split is them
    for split, views in (("train", "2"), ("test", "1")):
        fresh()
        export_main(["--tokenizer", str(runs / "tok" / "final"), "--data", str(folder), "--split",
                     split, "--output-dir", str(runs / "tokens" / split), "--views", views,
                     "--holdout", "--no-progress"])  # fmt: skip
    train_m, test_m = (read_manifest(runs / "tokens" / s) for s in ("train", "test"))
    assert (train_m["num_images"], test_m["num_images"]) == (54, 6)
    assert train_m["class_names"] == list(CLASSES) and train_m["num_samples"] == 108
    # 4. prior on the tokens (the held-out export validates it; "null" works for no val set)
    fresh()
    train_prior_main([*PRIOR, "--output-dir", str(runs / "gpt"),
                      f"data.tokens={runs / 'tokens' / 'train'}",
                      f"data.val_tokens={runs / 'tokens' / 'test'}",
                      f"data.tokenizer={runs / 'tok' / 'final'}"])  # fmt: skip
    prior = load_prior(runs / "gpt" / "final")
    assert prior.config.tokenizer.class_names == list(CLASSES)
    assert prior.config.tokenizer.hash == tok.identity().hash
    assert (runs / "gpt" / "samples" / "step_000004.png").is_file()
    # 5. generate by class name
    generate_main(["--tokenizer", str(runs / "tok" / "final"), "--prior", str(runs / "gpt" / "final"),
                   "--prompt", "cross", "--num-images-per-prompt", "3", "--guidance", "2",
                   "--out", str(tmp_path / "cross.png")])  # fmt: skip
    assert Image.open(tmp_path / "cross.png").size[0] >= 3 * 16
    # 6. evaluate on the tokenizer's own data (read from its run), judge trained on the folder
    metrics = evaluate_main(["--tokenizer", str(runs / "tok" / "final"), "--prior",
                             str(runs / "gpt" / "final"), "--guidance", "1", "--n-per-class", "2",
                             "--judge-steps", "5", "--out", str(tmp_path / "eval" / "m.json")])  # fmt: skip
    assert metrics["data"] == str(folder)
    assert metrics["tokenizer"]["images"] == 6  # the carved held-out images
    run = metrics["generation"]["runs"][0]
    assert run["n"] == 6 and set(run["accuracy"]["per_class"]) == set(CLASSES)
    assert (tmp_path / "eval" / "guidance.png").is_file()

"""Bad input through the user-facing entry points: every error names its problem, nothing breaks.

Each case calls what a user calls (a script's `main(argv)`, `Pipeline.from_pretrained`,
`load_prior`, `Tokenizer.from_pretrained`) against a folder that already holds a finished run, an
export or a model, then checks (1) the message names the file / key / shape / range / class and
(2) every file already on disk keeps its sha256 and no half-written output (`.tmp-*`, a new run
folder, an output image) appears. Library-level checks of the same errors live in test_data.py,
test_tokenizer_model.py, test_export.py, test_prior_training.py, test_pipeline.py and
test_training.py; this file does not repeat them. The last tests audit the source for unsafe
loading (`torch.load` without weights_only=True, pickle, trust_remote_code=True).
"""

from __future__ import annotations

import ast
import contextlib
import json
import os
import shutil
from collections.abc import Callable
from pathlib import Path

import datasets
import numpy as np
import pytest
import torch
from accelerate.state import AcceleratorState, GradientState
from PIL import Image

from prior import load_prior
from sampling import Pipeline
from scripts.export_tokens import main as export_main
from scripts.generate import main as generate_main
from scripts.train_prior import main as train_prior_main
from scripts.train_tokenizer import main as train_tokenizer_main
from tokenizer import Tokenizer, TokenizerConfig
from tokenizer.data import DataConfig, load_image_dataset
from tokenizer.export import ExportConfig, export_tokens
from tokenizer.quantizers import QuantizerConfig
from training.config import ConfigError
from training.serialization import file_sha256

ROOT = Path(__file__).resolve().parents[1]
RES = 16  # tokenizer resolution: 4x4 codes, codebook 32
DIGITS_YAML = ROOT / "configs" / "tokenizer" / "digits.yaml"
TOKENIZER_TINY = [
    "runtime.tracker=none", "runtime.progress=false", "runtime.max_steps=1", "runtime.save_every=1",
    "runtime.eval_every=100", "runtime.sample_every=100", "runtime.batch_size=4",
    f"data.resolution={RES}", f"model.resolution={RES}", "model.encoder_channels=8",
    "model.decoder_channels=8", "model.ch_mult=[1,2,2]", "model.latent_dim=8", "model.norm_groups=4",
    "model.quantizer.codebook_size=32", "eval.max_images=4", "eval.batch_size=4",
    "eval.grid_images=2", "data.eval_split=null",
]  # fmt: skip
PRIOR_TINY = [
    "runtime.tracker=none", "runtime.progress=false", "runtime.max_steps=2", "runtime.save_every=1",
    "runtime.eval_every=100", "runtime.sample_every=100", "runtime.batch_size=4",
    "data.val_fraction=0", "model.gpt.dim=16", "model.gpt.n_layers=1", "optim.ema_decay=0.9",
]  # fmt: skip


# ---- helpers ------------------------------------------------------------------------------------
def snapshot(folder: Path) -> dict[str, str]:
    """relative path -> sha256 of every file under `folder`."""
    return {
        p.relative_to(folder).as_posix(): file_sha256(p)
        for p in sorted(folder.rglob("*"))
        if p.is_file()
    }


def leftovers(folder: Path) -> list[str]:
    """Half-written outputs: temporary folders or files anywhere under `folder`."""
    return [p.name for p in folder.rglob(".tmp-*")]


def fails(
    call: Callable[[], object], error: type[BaseException], match: str, *untouched: Path
) -> str:
    """Run a failing call; assert its message and that every folder in `untouched` is unchanged."""
    before = {folder: snapshot(folder) for folder in untouched}
    with pytest.raises(error, match=match) as info:
        call()
    for folder, files in before.items():
        assert snapshot(folder) == files, f"{folder} changed"
        assert not leftovers(folder.parent), leftovers(folder.parent)
    return str(info.value)


def save_png(path: Path, size: tuple[int, int], channels: int = 3, seed: int = 0) -> None:
    rng = np.random.default_rng(seed)
    shape = (size[1], size[0]) + ((channels,) if channels > 1 else ())
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(rng.integers(0, 256, shape, dtype=np.uint8)).save(path)


def tiny_tokenizer(seed: int) -> Tokenizer:
    torch.manual_seed(seed)
    cfg = TokenizerConfig(
        resolution=RES, encoder_channels=8, decoder_channels=8, ch_mult=[1, 2, 2],
        num_res_blocks=1, latent_dim=4, norm_groups=4, mid_attention=False,
        quantizer=QuantizerConfig(kind="vq", codebook_size=32),
    )  # fmt: skip
    return Tokenizer(cfg).eval()


def export(tok: Tokenizer, out: Path) -> Path:
    data = load_image_dataset(DataConfig(source="digits", resolution=RES, max_samples=10))
    return export_tokens(tok, data, out, ExportConfig(views=1, progress=False), {"data": "digits"})


def export_cli(tmp: Path, data: Path | str, out: Path, *extra: str) -> Callable[[], None]:
    argv = ["--tokenizer", str(tmp / "tokA"), "--data", str(data), "--out", str(out)]
    return lambda: export_main([*argv, "--no-progress", "--batch-size", "8", *extra])


def train_prior(out: Path, tokens: Path, *extra: str) -> Callable[[], None]:
    argv = ["--output-dir", str(out), f"data.tokens={tokens}", *PRIOR_TINY, *extra]
    return lambda: train_prior_main(argv)


@pytest.fixture(scope="module")
def world(tmp_path_factory) -> Path:
    """Two tokenizers (A, B), their exports, an image folder with bad files and a finished prior
    run on A (EMA on, so its checkpoints hold a pickled custom state)."""
    tmp = tmp_path_factory.mktemp("world")
    tok_a, tok_b = tiny_tokenizer(0), tiny_tokenizer(1)
    tok_a.save_pretrained(tmp / "tokA")
    tok_b.save_pretrained(tmp / "tokB")
    export(tok_a, tmp / "expA")
    export(tok_b, tmp / "expB")
    images = tmp / "images"
    for i in range(4):
        save_png(images / f"rgb{i}.png", (20, 24), seed=i)
    save_png(images / "grey.png", (20, 20), channels=1)
    save_png(images / "rgba.png", (20, 20), channels=4)
    (images / "corrupt.png").write_bytes(b"\x89PNG\r\n\x1a\n this is not an image")
    (images / "notes.txt").write_text("not an image, not an image extension: ignored")
    AcceleratorState._reset_state(True)
    GradientState._reset_state()
    train_prior(tmp / "run", tmp / "expA", f"data.tokenizer={tmp / 'tokA'}")()
    assert (tmp / "run" / "final" / "model.safetensors").is_file()
    assert list((tmp / "run" / "checkpoints").glob("step_*/custom_checkpoint_0.pkl"))
    return tmp


@pytest.fixture(scope="module")
def tokenizer_run(world, tmp_path_factory) -> tuple[Path, list[str]]:
    """A finished one-step tokenizer run on the image folder (the corrupt file skipped)."""
    out = tmp_path_factory.mktemp("tokrun") / "run"
    argv = ["--config", str(DIGITS_YAML), "--output-dir", str(out), *TOKENIZER_TINY]
    AcceleratorState._reset_state(True)
    GradientState._reset_state()
    with pytest.warns(UserWarning, match=r"skipped 1 unreadable image.*corrupt\.png"):
        train_tokenizer_main([*argv, f"data.source={world / 'images'}"])
    assert (out / "final" / "model.safetensors").is_file() and (out / "config.yaml").is_file()
    return out, argv


# ---- images -------------------------------------------------------------------------------------
def test_corrupt_file_is_skipped_and_counted_grey_and_rgba_are_converted(world, tmp_path):
    out = tmp_path / "tokens"
    with pytest.warns(UserWarning, match=r"skipped 1 unreadable image\(s\).*corrupt\.png"):
        export_cli(world, world / "images", out)()
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["num_images"] == 6  # 4 RGB + grey + RGBA; the .txt is not an image
    codes = datasets.load_from_disk(str(out)).with_format("numpy")["codes"][:]
    assert codes.shape == (6, 4, 4) and int(codes.max()) < 32


def test_strict_mode_names_the_corrupt_file_and_keeps_the_run(world, tokenizer_run):
    out, argv = tokenizer_run
    strict = [*argv, f"data.source={world / 'images'}", "data.strict=true", "--resume", "latest"]
    msg = fails(lambda: train_tokenizer_main(strict), ValueError, "unreadable image", out)
    assert str(world / "images" / "corrupt.png") in msg


@pytest.mark.parametrize(
    "case,match",
    [
        ("too_small", r"tiny\.png is 4x4, smaller than the 16x16 crop.*upscale"),
        ("empty", r"no images \(.*\.png.*\) found in .*empty"),
        ("all_corrupt", r"no usable images in .*all_corrupt"),
    ],
)
def test_bad_image_folders_keep_the_tokenizer_run(world, tokenizer_run, tmp_path, case, match):
    folder = tmp_path / case
    folder.mkdir()
    if case == "too_small":
        save_png(folder / "ok.png", (20, 20))
        save_png(folder / "tiny.png", (4, 4))
    elif case == "empty":
        (folder / "readme.md").write_text("no images here")
    else:
        (folder / "a.png").write_bytes(b"garbage")
        (folder / "b.jpg").write_bytes(b"")
    out, argv = tokenizer_run
    call = [*argv, f"data.source={folder}", "--resume", "latest"]
    warns = pytest.warns(UserWarning) if case == "all_corrupt" else contextlib.nullcontext()
    with warns:
        fails(lambda: train_tokenizer_main(call), ValueError, match, out)


def test_bad_sources_keep_an_existing_export_when_overwriting(world, tmp_path):
    existing = tmp_path / "tokens"
    shutil.copytree(world / "expA", existing)
    tiny = tmp_path / "tiny"
    save_png(tiny / "t.png", (4, 4))
    fails(export_cli(world, tiny, existing, "--overwrite"), ValueError, r"t\.png is 4x4", existing)
    empty = tmp_path / "empty_saved"
    features = datasets.Features({"image": datasets.Image()})
    datasets.Dataset.from_dict({"image": []}, features=features).save_to_disk(str(empty))
    fails(
        export_cli(world, empty, existing, "--overwrite"),
        ValueError, r"no usable images in .*empty_saved: the saved dataset is empty", existing,
    )  # fmt: skip


def test_wrong_channel_count_fails_mid_export_without_damage(world, tmp_path):
    """Array images are checked when encoded: the error names the row and the shape; the shard
    folder is removed and the export being replaced stays as it was."""
    rng = np.random.default_rng(0)
    for channels in (3, 2):
        arrays = [rng.integers(0, 256, (RES, RES, channels), dtype=np.uint8) for _ in range(3)]
        features = datasets.Features({"image": datasets.Array3D((RES, RES, channels), "uint8")})
        path = tmp_path / f"arrays{channels}"
        datasets.Dataset.from_dict({"image": arrays}, features=features).save_to_disk(str(path))
    export_cli(world, tmp_path / "arrays3", tmp_path / "ok")()  # 3 channels: fine
    assert json.loads((tmp_path / "ok" / "manifest.json").read_text())["num_images"] == 3
    msg = fails(
        export_cli(world, tmp_path / "arrays2", tmp_path / "ok", "--overwrite"),
        ValueError, r"sample 0: .*C in \(1, 3, 4\).*\(16, 16, 2\)", tmp_path / "ok",
    )  # fmt: skip
    assert "list" not in msg


def test_wrong_model_channels_is_a_config_error(world, tokenizer_run):
    out, argv = tokenizer_run
    call = [*argv, f"data.source={world / 'images'}", "model.in_channels=1", "--resume", "latest"]
    match = r"digits\.yaml: model\.in_channels must be 3.*got 1"
    fails(lambda: train_tokenizer_main(call), ConfigError, match, out)


# ---- configs ------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    "text,match",
    [
        ("runtime:\n  max_stepz: 3\n", r"bad\.yaml: key 'runtime\.max_stepz'.*max_steps"),
        ("model:\n  latent_dim: wide\n", r"bad\.yaml: key 'model\.latent_dim'.*'wide'.*Integer"),
        ("model:\n  ch_mult: [1]\n", r"bad\.yaml: ch_mult must have 3 to 6 levels"),
        ("model: [1, 2\n", r"bad\.yaml: not valid YAML"),
        ("- 1\n- 2\n", r"bad\.yaml: expected a mapping"),
    ],
)
def test_bad_tokenizer_config_files_keep_the_run(tokenizer_run, tmp_path, text, match):
    out, _ = tokenizer_run
    bad = tmp_path / "bad.yaml"
    bad.write_text(text)
    argv = ["--config", str(bad), "--output-dir", str(out), "--resume", "latest"]
    fails(lambda: train_tokenizer_main(argv), ConfigError, match, out)


def test_bad_prior_overrides_and_yaml_keep_the_run(world, tmp_path):
    run = world / "run"
    fails(train_prior(run, world / "expA", "optim.lr=fast", "--resume", "latest"),
          ConfigError, r"override 'optim\.lr=fast': key 'optim\.lr'.*Float", run)  # fmt: skip
    fails(train_prior(run, world / "expA", "optim.learning_rate=0.1"),
          ConfigError, r"key 'optim\.learning_rate'.*not in 'OptimConfig'", run)  # fmt: skip
    bad = tmp_path / "prior.yaml"
    bad.write_text("model:\n  gpt:\n    rope: 3d\n")
    call = lambda: train_prior_main(["--config", str(bad), "--output-dir", str(run)])  # noqa: E731
    fails(call, ConfigError, r"prior\.yaml: rope must be '1d' or '2d', got '3d'", run)


def test_bad_saved_configs_name_key_and_file(world, tmp_path):
    prior = tmp_path / "prior"
    shutil.copytree(world / "run" / "final", prior)
    config = json.loads((prior / "config.json").read_text())
    cases = [
        ({**config, "dimm": 16}, r"config\.json: key 'dimm'.*Did you mean.*'dim'"),
        ({**config, "n_layers": "two"}, r"config\.json: key 'n_layers'.*'two'.*Integer"),
        ({**config, "cond": "image"}, r"config\.json: cond must be 'class', 'text' or 'none'"),
    ]
    for data, match in cases:
        (prior / "config.json").write_text(json.dumps(data))
        fails(lambda: Pipeline.from_pretrained(world / "tokA", prior), ValueError, match, prior)
    (prior / "config.json").write_text("{ not json")
    fails(lambda: load_prior(prior), ValueError, r"config\.json: not valid JSON", prior)


# ---- codes and tokenizers -----------------------------------------------------------------------
def _out_of_range_export(world: Path, path: Path) -> Path:
    ds = datasets.load_from_disk(str(world / "expA"))
    codes = ds.with_format("numpy", dtype=np.uint16)["codes"][:]
    codes[3, 1, 2] = 40  # codebook_size is 32
    bad = ds.map(lambda row, i: {"codes": codes[i]}, with_indices=True, features=ds.features)
    bad.save_to_disk(str(path))
    for name in ("manifest.json", "codebook.safetensors"):
        shutil.copy(world / "expA" / name, path / name)
    return path


def test_codes_outside_the_codebook_keep_the_prior_run(world, tmp_path):
    bad = _out_of_range_export(world, tmp_path / "bad_tokens")
    run = world / "run"
    fails(train_prior(run, bad, "runtime.max_steps=3", "--resume", "latest"), ValueError,
          r"bad_tokens: codes outside \[0, 32\).*row 3.*code 40", run, bad)  # fmt: skip


def test_tokens_from_another_tokenizer_are_refused_on_resume(world):
    """The run was trained on tokenizer A's tokens; resuming it on B's must fail, naming the hash."""
    run = world / "run"
    msg = fails(train_prior(run, world / "expB", "runtime.max_steps=3", "--resume", "latest"),
                ValueError, r"--resume latest: .*config\.yaml.*tokenizer mismatch: hash", run)  # fmt: skip
    assert "codebook_size" not in msg  # same geometry: only the identity differs


def test_init_from_a_prior_of_another_tokenizer(world, tmp_path):
    out = tmp_path / "new_run"
    call = train_prior(out, world / "expB", f"model.init_from={world / 'run' / 'final'}")
    fails(call, ValueError, r"model\.init_from .*final: tokenizer mismatch: hash", world / "run")
    assert not out.exists() or not any(out.iterdir())


def test_wrong_tokenizer_for_sample_grids_fails_before_training(world, tmp_path):
    out = tmp_path / "new_run"
    call = train_prior(out, world / "expA", f"data.tokenizer={world / 'tokB'}")
    fails(call, ValueError, r"tokB for sample grids: tokenizer mismatch: hash", world / "tokB")
    assert not out.exists() or not any(out.iterdir())  # no checkpoint, no config.yaml


def _generate_fails(world: Path, tmp_path: Path, tokenizer: str, match: str, *extra: str) -> None:
    """scripts/generate.py fails with `match`; an existing samples.png is left as it was."""
    grid = tmp_path / "samples.png"
    save_png(grid, (8, 8))
    digest = file_sha256(grid)
    argv = ["--tokenizer", str(world / tokenizer), "--prior", str(world / "run" / "final")]
    call = lambda: generate_main([*argv, "--out", str(grid), *extra])  # noqa: E731
    fails(call, ValueError, match, world / "run", world / tokenizer)
    assert file_sha256(grid) == digest and sorted(os.listdir(tmp_path)) == ["samples.png"]


def test_prior_with_the_wrong_tokenizer_writes_no_image(world, tmp_path):
    _generate_fails(world, tmp_path, "tokB", r"tokenizer mismatch: hash: prior has '[0-9a-f]{64}'")


def test_unknown_class_name_writes_no_image(world, tmp_path):
    match = r"unknown class 'seven' for this class-conditional prior \(known: 0, 1, 2, .*9\)"
    _generate_fails(world, tmp_path, "tokA", match, "--prompt", "3", "--prompt", "seven")


# ---- safe loading -------------------------------------------------------------------------------
class _Payload:
    """Unpickling this runs `touch marker`: a stand-in for a malicious pickle."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def test_weights_load_only_from_safetensors(world, tmp_path):
    marker = tmp_path / "pwned"
    prior, tok = tmp_path / "prior", tmp_path / "tok"
    shutil.copytree(world / "run" / "final", prior)
    shutil.copytree(world / "tokA", tok)
    for folder in (prior, tok):
        (folder / "model.safetensors").unlink()
        torch.save({"weight": _Payload(marker)}, folder / "pytorch_model.bin")
    fails(lambda: load_prior(prior), FileNotFoundError, r"prior/model\.safetensors", prior)
    fails(lambda: Tokenizer.from_pretrained(tok), FileNotFoundError, r"tok/model\.safetensors", tok)
    assert not marker.exists()  # the pickle beside them was never read
    for folder in (prior, tok):
        (folder / "model.safetensors").write_bytes(b"\x00" * 4 + b"not a safetensors file")
    fails(lambda: load_prior(prior), ValueError, r"prior/model\.safetensors: unreadable", prior)
    fails(lambda: Tokenizer.from_pretrained(tok), ValueError, r"tok/model\.safetensors", tok)


def test_resume_refuses_a_pickle_that_weights_only_rejects(world, tmp_path):
    """accelerate unpickles registered states (the EMA) with weights_only=False: a checkpoint whose
    custom state is not plain tensors and numbers is refused before that happens."""
    run = tmp_path / "run"
    shutil.copytree(world / "run", run)
    marker = tmp_path / "pwned"
    latest = run / "checkpoints" / (run / "checkpoints" / "latest").read_text().strip()
    torch.save({"shadow": _Payload(marker)}, latest / "custom_checkpoint_0.pkl")
    fails(train_prior(run, world / "expA", "runtime.max_steps=3", "--resume", "latest"),
          ValueError, r"custom_checkpoint_0\.pkl: refusing to unpickle.*GLOBAL", run)  # fmt: skip
    assert not marker.exists()


def test_resume_accepts_its_own_checkpoint(world, tmp_path):
    """The guard above passes a genuine EMA state: a resumed run trains on."""
    run = tmp_path / "run"
    shutil.copytree(world / "run", run)
    train_prior(run, world / "expA", "runtime.max_steps=3", "--resume", "latest")()
    latest = run / "checkpoints" / (run / "checkpoints" / "latest").read_text().strip()
    assert json.loads((latest / "trainer_state.json").read_text())["step"] == 3


# ---- source audit -------------------------------------------------------------------------------
AUDITED = ("tokenizer", "prior", "sampling", "training", "scripts")


def unsafe_calls(source: str) -> list[str]:
    """Calls that could unpickle untrusted data or run remote code, found in `source`."""
    found = []
    for node in ast.walk(ast.parse(source)):
        if not isinstance(node, ast.Call):
            continue
        func = ast.unparse(node.func)
        kwargs = {k.arg: k.value for k in node.keywords if k.arg}

        def is_true(name: str, kwargs: dict = kwargs) -> bool:
            value = kwargs.get(name)
            return isinstance(value, ast.Constant) and value.value is True

        if func.endswith("torch.load") and not is_true("weights_only"):
            found.append(f"line {node.lineno}: {func}(...) without weights_only=True")
        if func in ("pickle.load", "pickle.loads", "dill.load", "cloudpickle.load"):
            found.append(f"line {node.lineno}: {func}(...)")
        if func in ("np.load", "numpy.load") and is_true("allow_pickle"):
            found.append(f"line {node.lineno}: {func}(..., allow_pickle=True)")
        if "trust_remote_code" in kwargs and not (
            isinstance(kwargs["trust_remote_code"], ast.Constant)
            and kwargs["trust_remote_code"].value is False
        ):
            found.append(f"line {node.lineno}: {func}(..., trust_remote_code=...)")
    return found


def test_audit_finds_unsafe_calls_in_a_sample():
    bad = (
        "import torch, pickle, numpy as np\n"
        "torch.load(p)\ntorch.load(p, weights_only=False)\npickle.loads(b)\n"
        "np.load(p, allow_pickle=True)\nAutoModel.from_pretrained(n, trust_remote_code=True)\n"
    )
    assert len(unsafe_calls(bad)) == 5
    good = "torch.load(p, map_location='cpu', weights_only=True)\nnp.load(p)\n"
    assert unsafe_calls(good) == []


def test_source_has_no_unsafe_loading():
    problems = [
        f"{path.relative_to(ROOT)} {issue}"
        for folder in AUDITED
        for path in sorted((ROOT / folder).rglob("*.py"))
        for issue in unsafe_calls(path.read_text())
    ]
    assert problems == [], "\n".join(problems)

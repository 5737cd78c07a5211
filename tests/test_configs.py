"""Every file under configs/ loads strictly into its schema (a typo is an error, not a default)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import yaml
from accelerate.commands.config.config_args import ClusterConfig

from scripts.demo import DemoConfig
from scripts.demo import stage as demo_stage
from tokenizer.model import Tokenizer
from tokenizer.trainer import TokenizerTrainConfig
from training.config import ConfigError, load_config

ROOT = Path(__file__).resolve().parents[1]
CONFIGS = ROOT / "configs"
# configs/<folder>/ -> how its files are checked; a new folder needs an entry here
CHECKED = {"tokenizer", "prior", "accelerate", "deepspeed", "demo"}
BUILD_MAX_RESOLUTION = 64  # embedded-data models are built and run; GPU-scale ones only loaded


def _files(folder: str, pattern: str) -> list[Path]:
    return sorted((CONFIGS / folder).glob(pattern))


def _ids(paths: list[Path]) -> list[str]:
    return [p.name for p in paths]


def test_every_config_file_has_a_schema():
    found = [p for p in CONFIGS.rglob("*") if p.suffix in (".yaml", ".yml", ".json")]
    assert found, "no config files under configs/"
    unmapped = sorted(str(p.relative_to(CONFIGS)) for p in found if p.parent.name not in CHECKED)
    assert not unmapped, f"config files with no schema check in tests/test_configs.py: {unmapped}"
    assert not [p for p in found if p.suffix == ".yml"], "use .yaml, not .yml"


TOKENIZER = _files("tokenizer", "*.yaml")


@pytest.mark.parametrize("path", TOKENIZER, ids=_ids(TOKENIZER))
def test_tokenizer_config_loads(path):
    cfg = load_config(TokenizerTrainConfig, path)
    raw = yaml.safe_load(path.read_text())
    assert set(raw) == set(TokenizerTrainConfig.__dataclass_fields__), "top-level sections 1:1"
    h, w = cfg.model.grid
    assert h * cfg.model.factor == cfg.model.resolution == cfg.data.resolution
    if cfg.model.resolution <= BUILD_MAX_RESOLUTION:
        model = Tokenizer(cfg.model).eval()
        images = torch.zeros(1, cfg.model.in_channels, cfg.model.resolution, cfg.model.resolution)
        with torch.no_grad():
            codes = model.encode(images)
        depth = () if model.depth == 1 else (model.depth,)
        assert codes.shape == (1, h, w, *depth)


def test_tokenizer_configs_cover_the_documented_set():
    names = {p.stem for p in TOKENIZER}
    for needed in (
        "digits",
        "digits_rq",
        "photos",
        "shapes",
        "imagenet_vq_f16",
        "imagenet_rq_8x8x4",
    ):
        assert needed in names


PRIOR = _files("prior", "*.yaml")


@pytest.mark.parametrize("path", PRIOR, ids=_ids(PRIOR))
def test_prior_config_loads(path):
    schema = pytest.importorskip("prior.train_config").PriorTrainConfig
    load_config(schema, path)


DEMO = _files("demo", "*.yaml")


@pytest.mark.parametrize("path", DEMO, ids=_ids(DEMO))
def test_demo_config_loads_and_names_existing_stage_configs(path):
    cfg = load_config(DemoConfig, path)
    for stage in (cfg.tokenizer, cfg.prior, cfg.draft):
        assert (ROOT / stage.config).is_file(), f"{path.name}: {stage.config} does not exist"
    load_config(TokenizerTrainConfig, ROOT / cfg.tokenizer.config, cfg.tokenizer.overrides)


def test_demo_reuses_a_stage_only_when_command_config_and_upstream_match(tmp_path):
    """A changed config (or upstream stage) retrains; the old result is kept aside, not lost."""
    config = tmp_path / "stage.yaml"
    config.write_text("steps: 1\n")
    folder = tmp_path / "tokenizer"
    script = tmp_path / "train.py"  # stands in for a training CLI: writes a unique final/t
    script.write_text(
        "import pathlib, time\n"
        f"final = pathlib.Path({str(folder / 'final')!r})\n"
        "final.mkdir(parents=True)\n"
        "(final / 't').write_text(str(time.time_ns()))\n"
    )
    cmd = [str(script), "--config", str(config)]
    timings: dict[str, float] = {}
    key = demo_stage("tokenizer", folder, folder / "final", cmd, timings)
    first = (folder / "final" / "t").read_text()
    assert "tokenizer" in timings

    timings.clear()
    assert demo_stage("tokenizer", folder, folder / "final", cmd, timings) == key
    assert timings == {} and (folder / "final" / "t").read_text() == first  # reused

    assert demo_stage("tokenizer", folder, folder / "final", cmd, timings, upstream="other") != key
    assert (folder.with_name("tokenizer.stale") / "final" / "t").read_text() == first
    second = (folder / "final" / "t").read_text()
    assert second != first

    config.write_text("steps: 2\n")  # same command line, edited config file
    demo_stage("tokenizer", folder, folder / "final", cmd, timings, upstream="other")
    assert (folder.with_name("tokenizer.stale") / "final" / "t").read_text() == second
    assert (folder / "final" / "t").read_text() not in (first, second)


def test_unknown_key_names_key_and_file(tmp_path):
    bad = tmp_path / "typo.yaml"
    bad.write_text(
        (CONFIGS / "tokenizer" / "digits.yaml").read_text() + "\nruntime_:\n  max_steps: 3\n"
    )
    with pytest.raises(ConfigError, match=r"typo\.yaml.*runtime_"):
        load_config(TokenizerTrainConfig, bad)
    nested = tmp_path / "nested.yaml"
    text = (CONFIGS / "tokenizer" / "digits.yaml").read_text()
    nested.write_text(text.replace("    codebook_size:", "    codebok_size:"))
    with pytest.raises(ConfigError, match=r"nested\.yaml.*model\.quantizer\.codebok_size"):
        load_config(TokenizerTrainConfig, nested)


ACCELERATE = _files("accelerate", "*.yaml")


@pytest.mark.parametrize("path", ACCELERATE, ids=_ids(ACCELERATE))
def test_accelerate_config_loads(path):
    cfg = ClusterConfig.from_yaml_file(str(path))  # accelerate's own loader: unknown keys fail
    raw = yaml.safe_load(path.read_text())
    for key in ("compute_environment", "distributed_type", "num_machines", "num_processes"):
        assert key in raw, f"{path.name}: missing {key}"
    assert cfg.num_processes >= cfg.num_machines >= 1
    if str(cfg.distributed_type).endswith("DEEPSPEED"):
        ds_file = (cfg.deepspeed_config or {}).get("deepspeed_config_file")
        assert ds_file, f"{path.name}: DeepSpeed config without deepspeed_config_file"
        assert (ROOT / ds_file).is_file(), f"{path.name}: {ds_file} does not exist"


def test_accelerate_unknown_key_is_an_error(tmp_path):
    if not ACCELERATE:
        pytest.skip("no accelerate configs")
    bad = tmp_path / "bad.yaml"
    bad.write_text(ACCELERATE[0].read_text() + "\nnum_procesess: 3\n")
    with pytest.raises(ValueError, match="num_procesess"):
        ClusterConfig.from_yaml_file(str(bad))


DEEPSPEED = _files("deepspeed", "*.json")


@pytest.mark.parametrize("path", DEEPSPEED, ids=_ids(DEEPSPEED))
def test_deepspeed_config_parses(path):
    cfg = json.loads(path.read_text())
    assert cfg["zero_optimization"]["stage"] in (0, 1, 2, 3)
    for key in ("train_micro_batch_size_per_gpu", "gradient_accumulation_steps"):
        value = cfg[key]
        assert value == "auto" or (isinstance(value, int) and value >= 1), f"{key}: {value!r}"
    for precision in ("bf16", "fp16"):
        if precision in cfg:
            assert cfg[precision]["enabled"] in (True, False, "auto")
    assert not (
        cfg.get("bf16", {}).get("enabled") is True and cfg.get("fp16", {}).get("enabled") is True
    )

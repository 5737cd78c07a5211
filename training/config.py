"""Strict YAML <-> dataclass configs through OmegaConf structured configs.

Every config file maps 1:1 onto a dataclass: an unknown key or a value of the wrong type is an
error that names the key and the file, so a typo never trains the wrong model silently.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

import yaml
from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException

T = TypeVar("T")


class ConfigError(ValueError):
    """A config file or override does not fit its schema."""


def _describe(err: OmegaConfBaseException) -> str:
    key = getattr(err, "full_key", None) or getattr(err, "key", None)
    msg = str(err).splitlines()[0]
    return f"key '{key}': {msg}" if key else msg


def _merge(base: DictConfig, other: Any, source: str) -> DictConfig:
    try:
        return OmegaConf.merge(base, other)
    except OmegaConfBaseException as err:
        raise ConfigError(f"{source}: {_describe(err)}") from err


def load_config(
    schema: type[T], path: str | Path | None = None, overrides: Sequence[str] = ()
) -> T:
    """Build a `schema` instance from defaults, then the YAML `path`, then `key.sub=value` overrides."""
    cfg = OmegaConf.structured(schema)
    if path is not None:
        path = find_config(Path(path))
        if not path.is_file():
            raise ConfigError(f"config file not found: {path}")
        try:
            loaded = OmegaConf.load(path)
        except yaml.YAMLError as err:
            raise ConfigError(f"{path}: not valid YAML: {err}") from err
        if not isinstance(loaded, DictConfig):
            raise ConfigError(f"{path}: expected a mapping of config keys, got a YAML list")
        cfg = _merge(cfg, loaded, str(path))
    for item in overrides:
        if "=" not in item:
            raise ConfigError(f"override '{item}' is not of the form key.sub=value")
        cfg = _merge(cfg, OmegaConf.from_dotlist([item]), f"override '{item}'")
    return _build(cfg, str(path or schema.__name__))


def _build(cfg: DictConfig, source: str) -> Any:
    """The dataclass instance (each __post_init__ validates its fields), with every float
    checked finite: a NaN fails every `x > 0` check silently, so it is caught here once."""
    try:
        obj = OmegaConf.to_object(cfg)
    except OmegaConfBaseException as err:
        raise ConfigError(f"{source}: {_describe(err)}") from err
    except ValueError as err:  # a __post_init__ check (names the field): add the source
        raise ConfigError(f"{source}: {err}") from err
    bad = non_finite_fields(obj)
    if bad:
        raise ConfigError(f"{source}: key '{bad[0]}' must be a finite number, got {bad[1]}")
    return obj


def non_finite_fields(obj: Any, prefix: str = "") -> tuple[str, float] | None:
    """(dotted key, value) of the first NaN/inf float in a config dataclass tree, else None."""
    if isinstance(obj, float):
        return None if math.isfinite(obj) else (prefix, obj)
    if isinstance(obj, list | tuple):
        items = enumerate(obj)
    elif dataclasses.is_dataclass(obj):
        items = ((f.name, getattr(obj, f.name)) for f in dataclasses.fields(obj))
    else:
        return None
    for key, value in items:
        found = non_finite_fields(value, f"{prefix}.{key}" if prefix else str(key))
        if found:
            return found
    return None


def find_config(path: Path) -> Path:
    """`path` itself, or for a relative path that does not exist here, the config shipped with
    the package (`configs/...` beside `training/`), so `--config configs/tokenizer/digits.yaml`
    also works after `pip install` from any folder."""
    if path.is_file() or path.is_absolute():
        return path
    parts = path.parts[1:] if path.parts[:1] == ("configs",) else path.parts
    shipped = Path(__file__).resolve().parents[1] / "configs" / Path(*parts) if parts else path
    return shipped if shipped.is_file() else path


def to_dict(cfg: Any) -> dict[str, Any]:
    """Plain nested dict of a config dataclass (JSON/YAML friendly)."""
    return OmegaConf.to_container(OmegaConf.structured(cfg), resolve=True)


def from_dict(schema: type[T], data: dict[str, Any], source: str = "dict") -> T:
    """Strictly rebuild a config dataclass from a dict (e.g. read from config.json)."""
    cfg = _merge(OmegaConf.structured(schema), OmegaConf.create(data), source)
    return _build(cfg, source)


def save_config(cfg: Any, path: str | Path) -> None:
    """Write a config dataclass as YAML (loadable again with `load_config`)."""
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    Path(path).write_text(OmegaConf.to_yaml(OmegaConf.structured(cfg)))


@dataclass
class CliArgs:
    """The arguments every training script shares."""

    config: Path | None
    output_dir: Path
    resume: str | None
    overrides: list[str]
    overwrite: bool = False


def parse_cli(
    schema: type[T], argv: Sequence[str] | None = None, description: str = ""
) -> tuple[T, CliArgs]:
    """`--config FILE --output-dir DIR [--resume latest|DIR] [--overwrite] [--print-config]
    [key.sub=value ...]`; --print-config prints the resolved config as YAML and exits."""
    from training.cli import parser as make_parser

    parser = make_parser(description)
    parser.add_argument("--config", type=Path, default=None, help="YAML config file")
    parser.add_argument("--output-dir", type=Path, required=True, help="run directory")
    parser.add_argument("--resume", default=None, help="'latest' or a checkpoint directory")
    parser.add_argument(
        "--overwrite", action="store_true", help="start over in a folder that holds a run"
    )
    parser.add_argument(
        "--print-config", action="store_true", help="print the resolved config (YAML) and exit"
    )
    parser.add_argument("overrides", nargs="*", help="key.sub=value overrides")
    ns = parser.parse_intermixed_args(argv)  # overrides may come before or after --resume
    if ns.resume is not None and ns.overwrite:
        raise ConfigError("--resume and --overwrite exclude each other")
    cfg = load_config(schema, ns.config, ns.overrides)
    if ns.print_config:
        print(OmegaConf.to_yaml(OmegaConf.structured(cfg)), end="")
        raise SystemExit(0)
    args = CliArgs(ns.config, ns.output_dir, ns.resume, list(ns.overrides), ns.overwrite)
    return cfg, args

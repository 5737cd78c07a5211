"""`load_prior(dir)`: rebuild any saved prior from config.json's `model_type`."""

import json
from pathlib import Path

import torch
from torch import nn

from prior.configs import CONFIG_CLASSES, PriorConfig
from training.serialization import load_config_and_weights, read_config


def prior_classes() -> dict[str, type[nn.Module]]:
    from prior.gpt import GPT
    from prior.maskgit import MaskGIT
    from prior.rq_transformer import RQTransformer

    return {"gpt": GPT, "maskgit": MaskGIT, "rq_transformer": RQTransformer}


def _model_type(file: Path) -> str:
    if not file.parent.is_dir():
        raise FileNotFoundError(f"prior folder {file.parent} not found")
    if not file.is_file():
        raise ValueError(f"{file} not found: not a saved prior directory")
    try:
        data = json.loads(file.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise ValueError(f"{file}: not valid JSON ({err})") from err
    model_type = data.get("model_type") if isinstance(data, dict) else None
    if model_type not in CONFIG_CLASSES:
        raise ValueError(
            f"{file}: model_type must be one of {sorted(CONFIG_CLASSES)}, got {model_type!r}"
        )
    return model_type


def read_prior_config(path: str | Path) -> PriorConfig:
    """Strictly parse `path/config.json` (unknown or mistyped keys are errors naming the key);
    sizes are validated here, before any weight is allocated."""
    file = Path(path) / "config.json"
    return read_config(CONFIG_CLASSES[_model_type(file)], file)


def load_prior(path: str | Path, map_location: str | torch.device = "cpu") -> nn.Module:
    """Load a GPT / MaskGIT / RQTransformer saved with `save_pretrained`, in eval mode; weights
    that fail their checksum or hold NaN/inf are refused naming the file."""
    model_type = _model_type(Path(path) / "config.json")
    return load_config_and_weights(
        prior_classes()[model_type],
        CONFIG_CLASSES[model_type],
        str(path),
        "prior",
        map_location=str(map_location),
    )

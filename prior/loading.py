"""`load_prior(dir)`: rebuild any saved prior from config.json's `model_type`."""

import contextlib
import io
import json
from pathlib import Path

import torch
from safetensors import SafetensorError
from torch import nn

from prior.configs import CONFIG_CLASSES, PriorConfig
from training.config import from_dict


def prior_classes() -> dict[str, type[nn.Module]]:
    from prior.gpt import GPT
    from prior.maskgit import MaskGIT
    from prior.rq_transformer import RQTransformer

    return {"gpt": GPT, "maskgit": MaskGIT, "rq_transformer": RQTransformer}


def read_prior_config(path: str | Path) -> PriorConfig:
    """Strictly parse `path/config.json` (unknown or mistyped keys are errors naming the key)."""
    file = Path(path) / "config.json"
    if not file.is_file():
        raise ValueError(f"{file} not found: not a saved prior directory")
    try:
        data = json.loads(file.read_text())
    except json.JSONDecodeError as err:
        raise ValueError(f"{file}: not valid JSON ({err})") from err
    model_type = data.get("model_type") if isinstance(data, dict) else None
    if model_type not in CONFIG_CLASSES:
        raise ValueError(
            f"{file}: model_type must be one of {sorted(CONFIG_CLASSES)}, got {model_type!r}"
        )
    return from_dict(CONFIG_CLASSES[model_type], data, source=str(file))


def load_prior(path: str | Path, map_location: str | torch.device = "cpu") -> nn.Module:
    """Load a GPT / MaskGIT / RQTransformer saved with `save_pretrained`, in eval mode."""
    cfg = read_prior_config(path)
    cls = prior_classes()[cfg.model_type]
    quiet = contextlib.redirect_stdout(io.StringIO())  # the mixin prints "Loading weights ..."
    try:
        with quiet:
            return cls.from_pretrained(
                str(path), config=cfg, map_location=str(map_location), strict=True
            )
    except SafetensorError as err:  # a damaged file: say which one
        raise ValueError(f"{Path(path) / 'model.safetensors'}: unreadable ({err})") from err

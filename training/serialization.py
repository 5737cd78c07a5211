"""Atomic writes, content hashes and config.json + model.safetensors round trips: nothing
half-written ever looks complete, nothing loosely parsed ever loads."""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import json
import os
import shutil
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, ClassVar, TypeVar

from huggingface_hub import ModelHubMixin, constants, hf_hub_download
from safetensors import SafetensorError
from safetensors.torch import load_model
from torch import nn

from training.config import from_dict

C = TypeVar("C")
M = TypeVar("M", bound=nn.Module)


@contextlib.contextmanager
def atomic_dir(path: str | Path, overwrite: bool = False) -> Iterator[Path]:
    """Yield a temporary sibling of `path`; on success rename it to `path` in one step.

    On error the temporary folder is removed and an existing `path` is left untouched.
    """
    path = Path(path)
    if path.exists() and not overwrite:
        raise FileExistsError(f"{path} already exists (refusing to overwrite)")
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.parent / f".tmp-{path.name}-{uuid.uuid4().hex[:8]}"
    tmp.mkdir()
    try:
        yield tmp
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    if path.exists():
        old = path.parent / f".old-{path.name}-{uuid.uuid4().hex[:8]}"
        path.rename(old)
        tmp.rename(path)
        shutil.rmtree(old, ignore_errors=True)
    else:
        tmp.rename(path)


def atomic_write_text(path: str | Path, text: str) -> None:
    """Write a small text file so readers see the old or the new content, never a mix."""
    path = Path(path)
    tmp = path.parent / f".tmp-{path.name}-{uuid.uuid4().hex[:8]}"
    tmp.write_text(text)
    os.replace(tmp, path)


def file_sha256(path: str | Path, chunk: int = 1 << 20) -> str:
    """Hex sha256 of a file's bytes."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            digest.update(block)
    return digest.hexdigest()


def save_config_and_weights(
    model: ModelHubMixin,
    config: Any,
    save_directory: str | Path,
    overwrite: bool = True,
    sort_keys: bool = False,
) -> None:
    """Write config.json (the dataclass `config`) + model.safetensors in one atomic step."""
    with atomic_dir(save_directory, overwrite=overwrite) as tmp:
        (tmp / constants.CONFIG_NAME).write_text(
            json.dumps(dataclasses.asdict(config), sort_keys=sort_keys, indent=2)
        )
        model._save_pretrained(tmp)


def load_config_and_weights(
    build: Callable[[C], M],
    schema: type[C],
    model_id: str,
    kind: str,
    map_location: str = "cpu",
    strict: bool = True,
    download: Callable[[str], str] | None = None,
) -> M:
    """Rebuild `build(config)` from a saved directory, in eval mode.

    The config is parsed strictly into `schema` (unknown or mistyped key -> ValueError naming it)
    and the weights must match key for key when `strict`. A missing file in a local directory is a
    FileNotFoundError naming it and `kind`; `download(filename) -> local path` (a Hub fetch) is
    used when `model_id` is not a directory, otherwise `model_id` must be one.
    """

    def fetch(name: str) -> str:
        if download is not None and not os.path.isdir(model_id):
            return download(name)
        path = os.path.join(model_id, name)
        if not os.path.isfile(path):
            raise FileNotFoundError(f"{path} not found: not a saved {kind} directory")
        return path

    config_path = fetch(constants.CONFIG_NAME)
    weights = fetch(constants.SAFETENSORS_SINGLE_FILE)
    with open(config_path, encoding="utf-8") as f:
        model = build(from_dict(schema, json.load(f), config_path))
    try:
        load_model(model, weights, strict=strict, device=map_location)
    except SafetensorError as err:  # a damaged file: say which one
        raise ValueError(f"{weights}: unreadable safetensors ({err})") from err
    return model.eval()


class SafetensorsConfigMixin:
    """`save_pretrained` / `from_pretrained` as config.json + model.safetensors, atomic and strict.

    For an nn.Module with one dataclass `self.config`; list it before PyTorchModelHubMixin so these
    methods win. Subclasses set `_config_schema` (the config dataclass) and may set
    `_sort_config_keys` and `_hub_downloads` (False: local directories only, never the Hub).
    """

    _config_schema: ClassVar[type]
    _sort_config_keys: ClassVar[bool] = False
    _hub_downloads: ClassVar[bool] = True

    def save_pretrained(self, save_directory: str | Path, overwrite: bool = True) -> None:
        """Write config.json + model.safetensors atomically (a reader never sees half a model)."""
        save_config_and_weights(
            self,  # type: ignore[arg-type]
            self.config,  # type: ignore[attr-defined]
            save_directory,
            overwrite=overwrite,
            sort_keys=self._sort_config_keys,
        )

    @classmethod
    def _from_pretrained(
        cls,
        *,
        model_id: str,
        revision: str | None,
        cache_dir: str | Path | None,
        force_download: bool,
        local_files_only: bool,
        token: str | bool | None,
        map_location: str = "cpu",
        strict: bool = True,
        config: Any = None,
    ) -> Any:
        """Rebuild the config strictly from config.json (nested dataclasses, unknown key ->
        error) and load the weights with strict key matching, in eval mode."""

        def download(name: str) -> str:
            return hf_hub_download(
                repo_id=model_id,
                filename=name,
                revision=revision,
                cache_dir=cache_dir,
                force_download=force_download,
                token=token,
                local_files_only=local_files_only,
            )

        return load_config_and_weights(
            cls,  # type: ignore[arg-type]
            cls._config_schema,
            model_id,
            cls.__name__,
            map_location=map_location,
            strict=strict,
            download=download if cls._hub_downloads else None,
        )

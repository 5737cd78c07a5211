"""Atomic writes, content hashes and config.json + model.safetensors round trips: nothing
half-written ever looks complete, nothing loosely parsed ever loads."""

from __future__ import annotations

import contextlib
import dataclasses
import errno
import hashlib
import json
import os
import shutil
import uuid
from collections.abc import Callable, Iterator, Mapping
from pathlib import Path
from typing import Any, ClassVar, TypeVar

import torch
from huggingface_hub import ModelHubMixin, constants, hf_hub_download
from safetensors import SafetensorError, safe_open
from safetensors.torch import load_file, load_model, save_file, save_model
from torch import nn

from training.config import from_dict

C = TypeVar("C")
M = TypeVar("M", bound=nn.Module)
DIGEST_KEY = "tessera_sha256"  # safetensors metadata: sha256 of the tensors written
LOW_SPACE = 64 << 20  # bytes: below this much free space a failed write is called "disk full"


class WriteError(OSError):
    """Writing an output failed; the message names the path and the cause (e.g. disk full)."""


def describe_write_error(path: str | Path, err: BaseException) -> str:
    """'<path>: <cause>' where a full disk is said in words: torch's zip writer, for one,
    reports ENOSPC as 'unexpected pos N vs M'."""
    path = Path(path)
    where = next((p for p in (path, *path.parents) if p.exists()), Path("."))
    free = shutil.disk_usage(where).free
    full = getattr(err, "errno", None) == errno.ENOSPC or free < LOW_SPACE
    cause = "no space left on device" if full else f"{type(err).__name__}: {err}"
    return f"could not write {path}: {cause} ({free / 2**20:.1f} MiB free there; {err})"


def fsync_tree(path: str | Path) -> None:
    """Flush every file and folder under `path` (and `path` itself) to the disk, so the rename
    that makes them visible cannot outlive their content in a power cut."""
    path = Path(path)
    for file in sorted(p for p in path.rglob("*") if p.is_file()):
        with open(file, "rb") as f:
            os.fsync(f.fileno())
    for folder in sorted({path, *(p for p in path.rglob("*") if p.is_dir())}, reverse=True):
        fsync_dir(folder)


def fsync_dir(path: str | Path) -> None:
    """Flush a folder's entries (the names created or renamed in it)."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


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
        fsync_tree(tmp)
    except OSError as err:
        shutil.rmtree(tmp, ignore_errors=True)
        raise WriteError(describe_write_error(path, err)) from err
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
    fsync_dir(path.parent)


def atomic_write_text(path: str | Path, text: str) -> None:
    """Write a small text file so readers see the old or the new content, never a mix."""
    path = Path(path)
    tmp = path.parent / f".tmp-{path.name}-{uuid.uuid4().hex[:8]}"
    try:
        with open(tmp, "w") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
    except OSError as err:
        tmp.unlink(missing_ok=True)
        raise WriteError(describe_write_error(path, err)) from err
    os.replace(tmp, path)
    fsync_dir(path.parent)


def file_sha256(path: str | Path, chunk: int = 1 << 20) -> str:
    """Hex sha256 of a file's bytes."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            digest.update(block)
    return digest.hexdigest()


def hash_tensors(digest: Any, tensors: Mapping[str, torch.Tensor]) -> None:
    """Feed names, dtypes, shapes and bytes of tensors, in sorted name order, into `digest`."""
    for key in sorted(tensors):
        t = tensors[key].detach().cpu().contiguous()
        digest.update(f"{key}|{t.dtype}|{tuple(t.shape)}|".encode())
        digest.update(t.reshape(-1).view(torch.uint8).numpy().tobytes())


def tensors_digest(tensors: Mapping[str, torch.Tensor]) -> str:
    """Hex sha256 of tensors (see `hash_tensors`)."""
    digest = hashlib.sha256()
    hash_tensors(digest, tensors)
    return digest.hexdigest()


def save_weights(model: nn.Module, path: str | Path) -> None:
    """model.safetensors with the sha256 of its tensors in the header, so a flipped bit or a
    damaged copy is refused at load instead of sampling garbage."""
    save_model(model, str(path))  # drops tied duplicates the way `load_model` expects them
    tensors = load_file(str(path))
    # one metadata key: safetensors writes a map's keys in no fixed order, and two saves of the
    # same weights must give the same bytes
    save_file(tensors, str(path), metadata={DIGEST_KEY: tensors_digest(tensors)})


def check_weights(path: str | Path) -> None:
    """Refuse a weights file whose tensors do not match their recorded sha256 or hold NaN/inf."""
    try:
        with safe_open(str(path), "pt") as f:
            recorded = (f.metadata() or {}).get(DIGEST_KEY)
        tensors = load_file(str(path))
    except (SafetensorError, OSError) as err:
        raise ValueError(f"{path}: unreadable safetensors ({err})") from err
    if recorded is not None and tensors_digest(tensors) != recorded:
        raise ValueError(f"{path}: the weights do not match the checksum recorded when they were "
                         f"saved (the file is damaged or was modified)")  # fmt: skip
    for key, t in tensors.items():
        if t.is_floating_point() and not bool(torch.isfinite(t).all()):
            raise ValueError(f"{path}: tensor {key!r} holds NaN or inf values")


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
        save_weights(model, tmp / constants.SAFETENSORS_SINGLE_FILE)  # type: ignore[arg-type]


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
        if download is not None and not os.path.isdir(model_id) and not looks_local(model_id):
            try:
                return download(name)
            except Exception as err:  # noqa: BLE001 - any Hub failure: say it is not a folder either
                raise FileNotFoundError(
                    f"{kind} {model_id!r}: no such local folder, and not loadable from the Hub "
                    f"({type(err).__name__}: {str(err).splitlines()[0] if str(err) else ''})"
                ) from err
        path = os.path.join(model_id, name)
        if not os.path.isdir(model_id):
            raise FileNotFoundError(f"{kind} folder {model_id} not found (no such local folder)")
        if not os.path.isfile(path):
            raise FileNotFoundError(f"{path} not found: not a saved {kind} directory")
        return path

    config_path = fetch(constants.CONFIG_NAME)
    weights = fetch(constants.SAFETENSORS_SINGLE_FILE)
    model = build(read_config(schema, config_path))
    check_weights(weights)
    try:
        load_model(model, weights, strict=strict, device=map_location)
    except SafetensorError as err:  # a damaged file: say which one
        raise ValueError(f"{weights}: unreadable safetensors ({err})") from err
    return model.eval()


def looks_local(model_id: str) -> bool:
    """True when `model_id` can only be a local path (not a Hub `namespace/name` repo id): an
    absolute or ./~ path, more than one '/', or a first component that exists here."""
    return (
        os.path.isabs(model_id)
        or model_id.startswith((".", "~"))
        or model_id.count("/") > 1
        or ("/" in model_id and os.path.exists(model_id.split("/")[0]))
    )


def read_config(schema: type[C], path: str | Path) -> C:
    """Strictly parse a config.json into `schema`, naming the file on any error."""
    try:
        with open(path, encoding="utf-8") as f:
            data = json.load(f)
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise ValueError(f"{path}: not valid JSON ({err})") from err
    if not isinstance(data, dict):
        raise ValueError(f"{path}: expected a JSON object of config keys")
    return from_dict(schema, data, str(path))


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
    def from_pretrained(
        cls,
        pretrained_model_name_or_path: str | Path,
        *,
        map_location: str = "cpu",
        strict: bool = True,
        revision: str | None = None,
        cache_dir: str | Path | None = None,
        force_download: bool = False,
        local_files_only: bool = False,
        token: str | bool | None = None,
    ) -> Any:
        """Rebuild the config strictly from config.json (nested dataclasses, unknown key ->
        error) and load checked weights with strict key matching, in eval mode. A local folder
        is read directly; anything else is a Hub repo id when `_hub_downloads`, and a missing
        folder is said to be one (not reported as a malformed repo id)."""
        model_id = str(pretrained_model_name_or_path)

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

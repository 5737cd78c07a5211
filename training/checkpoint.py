"""Crash-safe checkpoints: `checkpoints/step_000100/` written atomically, `latest` updated last.

Writing: every rank saves into a uniquely named temporary folder (`.tmp-step_000100-<token>`);
the main process then writes `trainer_state.json` and, last, `checkpoint.json` (every file's
size and sha256, and the step), flushes them to disk, and renames the folder into place. A
folder is renamed into place only once both exist: a SIGKILL mid-save leaves only a `.tmp-*` folder.
Resuming verifies the manifest, so a missing, truncated or modified file is refused naming it.
Old checkpoints are pruned by renaming them to `.trash-*` first, so a kill mid-prune never
leaves a half-deleted folder that looks like a checkpoint. Leftover `.tmp-*` / `.trash-*`
folders are removed when the next run takes the run folder's lock.
"""

from __future__ import annotations

import json
import re
import shutil
import uuid
import warnings
from dataclasses import asdict, dataclass, fields
from pathlib import Path

import torch
from accelerate import Accelerator
from accelerate.utils import broadcast_object_list

from training.serialization import (
    WriteError,
    atomic_write_text,
    describe_write_error,
    file_sha256,
    fsync_dir,
    fsync_tree,
)

STATE_FILE = "trainer_state.json"
MANIFEST = "checkpoint.json"
LATEST = "latest"
STEP_NAME = re.compile(r"step_(\d{6,})")


class CheckpointError(ValueError):
    """A checkpoint is incomplete, damaged or does not match what it claims to be."""


@dataclass
class TrainState:
    """Where the run is: optimizer steps done and the data position they correspond to."""

    step: int = 0
    epoch: int = 0
    batches_in_epoch: int = 0  # micro-batches consumed in the current epoch
    skipped_steps: int = 0  # steps skipped for a non-finite loss, in total
    bad_in_row: int = 0


def step_dir_name(step: int) -> str:
    return f"step_{step:06d}"


def is_complete(path: Path) -> bool:
    """A checkpoint folder under its final name holds its trainer state (a save is renamed into
    place only after the state and the manifest are written; older versions wrote no manifest)."""
    return (path / STATE_FILE).is_file()


def write_manifest(folder: Path, step: int) -> None:
    """`checkpoint.json`: size and sha256 of every file in `folder`, written last."""
    files = {
        p.relative_to(folder).as_posix(): {"size": p.stat().st_size, "sha256": file_sha256(p)}
        for p in sorted(folder.rglob("*"))
        if p.is_file() and p.name != MANIFEST
    }
    (folder / MANIFEST).write_text(json.dumps({"step": step, "files": files}, indent=2))


def verify_checkpoint(path: Path) -> TrainState:
    """The checkpoint's TrainState after checking every file against the manifest and the step
    against the folder name; CheckpointError naming the file otherwise."""
    if not (path / MANIFEST).is_file():  # written by a version before manifests
        warnings.warn(f"{path} has no {MANIFEST} (an older checkpoint): its files are not verified",
                      stacklevel=2)  # fmt: skip
        return _check_step(path, _read_state(path / STATE_FILE), None)
    manifest = _read_json(path / MANIFEST)
    listed = manifest.get("files")
    if not isinstance(listed, dict):
        raise CheckpointError(f"{path / MANIFEST}: no file list")
    for name, entry in listed.items():
        file = path / name
        if not file.is_file():
            raise CheckpointError(f"{file}: listed in {MANIFEST} but missing")
        if file.stat().st_size != entry.get("size") or file_sha256(file) != entry.get("sha256"):
            raise CheckpointError(f"{file}: contents differ from {MANIFEST} (damaged or modified)")
    present = {p.relative_to(path).as_posix() for p in path.rglob("*") if p.is_file()}
    extra = sorted(present - set(listed) - {MANIFEST})
    if extra:
        raise CheckpointError(f"{path}: files not written by the checkpoint: {', '.join(extra)}")
    return _check_step(path, _read_state(path / STATE_FILE), manifest.get("step"))


def _check_step(path: Path, state: TrainState, manifest_step: int | None) -> TrainState:
    """The step the trainer state, the manifest and the folder name claim must agree."""
    named = STEP_NAME.fullmatch(path.name)
    claims = {"trainer_state.json": state.step}
    if manifest_step is not None:
        claims[MANIFEST] = manifest_step
    if named:
        claims[f"the folder name {path.name}"] = int(named.group(1))
    if len(set(claims.values())) != 1:
        said = ", ".join(f"{k} says {v}" for k, v in claims.items())
        raise CheckpointError(f"{path}: step disagrees ({said})")
    return state


def _read_json(file: Path) -> dict:
    try:
        data = json.loads(file.read_text())
    except FileNotFoundError as err:
        raise CheckpointError(f"{file} not found: not a complete checkpoint") from err
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise CheckpointError(f"{file}: not valid JSON ({err})") from err
    if not isinstance(data, dict):
        raise CheckpointError(f"{file}: expected a JSON object")
    return data


def _read_state(file: Path) -> TrainState:
    data = _read_json(file)
    names = {f.name for f in fields(TrainState)}
    if set(data) != names or not all(type(v) is int and v >= 0 for v in data.values()):
        raise CheckpointError(f"{file}: expected non-negative integers {sorted(names)}, got {data}")
    return TrainState(**data)


class CheckpointManager:
    """Saves and finds checkpoints under `output_dir/checkpoints`."""

    def __init__(
        self, accelerator: Accelerator | None, output_dir: str | Path, keep_last: int = 2
    ) -> None:
        if keep_last < 1:
            raise ValueError(
                f"keep_last must be >= 1 (the checkpoint a resume needs), got {keep_last}"
            )
        self.accelerator = accelerator
        self.root = Path(output_dir) / "checkpoints"
        self.keep_last = keep_last

    def save(self, state: TrainState) -> Path:
        """Every rank calls this (DeepSpeed shards are written by each rank)."""
        acc = self.accelerator
        final = self.root / step_dir_name(state.step)
        token = broadcast_object_list([uuid.uuid4().hex[:12]])[0]  # one name for every rank
        tmp = self.root / f".tmp-{final.name}-{token}"
        if acc.is_main_process:
            tmp.mkdir(parents=True)
        acc.wait_for_everyone()
        try:
            acc.save_state(str(tmp))
            acc.wait_for_everyone()
            if acc.is_main_process:
                (tmp / STATE_FILE).write_text(json.dumps(asdict(state), indent=2))
                write_manifest(tmp, state.step)
                fsync_tree(tmp)
        except (OSError, RuntimeError) as err:  # torch reports a full disk as "unexpected pos"
            if acc.is_main_process:
                shutil.rmtree(tmp, ignore_errors=True)
            raise WriteError(
                describe_write_error(final, err) + "; the previous checkpoints are intact"
            ) from err
        if acc.is_main_process:
            if final.exists():
                self._discard(final)
            tmp.rename(final)
            fsync_dir(self.root)
            atomic_write_text(self.root / LATEST, final.name)
            self._prune()
        acc.wait_for_everyone()
        return final

    def _discard(self, path: Path) -> None:
        """Rename first, then delete: a kill in between leaves a `.trash-*` folder, never a
        half-deleted checkpoint."""
        trash = self.root / f".trash-{path.name}-{uuid.uuid4().hex[:8]}"
        path.rename(trash)
        shutil.rmtree(trash, ignore_errors=True)

    def _prune(self) -> None:
        complete = self.complete_checkpoints()
        for old in complete[: max(0, len(complete) - self.keep_last)]:
            self._discard(old)

    def clean_leftovers(self) -> list[str]:
        """Remove temporary and trash folders of killed saves (call with the run lock held)."""
        if not self.root.is_dir():
            return []
        stale = sorted(p for p in self.root.iterdir() if p.name.startswith((".tmp-", ".trash-")))
        for path in stale:
            shutil.rmtree(path, ignore_errors=True) if path.is_dir() else path.unlink()
        return [p.name for p in stale]

    def complete_checkpoints(self) -> list[Path]:
        """Complete checkpoint folders, oldest first."""
        if not self.root.is_dir():
            return []
        return sorted(
            p for p in self.root.iterdir() if STEP_NAME.fullmatch(p.name) and is_complete(p)
        )

    def latest(self) -> Path | None:
        """The `latest` pointer if it names a complete checkpoint of this run folder (a bare
        `step_N` name, never a path elsewhere), else the newest complete one."""
        pointer = self.root / LATEST
        if pointer.is_file():
            name = pointer.read_text().strip()
            if STEP_NAME.fullmatch(name) and is_complete(self.root / name):
                return self.root / name
        complete = self.complete_checkpoints()
        return complete[-1] if complete else None

    def resolve(self, spec: str | None) -> Path | None:
        """`None` -> fresh run; `latest` -> newest complete checkpoint or fresh; a path -> it."""
        if spec is None:
            return None
        if spec == LATEST:
            return self.latest()
        path = Path(spec)
        if not (STEP_NAME.fullmatch(path.name) and is_complete(path)):
            raise CheckpointError(
                f"--resume {spec}: not a complete checkpoint (a step_NNNNNN folder with {STATE_FILE})"
            )
        return path

    def load(self, path: Path) -> TrainState:
        """Verify, then restore model, optimizer, scheduler, registered objects and RNG states."""
        check_custom_states(path)  # safe to run first: weights_only loads execute nothing
        state = verify_checkpoint(path)
        try:
            self.accelerator.load_state(str(path))
        except Exception as err:  # noqa: BLE001 - any failure inside accelerate: name the folder
            raise CheckpointError(
                f"{path}: could not restore the checkpoint ({type(err).__name__}: {err})"
            ) from err
        return state


def check_custom_states(path: Path) -> None:
    """accelerate unpickles registered objects' states (custom_checkpoint_*.pkl, e.g. the EMA)
    with weights_only=False: refuse any file a weights_only=True load rejects, before that."""
    for file in sorted(Path(path).glob("custom_checkpoint_*.pkl")):
        try:
            torch.load(file, map_location="cpu", weights_only=True)
        except Exception as err:  # noqa: BLE001 - any failure means: not plain tensors and numbers
            lines = [line for line in str(err).splitlines() if line.strip()]
            detail = next((line for line in lines if "GLOBAL" in line), lines[0] if lines else "")
            raise ValueError(
                f"{file}: refusing to unpickle a checkpoint file that torch.load(weights_only=True) "
                f"rejects ({type(err).__name__}: {detail})"
            ) from err

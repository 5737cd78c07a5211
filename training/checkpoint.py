"""Crash-safe checkpoints: `checkpoints/step_000100/` written atomically, `latest` updated last.

A checkpoint folder is complete when it holds `trainer_state.json`, which is written into the
temporary folder after every rank has saved and before the rename; `--resume latest` never sees
a half-written checkpoint (a SIGKILL mid-save leaves only a `.tmp-*` folder, which is ignored).
"""

from __future__ import annotations

import json
import shutil
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from accelerate import Accelerator

from training.serialization import atomic_write_text

STATE_FILE = "trainer_state.json"
LATEST = "latest"


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
    return (path / STATE_FILE).is_file()


class CheckpointManager:
    """Saves and finds checkpoints under `output_dir/checkpoints`."""

    def __init__(
        self, accelerator: Accelerator, output_dir: str | Path, keep_last: int = 2
    ) -> None:
        self.accelerator = accelerator
        self.root = Path(output_dir) / "checkpoints"
        self.keep_last = keep_last

    def save(self, state: TrainState) -> Path:
        """Every rank calls this (DeepSpeed shards are written by each rank)."""
        acc = self.accelerator
        final = self.root / step_dir_name(state.step)
        tmp = self.root / f".tmp-{final.name}"
        if acc.is_main_process:
            shutil.rmtree(tmp, ignore_errors=True)
            tmp.mkdir(parents=True)
        acc.wait_for_everyone()
        acc.save_state(str(tmp))
        acc.wait_for_everyone()
        if acc.is_main_process:
            (tmp / STATE_FILE).write_text(json.dumps(asdict(state), indent=2))
            if final.exists():
                shutil.rmtree(final)
            tmp.rename(final)
            atomic_write_text(self.root / LATEST, final.name)
            self._prune()
        acc.wait_for_everyone()
        return final

    def _prune(self) -> None:
        complete = self.complete_checkpoints()
        for old in complete[: max(0, len(complete) - self.keep_last)]:
            shutil.rmtree(old, ignore_errors=True)

    def complete_checkpoints(self) -> list[Path]:
        """Complete checkpoint folders, oldest first."""
        if not self.root.is_dir():
            return []
        return sorted(p for p in self.root.glob("step_*") if is_complete(p))

    def latest(self) -> Path | None:
        """The `latest` pointer if it names a complete checkpoint, else the newest complete one."""
        pointer = self.root / LATEST
        if pointer.is_file():
            candidate = self.root / pointer.read_text().strip()
            if is_complete(candidate):
                return candidate
        complete = self.complete_checkpoints()
        return complete[-1] if complete else None

    def resolve(self, spec: str | None) -> Path | None:
        """`None` -> fresh run; `latest` -> newest complete checkpoint or fresh; a path -> it."""
        if spec is None:
            return None
        if spec == LATEST:
            return self.latest()
        path = Path(spec)
        if not is_complete(path):
            raise ValueError(f"--resume {spec}: not a complete checkpoint (no {STATE_FILE} in it)")
        return path

    def load(self, path: Path) -> TrainState:
        """Restore model, optimizer, scheduler, registered objects and RNG states."""
        check_custom_states(path)
        self.accelerator.load_state(str(path))
        return TrainState(**json.loads((path / STATE_FILE).read_text()))


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

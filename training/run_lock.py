"""One run per folder: an advisory lock file `output_dir/.run.lock` holding its owner.

Two runs writing one folder lose a model and mix their logs (and a resume can pick up the other
run's checkpoint), so the main process takes an exclusive `flock` on the lock file for the whole
run and writes its pid, host and start time into it. The kernel drops the lock when the process
dies, so a lock file left by a killed run is stale by construction: the next run takes it over
and says so. A second run started while the first is alive is refused at once, naming the owner.
"""

from __future__ import annotations

import fcntl
import json
import os
import socket
import time
from pathlib import Path

LOCK_FILE = ".run.lock"


class RunFolderBusyError(RuntimeError):
    """Another live process holds the run folder."""


class RunLock:
    """Exclusive advisory lock on a run folder (take it with `acquire`, drop it with `release`)."""

    def __init__(self, output_dir: str | Path) -> None:
        self.path = Path(output_dir) / LOCK_FILE
        self._fd: int | None = None
        self.stale_owner: dict | None = None  # what a dead previous holder had written

    def acquire(self) -> RunLock:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        while True:
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                owner = _read_owner(fd)
                os.close(fd)
                raise RunFolderBusyError(
                    f"{self.path.parent} is in use by another run ({_describe(owner)}); wait for "
                    f"it to finish or choose another --output-dir"
                ) from None
            # the previous holder may have unlinked the file between our open and flock
            if _same_file(fd, self.path):
                break
            os.close(fd)
        self.stale_owner = _read_owner(fd) or None
        os.ftruncate(fd, 0)
        owner = {"pid": os.getpid(), "host": socket.gethostname(), "started": time.time()}
        os.pwrite(fd, json.dumps(owner).encode(), 0)
        os.fsync(fd)
        self._fd = fd
        return self

    def release(self) -> None:
        if self._fd is None:
            return
        try:
            self.path.unlink(missing_ok=True)
        finally:
            os.close(self._fd)
            self._fd = None

    def __enter__(self) -> RunLock:
        return self.acquire()

    def __exit__(self, *exc: object) -> None:
        self.release()


def _same_file(fd: int, path: Path) -> bool:
    try:
        return os.fstat(fd).st_ino == os.stat(path).st_ino
    except FileNotFoundError:
        return False


def _read_owner(fd: int) -> dict:
    try:
        data = os.pread(fd, 4096, 0)
        owner = json.loads(data.decode()) if data else {}
        return owner if isinstance(owner, dict) else {}
    except (OSError, ValueError):
        return {}


def _describe(owner: dict) -> str:
    if not owner:
        return "owner unknown"
    started = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(owner.get("started", 0)))
    return f"pid {owner.get('pid')} on host {owner.get('host')}, started {started}"


def describe_stale(owner: dict | None) -> str:
    """A line about the dead run whose lock was taken over ('' when there was none)."""
    return (
        f"took over the lock of a run that is no longer alive ({_describe(owner)})" if owner else ""
    )

"""Timing helpers the benchmarks share: device sync, interleaved medians, device names, JSON out.

Benchmarks compare two implementations side by side in one run. `interleaved` runs every
candidate once per round and rotates who goes first, so a busy neighbour process or a clock
change hits all of them alike; medians over rounds are what the ratios are built from.
"""

from __future__ import annotations

import json
import platform
import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from training.serialization import atomic_write_text


def synchronize(device: str | torch.device) -> None:
    """Wait for queued CUDA work (a no-op elsewhere), so wall times cover the kernels."""
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize()


def timed(fn: Callable[[], Any], device: str | torch.device) -> float:
    """Wall seconds of one call of fn (CUDA-synchronised on both ends)."""
    synchronize(device)
    start = time.perf_counter()
    fn()
    synchronize(device)
    return time.perf_counter() - start


@dataclass
class Timing:
    """Wall times of the timed calls of one candidate and what those calls returned."""

    times: list[float] = field(default_factory=list)
    results: list[Any] = field(default_factory=list)

    @property
    def median(self) -> float:
        return statistics.median(self.times)

    @property
    def best(self) -> float:
        return min(self.times)

    def as_dict(self) -> dict[str, float]:
        return {"median_s": round(self.median, 4), "min_s": round(self.best, 4)}


def interleaved(
    fns: dict[str, Callable[[], Any]],
    repeats: int,
    warmup: int,
    device: str | torch.device,
) -> dict[str, Timing]:
    """Run each fn `warmup` untimed then `repeats` timed times, round-robin; round r starts
    at candidate r mod n. Returns per-name timings (and return values of the timed calls)."""
    if repeats < 1 or warmup < 0:
        raise ValueError(f"repeats must be >= 1 and warmup >= 0, got {repeats} and {warmup}")
    names = list(fns)
    out = {name: Timing() for name in names}
    for r in range(warmup + repeats):
        shift = r % len(names)
        for name in names[shift:] + names[:shift]:
            synchronize(device)
            start = time.perf_counter()
            result = fns[name]()
            synchronize(device)
            elapsed = time.perf_counter() - start
            if r >= warmup:
                out[name].times.append(elapsed)
                out[name].results.append(result)
    return out


def paired_spread(baseline: Timing, candidate: Timing) -> list[float]:
    """[q25, q75] of the per-round speed-ups baseline / candidate. `interleaved` times both in
    every round, back to back, so each pair shares the machine's state of that moment: their
    spread says how much a ratio moves on this machine, which a median alone hides."""
    ratios = [b / c for b, c in zip(baseline.times, candidate.times, strict=True)]
    if len(ratios) < 2:
        return [round(ratios[0], 3)] * 2
    q25, _, q75 = statistics.quantiles(ratios, n=4, method="inclusive")
    return [round(q25, 3), round(q75, 3)]


def device_name(device: str | torch.device) -> str:
    """GPU model name, or the CPU with the number of threads torch uses."""
    if torch.device(device).type == "cuda":
        return torch.cuda.get_device_name(torch.device(device))
    cpu = platform.processor() or platform.machine()
    return f"cpu ({cpu}, {torch.get_num_threads()} threads)"


def emit(report: dict[str, Any], out: str | Path | None = None) -> None:
    """Print the report as JSON and, with `out`, also write it there (atomically)."""
    text = json.dumps(report, indent=2)
    print(text)
    if out is not None:
        Path(out).parent.mkdir(parents=True, exist_ok=True)
        atomic_write_text(out, text + "\n")

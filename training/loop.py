"""The training loop both stages share: data order, resume, NaN guard, logging, checkpoints.

Each trainer supplies `train_step(batch) -> StepOutput` (forward, backward and optimizer steps
under `accelerator.accumulate`) and optional periodic hooks (eval, samples). The loop owns the
bookkeeping that must be right for a resumed run to equal an uninterrupted one: the epoch's
seeded shuffle, `skip_first_batches` for the position inside an epoch, RNG states (restored by
`load_state`), the LR schedule and the step counter.

Build DataLoaders with their own seeded `torch.Generator`: a loader without one draws its worker
seed from the global RNG each time an iterator starts, which shifts every later dropout mask
after a resume.
"""

from __future__ import annotations

import os
import shutil
import sys
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from accelerate import Accelerator
from accelerate.utils import broadcast_object_list
from omegaconf import OmegaConf
from torch import nn
from tqdm.auto import tqdm

from training.checkpoint import CheckpointManager, TrainState
from training.config import save_config
from training.run_lock import RunFolderBusyError, RunLock, describe_stale
from training.runtime import MetricsLog, RuntimeConfig, finite_everywhere


class NonFiniteLossError(RuntimeError):
    """Too many consecutive steps had a NaN/inf loss."""


class RunExistsError(ValueError):
    """The output folder holds a run and neither --resume nor --overwrite was given."""


RUN_OUTPUTS = ("config.yaml", "checkpoints", "final", "metrics.jsonl", "eval.json", "samples",
               "logs", "final_weights.json")  # fmt: skip


def check_same_model(recorded: Path, config: Any) -> None:
    """ValueError naming every `model.*` key where `config` differs from the run's config.yaml
    (a resumed run with other shapes would fail deep inside load_state, or train the wrong net)."""
    if not recorded.is_file():
        return
    saved = _flat(OmegaConf.to_container(OmegaConf.load(recorded)).get("model", {}), "model")
    ours = _flat(OmegaConf.to_container(OmegaConf.structured(config)).get("model", {}), "model")
    changed = sorted(k for k in saved.keys() | ours.keys() if saved.get(k) != ours.get(k))
    if changed:
        shown = "; ".join(f"{k}: run has {saved.get(k)!r}, config has {ours.get(k)!r}"
                          for k in changed[:6])  # fmt: skip
        raise ValueError(f"--resume: the config changes the model of the run in {recorded.parent} "
                         f"({shown}); resume with the run's config or start a new run")  # fmt: skip


def _flat(tree: Any, prefix: str) -> dict[str, Any]:
    if not isinstance(tree, dict):
        return {prefix: tree}
    out: dict[str, Any] = {}
    for key, value in tree.items():
        out |= _flat(value, f"{prefix}.{key}")
    return out


class EmptyEpochError(ValueError):
    """An epoch yielded no batch (a dataset smaller than one batch with drop_last)."""


@dataclass
class StepOutput:
    """What one micro-batch step reports; `skipped` when its loss was not finite."""

    metrics: dict[str, float] = field(default_factory=dict)
    skipped: bool = False


Hook = Callable[[int], None]


def optimizer_step(
    accelerator: Accelerator,
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    scheduler: torch.optim.lr_scheduler.LRScheduler,
    loss: torch.Tensor,
    grad_clip: float,
) -> StepOutput:
    """Backward + clip + step for one optimizer, skipping the update when the loss is not finite.

    Call inside `accelerator.accumulate(model)`. The finiteness check is agreed across ranks so
    every process skips together (otherwise collectives would hang).
    """
    if not finite_everywhere(accelerator, loss):
        optimizer.zero_grad(set_to_none=True)
        return StepOutput({"loss": float("nan")}, skipped=True)
    accelerator.backward(loss)
    metrics = {"loss": loss.detach().float().item()}
    if accelerator.sync_gradients:
        if grad_clip > 0:
            norm = accelerator.clip_grad_norm_(model.parameters(), grad_clip)
            if norm is not None:
                metrics["grad_norm"] = float(norm)
        metrics["lr"] = scheduler.get_last_lr()[0]
    optimizer.step()
    if accelerator.sync_gradients:
        scheduler.step()
    optimizer.zero_grad(set_to_none=True)
    return StepOutput(metrics)


class TrainLoop:
    """Runs `train_step` over epochs of `loader` until `cfg.max_steps` optimizer steps.

    Creating it takes the run folder's lock (training.run_lock) on the main process, refused on
    every rank while another run holds it; `close()` (or leaving a `with` block) releases it.
    """

    def __init__(
        self, accelerator: Accelerator, cfg: RuntimeConfig, output_dir: str | Path
    ) -> None:
        self.accelerator = accelerator
        self.cfg = cfg
        self.output_dir = Path(output_dir)
        self.checkpoints = CheckpointManager(accelerator, output_dir, cfg.keep_last)
        self.lock = self._claim_folder()
        self.log = MetricsLog(accelerator, output_dir)
        self.state = TrainState()

    def _claim_folder(self) -> RunLock | None:
        """Lock the run folder (main process) and clear what killed saves left; every rank
        learns whether the folder was free, so a refusal stops all of them at once."""
        acc, lock, error = self.accelerator, None, ""
        if acc.is_main_process:
            try:
                lock = RunLock(self.output_dir).acquire()
            except RunFolderBusyError as err:
                error = str(err)
        error = broadcast_object_list([error])[0]
        if error:
            raise RunFolderBusyError(error)
        if lock is not None:
            if lock.stale_owner:
                acc.print(describe_stale(lock.stale_owner))
            removed = self.checkpoints.clean_leftovers()
            if removed:
                acc.print(f"removed {len(removed)} leftover folder(s) of killed saves: {removed}")
        acc.wait_for_everyone()
        return lock

    def close(self) -> None:
        """Release the run folder (safe to call twice)."""
        if self.lock is not None:
            self.lock.release()
            self.lock = None

    def __enter__(self) -> TrainLoop:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def start(
        self, spec: str | None, *, config: Any, project: str, overwrite: bool = False
    ) -> TrainState:
        """`resume`, then record the run's `config.yaml` and start the trackers: after every
        check, so a start that fails writes nothing into the run folder."""
        state = self.resume(spec, overwrite=overwrite, config=config)
        if self.accelerator.is_main_process:
            save_config(config, self.output_dir / "config.yaml")
        if self.cfg.tracker != "none":
            self.accelerator.init_trackers(project)  # main process only (accelerate)
        return state

    def resume(
        self, spec: str | None, *, overwrite: bool = False, config: Any = None
    ) -> TrainState:
        """Load `latest` or a given checkpoint (after `accelerator.prepare`); metrics logged
        after that step by the interrupted run are dropped, so each step has one row.

        Without `spec`, a folder that already holds a run is refused unless `overwrite` (then
        its outputs are removed first). With `spec` and the run's `config` (a dataclass), a
        change of any `model.*` key against the run's config.yaml is refused, naming the keys."""
        if spec is None:
            self._fresh_folder(overwrite)
        elif config is not None:
            check_same_model(self.output_dir / "config.yaml", config)
        path = self.checkpoints.resolve(spec)
        if path is not None:
            self.state = self.checkpoints.load(path)
            self.log.truncate_after(self.state.step)
            self.accelerator.print(f"resumed from {path} at step {self.state.step}")
        elif spec is not None:
            self.accelerator.print("no complete checkpoint found; starting fresh")
        return self.state

    def _fresh_folder(self, overwrite: bool) -> None:
        acc = self.accelerator
        found = [name for name in RUN_OUTPUTS if (self.output_dir / name).exists()]
        acc.wait_for_everyone()  # every rank has looked before anything is removed
        if found and not overwrite:
            raise RunExistsError(
                f"{self.output_dir} already holds a run ({', '.join(found)}): pass "
                f"--resume latest to continue it, or --overwrite to start over"
            )
        if found and acc.is_main_process:
            for name in found:  # rename first, then delete: a kill leaves only `.trash-*`
                trash = self.output_dir / f".trash-{name}-{uuid.uuid4().hex[:8]}"
                (self.output_dir / name).rename(trash)
                shutil.rmtree(trash) if trash.is_dir() else trash.unlink()
            acc.print(f"--overwrite: removed {', '.join(found)} from {self.output_dir}")
        acc.wait_for_everyone()

    def _batches(self, loader):
        if hasattr(loader, "set_epoch"):
            loader.set_epoch(self.state.epoch)
        dataset = getattr(loader, "dataset", None)  # epoch-keyed augmentation (tokenizer.data)
        if hasattr(dataset, "set_epoch"):  # accelerate skips it when its sampler takes the epoch
            dataset.set_epoch(self.state.epoch)
        if self.state.batches_in_epoch:
            return self.accelerator.skip_first_batches(loader, self.state.batches_in_epoch)
        return loader

    def run(
        self, loader, train_step: Callable[[dict], StepOutput], hooks: dict[str, Hook] | None = None
    ) -> TrainState:
        """Train; `hooks` maps 'eval' / 'sample' to callables run every `eval_every` / `sample_every`."""
        hooks = hooks or {}
        cfg, state = self.cfg, self.state
        self._bar = bar = tqdm(
            total=cfg.max_steps,
            initial=state.step,
            disable=not (cfg.progress and self.accelerator.is_main_process and _terminal()),
            desc="train",
        )
        self._started = (time.perf_counter(), state.step)
        running: dict[str, list[float]] = {}
        while state.step < cfg.max_steps:
            start = state.batches_in_epoch
            for batch in self._batches(loader):
                out = train_step(batch)
                state.batches_in_epoch += 1
                if not self.accelerator.sync_gradients:
                    continue
                state.step += 1
                bar.update(1)
                self._guard(out)
                for key, value in out.metrics.items():
                    running.setdefault(key, []).append(value)
                self._periodic(running, hooks, bar)
                if state.step >= cfg.max_steps:
                    break
            else:
                if state.batches_in_epoch == start == 0:
                    raise EmptyEpochError(_empty_epoch_message(loader, self.accelerator))
                state.epoch += 1
                state.batches_in_epoch = 0
        bar.close()
        if state.step % cfg.save_every:
            self.checkpoints.save(state)
        return state

    def _guard(self, out: StepOutput) -> None:
        state = self.state
        if not out.skipped:
            state.bad_in_row = 0
            return
        state.skipped_steps += 1
        state.bad_in_row += 1
        self.accelerator.print(
            f"step {state.step}: non-finite loss, update skipped ({state.bad_in_row} in a row)"
        )
        if state.bad_in_row >= self.cfg.max_bad_steps:
            last = self.checkpoints.latest()
            raise NonFiniteLossError(
                f"{state.bad_in_row} consecutive non-finite losses ending at step {state.step}; "
                f"last good checkpoint: {last if last else 'none'}"
            )

    def say(self, text: str) -> None:
        """A line for the person watching, on its own line above the progress bar (main process)."""
        if self.accelerator.is_main_process:
            bar = getattr(self, "_bar", None)
            (bar.write if bar is not None and not bar.disable else print)(text)
            sys.stdout.flush()

    def _summary(self, step: int, means: dict[str, float]) -> str:
        start, first = self._started
        rate = (step - first) / max(time.perf_counter() - start, 1e-9)
        shown = ", ".join(f"{k} {means[k]:.4g}" for k in ("loss", "accuracy", "lr") if k in means)
        return f"step {step}/{self.cfg.max_steps}: {shown} ({rate:.2f} steps/s)"

    def _periodic(self, running: dict[str, list[float]], hooks: dict[str, Hook], bar) -> None:
        step = self.state.step
        if step % self.cfg.log_every == 0 and running:
            means = {k: sum(v) / len(v) for k, v in running.items() if v and all(x == x for x in v)}
            means["skipped_steps"] = self.state.skipped_steps
            self.log.log(step, means)
            bar.set_postfix(loss=f"{means.get('loss', float('nan')):.4f}")
            if bar.disable and self.cfg.progress:  # a file or CI: a summary line, not a bar
                self.say(self._summary(step, means))
            running.clear()
        if "eval" in hooks and step % self.cfg.eval_every == 0:
            hooks["eval"](step)
        if "sample" in hooks and step % self.cfg.sample_every == 0:
            hooks["sample"](step)
        if step % self.cfg.save_every == 0 and self.state.bad_in_row == 0:
            self.checkpoints.save(self.state)


def _terminal() -> bool:
    """A progress bar only where a person sees it redrawn; files and CI get summary lines."""
    return sys.stderr.isatty() or os.environ.get("TESSERA_PROGRESS") == "bar"


def _empty_epoch_message(loader, accelerator: Accelerator) -> str:
    dataset = getattr(loader, "dataset", None)
    size = len(dataset) if dataset is not None and hasattr(dataset, "__len__") else "unknown"
    batch = getattr(loader, "total_batch_size", None) or getattr(loader, "batch_size", None)
    return (
        f"an epoch yielded no batch: the dataset has {size} rows but one batch needs {batch} "
        f"(runtime.batch_size x {accelerator.num_processes} process(es), incomplete batches are "
        f"dropped); lower runtime.batch_size or add data"
    )

"""Continuous batching: one background thread owns the decode engine; requests become rows.

Every image is one row of N tokens. At each step boundary the loop retires finished rows
(decodes them to PNG and hands them to their request), drops rows of cancelled or expired
requests, admits queued rows into free slots (one prefill of just those slots; the running
rows keep their caches; the next row comes from the job that has started the fewest), then
runs one engine step for every live slot. A row's tokens depend
only on its prompt, settings and (seed, index) (the engine's per-row noise), so an image is the
Pipeline's image for the same arguments whatever else shares the batch.

Methods other than plain AR (speculative, relaxed, Jacobi, MaskGIT) run as one Pipeline call
between steps. The HTTP side never touches the model: it submits a `Job` and awaits its future.
"""

from __future__ import annotations

import io
import logging
import threading
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch
from PIL import Image

from sampling.engine import DecodeEngine
from sampling.generate import MODEL_METHODS
from sampling.guidance import GuidanceSchedule
from sampling.logits import SamplingConfig
from sampling.noise import RowNoise
from sampling.pipeline import Pipeline
from sampling.row_settings import RowSettings

log = logging.getLogger(__name__)


class QueueFull(RuntimeError):
    """The bounded queue has no room for the request's rows (HTTP 429)."""


class ShuttingDown(RuntimeError):
    """The server stopped admitting work (HTTP 503)."""


class DeadlineExceeded(RuntimeError):
    """The request did not finish within its deadline (HTTP 504)."""


@dataclass(eq=False)  # compared and hashed by identity
class Job:
    """One request: n images of one or more prompts, with one setting for all of them."""

    prompts: list[str | int]
    seed: int
    sampling: SamplingConfig
    guidance: GuidanceSchedule
    method: str
    deadline: float  # time.monotonic() after which the job fails
    on_done: Callable[[Job], None] = lambda job: None
    images: list[bytes | None] = field(default_factory=list)
    error: BaseException | None = None
    cancelled: bool = False
    started: int = 0  # rows admitted so far
    submitted: float = field(default_factory=time.monotonic)
    finished: float | None = None

    def __post_init__(self) -> None:
        self.images = [None] * len(self.prompts)

    @property
    def done(self) -> bool:
        return self.finished is not None

    @property
    def seeds(self) -> list[tuple[int, int]]:
        """(seed, index) of each image: image i of a request with seed s is sample (s, i)."""
        return [(self.seed, i) for i in range(len(self.prompts))]


@dataclass
class Slot:
    job: Job
    image: int
    codes: list[torch.Tensor]


LATENCY_BUCKETS = (0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)  # seconds


@dataclass
class LatencyHistogram:
    """Request latencies as Prometheus histogram counters: fixed memory however long it serves."""

    bounds: tuple[float, ...] = LATENCY_BUCKETS
    counts: list[int] = field(init=False)  # cumulative, one per bound
    total: int = 0
    sum_s: float = 0.0

    def __post_init__(self) -> None:
        self.counts = [0] * len(self.bounds)

    def observe(self, seconds: float) -> None:
        for i, bound in enumerate(self.bounds):
            if seconds <= bound:
                self.counts[i] += 1
        self.total += 1
        self.sum_s += seconds


@dataclass
class Stats:
    """What /metrics reports."""

    tokens: int = 0
    images: int = 0
    steps: int = 0
    failed: int = 0
    cancelled: int = 0
    latency: LatencyHistogram = field(default_factory=LatencyHistogram)


class Scheduler:
    """Owns the Pipeline's prior on a background thread (start / submit / cancel / stop)."""

    def __init__(
        self,
        pipeline: Pipeline,
        *,
        max_rows: int = 16,
        max_queue: int = 256,
        compile: bool | str = False,
    ) -> None:
        if max_rows < 1 or max_queue < 1:
            raise ValueError(f"max_rows and max_queue must be >= 1, got {max_rows}, {max_queue}")
        self.pipeline, self.max_rows, self.max_queue = pipeline, max_rows, max_queue
        self.device = pipeline.device
        prior = pipeline.prior
        self.continuous = pipeline.default_method == "ar" and prior.config.model_type == "gpt"
        self.num_tokens = prior.config.seq_len
        if self.continuous:
            self.engine = DecodeEngine(prior, rows=max_rows, num_tokens=self.num_tokens,
                                       guided=True, filtered=True, compile=compile)  # fmt: skip
            self.engine.warm_up((1,))
        self.slots: list[Slot | None] = [None] * max_rows
        self.queue: deque[tuple[Job, int]] = deque()  # (job, image index) rows
        self.whole: deque[Job] = deque()  # jobs run as one Pipeline call
        self.stats = Stats()
        self._cv = threading.Condition()
        self._admitting = True
        self._stop = False
        self._thread = threading.Thread(target=self._loop, name="tessera-scheduler", daemon=True)

    # ---- the HTTP side ---------------------------------------------------------------------

    def start(self) -> Scheduler:
        self._thread.start()
        return self

    @property
    def admitting(self) -> bool:
        """False once stop() began: new requests are refused (what /health reports)."""
        return self._admitting

    @property
    def queued_rows(self) -> int:
        return len(self.queue) + sum(len(j.prompts) for j in self.whole)

    @property
    def rows_in_flight(self) -> int:
        return sum(slot is not None for slot in self.slots)

    def submit(self, job: Job) -> None:
        """Queue the job's rows, or raise QueueFull / ShuttingDown at once."""
        with self._cv:
            if not self._admitting:
                raise ShuttingDown("the server is shutting down and admits no new requests")
            if self.queued_rows + len(job.prompts) > self.max_queue:
                raise QueueFull(
                    f"queue full: {self.queued_rows} images waiting (max {self.max_queue}); "
                    f"retry later"
                )
            if self.continuous and job.method == "ar":
                self.queue.extend((job, i) for i in range(len(job.prompts)))
            else:
                self.whole.append(job)
            self._cv.notify()

    def cancel(self, job: Job) -> None:
        """Drop the job's queued rows and free its slots at the next step boundary."""
        with self._cv:
            job.cancelled = True
            self._cv.notify()

    def stop(self, timeout: float = 30.0) -> None:
        """Stop admitting; let started jobs finish (all their rows); fail the others; end the
        thread. "Started" is job.started, not "has a slot now": between two rows of a job its
        slot is briefly free, and a job caught there must not fail half done."""
        with self._cv:
            self._admitting = False
            for job in {job for job, _ in self.queue} | set(self.whole):
                if not job.done and job.started == 0:
                    self._fail(job, ShuttingDown("the server shut down before this request ran"))
            self.queue = deque((j, i) for j, i in self.queue if not j.done)
            self.whole.clear()
            self._stop = True
            self._cv.notify()
        if self._thread.is_alive():
            self._thread.join(timeout)

    # ---- the loop --------------------------------------------------------------------------

    def _loop(self) -> None:
        while True:
            with self._cv:
                while not self._stop and not self.queue and not self.whole and not any(self.slots):
                    self._cv.wait(timeout=0.5)
                if self._stop and not any(self.slots) and not self.queue:
                    return
                self._drop_dead()
                joining = self._take_free_slots()
                whole = self.whole.popleft() if self.whole and not any(self.slots) else None
            try:
                if whole is not None:
                    self._run_whole(whole)
                if joining:
                    self._admit(joining)
                if any(self.slots):
                    self._step()
            except Exception as error:  # a crash fails the rows of this step, not the server
                log.exception("decode step failed")
                for i, slot in enumerate(self.slots):
                    if slot is not None:
                        self._fail(slot.job, error)
                        self.slots[i] = None

    def _drop_dead(self) -> None:
        now = time.monotonic()
        for job in {j for j, _ in self.queue} | {s.job for s in self.slots if s}:
            if not job.done and not job.cancelled and now > job.deadline:
                self._fail(job, DeadlineExceeded("the request ran past its deadline"))
        for i, slot in enumerate(self.slots):
            if slot is not None and (slot.job.cancelled or slot.job.done):
                self.stats.cancelled += slot.job.cancelled
                self.slots[i] = None
        self.queue = deque((j, i) for j, i in self.queue if not (j.cancelled or j.done))

    def _take_free_slots(self) -> list[tuple[int, Job, int]]:
        """Fill free slots fairly: the next row comes from the queued job that has started the
        fewest rows (then the oldest), so a short request is not stuck behind a long one."""
        free = [i for i, slot in enumerate(self.slots) if slot is None]
        joining = []
        while free and self.queue:
            pick = min(range(len(self.queue)), key=lambda k: (
                self.queue[k][0].started, self.queue[k][0].submitted, k))  # fmt: skip
            job, image = self.queue[pick]
            del self.queue[pick]
            job.started += 1
            slot = free.pop(0)
            self.slots[slot] = Slot(job, image, [])
            joining.append((slot, job, image))
        return joining

    @torch.no_grad()
    def _admit(self, joining: list[tuple[int, Job, int]]) -> None:
        """One prefill for the joining rows; each draws its token 0."""
        prior, pipe = self.pipeline.prior, self.pipeline
        prompts = [job.prompts[image] for _, job, image in joining]
        cond, uncond = pipe.conditions(prior, prompts, None)
        settings = RowSettings.cat([
            RowSettings.build(1, self.num_tokens, job.sampling, job.guidance, self.device)
            for _, job, _ in joining
        ])  # fmt: skip
        seeds = [job.seeds[image] for _, job, image in joining]
        noise = RowNoise.from_seeds([s for s, _ in seeds], [i for _, i in seeds], self.device)
        slots = torch.tensor([slot for slot, _, _ in joining], device=self.device)
        probs = self.engine.admit(slots, cond, uncond, settings, noise)
        first = noise.sample(probs, torch.zeros(len(joining), dtype=torch.long, device=self.device))
        for (slot, _, _), token in zip(joining, first, strict=True):
            self.slots[slot].codes.append(token)

    @torch.no_grad()
    def _step(self) -> None:
        live = [i for i, slot in enumerate(self.slots) if slot is not None]
        tokens = torch.zeros(self.max_rows, dtype=torch.long, device=self.device)
        positions = torch.zeros_like(tokens)
        for i in live:
            tokens[i] = self.slots[i].codes[-1]
            positions[i] = len(self.slots[i].codes) - 1
        nxt = self.engine.step(tokens, positions)
        self.stats.steps += 1
        self.stats.tokens += len(live)
        for i in live:
            slot = self.slots[i]
            slot.codes.append(nxt[i])
            if len(slot.codes) == self.num_tokens:
                self.slots[i] = None
                self._finish_row(slot.job, slot.image, torch.stack(slot.codes))

    def _finish_row(self, job: Job, image: int, codes: torch.Tensor) -> None:
        pil = self.pipeline.output_for(codes[None], [job.prompts[image]]).images[0]
        with self._cv:
            if job.done:
                return
            job.images[image] = png_bytes(pil)
            self.stats.images += 1
            if all(img is not None for img in job.images):
                self._complete(job)

    def _run_whole(self, job: Job) -> None:
        """A non-AR method: the whole request as one Pipeline call."""
        if job.done or job.cancelled:
            return
        try:
            out = self.pipeline(
                job.prompts, guidance_scale=job.guidance.scale, method=job.method,
                temperature=job.sampling.temperature, top_k=job.sampling.top_k,
                top_p=job.sampling.top_p, seed=job.seed,
            )  # fmt: skip
        except Exception as error:
            self._fail(job, error)
            return
        with self._cv:
            job.images = [png_bytes(img) for img in out.images]
            self.stats.images += len(job.images)
            self.stats.tokens += len(job.images) * self.num_tokens
            self._complete(job)

    def _complete(self, job: Job) -> None:
        """Every image is in: stamp the job, count its latency, wake its request."""
        job.finished = time.monotonic()
        self.stats.latency.observe(job.finished - job.submitted)
        job.on_done(job)

    def _fail(self, job: Job, error: BaseException) -> None:
        if job.done:
            return
        job.error, job.finished = error, time.monotonic()
        self.stats.failed += 1
        job.on_done(job)


def png_bytes(image: Image.Image) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return buffer.getvalue()


def describe(pipeline: Pipeline) -> dict[str, Any]:
    """What /v1/models reports about the loaded models."""
    prior, tok = pipeline.prior, pipeline.tokenizer
    cfg = prior.config
    return {
        "kind": cfg.model_type,
        "cond": cfg.cond,
        "classes": pipeline.class_names if cfg.cond == "class" else [],
        "num_classes": cfg.num_classes if cfg.cond == "class" else 0,
        "grid": list(cfg.grid),
        "codebook_size": cfg.vocab_size,
        "resolution": tok.config.resolution,
        "methods": list(methods_for(pipeline)),
        "default_method": pipeline.default_method,
        "draft": pipeline.draft is not None,
    }


def methods_for(pipeline: Pipeline) -> tuple[str, ...]:
    methods = MODEL_METHODS[pipeline.prior.config.model_type]
    if pipeline.draft is None:
        methods = tuple(m for m in methods if m not in ("speculative", "relaxed"))
    if pipeline.tree_draft is None:
        methods = tuple(m for m in methods if m != "tree")
    return methods

"""The decode engine: a cached prior's R row slots, static shapes, one (compiled) decode step.

A one-token step of a small prior is overhead, not arithmetic (Python, op dispatch, kernel
launches), so the step is one function with fixed shapes that `torch.compile` turns into one
graph (CUDA graphs with mode="reduce-overhead" on GPU): cached forward -> CFG with each row's
scale -> plausibility cutoff -> each row's temperature / top-k / top-p -> a draw from the row's
counter-based noise (sampling/noise.py). Nothing in it syncs with the host or branches on values.

Slots: row r's condition lives in cache row r and, under guidance, its unconditional twin in
row R + r. Per-row state (settings, noise keys) lives in tensors the step reads, so rows with
different prompts, scales, sampling settings and seeds share a step, and a row's tokens never
depend on its company. `admit` prefills some slots while the others keep their caches (the
server's continuous batching; eager, its row count varies), or every slot (compiled like a step:
its shapes are fixed per bucket); `EngineBatch` drives B rows on a bucket of R >= B slots (the
Pipeline and the decoding methods).

Compilation costs tens of seconds per (bucket, token count) on a CPU; the FX graph cache
(on by default, kept in TORCHINDUCTOR_CACHE_DIR, default /tmp/torchinductor_$USER) makes a
second process start in a few seconds. `compile="auto"` compiles on CUDA only.
"""

from __future__ import annotations

import logging
import time
import weakref
from collections.abc import Callable

import torch
from torch import Tensor, nn

from prior.conditioning import Condition
from prior.fused_projections import fused_projections
from sampling.guidance import GuidanceSchedule
from sampling.logits import SamplingConfig
from sampling.noise import DRAW, RowNoise, race, uniform
from sampling.row_settings import RowSettings, guided_distribution

log = logging.getLogger(__name__)
COMPILE_CHOICES = ("auto", True, False)
CPU_OPTIONS = {"cpp_wrapper": True}  # inductor options of a compiled CPU step (see `compiled`)


def wants_compile(compile: bool | str, device: torch.device) -> bool:
    """compile="auto": on CUDA (where launch overhead dominates and graphs pay at once), not on
    CPU (where each new shape costs ~10-60 s, more than a short generation saves)."""
    if compile not in COMPILE_CHOICES:
        raise ValueError(f"compile must be one of {COMPILE_CHOICES}, got {compile!r}")
    return device.type == "cuda" if compile == "auto" else bool(compile)


def own_code(fn: Callable, name: str) -> Callable:
    """fn behind a trampoline with a code object of its own. Dynamo keeps compiled graphs per
    code object and tries their guards in turn on every call, so engines whose functions share
    one (`DecodeEngine._step` for every bucket, model and draft; `tree_round` for every tree
    shape) would each pay for the guards of the others' graphs."""

    def call(*args: Tensor) -> Tensor:
        return fn(*args)

    label = "engine_" + "".join(c if c.isalnum() else "_" for c in name)
    names = {"co_name": label}
    if hasattr(call.__code__, "co_qualname"):  # Python >= 3.11
        names["co_qualname"] = label
    call.__code__ = call.__code__.replace(**names)
    return call


def compiled(fn: Callable, mode: str, *, device: torch.device | None = None) -> Callable:
    """torch.compile(fn) with static shapes. mode "reduce-overhead" adds CUDA graphs;
    "trace" only traces with dynamo (no code generation: seconds, for smoke tests);
    "python-wrapper" is "default" without the C++ wrapper below (to time what it saves).

    On CPU mode "default" also writes inductor's wrapper (the code that calls the graph's
    kernels and matrix products one by one) in C++ instead of Python (`cpp_wrapper`): calling a
    one-token step's few dozen small kernels from Python was a large part of the step, and
    compiled AR runs 1.1-1.2x faster without it (`cpp_wrapper` in bench/sampling.py's JSON); it
    adds a C++ compile (seconds) to each graph's first build, which the FX graph cache keeps."""
    # callers give each engine's function a code object of its own (own_code); room to spare
    limit = torch._dynamo.config.cache_size_limit
    torch._dynamo.config.cache_size_limit = max(limit, 64)
    torch._dynamo.config.accumulated_cache_size_limit = max(
        torch._dynamo.config.accumulated_cache_size_limit, 512
    )
    if mode == "trace":
        return torch.compile(fn, backend="eager", dynamic=False)
    if mode == "python-wrapper":  # inductor's default wrapper (bench/sampling.py's baseline)
        return torch.compile(fn, dynamic=False)
    if mode == "default" and device is not None and device.type == "cpu":
        return torch.compile(fn, dynamic=False, options=CPU_OPTIONS)
    return torch.compile(fn, mode=mode, dynamic=False)


def bucket_rows(rows: int, compiled: bool) -> int:
    """Slots for `rows` rows: the next power of two when compiled (one graph per bucket), else
    exactly `rows` (eager runs any shape for free)."""
    if rows < 1:
        raise ValueError(f"rows must be >= 1, got {rows}")
    return 1 << (rows - 1).bit_length() if compiled else rows


class DecodeEngine:
    """R row slots of one cached prior (GPT-style: setup_caches / prefill / decode)."""

    def __init__(
        self,
        model: nn.Module,
        *,
        rows: int,
        num_tokens: int,
        guided: bool,
        filtered: bool = True,
        compile: bool | str = "auto",
        compile_mode: str = "default",
        scratch: int = 0,
    ) -> None:
        self.model = model
        self.rows, self.num_tokens = rows, num_tokens
        self.guided, self.filtered = guided, filtered
        self.device = next(model.parameters()).device
        self.compiled = wants_compile(compile, self.device)
        self.compile_mode = compile_mode
        self.calls = 0  # model forwards (prefills included)
        cache_rows = rows * (2 if guided else 1)
        if scratch:  # slots for a candidate tree's nodes (sampling/tree.py)
            model.setup_caches(cache_rows, num_tokens, scratch=scratch)
        else:
            model.setup_caches(cache_rows, num_tokens)
        self._caches = model.cache_state()
        self.fused = fused_projections(model)  # q/k/v and gate/up as one matmul each
        self.settings = RowSettings.build(
            rows, num_tokens, SamplingConfig(), GuidanceSchedule(), self.device
        )
        self.keys = torch.zeros(rows, dtype=torch.long, device=self.device)
        self._compiled: dict[str, Callable] = {}
        self._warm: set[tuple] = set()

    # ---- state -----------------------------------------------------------------------------

    def _attach(self) -> None:
        """Give the model this engine's caches (another engine may have used the model), and
        bring the fused projections up to date with the weights (a no-op when unchanged)."""
        self.fused.refresh()
        if getattr(self.model, "_engine_owner", None) is not self:
            self.model.restore_cache_state(self._caches)
            self.model._engine_owner = self

    def admit(
        self,
        slots: Tensor | None,
        cond: Condition,
        uncond: Condition | None,
        settings: RowSettings,
        noise: RowNoise,
    ) -> Tensor:
        """Prefill slots Long[b] (None = all R) with their rows' conditions, settings and noise;
        returns the distributions of their token 0, [b, V]. Other slots keep their caches."""
        self._attach()
        rows = torch.arange(self.rows, device=self.device) if slots is None else slots
        self.settings.write(rows, settings)
        self.keys[rows] = noise.keys
        cache_rows = slots
        if self.guided:
            if uncond is None:
                raise ValueError("a guided engine needs the unconditional condition (uncond)")
            cond = type(cond).cat([cond, uncond])
            if slots is not None:
                cache_rows = torch.cat([slots, slots + self.rows])
        if cache_rows is None:  # every slot: fixed shapes, so compiled like a step
            return self.run("prefill", self._prefill, cond.prefix, cond.mask)
        self.calls += 1
        with torch.no_grad(), self.fused.active():
            logits = self.model.prefill(cond, cache_rows)  # [b or 2b, V]
        return self._first_distribution(logits, settings)

    def _first_distribution(self, logits: Tensor, settings: RowSettings) -> Tensor:
        """Prefill logits [b or 2b, V] -> the distributions of token 0, [b, V]."""
        where = torch.zeros(settings.rows, 1, dtype=torch.long, device=self.device)
        return guided_distribution(logits[:, None], where, settings, guided=self.guided,
                                   filtered=self.filtered)[:, 0]  # fmt: skip

    def _prefill(self, prefix: Tensor, mask: Tensor) -> Tensor:
        """All slots' conditions (prefix [R or 2R, P, dim], mask) -> token 0's distributions."""
        logits = self.model.prefill(Condition(prefix, mask))  # [R or 2R, V]
        return self._first_distribution(logits, self.settings)

    # ---- the step --------------------------------------------------------------------------

    def _logits(self, tokens: Tensor, positions: Tensor) -> Tensor:
        """Raw logits for tokens Long[R, T] at positions Long[R] (both CFG halves)."""
        if self.guided:
            tokens, positions = torch.cat([tokens, tokens]), torch.cat([positions, positions])
        return self.model.decode(tokens, positions)  # [R or 2R, T, V]

    def _distributions(self, tokens: Tensor, positions: Tensor) -> Tensor:
        steps = torch.arange(tokens.shape[1], device=tokens.device)
        where = positions[:, None] + 1 + steps  # [R, T] positions being predicted
        logits = self._logits(tokens, positions)
        return guided_distribution(logits, where, self.settings, guided=self.guided,
                                   filtered=self.filtered)  # fmt: skip

    def _step(self, tokens: Tensor, positions: Tensor) -> Tensor:
        probs = self._distributions(tokens[:, None], positions)[:, 0]  # [R, V]
        u = uniform(self.keys, positions + 1, DRAW, probs.shape[-1])
        return race(probs, u)

    def run(self, name: str, fn: Callable, *args: Tensor) -> Tensor:
        """fn(*args) on this engine's caches, compiled (once per `name` and argument shapes)
        when the engine compiles: a decoding method's whole round as one graph. The first fn
        given a name is the one compiled, so a name must stand for one computation.

        Always without autograd, whatever the caller's grad mode: a call under grad mode would
        record a graph nobody reads and compile a second graph for the same step."""
        self._attach()
        self.calls += 1
        with torch.no_grad(), self.fused.active():
            return self._call(name, fn, *args)

    def _call(self, name: str, fn: Callable, *args: Tensor) -> Tensor:
        """`run`'s body: fn(*args) eager, or its compiled graph (compiling it on first use)."""
        if not self.compiled:
            return fn(*args)
        if name not in self._compiled:
            self._compiled[name] = compiled(
                own_code(fn, name), self.compile_mode, device=self.device
            )
        key = (name,) + tuple(a.shape for a in args)
        if key in self._warm:
            return self._compiled[name](*args)
        start = time.perf_counter()
        log.info("compiling the %s step for %d rows (first call; cached for later runs)",
                 name, self.rows)  # fmt: skip
        out = self._compiled[name](*args)
        self._warm.add(key)
        log.info("compiled the %s step %s in %.1f s", name, key[1:], time.perf_counter() - start)
        return out

    def distributions(self, tokens: Tensor, positions: Tensor) -> Tensor:
        """Feed tokens Long[R, T] at positions Long[R] (+t); distributions [R, T, V] of the
        tokens at positions + 1 + t. Rolling back = feeding at an earlier position."""
        return self.run("distributions", self._distributions, tokens, positions)

    def step(self, tokens: Tensor, positions: Tensor) -> Tensor:
        """One AR step for every slot: tokens Long[R] at positions Long[R] -> the token each row
        draws for position + 1, Long[R]."""
        return self.run("step", self._step, tokens, positions)

    def warm_up(self, lengths: tuple[int, ...] = ()) -> None:
        """Compile the AR step (and `distributions` for these token counts) now, not mid-run."""
        if not self.compiled:
            return
        zeros = torch.zeros(self.rows, dtype=torch.long, device=self.device)
        self.step(zeros, zeros)
        for length in lengths:
            self.distributions(torch.zeros(self.rows, length, dtype=torch.long,
                                           device=self.device), zeros)  # fmt: skip


_ENGINES: weakref.WeakKeyDictionary[nn.Module, dict[tuple, DecodeEngine]] = (
    weakref.WeakKeyDictionary()
)


def engine_for(
    model: nn.Module,
    *,
    rows: int,
    num_tokens: int,
    guided: bool,
    filtered: bool,
    compile: bool | str = "auto",
    compile_mode: str = "default",
    scratch: int = 0,
) -> DecodeEngine:
    """The engine of `model` for this shape, kept per model so compiled steps are reused."""
    key = (rows, num_tokens, guided, filtered, compile, compile_mode, scratch)
    engines = _ENGINES.setdefault(model, {})
    if key not in engines:
        engines[key] = DecodeEngine(model, rows=rows, num_tokens=num_tokens, guided=guided,
                                    filtered=filtered, compile=compile,
                                    compile_mode=compile_mode, scratch=scratch)  # fmt: skip
    return engines[key]


class EngineBatch:
    """B rows decoded together on an engine's first B slots (padding slots repeat row 0 and are
    discarded). What AR, speculative, relaxed and Jacobi decoding drive: every method gets
    guided, processed distributions of B rows and draws from the rows' noise.

    `calls` counts model forwards of this batch (prefill included).
    """

    def __init__(
        self,
        model: nn.Module,
        cond: Condition,
        uncond: Condition | None,
        settings: RowSettings,
        noise: RowNoise,
        *,
        num_tokens: int,
        compile: bool | str = False,
        compile_mode: str = "default",
        scratch: int = 0,
    ) -> None:
        self.batch = int(cond.prefix.shape[0])
        if settings.rows != self.batch or noise.rows != self.batch:
            raise ValueError(
                f"{self.batch} conditions but settings for {settings.rows} rows and noise for "
                f"{noise.rows}"
            )
        guided = settings.guided
        if guided and uncond is None:
            raise ValueError(
                "guidance scale != 1 needs an unconditional condition (uncond is None)"
            )
        if guided and int(uncond.prefix.shape[0]) != self.batch:
            raise ValueError(
                f"cond and uncond batch sizes differ: {self.batch} vs {int(uncond.prefix.shape[0])}"
            )
        self.device = cond.prefix.device
        compiled = wants_compile(compile, self.device)
        rows = bucket_rows(self.batch, compiled)
        self.engine = engine_for(model, rows=rows, num_tokens=num_tokens, guided=guided,
                                 filtered=settings.filtered, compile=compile,
                                 compile_mode=compile_mode, scratch=scratch)  # fmt: skip
        self.guided, self.noise, self.num_tokens = guided, noise, num_tokens
        self.pad = rows - self.batch
        self._first = (cond, uncond if guided else None, settings, noise)
        self.calls = 0

    def padded(self, x: Tensor) -> Tensor:
        """Rows [B, ...] -> the engine's [R, ...] (padding repeats row 0)."""
        if not self.pad:
            return x
        return torch.cat([x, x[:1].expand((self.pad,) + x.shape[1:])])

    def prefill(self) -> Tensor:
        """Reset the slots with the conditions -> distributions of token 0, [B, V]."""
        cond, uncond, settings, noise = self._first
        if self.pad:
            index = torch.cat([torch.arange(self.batch), torch.zeros(self.pad, dtype=torch.long)])
            index = index.to(self.device)
            cond = cond.select(index)
            uncond = None if uncond is None else uncond.select(index)
            settings, noise = settings.select(index), noise.select(index)
        self.calls += 1
        return self.engine.admit(None, cond, uncond, settings, noise)[: self.batch]

    def decode(self, tokens: Tensor, positions: Tensor) -> Tensor:
        """tokens Long[B, T] at positions Long[B] -> distributions [B, T, V] for positions + 1.."""
        self.calls += 1
        return self.engine.distributions(self.padded(tokens), self.padded(positions))[: self.batch]

    def step(self, tokens: Tensor, positions: Tensor) -> Tensor:
        """tokens Long[B] at positions Long[B] -> each row's token for position + 1, Long[B]."""
        self.calls += 1
        return self.engine.step(self.padded(tokens), self.padded(positions))[: self.batch]

    def run(self, name: str, fn: Callable, *args: Tensor) -> tuple[Tensor, ...]:
        """`DecodeEngine.run` of a round over all R slots (args already padded to R rows);
        counts one model forward."""
        self.calls += 1
        return self.engine.run(name, fn, *args)

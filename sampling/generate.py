"""One dispatcher from (prior, method, settings) to codes: what the Pipeline, the training sample
grids and the benchmarks call, so GPT / RQ-Transformer / MaskGIT and the five methods are told
apart in one place.

`DecodeOptions` holds the method and its own options. An option left at None takes the
method's default; an option set for a method that ignores it is a ValueError (as in diffusers),
so `draft_len=8` with `method="ar"` cannot silently do nothing.
"""

from __future__ import annotations

from dataclasses import dataclass, fields

import torch
from torch import Tensor, nn

from prior.conditioning import Condition
from sampling.autoregressive import generate_ar, generate_rq
from sampling.guidance import GuidanceSchedule
from sampling.jacobi import COUPLINGS, generate_jacobi
from sampling.logits import SamplingConfig
from sampling.maskgit import generate_maskgit
from sampling.noise import RowNoise
from sampling.relaxed import RelaxedAcceptance
from sampling.speculative import generate_speculative
from sampling.stats import SpeculativeStats
from sampling.tree import generate_tree

METHODS = ("ar", "speculative", "relaxed", "jacobi", "tree", "maskgit")
# option -> (methods that read it, default)
METHOD_OPTIONS: dict[str, tuple[tuple[str, ...], object]] = {
    "num_steps": (("maskgit",), 8),
    "draft_len": (("speculative", "relaxed"), 4),
    "adaptive_draft": (("speculative", "relaxed"), False),
    "relaxed_k": (("relaxed",), 8),
    "relaxed_delta": (("relaxed",), 0.1),
    "jacobi_window": (("jacobi",), 8),
    "jacobi_coupling": (("jacobi",), "gumbel"),
    "tree_size": (("tree",), 4),
}
MODEL_METHODS = {"gpt": ("ar", "speculative", "relaxed", "jacobi", "tree"),
                 "rq_transformer": ("ar",), "maskgit": ("maskgit",)}  # fmt: skip


@dataclass
class DecodeOptions:
    """The decoding method and the options only some methods read (None = the default)."""

    method: str = "ar"
    num_steps: int | None = None  # maskgit: decoding steps
    draft_len: int | None = None  # speculative, relaxed: drafted tokens per round
    adaptive_draft: bool | str | None = None  # speculative, relaxed: True grows/shrinks the
    # draft length from acceptance; "cost" picks it from measured call costs
    relaxed_k: int | None = None  # relaxed: latent-space neighbours per code
    relaxed_delta: float | None = None  # relaxed: probability budget borrowed from neighbours
    jacobi_window: int | None = None  # jacobi: tokens refined per iteration
    jacobi_coupling: str | None = None  # jacobi: "gumbel" (MC-SJD) or "independent" (SJD)
    tree_size: int | None = None  # tree: candidate nodes scored per target pass

    def __post_init__(self) -> None:
        if self.method not in METHODS:
            raise ValueError(f"method must be one of {METHODS}, got '{self.method}'")
        for name, (methods, _) in METHOD_OPTIONS.items():
            if getattr(self, name) is not None and self.method not in methods:
                raise ValueError(
                    f"{name} applies to method {' / '.join(methods)} only, not '{self.method}'"
                )
        for name in ("num_steps", "draft_len", "jacobi_window", "tree_size"):
            value = getattr(self, name)
            if value is not None and value < 1:
                raise ValueError(f"{name} must be >= 1, got {value}")
        if self.adaptive_draft not in (None, False, True, "cost"):
            raise ValueError(
                f"adaptive_draft must be true, false or 'cost', got {self.adaptive_draft!r}"
            )
        if self.relaxed_k is not None and self.relaxed_k < 0:
            raise ValueError(f"relaxed_k must be >= 0, got {self.relaxed_k}")
        if self.jacobi_coupling is not None and self.jacobi_coupling not in COUPLINGS:
            raise ValueError(
                f"jacobi_coupling must be one of {COUPLINGS}, got {self.jacobi_coupling!r}"
            )
        if self.relaxed_delta is not None and not 0.0 <= self.relaxed_delta <= 1.0:
            raise ValueError(f"relaxed_delta must be in [0, 1], got {self.relaxed_delta}")

    def get(self, name: str):
        """The option's value, or its default when unset."""
        value = getattr(self, name)
        return METHOD_OPTIONS[name][1] if value is None else value

    @classmethod
    def for_method(cls, method: str, **options) -> DecodeOptions:
        """Only the options `method` reads are kept (for callers holding a full set, e.g. a CLI)."""
        known = {f.name for f in fields(cls)}
        kept = {k: v for k, v in options.items() if k in known and method in METHOD_OPTIONS[k][0]}
        return cls(method, **kept)


@dataclass
class Generated:
    """codes Long [B, N] or [B, N, D]; speculative statistics; MaskGIT's reveal counts."""

    codes: Tensor
    stats: SpeculativeStats | None = None
    reveal_counts: list[int] | None = None


def check_method(
    model: nn.Module,
    method: str,
    draft: nn.Module | None = None,
    tree_draft: nn.Module | None = None,
) -> None:
    """ValueError when `method` does not fit the prior (or needs a missing draft)."""
    kind = model.config.model_type
    if method not in MODEL_METHODS[kind]:
        raise ValueError(
            f"method '{method}' does not fit a {type(model).__name__} prior "
            f"(it samples with {' / '.join(MODEL_METHODS[kind])})"
        )
    if method in ("speculative", "relaxed") and draft is None:
        raise ValueError(f"method '{method}' needs a draft prior (draft_dir)")
    if method == "tree" and tree_draft is None:
        raise ValueError(
            "method 'tree' needs a tree draft (tree_draft_dir; make one with "
            "scripts/distill_tree_draft.py)"
        )


@torch.no_grad()
def generate_codes(
    model: nn.Module,
    cond: Condition,
    uncond: Condition,
    *,
    decode: DecodeOptions,
    sampling: SamplingConfig,
    guidance: GuidanceSchedule,
    generator: torch.Generator | None = None,
    draft: nn.Module | None = None,
    draft_conds: tuple[Condition, Condition] | None = None,
    relaxed: RelaxedAcceptance | None = None,
    noise: RowNoise | None = None,
    compile: bool | str = False,
    tree_draft: nn.Module | None = None,
    class_ids: Tensor | None = None,
) -> Generated:
    """Codes for every row of `cond` with `decode.method` on `model` (draft-accelerated methods
    need `draft` and its (cond, uncond); relaxed acceptance needs `relaxed`; "tree" needs
    `tree_draft` and, for a class-conditional prior, the rows' class_ids).

    noise: the rows' seeds (default: drawn from `generator`); a row's codes depend only on its
    condition, settings and noise, not on the other rows. compile: see sampling/engine.py."""
    check_method(model, decode.method, draft, tree_draft)
    n, method = model.config.seq_len, decode.method
    if noise is None:
        noise = RowNoise.from_generator(cond.batch_size, generator, cond.prefix.device)
    if model.config.model_type == "rq_transformer":
        depth = model.config.depth
        codes = generate_rq(model, cond, uncond, n, depth, sampling, guidance, noise=noise)
        return Generated(codes)
    if method == "ar":
        codes = generate_ar(model, cond, uncond, n, sampling, guidance, compile=compile,
                            noise=noise)  # fmt: skip
        return Generated(codes)
    if method == "maskgit":
        codes, counts = generate_maskgit(
            model, cond, uncond, n, decode.get("num_steps"), sampling,
            guidance=guidance, noise=noise, compile=compile,
        )  # fmt: skip
        return Generated(codes, reveal_counts=counts)
    if method == "jacobi":
        codes, stats = generate_jacobi(
            model, cond, uncond, n, decode.get("jacobi_window"), sampling, guidance,
            coupling=decode.get("jacobi_coupling"), noise=noise, compile=compile,
        )  # fmt: skip
        return Generated(codes, stats)
    if method == "tree":
        codes, stats = generate_tree(
            model, cond, uncond, n, tree_draft, class_ids, decode.get("tree_size"), sampling,
            guidance, noise=noise, compile=compile,
        )  # fmt: skip
        return Generated(codes, stats)
    if draft_conds is None:
        raise ValueError(f"method '{method}' needs the draft's conditions (draft_conds)")
    if method == "relaxed" and relaxed is None:
        raise ValueError("method 'relaxed' needs a RelaxedAcceptance (relaxed=)")
    d_cond, d_uncond = draft_conds
    codes, stats = generate_speculative(
        model, draft, cond, d_cond, n, uncond, d_uncond,
        decode.get("draft_len"), decode.get("adaptive_draft"),
        sampling=sampling, guidance=guidance, relaxed=relaxed if method == "relaxed" else None,
        noise=noise, compile=compile,
    )  # fmt: skip
    return Generated(codes, stats)

"""Stage-1 quantizers: the config, the output type, the shared API and the factory.

`build_quantizer(cfg, latent_dim)` returns a VQ, RQ or FSQ module. All three share one API
(`Quantizer`): `forward(z [B,C,h,w]) -> QuantizerOutput`, `embed(codes) -> [B,C,h,w]`,
`codebook() -> [K, codebook_dim]`, and the attributes `codebook_size` and `depth`.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch
from torch import Tensor, nn

from tokenizer.manifest import MAX_CODES

KINDS = ("vq", "rq", "fsq")
MAX_DEPTH = 64
ESTIMATORS = ("ste", "rotation")


@dataclass
class QuantizerConfig:
    """How latents become codes. Fields marked (vq/rq) or (fsq) apply to those kinds only."""

    kind: str = "vq"  # "vq" | "rq" | "fsq"
    codebook_size: int = 1024  # K (vq/rq); fsq derives K = prod(levels)
    codebook_dim: int | None = None  # lookup dims; None = latent_dim, else project (LlamaGen)
    l2_normalize: bool = False  # cosine codes: inputs and codewords on the unit sphere (vq)
    beta: float = 0.25  # weight of the commitment term ||e - sg(q)||^2 (vq/rq)
    estimator: str = "ste"  # "ste" | "rotation" (Fifty et al. 2025) (vq/rq)
    ema: bool = False  # EMA codebook instead of the codebook loss (vq/rq)
    ema_decay: float = 0.99  # decay of the EMA codebook and of the usage counts (vq/rq)
    ema_eps: float = 1e-5  # Laplace smoothing of the EMA counts (vq/rq)
    kmeans_init: bool = False  # k-means on the first training batch (vq/rq)
    kmeans_iters: int = 10
    dead_code_threshold: float = (
        0.0  # restart codes whose EMA count (vectors/step) is below; 0 = off
    )
    usage_window: int = 100  # `usage` metric: fraction of codes used in the last N training steps
    depth: int = 1  # residual depth D (rq); must be 1 for vq
    shared_codebook: bool = True  # one codebook for all depths (rq)
    levels: list[int] = field(default_factory=lambda: [8, 5, 5, 5])  # per-dim levels (fsq)
    chunk_size: int = 1024  # rows per distance block (K columns each); 0 = one block

    def __post_init__(self) -> None:
        if self.kind not in KINDS:
            raise ValueError(f"kind must be one of {KINDS}, got {self.kind!r}")
        if self.estimator not in ESTIMATORS:
            raise ValueError(f"estimator must be one of {ESTIMATORS}, got {self.estimator!r}")
        if self.codebook_dim is not None and self.codebook_dim < 1:
            raise ValueError(f"codebook_dim must be >= 1 or None, got {self.codebook_dim}")
        if self.beta < 0:
            raise ValueError(f"beta must be >= 0, got {self.beta}")
        if not 0.0 < self.ema_decay < 1.0:
            raise ValueError(f"ema_decay must be in (0, 1), got {self.ema_decay}")
        if self.ema_eps <= 0:
            raise ValueError(f"ema_eps must be > 0, got {self.ema_eps}")
        if self.kmeans_iters < 1:
            raise ValueError(f"kmeans_iters must be >= 1, got {self.kmeans_iters}")
        if self.dead_code_threshold < 0:
            raise ValueError(f"dead_code_threshold must be >= 0, got {self.dead_code_threshold}")
        if self.usage_window < 1:
            raise ValueError(f"usage_window must be >= 1, got {self.usage_window}")
        if self.chunk_size < 0:
            raise ValueError(f"chunk_size must be >= 0 (0 = unchunked), got {self.chunk_size}")
        if not 1 <= self.depth <= MAX_DEPTH:
            raise ValueError(f"depth must be in [1, {MAX_DEPTH}], got {self.depth}")
        if self.codebook_dim is not None and self.codebook_dim > 2**14:
            raise ValueError(f"codebook_dim must be <= {2**14}, got {self.codebook_dim}")
        if self.num_codes > MAX_CODES:
            raise ValueError(
                f"the codebook has {self.num_codes} codes, more than {MAX_CODES} "
                f"(token exports store codes as uint16)"
            )
        if self.kind == "fsq":
            self._check_fsq()
        else:
            if self.codebook_size < 2:
                raise ValueError(f"codebook_size must be >= 2, got {self.codebook_size}")
            if self.kind == "vq" and self.depth != 1:
                raise ValueError(f"depth applies to kind='rq' only; got depth={self.depth} for vq")
            if self.kind == "rq" and self.l2_normalize:
                raise ValueError(
                    "l2_normalize is not supported for kind='rq' (residuals are not unit vectors)"
                )
            if self.kind == "rq" and self.depth < 2:
                raise ValueError(
                    f"kind='rq' needs depth >= 2 (got {self.depth}); one level of residual "
                    f"quantization is plain VQ: use kind='vq'"
                )

    def _check_fsq(self) -> None:
        if len(self.levels) < 1 or any(int(level) < 2 for level in self.levels):
            raise ValueError(f"levels must be a non-empty list of ints >= 2, got {self.levels}")
        if self.codebook_dim is not None and self.codebook_dim != len(self.levels):
            raise ValueError(
                f"codebook_dim must equal len(levels)={len(self.levels)} for fsq, got {self.codebook_dim}"
            )
        if self.depth != 1:
            raise ValueError(f"depth applies to kind='rq' only; got depth={self.depth} for fsq")
        for name in ("ema", "kmeans_init", "l2_normalize"):
            if getattr(self, name):
                raise ValueError(
                    f"{name} does not apply to kind='fsq' (it has no learned codebook)"
                )
        if self.dead_code_threshold > 0:
            raise ValueError(
                "dead_code_threshold does not apply to kind='fsq' (no learned codebook)"
            )
        if self.estimator != "ste":
            raise ValueError(f"estimator must be 'ste' for kind='fsq', got {self.estimator!r}")

    @property
    def num_codes(self) -> int:
        """K: codebook_size for vq/rq, prod(levels) for fsq."""
        return math.prod(self.levels) if self.kind == "fsq" else self.codebook_size


@dataclass
class QuantizerOutput:
    """quantized [B,C,h,w] fp32; codes Long [B,h,w] or [B,h,w,D]; scalar loss; detached metrics."""

    quantized: Tensor
    codes: Tensor
    loss: Tensor
    metrics: dict[str, Tensor]


class Quantizer(nn.Module):
    """Base of VQ, RQ and FSQ: the API the tokenizer and the priors rely on."""

    codebook_size: int
    depth: int
    latent_dim: int
    codebook_dim: int
    codes_have_depth: bool = False  # RQ codes carry a trailing depth axis [B,h,w,D]

    def forward(self, z: Tensor) -> QuantizerOutput:  # z [B,C,h,w]
        raise NotImplementedError

    def embed(self, codes: Tensor) -> Tensor:  # codes -> [B,C,h,w], equal to forward's quantized
        raise NotImplementedError

    def codebook(self) -> Tensor:  # [K, codebook_dim] in the lookup space
        raise NotImplementedError

    def _check_latents(self, z: Tensor) -> None:
        if z.dim() != 4 or z.shape[1] != self.latent_dim:
            raise ValueError(f"expected latents [B,{self.latent_dim},h,w], got {tuple(z.shape)}")

    def _check_codes(self, codes: Tensor) -> None:
        want = 4 if self.codes_have_depth else 3
        if codes.dtype.is_floating_point or codes.dtype.is_complex or codes.dtype == torch.bool:
            raise ValueError(f"codes must be an integer tensor, got {codes.dtype}")
        if codes.dim() != want or (want == 4 and codes.shape[-1] != self.depth):
            shape = "[B,h,w]" if want == 3 else f"[B,h,w,{self.depth}]"
            raise ValueError(f"expected codes {shape}, got {tuple(codes.shape)}")


def build_quantizer(cfg: QuantizerConfig, latent_dim: int) -> Quantizer:
    """The quantizer `cfg.kind` names, reading latents with `latent_dim` channels."""
    if latent_dim < 1:
        raise ValueError(f"latent_dim must be >= 1, got {latent_dim}")
    # Imported here: the submodules import the config and base class from this package.
    if cfg.kind == "vq":
        from tokenizer.quantizers.vq import VectorQuantizer

        return VectorQuantizer(cfg, latent_dim)
    if cfg.kind == "rq":
        from tokenizer.quantizers.residual import ResidualQuantizer

        return ResidualQuantizer(cfg, latent_dim)
    from tokenizer.quantizers.fsq import FSQuantizer

    return FSQuantizer(cfg, latent_dim)


__all__ = ["QuantizerConfig", "QuantizerOutput", "Quantizer", "build_quantizer"]

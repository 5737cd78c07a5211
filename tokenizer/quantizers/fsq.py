"""Finite scalar quantization (Mentzer et al., 2023): a fixed grid instead of a learned codebook.

Each of the d = len(levels) lookup dims is bounded to L_i values and rounded with straight-through;
the code is the mixed-radix number of the per-dim digits, so K = prod(levels) and every index is
reachable: no codebook loss, no dead codes. Bounding follows the reference code:
tanh(z + shift) * (L-1)(1+eps)/2 - offset, offset = 0.5 for even L (shift keeps 0 -> 0), which
rounds to exactly L integers {-L//2, ..., L - 1 - L//2}; values are then divided by L//2.
"""

from __future__ import annotations

import math

import torch
from einops import rearrange
from torch import Tensor

from tokenizer.quantizers import Quantizer, QuantizerConfig, QuantizerOutput
from tokenizer.quantizers.distributed import all_reduce_sum_
from tokenizer.quantizers.rotation import straight_through
from tokenizer.quantizers.vq import CodeUsage, code_stats, make_projection

_EPS = 1e-3


class FSQuantizer(Quantizer):
    """FSQ with `levels` (e.g. [8,5,5,5] for K = 1000). Codes Long [B,h,w]."""

    def __init__(self, cfg: QuantizerConfig, latent_dim: int) -> None:
        super().__init__()
        if cfg.kind != "fsq":
            raise ValueError(f"FSQuantizer needs kind='fsq', got {cfg.kind!r}")
        self.cfg = cfg
        levels = [int(level) for level in cfg.levels]
        self.latent_dim, self.codebook_dim = latent_dim, len(levels)
        self.codebook_size, self.depth = math.prod(levels), 1
        self.proj_in = make_projection(latent_dim, self.codebook_dim)
        self.proj_out = make_projection(self.codebook_dim, latent_dim)
        basis = [math.prod(levels[:i]) for i in range(len(levels))]  # mixed radix, dim 0 fastest
        self.register_buffer("levels", torch.tensor(levels), persistent=False)
        self.register_buffer("basis", torch.tensor(basis), persistent=False)
        self.usage = CodeUsage(self.codebook_size, cfg.usage_window)

    def bound(self, e: Tensor) -> Tensor:
        """e [..., d] -> values in (-L//2 - 0.5, L - 1 - L//2 + 0.5) per dim, 0 -> 0."""
        half_l = (self.levels - 1) * (1 + _EPS) / 2
        offset = torch.where(self.levels % 2 == 0, 0.5, 0.0)
        shift = torch.atanh(offset / half_l)
        return torch.tanh(e + shift) * half_l - offset

    def forward(self, z: Tensor) -> QuantizerOutput:
        self._check_latents(z)
        b, _, h, w = z.shape
        with torch.autocast(device_type=z.device.type, enabled=False):
            e = self.proj_in(rearrange(z.float(), "b c h w -> (b h w) c"))  # [M,d]
            bounded = self.bound(e)
            rounded = straight_through(bounded, bounded.round())  # integer values, STE gradient
            half_width = self.levels // 2
            idx = self.index_of(rounded.detach().long() + half_width)  # [M]
            quantized = self.proj_out(rounded / half_width)
            quantized = rearrange(quantized, "(b h w) c -> b c h w", b=b, h=h, w=w)
            metrics = self._observe(idx)
        codes = rearrange(idx, "(b h w) -> b h w", b=b, h=h, w=w)
        return QuantizerOutput(
            quantized=quantized, codes=codes, loss=e.new_zeros(()), metrics=metrics
        )

    @torch.no_grad()
    def _observe(self, idx: Tensor) -> dict[str, Tensor]:
        counts = torch.bincount(idx, minlength=self.codebook_size).float()  # [K]
        if self.training:
            all_reduce_sum_(counts)
            self.usage.update(counts)
        return {"usage": self.usage.fraction(), **code_stats(counts)}

    def index_of(self, digits: Tensor) -> Tensor:
        """Per-dim digits Long [..., d] in [0, L_i) -> mixed-radix index Long [...]."""
        return (digits * self.basis).sum(dim=-1)

    def digits_of(self, idx: Tensor) -> Tensor:
        """Index Long [...] -> per-dim digits Long [..., d]."""
        return torch.div(idx[..., None], self.basis, rounding_mode="floor") % self.levels

    def grid(self, idx: Tensor) -> Tensor:
        """Index Long [...] -> lookup-space values [..., d] in [-1, 1]."""
        half_width = self.levels // 2
        return (self.digits_of(idx) - half_width).float() / half_width

    def embed(self, codes: Tensor) -> Tensor:
        self._check_codes(codes)
        b, h, w = codes.shape
        with torch.autocast(device_type=codes.device.type, enabled=False):
            values = self.grid(rearrange(codes.long(), "b h w -> (b h w)"))  # [M,d]
            return rearrange(self.proj_out(values), "(b h w) c -> b c h w", b=b, h=h, w=w)

    def codebook(self) -> Tensor:
        """The implicit codebook: all K grid points [K, d], row i = code i."""
        return self.grid(torch.arange(self.codebook_size, device=self.basis.device))

"""VQGAN-style convolutional encoder and decoder (taming-transformers layout).

The encoder maps images [B, C, H, W] to latents [B, z, H/f, W/f] with f = 2^(len(ch_mult) - 1);
the decoder maps latents back. The decoder can use MoVQ's spatially conditioned GroupNorm, whose
scale and shift come from the quantized latent, so every decoder layer sees the codes directly.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from einops import rearrange
from torch import nn


def _check_groups(name: str, channels: list[int], groups: int) -> None:
    if groups < 1:
        raise ValueError(f"{name}: norm_groups must be >= 1, got {groups}")
    bad = sorted({c for c in channels if c % groups})
    if bad:
        raise ValueError(f"{name}: norm_groups={groups} must divide every width, not {bad}")


def _check_levels(
    name: str, ch_mult: list[int], num_res_blocks: int, channels: int, groups: int
) -> None:
    """Validation shared by the encoder and decoder configs."""
    if not ch_mult or any(m < 1 for m in ch_mult):
        raise ValueError(f"ch_mult must be a non-empty list of positive ints, got {ch_mult}")
    if num_res_blocks < 1:
        raise ValueError(f"num_res_blocks must be >= 1, got {num_res_blocks}")
    _check_groups(name, [channels * m for m in ch_mult], groups)


@dataclass
class EncoderConfig:
    """Encoder widths: level i has `channels * ch_mult[i]` channels."""

    in_channels: int = 3
    channels: int = 128
    ch_mult: list[int] = field(default_factory=lambda: [1, 1, 2, 2, 4])
    num_res_blocks: int = 2
    out_channels: int = 256
    mid_attention: bool = True
    norm_groups: int = 32
    dropout: float = 0.0

    def __post_init__(self) -> None:
        _check_levels(
            "EncoderConfig", self.ch_mult, self.num_res_blocks, self.channels, self.norm_groups
        )

    @property
    def factor(self) -> int:
        return 2 ** (len(self.ch_mult) - 1)


@dataclass
class DecoderConfig:
    """Decoder widths mirror the encoder; `movq` turns on spatially conditioned norms."""

    in_channels: int = 256
    channels: int = 128
    ch_mult: list[int] = field(default_factory=lambda: [1, 1, 2, 2, 4])
    num_res_blocks: int = 2
    out_channels: int = 3
    mid_attention: bool = True
    norm_groups: int = 32
    dropout: float = 0.0
    movq: bool = False

    def __post_init__(self) -> None:
        _check_levels(
            "DecoderConfig", self.ch_mult, self.num_res_blocks, self.channels, self.norm_groups
        )

    @property
    def factor(self) -> int:
        return 2 ** (len(self.ch_mult) - 1)


class SpatialNorm(nn.Module):
    """MoVQ norm: GroupNorm(f) * conv_y(zq) + conv_b(zq), zq resized (nearest) to f's grid."""

    def __init__(self, channels: int, zq_channels: int, groups: int) -> None:
        super().__init__()
        self.norm = nn.GroupNorm(groups, channels, eps=1e-6, affine=True)
        self.conv_y = nn.Conv2d(zq_channels, channels, 1)
        self.conv_b = nn.Conv2d(zq_channels, channels, 1)

    def forward(self, x: torch.Tensor, zq: torch.Tensor) -> torch.Tensor:
        zq = F.interpolate(zq, size=x.shape[-2:], mode="nearest")
        return self.norm(x) * self.conv_y(zq) + self.conv_b(zq)


class Norm(nn.Module):
    """GroupNorm, or SpatialNorm when `zq_channels` is given; `zq` is ignored by the plain norm."""

    def __init__(self, channels: int, groups: int, zq_channels: int | None = None) -> None:
        super().__init__()
        if zq_channels is None:
            self.norm: nn.Module = nn.GroupNorm(groups, channels, eps=1e-6, affine=True)
        else:
            self.norm = SpatialNorm(channels, zq_channels, groups)
        self.spatial = zq_channels is not None

    def forward(self, x: torch.Tensor, zq: torch.Tensor | None = None) -> torch.Tensor:
        if self.spatial:
            if zq is None:
                raise ValueError("a MoVQ (spatial) norm needs the quantized latent zq")
            return self.norm(x, zq)
        return self.norm(x)


class ResnetBlock(nn.Module):
    def __init__(
        self, c_in: int, c_out: int, groups: int, dropout: float, zq_channels: int | None = None
    ) -> None:
        super().__init__()
        self.norm1 = Norm(c_in, groups, zq_channels)
        self.conv1 = nn.Conv2d(c_in, c_out, 3, padding=1)
        self.norm2 = Norm(c_out, groups, zq_channels)
        self.dropout = nn.Dropout(dropout)
        self.conv2 = nn.Conv2d(c_out, c_out, 3, padding=1)
        self.shortcut = nn.Conv2d(c_in, c_out, 1) if c_in != c_out else nn.Identity()

    def forward(self, x: torch.Tensor, zq: torch.Tensor | None = None) -> torch.Tensor:
        h = self.conv1(F.silu(self.norm1(x, zq)))
        h = self.conv2(self.dropout(F.silu(self.norm2(h, zq))))
        return self.shortcut(x) + h


class AttnBlock(nn.Module):
    """Single-head self-attention over all positions of a feature map."""

    def __init__(self, channels: int, groups: int, zq_channels: int | None = None) -> None:
        super().__init__()
        self.norm = Norm(channels, groups, zq_channels)
        self.qkv = nn.Conv2d(channels, 3 * channels, 1)
        self.proj = nn.Conv2d(channels, channels, 1)

    def forward(self, x: torch.Tensor, zq: torch.Tensor | None = None) -> torch.Tensor:
        h, w = x.shape[-2:]
        qkv = self.qkv(self.norm(x, zq))  # [B, 3C, h, w]
        q, k, v = rearrange(qkv, "b (n c) h w -> n b 1 (h w) c", n=3)  # each [B, 1, hw, C]
        out = F.scaled_dot_product_attention(q, k, v)
        out = rearrange(out, "b 1 (h w) c -> b c h w", h=h, w=w)
        return x + self.proj(out)


class Downsample(nn.Module):
    def __init__(self, channels: int) -> None:
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, stride=2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(F.pad(x, (0, 1, 0, 1)))  # asymmetric pad: H -> H/2 exactly


class Upsample(nn.Module):
    def __init__(self, channels: int) -> None:
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(F.interpolate(x, scale_factor=2.0, mode="nearest"))


class Encoder(nn.Module):
    """images [B, C, H, W] -> latents [B, out_channels, H/f, W/f]."""

    def __init__(self, cfg: EncoderConfig) -> None:
        super().__init__()
        self.cfg = cfg
        g, widths = cfg.norm_groups, [cfg.channels * m for m in cfg.ch_mult]
        self.conv_in = nn.Conv2d(cfg.in_channels, cfg.channels, 3, padding=1)
        self.down = nn.ModuleList()
        c = cfg.channels
        for i, width in enumerate(widths):
            level = nn.Module()
            level.blocks = nn.ModuleList()
            for _ in range(cfg.num_res_blocks):
                level.blocks.append(ResnetBlock(c, width, g, cfg.dropout))
                c = width
            level.downsample = Downsample(c) if i < len(widths) - 1 else nn.Identity()
            self.down.append(level)
        self.mid1 = ResnetBlock(c, c, g, cfg.dropout)
        self.mid_attn = AttnBlock(c, g) if cfg.mid_attention else None
        self.mid2 = ResnetBlock(c, c, g, cfg.dropout)
        self.norm_out = nn.GroupNorm(g, c, eps=1e-6)
        self.conv_out = nn.Conv2d(c, cfg.out_channels, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.conv_in(x)
        for level in self.down:
            for block in level.blocks:
                h = block(h)
            h = level.downsample(h)
        h = self.mid1(h)
        if self.mid_attn is not None:
            h = self.mid_attn(h)
        h = self.mid2(h)
        return self.conv_out(F.silu(self.norm_out(h)))


class Decoder(nn.Module):
    """latents [B, in_channels, h, w] (+ zq for MoVQ) -> images [B, out_channels, h*f, w*f]."""

    def __init__(self, cfg: DecoderConfig, zq_channels: int | None = None) -> None:
        super().__init__()
        if cfg.movq and zq_channels is None:
            raise ValueError("a MoVQ decoder needs zq_channels (the quantized latent's width)")
        self.cfg = cfg
        zc = zq_channels if cfg.movq else None
        g, widths = cfg.norm_groups, [cfg.channels * m for m in cfg.ch_mult]
        c = widths[-1]
        self.conv_in = nn.Conv2d(cfg.in_channels, c, 3, padding=1)
        self.mid1 = ResnetBlock(c, c, g, cfg.dropout, zc)
        self.mid_attn = AttnBlock(c, g, zc) if cfg.mid_attention else None
        self.mid2 = ResnetBlock(c, c, g, cfg.dropout, zc)
        self.up = nn.ModuleList()  # coarsest level first
        for i in reversed(range(len(widths))):
            level = nn.Module()
            level.blocks = nn.ModuleList()
            for _ in range(cfg.num_res_blocks + 1):
                level.blocks.append(ResnetBlock(c, widths[i], g, cfg.dropout, zc))
                c = widths[i]
            level.upsample = Upsample(c) if i > 0 else nn.Identity()
            self.up.append(level)
        self.norm_out = Norm(c, g, zc)
        self.conv_out = nn.Conv2d(c, cfg.out_channels, 3, padding=1)

    @property
    def last_layer(self) -> torch.Tensor:
        """Weight of the final conv: the adaptive GAN weight compares gradients here."""
        return self.conv_out.weight

    def forward(self, z: torch.Tensor, zq: torch.Tensor | None = None) -> torch.Tensor:
        if not self.cfg.movq:
            zq = None
        h = self.conv_in(z)
        h = self.mid1(h, zq)
        if self.mid_attn is not None:
            h = self.mid_attn(h, zq)
        h = self.mid2(h, zq)
        for level in self.up:
            for block in level.blocks:
                h = block(h, zq)
            h = level.upsample(h)
        return self.conv_out(F.silu(self.norm_out(h, zq)))

"""PatchGAN discriminator (pix2pix / taming `NLayerDiscriminator`): one logit per image patch."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

NORMS = ("batch", "group", "none")


@dataclass
class DiscriminatorConfig:
    """3 layers and 64 filters is the VQGAN default; the receptive field grows with `num_layers`."""

    in_channels: int = 3
    channels: int = 64
    num_layers: int = 3
    norm: str = "batch"

    def __post_init__(self) -> None:
        if self.norm not in NORMS:
            raise ValueError(f"norm must be one of {NORMS}, got {self.norm!r}")
        if self.num_layers < 1:
            raise ValueError(f"num_layers must be >= 1, got {self.num_layers}")
        if self.channels < 1:
            raise ValueError(f"channels must be >= 1, got {self.channels}")

    @property
    def min_resolution(self) -> int:
        """Smallest input side that still leaves a 1x1 logit map."""
        return 3 * 2**self.num_layers


def _norm(kind: str, channels: int) -> nn.Module:
    if kind == "batch":
        return nn.BatchNorm2d(channels)
    if kind == "group":
        return nn.GroupNorm(1, channels)  # layer-norm-like; no batch statistics to sync
    return nn.Identity()


class PatchDiscriminator(nn.Module):
    """images [B, C, H, W] -> patch logits [B, 1, h', w']."""

    def __init__(self, cfg: DiscriminatorConfig) -> None:
        super().__init__()
        self.cfg = cfg
        c = cfg.channels
        layers: list[nn.Module] = [nn.Conv2d(cfg.in_channels, c, 4, 2, 1), nn.LeakyReLU(0.2)]
        mult = 1
        for n in range(1, cfg.num_layers + 1):
            prev, mult = mult, min(2**n, 8)
            stride = 2 if n < cfg.num_layers else 1
            bias = cfg.norm == "none"
            layers += [
                nn.Conv2d(c * prev, c * mult, 4, stride, 1, bias=bias),
                _norm(cfg.norm, c * mult),
                nn.LeakyReLU(0.2),
            ]
        layers.append(nn.Conv2d(c * mult, 1, 4, 1, 1))
        self.net = nn.Sequential(*layers)
        self.apply(_init_weights)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if min(x.shape[-2:]) < self.cfg.min_resolution:
            raise ValueError(
                f"PatchDiscriminator with num_layers={self.cfg.num_layers} needs inputs of at least "
                f"{self.cfg.min_resolution}px, got {tuple(x.shape[-2:])}"
            )
        return self.net(x)


def _init_weights(m: nn.Module) -> None:
    """DCGAN init, as in taming: conv N(0, 0.02), norm scale N(1, 0.02)."""
    if isinstance(m, nn.Conv2d):
        nn.init.normal_(m.weight, 0.0, 0.02)
    elif isinstance(m, nn.BatchNorm2d | nn.GroupNorm):
        nn.init.normal_(m.weight, 1.0, 0.02)
        nn.init.zeros_(m.bias)

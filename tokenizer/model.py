"""The stage-1 tokenizer: encoder -> quantizer -> decoder, with validated encode/decode.

`Tokenizer.from_pretrained(dir)` loads any trained tokenizer (VQ, RQ or FSQ) from
`config.json` + `model.safetensors`; `identity()` gives the hash that token manifests record.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
from dataclasses import dataclass, field
from typing import Any

import torch
from huggingface_hub import PyTorchModelHubMixin
from torch import nn

from tokenizer.autoencoder import Decoder, DecoderConfig, Encoder, EncoderConfig
from tokenizer.manifest import TokenizerIdentity
from tokenizer.quantizers import QuantizerConfig, QuantizerOutput, build_quantizer
from training.config import from_dict
from training.serialization import SafetensorsConfigMixin, hash_tensors

MAX_RESOLUTION = 8192
MAX_WIDTH = 8192  # channels


@dataclass
class TokenizerConfig:
    """One tokenizer: image size, conv widths, latent width and the quantizer.

    Downsampling factor f = 2^(len(ch_mult) - 1): [1, 2, 2] -> 4, [1, 1, 2, 4] -> 8,
    [1, 1, 2, 2, 4] -> 16, [1, 1, 2, 2, 4, 4] -> 32. The code grid is resolution / f on each side.
    """

    resolution: int = 256
    in_channels: int = 3
    encoder_channels: int = 128
    decoder_channels: int = 128
    ch_mult: list[int] = field(default_factory=lambda: [1, 1, 2, 2, 4])
    num_res_blocks: int = 2
    latent_dim: int = 256
    mid_attention: bool = True
    norm_groups: int = 32
    dropout: float = 0.0
    movq: bool = False
    quantizer: QuantizerConfig = field(default_factory=QuantizerConfig)

    def __post_init__(self) -> None:
        if isinstance(self.quantizer, dict):  # e.g. a shallow load of config.json
            self.quantizer = from_dict(QuantizerConfig, self.quantizer, "quantizer")
        if len(self.ch_mult) not in (3, 4, 5, 6):
            raise ValueError(
                f"ch_mult must have 3 to 6 levels (downsampling 4, 8, 16 or 32), got {self.ch_mult}"
            )
        if self.resolution % self.factor:
            raise ValueError(
                f"resolution={self.resolution} must be a multiple of the downsampling factor {self.factor}"
            )
        if not 1 <= self.resolution <= MAX_RESOLUTION:
            raise ValueError(f"resolution must be in [1, {MAX_RESOLUTION}], got {self.resolution}")
        for name in ("in_channels", "encoder_channels", "decoder_channels", "latent_dim"):
            if not 1 <= getattr(self, name) <= MAX_WIDTH:
                raise ValueError(f"{name} must be in [1, {MAX_WIDTH}], got {getattr(self, name)}")
        if any(not 1 <= m <= 64 for m in self.ch_mult):
            raise ValueError(f"ch_mult entries must be in [1, 64], got {self.ch_mult}")
        if not 0.0 <= self.dropout < 1.0:
            raise ValueError(f"dropout must be in [0, 1), got {self.dropout}")
        self.encoder_config()  # validates norm_groups against the widths
        self.decoder_config()

    @property
    def factor(self) -> int:
        return 2 ** (len(self.ch_mult) - 1)

    @property
    def grid(self) -> tuple[int, int]:
        return (self.resolution // self.factor, self.resolution // self.factor)

    def encoder_config(self) -> EncoderConfig:
        return EncoderConfig(
            in_channels=self.in_channels,
            channels=self.encoder_channels,
            ch_mult=list(self.ch_mult),
            num_res_blocks=self.num_res_blocks,
            out_channels=self.latent_dim,
            mid_attention=self.mid_attention,
            norm_groups=self.norm_groups,
            dropout=self.dropout,
        )

    def decoder_config(self) -> DecoderConfig:
        return DecoderConfig(
            in_channels=self.latent_dim,
            channels=self.decoder_channels,
            ch_mult=list(self.ch_mult),
            num_res_blocks=self.num_res_blocks,
            out_channels=self.in_channels,
            mid_attention=self.mid_attention,
            norm_groups=self.norm_groups,
            dropout=self.dropout,
            movq=self.movq,
        )


PIXEL_TOLERANCE = 1e-3  # resampling and float round-off may step just outside [-1, 1]


def check_pixel_range(images: torch.Tensor) -> None:
    """Images must be finite and in [-1, 1]: NaN encodes silently to code 0, and pixels in
    [0, 255] quantize to garbage."""
    if images.numel() == 0:
        return
    if not bool(torch.isfinite(images).all()):
        raise ValueError("images contain NaN or inf values")
    lo, hi = float(images.min()), float(images.max())
    if lo < -1 - PIXEL_TOLERANCE or hi > 1 + PIXEL_TOLERANCE:
        hint = " (uint8 pixels map to [-1, 1] as x / 127.5 - 1)" if hi > 2 else ""
        raise ValueError(f"images must lie in [-1, 1], got values in [{lo:.4g}, {hi:.4g}]{hint}")


@dataclass
class TokenizerOutput:
    recon: torch.Tensor  # [B, C, H, W]
    codes: torch.Tensor  # [B, h, w] or [B, h, w, D]
    quant_loss: torch.Tensor  # scalar
    metrics: dict[str, torch.Tensor]


class Tokenizer(nn.Module, SafetensorsConfigMixin, PyTorchModelHubMixin):
    """images [B, C, H, W] in [-1, 1] <-> codes [B, h, w] (VQ, FSQ) or [B, h, w, D] (RQ)."""

    _config_schema = TokenizerConfig
    _sort_config_keys = True

    def __init__(self, config: TokenizerConfig) -> None:
        super().__init__()
        if isinstance(config, dict):
            config = from_dict(TokenizerConfig, config, "Tokenizer config")
        self.config = config
        self.encoder = Encoder(config.encoder_config())
        self.quant_conv = nn.Conv2d(config.latent_dim, config.latent_dim, 1)
        self.quantizer = build_quantizer(config.quantizer, config.latent_dim)
        self.post_quant_conv = nn.Conv2d(config.latent_dim, config.latent_dim, 1)
        self.decoder = Decoder(config.decoder_config(), zq_channels=config.latent_dim)

    # ---- properties -------------------------------------------------------------------------
    @property
    def codebook_size(self) -> int:
        return int(self.quantizer.codebook_size)

    @property
    def depth(self) -> int:
        return int(self.quantizer.depth)

    @property
    def grid(self) -> tuple[int, int]:
        return self.config.grid

    @property
    def codes_have_depth(self) -> bool:
        """True when codes carry a trailing depth axis [B, h, w, D] (RQ; its depth is >= 2)."""
        return self.depth > 1

    @property
    def last_layer(self) -> torch.Tensor:
        return self.decoder.last_layer

    def codebook(self) -> torch.Tensor:
        """[K, d] code vectors in the quantizer's lookup space."""
        return self.quantizer.codebook()

    # ---- validation -------------------------------------------------------------------------
    def _check_images(self, images: torch.Tensor) -> None:
        c, r = self.config.in_channels, self.config.resolution
        if not torch.is_tensor(images) or images.ndim != 4 or tuple(images.shape[1:]) != (c, r, r):
            got = tuple(images.shape) if torch.is_tensor(images) else type(images).__name__
            raise ValueError(f"images must have shape [B, {c}, {r}, {r}], got {got}")
        if not images.is_floating_point():
            raise ValueError(f"images must be a float tensor in [-1, 1], got dtype {images.dtype}")

    def _check_codes(self, codes: torch.Tensor) -> torch.Tensor:
        """The codes as int64 after checking shape, dtype and range."""
        h, w = self.grid
        want = (h, w, self.depth) if self.codes_have_depth else (h, w)
        expected = "[B, " + ", ".join(map(str, want)) + "]"
        if (
            not torch.is_tensor(codes)
            or codes.ndim != len(want) + 1
            or tuple(codes.shape[1:]) != want
        ):
            got = tuple(codes.shape) if torch.is_tensor(codes) else type(codes).__name__
            raise ValueError(f"codes must have shape {expected}, got {got}")
        if codes.is_floating_point() or codes.is_complex() or codes.dtype == torch.bool:
            raise ValueError(f"codes must be an integer tensor, got dtype {codes.dtype}")
        codes = codes.long()  # also lifts uint16 codes read from token datasets
        if codes.numel() and (codes.min() < 0 or codes.max() >= self.codebook_size):
            raise ValueError(
                f"codes must lie in [0, {self.codebook_size}), got min {int(codes.min())} "
                f"max {int(codes.max())}"
            )
        return codes

    # ---- the API ----------------------------------------------------------------------------
    def quantize(self, images: torch.Tensor) -> QuantizerOutput:
        """Encoder + quantizer: quantized latents [B, latent_dim, h, w], codes, loss, metrics."""
        self._check_images(images)
        z = self.quant_conv(self.encoder(images))  # [B, latent, h, w]
        return self.quantizer(z)

    def _decode_latent(self, quant: torch.Tensor) -> torch.Tensor:
        return self.decoder(self.post_quant_conv(quant), quant)  # [B, C, H, W]

    def preprocess(self, images: Any) -> torch.Tensor:
        """PIL images or uint8 arrays (one or a list; any size) -> float [B, 3, R, R] in [-1, 1]
        on this tokenizer's device: the shorter side resized to R, centre-cropped (as training
        and export see images)."""
        from tokenizer.data import ImageTransform  # data -> sources -> embedded: kept lazy

        items = images if isinstance(images, list | tuple) else [images]
        transform = ImageTransform(self.config.resolution, upscale=True)
        batch = torch.stack([transform(item) for item in items])  # [B, 3, R, R]
        return batch.to(next(self.parameters()).device)

    def postprocess(self, images: torch.Tensor) -> list:
        """Decoded images [B, 3, H, W] (not clamped) -> PIL images (clamped to [-1, 1])."""
        from tokenizer.images import to_pil

        return to_pil(images)

    def encode(self, images: torch.Tensor) -> torch.Tensor:
        """[B, C, H, W] in [-1, 1] -> codes [B, h, w] (or [B, h, w, D]).

        Call in eval mode: in train mode the quantizer updates its statistics (EMA, restarts)."""
        self._check_images(images)
        check_pixel_range(images)
        return self.quantize(images).codes

    def embed(self, codes: torch.Tensor) -> torch.Tensor:
        """codes -> quantized latents [B, latent_dim, h, w] (what the decoder sees)."""
        return self.quantizer.embed(self._check_codes(codes))

    def decode(self, codes: torch.Tensor) -> torch.Tensor:
        """codes -> images [B, C, H, W] (roughly in [-1, 1]; not clamped)."""
        return self._decode_latent(self.embed(codes))

    def forward(self, images: torch.Tensor) -> TokenizerOutput:
        q = self.quantize(images)
        return TokenizerOutput(self._decode_latent(q.quantized), q.codes, q.loss, dict(q.metrics))

    # ---- identity and persistence -----------------------------------------------------------
    def identity(self) -> TokenizerIdentity:
        """sha256 of config + weights (tensor bytes in sorted key order) and the code geometry
        (what token manifests and priors record; class names come from the data)."""
        digest = hashlib.sha256()
        digest.update(json.dumps(dataclasses.asdict(self.config), sort_keys=True).encode())
        hash_tensors(digest, self.state_dict())
        return TokenizerIdentity(
            digest.hexdigest(), self.codebook_size, list(self.grid), self.depth
        )

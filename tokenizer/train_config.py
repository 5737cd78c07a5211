"""What `scripts/train_tokenizer.py` reads; configs/tokenizer/*.yaml mirror it 1:1."""

from __future__ import annotations

from dataclasses import dataclass, field

from tokenizer.losses import LossConfig
from tokenizer.model import TokenizerConfig
from tokenizer.sources import DataConfig
from training.runtime import OptimConfig, RuntimeConfig


@dataclass
class DiscOptimConfig:
    """The discriminator's own AdamW (taming: the generator's lr, betas (0.5, 0.9), no decay)."""

    lr: float = 1e-4
    betas: list[float] = field(default_factory=lambda: [0.5, 0.9])
    weight_decay: float = 0.0
    warmup_steps: int = 0  # counted from loss.disc_start
    grad_clip: float = 0.0  # 0 disables

    def __post_init__(self) -> None:
        if self.lr <= 0:
            raise ValueError(f"disc_optim.lr must be > 0, got {self.lr}")
        if len(self.betas) != 2:
            raise ValueError(f"disc_optim.betas must have 2 values, got {self.betas}")
        if self.warmup_steps < 0:
            raise ValueError(f"disc_optim.warmup_steps must be >= 0, got {self.warmup_steps}")


@dataclass
class EvalConfig:
    """Held-out evaluation (split `data.eval_split`) and the reconstruction grids."""

    max_images: int = 1000  # first N images of the split; 0 = all of it
    batch_size: int = 64
    grid_images: int = 8  # columns of recon_step_XXXXXX.png

    def __post_init__(self) -> None:
        if self.max_images < 0:
            raise ValueError(f"eval.max_images must be >= 0, got {self.max_images}")
        if self.batch_size < 1:
            raise ValueError(f"eval.batch_size must be >= 1, got {self.batch_size}")
        if self.grid_images < 1:
            raise ValueError(f"eval.grid_images must be >= 1, got {self.grid_images}")


@dataclass
class TokenizerTrainConfig:
    """Everything `scripts/train_tokenizer.py` reads; configs/tokenizer/*.yaml mirror it 1:1."""

    runtime: RuntimeConfig = field(default_factory=RuntimeConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    disc_optim: DiscOptimConfig = field(default_factory=DiscOptimConfig)
    data: DataConfig = field(default_factory=DataConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    model: TokenizerConfig = field(default_factory=TokenizerConfig)
    loss: LossConfig = field(default_factory=LossConfig)

    def __post_init__(self) -> None:
        if self.model.in_channels != 3:
            raise ValueError(
                f"model.in_channels must be 3 (tokenizer.data yields RGB images [B, 3, H, W]), "
                f"got {self.model.in_channels}"
            )
        if self.data.resolution != self.model.resolution:
            raise ValueError(
                f"data.resolution ({self.data.resolution}) must equal model.resolution "
                f"({self.model.resolution})"
            )
        disc = self.loss.discriminator
        gan_used = self.loss.disc_weight > 0 and self.loss.disc_start < self.runtime.max_steps
        if gan_used and self.model.resolution < disc.min_resolution:
            raise ValueError(
                f"loss.discriminator.num_layers={disc.num_layers} needs images of at least "
                f"{disc.min_resolution}px, model.resolution is {self.model.resolution}"
            )
        if disc.in_channels != self.model.in_channels:
            raise ValueError(
                f"loss.discriminator.in_channels ({disc.in_channels}) must equal "
                f"model.in_channels ({self.model.in_channels})"
            )

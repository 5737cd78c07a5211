"""Stage-2 training config (mirrored by configs/prior/*.yaml) and its resolution against tokens.

The YAML names the prior and its sizes; vocab, grid, depth, classes, the text vocabulary and the
tokenizer identity come from the token export's manifest (`resolve_prior_config`).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any

from prior.conditioning import word_vocab
from prior.configs import GPTConfig, MaskGITConfig, PriorConfig, RQTransformerConfig
from prior.data import PriorDataConfig
from tokenizer.manifest import TokenizerIdentity
from training.runtime import OptimConfig, RuntimeConfig

MODEL_TYPES = ("gpt", "maskgit", "rq_transformer")


@dataclass
class PriorModelConfig:
    """Which prior (`type`) and its config; vocab/grid/depth/classes are filled from the tokens."""

    type: str = "gpt"
    init_from: str = ""  # a saved prior to start from (same type and tokenizer)
    gpt: GPTConfig = field(default_factory=GPTConfig)
    maskgit: MaskGITConfig = field(default_factory=MaskGITConfig)
    rq_transformer: RQTransformerConfig = field(default_factory=RQTransformerConfig)

    def __post_init__(self) -> None:
        if self.type not in MODEL_TYPES:
            raise ValueError(f"model.type must be one of {MODEL_TYPES}, got {self.type!r}")

    def selected(self) -> PriorConfig:
        return getattr(self, self.type)


@dataclass
class SampleConfig:
    """Periodic sample grids: rows of classes (or captions), `per_row` samples each."""

    rows: int = 4
    per_row: int = 8
    guidance_scale: float = 2.0
    temperature: float = 1.0
    top_k: int = 0
    top_p: float = 1.0
    maskgit_steps: int = 8
    seed: int = 0


@dataclass
class PriorTrainConfig:
    runtime: RuntimeConfig = field(default_factory=RuntimeConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    data: PriorDataConfig = field(default_factory=lambda: PriorDataConfig(tokens="outputs/tokens"))
    model: PriorModelConfig = field(default_factory=PriorModelConfig)
    sample: SampleConfig = field(default_factory=SampleConfig)
    compile: bool = False
    gradient_checkpointing: bool = False


def resolve_prior_config(
    model_cfg: PriorModelConfig,
    info: TokenizerIdentity,
    captions: list[str],
    gradient_checkpointing: bool,
) -> PriorConfig:
    """The selected config with vocab, grid, depth, classes, text vocab and tokenizer from the data."""
    cfg = model_cfg.selected()
    cfg.tokenizer.check_matches(info, f"model.{model_cfg.type}.tokenizer (pinned in the config)")
    if model_cfg.type != "rq_transformer" and info.depth != 1:
        raise ValueError(f"tokens have depth {info.depth}: train model.type=rq_transformer on them")
    if model_cfg.type == "rq_transformer" and info.depth == 1:
        raise ValueError("tokens have depth 1: model.type=rq_transformer needs residual (RQ) codes")
    changes: dict[str, Any] = {
        "vocab_size": info.codebook_size,
        "grid": list(info.grid),
        "tokenizer": info,
        "gradient_checkpointing": cfg.gradient_checkpointing or gradient_checkpointing,
    }
    if model_cfg.type == "rq_transformer":
        changes["depth"] = info.depth
    if cfg.cond == "class":
        if not info.class_names:
            raise ValueError(
                "cond='class' needs class names in the tokens' manifest; use cond=none or text"
            )
        changes["num_classes"] = len(info.class_names)
    if cfg.cond == "text" and not cfg.text.name_or_path and not cfg.text.vocab:
        changes["text"] = dataclasses.replace(
            cfg.text, vocab=word_vocab(captions, cfg.text.lowercase)
        )
    return dataclasses.replace(cfg, **changes)

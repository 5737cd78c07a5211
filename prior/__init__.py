"""Stage-2 priors over discrete image codes: GPT, MaskGIT and RQ-Transformer."""

from prior.conditioning import Condition, word_vocab
from prior.configs import (
    GPTConfig,
    MaskGITConfig,
    PriorConfig,
    RQTransformerConfig,
    TextEncoderConfig,
    TokenizerInfo,
    check_tokenizer,
)
from prior.gpt import GPT
from prior.loading import load_prior
from prior.maskgit import MaskGIT, cosine_schedule, mask_count
from prior.rq_transformer import RQTransformer

__all__ = [
    "GPT",
    "Condition",
    "GPTConfig",
    "MaskGIT",
    "MaskGITConfig",
    "PriorConfig",
    "RQTransformer",
    "RQTransformerConfig",
    "TextEncoderConfig",
    "TokenizerInfo",
    "check_tokenizer",
    "cosine_schedule",
    "load_prior",
    "mask_count",
    "word_vocab",
]

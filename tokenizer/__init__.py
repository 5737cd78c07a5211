"""Stage 1: images <-> discrete codes (VQ, RQ, FSQ tokenizers), their losses, metrics and data."""

from tokenizer.model import Tokenizer, TokenizerConfig, TokenizerOutput

__all__ = ["Tokenizer", "TokenizerConfig", "TokenizerOutput"]

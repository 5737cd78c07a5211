"""Conditions as prefix tokens: class embedding, text-encoder features, or one start token.

Every prior sees a condition as `Condition(prefix [B, P, dim], mask [B, P])` placed before the
image tokens. Class id `num_classes` and the learned null text are the "unconditional" rows of
classifier-free guidance; a negative prompt is just another text condition.

Text prefixes are left-padded (real tokens at the end) so the last prefix slot, which predicts
the first image token, is always a real token; padded slots are masked as keys.
"""

from collections import Counter
from collections.abc import Iterable
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from prior.configs import SPECIAL_WORDS, PriorConfig, TextEncoderConfig


@dataclass
class Condition:
    """Prefix embeddings [B, P, dim] and their mask [B, P] (True = real token)."""

    prefix: Tensor
    mask: Tensor

    def __post_init__(self) -> None:
        if self.prefix.dim() != 3 or self.mask.shape != self.prefix.shape[:2]:
            raise ValueError(
                f"Condition needs prefix [B, P, dim] and mask [B, P], got {tuple(self.prefix.shape)} "
                f"and {tuple(self.mask.shape)}"
            )

    @property
    def batch_size(self) -> int:
        return self.prefix.shape[0]

    @property
    def length(self) -> int:
        return self.prefix.shape[1]

    @staticmethod
    def cat(conditions: "list[Condition]") -> "Condition":
        """Concatenate on the batch axis (e.g. [cond; uncond] for CFG)."""
        if not conditions:
            raise ValueError("Condition.cat needs at least one condition")
        lengths = {c.length for c in conditions}
        if len(lengths) != 1:
            raise ValueError(
                f"cannot concatenate conditions of different prefix lengths {sorted(lengths)}"
            )
        return Condition(
            torch.cat([c.prefix for c in conditions]), torch.cat([c.mask for c in conditions])
        )

    def select(self, index: Tensor) -> "Condition":
        """Rows `index` (Long[K] or a slice) as a new condition."""
        return Condition(self.prefix[index], self.mask[index])

    def repeat_interleave(self, repeats: int) -> "Condition":
        """Each row `repeats` times in a row (several samples per prompt)."""
        return Condition(
            self.prefix.repeat_interleave(repeats, 0), self.mask.repeat_interleave(repeats, 0)
        )


def word_vocab(
    captions: Iterable[str],
    lowercase: bool = True,
    min_count: int = 1,
    max_words: int | None = None,
) -> list[str]:
    """Word-level vocabulary of `captions` (special words first, then by count, ties by spelling)."""
    from tokenizers import normalizers, pre_tokenizers

    norm, pre = normalizers.Lowercase(), pre_tokenizers.Whitespace()
    counts: Counter[str] = Counter()
    for text in captions:
        text = norm.normalize_str(text) if lowercase else text
        counts.update(word for word, _ in pre.pre_tokenize_str(text))
    words = sorted(
        (w for w, c in counts.items() if c >= min_count and w not in SPECIAL_WORDS),
        key=lambda w: (-counts[w], w),
    )
    return SPECIAL_WORDS + words[:max_words]


def word_tokenizer(vocab: list[str], lowercase: bool = True):
    """A `PreTrainedTokenizerFast` over `vocab`: [CLS] words [SEP], unknown words -> [UNK], pad 0."""
    from tokenizers import Tokenizer, normalizers, pre_tokenizers, processors
    from tokenizers.models import WordLevel
    from transformers import PreTrainedTokenizerFast

    if vocab[: len(SPECIAL_WORDS)] != SPECIAL_WORDS:
        raise ValueError(f"vocab must start with {SPECIAL_WORDS}")
    ids = {w: i for i, w in enumerate(vocab)}
    tok = Tokenizer(WordLevel(ids, unk_token="[UNK]"))
    if lowercase:
        tok.normalizer = normalizers.Lowercase()
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.post_processor = processors.TemplateProcessing(
        single="[CLS] $A [SEP]", special_tokens=[("[CLS]", ids["[CLS]"]), ("[SEP]", ids["[SEP]"])]
    )
    return PreTrainedTokenizerFast(
        tokenizer_object=tok,
        pad_token="[PAD]",
        unk_token="[UNK]",
        cls_token="[CLS]",
        sep_token="[SEP]",
    )


def build_text_encoder(cfg: TextEncoderConfig) -> tuple[nn.Module, object, int]:
    """(encoder, tokenizer, feature width) for a text config; pretrained ones load offline only."""
    from transformers import (
        AutoConfig,
        AutoModel,
        AutoTokenizer,
        BertConfig,
        BertModel,
        T5Config,
        T5EncoderModel,
    )

    if cfg.name_or_path:
        hf_cfg = AutoConfig.from_pretrained(cfg.name_or_path, local_files_only=True)
        if hf_cfg.model_type in ("t5", "mt5", "umt5"):
            encoder = T5EncoderModel.from_pretrained(
                cfg.name_or_path, local_files_only=True, use_safetensors=True
            )
        elif hf_cfg.model_type == "clip":
            from transformers import CLIPTextModel

            encoder = CLIPTextModel.from_pretrained(
                cfg.name_or_path, local_files_only=True, use_safetensors=True
            )
        else:
            encoder = AutoModel.from_pretrained(
                cfg.name_or_path, local_files_only=True, use_safetensors=True
            )
            if getattr(encoder.config, "is_encoder_decoder", False):
                encoder = encoder.get_encoder()
        tokenizer = AutoTokenizer.from_pretrained(cfg.name_or_path, local_files_only=True)
    else:
        if not cfg.vocab:
            raise ValueError(
                "text.vocab is empty: build it with prior.conditioning.word_vocab(captions)"
            )
        tokenizer = word_tokenizer(cfg.vocab, cfg.lowercase)
        if cfg.arch == "bert":
            hf_cfg = BertConfig(
                vocab_size=len(cfg.vocab),
                hidden_size=cfg.hidden_size,
                num_hidden_layers=cfg.num_layers,
                num_attention_heads=cfg.num_heads,
                intermediate_size=cfg.intermediate_size,
                max_position_embeddings=cfg.max_text_len,
                pad_token_id=0,
            )
            encoder = BertModel(hf_cfg, add_pooling_layer=False)
        else:
            hf_cfg = T5Config(
                vocab_size=len(cfg.vocab),
                d_model=cfg.hidden_size,
                d_kv=cfg.hidden_size // cfg.num_heads,
                d_ff=cfg.intermediate_size,
                num_layers=cfg.num_layers,
                num_heads=cfg.num_heads,
                pad_token_id=0,
                decoder_start_token_id=0,
            )
            encoder = T5EncoderModel(hf_cfg)
    tokenizer.padding_side = "right"
    width = getattr(encoder.config, "hidden_size", None) or encoder.config.d_model
    return encoder, tokenizer, int(width)


class Conditioner(nn.Module):
    """Turns class ids / texts into a `Condition`; holds the null embeddings for CFG."""

    def __init__(self, cfg: PriorConfig) -> None:
        super().__init__()
        self.kind = cfg.cond
        self.num_classes = cfg.num_classes
        self.dropout_p = cfg.cond_dropout
        self.prefix_len = cfg.prefix_len
        self.freeze_encoder = cfg.text.freeze
        std = cfg.init_std
        if self.kind == "class":
            self.class_embedding = nn.Embedding(cfg.num_classes + 1, cfg.dim)  # last row = null
            nn.init.normal_(self.class_embedding.weight, std=std)
        elif self.kind == "none":
            self.start = nn.Parameter(torch.randn(1, cfg.dim) * std)
        else:
            self.encoder, self.tokenizer, width = build_text_encoder(cfg.text)
            if self.freeze_encoder:
                self.encoder.requires_grad_(False)
                self.encoder.eval()
            self.text_proj = nn.Sequential(
                nn.Linear(width, cfg.dim), nn.GELU(approximate="tanh"), nn.Linear(cfg.dim, cfg.dim)
            )
            for layer in (self.text_proj[0], self.text_proj[2]):
                nn.init.normal_(layer.weight, std=std)
                nn.init.zeros_(layer.bias)
            self.null_text = nn.Parameter(torch.randn(cfg.prefix_len, cfg.dim) * std)

    def train(self, mode: bool = True) -> "Conditioner":
        super().train(mode)
        if self.kind == "text" and self.freeze_encoder:
            self.encoder.eval()  # frozen encoder: no dropout
        return self

    def _device(self) -> torch.device:
        return next(self.parameters()).device

    def _keep(
        self, batch_size: int, drop: bool, generator: torch.Generator | None
    ) -> Tensor | None:
        """Bool [B] rows that keep their condition, or None when nothing is dropped."""
        if not drop or self.dropout_p == 0.0:
            return None
        device = generator.device if generator is not None else self._device()
        u = torch.rand(batch_size, generator=generator, device=device)
        return (u >= self.dropout_p).to(self._device())

    def forward(
        self,
        class_ids: Tensor | None = None,
        texts: list[str] | None = None,
        batch_size: int | None = None,
        drop: bool = False,
        generator: torch.Generator | None = None,
    ) -> Condition:
        if self.kind == "class":
            if class_ids is None or texts is not None:
                raise ValueError("a class-conditional prior takes class_ids (and no texts)")
            ids = torch.as_tensor(class_ids, device=self._device()).long().reshape(-1)
            if ids.numel() and (int(ids.min()) < 0 or int(ids.max()) > self.num_classes):
                raise ValueError(
                    f"class ids must be in [0, {self.num_classes}] ({self.num_classes} = null)"
                )
            keep = self._keep(ids.numel(), drop, generator)
            if keep is not None:
                ids = torch.where(keep, ids, torch.full_like(ids, self.num_classes))
            prefix = self.class_embedding(ids)[:, None]  # [B, 1, dim]
            return Condition(
                prefix, torch.ones(prefix.shape[:2], dtype=torch.bool, device=prefix.device)
            )
        if self.kind == "none":
            if class_ids is not None or texts is not None or batch_size is None:
                raise ValueError(
                    "an unconditional prior takes only batch_size (no class_ids or texts)"
                )
            return self.null(batch_size)
        if texts is None or class_ids is not None:
            raise ValueError("a text-conditional prior takes texts (and no class_ids)")
        cond = self._encode_texts(list(texts))
        keep = self._keep(len(texts), drop, generator)
        if keep is not None:
            null = self.null(len(texts))
            prefix = torch.where(
                keep[:, None, None], cond.prefix, null.prefix.to(cond.prefix.dtype)
            )
            cond = Condition(prefix, torch.where(keep[:, None], cond.mask, null.mask))
        return cond

    def _encode_texts(self, texts: list[str]) -> Condition:
        device, p = self._device(), self.prefix_len
        batch = self.tokenizer(
            texts, padding="max_length", truncation=True, max_length=p, return_tensors="pt"
        )
        ids, attn = (
            batch["input_ids"].to(device),
            batch["attention_mask"].to(device),
        )  # [B, P], right-padded
        with torch.set_grad_enabled(torch.is_grad_enabled() and not self.freeze_encoder):
            feats = self.encoder(
                input_ids=ids, attention_mask=attn
            ).last_hidden_state  # [B, P, width]
        x = self.text_proj(feats)  # [B, P, dim]
        # move each row's n real tokens to the end: out slot s <- source s - (P - n)
        shift = p - attn.sum(1)  # [B]
        slots = torch.arange(p, device=device)
        src = (slots[None] - shift[:, None]).clamp(min=0)  # [B, P]
        x = torch.gather(x, 1, src[..., None].expand(-1, -1, x.shape[-1]))
        mask = slots[None] >= shift[:, None]  # [B, P]
        return Condition(x * mask[..., None].to(x.dtype), mask)

    def null(self, batch_size: int) -> Condition:
        """The unconditional condition for `batch_size` rows."""
        if self.kind == "class":
            ids = torch.full(
                (batch_size,), self.num_classes, dtype=torch.long, device=self._device()
            )
            return self.forward(class_ids=ids)
        table = self.start if self.kind == "none" else self.null_text  # [P, dim]
        prefix = table[None].expand(batch_size, -1, -1)
        return Condition(
            prefix, torch.ones(prefix.shape[:2], dtype=torch.bool, device=prefix.device)
        )

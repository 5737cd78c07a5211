"""Dataclass configs of the stage-2 priors, their named size presets and the tokenizer identity.

Every config is OmegaConf-structured compatible (plain scalars, lists, nested dataclasses) and is
also what `save_pretrained` writes to config.json, so `load_prior` can rebuild any prior strictly.
"""

import dataclasses
from dataclasses import dataclass, field
from typing import Any, TypeVar

from tokenizer.manifest import MAX_CODES, TokenizerIdentity

T = TypeVar("T", bound="PriorConfig")

# Named trunk sizes, usable from YAML as `preset: B`; B/L/XL are LlamaGen's GPT-B/L/XL.
ARCH_PRESETS: dict[str, dict[str, int]] = {
    "tiny": dict(dim=32, n_layers=2, n_heads=2, multiple_of=16),
    "B": dict(dim=768, n_layers=12, n_heads=12, multiple_of=256),
    "L": dict(dim=1024, n_layers=24, n_heads=16, multiple_of=256),
    "XL": dict(dim=1280, n_layers=36, n_heads=20, multiple_of=256),
}

SPECIAL_WORDS: list[str] = ["[PAD]", "[UNK]", "[CLS]", "[SEP]"]

# Upper bounds checked before anything is allocated (a 1 KB config.json must not ask for 80 GB).
MAX_VOCAB = MAX_CODES  # codes are stored as uint16
MAX_GRID_SIDE = 1024
MAX_SEQ_LEN = 2**16  # h * w
MAX_PARAMS = 20e9  # far above any prior this code trains


TokenizerInfo = TokenizerIdentity  # the name priors' configs have always used


def check_tokenizer(info: TokenizerIdentity, identity: TokenizerIdentity | dict[str, Any]) -> None:
    """ValueError naming every field where a prior's tokenizer and `identity` differ (strict: a
    prior that recorded no tokenizer matches none)."""
    if isinstance(identity, dict):
        identity = TokenizerIdentity(**identity)
    diffs = info.differences(identity)
    if diffs:
        raise ValueError("tokenizer mismatch: " + "; ".join(diffs))


@dataclass
class TextEncoderConfig:
    """Text conditioning: a pretrained `transformers` encoder or a small one built from this config.

    name_or_path: local folder or cached Hub name (loaded with local_files_only); "" builds `arch`
    from the sizes below with a word-level tokenizer over `vocab` (stored here so it reloads offline).
    A frozen from-scratch encoder is a fixed random feature extractor: set freeze=False for those.
    """

    name_or_path: str = ""
    arch: str = "bert"  # "bert" | "t5" (from-scratch encoder only)
    hidden_size: int = 64
    num_layers: int = 2
    num_heads: int = 2
    intermediate_size: int = 128
    vocab: list[str] = field(default_factory=list)
    max_text_len: int = 16  # prefix length P: encoder tokens beyond this are truncated
    freeze: bool = True
    lowercase: bool = True

    def __post_init__(self) -> None:
        if self.arch not in ("bert", "t5"):
            raise ValueError(f"text.arch must be 'bert' or 't5', got {self.arch!r}")
        if not 2 <= self.max_text_len <= 4096:
            raise ValueError(f"text.max_text_len must be in [2, 4096], got {self.max_text_len}")
        for name in ("hidden_size", "num_layers", "num_heads", "intermediate_size"):
            if not 1 <= getattr(self, name) <= 65536:
                raise ValueError(f"text.{name} must be in [1, 65536], got {getattr(self, name)}")
        if self.hidden_size % self.num_heads != 0:
            raise ValueError(
                f"text.hidden_size {self.hidden_size} not divisible by text.num_heads {self.num_heads}"
            )
        if self.vocab and self.vocab[: len(SPECIAL_WORDS)] != SPECIAL_WORDS:
            raise ValueError(f"text.vocab must start with the special words {SPECIAL_WORDS}")


@dataclass
class PriorConfig:
    """Fields every prior shares: vocabulary, grid, conditioning and the Llama-style trunk."""

    model_type: str = ""
    vocab_size: int = 16  # codebook size (image tokens); MaskGIT adds its mask token on top
    grid: list[int] = field(default_factory=lambda: [4, 4])  # [h, w]
    cond: str = "class"  # "class" | "text" | "none"
    num_classes: int = 10  # class id num_classes is the null class
    cond_dropout: float = 0.1  # training-time probability of replacing a condition by null
    dim: int = 32
    n_layers: int = 2
    n_heads: int = 2
    mlp_ratio: float = 4.0  # SwiGLU hidden = round_up(2/3 * mlp_ratio * dim, multiple_of)
    multiple_of: int = 16
    norm_eps: float = 1e-5
    dropout: float = 0.0  # on embeddings and residual branches
    rope: str = "2d"  # "1d" (sequence position) | "2d" (row/column halves)
    rope_base: float = 10000.0
    tie_embeddings: bool = False
    gradient_checkpointing: bool = False
    init_std: float = 0.02
    preset: str = ""  # a name of ARCH_PRESETS: sets dim, n_layers, n_heads, multiple_of
    text: TextEncoderConfig = field(default_factory=TextEncoderConfig)
    tokenizer: TokenizerIdentity = field(default_factory=TokenizerIdentity)

    # subclasses set this to their model_type
    _expected_type = ""

    def __post_init__(self) -> None:
        # PyTorchModelHubMixin / json hand nested configs over as dicts
        if isinstance(self.text, dict):
            self.text = TextEncoderConfig(**self.text)
        if isinstance(self.tokenizer, dict):
            self.tokenizer = TokenizerIdentity(**self.tokenizer)
        self.grid = list(self.grid)
        if self.preset:
            if self.preset not in ARCH_PRESETS:
                raise ValueError(
                    f"unknown preset {self.preset!r}; choose from {sorted(ARCH_PRESETS)}"
                )
            defaults = {f.name: f.default for f in dataclasses.fields(PriorConfig)}
            for key, value in ARCH_PRESETS[self.preset].items():
                if getattr(self, key) not in (value, defaults[key]):
                    raise ValueError(f"preset {self.preset!r} sets {key}={value}; got {key}="
                                     f"{getattr(self, key)} too (set one or the other)")  # fmt: skip
                setattr(self, key, value)
        if self.model_type != self._expected_type:
            raise ValueError(
                f"model_type must be {self._expected_type!r} for {type(self).__name__}, "
                f"got {self.model_type!r}"
            )
        if not 1 <= self.vocab_size <= MAX_VOCAB:
            raise ValueError(f"vocab_size must be in [1, {MAX_VOCAB}], got {self.vocab_size}")
        if len(self.grid) != 2 or not all(1 <= side <= MAX_GRID_SIDE for side in self.grid):
            raise ValueError(
                f"grid must be [h, w] with sides in [1, {MAX_GRID_SIDE}], got {self.grid}"
            )
        if self.seq_len > MAX_SEQ_LEN:
            raise ValueError(
                f"grid {self.grid} has {self.seq_len} positions, more than {MAX_SEQ_LEN}"
            )
        self._check_trunk()
        if self.cond not in ("class", "text", "none"):
            raise ValueError(f"cond must be 'class', 'text' or 'none', got {self.cond!r}")
        if self.cond == "class" and self.num_classes < 1:
            raise ValueError(f"num_classes must be >= 1 for cond='class', got {self.num_classes}")
        if not 0.0 <= self.cond_dropout < 1.0:
            raise ValueError(f"cond_dropout must be in [0, 1), got {self.cond_dropout}")
        if self.dim % self.n_heads != 0:
            raise ValueError(f"dim {self.dim} is not divisible by n_heads {self.n_heads}")
        if self.rope not in ("1d", "2d"):
            raise ValueError(f"rope must be '1d' or '2d', got {self.rope!r}")
        quantum = 4 if self.rope == "2d" else 2
        if self.head_dim % quantum != 0:
            raise ValueError(
                f"head_dim {self.head_dim} must be divisible by {quantum} for rope={self.rope!r}"
            )
        if not 0.0 <= self.dropout < 1.0:
            raise ValueError(f"dropout must be in [0, 1), got {self.dropout}")
        self._check_tokenizer_fields()

    def _check_trunk(self) -> None:
        for name in ("dim", "n_layers", "n_heads", "multiple_of"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        for name in ("mlp_ratio", "norm_eps", "rope_base", "init_std"):
            if not getattr(self, name) > 0:
                raise ValueError(f"{name} must be > 0, got {getattr(self, name)}")
        if self.cond == "class" and self.num_classes > MAX_VOCAB:
            raise ValueError(f"num_classes must be <= {MAX_VOCAB}, got {self.num_classes}")
        approx = 12 * self.n_layers * self.dim**2 + 2 * self.vocab_size * self.dim
        if approx > MAX_PARAMS:
            raise ValueError(
                f"dim={self.dim} x n_layers={self.n_layers} is about {approx:.2g} parameters, "
                f"more than {MAX_PARAMS:.0g}"
            )

    def _check_tokenizer_fields(self) -> None:
        tok = self.tokenizer
        if tok.codebook_size == 0:
            return
        if tok.codebook_size != self.vocab_size:
            raise ValueError(
                f"vocab_size {self.vocab_size} != tokenizer.codebook_size {tok.codebook_size}"
            )
        if tok.grid and list(tok.grid) != self.grid:
            raise ValueError(f"grid {self.grid} != tokenizer.grid {list(tok.grid)}")
        if tok.depth != self.code_depth:
            raise ValueError(
                f"tokenizer.depth {tok.depth} != code depth {self.code_depth} of this prior"
            )

    @property
    def code_depth(self) -> int:
        return 1

    @property
    def head_dim(self) -> int:
        return self.dim // self.n_heads

    @property
    def ffn_dim(self) -> int:
        hidden = int(2 * self.mlp_ratio * self.dim / 3)
        return self.multiple_of * ((hidden + self.multiple_of - 1) // self.multiple_of)

    @property
    def seq_len(self) -> int:
        """Image tokens per sample, N = h * w."""
        return self.grid[0] * self.grid[1]

    @property
    def prefix_len(self) -> int:
        """Condition tokens P before the image tokens."""
        return self.text.max_text_len if self.cond == "text" else 1

    @classmethod
    def from_preset(cls: type[T], name: str) -> T:
        """A config with a named trunk size; change the rest with `dataclasses.replace`."""
        return cls(preset=name)


@dataclass
class GPTConfig(PriorConfig):
    """LlamaGen-style autoregressive prior over raster-order codes [B, N]."""

    model_type: str = "gpt"
    _expected_type = "gpt"


@dataclass
class MaskGITConfig(PriorConfig):
    """Bidirectional masked-token prior; token id `vocab_size` is [MASK]."""

    model_type: str = "maskgit"
    label_smoothing: float = 0.1
    _expected_type = "maskgit"

    def __post_init__(self) -> None:
        super().__post_init__()
        if not 0.0 <= self.label_smoothing < 1.0:
            raise ValueError(f"label_smoothing must be in [0, 1), got {self.label_smoothing}")


@dataclass
class RQTransformerConfig(PriorConfig):
    """Spatial transformer over positions + depth transformer over the D codes of a position."""

    model_type: str = "rq_transformer"
    depth: int = 4
    depth_layers: int = 2
    _expected_type = "rq_transformer"

    def __post_init__(self) -> None:
        if not 1 <= self.depth <= 64:
            raise ValueError(f"depth must be in [1, 64], got {self.depth}")
        if self.depth_layers < 1:
            raise ValueError(f"depth_layers must be >= 1, got {self.depth_layers}")
        super().__post_init__()

    @property
    def code_depth(self) -> int:
        return self.depth


CONFIG_CLASSES: dict[str, type[PriorConfig]] = {
    "gpt": GPTConfig,
    "maskgit": MaskGITConfig,
    "rq_transformer": RQTransformerConfig,
}

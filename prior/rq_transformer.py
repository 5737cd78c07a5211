"""RQ-Transformer prior for residual-quantized codes [B, N, D].

Spatial transformer (causal over positions, cached like GPT): the input at position i is the
sum over depths of the embeddings of codes[:, i] (a separate table per depth), shifted so that
its output h_i summarises positions < i. Depth transformer (causal over D steps, per position):
step 0 = h_i, step d = h_i + embedding of code d-1 at depth d-1; output step d predicts code d.
"""

import torch
from einops import rearrange
from huggingface_hub import PyTorchModelHubMixin
from torch import Tensor, nn

from prior.blocks import (
    PriorMixin,
    Transformer,
    init_linear_and_embedding,
    transformer_flops,
    trunk_matmul_params,
)
from prior.conditioning import Condition, Conditioner
from prior.configs import RQTransformerConfig
from prior.kv_cache import cache_dtype, prefix_key_mask
from prior.rope import rope_table


class RQTransformer(nn.Module, PyTorchModelHubMixin, PriorMixin):
    """Spatial (positions) + depth (codes of one position) Llama trunks."""

    def __init__(self, config: RQTransformerConfig) -> None:
        super().__init__()
        if isinstance(config, dict):
            config = RQTransformerConfig(**config)
        if config.tie_embeddings:
            raise ValueError(
                "tie_embeddings is not supported by RQTransformer (per-depth input tables)"
            )
        self.config = config
        cfg = config
        self.conditioner = Conditioner(cfg)
        self.tok_embeddings = nn.Embedding(
            cfg.depth * cfg.vocab_size, cfg.dim
        )  # depth d: rows d*V ..
        self.register_buffer(
            "depth_offsets", torch.arange(cfg.depth) * cfg.vocab_size, persistent=False
        )
        self.dropout = nn.Dropout(cfg.dropout)
        cos, sin = rope_table(cfg.rope, cfg.head_dim, cfg.prefix_len, cfg.grid, cfg.rope_base)
        self.transformer = Transformer(
            cfg.dim,
            cfg.n_layers,
            cfg.n_heads,
            cfg.ffn_dim,
            cfg.norm_eps,
            cfg.dropout,
            cos,
            sin,
            cfg.gradient_checkpointing,
        )
        dcos, dsin = rope_table("1d", cfg.head_dim, 0, [1, cfg.depth], cfg.rope_base)
        self.depth_transformer = Transformer(
            cfg.dim,
            cfg.depth_layers,
            cfg.n_heads,
            cfg.ffn_dim,
            cfg.norm_eps,
            cfg.dropout,
            dcos,
            dsin,
            cfg.gradient_checkpointing,
        )
        self.output = nn.Linear(cfg.dim, cfg.vocab_size, bias=False)
        init_linear_and_embedding(self.tok_embeddings, cfg.init_std, cfg.n_layers)
        init_linear_and_embedding(self.transformer, cfg.init_std, cfg.n_layers)
        init_linear_and_embedding(self.depth_transformer, cfg.init_std, cfg.depth_layers)
        init_linear_and_embedding(self.output, cfg.init_std, cfg.n_layers)
        self._masked_prefix = cfg.cond == "text"

    def _embed(self, codes: Tensor) -> Tensor:
        """codes [..., d] (depths 0..d-1) -> per-depth embeddings [..., d, dim]."""
        return self.tok_embeddings(codes + self.depth_offsets[: codes.shape[-1]])

    def _check_codes(self, codes: Tensor) -> None:
        if codes.dim() != 3 or codes.shape[-1] != self.config.depth:
            raise ValueError(
                f"codes must be [B, N, D={self.config.depth}], got {tuple(codes.shape)}"
            )

    def forward(self, codes: Tensor, cond: Condition) -> Tensor:
        """codes Long [B, N, D] (N <= h*w) -> fp32 logits [B, N, D, V] (teacher forcing)."""
        self._check_codes(codes)
        b, n, _ = codes.shape
        if not 1 <= n <= self.config.seq_len:
            raise ValueError(f"codes length {n} must be in [1, {self.config.seq_len}]")
        self._check_condition(cond, b)
        p = self.config.prefix_len
        emb = self._embed(codes)  # [B, N, D, dim]
        summed = emb[:, :-1].sum(dim=2)  # [B, N-1, dim]
        x = self.dropout(
            torch.cat([cond.prefix.to(summed.dtype), summed], dim=1)
        )  # [B, P+N-1, dim]
        mask = None
        if self._masked_prefix:
            mask = prefix_key_mask(cond.mask, torch.arange(x.shape[1], device=x.device), x.shape[1])
        h = self.transformer(x, causal=True, mask=mask)[
            :, p - 1 :
        ]  # [B, N, dim]: context of position i
        steps = torch.cat([h[:, :, None], h[:, :, None] + emb[:, :, :-1]], dim=2)  # [B, N, D, dim]
        out = self.depth_transformer(rearrange(steps, "b n d c -> (b n) d c"), causal=True)
        logits = self.output(out).float()  # [B*N, D, V]
        return rearrange(logits, "(b n) d v -> b n d v", b=b)

    # ---- cached sampling -------------------------------------------------------------------

    def setup_caches(self, batch_size: int, max_len: int, dtype: torch.dtype | None = None) -> None:
        """Allocate the spatial KV caches for `max_len` positions (the prefix is added here)."""
        if not 1 <= max_len <= self.config.seq_len:
            raise ValueError(f"max_len {max_len} must be in [1, {self.config.seq_len}]")
        param = self.tok_embeddings.weight
        self.transformer.setup_caches(
            batch_size, self.config.prefix_len + max_len, dtype or cache_dtype(param), param.device
        )

    def prefill(self, cond: Condition) -> Tensor:
        """Write the condition into the cache; returns the context h [B, dim] of position 0."""
        if cond.length != self.config.prefix_len:
            raise ValueError(
                f"condition length {cond.length} != prefix_len {self.config.prefix_len}"
            )
        key_valid = cond.mask if self._masked_prefix else None
        h = self.transformer.prefill(cond.prefix.to(self.tok_embeddings.weight.dtype), key_valid)
        return h[:, -1]

    def decode(self, codes: Tensor, positions: Tensor) -> Tensor:
        """codes Long [B, T, D] at positions[b] + t -> h [B, T, dim], the context of position + t + 1."""
        self._check_codes(codes)
        x = self._embed(codes).sum(dim=2)  # [B, T, dim]
        return self.transformer.decode(x, positions.long() + self.config.prefix_len)

    def depth_logits(self, h: Tensor, prev: Tensor) -> Tensor:
        """Context h [B, dim] and codes prev Long [B, d] of depths < d -> fp32 logits [B, V] of depth d."""
        d = prev.shape[1]
        if not 0 <= d < self.config.depth:
            raise ValueError(f"prev has {d} depths; must be < depth {self.config.depth}")
        steps = h[:, None]  # [B, 1, dim]
        if d:
            steps = torch.cat([steps, h[:, None] + self._embed(prev)], dim=1)  # [B, d+1, dim]
        out = self.depth_transformer(steps.to(self.tok_embeddings.weight.dtype), causal=True)
        return self.output(out[:, -1]).float()

    # ---- accounting ------------------------------------------------------------------------

    def flops_per_token(self, training: bool = True) -> float:
        """Model FLOPs per position (its D codes): spatial step + D depth steps + D heads."""
        cfg = self.config
        spatial = transformer_flops(
            trunk_matmul_params(cfg.dim, cfg.n_layers, cfg.ffn_dim),
            cfg.n_layers,
            cfg.dim,
            cfg.prefix_len + cfg.seq_len,
            training,
        )
        depth_matmul = (
            trunk_matmul_params(cfg.dim, cfg.depth_layers, cfg.ffn_dim) + cfg.dim * cfg.vocab_size
        )
        depth = cfg.depth * transformer_flops(
            depth_matmul, cfg.depth_layers, cfg.dim, cfg.depth, training
        )
        return spatial + depth

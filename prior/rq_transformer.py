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
    CachedPriorMixin,
    build_trunk,
    init_linear_and_embedding,
    transformer_flops,
    trunk_matmul_params,
)
from prior.conditioning import Condition
from prior.configs import RQTransformerConfig
from prior.rope import rope_table
from training.serialization import SafetensorsConfigMixin


class RQTransformer(nn.Module, SafetensorsConfigMixin, PyTorchModelHubMixin, CachedPriorMixin):
    """Spatial (positions) + depth (codes of one position) Llama trunks."""

    _config_schema = RQTransformerConfig
    _hub_downloads = False

    def __init__(self, config: RQTransformerConfig) -> None:
        super().__init__()
        if isinstance(config, dict):
            config = RQTransformerConfig(**config)
        if config.tie_embeddings:
            raise ValueError(
                "tie_embeddings is not supported by RQTransformer (per-depth input tables)"
            )
        cfg = config
        self._init_prior(cfg, cfg.depth * cfg.vocab_size)  # depth d: rows d*V ..
        self.register_buffer(
            "depth_offsets", torch.arange(cfg.depth) * cfg.vocab_size, persistent=False
        )
        dcos, dsin = rope_table("1d", cfg.head_dim, 0, [1, cfg.depth], cfg.rope_base)
        self.depth_transformer = build_trunk(cfg, cfg.depth_layers, dcos, dsin)
        self.output = nn.Linear(cfg.dim, cfg.vocab_size, bias=False)
        init_linear_and_embedding(self.tok_embeddings, cfg.init_std, cfg.n_layers)
        init_linear_and_embedding(self.transformer, cfg.init_std, cfg.n_layers)
        init_linear_and_embedding(self.depth_transformer, cfg.init_std, cfg.depth_layers)
        init_linear_and_embedding(self.output, cfg.init_std, cfg.n_layers)

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
        x, mask = self._prefixed(cond, summed)  # [B, P+N-1, dim]
        h = self.transformer(x, causal=True, mask=mask)[
            :, p - 1 :
        ]  # [B, N, dim]: context of position i
        steps = torch.cat([h[:, :, None], h[:, :, None] + emb[:, :, :-1]], dim=2)  # [B, N, D, dim]
        out = self.depth_transformer(rearrange(steps, "b n d c -> (b n) d c"), causal=True)
        logits = self.output(out).float()  # [B*N, D, V]
        return rearrange(logits, "(b n) d v -> b n d v", b=b)

    # ---- cached sampling -------------------------------------------------------------------

    def prefill(self, cond: Condition) -> Tensor:
        """Write the condition into the cache; returns the context h [B, dim] of position 0."""
        return self._prefill_hidden(cond)[:, -1]

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

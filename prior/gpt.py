"""LlamaGen-style autoregressive prior: condition prefix, then image codes in raster order.

Sequence layout (slots): [prefix_0 .. prefix_{P-1}, code_0 .. code_{N-2}]; the output at slot
P - 1 + i predicts code i. Cached sampling: `setup_caches`, `prefill(cond)` (logits of code 0),
then `decode(tokens, positions)`; rows may sit at different positions and roll back freely.
"""

from huggingface_hub import PyTorchModelHubMixin
from torch import Tensor, nn

from prior.blocks import (
    CachedPriorMixin,
    init_linear_and_embedding,
    transformer_flops,
    trunk_matmul_params,
)
from prior.conditioning import Condition
from prior.configs import GPTConfig
from training.serialization import SafetensorsConfigMixin


class GPT(nn.Module, SafetensorsConfigMixin, PyTorchModelHubMixin, CachedPriorMixin):
    """Decoder-only Llama over codes [B, N] with a class / text / start-token prefix."""

    _config_schema = GPTConfig
    _hub_downloads = False

    def __init__(self, config: GPTConfig) -> None:
        super().__init__()
        if isinstance(config, dict):
            config = GPTConfig(**config)
        cfg = config
        self._init_prior(cfg, cfg.vocab_size)
        self.output = nn.Linear(cfg.dim, cfg.vocab_size, bias=False)
        for module in (self.tok_embeddings, self.transformer, self.output):
            init_linear_and_embedding(module, cfg.init_std, cfg.n_layers)
        if cfg.tie_embeddings:
            self.output.weight = self.tok_embeddings.weight

    def forward(self, codes: Tensor, cond: Condition) -> Tensor:
        """Teacher forcing: codes Long [B, N] (N <= h*w) -> fp32 logits [B, N, V]; logits[:, i] predicts codes[:, i]."""
        b, n = codes.shape
        if not 1 <= n <= self.config.seq_len:
            raise ValueError(f"codes length {n} must be in [1, {self.config.seq_len}]")
        self._check_condition(cond, b)
        p = self.config.prefix_len
        tokens = self.tok_embeddings(codes[:, :-1])  # [B, N-1, dim]
        x, mask = self._prefixed(cond, tokens)  # [B, P+N-1, dim]
        h = self.transformer(x, causal=True, mask=mask)
        return self.output(h[:, p - 1 :]).float()

    # ---- cached sampling -------------------------------------------------------------------

    def prefill(self, cond: Condition, rows: Tensor | None = None) -> Tensor:
        """Write the condition into the cache (all rows, or cache rows `rows` Long[B] only);
        fp32 logits [B, V] of image token 0."""
        return self.output(self._prefill_hidden(cond, rows)[:, -1]).float()

    def decode(self, tokens: Tensor, positions: Tensor) -> Tensor:
        """tokens Long [B, T] at image positions positions[b] + t -> fp32 logits [B, T, V].

        logits[:, t] predicts the token at position positions + t + 1.
        """
        x = self.tok_embeddings(tokens)  # [B, T, dim]
        h = self.transformer.decode(x, positions.long() + self.config.prefix_len)
        return self.output(h).float()

    def decode_tree(
        self, tokens: Tensor, position: Tensor, depths: Tensor, ancestors: Tensor
    ) -> Tensor:
        """A candidate tree tokens Long [B, T] whose root (node 0) sits at image position
        position[b] and node i at position[b] + depths[i] -> fp32 logits [B, T, V], each
        predicting the token after its node's path (see `Transformer.decode_tree`). The nodes'
        keys/values go to cache slots position + i; `move_positions` keeps the accepted path."""
        x = self.tok_embeddings(tokens)  # [B, T, dim]
        start = position.long() + self.config.prefix_len
        return self.output(self.transformer.decode_tree(x, start, depths, ancestors)).float()

    def move_positions(self, source: Tensor, target: Tensor) -> None:
        """Move cached entries of image positions source Long[B, D] to target Long[B, D]."""
        p = self.config.prefix_len
        self.transformer.move_slots(source + p, target + p)

    # ---- accounting ------------------------------------------------------------------------

    def flops_per_token(self, training: bool = True) -> float:
        """Model FLOPs per image token (6N + attention when training, 2N + attention otherwise)."""
        cfg = self.config
        matmul = trunk_matmul_params(cfg.dim, cfg.n_layers, cfg.ffn_dim) + cfg.dim * cfg.vocab_size
        return transformer_flops(
            matmul, cfg.n_layers, cfg.dim, cfg.prefix_len + cfg.seq_len, training
        )

"""MaskGIT prior: a bidirectional transformer predicting masked codes, and its mask schedule.

Token id `vocab_size` is [MASK]. Training masks exactly mask_count(N, r) positions with
r ~ U(0, 1) per sample; `cosine_schedule` and `mask_count` are shared with the sampler.
"""

import math

import torch
from huggingface_hub import PyTorchModelHubMixin
from torch import Tensor, nn

from prior.blocks import (
    PriorMixin,
    init_linear_and_embedding,
    transformer_flops,
    trunk_matmul_params,
)
from prior.conditioning import Condition
from prior.configs import MaskGITConfig
from training.serialization import SafetensorsConfigMixin


def cosine_schedule(r: Tensor | float) -> Tensor | float:
    """Mask ratio gamma(r) = cos(pi r / 2): 1 at r = 0 (all masked), 0 at r = 1."""
    if isinstance(r, Tensor):
        return torch.cos(math.pi * r / 2)
    return math.cos(math.pi * r / 2)


def mask_count(n: int, r: Tensor | float) -> Tensor | int:
    """Positions to mask: max(1, round(n * gamma(r))) (Long tensor for tensor r)."""
    if isinstance(r, Tensor):
        return torch.round(n * cosine_schedule(r)).long().clamp(1, n)
    return min(n, max(1, round(n * cosine_schedule(r))))


def random_mask(
    batch_size: int, n: int, device: torch.device | str, generator: torch.Generator | None = None
) -> Tensor:
    """Bool [B, N]: per row, exactly mask_count(N, r) random positions with r ~ U(0, 1)."""
    gen_device = generator.device if generator is not None else device
    r = torch.rand(batch_size, generator=generator, device=gen_device)
    scores = torch.rand(batch_size, n, generator=generator, device=gen_device)
    counts = mask_count(n, r)  # [B]
    ranks = scores.argsort(dim=1).argsort(dim=1)  # [B, N] rank of each position
    return (ranks < counts[:, None]).to(device)


class MaskGIT(nn.Module, SafetensorsConfigMixin, PyTorchModelHubMixin, PriorMixin):
    """Bidirectional Llama trunk over [prefix, codes with MASK] -> logits over the codebook."""

    _config_schema = MaskGITConfig
    _hub_downloads = False

    def __init__(self, config: MaskGITConfig) -> None:
        super().__init__()
        if isinstance(config, dict):
            config = MaskGITConfig(**config)
        cfg = config
        self._init_prior(cfg, cfg.vocab_size + 1)  # + [MASK]
        self.output = None if cfg.tie_embeddings else nn.Linear(cfg.dim, cfg.vocab_size, bias=False)
        for module in (self.tok_embeddings, self.transformer, self.output):
            if module is not None:
                init_linear_and_embedding(module, cfg.init_std, cfg.n_layers)

    @property
    def mask_token_id(self) -> int:
        return self.config.vocab_size

    def forward(self, codes: Tensor, cond: Condition) -> Tensor:
        """codes Long [B, N] (N = h*w, MASK = vocab_size) -> fp32 logits [B, N, V]."""
        b, n = codes.shape
        if n != self.config.seq_len:
            raise ValueError(f"codes length {n} != h*w = {self.config.seq_len}")
        self._check_condition(cond, b)
        tokens = self.tok_embeddings(codes)  # [B, N, dim]
        x, mask = self._prefixed(cond, tokens)  # [B, P+N, dim]
        h = self.transformer(x, causal=False, mask=mask)[:, self.config.prefix_len :]  # [B, N, dim]
        if self.output is None:
            return (h @ self.tok_embeddings.weight[: self.config.vocab_size].T).float()
        return self.output(h).float()

    def flops_per_token(self, training: bool = True) -> float:
        """Model FLOPs per image token (6N + attention when training, 2N + attention otherwise)."""
        cfg = self.config
        matmul = trunk_matmul_params(cfg.dim, cfg.n_layers, cfg.ffn_dim) + cfg.dim * cfg.vocab_size
        return transformer_flops(
            matmul, cfg.n_layers, cfg.dim, cfg.prefix_len + cfg.seq_len, training
        )

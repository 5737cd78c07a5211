"""Llama-style transformer trunk shared by every prior: RMSNorm, SwiGLU, RoPE, no biases.

`Transformer` works on slot-indexed sequences: slot s of a sequence gets row s of its rope table,
so a cached decode step only has to say at which slots its tokens sit.
"""

import math

import torch
from einops import rearrange
from torch import Tensor, nn
from torch.utils.checkpoint import checkpoint

from prior.attention import attention
from prior.conditioning import Condition, Conditioner
from prior.configs import PriorConfig
from prior.kv_cache import KVCache, cache_dtype, prefix_key_mask
from prior.rope import apply_rope, rope_table


class RMSNorm(nn.Module):
    """Llama RMSNorm (same arithmetic as HF `LlamaRMSNorm`: normalise in fp32, scale in input dtype)."""

    def __init__(self, dim: int, eps: float = 1e-5) -> None:
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: Tensor) -> Tensor:
        xf = x.float()
        xf = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * xf.to(x.dtype)


class SwiGLU(nn.Module):
    """w2(silu(w1 x) * w3 x); names follow Llama (w1 = gate, w3 = up, w2 = down)."""

    def __init__(self, dim: int, hidden: int) -> None:
        super().__init__()
        self.w1 = nn.Linear(dim, hidden, bias=False)
        self.w3 = nn.Linear(dim, hidden, bias=False)
        self.w2 = nn.Linear(hidden, dim, bias=False)
        self.fused_weight: Tensor | None = None  # [w1; w3], set by prior/fused_projections.py
        self.fusion = None  # its switch: the fused weight is used while fusion.on

    def forward(self, x: Tensor) -> Tensor:
        if self.fusion is None or not self.fusion.on:
            return self.w2(nn.functional.silu(self.w1(x)) * self.w3(x))
        gate, up = nn.functional.linear(x, self.fused_weight).chunk(2, dim=-1)
        return self.w2(nn.functional.silu(gate) * up)


class SelfAttention(nn.Module):
    """Multi-head self-attention with RoPE and an optional static KV cache."""

    def __init__(self, dim: int, n_heads: int) -> None:
        super().__init__()
        self.n_heads = n_heads
        self.head_dim = dim // n_heads
        self.wq = nn.Linear(dim, dim, bias=False)
        self.wk = nn.Linear(dim, dim, bias=False)
        self.wv = nn.Linear(dim, dim, bias=False)
        self.wo = nn.Linear(dim, dim, bias=False)
        self.kv_cache: KVCache | None = None
        self.fused_weight: Tensor | None = None  # [wq; wk; wv], set by prior/fused_projections.py
        self.fusion = None  # its switch: the fused weight is used while fusion.on

    def projections(self, x: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """x [b, l, dim] -> q, k, v [b, l, h, d]: one matmul when the fused weight is on."""
        if self.fusion is None or not self.fusion.on:
            return tuple(
                rearrange(w(x), "b l (h d) -> b l h d", h=self.n_heads)
                for w in (self.wq, self.wk, self.wv)
            )
        qkv = nn.functional.linear(x, self.fused_weight)
        return rearrange(qkv, "b l (three h d) -> three b l h d", three=3, h=self.n_heads).unbind(0)

    def forward(
        self,
        x: Tensor,
        cos: Tensor,
        sin: Tensor,
        causal: bool,
        mask: Tensor | None,
        cache_seqlens: Tensor | None,
        cache_rows: Tensor | None = None,
    ) -> Tensor:
        q, k, v = self.projections(x)
        q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        if cache_seqlens is None:
            out = attention(q, k, v, causal=causal, mask=mask)
        else:
            if self.kv_cache is None:
                raise ValueError("cached call before setup_caches()")
            out = attention(
                q,
                k,
                v,
                causal=causal,
                mask=mask,
                k_cache=self.kv_cache.k,
                v_cache=self.kv_cache.v,
                cache_seqlens=cache_seqlens,
                cache_rows=cache_rows,
            )
        return self.wo(rearrange(out, "b l h d -> b l (h d)"))


class Block(nn.Module):
    """Pre-norm Llama block: x + attn(norm(x)), then + ffn(norm(.))."""

    def __init__(
        self, dim: int, n_heads: int, ffn_dim: int, norm_eps: float, dropout: float
    ) -> None:
        super().__init__()
        self.attention_norm = RMSNorm(dim, norm_eps)
        self.attention = SelfAttention(dim, n_heads)
        self.ffn_norm = RMSNorm(dim, norm_eps)
        self.feed_forward = SwiGLU(dim, ffn_dim)
        self.dropout = nn.Dropout(dropout)

    def forward(
        self,
        x: Tensor,
        cos: Tensor,
        sin: Tensor,
        causal: bool,
        mask: Tensor | None,
        cache_seqlens: Tensor | None,
        cache_rows: Tensor | None = None,
    ) -> Tensor:
        attn = self.attention(
            self.attention_norm(x), cos, sin, causal, mask, cache_seqlens, cache_rows
        )
        x = x + self.dropout(attn)
        return x + self.dropout(self.feed_forward(self.ffn_norm(x)))


class Transformer(nn.Module):
    """Blocks + final norm over slot-indexed sequences; owns the rope table and the KV caches."""

    def __init__(
        self,
        dim: int,
        n_layers: int,
        n_heads: int,
        ffn_dim: int,
        norm_eps: float,
        dropout: float,
        rope_cos: Tensor,
        rope_sin: Tensor,
        gradient_checkpointing: bool = False,
    ) -> None:
        super().__init__()
        self.layers = nn.ModuleList(
            Block(dim, n_heads, ffn_dim, norm_eps, dropout) for _ in range(n_layers)
        )
        self.norm = RMSNorm(dim, norm_eps)
        self.gradient_checkpointing = gradient_checkpointing
        self.register_buffer("rope_cos", rope_cos, persistent=False)  # [slots, hd]
        self.register_buffer("rope_sin", rope_sin, persistent=False)
        self.register_buffer("cache_key_valid", None, persistent=False)  # [B, P] set by prefill
        self.cache_slots = 0

    @property
    def max_slots(self) -> int:
        return self.rope_cos.shape[0]

    def forward(self, x: Tensor, *, causal: bool, mask: Tensor | None = None) -> Tensor:
        """x [B, L, dim] at slots 0..L-1 -> [B, L, dim]; mask [B, 1, L, L] (True = attend)."""
        length = x.shape[1]
        if length > self.max_slots:
            raise ValueError(
                f"sequence of {length} slots exceeds the rope table ({self.max_slots})"
            )
        cos, sin = self.rope_cos[:length], self.rope_sin[:length]
        ckpt = self.gradient_checkpointing and self.training and torch.is_grad_enabled()
        for layer in self.layers:
            if ckpt:
                x = checkpoint(layer, x, cos, sin, causal, mask, None, use_reentrant=False)
            else:
                x = layer(x, cos, sin, causal, mask, None)
        return self.norm(x)

    def setup_caches(
        self,
        batch_size: int,
        max_slots: int,
        dtype: torch.dtype,
        device: torch.device,
        scratch: int = 0,
    ) -> None:
        """(Re)allocate one KVCache per layer for `max_slots` slots, plus `scratch` slots past
        them where a tree of candidate tokens is scored (`decode_tree`) before `move_slots`
        puts the accepted ones in place."""
        if max_slots > self.max_slots:
            raise ValueError(f"max_slots {max_slots} exceeds the rope table ({self.max_slots})")
        if scratch < 0:
            raise ValueError(f"scratch must be >= 0, got {scratch}")
        for layer in self.layers:
            attn = layer.attention
            attn.kv_cache = KVCache(
                batch_size, max_slots + scratch, attn.n_heads, attn.head_dim, dtype, device
            )
        self.cache_slots = max_slots + scratch
        self.cache_key_valid = None

    def prefill(self, x: Tensor, key_valid: Tensor | None, rows: Tensor | None = None) -> Tensor:
        """Write the prefix x [B, P, dim] at slots 0..P-1 (causal) -> [B, P, dim].

        key_valid Bool [B, P]: padded prefix keys to hide from every later query (None = all real).
        rows Long[B]: prefill only these rows of the cache (rows joining a running batch); the
        other rows keep their entries. None = the whole cache (B must be its batch).
        """
        if self.cache_slots == 0:
            raise ValueError("call setup_caches() before prefill()")
        b, p = x.shape[:2]
        cache_batch = self.layers[0].attention.kv_cache.batch_size
        if rows is None and b != cache_batch:
            raise ValueError(f"batch {b} != cache batch {cache_batch}")
        if rows is not None and (rows.shape != (b,) or bool((rows >= cache_batch).any())):
            raise ValueError(f"rows {rows.tolist()} must be {b} rows of the cache's {cache_batch}")
        mask = None
        if key_valid is not None:
            mask = prefix_key_mask(key_valid, torch.arange(p, device=x.device), self.cache_slots)
            if rows is None:
                self.cache_key_valid = key_valid
            else:
                if self.cache_key_valid is None:
                    self.cache_key_valid = torch.ones(
                        cache_batch, p, dtype=torch.bool, device=x.device
                    )
                self.cache_key_valid[rows] = key_valid
        elif rows is None:
            self.cache_key_valid = None
        start = torch.zeros(b, dtype=torch.long, device=x.device)
        return self.forward_cached(x, start, mask=mask, rows=rows)

    def decode(self, x: Tensor, start: Tensor) -> Tensor:
        """x [B, T, dim] at slots start[b] .. start[b] + T - 1 after a prefill -> [B, T, dim]."""
        if self.cache_slots == 0:
            raise ValueError("call setup_caches() and prefill() before decode()")
        mask = None
        if self.cache_key_valid is not None:
            slots = start[:, None] + torch.arange(x.shape[1], device=x.device)  # [B, T]
            mask = prefix_key_mask(self.cache_key_valid, slots, self.cache_slots)
        return self.forward_cached(x, start, mask=mask)

    def decode_tree(self, x: Tensor, start: Tensor, depths: Tensor, ancestors: Tensor) -> Tensor:
        """A tree of T tokens x [B, T, dim] (node 0 = the root, in slot start[b]; node i in
        slot start[b] + i, at sequence position start[b] + depths[i]) -> [B, T, dim].

        depths Long[T] (0 for the root), ancestors Bool[T, T]: [i, j] = node j is node i or on
        its path to the root (nodes are numbered parents first). Node i attends to the slots
        before the root and to its ancestors, so each node's output is that of the sequence
        ending in its path."""
        if self.cache_slots == 0:
            raise ValueError("call setup_caches() and prefill() before decode_tree()")
        t = x.shape[1]
        slots = torch.arange(self.cache_slots, device=x.device)  # [S]
        offset = slots[None, :] - start[:, None]  # [B, S] slot relative to the root
        in_tree = ancestors[:, offset.clamp(0, t - 1)]  # [T, B, S]
        visible = (offset < 0)[:, None, :] | (in_tree.transpose(0, 1) & (offset < t)[:, None])
        mask = visible[:, None]  # [B, 1, T, S]
        if self.cache_key_valid is not None:
            nodes = start[:, None] + torch.arange(t, device=x.device)  # [B, T]
            mask = mask & prefix_key_mask(self.cache_key_valid, nodes, self.cache_slots)
        rope = (start[:, None] + depths[None, :]).clamp(max=self.max_slots - 1)  # [B, T]
        return self.forward_cached(x, start, mask=mask, rope_slots=rope)

    def move_slots(self, source: Tensor, target: Tensor) -> None:
        """Copy cached keys/values of slots source Long[B, D] to slots target Long[B, D], row by
        row, in every layer (all sources are read before any target is written)."""
        rows = torch.arange(source.shape[0], device=source.device)[:, None]  # [B, 1]
        for layer in self.layers:
            cache = layer.attention.kv_cache
            for buffer in (cache.k, cache.v):
                buffer[rows, target] = buffer[rows, source]

    def forward_cached(
        self,
        x: Tensor,
        start: Tensor,
        *,
        mask: Tensor | None = None,
        rows: Tensor | None = None,
        rope_slots: Tensor | None = None,
    ) -> Tensor:
        """x [B, T, dim] for slots start[b] .. start[b] + T - 1 (causal) -> [B, T, dim].

        Writes the new keys/values into the caches (of cache rows `rows`, default 0..B-1);
        mask [B, 1, T, S] over cache slots. rope_slots Long[B, T]: the rope rows of the tokens
        when they are not their cache slots (a tree's nodes).
        """
        slots = start[:, None] + torch.arange(x.shape[1], device=x.device)  # [B, T]
        if rope_slots is not None:
            slots = rope_slots
        cos, sin = self.rope_cos[slots], self.rope_sin[slots]  # [B, T, hd]
        for layer in self.layers:
            x = layer(x, cos, sin, True, mask, start, rows)
        return self.norm(x)

    def cache_state(self) -> tuple:
        """What `setup_caches` and `prefill` made, to hand to `restore_cache_state` later: lets
        several decode engines (one per batch bucket) share one model, each with its caches."""
        caches = [layer.attention.kv_cache for layer in self.layers]
        return caches, self.cache_slots, self.cache_key_valid

    def restore_cache_state(self, state: tuple) -> None:
        caches, self.cache_slots, self.cache_key_valid = state
        for layer, cache in zip(self.layers, caches, strict=True):
            layer.attention.kv_cache = cache


def init_linear_and_embedding(module: nn.Module, std: float, n_layers: int) -> None:
    """N(0, std) weights; residual output projections (wo, w2) scaled by 1/sqrt(2 n_layers)."""
    for name, sub in module.named_modules():
        if isinstance(sub, nn.Linear):
            scale = 1.0 / math.sqrt(2 * n_layers) if name.endswith(("wo", "w2")) else 1.0
            nn.init.normal_(sub.weight, mean=0.0, std=std * scale)
            if sub.bias is not None:
                nn.init.zeros_(sub.bias)
        elif isinstance(sub, nn.Embedding):
            nn.init.normal_(sub.weight, mean=0.0, std=std)


def num_params(
    module: nn.Module, exclude_embeddings: bool = False, trainable_only: bool = False
) -> int:
    """Number of distinct parameters (tied weights once), optionally without embedding tables."""
    params = {id(p): p for p in module.parameters() if p.requires_grad or not trainable_only}
    if exclude_embeddings:
        for sub in module.modules():
            if isinstance(sub, nn.Embedding):
                params.pop(id(sub.weight), None)
    return sum(p.numel() for p in params.values())


def trunk_matmul_params(dim: int, n_layers: int, ffn_dim: int) -> int:
    """Weights used as matmuls per token in a trunk: 4 dim^2 attention + 3 dim ffn per layer."""
    return n_layers * (4 * dim * dim + 3 * dim * ffn_dim)


def transformer_flops(
    matmul_params: int, n_layers: int, dim: int, context: int, training: bool
) -> float:
    """FLOPs per token: 2N forward (6N with backward) + attention 4 L d ctx (12 L d ctx), PaLM style."""
    mult = 3 if training else 1
    return float(mult * (2 * matmul_params + 4 * n_layers * dim * context))


def build_trunk(cfg: PriorConfig, n_layers: int, cos: Tensor, sin: Tensor) -> Transformer:
    """A `Transformer` with the prior config's width, heads, norm, dropout and checkpointing."""
    return Transformer(
        cfg.dim,
        n_layers,
        cfg.n_heads,
        cfg.ffn_dim,
        cfg.norm_eps,
        cfg.dropout,
        cos,
        sin,
        cfg.gradient_checkpointing,
    )


class PriorMixin:
    """What every prior shares: conditioning entry points, parameter counts, checkpointing switch.

    Expects `self.config` (a PriorConfig), `self.conditioner` (a Conditioner) and trunks that are
    `Transformer` modules; `_init_prior` builds the conditioner and the shared layers.
    """

    def _init_prior(self, cfg: PriorConfig, num_embeddings: int) -> None:
        """Conditioner, token table [num_embeddings, dim], dropout and the main trunk (RoPE over
        prefix + grid), in this order (it fixes the RNG draws of the initial weights)."""
        self.config = cfg
        self.conditioner = Conditioner(cfg)
        self.tok_embeddings = nn.Embedding(num_embeddings, cfg.dim)
        self.dropout = nn.Dropout(cfg.dropout)
        cos, sin = rope_table(cfg.rope, cfg.head_dim, cfg.prefix_len, cfg.grid, cfg.rope_base)
        self.transformer = build_trunk(cfg, cfg.n_layers, cos, sin)
        self._masked_prefix = cfg.cond == "text"  # class / start prefixes have no padding

    def _prefixed(self, cond: Condition, tokens: Tensor) -> tuple[Tensor, Tensor | None]:
        """tokens [B, T, dim] -> (dropout([prefix, tokens]) [B, P+T, dim], key mask or None)."""
        x = self.dropout(torch.cat([cond.prefix.to(tokens.dtype), tokens], dim=1))
        mask = None
        if self._masked_prefix:
            mask = prefix_key_mask(cond.mask, torch.arange(x.shape[1], device=x.device), x.shape[1])
        return x, mask

    def condition(
        self,
        class_ids: Tensor | None = None,
        texts: list[str] | None = None,
        batch_size: int | None = None,
        drop: bool = False,
        generator: torch.Generator | None = None,
    ) -> Condition:
        """Build the prefix for class ids ("class"), texts ("text") or batch_size ("none").

        drop=True applies training-time condition dropout (rows -> null with p = cond_dropout).
        """
        return self.conditioner(
            class_ids=class_ids, texts=texts, batch_size=batch_size, drop=drop, generator=generator
        )

    def null_condition(self, batch_size: int) -> Condition:
        """Null class / learned null text / start token for `batch_size` rows (CFG's uncond half)."""
        return self.conditioner.null(batch_size)

    def num_params(self, exclude_embeddings: bool = False, trainable_only: bool = False) -> int:
        return num_params(
            self, exclude_embeddings=exclude_embeddings, trainable_only=trainable_only
        )

    def _check_condition(self, cond: Condition, batch_size: int) -> None:
        if cond.batch_size != batch_size:
            raise ValueError(f"condition batch {cond.batch_size} != codes batch {batch_size}")
        if cond.length != self.config.prefix_len:
            raise ValueError(
                f"condition length {cond.length} != prefix_len {self.config.prefix_len}"
            )


class CachedPriorMixin(PriorMixin):
    """KV-cached sampling over the main trunk, shared by the causal priors (GPT, RQTransformer)."""

    def setup_caches(
        self,
        batch_size: int,
        max_len: int,
        dtype: torch.dtype | None = None,
        *,
        scratch: int = 0,
    ) -> None:
        """Allocate static KV caches for `max_len` image positions (the prefix is added here)
        and `scratch` slots for the nodes of a candidate tree (`Transformer.decode_tree`)."""
        if not 1 <= max_len <= self.config.seq_len:
            raise ValueError(f"max_len {max_len} must be in [1, {self.config.seq_len}]")
        param = self.tok_embeddings.weight
        self._engine_owner = None  # new caches: no decode engine's any more
        self.transformer.setup_caches(
            batch_size, self.config.prefix_len + max_len, dtype or cache_dtype(param),
            param.device, scratch,
        )  # fmt: skip

    def cache_state(self) -> tuple:
        """The caches (and prefix mask) in use: see `Transformer.cache_state`."""
        return self.transformer.cache_state()

    def restore_cache_state(self, state: tuple) -> None:
        self.transformer.restore_cache_state(state)

    def _prefill_hidden(self, cond: Condition, rows: Tensor | None = None) -> Tensor:
        """Write the condition into the cache (rows `rows`, default all); trunk output [B, P, dim]."""
        if cond.length != self.config.prefix_len:
            raise ValueError(
                f"condition length {cond.length} != prefix_len {self.config.prefix_len}"
            )
        key_valid = cond.mask if self._masked_prefix else None
        prefix = cond.prefix.to(self.tok_embeddings.weight.dtype)
        return self.transformer.prefill(prefix, key_valid, rows)

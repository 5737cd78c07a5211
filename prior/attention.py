"""The one attention entry point: picks flash-attn, PyTorch SDPA or plain math.

Layout everywhere is flash-attn's [B, L, H, hd]. Causal masks are bottom-right aligned: query i
of Lq sees keys j <= i + (Lk - Lq), i.e. the queries are the last Lq positions of the keys. (SDPA's
`is_causal` is top-left aligned when Lq != Lk, so it is only used when Lq == Lk.)

Boolean masks: True = may attend; broadcastable to [B, H, Lq, Lk] and combined (AND) with the
causal mask. A query row that may attend to nothing yields NaN (the priors always let a token see
itself, so they never produce such rows).
"""

import math

import torch
import torch.nn.functional as F
from torch import Tensor

try:  # flash-attn only builds on CUDA machines; everything works without it
    from flash_attn import flash_attn_func, flash_attn_with_kvcache

    HAS_FLASH_ATTN = True
except Exception:  # ImportError, or a broken CUDA build raising at import time
    flash_attn_func = flash_attn_with_kvcache = None
    HAS_FLASH_ATTN = False

BACKENDS = ("auto", "flash", "sdpa", "math")
# how a compiled CPU decode call (<= 16 queries over a cache) attends: "fused" (`_fused_decode`)
# or "sdpa" (only for bench/decode_attention.py's side-by-side comparison)
CPU_COMPILED_DECODE = "fused"


def causal_mask(lq: int, lk: int, device: torch.device | None = None) -> Tensor:
    """Bottom-right aligned causal mask [Lq, Lk] (True = visible)."""
    i = torch.arange(lq, device=device)[:, None]
    j = torch.arange(lk, device=device)[None, :]
    return j <= i + (lk - lq)


def _flash_ok(q: Tensor, mask: Tensor | None, cache_dtype: torch.dtype | None) -> bool:
    return (
        HAS_FLASH_ATTN
        and mask is None
        and cache_dtype in (None, q.dtype)
        and q.is_cuda
        and q.dtype in (torch.float16, torch.bfloat16)
        and q.shape[-1] <= 256
    )


def _choose(
    backend: str, q: Tensor, mask: Tensor | None, cache_dtype: torch.dtype | None = None
) -> str:
    if backend not in BACKENDS:
        raise ValueError(f"attention backend must be one of {BACKENDS}, got {backend!r}")
    ok = _flash_ok(q, mask, cache_dtype)
    if backend == "flash" and not ok:
        raise ValueError(
            "backend='flash' needs the flash-attn package, CUDA fp16/bf16 tensors (cache of the same "
            "dtype), head_dim <= 256 and no mask"
        )
    if backend == "auto":
        return "flash" if ok else "sdpa"
    return backend


def _math(q: Tensor, k: Tensor, v: Tensor, mask: Tensor | None) -> Tensor:
    """Reference attention in fp32 on [B, H, L, hd] tensors."""
    scores = torch.einsum("bhqd,bhkd->bhqk", q.float(), k.float()) / math.sqrt(q.shape[-1])
    if mask is not None:
        scores = scores.masked_fill(~mask, float("-inf"))
    return torch.einsum("bhqk,bhkd->bhqd", scores.softmax(-1), v.float()).to(q.dtype)


def _fused_decode(q: Tensor, k: Tensor, v: Tensor, mask: Tensor) -> Tensor:
    """Attention of a few queries over a small cache, [B, H, L, hd] in, written as broadcast
    products and sums: inductor fuses it into a couple of loops, where SDPA's CPU kernel spends
    more setting up blocks than the arithmetic costs and bmm needs a contiguous copy of the
    cache (bench/decode_attention.py times it against SDPA)."""
    scale = 1.0 / math.sqrt(q.shape[-1])
    scores = (q.float()[:, :, :, None, :] * k.float()[:, :, None, :, :]).sum(-1) * scale
    weights = scores.masked_fill(~mask, float("-inf")).softmax(-1)  # [B, H, Lq, Lk]
    return (weights[..., None] * v.float()[:, :, None, :, :]).sum(-2).to(q.dtype)


def _dense(
    q: Tensor, k: Tensor, v: Tensor, causal: bool, mask: Tensor | None, backend: str
) -> Tensor:
    """SDPA / math over [B, L, H, hd] inputs with a bottom-right causal mask."""
    lq, lk = q.shape[1], k.shape[1]
    qt, kt, vt = (t.transpose(1, 2) for t in (q, k, v))  # [B, H, L, hd]
    if causal and mask is None and lq == lk and backend == "sdpa":
        out = F.scaled_dot_product_attention(qt, kt, vt, is_causal=True)
        return out.transpose(1, 2)
    full = causal_mask(lq, lk, q.device) if causal else None
    if mask is not None:
        full = mask if full is None else (mask & full)
    if backend == "math":
        out = _math(qt, kt, vt, full)
    else:
        out = F.scaled_dot_product_attention(qt, kt, vt, attn_mask=full)
    return out.transpose(1, 2)  # [B, Lq, H, hd]


def attention(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    *,
    causal: bool,
    mask: Tensor | None = None,
    k_cache: Tensor | None = None,
    v_cache: Tensor | None = None,
    cache_seqlens: Tensor | None = None,
    cache_rows: Tensor | None = None,
    backend: str = "auto",
) -> Tensor:
    """Scaled dot-product attention; returns [B, Lq, H, hd].

    Without a cache: q [B, Lq, H, hd], k/v [B, Lk, H, hd].

    With a cache (k_cache/v_cache [B, S, H, hd] preallocated, cache_seqlens Long/Int [B]): k/v are
    the T new entries [B, T, H, hd] of the T queries; row b writes them in place at slots
    cache_seqlens[b] .. cache_seqlens[b] + T - 1 and its queries attend to slots
    < cache_seqlens[b] + T (bottom-right causal among the new ones when `causal`). Slots beyond are
    ignored, so rolling back is just passing a smaller cache_seqlens. `mask` is then over cache
    slots, [B, 1, T, S]. cache_rows Long[B]: the cache rows the B queries use (default 0..B-1),
    so a few rows of a larger cache can be prefilled while the others keep their entries.
    """
    if k_cache is None:
        if v_cache is not None or cache_seqlens is not None:
            raise ValueError("v_cache/cache_seqlens given without k_cache")
        kind = _choose(backend, q, mask)
        if kind == "flash":
            return flash_attn_func(q, k, v, causal=causal)
        return _dense(q, k, v, causal, mask, kind)
    if v_cache is None or cache_seqlens is None:
        raise ValueError("k_cache needs v_cache and cache_seqlens")
    kind = _choose(backend, q, mask, cache_dtype=k_cache.dtype)
    if cache_rows is not None:
        return _rows_of_cache(q, k, v, k_cache, v_cache, cache_seqlens, cache_rows, causal, mask)
    if kind == "flash":
        return flash_attn_with_kvcache(
            q,
            k_cache,
            v_cache,
            k=k,
            v=v,
            cache_seqlens=cache_seqlens.to(torch.int32),
            causal=causal,
        )
    b, t = k.shape[:2]
    s = k_cache.shape[1]
    slots = cache_seqlens.long()[:, None] + torch.arange(t, device=k.device)  # [B, T]
    rows = torch.arange(b, device=k.device)[:, None]  # [B, 1]
    k_cache[rows, slots] = k.to(k_cache.dtype)
    v_cache[rows, slots] = v.to(v_cache.dtype)
    last = slots if causal else cache_seqlens.long()[:, None] + (t - 1)  # [B, T] or [B, 1]
    visible = torch.arange(s, device=k.device) <= last[..., None]  # [B, T|1, S]
    visible = visible[:, None]  # [B, 1, T|1, S]
    if mask is not None:
        visible = visible & mask
    qt, kt, vt = q.transpose(1, 2), k_cache.transpose(1, 2), v_cache.transpose(1, 2)
    fused = CPU_COMPILED_DECODE == "fused" and not q.is_cuda and t <= 16
    if kind == "sdpa" and fused and torch.compiler.is_compiling():
        out = _fused_decode(qt, kt.to(q.dtype), vt.to(q.dtype), visible)
    elif kind == "math":
        out = _math(qt, kt.to(q.dtype), vt.to(q.dtype), visible)
    else:
        out = F.scaled_dot_product_attention(qt, kt.to(q.dtype), vt.to(q.dtype), attn_mask=visible)
    return out.transpose(1, 2)


def _rows_of_cache(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    k_cache: Tensor,
    v_cache: Tensor,
    cache_seqlens: Tensor,
    cache_rows: Tensor,
    causal: bool,
    mask: Tensor | None,
) -> Tensor:
    """Cached attention for queries of cache rows `cache_rows` only (a prefill of joining rows):
    the rows' caches are gathered, updated and written back; other rows are untouched."""
    k_rows, v_rows = k_cache[cache_rows], v_cache[cache_rows]  # [B, S, H, hd] copies
    out = attention(q, k, v, causal=causal, mask=mask, k_cache=k_rows, v_cache=v_rows,
                    cache_seqlens=cache_seqlens, backend="sdpa")  # fmt: skip
    k_cache[cache_rows], v_cache[cache_rows] = k_rows, v_rows
    return out

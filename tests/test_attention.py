"""attention(): every path equals a naive softmax reference, incl. bottom-right causal and caches."""

import math

import pytest
import torch

from prior.attention import HAS_FLASH_ATTN, attention, causal_mask
from prior.kv_cache import KVCache, prefix_key_mask


def naive(q, k, v, causal, mask=None):
    """Loop-free reference on [B, L, H, hd]: causal = query i is key position i + Lk - Lq."""
    b, lq, h, d = q.shape
    lk = k.shape[1]
    scores = torch.einsum("bqhd,bkhd->bhqk", q.double(), k.double()) / math.sqrt(d)
    allowed = torch.ones(b, h, lq, lk, dtype=torch.bool)
    if causal:
        for i in range(lq):
            allowed[:, :, i, i + lk - lq + 1 :] = False
    if mask is not None:
        allowed = allowed & mask
    scores = scores.masked_fill(~allowed, float("-inf"))
    return torch.einsum("bhqk,bkhd->bqhd", scores.softmax(-1), v.double()).float()


def rand(*shape, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(*shape, generator=g)


def random_mask(b, lq, lk, seed=1):
    g = torch.Generator().manual_seed(seed)
    mask = torch.rand(b, 1, lq, lk, generator=g) > 0.4
    for i in range(lq):  # every query keeps the key at its own position (never an empty row)
        mask[..., i, i + lk - lq] = True
    return mask


@pytest.mark.parametrize("backend", ["auto", "sdpa", "math"])
@pytest.mark.parametrize("lq,lk", [(7, 7), (3, 7), (1, 5)])
@pytest.mark.parametrize("causal", [True, False])
@pytest.mark.parametrize("masked", [False, True])
def test_attention_matches_naive(backend, lq, lk, causal, masked):
    q, k, v = rand(2, lq, 2, 8, seed=0), rand(2, lk, 2, 8, seed=1), rand(2, lk, 2, 8, seed=2)
    mask = random_mask(2, lq, lk) if masked else None
    out = attention(q, k, v, causal=causal, mask=mask, backend=backend)
    assert out.shape == (2, lq, 2, 8)
    torch.testing.assert_close(out, naive(q, k, v, causal, mask), atol=1e-5, rtol=1e-5)


def test_causal_mask_is_bottom_right_aligned():
    m = causal_mask(2, 5)
    assert m.tolist() == [[True, True, True, True, False], [True, True, True, True, True]]
    assert torch.equal(causal_mask(4, 4), torch.ones(4, 4, dtype=torch.bool).tril())


@pytest.mark.parametrize("backend", ["sdpa", "math"])
def test_cache_path_per_row_lengths(backend):
    """Rows at different cache lengths: writes land at their slots, stale slots are ignored."""
    b, s, h, d, t = 2, 10, 2, 8, 3
    cache = KVCache(b, s, h, d, torch.float32)
    cache.k.copy_(rand(b, s, h, d, seed=5))  # stale garbage everywhere
    cache.v.copy_(rand(b, s, h, d, seed=6))
    q, k, v = rand(b, t, h, d, seed=7), rand(b, t, h, d, seed=8), rand(b, t, h, d, seed=9)
    seqlens = torch.tensor([2, 5])
    prior_k, prior_v = cache.k.clone(), cache.v.clone()
    out = attention(
        q,
        k,
        v,
        causal=True,
        k_cache=cache.k,
        v_cache=cache.v,
        cache_seqlens=seqlens,
        backend=backend,
    )
    for row, n in enumerate(seqlens.tolist()):
        torch.testing.assert_close(cache.k[row, n : n + t], k[row])
        keys = torch.cat([prior_k[row, :n], k[row]])[None]  # [1, n + t, H, hd]
        vals = torch.cat([prior_v[row, :n], v[row]])[None]
        torch.testing.assert_close(
            out[row : row + 1], naive(q[row : row + 1], keys, vals, True), atol=1e-5, rtol=1e-5
        )


@pytest.mark.parametrize("t", [1, 5, 17])
def test_compiled_cpu_decode_attention_is_the_fused_math(t, monkeypatch):
    """Under torch.compile on CPU, a cached call of <= 16 queries takes the fused broadcast form
    (SDPA's CPU kernel costs more than the arithmetic): same values, same cache writes, masks
    respected; 17 queries keep SDPA."""
    import prior.attention as attention_module

    fused = []
    real = attention_module._fused_decode
    monkeypatch.setattr(attention_module, "_fused_decode", lambda *a: fused.append(1) or real(*a))
    b, s, h, d = 3, 24, 2, 8
    seqlens = torch.tensor([0, 3, 7])
    mask = torch.rand(b, 1, t, s, generator=torch.Generator().manual_seed(1)) > 0.3
    mask[..., 0] = True  # every query sees a key
    q, k, v = rand(b, t, h, d, seed=1), rand(b, t, h, d, seed=2), rand(b, t, h, d, seed=3)

    def run(fn):
        cache = KVCache(b, s, h, d, torch.float32)
        cache.k.copy_(rand(b, s, h, d, seed=4))
        cache.v.copy_(rand(b, s, h, d, seed=5))
        out = fn(q, k, v, causal=True, mask=mask, k_cache=cache.k, v_cache=cache.v,
                 cache_seqlens=seqlens)  # fmt: skip
        return out, cache.k, cache.v

    eager = run(attention)
    assert not fused
    compiled = run(torch.compile(attention, backend="eager", dynamic=False))
    assert bool(fused) == (t <= 16)
    for a, c in zip(eager, compiled, strict=True):
        torch.testing.assert_close(c, a, atol=1e-5, rtol=1e-5)
    torch._dynamo.reset()
    fused.clear()  # bench/decode_attention.py's switch back to SDPA
    monkeypatch.setattr(attention_module, "CPU_COMPILED_DECODE", "sdpa")
    run(torch.compile(attention, backend="eager", dynamic=False))
    assert not fused
    torch._dynamo.reset()


def test_cache_path_with_prefix_mask():
    """A padded prefix key is hidden from all queries except itself."""
    b, s, h, d = 1, 6, 1, 4
    cache = KVCache(b, s, h, d, torch.float32)
    key_valid = torch.tensor([[False, True]])  # slot 0 is padding
    x = rand(b, 4, h, d, seed=3)
    mask = prefix_key_mask(key_valid, torch.arange(4), s)
    out = attention(
        x,
        x,
        x,
        causal=True,
        mask=mask,
        k_cache=cache.k,
        v_cache=cache.v,
        cache_seqlens=torch.tensor([0]),
    )
    ref_mask = torch.tensor(
        [
            [True, False, False, False],
            [False, True, False, False],
            [False, True, True, False],
            [False, True, True, True],
        ]
    )
    torch.testing.assert_close(
        out, naive(x, x, x, False, ref_mask[None, None]), atol=1e-5, rtol=1e-5
    )


def test_bad_arguments():
    q = rand(1, 2, 1, 4)
    with pytest.raises(ValueError, match="backend"):
        attention(q, q, q, causal=True, backend="cuda")
    with pytest.raises(ValueError, match="k_cache"):
        attention(q, q, q, causal=True, cache_seqlens=torch.tensor([0]))
    if not HAS_FLASH_ATTN:
        with pytest.raises(ValueError, match="flash"):
            attention(q, q, q, causal=True, backend="flash")

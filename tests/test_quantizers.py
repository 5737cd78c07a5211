"""Quantizers of stage 1: estimators, VQ/RQ/FSQ invariants, codebook statistics, fp32, config."""

from __future__ import annotations

import dataclasses

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn.functional as F
from einops import rearrange
from safetensors.torch import load_file, save_file

from tokenizer.quantizers import QuantizerConfig, build_quantizer
from tokenizer.quantizers.fsq import FSQuantizer
from tokenizer.quantizers.rotation import rotation_matrix, rotation_trick, straight_through
from tokenizer.quantizers.vq import kmeans, nearest_code


@pytest.fixture(autouse=True)
def _seed() -> None:
    torch.manual_seed(0)


def grid_latents(x: torch.Tensor, h: int = 4) -> torch.Tensor:
    """Rows [M,C] -> latents [M/(h*h), C, h, h] (row order = raster order)."""
    return rearrange(x, "(b h w) c -> b c h w", h=h, w=h)


def flat(z: torch.Tensor) -> torch.Tensor:
    return rearrange(z, "b c h w -> (b h w) c")


# ---------------------------------------------------------------- rotation trick / STE


def test_rotation_forward_is_codeword_exactly() -> None:
    e = torch.randn(64, 8)
    q = torch.randn(64, 8)
    e[0] = 0.0  # |e| = 0: guarded
    e[1] = -2.0 * q[1]  # ê = -q̂: guarded
    out = rotation_trick(e.requires_grad_(), q)
    assert torch.equal(out, q)
    assert torch.equal(straight_through(e, q), q)
    assert torch.isfinite(torch.autograd.grad(out.sum(), e)[0]).all()


def test_rotation_matrix_is_proper_rotation_and_is_the_jacobian() -> None:
    e, q = torch.randn(6, dtype=torch.float64), torch.randn(6, dtype=torch.float64)
    r = rotation_matrix(e, q)
    assert torch.allclose(r @ r.T, torch.eye(6, dtype=torch.float64), atol=1e-12)
    assert torch.allclose(torch.linalg.det(r), torch.tensor(1.0, dtype=torch.float64), atol=1e-12)
    assert torch.allclose(r @ (e / e.norm()), q / q.norm(), atol=1e-12)
    jac = torch.autograd.functional.jacobian(lambda x: rotation_trick(x, q), e)
    assert torch.allclose(jac, (q.norm() / e.norm()) * r, atol=1e-12)  # backward is lambda R


def test_rotation_preserves_gradient_angle() -> None:
    e = torch.randn(32, 8, dtype=torch.float64, requires_grad=True)
    q = torch.randn(32, 8, dtype=torch.float64)
    g = torch.randn(32, 8, dtype=torch.float64)  # incoming gradient dL/dq
    (grad_e,) = torch.autograd.grad((rotation_trick(e, q) * g).sum(), e)
    cos_in = F.cosine_similarity(g, q, dim=-1)  # angle(dL/dq, q)
    cos_out = F.cosine_similarity(grad_e, e.detach(), dim=-1)  # angle(dL/de, e)
    assert torch.allclose(cos_in, cos_out, atol=1e-10)
    ratio = grad_e.norm(dim=-1) / g.norm(dim=-1)
    assert torch.allclose(ratio, q.norm(dim=-1) / e.detach().norm(dim=-1), atol=1e-10)


def test_ste_vs_rotation_gradients() -> None:
    e = torch.randn(16, 4, dtype=torch.float64, requires_grad=True)
    q = torch.randn(16, 4, dtype=torch.float64)
    g = torch.randn(16, 4, dtype=torch.float64)
    (ste,) = torch.autograd.grad((straight_through(e, q) * g).sum(), e)
    (rot,) = torch.autograd.grad((rotation_trick(e, q) * g).sum(), e)
    assert torch.equal(ste, g)  # STE copies the gradient
    lam = q.norm(dim=-1) / e.detach().norm(dim=-1)
    expected = torch.stack(
        [lam[i] * rotation_matrix(e[i].detach(), q[i]).T @ g[i] for i in range(16)]
    )
    assert torch.allclose(rot, expected, atol=1e-10)
    assert not torch.allclose(rot, ste, atol=1e-3)
    # same direction and length: R = I, lambda = 1, both estimators agree
    (same,) = torch.autograd.grad((rotation_trick(e, e.detach()) * g).sum(), e)
    assert torch.allclose(same, g, atol=1e-10)
    # guarded rows fall back to STE
    bad = torch.stack([torch.zeros(4), -q[0] * 3, q[1] * 1e-9]).double().requires_grad_()
    codes = torch.stack([q[0], q[0], q[1]])
    (guard,) = torch.autograd.grad((rotation_trick(bad, codes) * g[:3]).sum(), bad)
    assert torch.equal(guard, g[:3])


@pytest.mark.parametrize("estimator", ["ste", "rotation"])
def test_vq_routes_decoder_gradient_through_estimator(estimator: str) -> None:
    cfg = QuantizerConfig(kind="vq", codebook_size=8, estimator=estimator)
    vq = build_quantizer(cfg, 4)
    z = torch.randn(2, 4, 2, 2, requires_grad=True)
    out = vq(z)
    g = torch.randn_like(out.quantized)
    (grad,) = torch.autograd.grad((out.quantized * g).sum(), z)
    e, q, gf = flat(z.detach()), flat(out.quantized.detach()), flat(g)
    if estimator == "ste":
        assert torch.equal(flat(grad), gf)
    else:
        lam = q.norm(dim=-1) / e.norm(dim=-1)
        rows = [lam[i] * rotation_matrix(e[i], q[i]).T @ gf[i] for i in range(len(e))]
        assert torch.allclose(flat(grad), torch.stack(rows), atol=1e-5)


# ---------------------------------------------------------------- losses


def test_loss_puts_beta_on_commitment() -> None:
    vq = build_quantizer(QuantizerConfig(kind="vq", codebook_size=8, beta=0.25), 4)
    z = torch.randn(2, 4, 2, 2, requires_grad=True)
    out = vq(z)
    out.loss.backward()
    e, idx = flat(z.detach()), out.codes.flatten()  # raster order on both sides
    q = vq.embedding.weight.detach()[idx]
    n = e.numel()
    assert torch.allclose(out.loss, 1.25 * F.mse_loss(e, q))
    assert torch.allclose(flat(z.grad), 0.25 * 2 * (e - q) / n, atol=1e-7)  # encoder: beta
    codebook_grad = torch.zeros(8, 4).index_add_(0, idx, 2 * (q - e) / n)  # codebook: 1
    assert torch.allclose(vq.embedding.weight.grad, codebook_grad, atol=1e-7)


def test_ema_codebook_has_no_codebook_loss() -> None:
    vq = build_quantizer(QuantizerConfig(kind="vq", codebook_size=8, ema=True), 4)
    z = torch.randn(2, 4, 2, 2, requires_grad=True)
    out = vq(z)
    assert not vq.embedding.weight.requires_grad
    assert torch.allclose(out.loss, 0.25 * out.metrics["commit_loss"])
    out.loss.backward()
    assert z.grad is not None and vq.embedding.weight.grad is None


# ---------------------------------------------------------------- search, k-means, EMA


@pytest.mark.parametrize("cosine", [False, True])
def test_chunked_distances_equal_full(cosine: bool) -> None:
    x, book = torch.randn(208, 8), torch.randn(300, 8)
    if cosine:
        x, book = F.normalize(x, dim=-1), F.normalize(book, dim=-1)
    full = nearest_code(x, book, cosine=cosine, chunk_size=0)
    brute = (x @ book.T).argmax(1) if cosine else torch.cdist(x, book).argmin(1)
    assert torch.equal(full, brute)
    for chunk in (1, 7, 64, 199, 1000):
        assert torch.equal(nearest_code(x, book, cosine=cosine, chunk_size=chunk), full)
    # the same through the quantizer
    outs = []
    for chunk in (0, 13):
        torch.manual_seed(1)
        cfg = QuantizerConfig(kind="vq", codebook_size=300, l2_normalize=cosine, chunk_size=chunk)
        outs.append(build_quantizer(cfg, 8).eval()(grid_latents(x)))
    assert torch.equal(outs[0].codes, outs[1].codes)
    assert torch.equal(outs[0].quantized, outs[1].quantized)


def clustered(n: int, centers: torch.Tensor, noise: float = 0.05) -> torch.Tensor:
    return centers[torch.randint(len(centers), (n,))] + noise * torch.randn(n, centers.shape[1])


def test_kmeans_init_lowers_error_vs_random() -> None:
    data = clustered(512, 3 * torch.randn(16, 8))
    errors = {}
    for init in (False, True):
        torch.manual_seed(1)
        vq = build_quantizer(QuantizerConfig(kind="vq", codebook_size=16, kmeans_init=init), 8)
        assert bool(vq.embedding.initted) != init
        vq(grid_latents(data))  # training step: k-means runs here
        assert bool(vq.embedding.initted)
        errors[init] = vq.eval()(grid_latents(data)).metrics["commit_loss"].item()
    assert errors[True] < 0.5 * errors[False]
    # kmeans itself: monotone in iterations, centroids are cluster means
    torch.manual_seed(2)
    one = kmeans(data, 16, 1, cosine=False, chunk_size=0)
    torch.manual_seed(2)
    ten = kmeans(data, 16, 10, cosine=False, chunk_size=64)
    err = lambda c: (data - c[nearest_code(data, c, cosine=False, chunk_size=0)]).square().mean()  # noqa: E731
    assert err(ten) <= err(one)


def test_ema_update_formula_and_moves_toward_data() -> None:
    cfg = QuantizerConfig(kind="vq", codebook_size=4, ema=True, ema_decay=0.9, ema_eps=1e-5)
    vq = build_quantizer(cfg, 2)
    book = vq.embedding
    w0 = book.weight.detach().clone()
    x = clustered(64, 2 * w0 + 1.0, noise=0.1)  # data away from the codes
    out = vq(grid_latents(x))
    idx = out.codes.flatten()
    counts = torch.bincount(idx, minlength=4).float()
    sums = torch.zeros(4, 2).index_add_(0, idx, x)
    size = 0.9 * torch.ones(4) + 0.1 * counts  # fresh codes start at count 1
    total = size.sum()
    smoothed = (size + 1e-5) / (total + 4e-5) * total
    expected = (0.9 * w0 + 0.1 * sums) / smoothed[:, None]
    assert torch.allclose(book.weight, expected, atol=1e-5)
    assert torch.allclose(book.cluster_size, size)
    # repeated steps: each used code approaches the mean of the vectors it receives
    used = counts > 0
    means = sums[used] / counts[used][:, None]
    before = (w0[used] - means).norm(dim=-1)
    for _ in range(30):
        vq(grid_latents(x))
    after = (book.weight.detach()[used] - means).norm(dim=-1)
    assert (after < 0.2 * before).all()


@pytest.mark.parametrize(("ema", "estimator"), [(False, "ste"), (True, "ste"), (False, "rotation")])
def test_dead_codes_restart_from_batch_vectors(ema: bool, estimator: str) -> None:
    cfg = QuantizerConfig(
        kind="vq", codebook_size=16, ema=ema, estimator=estimator, ema_decay=0.5,
        dead_code_threshold=0.4, usage_window=1,
    )  # fmt: skip
    vq = build_quantizer(cfg, 4)
    book = vq.embedding
    with torch.no_grad():
        book.weight[8:] = 100.0  # unreachable: dead
        if ema:
            book.embed_sum[8:] = 100.0 * book.cluster_size[8:, None]
    batches = [torch.randn(256, 4) for _ in range(4)]
    m1 = vq(grid_latents(batches[0])).metrics  # counts of dead codes 1 -> 0.5
    assert m1["restarted"] == 0 and m1["usage"] <= 0.5
    m2 = vq(grid_latents(batches[1])).metrics  # 0.25 < 0.4: restarted from this batch
    assert m2["restarted"] == 8
    on_batch = (book.weight.detach()[8:, None] == batches[1][None]).all(-1).any(-1)
    assert on_batch.all()  # each restarted code is exactly one of the batch vectors
    assert (book.cluster_size[8:] == 1.0).all()
    m3 = vq(grid_latents(batches[2])).metrics
    assert m3["usage"] > m1["usage"] and m3["batch_usage"] > 0.5


def test_usage_is_tracked_over_steps() -> None:
    vq = build_quantizer(QuantizerConfig(kind="vq", codebook_size=16, usage_window=3), 4)
    book = vq.embedding.weight.detach()
    for k in range(6):  # step k uses only code k
        vq(grid_latents(book[k].expand(16, 4).clone()))
        expect = min(k + 1, 3) / 16
        assert vq.embedding.usage.fraction().item() == pytest.approx(expect)
    out = vq(grid_latents(book[:16].clone()))
    assert out.metrics["batch_usage"] == 1.0 and out.metrics["perplexity"] == pytest.approx(16.0)


# ---------------------------------------------------------------- RQ


@pytest.mark.parametrize("shared", [False, True])
def test_rq_error_falls_with_depth(shared: bool) -> None:
    cfg = QuantizerConfig(
        kind="rq", codebook_size=16, depth=4, shared_codebook=shared, kmeans_init=True
    )
    rq = build_quantizer(cfg, 8)
    data = grid_latents(torch.randn(512, 8))
    for _ in range(30 if shared else 1):  # step 1 runs k-means; a shared book needs some training
        rq.zero_grad()
        rq(data).loss.backward()
        with torch.no_grad():  # plain SGD on the codebooks
            for book in rq.books:
                book.weight -= 20.0 * book.weight.grad
    out = rq.eval()(data)
    errors = [out.metrics[f"error_d{d}"].item() for d in range(4)]
    assert all(a > b for a, b in zip(errors, errors[1:])), errors
    assert out.codes.shape == (32, 4, 4, 4) and out.codes.dtype == torch.long
    # partial sums of embed reproduce the per-depth errors
    e = flat(data)
    for d in range(4):
        partial = sum(rq.book(i).lookup(out.codes[..., i].flatten()) for i in range(d + 1))
        assert F.mse_loss(e, partial).item() == pytest.approx(errors[d], rel=1e-5)


def test_rq_searches_detached_residuals_and_sums_straight_through() -> None:
    cfg = QuantizerConfig(kind="rq", codebook_size=8, depth=3, shared_codebook=False, beta=0.5)
    rq = build_quantizer(cfg, 4)
    z = torch.randn(2, 4, 2, 2, requires_grad=True)
    out = rq(z)
    g = torch.randn_like(out.quantized)
    (grad_z,) = torch.autograd.grad((out.quantized * g).sum(), z, retain_graph=True)
    assert torch.equal(grad_z, g)  # straight-through on the sum
    e, qs = flat(z.detach()), [rq.book(d).vectors()[out.codes[..., d].flatten()] for d in range(3)]
    residual = e.clone()
    for d in range(3):  # greedy: code d is the nearest to the residual left by depths < d
        assert torch.equal(
            nearest_code(residual, rq.book(d).vectors(), cosine=False, chunk_size=0),
            out.codes[..., d].flatten(),
        )
        residual = residual - qs[d]
    commit = sum(F.mse_loss(e, sum(qs[: d + 1])) for d in range(3)) / 3
    codebook = sum(F.mse_loss(qs[d], e - sum(qs[:d], torch.zeros_like(e))) for d in range(3)) / 3
    assert out.loss.item() == pytest.approx((0.5 * commit + codebook).item(), rel=1e-5)
    (grad_z,) = torch.autograd.grad(out.loss, z)
    expected = 0.5 * sum(2 * (e - sum(qs[: d + 1])) / e.numel() for d in range(3)) / 3
    assert torch.allclose(flat(grad_z), expected, atol=1e-7)


# ---------------------------------------------------------------- FSQ


def test_fsq_indices_are_a_bijection_and_embed_round_trips() -> None:
    fsq = build_quantizer(QuantizerConfig(kind="fsq", levels=[8, 5, 5, 3]), 4)
    assert isinstance(fsq, FSQuantizer) and fsq.codebook_size == 600 and fsq.depth == 1
    k = torch.arange(600)
    assert torch.equal(fsq.index_of(fsq.digits_of(k)), k)
    grid = fsq.codebook()  # [K,d]
    assert grid.shape == (600, 4) and len(torch.unique(grid, dim=0)) == 600
    assert grid.min() == -1.0 and grid.max() <= 1.0
    # latents that bound exactly onto every grid point quantize to codes 0..K-1
    half_l = (fsq.levels - 1) * (1 + 1e-3) / 2
    offset = torch.where(fsq.levels % 2 == 0, 0.5, 0.0)
    rounded = grid * (fsq.levels // 2)
    pre = torch.atanh((rounded + offset) / half_l) - torch.atanh(offset / half_l)
    out = fsq(rearrange(pre, "(b h w) c -> b c h w", h=10, w=6))
    assert torch.equal(out.codes.flatten(), k)
    assert torch.equal(flat(out.quantized), grid)
    assert torch.equal(fsq.embed(out.codes), out.quantized)
    # arbitrary latents give in-range codes; the gradient is straight-through the rounding
    z = (torch.randn(64, 4, 8, 8) * 3).requires_grad_()
    big = fsq(z)
    assert big.codes.min() >= 0 and big.codes.max() < 600 and big.loss.item() == 0.0
    (grad,) = torch.autograd.grad(big.quantized.sum(), z)
    z0 = flat(z.detach()).requires_grad_()
    (expected,) = torch.autograd.grad((fsq.bound(z0) / (fsq.levels // 2)).sum(), z0)
    assert torch.allclose(flat(grad), expected)


def test_fsq_bound_keeps_zero_and_levels() -> None:
    fsq = build_quantizer(QuantizerConfig(kind="fsq", levels=[2, 3, 4, 8]), 4)
    assert torch.equal(fsq.bound(torch.zeros(4)).abs(), torch.zeros(4))
    extreme = fsq.bound(torch.tensor([[-50.0] * 4, [50.0] * 4])).round()
    assert torch.equal(extreme, torch.tensor([[-1.0, -1, -2, -4], [0.0, 1, 1, 3]]))


# ---------------------------------------------------------------- round trips


ROUND_TRIP = {
    "vq": QuantizerConfig(kind="vq", codebook_size=32),
    "vq_l2": QuantizerConfig(kind="vq", codebook_size=32, l2_normalize=True),
    "vq_l2_factorized": QuantizerConfig(
        kind="vq", codebook_size=32, codebook_dim=4, l2_normalize=True
    ),
    "vq_rotation_ema": QuantizerConfig(kind="vq", codebook_size=32, estimator="rotation", ema=True),
    "rq_shared": QuantizerConfig(kind="rq", codebook_size=32, depth=3),
    "rq_factorized": QuantizerConfig(
        kind="rq", codebook_size=32, depth=3, codebook_dim=4, shared_codebook=False
    ),
    "fsq": QuantizerConfig(kind="fsq", levels=[5, 4, 3]),
    "fsq_projected": QuantizerConfig(kind="fsq", levels=[5, 4, 3], codebook_dim=3),
}


@pytest.mark.parametrize("name", list(ROUND_TRIP))
def test_codes_embed_codes(name: str) -> None:
    cfg = ROUND_TRIP[name]
    latent = 3 if name == "fsq" else 16
    q = build_quantizer(cfg, latent)
    q(torch.randn(4, latent, 4, 4))  # one training step (EMA / usage buffers move)
    q.eval()
    out = q(torch.randn(4, latent, 4, 4))
    emb = q.embed(out.codes)
    assert emb.shape == out.quantized.shape and emb.dtype == torch.float32
    assert torch.equal(emb, out.quantized)  # embed(codes) is forward's output, bit for bit
    # codes -> lookup-space vectors -> nearest codes is the identity
    if cfg.kind == "fsq":
        back = nearest_code(
            q.codebook()[out.codes.flatten()], q.codebook(), cosine=False, chunk_size=0
        )
        assert torch.equal(back, out.codes.flatten())
    else:
        for d in range(q.depth):
            codes = out.codes.flatten() if cfg.kind == "vq" else out.codes[..., d].flatten()
            vectors = q.codebook(d) if cfg.kind == "rq" else q.codebook()
            assert vectors.shape == (32, cfg.codebook_dim or 16)
            back = nearest_code(vectors[codes], vectors, cosine=cfg.l2_normalize, chunk_size=5)
            assert torch.equal(back, codes)
    if cfg.kind == "vq" and cfg.codebook_dim is None:  # no projection: quantizing embed is exact
        assert torch.equal(q(emb).codes, out.codes)


# ---------------------------------------------------------------- precision, config, state


@pytest.mark.parametrize(
    "name", ["vq_l2_factorized", "vq_rotation_ema", "rq_factorized", "fsq_projected"]
)
def test_fp32_under_bf16_autocast(name: str) -> None:
    q = build_quantizer(ROUND_TRIP[name], 16).eval()
    z = torch.randn(2, 16, 4, 4)
    ref = q(z)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = q(z.bfloat16())
        emb = q.embed(out.codes)
    assert out.quantized.dtype == torch.float32 and emb.dtype == torch.float32
    assert out.loss.dtype == torch.float32
    assert all(v.dtype == torch.float32 for v in out.metrics.values())
    assert torch.equal(q(z.bfloat16().float()).codes, out.codes)  # only the input was rounded
    assert ref.codes.shape == out.codes.shape


@pytest.mark.parametrize(
    ("field", "value"),
    [
        ("kind", "lfq"),
        ("estimator", "gumbel"),
        ("codebook_size", 1),
        ("codebook_dim", 0),
        ("beta", -0.1),
        ("ema_decay", 1.0),
        ("ema_eps", 0.0),
        ("kmeans_iters", 0),
        ("dead_code_threshold", -1.0),
        ("usage_window", 0),
        ("chunk_size", -1),
        ("depth", 2),  # vq
    ],
)
def test_bad_config_names_the_field(field: str, value: object) -> None:
    with pytest.raises(ValueError, match=field):
        QuantizerConfig(**{field: value})


@pytest.mark.parametrize(
    ("kwargs", "field"),
    [
        ({"kind": "fsq", "levels": [8, 1]}, "levels"),
        ({"kind": "fsq", "levels": []}, "levels"),
        ({"kind": "fsq", "codebook_dim": 3}, "codebook_dim"),
        ({"kind": "fsq", "ema": True}, "ema"),
        ({"kind": "fsq", "estimator": "rotation"}, "estimator"),
        ({"kind": "fsq", "dead_code_threshold": 1.0}, "dead_code_threshold"),
        ({"kind": "rq", "l2_normalize": True}, "l2_normalize"),
        ({"kind": "rq", "depth": 0}, "depth"),
    ],
)
def test_bad_kind_combinations(kwargs: dict, field: str) -> None:
    with pytest.raises(ValueError, match=field):
        QuantizerConfig(**kwargs)


def test_bad_inputs_raise() -> None:
    vq = build_quantizer(QuantizerConfig(kind="vq", codebook_size=8), 4)
    with pytest.raises(ValueError, match="latents"):
        vq(torch.randn(2, 5, 2, 2))
    with pytest.raises(ValueError, match="codes"):
        vq.embed(torch.zeros(2, 2, 2, 1, dtype=torch.long))
    with pytest.raises(ValueError, match="integer"):
        vq.embed(torch.zeros(2, 2, 2))
    rq = build_quantizer(QuantizerConfig(kind="rq", codebook_size=8, depth=2), 4)
    with pytest.raises(ValueError, match=r"\[B,h,w,2\]"):
        rq.embed(torch.zeros(2, 2, 2, dtype=torch.long))
    with pytest.raises(ValueError, match="latent_dim"):
        build_quantizer(QuantizerConfig(), 0)


def test_config_is_omegaconf_structured() -> None:
    from omegaconf import OmegaConf

    merged = OmegaConf.merge(
        OmegaConf.structured(QuantizerConfig), {"kind": "fsq", "levels": [4, 4]}
    )
    cfg = OmegaConf.to_object(merged)
    assert isinstance(cfg, QuantizerConfig) and cfg.num_codes == 16


@pytest.mark.parametrize("name", ["vq_rotation_ema", "rq_factorized", "fsq"])
def test_state_round_trips_through_safetensors(name: str, tmp_path) -> None:
    cfg = ROUND_TRIP[name]
    if cfg.kind != "fsq":
        cfg = dataclasses.replace(cfg, kmeans_init=True)
    latent = 3 if name == "fsq" else 16
    q = build_quantizer(cfg, latent)
    for _ in range(3):
        q(torch.randn(4, latent, 4, 4))
    save_file(q.state_dict(), tmp_path / "q.safetensors")
    fresh = build_quantizer(cfg, latent)
    fresh.load_state_dict(load_file(tmp_path / "q.safetensors"))
    z = torch.randn(4, latent, 4, 4)
    a, b = q.eval()(z), fresh.eval()(z)
    assert torch.equal(a.codes, b.codes) and torch.equal(a.quantized, b.quantized)
    assert a.metrics["usage"] == b.metrics["usage"] > 0
    if cfg.kind != "fsq":  # k-means done before saving: the loaded copy must not redo it
        book = fresh.book(0) if cfg.kind == "rq" else fresh.embedding
        before = book.weight.detach().clone()
        book.train().maybe_init(torch.randn(64, book.dim))
        assert bool(book.initted) and torch.equal(book.weight, before)


def test_api_attributes() -> None:
    for cfg, size, depth, code_shape in [
        (QuantizerConfig(kind="vq", codebook_size=16), 16, 1, (2, 3, 3)),
        (QuantizerConfig(kind="rq", codebook_size=16, depth=3), 16, 3, (2, 3, 3, 3)),
        (QuantizerConfig(kind="fsq", levels=[4, 4, 2]), 32, 1, (2, 3, 3)),
    ]:
        q = build_quantizer(cfg, 6)
        assert q.codebook_size == size and q.depth == depth
        assert q.codebook().shape == (size, q.codebook_dim)
        assert q(torch.randn(2, 6, 3, 3)).codes.shape == code_shape


# ---------------------------------------------------------------- distributed


def _full_batch(step: int) -> torch.Tensor:
    return torch.randn(4, 4, 4, 4, generator=torch.Generator().manual_seed(step))


SYNC_CFG = QuantizerConfig(kind="vq", codebook_size=16, ema=True, ema_decay=0.8)
RESTART_CFG = QuantizerConfig(
    kind="rq", codebook_size=16, depth=2, shared_codebook=False, ema=True, kmeans_init=True,
    dead_code_threshold=0.5, ema_decay=0.8,
)  # fmt: skip


def _dist_worker(rank: int, world: int, init_file: str, out_dir: str) -> None:
    torch.manual_seed(0)
    synced, restarted = build_quantizer(SYNC_CFG, 4), build_quantizer(RESTART_CFG, 4)
    # the process group comes up after construction, as with accelerate/DDP
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    torch.manual_seed(100 + rank)  # different RNG streams and data per rank
    for step in range(4):
        synced(_full_batch(step).chunk(world)[rank])
        restarted(torch.randn(2, 4, 4, 4) * (1 + 3 * rank))
    save_file(synced.state_dict(), f"{out_dir}/synced{rank}.safetensors")
    save_file(restarted.state_dict(), f"{out_dir}/restarted{rank}.safetensors")
    dist.destroy_process_group()


@pytest.mark.slow
def test_codebook_statistics_are_identical_across_ranks(tmp_path) -> None:
    mp.spawn(_dist_worker, args=(2, str(tmp_path / "init"), str(tmp_path)), nprocs=2)
    # EMA statistics all-reduced: two ranks on half batches == one process on the whole batch
    torch.manual_seed(0)
    single = build_quantizer(SYNC_CFG, 4)
    for step in range(4):
        single(_full_batch(step))
    ranks = [load_file(tmp_path / f"synced{r}.safetensors") for r in range(2)]
    for key, value in single.state_dict().items():
        assert torch.equal(ranks[0][key], ranks[1][key]), key
        assert torch.allclose(ranks[0][key].float(), value.float(), atol=1e-5), key
    # k-means results and restarted vectors broadcast from rank 0: bitwise identical
    a, b = (load_file(tmp_path / f"restarted{r}.safetensors") for r in range(2))
    assert a.keys() == b.keys()
    for key in a:
        assert torch.equal(a[key], b[key]), key
    assert all(bool(a[f"books.{d}.initted"]) for d in range(2))

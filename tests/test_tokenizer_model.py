"""Tokenizer model, losses and metrics: shapes, round trips, validation, exact formulas."""

from __future__ import annotations

import dataclasses
import json
import sys

import numpy as np
import pytest
import torch
from skimage.metrics import structural_similarity

from tokenizer import Tokenizer, TokenizerConfig
from tokenizer.autoencoder import SpatialNorm
from tokenizer.discriminator import DiscriminatorConfig, PatchDiscriminator
from tokenizer.losses import (
    LossConfig,
    TokenizerLoss,
    adaptive_weight,
    hinge_d_loss,
    hinge_g_loss,
    load_lpips,
    reconstruction_loss,
)
from tokenizer.metrics import code_histogram, codebook_usage, perplexity, psnr, ssim
from tokenizer.quantizers import QuantizerConfig

QUANTIZERS = {
    "vq": QuantizerConfig(kind="vq", codebook_size=32),
    "rq": QuantizerConfig(kind="rq", codebook_size=16, depth=2),
    "fsq": QuantizerConfig(kind="fsq", levels=[5, 4]),
}


def tiny(
    ch_mult: list[int] | None = None, kind: str = "vq", movq: bool = False, resolution: int = 16
) -> TokenizerConfig:
    return TokenizerConfig(
        resolution=resolution,
        encoder_channels=8,
        decoder_channels=8,
        ch_mult=ch_mult or [1, 2, 2],
        num_res_blocks=1,
        latent_dim=4,
        norm_groups=4,
        movq=movq,
        quantizer=QUANTIZERS[kind],
    )


def images(batch: int = 2, resolution: int = 16, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.rand(batch, 3, resolution, resolution, generator=g) * 2 - 1


def model(cfg: TokenizerConfig, seed: int = 0) -> Tokenizer:
    torch.manual_seed(seed)
    return Tokenizer(cfg).eval()


# ---- shapes and API -----------------------------------------------------------------------------
@pytest.mark.parametrize(
    "ch_mult,factor", [([1, 2, 2], 4), ([1, 1, 2, 2], 8), ([1, 1, 1, 2, 2], 16)]
)
def test_encode_decode_shapes_for_each_factor(ch_mult: list[int], factor: int) -> None:
    m = model(tiny(ch_mult, resolution=32))
    x = images(2, 32)
    with torch.no_grad():
        codes = m.encode(x)
        recon = m.decode(codes)
    assert m.grid == (32 // factor, 32 // factor)
    assert codes.shape == (2, *m.grid) and codes.dtype == torch.long
    assert int(codes.min()) >= 0 and int(codes.max()) < m.codebook_size
    assert recon.shape == x.shape
    assert m.depth == 1 and m.codebook().shape[0] == m.codebook_size


@pytest.mark.parametrize("kind", ["vq", "rq", "fsq"])
def test_embed_equals_quantized_latent_and_decode_equals_forward(kind: str) -> None:
    m = model(tiny(kind=kind, movq=kind == "rq"))
    x = images()
    with torch.no_grad():
        q = m.quantize(x)
        out = m(x)
        latents = m.embed(q.codes)
        recon = m.decode(q.codes)
    assert latents.shape == (2, 4, *m.grid)
    torch.testing.assert_close(latents, q.quantized, rtol=0, atol=1e-6)
    torch.testing.assert_close(recon, out.recon, rtol=0, atol=1e-5)
    assert torch.equal(out.codes, q.codes)
    want = (2, *m.grid, m.depth) if kind == "rq" else (2, *m.grid)
    assert tuple(out.codes.shape) == want and out.quant_loss.ndim == 0


@pytest.mark.parametrize("kind,movq", [("vq", False), ("rq", True), ("fsq", True)])
def test_save_load_round_trip_is_identical(tmp_path, kind: str, movq: bool) -> None:
    m = model(tiny(kind=kind, movq=movq))
    with torch.no_grad():  # perturb every weight so nothing can match by initialisation
        for p in m.parameters():
            p.add_(0.01 * torch.randn_like(p))
    m.save_pretrained(tmp_path / "tok")
    assert sorted(p.name for p in (tmp_path / "tok").iterdir()) == [
        "config.json",
        "model.safetensors",
    ]
    loaded = Tokenizer.from_pretrained(tmp_path / "tok")
    assert loaded.config == m.config
    assert dataclasses.is_dataclass(loaded.config.quantizer)
    assert isinstance(loaded.config.quantizer, QuantizerConfig)
    x = images()
    with torch.no_grad():
        a, b = m(x), loaded(x)
    assert torch.equal(a.codes, b.codes)
    assert torch.equal(a.recon, b.recon)
    assert loaded.identity() == m.identity()


def test_from_pretrained_rejects_unknown_config_key(tmp_path) -> None:
    m = model(tiny())
    m.save_pretrained(tmp_path / "tok")
    cfg = json.loads((tmp_path / "tok" / "config.json").read_text())
    cfg["quantizer"]["codebook_sise"] = 8
    (tmp_path / "tok" / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(ValueError, match="codebook_sise"):
        Tokenizer.from_pretrained(tmp_path / "tok")


def test_movq_decoder_is_conditioned_on_the_quantized_latent() -> None:
    m = model(tiny(movq=True))
    assert any(isinstance(mod, SpatialNorm) for mod in m.decoder.modules())
    x = images()
    out = m(x)
    out.recon.square().mean().backward()
    norm = next(mod for mod in m.decoder.modules() if isinstance(mod, SpatialNorm))
    assert norm.conv_y.weight.grad is not None and norm.conv_y.weight.grad.abs().sum() > 0
    # the same post-quant input with a different zq gives a different image
    with torch.no_grad():
        quant = m.quantize(x).quantized
        z = m.post_quant_conv(quant)
        assert not torch.allclose(m.decoder(z, quant), m.decoder(z, quant.flip(0)))


def test_identity_hash_is_stable_and_tracks_weights() -> None:
    m = model(tiny())
    ident = m.identity()
    assert ident == m.identity()
    assert len(ident.hash) == 64 and int(ident.hash, 16) >= 0
    assert ident.codebook_size == 32 and ident.grid == [4, 4] and ident.depth == 1
    assert model(tiny()).identity() == ident  # same seed, same config -> same hash
    with torch.no_grad():
        m.decoder.conv_out.bias[0] += 1e-3
    assert m.identity().hash != ident.hash


# ---- validation ---------------------------------------------------------------------------------
def test_encode_refuses_wrong_shapes() -> None:
    m = model(tiny())
    with pytest.raises(ValueError, match=r"\[B, 3, 16, 16\].*\(2, 1, 16, 16\)"):
        m.encode(torch.zeros(2, 1, 16, 16))
    with pytest.raises(ValueError, match=r"\[B, 3, 16, 16\].*\(2, 3, 32, 32\)"):
        m.encode(torch.zeros(2, 3, 32, 32))
    with pytest.raises(ValueError, match=r"\(3, 16, 16\)"):
        m.encode(torch.zeros(3, 16, 16))
    with pytest.raises(ValueError, match="float"):
        m.encode(torch.zeros(2, 3, 16, 16, dtype=torch.uint8))


def test_decode_refuses_bad_codes() -> None:
    m = model(tiny())
    good = torch.zeros(2, 4, 4, dtype=torch.long)
    assert m.decode(good).shape == (2, 3, 16, 16)
    assert torch.equal(
        m.decode(good.to(torch.uint16)), m.decode(good)
    )  # token datasets store uint16
    with pytest.raises(ValueError, match=r"\[0, 32\).*max 32"):
        m.decode(good + 32)
    with pytest.raises(ValueError, match=r"min -1"):
        m.decode(good - 1)
    with pytest.raises(ValueError, match=r"\[B, 4, 4\].*\(2, 8, 8\)"):
        m.decode(torch.zeros(2, 8, 8, dtype=torch.long))
    with pytest.raises(ValueError, match="integer"):
        m.decode(good.float())
    rq = model(tiny(kind="rq"))
    with pytest.raises(ValueError, match=r"\[B, 4, 4, 2\]"):
        rq.decode(good)


def test_config_validation_names_the_field() -> None:
    with pytest.raises(ValueError, match="norm_groups"):
        dataclasses.replace(tiny(), norm_groups=3)
    with pytest.raises(ValueError, match="ch_mult"):
        dataclasses.replace(tiny(), ch_mult=[1, 2])
    with pytest.raises(ValueError, match="resolution"):
        dataclasses.replace(tiny(), resolution=18)


# ---- losses -------------------------------------------------------------------------------------
def test_hinge_losses_known_values() -> None:
    real = torch.tensor([2.0, 0.5])
    fake = torch.tensor([-2.0, 0.0])
    # 0.5 * (mean(relu(1 - real)) + mean(relu(1 + fake))) = 0.5 * (0.25 + 0.5)
    assert hinge_d_loss(real, fake).item() == pytest.approx(0.375)
    assert hinge_g_loss(fake).item() == pytest.approx(1.0)
    x, y = torch.zeros(2, 3), torch.full((2, 3), -0.5)
    assert reconstruction_loss(x, y, "l1").item() == pytest.approx(0.5)
    assert reconstruction_loss(x, y, "l2").item() == pytest.approx(0.25)


def test_adaptive_weight_matches_manual_autograd() -> None:
    torch.manual_seed(0)
    conv = torch.nn.Conv2d(4, 3, 3, padding=1)
    recon = conv(torch.randn(2, 4, 8, 8))
    target = torch.randn(2, 3, 8, 8)
    nll = (recon - target).abs().mean()
    g_loss = -(recon * torch.randn(2, 3, 8, 8)).mean()
    got = adaptive_weight(nll, g_loss, conv.weight, base=0.5)

    grads = []
    for loss in (nll, g_loss):
        conv.weight.grad = None
        loss.backward(retain_graph=True)
        grads.append(conv.weight.grad.clone())
    want = 0.5 * (grads[0].norm() / (grads[1].norm() + 1e-4)).clamp(0, 1e4)
    torch.testing.assert_close(got, want)
    assert not got.requires_grad
    # a vanishing GAN gradient (ratio ~1e5 even with the +1e-4) is clamped at 1e4 * base
    assert grads[0].norm() > 0.1
    clamped = adaptive_weight(100 * nll, 1e-12 * g_loss, conv.weight, base=0.5)
    assert clamped.item() == pytest.approx(0.5e4)


def test_tokenizer_loss_gates_the_gan_on_disc_start() -> None:
    disc = DiscriminatorConfig(channels=8, num_layers=2)
    loss = TokenizerLoss(LossConfig(disc_start=5, disc_weight=0.5, discriminator=disc))
    m = model(tiny())
    x = images()
    out = m(x)
    before = loss.generator_loss(x, out.recon, out.quant_loss, step=4, last_layer=m.last_layer)
    want = (x - out.recon).abs().mean() + out.quant_loss
    torch.testing.assert_close(before.loss, want)
    assert "g_loss" not in before.logs
    assert loss.discriminator_loss(x, out.recon, step=4).loss.item() == 0.0

    after = loss.generator_loss(x, out.recon, out.quant_loss, step=5, last_layer=m.last_layer)
    w, g = after.logs["disc_adaptive_weight"], after.logs["g_loss"]
    torch.testing.assert_close(after.loss.detach(), want.detach() + w * g)
    after.loss.backward()
    assert m.encoder.conv_in.weight.grad is not None
    d_out = loss.discriminator_loss(x, out.recon, step=5)
    assert d_out.loss.item() == pytest.approx(d_out.logs["d_loss"].item()) and d_out.loss.item() > 0
    with pytest.raises(ValueError, match="last_layer"):
        loss.generator_loss(x, out.recon.detach(), out.quant_loss.detach(), step=5)


def test_lpips_needs_local_weights_and_the_package(tmp_path, monkeypatch) -> None:
    with pytest.raises(FileNotFoundError, match="nowhere.pth"):
        load_lpips(tmp_path / "nowhere.pth")
    with pytest.raises(ValueError, match="lpips_path"):
        LossConfig(perceptual_weight=1.0)
    weights = tmp_path / "lpips.pth"
    weights.write_bytes(b"not used")
    monkeypatch.setitem(sys.modules, "lpips", None)  # import fails as if not installed
    with pytest.raises(ImportError, match=r"\[eval\]"):
        load_lpips(weights)


def test_patch_discriminator_shapes_and_size_check() -> None:
    d = PatchDiscriminator(DiscriminatorConfig(channels=8, num_layers=3))
    assert d(torch.zeros(2, 3, 32, 32)).shape == (2, 1, 2, 2)
    with pytest.raises(ValueError, match="at least 24px"):
        d(torch.zeros(2, 3, 16, 16))
    with pytest.raises(ValueError, match="norm"):
        DiscriminatorConfig(norm="instance")


# ---- metrics ------------------------------------------------------------------------------------
def test_psnr_known_values() -> None:
    x = torch.zeros(2, 3, 8, 8)
    y = x.clone()
    y[0] += 0.2  # 0.1 in [0, 1] -> mse 0.01 -> 20 dB
    y[1] -= 0.02  # 0.01 -> mse 1e-4 -> 40 dB
    torch.testing.assert_close(psnr(x, y), torch.tensor([20.0, 40.0]))
    assert torch.isinf(psnr(x, x)).all()


def test_ssim_matches_skimage() -> None:
    rng = np.random.default_rng(0)
    a = rng.uniform(0, 1, (2, 3, 24, 20))
    b = np.clip(a + rng.normal(0, 0.1, a.shape), 0, 1)
    got = ssim(torch.tensor(a * 2 - 1), torch.tensor(b * 2 - 1))
    for i in range(2):
        want = structural_similarity(
            a[i], b[i], channel_axis=0, data_range=1.0, gaussian_weights=True, sigma=1.5,
            use_sample_covariance=False,
        )  # fmt: skip
        assert got[i].item() == pytest.approx(want, abs=1e-5)
    assert ssim(torch.tensor(a), torch.tensor(a)).tolist() == pytest.approx([1.0, 1.0])
    with pytest.raises(ValueError, match="11px"):
        ssim(torch.zeros(1, 3, 8, 8), torch.zeros(1, 3, 8, 8))


def test_codebook_usage_and_perplexity() -> None:
    uniform = code_histogram(torch.arange(8).repeat(3), 8)
    assert uniform.tolist() == [3] * 8
    assert codebook_usage(uniform) == 1.0 and perplexity(uniform) == pytest.approx(8.0)
    one = code_histogram(torch.full((4, 2, 2), 5), 16)
    assert codebook_usage(one) == 1 / 16 and perplexity(one) == pytest.approx(1.0)
    half = code_histogram(torch.tensor([0, 0, 1, 1]), 4)
    assert codebook_usage(half) == 0.5 and perplexity(half) == pytest.approx(2.0)
    with pytest.raises(ValueError, match=r"\[0, 4\)"):
        code_histogram(torch.tensor([4]), 4)

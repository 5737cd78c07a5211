"""Reconstruction and codebook metrics: PSNR, SSIM, code histograms, usage, perplexity.

Images are [B, C, H, W] in [-1, 1]; they are mapped to [0, 1] and clamped before measuring, so
numbers compare across papers that report PSNR/SSIM on [0, 1] (data range 1).
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Callable, Iterable

import torch
import torch.nn.functional as F


def to_unit(images: torch.Tensor) -> torch.Tensor:
    """[-1, 1] -> [0, 1], clamped."""
    return ((images.float() + 1.0) / 2.0).clamp(0.0, 1.0)


def _check_pair(x: torch.Tensor, y: torch.Tensor) -> None:
    if x.shape != y.shape or x.ndim != 4:
        raise ValueError(
            f"expected two [B, C, H, W] tensors of one shape, got {tuple(x.shape)} and {tuple(y.shape)}"
        )


def psnr(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """Per-image PSNR in dB [B] of images in [-1, 1] (measured on [0, 1]); inf when identical."""
    _check_pair(x, y)
    mse = (to_unit(x) - to_unit(y)).pow(2).flatten(1).mean(1)  # [B]
    return 10.0 * torch.log10(1.0 / mse)


def _gaussian_window(sigma: float, truncate: float, device: torch.device) -> torch.Tensor:
    radius = int(truncate * sigma + 0.5)  # scipy.ndimage.gaussian_filter's radius
    t = torch.arange(-radius, radius + 1, dtype=torch.float64, device=device)
    w = torch.exp(-0.5 * (t / sigma) ** 2)
    return w / w.sum()


def ssim(x: torch.Tensor, y: torch.Tensor, sigma: float = 1.5) -> torch.Tensor:
    """Per-image SSIM [B] with a Gaussian window, as skimage's
    `structural_similarity(gaussian_weights=True, sigma=1.5, use_sample_covariance=False,
    data_range=1, channel_axis=0)`: the mean over channels and over the positions whose window
    lies inside the image (skimage crops the border, so padding never matters)."""
    _check_pair(x, y)
    w = _gaussian_window(sigma, 3.5, x.device)  # [k], k = 2r + 1 (11 for sigma 1.5)
    k = w.numel()
    if min(x.shape[-2:]) < k:
        raise ValueError(
            f"SSIM with sigma={sigma} needs images of at least {k}px, got {tuple(x.shape[-2:])}"
        )
    c = x.shape[1]
    a, b = to_unit(x).double(), to_unit(y).double()
    wx = w.view(1, 1, 1, k).expand(c, 1, 1, k)  # depthwise row filter
    wy = w.view(1, 1, k, 1).expand(c, 1, k, 1)

    def blur(t: torch.Tensor) -> torch.Tensor:  # valid separable Gaussian filter
        return F.conv2d(F.conv2d(t, wx, groups=c), wy, groups=c)

    mu_a, mu_b = blur(a), blur(b)
    var_a = blur(a * a) - mu_a**2
    var_b = blur(b * b) - mu_b**2
    cov = blur(a * b) - mu_a * mu_b
    c1, c2 = 0.01**2, 0.03**2
    s = ((2 * mu_a * mu_b + c1) * (2 * cov + c2)) / (
        (mu_a**2 + mu_b**2 + c1) * (var_a + var_b + c2)
    )
    return s.flatten(1).mean(1).float()  # [B]


def code_histogram(codes: torch.Tensor, codebook_size: int) -> torch.Tensor:
    """Counts [K] of every code in `codes` (any shape; RQ depths pooled)."""
    flat = codes.reshape(-1).long()
    if flat.numel() and (flat.min() < 0 or flat.max() >= codebook_size):
        raise ValueError(
            f"codes must lie in [0, {codebook_size}), got [{int(flat.min())}, {int(flat.max())}]"
        )
    return torch.bincount(flat, minlength=codebook_size)


def codebook_usage(histogram: torch.Tensor) -> float:
    """Fraction of codes used at least once."""
    return float((histogram > 0).float().mean())


def perplexity(histogram: torch.Tensor) -> float:
    """exp(entropy) of the code distribution: K for uniform use, 1 for a single code."""
    total = histogram.sum()
    if total == 0:
        return 0.0
    p = histogram.double() / total
    p = p[p > 0]
    return float(math.exp(-(p * p.log()).sum().item()))


PSNR_CAP = 100.0  # dB; an exact reconstruction would otherwise give inf


@torch.no_grad()
def reconstruction_metrics(
    tokenizer: torch.nn.Module,
    batches: Iterable[torch.Tensor],
    *,
    autocast: Callable[[], contextlib.AbstractContextManager] = contextlib.nullcontext,
    reduce: Callable[[torch.Tensor], torch.Tensor] | None = None,
    on_batch: Callable[[torch.Tensor, torch.Tensor], None] | None = None,
) -> dict[str, float]:
    """PSNR and SSIM (means over images; PSNR capped at 100 dB per image), codebook usage and
    perplexity of a tokenizer over batches of images [B, 3, H, W] in [-1, 1].

    `tokenizer` is a plain module (never DDP-wrapped): in eval mode its quantizer runs no
    collectives, so ranks may see different numbers of batches; `reduce(t)` sums a tensor over
    ranks (distributed evaluation). `on_batch(images, recon)` sees every batch (e.g. to collect
    them for rFID, which lives in evaluation/). SSIM needs images of >= 11 px."""
    was_training = tokenizer.training
    tokenizer.eval()
    device = next(tokenizer.parameters()).device
    sums = torch.zeros(3, dtype=torch.float64, device=device)  # psnr, ssim, images
    hist = torch.zeros(tokenizer.codebook_size, dtype=torch.long, device=device)
    for images in batches:
        images = images.to(device)
        with autocast():
            out = tokenizer(images)
        recon = out.recon.float().clamp(-1, 1)
        sums[0] += psnr(images, recon).clamp(max=PSNR_CAP).double().sum()
        if min(images.shape[-2:]) >= 11:
            sums[1] += ssim(images, recon).double().sum()
        sums[2] += images.shape[0]
        hist += code_histogram(out.codes, tokenizer.codebook_size)
        if on_batch is not None:
            on_batch(images, recon)
    tokenizer.train(was_training)
    if reduce is not None:
        sums, hist = reduce(sums), reduce(hist)
    n = max(float(sums[2]), 1.0)
    metrics = {
        "psnr": float(sums[0]) / n,
        "ssim": float(sums[1]) / n,
        "codebook_usage": codebook_usage(hist),
        "perplexity": perplexity(hist),
        "codebook_size": float(tokenizer.codebook_size),
        "images": float(sums[2]),
    }
    return metrics

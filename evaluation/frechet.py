"""Fréchet distance between two feature sets, each summarised as a Gaussian (mean, covariance).

d² = |mu_a - mu_b|² + tr(S_a + S_b - 2 (S_a S_b)^{1/2}), as in FID (Heusel et al. 2017) and the
reference pytorch-fid code: scipy's sqrtm, an eps·I offset when the product is singular, and the
imaginary part (numerical noise for PSD inputs) dropped when it is negligible.
"""

from __future__ import annotations

import warnings

import numpy as np
import torch
from scipy import linalg


def feature_stats(features: np.ndarray | torch.Tensor) -> tuple[np.ndarray, np.ndarray]:
    """Mean [F] and unbiased covariance [F, F] (float64) of features [N, F], N >= 2."""
    if torch.is_tensor(features):
        features = features.detach().cpu().double().numpy()
    feats = np.asarray(features, dtype=np.float64)
    if feats.ndim != 2 or feats.shape[0] < 2:
        raise ValueError(f"features must have shape [N, F] with N >= 2, got {feats.shape}")
    if not np.isfinite(feats).all():
        raise ValueError("features contain NaN or inf")
    return feats.mean(axis=0), np.cov(feats, rowvar=False).reshape(feats.shape[1], feats.shape[1])


def _sqrtm(a: np.ndarray) -> np.ndarray:
    """scipy's sqrtm without its singular-matrix warning (callers check the result instead)."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", linalg.LinAlgWarning)
        return linalg.sqrtm(a)


def _sqrtm_product(sigma_a: np.ndarray, sigma_b: np.ndarray, eps: float) -> np.ndarray:
    """(S_a S_b)^{1/2}, retried on (S_a + eps I)(S_b + eps I) when singular, inaccurate or far
    from real."""
    product = sigma_a @ sigma_b
    covmean = _sqrtm(product)
    bad = not np.isfinite(covmean).all()
    if not bad:
        scale = max(float(np.linalg.norm(product)), 1e-30)
        bad = float(np.linalg.norm(covmean @ covmean - product)) / scale > 1e-4 or (
            np.iscomplexobj(covmean) and not np.allclose(np.diagonal(covmean).imag, 0, atol=1e-3)
        )
    if bad:
        offset = np.eye(sigma_a.shape[0]) * eps
        covmean = _sqrtm((sigma_a + offset) @ (sigma_b + offset))
    if not np.isfinite(covmean).all():
        raise ValueError("matrix square root of the covariance product is not finite")
    if np.iscomplexobj(covmean):
        worst = float(np.max(np.abs(np.diagonal(covmean).imag)))
        if worst > 1e-3 * max(1.0, float(np.max(np.abs(covmean.real)))):
            raise ValueError(
                f"covariance square root has a large imaginary component ({worst:.3g})"
            )
        covmean = covmean.real
    return covmean


def frechet_from_stats(
    mu_a: np.ndarray, sigma_a: np.ndarray, mu_b: np.ndarray, sigma_b: np.ndarray, eps: float = 1e-6
) -> float:
    """Fréchet distance between N(mu_a, sigma_a) and N(mu_b, sigma_b) (squared, like FID)."""
    mu_a, mu_b = (
        np.atleast_1d(np.asarray(mu_a, np.float64)),
        np.atleast_1d(np.asarray(mu_b, np.float64)),
    )
    sigma_a, sigma_b = (
        np.atleast_2d(np.asarray(sigma_a, np.float64)),
        np.atleast_2d(np.asarray(sigma_b, np.float64)),
    )
    f = mu_a.shape[0]
    if mu_b.shape != (f,) or sigma_a.shape != (f, f) or sigma_b.shape != (f, f):
        raise ValueError(
            f"mismatched statistics: means {mu_a.shape} {mu_b.shape}, covariances {sigma_a.shape} {sigma_b.shape}"
        )
    diff = mu_a - mu_b
    covmean = _sqrtm_product(sigma_a, sigma_b, eps)
    value = float(diff @ diff + np.trace(sigma_a) + np.trace(sigma_b) - 2.0 * np.trace(covmean))
    return max(value, 0.0)  # tiny negatives are rounding noise (e.g. identical sets)


def frechet_distance(
    feats_a: np.ndarray | torch.Tensor, feats_b: np.ndarray | torch.Tensor, eps: float = 1e-6
) -> float:
    """Fréchet distance between the Gaussians fitted to features [N_a, F] and [N_b, F]."""
    mu_a, sigma_a = feature_stats(feats_a)
    mu_b, sigma_b = feature_stats(feats_b)
    if mu_a.shape != mu_b.shape:
        raise ValueError(f"feature widths differ: {mu_a.shape[0]} vs {mu_b.shape[0]}")
    return frechet_from_stats(mu_a, sigma_a, mu_b, sigma_b, eps)

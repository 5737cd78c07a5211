"""FID, rFID and Inception Score, only with Inception weights supplied as a local file.

Uses torch-fidelity's TF-compatible InceptionV3 (the `eval` extra: `pip install -e ".[eval]"`),
imported lazily so the rest of Tessera never needs it; weights are never downloaded: pass the
path of torch-fidelity's `weights-inception-2015-12-05-6726825d.pth` (or a converted copy).
The Fréchet maths is evaluation.frechet's, on the 2048-d pool features.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import torch

from evaluation.frechet import frechet_distance

WEIGHTS_HINT = (
    "torch-fidelity's weights-inception-2015-12-05-6726825d.pth, downloaded once by hand from "
    "https://github.com/toshas/torch-fidelity/releases/tag/v0.2.0"
)


def load_inception(weights_path: str | Path | None) -> Any:
    """torch-fidelity's FeatureExtractorInceptionV3 (pool '2048' + 'logits_unbiased') from a file."""
    if weights_path is None:
        raise ValueError(f"Inception metrics need local weights: pass the path of {WEIGHTS_HINT}")
    path = Path(weights_path)
    if not path.is_file():
        raise FileNotFoundError(f"Inception weights not found at {path} (expected {WEIGHTS_HINT})")
    try:
        from torch_fidelity.feature_extractor_inceptionv3 import FeatureExtractorInceptionV3
    except ImportError as err:
        raise ImportError(
            "FID/IS need the 'torch-fidelity' package, which is not installed: "
            "pip install -c constraints.txt -e '.[eval]'"
        ) from err
    return FeatureExtractorInceptionV3(
        "inception-v3-compat", ["2048", "logits_unbiased"], feature_extractor_weights_path=str(path)
    )


@torch.no_grad()
def inception_features(
    extractor: Any, images: torch.Tensor, batch_size: int = 64
) -> tuple[torch.Tensor, torch.Tensor]:
    """Pool features [N, 2048] and unbiased logits [N, 1008] of images [N, 3, H, W] in [-1, 1]."""
    if images.ndim != 4 or images.shape[1] != 3:
        raise ValueError(f"images must have shape [N, 3, H, W], got {tuple(images.shape)}")
    device = next(extractor.parameters()).device
    pools, logits = [], []
    for i in range(0, len(images), batch_size):
        x = ((images[i : i + batch_size].float().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8)
        pool, logit = extractor(x.to(device))
        pools.append(pool.cpu())
        logits.append(logit.cpu())
    return torch.cat(pools), torch.cat(logits)


def inception_score(logits: torch.Tensor, splits: int = 10) -> tuple[float, float]:
    """IS = exp(E_x KL(p(y|x) || p(y))): mean and std over `splits` chunks (Salimans et al.)."""
    if len(logits) < splits:
        raise ValueError(f"need at least splits={splits} images, got {len(logits)}")
    probs = logits.double().softmax(-1)
    scores = []
    for chunk in probs.chunk(splits):
        marginal = chunk.mean(0, keepdim=True)
        kl = (chunk * (chunk.clamp_min(1e-30).log() - marginal.clamp_min(1e-30).log())).sum(1)
        scores.append(float(kl.mean().exp()))
    return float(np.mean(scores)), float(np.std(scores))


def fid(extractor: Any, real: torch.Tensor, fake: torch.Tensor, batch_size: int = 64) -> float:
    """FID between two image sets [N, 3, H, W] in [-1, 1] (rFID when `fake` = reconstructions)."""
    return frechet_distance(
        inception_features(extractor, real, batch_size)[0],
        inception_features(extractor, fake, batch_size)[0],
    )


def generation_scores(
    extractor: Any, real: torch.Tensor, fake: torch.Tensor, batch_size: int = 64, splits: int = 10
) -> dict[str, float]:
    """FID of generated images `fake` against `real`, and their Inception Score (mean, std over
    `splits`; fewer splits when there are fewer images)."""
    real_pool, _ = inception_features(extractor, real, batch_size)
    fake_pool, fake_logits = inception_features(extractor, fake, batch_size)
    is_mean, is_std = inception_score(fake_logits, splits=min(splits, len(fake)))
    return {"fid": frechet_distance(real_pool, fake_pool), "is_mean": is_mean, "is_std": is_std}

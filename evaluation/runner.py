"""The evaluation run: class-balanced samples at each guidance scale, scored by the judge.

Generation is judged by a small classifier trained on the real training images
(evaluation.judge): class accuracy of generated images (per class), and a Fréchet distance in the
judge's feature space against held-out real images, next to the real-vs-real floor
(evaluation.scores). For `shapes`, each image is also checked against its prompt
(evaluation.shapes_check). Sampling is class-balanced with fixed seeds (the same seeds at every
guidance scale). `scripts/evaluate.py` and `scripts/demo.py` call these functions.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from tqdm.auto import tqdm

from evaluation.frechet import frechet_distance
from evaluation.judge import Judge, dataset_images
from evaluation.prompts import balanced_prompts
from evaluation.real_data import RealData
from evaluation.scores import class_accuracy, real_floor
from evaluation.shapes_check import check_shapes
from sampling.logits import SamplingConfig
from tokenizer.images import to_tensor_images


@dataclass
class SampleOptions:
    """How `evaluate_generation` calls the pipeline; method "auto" = the pipeline's
    `default_method` ("maskgit" for MaskGIT priors, else "ar")."""

    method: str = "auto"
    num_steps: int = 8  # MaskGIT decoding steps (passed for method "maskgit" only)
    sampling: SamplingConfig = field(default_factory=SamplingConfig)
    batch_size: int = 64
    plausibility: float = 0.0  # guidance cutoff alpha (sampling.guidance)
    progress: bool = False  # a progress bar over the sampling batches

    def __post_init__(self) -> None:
        if self.batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {self.batch_size}")
        if self.num_steps < 1:
            raise ValueError(f"num_steps must be >= 1, got {self.num_steps}")


def sample_images(
    pipe: Callable[..., Any],
    prompts: Sequence[int | str],
    guidance_scale: float,
    seed: int = 0,
    options: SampleOptions | None = None,
) -> torch.Tensor:
    """Images [N, 3, H, W] in [-1, 1] for `prompts`; batch k uses generator seed + k (on the
    pipeline's device), so runs at different guidance scales share their random numbers."""
    opts = options or SampleOptions()
    method = getattr(pipe, "default_method", "ar") if opts.method == "auto" else opts.method
    device = getattr(pipe, "device", torch.device("cpu"))
    out = []
    starts = range(0, len(prompts), opts.batch_size)
    for k, start in enumerate(tqdm(starts, desc=f"sample (guidance {guidance_scale:g})",
                                   disable=not opts.progress, mininterval=5)):  # fmt: skip
        generator = torch.Generator(device=device).manual_seed(seed + k)
        result = pipe(
            list(prompts[start : start + opts.batch_size]),
            guidance_scale=guidance_scale,
            guidance_plausibility=opts.plausibility,
            method=method,
            num_steps=opts.num_steps if method == "maskgit" else None,
            num_images_per_prompt=1,
            temperature=opts.sampling.temperature,
            top_k=opts.sampling.top_k,
            top_p=opts.sampling.top_p,
            generator=generator,
            output_type="np",
        )
        out.append(to_tensor_images(result.images))
    return torch.cat(out)


def evaluate_generation(
    pipe: Callable[..., Any],
    judge: Judge,
    data: RealData,
    guidance_scales: Sequence[float],
    n_per_class: int = 20,
    mode: str = "class",
    seed: int = 0,
    options: SampleOptions | None = None,
    on_samples: Callable[[float, torch.Tensor], None] | None = None,
) -> dict[str, Any]:
    """Scores of class-balanced samples at each guidance scale (+ the real-vs-real floor).

    `mode`: "class" (class ids as prompts), "text" (held-out captions) or "none" (unconditional:
    Fréchet only). For shapes, prompt faithfulness is checked per attribute.
    `on_samples(scale, images)` sees every sample set (e.g. to save a grid)."""
    if not guidance_scales:
        raise ValueError("guidance_scales must not be empty")
    names = list(getattr(pipe, "class_names", []) or [])
    if mode == "class" and names and names != data.class_names:
        raise ValueError(f"the prior's classes {names} are not {data.name}'s {data.class_names}")
    prompts, labels, texts = balanced_prompts(mode, data, n_per_class, seed)
    held_feats = judge.features(dataset_images(data.heldout))
    floor = real_floor(judge, data, n=len(prompts))  # the data's floor: the same for every seed
    runs = []
    for scale in guidance_scales:
        images = sample_images(pipe, prompts, float(scale), seed, options)
        run: dict[str, Any] = {
            "guidance_scale": float(scale),
            "frechet": frechet_distance(judge.features(images), held_feats),
            "n": len(images),
        }
        if mode != "none":
            run["accuracy"] = class_accuracy(judge, images, labels)
            if data.name == "shapes":
                run["prompt_check"] = check_shapes(images, texts)
        if on_samples is not None:
            on_samples(float(scale), images)
        runs.append(run)
    return {"mode": mode, "n_per_class": n_per_class, "seed": seed, "floor": floor, "runs": runs}

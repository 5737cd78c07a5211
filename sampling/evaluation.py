"""Offline evaluation: tokenizer reconstruction metrics and generation scores vs guidance.

Generation is judged by a small classifier trained on the real training images (sampling.judge):
class accuracy of generated images (per class), and a Fréchet distance in the judge's feature
space against held-out real images, next to the real-vs-real floor (real training images vs
held-out, same sample size as the generated set; and the two halves of the held-out set). For
`shapes`, each image is also checked against its prompt by sampling.shapes_check. Sampling is
class-balanced with fixed seeds (the same seeds at every guidance scale). `scripts/evaluate.py`
and `scripts/demo.py` call these functions.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import datasets
import numpy as np
import torch
from PIL import Image

from sampling.frechet import frechet_distance
from sampling.judge import Judge, JudgeConfig, JudgeTrainConfig, dataset_images
from sampling.shapes_check import check_shapes
from tokenizer.embedded import load_embedded
from tokenizer.metrics import code_histogram, codebook_usage, perplexity, psnr, ssim
from training.serialization import atomic_write_text

JUDGE_REPORT = "judge_report.json"
MODES = ("class", "text", "none")


@dataclass
class SampleOptions:
    """How `evaluate_generation` calls the pipeline; method "auto" = "maskgit" for MaskGIT priors,
    else "ar"."""

    method: str = "auto"
    num_steps: int = 8
    temperature: float = 1.0
    top_k: int = 0
    top_p: float = 1.0
    batch_size: int = 64
    plausibility: float = 0.0  # guidance cutoff alpha (sampling.guidance)

    def __post_init__(self) -> None:
        if self.batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {self.batch_size}")
        if self.num_steps < 1:
            raise ValueError(f"num_steps must be >= 1, got {self.num_steps}")


# ---- real data ------------------------------------------------------------------------------------
@dataclass
class RealData:
    """Real images of one embedded dataset: `train` teaches the judge, `heldout` is the reference."""

    name: str
    resolution: int
    train: datasets.Dataset
    heldout: datasets.Dataset
    class_names: list[str]


def real_data(
    name: str, resolution: int, holdout_fraction: float = 0.15, seed: int = 0
) -> RealData:
    """Train and held-out splits; when the test split holds other classes (photos), a seeded
    `holdout_fraction` of the training split is held out instead."""
    train, test = load_embedded(name, "train", resolution), load_embedded(name, "test", resolution)
    if not set(test["label"]) <= set(train["label"]):
        split = train.train_test_split(test_size=holdout_fraction, seed=seed)
        train, test = split["train"], split["test"]
    return RealData(name, resolution, train, test, list(train.features["label"].names))


# ---- judge ----------------------------------------------------------------------------------------
def load_or_train_judge(
    cache_dir: str | Path,
    data: RealData,
    train_config: JudgeTrainConfig | None = None,
    resolution: int = 32,
    channels: list[int] | None = None,
) -> tuple[Judge, dict[str, Any]]:
    """The judge cached in `cache_dir` if it was trained the same way on the same data, else
    train and save it. Returns the judge and its training report (held-out accuracy, seconds)."""
    cache_dir = Path(cache_dir)
    cfg = train_config or JudgeTrainConfig()
    model_cfg = JudgeConfig(
        num_classes=len(data.class_names),
        class_names=list(data.class_names),
        resolution=resolution,
        dataset=f"{data.name}@{data.resolution}",
    )
    if channels is not None:
        model_cfg.channels = list(channels)
    report_path = cache_dir / JUDGE_REPORT
    if report_path.is_file() and (cache_dir / "config.json").is_file():
        report = json.loads(report_path.read_text())
        judge = Judge.from_pretrained(str(cache_dir))
        if judge.config == model_cfg and report.get("train_config") == _plain(cfg):
            return judge, report
    judge = Judge(model_cfg)
    report = judge.train_on(data.train, cfg, heldout=data.heldout).as_dict()
    report["train_config"] = _plain(cfg)
    judge.save_pretrained(cache_dir)
    atomic_write_text(report_path, json.dumps(report, indent=2))
    return judge, report


def _plain(cfg: Any) -> dict[str, Any]:
    return {k: getattr(cfg, k) for k in cfg.__dataclass_fields__}


# ---- scores ---------------------------------------------------------------------------------------
def accuracy_from_predictions(
    predicted: torch.Tensor, labels: torch.Tensor, class_names: Sequence[str]
) -> dict[str, Any]:
    """Overall top-1 accuracy, per-class accuracy (classes present in `labels` only) and their mean."""
    predicted, labels = (
        torch.as_tensor(predicted).long().cpu(),
        torch.as_tensor(labels).long().cpu(),
    )
    if predicted.shape != labels.shape or predicted.ndim != 1 or len(labels) == 0:
        raise ValueError(
            f"need two equal non-empty [N] tensors, got {tuple(predicted.shape)} and {tuple(labels.shape)}"
        )
    if labels.min() < 0 or labels.max() >= len(class_names):
        raise ValueError(
            f"labels must lie in [0, {len(class_names)}), got [{int(labels.min())}, {int(labels.max())}]"
        )
    correct = (predicted == labels).float()
    per_class = {
        class_names[c]: float(correct[labels == c].mean()) for c in sorted(set(labels.tolist()))
    }
    return {
        "overall": float(correct.mean()),
        "per_class": per_class,
        "mean_per_class": float(np.mean(list(per_class.values()))),
        "count": len(labels),
    }


def class_accuracy(judge: Judge, images: torch.Tensor, labels: torch.Tensor) -> dict[str, Any]:
    """Judge accuracy of images [N, 3, H, W] meant to show classes `labels` [N]: overall, per class."""
    return accuracy_from_predictions(judge.predict(images).argmax(-1), labels, judge.class_names)


def real_floor(judge: Judge, data: RealData, n: int, seed: int = 0) -> dict[str, float]:
    """Fréchet distances between real sets: what a perfect generator of `n` images would score
    (n training images vs the held-out set, and the held-out set's two halves)."""
    gen = torch.Generator().manual_seed(seed)
    held = judge.features(dataset_images(data.heldout))
    pick = torch.randperm(len(data.train), generator=gen)[: min(n, len(data.train))]
    train = judge.features(dataset_images(data.train.select(pick.tolist())))
    halves = torch.randperm(len(held), generator=gen)
    return {
        "train_vs_heldout": frechet_distance(train, held),
        "heldout_halves": frechet_distance(
            held[halves[: len(held) // 2]], held[halves[len(held) // 2 :]]
        ),
        "n_train": int(len(pick)),
        "n_heldout": int(len(held)),
    }


# ---- sampling -------------------------------------------------------------------------------------
def balanced_prompts(
    mode: str, data: RealData, n_per_class: int, seed: int = 0
) -> tuple[list[int | str], torch.Tensor, list[str]]:
    """(prompts, labels [N], prompt texts) with `n_per_class` prompts for every class of the
    training split. mode "class": class ids; "text": held-out captions of that class (cycled);
    "none" (unconditional prior): empty prompts, labels kept only to size the set."""
    if mode not in MODES:
        raise ValueError(f"mode must be one of {MODES}, got {mode!r}")
    if n_per_class < 1:
        raise ValueError(f"n_per_class must be >= 1, got {n_per_class}")
    classes = sorted(set(data.train["label"]))
    held_labels = np.asarray(data.heldout["label"])
    rng = np.random.default_rng(seed)
    prompts: list[int | str] = []
    labels: list[int] = []
    texts: list[str] = []
    for c in classes:
        if mode == "class":
            prompts += [c] * n_per_class
            texts += [data.class_names[c]] * n_per_class
        elif mode == "none":
            prompts += [""] * n_per_class
            texts += [""] * n_per_class
        else:
            rows = np.flatnonzero(held_labels == c)
            if len(rows) == 0:
                raise ValueError(f"no held-out caption for class {data.class_names[c]!r}")
            rows = rng.permutation(rows)[np.arange(n_per_class) % len(rows)]
            caps = [data.heldout[int(i)]["caption"] for i in rows]
            prompts += caps
            texts += caps
        labels += [c] * n_per_class
    return prompts, torch.tensor(labels), texts


def to_tensor_images(images: Any) -> torch.Tensor:
    """Pipeline output (.images: PIL list, uint8/float [0, 1] NHWC array or [-1, 1] NCHW tensor)
    -> float [N, 3, H, W] in [-1, 1]."""
    if torch.is_tensor(images):
        return images.float().cpu()
    if isinstance(images, (list, tuple)) and images and isinstance(images[0], Image.Image):
        images = np.stack([np.asarray(im.convert("RGB")) for im in images])
    arr = np.asarray(images)
    if arr.ndim != 4 or arr.shape[-1] != 3:
        raise ValueError(f"expected images [N, H, W, 3], got shape {arr.shape}")
    unit = arr.astype(np.float32) / 255.0 if arr.dtype == np.uint8 else arr.astype(np.float32)
    return torch.from_numpy(unit).permute(0, 3, 1, 2) * 2 - 1


def _method(pipe: Any, requested: str) -> str:
    if requested != "auto":
        return requested
    prior = getattr(pipe, "prior", None)
    return "maskgit" if type(prior).__name__ == "MaskGIT" else "ar"


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
    device = getattr(pipe, "device", torch.device("cpu"))
    out = []
    for k, start in enumerate(range(0, len(prompts), opts.batch_size)):
        generator = torch.Generator(device=device).manual_seed(seed + k)
        result = pipe(
            list(prompts[start : start + opts.batch_size]),
            guidance_scale=guidance_scale,
            guidance_plausibility=opts.plausibility,
            method=_method(pipe, opts.method),
            num_steps=opts.num_steps,
            num_images_per_prompt=1,
            temperature=opts.temperature,
            top_k=opts.top_k,
            top_p=opts.top_p,
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
    floor = real_floor(judge, data, n=len(prompts), seed=seed)
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


# ---- tokenizer ------------------------------------------------------------------------------------
@torch.no_grad()
def evaluate_tokenizer(
    tokenizer: Any, images: torch.Tensor, batch_size: int = 64, inception: Any = None
) -> dict[str, float]:
    """PSNR, SSIM (means), codebook usage and perplexity of a tokenizer on images [N, 3, H, W];
    rFID when a loaded Inception extractor (sampling.inception.load_inception) is given."""
    device = next(tokenizer.parameters()).device
    psnrs, ssims, recons = [], [], []
    hist = torch.zeros(tokenizer.codebook_size, dtype=torch.long)
    for i in range(0, len(images), batch_size):
        x = images[i : i + batch_size].to(device)
        out = tokenizer(x)
        recon = out.recon.float().clamp(-1, 1)
        psnrs.append(psnr(recon, x).cpu())
        if min(x.shape[-2:]) >= 11:
            ssims.append(ssim(recon, x).cpu())
        hist += code_histogram(out.codes.cpu(), tokenizer.codebook_size)
        if inception is not None:
            recons.append(recon.cpu())
    metrics = {
        "psnr": float(torch.cat(psnrs).clamp(max=100).mean()),
        "usage": codebook_usage(hist),
        "perplexity": perplexity(hist),
        "codebook_size": int(tokenizer.codebook_size),
        "n": int(len(images)),
    }
    if ssims:
        metrics["ssim"] = float(torch.cat(ssims).mean())
    if inception is not None:
        from sampling.inception import fid

        metrics["rfid"] = fid(inception, images, torch.cat(recons))
    return metrics


# ---- plot -----------------------------------------------------------------------------------------
def plot_guidance(result: dict[str, Any], path: str | Path) -> None:
    """PNG of judge accuracy and judge-Fréchet distance (with the real floor) vs guidance scale."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    runs = result["runs"]
    scales = [r["guidance_scale"] for r in runs]
    fig, (ax_acc, ax_fd) = plt.subplots(1, 2, figsize=(9, 3.5))
    if runs and "accuracy" in runs[0]:
        ax_acc.plot(scales, [r["accuracy"]["overall"] for r in runs], "o-", label="class accuracy")
    if runs and "prompt_check" in runs[0]:
        ax_acc.plot(
            scales, [r["prompt_check"]["overall"] for r in runs], "s--", label="prompt check"
        )
    ax_acc.set(xlabel="guidance scale", ylabel="fraction", ylim=(0, 1.02), title="judge accuracy")
    if ax_acc.lines:
        ax_acc.legend()
    ax_fd.plot(scales, [r["frechet"] for r in runs], "o-", label="generated vs held-out")
    ax_fd.axhline(
        result["floor"]["train_vs_heldout"], color="gray", ls="--", label="real train vs held-out"
    )
    ax_fd.set(xlabel="guidance scale", ylabel="Fréchet distance", title="judge-feature Fréchet")
    ax_fd.legend()
    fig.tight_layout()
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)

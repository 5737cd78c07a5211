"""Plots of evaluation results."""

from __future__ import annotations

from pathlib import Path
from typing import Any


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

"""Image helpers every stage shares: tensor <-> uint8 <-> PIL, grids, atomic PNGs, affine warps.

The library's convention is float tensors [B, 3, H, W] in [-1, 1]; PIL images and uint8 arrays
[B, H, W, 3] exist only at the edges (files, the Pipeline's output, the judge's inputs).
"""

from __future__ import annotations

import os
import uuid
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from einops import rearrange
from PIL import Image, ImageDraw


def to_uint8(images: torch.Tensor) -> np.ndarray:
    """[B, 3, H, W] in [-1, 1] -> uint8 [B, H, W, 3] (clamped, rounded)."""
    x = ((images.detach().float().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8)
    return rearrange(x, "b c h w -> b h w c").cpu().numpy()


def to_pil(images: torch.Tensor) -> list[Image.Image]:
    """[B, 3, H, W] in [-1, 1] -> PIL RGB images."""
    return [Image.fromarray(a) for a in to_uint8(images)]


def to_tensor_images(images: Any) -> torch.Tensor:
    """PIL images, a uint8 / float-[0, 1] array [N, H, W, 3] or a [-1, 1] tensor [N, 3, H, W]
    -> float [N, 3, H, W] in [-1, 1] on the CPU."""
    if torch.is_tensor(images):
        return images.float().cpu()
    if isinstance(images, list | tuple) and images and isinstance(images[0], Image.Image):
        images = np.stack([np.asarray(im.convert("RGB")) for im in images])
    arr = np.asarray(images)
    if arr.ndim != 4 or arr.shape[-1] != 3:
        raise ValueError(f"expected images [N, H, W, 3], got shape {arr.shape}")
    unit = arr.astype(np.float32) / 255.0 if arr.dtype == np.uint8 else arr.astype(np.float32)
    return rearrange(torch.from_numpy(unit), "n h w c -> n c h w") * 2 - 1


def image_grid(
    images: Sequence[Image.Image],
    cols: int,
    *,
    gap: int = 0,
    border: int | None = None,
    background: tuple[int, int, int] = (0, 0, 0),
    labels: Sequence[str] | None = None,
    scale: int = 1,
) -> Image.Image:
    """Tile equally sized images row by row: `gap` px between cells and `border` px (default:
    `gap`) around them, each cell enlarged `scale` times (nearest, so pixels stay pixels), an optional label per row
    written in a left margin."""
    if not images:
        raise ValueError("image_grid needs at least one image")
    border = gap if border is None else border
    if cols < 1 or scale < 1 or gap < 0 or border < 0:
        raise ValueError(
            f"need cols >= 1, scale >= 1, gap and border >= 0; got {cols}, {scale}, {gap}, {border}"
        )
    w, h = images[0].size
    w, h = w * scale, h * scale
    rows = -(-len(images) // cols)
    if labels is not None and len(labels) != rows:
        raise ValueError(f"{len(labels)} labels for {rows} rows")
    margin = (8 + 6 * max(len(s) for s in labels)) if labels else 0
    size = (
        margin + 2 * border + cols * w + (cols - 1) * gap,
        2 * border + rows * h + (rows - 1) * gap,
    )
    grid = Image.new("RGB", size, background)
    for i, img in enumerate(images):
        r, c = divmod(i, cols)
        cell = img.resize((w, h), Image.Resampling.NEAREST) if scale > 1 else img
        grid.paste(cell, (margin + border + c * (w + gap), border + r * (h + gap)))
    if labels:
        draw = ImageDraw.Draw(grid)
        for r, text in enumerate(labels):
            draw.text((4, border + r * (h + gap) + h // 2 - 5), text, fill=(255, 255, 255))
    return grid


def viewing_grid(
    images: Sequence[Image.Image], cols: int, *, labels: Sequence[str] | None = None
) -> Image.Image:
    """A grid for people: small images enlarged (nearest) to about 128 px per cell, a 2 px gap,
    one label per row (e.g. the class or the prompt)."""
    scale = max(1, 128 // max(images[0].size)) if images else 1
    return image_grid(images, cols, gap=2, background=(40, 40, 40), labels=labels, scale=scale)


def save_png(image: Image.Image, path: str | Path) -> Path:
    """Write a PNG atomically (a reader sees the old file or the new one, never half of one)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".tmp-{path.name}-{uuid.uuid4().hex[:8]}")
    try:
        image.save(tmp, format="PNG")
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
    return path


def affine_warp(
    images: torch.Tensor,
    angle: torch.Tensor,
    scale: torch.Tensor,
    shift: torch.Tensor,
    *,
    flip: torch.Tensor | None = None,
    mode: str = "bilinear",
    padding: str = "zeros",
) -> torch.Tensor:
    """Rotate (rad), zoom and shift images [B, C, H, W] (per-row angle [B], scale [B], shift
    [B, 2] in [-1, 1] grid units, optional mirror flip [B] in {0, 1}); pixels from outside the
    image are `padding` ("zeros" | "border" | "reflection") of the values as given."""
    cos, sin = torch.cos(angle) / scale, torch.sin(angle) / scale
    sign = 1.0 - 2.0 * flip if flip is not None else torch.ones_like(cos)  # -1 mirrors x
    theta = torch.stack(
        [
            torch.stack([cos * sign, -sin, shift[:, 0]], -1),
            torch.stack([sin * sign, cos, shift[:, 1]], -1),
        ],
        dim=1,
    )  # [B, 2, 3]: output grid -> input sampling location
    grid = F.affine_grid(theta, list(images.shape), align_corners=False)  # [B, H, W, 2]
    return F.grid_sample(images, grid, mode=mode, padding_mode=padding, align_corners=False)

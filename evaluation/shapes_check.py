"""Program check of `shapes` prompts: does each image show the colour, shape, position and size
its prompt names?

The vocabulary and rendering conventions come from the generator (tokenizer/embedded.py): palette,
background, 3x3 grid, radii per size and the drawing routine itself, so the check follows the
data if the generator changes. Reading an image: segment the pixels that differ from the
background, keep the largest 8-connected component, then
- colour = palette colour nearest to the component's mean colour,
- position = grid cell of the bounding-box centre (the centroid of a triangle sits low),
- size = the size whose drawn extent (2r + 1) is nearest to the bounding-box extent,
- shape = nearest template in (fill ratio of the bounding box, top/bottom imbalance): a circle
  fills ~0.785, a square 1.0, a triangle ~0.5 and is heavier at the bottom (the imbalance also
  separates circle from triangle at 3x3 pixels, where their fill ratios coincide). Templates are
  drawn with the generator's own `draw_shape` at the measured radius.
"""

from __future__ import annotations

import functools
import re
from collections.abc import Sequence
from dataclasses import asdict, dataclass

import numpy as np
import torch
from PIL import Image, ImageDraw
from scipy import ndimage

from tokenizer.embedded import (
    BACKGROUND,
    COLORS,
    POSITIONS,
    SHAPES,
    SIZES,
    draw_shape,
    shape_radius,
)

ATTRIBUTES = ("color", "shape", "position", "size")
FOREGROUND_THRESHOLD = 0.3  # max |pixel - background| over channels, in [0, 1] units


@dataclass
class ShapeAttributes:
    """What a prompt asks for or an image shows; None = not named / not found."""

    color: str | None = None
    shape: str | None = None
    position: str | None = None
    size: str | None = None


# ---- prompts --------------------------------------------------------------------------------------
def _word_pattern(words: Sequence[str]) -> re.Pattern[str]:
    alternatives = "|".join(re.escape(w) for w in sorted(words, key=len, reverse=True))
    return re.compile(rf"\b({alternatives})\b")


_COLOR_RE = _word_pattern(list(COLORS))
_SHAPE_RE = _word_pattern(SHAPES)
_SIZE_RE = _word_pattern(SIZES)
_PHRASES = {phrase: name for name, (_, phrase) in POSITIONS.items()}
_POSITION_RE = _word_pattern(list(_PHRASES))


def parse_prompt(prompt: str) -> ShapeAttributes:
    """Attributes named by a caption ("a small red circle at the top left") or a class name
    ("red circle"); position needs the caption phrase ("at the top left", "in the center")."""
    text = prompt.lower()

    def find(pattern: re.Pattern[str]) -> str | None:
        m = pattern.search(text)
        return m.group(1) if m else None

    phrase = find(_POSITION_RE)
    return ShapeAttributes(
        color=find(_COLOR_RE),
        shape=find(_SHAPE_RE),
        position=_PHRASES[phrase] if phrase else None,
        size=find(_SIZE_RE),
    )


# ---- images ---------------------------------------------------------------------------------------
def _mask_features(mask: np.ndarray) -> tuple[float, float]:
    """(fill ratio of the bounding box, (area below centre - area above) / area) of a mask."""
    ys, xs = np.nonzero(mask)
    y0, y1, x0, x1 = ys.min(), ys.max(), xs.min(), xs.max()
    fill = len(ys) / ((y1 - y0 + 1) * (x1 - x0 + 1))
    mid = (y0 + y1) / 2
    imbalance = (np.sum(ys > mid) - np.sum(ys < mid)) / len(ys)
    return float(fill), float(imbalance)


@functools.lru_cache(maxsize=256)
def _templates(radius: int) -> dict[str, tuple[float, float]]:
    """Features of each shape drawn by the generator at half-extent `radius`."""
    side = 2 * radius + 3
    out = {}
    for shape in SHAPES:
        canvas = Image.new("L", (side, side), 0)
        draw_shape(ImageDraw.Draw(canvas), shape, side // 2, side // 2, radius, 255)
        out[shape] = _mask_features(np.asarray(canvas) > 0)
    return out


def _to_uint8(image: np.ndarray | torch.Tensor | Image.Image) -> np.ndarray:
    """[H, W, 3] uint8 from PIL, uint8 HWC, float HWC in [0, 1] or a float [3, H, W] in [-1, 1]."""
    if isinstance(image, Image.Image):
        return np.asarray(image.convert("RGB"), dtype=np.uint8)
    if torch.is_tensor(image):
        if image.ndim != 3 or image.shape[0] != 3:
            raise ValueError(
                f"tensor images must be [3, H, W] in [-1, 1], got {tuple(image.shape)}"
            )
        unit = ((image.detach().float().cpu() + 1) / 2).clamp(0, 1).permute(1, 2, 0).numpy()
        return np.rint(unit * 255).astype(np.uint8)
    arr = np.asarray(image)
    if arr.ndim != 3 or arr.shape[-1] != 3:
        raise ValueError(f"array images must be [H, W, 3], got {arr.shape}")
    if arr.dtype == np.uint8:
        return arr
    return np.rint(np.clip(arr.astype(np.float64), 0, 1) * 255).astype(np.uint8)


def _largest_component(binary: np.ndarray) -> np.ndarray | None:
    """The largest 8-connected component of a boolean mask (None if the mask is empty)."""
    labels, n = ndimage.label(binary, structure=np.ones((3, 3), bool))
    if n == 0:
        return None
    return labels == int(np.argmax(np.bincount(labels.ravel())[1:])) + 1


def read_image(image: np.ndarray | torch.Tensor | Image.Image) -> ShapeAttributes:
    """The attributes an image shows (all None when nothing but background is found)."""
    rgb = _to_uint8(image).astype(np.float64)  # [H, W, 3]
    h, w = rgb.shape[:2]
    diff = np.abs(rgb - np.asarray(BACKGROUND, np.float64)).max(axis=-1) / 255.0
    mask = _largest_component(diff > FOREGROUND_THRESHOLD)
    if mask is None:
        return ShapeAttributes()
    # half-maximum re-segmentation: a blurred edge crosses half the peak where the sharp edge was
    peak = float(np.percentile(diff[mask], 90))
    mask = _largest_component(diff >= max(FOREGROUND_THRESHOLD, 0.5 * peak))
    if mask is None:
        return ShapeAttributes()
    ys, xs = np.nonzero(mask)

    core = mask & (diff >= 0.8 * peak)  # colour from the flat interior, not the blended rim
    mean = rgb[core if core.any() else mask].mean(axis=0)
    names = list(COLORS)
    palette = np.asarray([COLORS[c] for c in names], np.float64)
    color = names[int(np.argmin(((palette - mean) ** 2).sum(axis=1)))]

    cx, cy = (xs.min() + xs.max() + 1) / 2, (ys.min() + ys.max() + 1) / 2  # continuous coords
    col, row = min(2, int(cx * 3 / w)), min(2, int(cy * 3 / h))
    position = next(name for name, ((r, c), _) in POSITIONS.items() if (r, c) == (row, col))

    extent = max(ys.max() - ys.min(), xs.max() - xs.min()) + 1
    res = min(h, w)
    size = min(SIZES, key=lambda s: abs(2 * shape_radius(s, res) + 1 - extent))

    features = np.asarray(_mask_features(mask))
    templates = _templates(max(1, int(round((extent - 1) / 2))))
    shape = min(SHAPES, key=lambda s: float(np.abs(features - np.asarray(templates[s])).sum()))
    return ShapeAttributes(color=color, shape=shape, position=position, size=size)


def check_shapes(
    images: torch.Tensor | Sequence[np.ndarray | Image.Image], prompts: Sequence[str]
) -> dict[str, float | int | dict[str, int] | None]:
    """Fraction of images matching their prompt, per attribute and overall.

    `images`: float [B, 3, H, W] in [-1, 1], or a list of PIL images / HWC arrays. Each attribute
    is scored over the prompts that name it (None if none does); `overall` = every named
    attribute matches; `found` = an object was segmented at all.
    """
    if len(images) != len(prompts):
        raise ValueError(f"got {len(images)} images but {len(prompts)} prompts")
    if len(prompts) == 0:
        raise ValueError("no images to check")
    hits = dict.fromkeys(ATTRIBUTES, 0)
    named = dict.fromkeys(ATTRIBUTES, 0)
    overall = found = 0
    for image, prompt in zip(images, prompts):
        want, got = asdict(parse_prompt(prompt)), asdict(read_image(image))
        found += got["shape"] is not None
        ok = True
        for attr in ATTRIBUTES:
            if want[attr] is None:
                continue
            named[attr] += 1
            match = want[attr] == got[attr]
            hits[attr] += match
            ok &= match
        overall += ok
    out: dict[str, float | int | dict[str, int] | None] = {
        attr: (hits[attr] / named[attr] if named[attr] else None) for attr in ATTRIBUTES
    }
    out["overall"] = overall / len(prompts)
    out["found"] = found / len(prompts)
    out["count"] = len(prompts)
    out["named"] = named
    return out

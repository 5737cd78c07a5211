"""Offline datasets bundled with scikit-learn / scikit-image or drawn by a program.

- digits: sklearn's 1,797 handwritten 8x8 digits (17 grey levels 0..16), white ink on black,
  upsampled with NEAREST by an integer factor, so taking every k-th pixel and mapping
  p -> round(p * 16 / 255) gives back the source exactly. Split: images 0..1499 train, the last
  297 (other writers) test. Labels "0".."9"; captions "a handwritten digit seven".
- photos: seeded square crops (side log-uniform between min_side/8 and min_side) of the colour
  photographs shipped inside scikit-image (no download), resized with LANCZOS. Whole photographs
  are held out: "coffee" and "rocket" make the test split. Label = photograph.
- shapes: one shape (circle, square, triangle) of one colour, in one cell of a 3x3 grid, small or
  large, on a black background, drawn without anti-aliasing so every shape pixel has exactly the
  named colour. Label = the combined "<colour> <shape>" class (18 classes): a class-conditional
  prior is then checkable on two attributes; position and size live in the caption. Ground truth
  columns: color, shape, position, size, center_x, center_y, radius (pixels). Train and test use
  different seeds.
"""

from __future__ import annotations

import functools

import datasets
import numpy as np
from PIL import Image, ImageDraw

NAMES = ("digits", "photos", "shapes")
SPLITS = ("train", "test")

DIGIT_WORDS = ("zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine")
DIGITS_TEST_START = 1500

# photograph -> caption subject; all ship inside scikit-image (no download needed)
PHOTOS = {
    "astronaut": "an astronaut",
    "chelsea": "a cat",
    "coffee": "a cup of coffee",
    "rocket": "a rocket on its launch pad",
    "motorcycle": "a motorcycle",
    "hubble_deep_field": "galaxies in deep space",
    "immunohistochemistry": "stained tissue under a microscope",
    "retina": "a retina",
}
PHOTOS_TEST = ("coffee", "rocket")

SHAPES = ("circle", "square", "triangle")
COLORS = {
    "red": (220, 40, 40),
    "green": (40, 180, 60),
    "blue": (50, 80, 230),
    "yellow": (235, 210, 40),
    "purple": (150, 60, 190),
    "orange": (245, 140, 30),
}
BACKGROUND = (0, 0, 0)
# position name -> (row, col) in the 3x3 grid, and its phrase in captions
POSITIONS = {
    "top left": ((0, 0), "at the top left"),
    "top": ((0, 1), "at the top"),
    "top right": ((0, 2), "at the top right"),
    "left": ((1, 0), "on the left"),
    "center": ((1, 1), "in the center"),
    "right": ((1, 2), "on the right"),
    "bottom left": ((2, 0), "at the bottom left"),
    "bottom": ((2, 1), "at the bottom"),
    "bottom right": ((2, 2), "at the bottom right"),
}
SIZES = ("small", "large")
SHAPE_CLASSES = [f"{c} {s}" for c in COLORS for s in SHAPES]
SHAPES_DEFAULT_COUNT = {"train": 8000, "test": 1000}


def _check(name: str, split: str, resolution: int) -> None:
    if name not in NAMES:
        raise ValueError(f"unknown embedded dataset {name!r}; choose one of {NAMES}")
    if split not in SPLITS:
        raise ValueError(f"split must be one of {SPLITS}, got {split!r}")
    if resolution < 8:
        raise ValueError(f"resolution must be >= 8, got {resolution}")


def load_embedded(name: str, split: str, resolution: int) -> datasets.Dataset:
    """The `name` dataset ("digits" | "photos" | "shapes") at `resolution` with default sizes."""
    _check(name, split, resolution)
    if name == "digits":
        return load_digits(split, resolution)
    if name == "photos":
        return load_photos(split, resolution)
    return load_shapes(split, resolution)


# ---- digits -------------------------------------------------------------------------------------
@functools.lru_cache(maxsize=4)
def load_digits(split: str, resolution: int) -> datasets.Dataset:
    """sklearn digits, white on black, NEAREST-upsampled by resolution / 8 (must be an integer)."""
    from sklearn.datasets import load_digits as sk_digits

    _check("digits", split, resolution)
    if resolution % 8:
        raise ValueError(
            f"digits resolution must be a multiple of 8 (exact upsampling), got {resolution}"
        )
    bunch = sk_digits()
    idx = np.arange(len(bunch.target))
    idx = idx[idx < DIGITS_TEST_START] if split == "train" else idx[idx >= DIGITS_TEST_START]
    grey = np.rint(bunch.images[idx] * 255.0 / 16.0).astype(np.uint8)  # [N, 8, 8]
    k = resolution // 8
    big = grey.repeat(k, axis=1).repeat(k, axis=2)  # [N, R, R] nearest upsampling
    images = [Image.fromarray(np.stack([g, g, g], axis=-1), "RGB") for g in big]
    labels = bunch.target[idx].tolist()
    features = datasets.Features(
        {
            "image": datasets.Image(),
            "label": datasets.ClassLabel(names=[str(d) for d in range(10)]),
            "caption": datasets.Value("string"),
        }
    )
    captions = [f"a handwritten digit {DIGIT_WORDS[y]}" for y in labels]
    return datasets.Dataset.from_dict(
        {"image": images, "label": labels, "caption": captions}, features=features
    )


# ---- photos -------------------------------------------------------------------------------------
def _photo(name: str) -> np.ndarray:
    import skimage.data

    if name == "motorcycle":
        return skimage.data.stereo_motorcycle()[0]  # left view only: the right is near-identical
    return getattr(skimage.data, name)()


@functools.lru_cache(maxsize=4)
def load_photos(
    split: str, resolution: int, crops_per_photo: int = 64, seed: int = 0
) -> datasets.Dataset:
    """Seeded random square crops of scikit-image's colour photographs; test = held-out photos."""
    _check("photos", split, resolution)
    if crops_per_photo < 1:
        raise ValueError(f"crops_per_photo must be >= 1, got {crops_per_photo}")
    names = list(PHOTOS)
    chosen = [n for n in names if (n in PHOTOS_TEST) == (split == "test")]
    images, labels, captions = [], [], []
    for name in chosen:
        photo = Image.fromarray(_photo(name)).convert("RGB")
        w, h = photo.size
        rng = np.random.default_rng([seed, names.index(name)])
        lo, hi = np.log(max(resolution, min(w, h) / 8)), np.log(min(w, h))
        for _ in range(crops_per_photo):
            side = int(round(np.exp(rng.uniform(lo, hi))))
            x0 = int(rng.integers(0, w - side + 1))
            y0 = int(rng.integers(0, h - side + 1))
            crop = photo.crop((x0, y0, x0 + side, y0 + side))
            images.append(crop.resize((resolution, resolution), Image.Resampling.LANCZOS))
            labels.append(names.index(name))
            captions.append(f"a photograph of {PHOTOS[name]}")
    features = datasets.Features(
        {
            "image": datasets.Image(),
            "label": datasets.ClassLabel(names=names),
            "caption": datasets.Value("string"),
        }
    )
    return datasets.Dataset.from_dict(
        {"image": images, "label": labels, "caption": captions}, features=features
    )


# ---- shapes -------------------------------------------------------------------------------------
def shape_radius(size: str, resolution: int) -> int:
    """Half-extent in pixels of a `size` shape: large nearly fills a grid cell, small about half."""
    cell = resolution / 3
    return max(2, round(0.45 * cell)) if size == "large" else max(1, round(0.22 * cell))


def draw_shape(
    draw: ImageDraw.ImageDraw, shape: str, cx: int, cy: int, r: int, color: tuple[int, int, int]
) -> None:
    """Filled shape centred on (cx, cy) with half-extent r; (cx, cy) is always inside it."""
    if shape == "circle":
        draw.ellipse([cx - r, cy - r, cx + r, cy + r], fill=color)
    elif shape == "square":
        draw.rectangle([cx - r, cy - r, cx + r, cy + r], fill=color)
    elif shape == "triangle":
        draw.polygon([(cx, cy - r), (cx + r, cy + r), (cx - r, cy + r)], fill=color)
    else:
        raise ValueError(f"shape must be one of {SHAPES}, got {shape!r}")


@functools.lru_cache(maxsize=4)
def load_shapes(
    split: str, resolution: int, num_scenes: int | None = None, seed: int | None = None
) -> datasets.Dataset:
    """Procedural one-shape scenes; seed defaults to 0 for train and 1 for test."""
    _check("shapes", split, resolution)
    if resolution < 12:
        raise ValueError(f"shapes resolution must be >= 12 (3x3 grid of shapes), got {resolution}")
    n = SHAPES_DEFAULT_COUNT[split] if num_scenes is None else num_scenes
    if n < 1:
        raise ValueError(f"num_scenes must be >= 1, got {n}")
    rng = np.random.default_rng(SPLITS.index(split) if seed is None else seed)
    colors, positions, cell = list(COLORS), list(POSITIONS), resolution / 3
    rows: dict[str, list] = {
        k: []
        for k in ("image", "label", "caption", "color", "shape", "position", "size")
        + ("center_x", "center_y", "radius")
    }
    for _ in range(n):
        shape = SHAPES[rng.integers(len(SHAPES))]
        color = colors[rng.integers(len(colors))]
        position = positions[rng.integers(len(positions))]
        size = SIZES[rng.integers(len(SIZES))]
        (row, col), phrase = POSITIONS[position]
        r = shape_radius(size, resolution)
        jitter = max(0, int((cell / 2 - r) / 2))  # stays inside its grid cell
        cx = int((col + 0.5) * cell) + int(rng.integers(-jitter, jitter + 1))
        cy = int((row + 0.5) * cell) + int(rng.integers(-jitter, jitter + 1))
        image = Image.new("RGB", (resolution, resolution), BACKGROUND)
        draw_shape(ImageDraw.Draw(image), shape, cx, cy, r, COLORS[color])
        values = {
            "image": image,
            "label": SHAPE_CLASSES.index(f"{color} {shape}"),
            "caption": f"a {size} {color} {shape} {phrase}",
            "color": color,
            "shape": shape,
            "position": position,
            "size": size,
            "center_x": cx,
            "center_y": cy,
            "radius": r,
        }
        for k, v in values.items():
            rows[k].append(v)
    features = datasets.Features(
        {
            "image": datasets.Image(),
            "label": datasets.ClassLabel(names=SHAPE_CLASSES),
            "caption": datasets.Value("string"),
            "color": datasets.Value("string"),
            "shape": datasets.Value("string"),
            "position": datasets.Value("string"),
            "size": datasets.Value("string"),
            "center_x": datasets.Value("int32"),
            "center_y": datasets.Value("int32"),
            "radius": datasets.Value("int32"),
        }
    )
    return datasets.Dataset.from_dict(rows, features=features)

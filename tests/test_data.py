"""Embedded datasets and the image data pipeline: exact pixels, ground truth, clear errors."""

from __future__ import annotations

import json
import warnings

import datasets
import numpy as np
import pytest
import torch
from PIL import Image
from sklearn.datasets import load_digits as sk_digits

from tokenizer.data import DataConfig, ImageTransform, load_image_dataset, make_dataloader, to_rgb
from tokenizer.embedded import (
    BACKGROUND,
    COLORS,
    DIGIT_WORDS,
    PHOTOS_TEST,
    POSITIONS,
    SHAPE_CLASSES,
    load_embedded,
    load_photos,
    load_shapes,
)


def save_png(path, size=(20, 20), color=(10, 200, 30), mode="RGB") -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new(mode, size, color).save(path)


# ---- embedded -----------------------------------------------------------------------------------
def test_digits_nearest_upsampling_round_trips_exactly() -> None:
    source = sk_digits()
    for split, rows in (("train", slice(0, 1500)), ("test", slice(1500, None))):
        ds = load_embedded("digits", split, 32)
        want = source.images[rows].astype(np.int64)  # [N, 8, 8] in 0..16
        assert len(ds) == len(want) and ds.features["label"].names == [str(d) for d in range(10)]
        assert ds["label"] == source.target[rows].tolist()
        pixels = np.stack([np.asarray(im) for im in ds["image"]])  # [N, 32, 32, 3]
        assert pixels.shape[1:] == (32, 32, 3)
        assert (pixels == pixels[..., :1]).all()  # grey in RGB
        blocks = pixels[:, :, :, 0].reshape(-1, 8, 4, 8, 4)
        assert (blocks == blocks[:, :, :1, :, :1]).all()  # every 4x4 block is one source pixel
        back = np.rint(pixels[:, ::4, ::4, 0].astype(np.float64) * 16 / 255).astype(np.int64)
        assert np.array_equal(back, want)
    assert ds[0]["caption"] == f"a handwritten digit {DIGIT_WORDS[ds[0]['label']]}"
    assert DIGIT_WORDS[7] == "seven"
    with pytest.raises(ValueError, match="multiple of 8"):
        load_embedded("digits", "train", 30)
    with pytest.raises(ValueError, match="unknown embedded"):
        load_embedded("letters", "train", 32)


def test_shapes_ground_truth_matches_pixels() -> None:
    ds = load_shapes("train", 32, num_scenes=60)
    assert ds.features["label"].names == SHAPE_CLASSES
    cell = 32 / 3
    for row in ds:
        px = np.asarray(row["image"])  # [32, 32, 3]
        color = np.array(COLORS[row["color"]])
        assert np.array_equal(px[row["center_y"], row["center_x"]], color)
        is_bg = (px == BACKGROUND).all(-1)
        assert ((px == color).all(-1) | is_bg).all()  # no anti-aliased mixtures
        ys, xs = np.nonzero(~is_bg)
        (r, c), phrase = POSITIONS[row["position"]]
        assert int(ys.mean() // cell) == r and int(xs.mean() // cell) == c
        extent = max(ys.max() - ys.min(), xs.max() - xs.min()) + 1
        assert extent == 2 * row["radius"] + 1
        assert row["caption"] == f"a {row['size']} {row['color']} {row['shape']} {phrase}"
        assert SHAPE_CLASSES[row["label"]] == f"{row['color']} {row['shape']}"
    big = [r["radius"] for r in ds if r["size"] == "large"]
    small = [r["radius"] for r in ds if r["size"] == "small"]
    assert min(big) > max(small)
    test = load_shapes("test", 32, num_scenes=60)
    assert test["caption"] != ds["caption"]  # different seeds
    again = load_shapes.__wrapped__("train", 32, num_scenes=60)
    assert (
        again["caption"] == ds["caption"]
        and again[7]["image"].tobytes() == ds[7]["image"].tobytes()
    )


def test_photos_hold_out_whole_photographs() -> None:
    train = load_photos("train", 16, crops_per_photo=3)
    test = load_photos("test", 16, crops_per_photo=3)
    names = train.features["label"].names
    assert names == test.features["label"].names
    assert {names[i] for i in test["label"]} == set(PHOTOS_TEST)
    assert not {names[i] for i in train["label"]} & set(PHOTOS_TEST)
    assert len(test) == 3 * len(PHOTOS_TEST) and train[0]["image"].size == (16, 16)
    again = load_photos.__wrapped__("train", 16, crops_per_photo=3)
    assert all(a.tobytes() == b.tobytes() for a, b in zip(train["image"], again["image"]))


# ---- transform ----------------------------------------------------------------------------------
def test_transform_exact_values_resize_crop_flip() -> None:
    arr = np.random.default_rng(0).integers(0, 256, (8, 8, 3), dtype=np.uint8)
    t = ImageTransform(8)(Image.fromarray(arr))
    assert t.shape == (3, 8, 8) and t.dtype == torch.float32
    torch.testing.assert_close(t, torch.tensor(arr).permute(2, 0, 1).float() / 127.5 - 1)
    wide = ImageTransform(8, interpolation="nearest")(Image.new("RGB", (40, 20), (255, 0, 0)))
    assert wide.shape == (3, 8, 8) and wide[0].eq(1).all() and wide[1:].eq(-1).all()
    flip = ImageTransform(8, flip=True, random_crop=True)
    g1, g2 = torch.Generator().manual_seed(3), torch.Generator().manual_seed(3)
    wide_img = Image.fromarray(
        np.random.default_rng(1).integers(0, 256, (8, 30, 3), dtype=np.uint8)
    )
    outs1 = [flip(wide_img, g1) for _ in range(6)]
    outs2 = [flip(wide_img, g2) for _ in range(6)]
    assert all(torch.equal(a, b) for a, b in zip(outs1, outs2))  # seeded
    assert len({o.sum().item() for o in outs1}) > 1  # but not constant


def test_to_rgb_conversions_and_wrong_channel_count() -> None:
    grey = to_rgb(Image.new("L", (4, 4), 77))
    assert grey.mode == "RGB" and np.asarray(grey)[0, 0].tolist() == [77, 77, 77]
    clear = to_rgb(Image.new("RGBA", (4, 4), (0, 0, 0, 0)))
    assert np.asarray(clear)[0, 0].tolist() == [255, 255, 255]  # transparency over white
    assert to_rgb(np.zeros((4, 4, 4), np.uint8)).mode == "RGB"
    assert np.asarray(to_rgb(np.ones((4, 4), np.float32)))[0, 0].tolist() == [255, 255, 255]
    with pytest.raises(ValueError, match=r"C in \(1, 3, 4\).*\(4, 4, 2\)"):
        to_rgb(np.zeros((4, 4, 2), np.uint8))
    with pytest.raises(ValueError, match="5"):
        ImageTransform(4)(np.zeros((4, 4, 5), np.uint8))


# ---- sources ------------------------------------------------------------------------------------
def folder(tmp_path):
    root = tmp_path / "imgs"
    save_png(root / "cats" / "a.png", (24, 20))
    save_png(root / "cats" / "b.jpg", (30, 16), (250, 250, 0))
    save_png(root / "dogs" / "c.png", (16, 16), 120, mode="L")
    (root / "dogs" / "bad.png").write_bytes(b"\x89PNG\r\n\x1a\n not really a png")
    (root / "metadata.jsonl").write_text(
        json.dumps({"file_name": "cats/a.png", "caption": "a green cat"})
        + "\n"
        + json.dumps({"file_name": "dogs/c.png", "caption": "a grey dog"})
        + "\n"
    )
    return root


def test_image_folder_labels_captions_and_corrupt_file(tmp_path) -> None:
    root = folder(tmp_path)
    cfg = DataConfig(source=str(root), resolution=16)
    with pytest.warns(UserWarning, match=r"skipped 1 unreadable image.*bad\.png"):
        ds = load_image_dataset(cfg, "train")
    assert len(ds) == 3 and ds["index"] == [0, 1, 2]
    assert ds.features["label"].names == ["cats", "dogs"]
    assert ds["label"] == [0, 0, 1]
    assert ds["caption"] == ["a green cat", "", "a grey dog"]
    transform = ImageTransform.from_config(cfg, train=True)
    batch = next(iter(make_dataloader(ds, 3, False, 0, transform=transform)))
    assert batch["image"].shape == (3, 3, 16, 16) and batch["image"].dtype == torch.float32
    assert batch["image"].min() >= -1 and batch["image"].max() <= 1
    assert batch["label"].tolist() == [0, 0, 1] and batch["index"].tolist() == [0, 1, 2]
    assert batch["caption"][0] == "a green cat"
    with pytest.raises(ValueError, match=r"bad\.png"):
        load_image_dataset(DataConfig(source=str(root), resolution=16, strict=True), "train")
    with pytest.raises(ValueError, match=r"split 'test' not found.*\['train'\]"):
        load_image_dataset(cfg, "test")


def test_image_folder_errors_empty_and_too_small(tmp_path) -> None:
    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match="no images.*empty"):
        load_image_dataset(DataConfig(source=str(tmp_path / "empty")), "train")
    save_png(tmp_path / "small" / "tiny.png", (12, 40))
    with pytest.raises(ValueError, match=r"tiny\.png is 12x40, smaller than the 16x16"):
        load_image_dataset(DataConfig(source=str(tmp_path / "small"), resolution=16), "train")
    ok = load_image_dataset(DataConfig(source=str(tmp_path / "small"), resolution=16, upscale=True))
    assert ok["label"] == [-1] and ok["caption"] == [""]
    assert ImageTransform(16, upscale=True)(ok[0]["image"]).shape == (3, 16, 16)
    with pytest.raises(ValueError, match=r"tiny\.png is 12x40"):
        ImageTransform(16)(Image.open(tmp_path / "small" / "tiny.png"))
    with pytest.raises(ValueError, match="does not exist"):
        load_image_dataset(DataConfig(source=str(tmp_path / "missing")), "train")


def test_split_folders_saved_dataset_and_parquet(tmp_path, monkeypatch) -> None:
    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", str(tmp_path / "cache"))
    save_png(tmp_path / "split" / "train" / "x.png")
    save_png(tmp_path / "split" / "test" / "y.png")
    save_png(tmp_path / "split" / "test" / "z.png")
    split_cfg = DataConfig(source=str(tmp_path / "split"), resolution=16)
    assert len(load_image_dataset(split_cfg, "test")) == 2

    images = [Image.new("RGB", (16, 16), (i * 40, 0, 0)) for i in range(3)]
    raw = datasets.Dataset.from_dict(
        {"img": images, "text": ["a", "b", "c"]},
        features=datasets.Features({"img": datasets.Image(), "text": datasets.Value("string")}),
    )
    raw.save_to_disk(str(tmp_path / "saved"))
    raw.to_parquet(str(tmp_path / "data.parquet"))
    for source in ("saved", "data.parquet"):
        cfg = DataConfig(
            source=str(tmp_path / source), resolution=16, image_column="img", caption_column="text"
        )
        ds = load_image_dataset(cfg, "train")
        assert (
            ds["caption"] == ["a", "b", "c"]
            and ds["label"] == [-1, -1, -1]
            and ds["index"] == [0, 1, 2]
        )
        assert np.asarray(ds[2]["image"])[0, 0].tolist() == [80, 0, 0]
    with pytest.raises(ValueError, match="image column 'image' not found"):
        load_image_dataset(DataConfig(source=str(tmp_path / "saved")), "train")


def test_hub_names_are_refused_offline(monkeypatch) -> None:
    from huggingface_hub import constants

    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    with pytest.raises(ValueError, match="offline"):
        load_image_dataset(DataConfig(source="someone/some-images"), "train")


def test_digits_through_the_loader_are_exact_and_seeded() -> None:
    cfg = DataConfig(source="digits", resolution=16, max_samples=64)
    ds = load_image_dataset(cfg, "train")
    assert len(ds) == 64 and ds["index"] == list(range(64))
    transform = ImageTransform.from_config(cfg, train=True)
    batches = [
        next(iter(make_dataloader(ds, 8, True, seed=5, transform=transform))) for _ in range(2)
    ]
    assert torch.equal(batches[0]["index"], batches[1]["index"])  # same seed, same order
    other = next(iter(make_dataloader(ds, 8, True, seed=6, transform=transform)))
    assert not torch.equal(other["index"], batches[0]["index"])
    b = batches[0]
    pixels = ((b["image"] + 1) * 127.5).round().to(torch.uint8)  # back to the stored bytes
    for k, i in enumerate(b["index"].tolist()):
        want = torch.tensor(np.asarray(ds[i]["image"])).permute(2, 0, 1)
        assert torch.equal(pixels[k], want)
        assert b["label"][k].item() == ds[i]["label"] and b["caption"][k] == ds[i]["caption"]


def test_augmentation_is_a_function_of_seed_epoch_and_sample() -> None:
    """Random crops/flips depend on (seed, epoch, index) only: the same in any access order and
    with worker processes, new each epoch, so a resumed run redraws them without saved state."""
    ds = load_image_dataset(DataConfig(source="digits", resolution=16, max_samples=16), "train")
    transform = ImageTransform(12, resize=False, random_crop=True, flip=True)

    def epoch_images(epoch: int, workers: int = 0) -> torch.Tensor:
        loader = make_dataloader(ds, 4, False, seed=3, num_workers=workers, transform=transform)
        loader.dataset.set_epoch(epoch)
        return torch.cat([b["image"] for b in loader])  # [16, 3, 12, 12]

    first = epoch_images(0)
    assert torch.equal(first, epoch_images(0, workers=2))
    dataset = make_dataloader(ds, 4, False, seed=3, transform=transform).dataset
    backwards = torch.stack([dataset[i]["image"] for i in reversed(range(16))]).flip(0)
    assert torch.equal(first, backwards)
    second = epoch_images(1)
    changed = [not torch.equal(a, b) for a, b in zip(first, second)]
    assert sum(changed) >= 8  # 4x4 crop offsets x flip: most samples change between epochs
    centre = ImageTransform(12, resize=False)  # no random ops: nothing is drawn
    plain = next(iter(make_dataloader(ds, 16, False, seed=3, transform=centre)))["image"]
    assert torch.equal(plain, torch.stack([centre(ds[i]["image"]) for i in range(16)]))


def test_data_config_validation() -> None:
    with pytest.raises(ValueError, match="interpolation"):
        DataConfig(interpolation="cubic")
    with pytest.raises(ValueError, match="max_samples"):
        DataConfig(max_samples=0)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # embedded sources are never verified or warned about
        load_image_dataset(DataConfig(source="shapes", resolution=24, max_samples=4), "test")


def test_viewing_grid_enlarges_nearest_labels_rows_and_keeps_pixels():
    from PIL import Image

    from tokenizer.images import image_grid, viewing_grid

    rng = np.random.default_rng(0)
    cells = [Image.fromarray(rng.integers(0, 256, (32, 32, 3), dtype=np.uint8)) for _ in range(6)]
    grid = viewing_grid(cells, 3, labels=["seven", "three"])  # 2 rows of 3, 4x enlarged
    margin = 8 + 6 * len("three")
    assert grid.size == (margin + 2 * 2 + 3 * 128 + 2 * 2, 2 * 2 + 2 * 128 + 2)
    arr = np.asarray(grid)
    first = arr[2 : 2 + 128, margin + 2 : margin + 2 + 128]  # the first cell
    np.testing.assert_array_equal(first[::4, ::4], np.asarray(cells[0]))  # nearest: exact pixels
    plain = image_grid(cells, 3)
    assert plain.size == (96, 64)
    with pytest.raises(ValueError, match="3 labels for 2 rows"):
        viewing_grid(cells, 3, labels=["a", "b", "c"])

"""Generation evaluation: Fréchet maths, the judge, accuracy bookkeeping, the shapes checker."""

from __future__ import annotations

import random
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from scipy import linalg

from evaluation.frechet import frechet_distance, frechet_from_stats
from evaluation.inception import inception_score, load_inception
from evaluation.judge import Judge, JudgeConfig, JudgeTrainConfig, dataset_images
from evaluation.judge_cache import load_or_train_judge
from evaluation.plots import plot_guidance
from evaluation.prompts import balanced_prompts
from evaluation.real_data import RealData
from evaluation.runner import SampleOptions, evaluate_generation
from evaluation.scores import accuracy_from_predictions, class_accuracy, real_floor
from evaluation.shapes_check import check_shapes, parse_prompt, read_image
from tokenizer.embedded import load_embedded, load_shapes


# ---- Fréchet ----------------------------------------------------------------------------------------
def _spd(rng: np.random.Generator, f: int) -> np.ndarray:
    a = rng.normal(size=(f, f))
    return a @ a.T + 0.1 * np.eye(f)


def test_frechet_identical_sets_is_zero() -> None:
    x = np.random.default_rng(0).normal(size=(200, 8))
    assert frechet_distance(x, x) == pytest.approx(0.0, abs=1e-6)
    assert frechet_distance(torch.from_numpy(x), x.copy()) == pytest.approx(0.0, abs=1e-6)


def test_frechet_closed_forms() -> None:
    # 1-D: (m1 - m2)^2 + (s1 - s2)^2
    assert frechet_from_stats([1.0], [[4.0]], [3.0], [[9.0]]) == pytest.approx(4.0 + 1.0)
    # diagonal (commuting) covariances: |dm|^2 + sum (sqrt(a) - sqrt(b))^2
    a, b = np.array([1.0, 2.0, 5.0]), np.array([3.0, 0.5, 5.0])
    mu_a, mu_b = np.array([0.0, 1.0, 2.0]), np.array([1.0, 1.0, 0.0])
    want = 1.0 + 4.0 + np.sum((np.sqrt(a) - np.sqrt(b)) ** 2)
    assert frechet_from_stats(mu_a, np.diag(a), mu_b, np.diag(b)) == pytest.approx(want)
    # general SPD: the symmetric form tr(A + B - 2 (A^1/2 B A^1/2)^1/2), computed independently
    rng = np.random.default_rng(1)
    s_a, s_b = _spd(rng, 6), _spd(rng, 6)
    m_a, m_b = rng.normal(size=6), rng.normal(size=6)
    root_a = linalg.sqrtm(s_a).real
    w = np.linalg.eigvalsh(root_a @ s_b @ root_a)
    want = np.sum((m_a - m_b) ** 2) + np.trace(s_a) + np.trace(s_b) - 2 * np.sum(np.sqrt(w))
    got = frechet_from_stats(m_a, s_a, m_b, s_b)
    assert got == pytest.approx(want, rel=1e-8)
    assert frechet_from_stats(m_b, s_b, m_a, s_a) == pytest.approx(got, rel=1e-8)  # symmetric


def test_frechet_of_samples_approaches_closed_form() -> None:
    rng = np.random.default_rng(2)
    s_a, s_b = _spd(rng, 4), _spd(rng, 4)
    m_a, m_b = np.zeros(4), np.ones(4)
    x = rng.multivariate_normal(m_a, s_a, size=40000)
    y = rng.multivariate_normal(m_b, s_b, size=40000)
    assert frechet_distance(x, y) == pytest.approx(frechet_from_stats(m_a, s_a, m_b, s_b), rel=0.03)


def test_frechet_singular_covariance_and_bad_input() -> None:
    rng = np.random.default_rng(3)
    x = rng.normal(size=(10, 32))  # N < F: rank-deficient covariances
    d = frechet_distance(x, rng.normal(size=(12, 32)))
    assert np.isfinite(d) and d > 0
    with pytest.raises(ValueError, match="feature widths differ"):
        frechet_distance(x, x[:, :5])
    with pytest.raises(ValueError, match="N >= 2"):
        frechet_distance(x[:1], x)


# ---- accuracy bookkeeping -------------------------------------------------------------------------
def test_accuracy_from_predictions_per_class() -> None:
    names = ["a", "b", "c"]
    labels = torch.tensor([0, 0, 0, 0, 1, 1, 2, 2])
    pred = torch.tensor([0, 0, 0, 1, 1, 0, 2, 2])
    acc = accuracy_from_predictions(pred, labels, names)
    assert acc["overall"] == pytest.approx(6 / 8)
    assert acc["per_class"] == pytest.approx({"a": 0.75, "b": 0.5, "c": 1.0})
    assert acc["mean_per_class"] == pytest.approx(0.75)
    assert acc["count"] == 8
    only_b = accuracy_from_predictions(torch.tensor([1, 2]), torch.tensor([1, 1]), names)
    assert only_b["per_class"] == {"b": 0.5}  # absent classes are not reported
    with pytest.raises(ValueError, match="labels must lie"):
        accuracy_from_predictions(torch.tensor([0]), torch.tensor([3]), names)


def test_class_accuracy_uses_judge_argmax() -> None:
    class StubJudge:  # "class" = brightest channel
        class_names = ["red", "green", "blue"]

        def predict(self, images: torch.Tensor) -> torch.Tensor:
            return images.mean(dim=(2, 3)).softmax(-1)

    images = -torch.ones(4, 3, 8, 8)
    for i, c in enumerate([0, 1, 2, 2]):
        images[i, c] = 1.0
    acc = class_accuracy(StubJudge(), images, torch.tensor([0, 1, 1, 2]))
    assert acc["overall"] == pytest.approx(0.75)
    assert acc["per_class"] == pytest.approx({"red": 1.0, "green": 0.5, "blue": 1.0})


# ---- the judge ------------------------------------------------------------------------------------
TINY_TRAIN = JudgeTrainConfig(steps=60, batch_size=64, lr=5e-3, seed=0)
TINY_CHANNELS = [8, 16, 32]


@pytest.fixture(scope="module")
def digits_data() -> RealData:
    train = load_embedded("digits", "train", 16).select(range(600))
    test = load_embedded("digits", "test", 16)
    return RealData("digits", 16, train, test, list(train.features["label"].names))


@pytest.fixture(scope="module")
def tiny_judge(
    digits_data: RealData, tmp_path_factory: pytest.TempPathFactory
) -> tuple[Judge, dict, str]:
    cache = tmp_path_factory.mktemp("judge")
    judge, report = load_or_train_judge(cache, digits_data, TINY_TRAIN, 16, TINY_CHANNELS)
    return judge, report, str(cache)


def test_judge_beats_chance_on_heldout_digits(tiny_judge: tuple[Judge, dict, str]) -> None:
    judge, report, _ = tiny_judge
    assert report["heldout_accuracy"] > 0.7  # chance is 0.1; other writers than training
    assert report["num_heldout"] == 297 and report["num_train"] == 600
    x = torch.rand(5, 3, 32, 32) * 2 - 1  # any resolution: resized to the judge's
    probs, feats = judge.predict(x), judge.features(x)
    assert probs.shape == (5, 10) and torch.allclose(probs.sum(-1), torch.ones(5))
    assert feats.shape == (5, judge.feature_dim)


def test_judge_cache_round_trip(tiny_judge: tuple[Judge, dict, str], digits_data: RealData) -> None:
    judge, report, cache = tiny_judge
    again, report2 = load_or_train_judge(cache, digits_data, TINY_TRAIN, 16, TINY_CHANNELS)
    assert report2 == report  # loaded, not retrained
    x = dataset_images(digits_data.heldout.select(range(16)))
    torch.testing.assert_close(again.predict(x), judge.predict(x))
    torch.testing.assert_close(Judge.from_pretrained(cache).features(x), judge.features(x))
    with pytest.raises(ValueError, match="images must have shape"):
        judge.predict(torch.zeros(2, 1, 16, 16))
    with pytest.raises(ValueError, match="class_names"):
        JudgeConfig(num_classes=3, class_names=["a"])


def test_judge_training_is_seeded_whatever_the_thread_count(digits_data: RealData) -> None:
    small = digits_data.train.select(range(128))
    cfg = JudgeTrainConfig(steps=4, batch_size=32, seed=3)
    weights, before = [], torch.get_num_threads()
    for threads in (1, 2):
        torch.set_num_threads(threads)
        judge = Judge(JudgeConfig(num_classes=10, resolution=16, channels=[4, 8]))
        judge.train_on(small, cfg, progress=False)
        assert torch.get_num_threads() == threads  # restored after training
        weights.append(judge.state_dict())
    torch.set_num_threads(before)
    for key, value in weights[0].items():
        torch.testing.assert_close(value, weights[1][key], rtol=0, atol=0)


def test_evaluate_generation_with_perfect_generator(
    tiny_judge: tuple[Judge, dict, str], digits_data: RealData, tmp_path
) -> None:
    """A 'generator' returning held-out images of the prompted class scores like real data."""
    judge = tiny_judge[0]
    held = np.stack([np.asarray(im) for im in digits_data.heldout["image"]])  # [N, H, W, 3]
    held_labels = np.asarray(digits_data.heldout["label"])
    calls = []

    def pipe(
        prompts,
        guidance_scale,
        guidance_plausibility,
        method,
        num_steps,
        num_images_per_prompt,
        temperature,
        top_k,
        top_p,
        generator,
        output_type,
    ):
        calls.append((len(prompts), guidance_scale, guidance_plausibility, method, output_type))
        rng = np.random.default_rng(int(torch.randint(0, 2**31, (1,), generator=generator)))
        rows = [rng.choice(np.flatnonzero(held_labels == p)) for p in prompts]
        return SimpleNamespace(images=held[rows])  # uint8 [B, H, W, 3], like Pipeline's "np"

    prompts, labels, _ = balanced_prompts("class", digits_data, 3)
    assert prompts == [c for c in range(10) for _ in range(3)] and labels.tolist() == prompts
    opts = SampleOptions(batch_size=16, plausibility=0.1)
    result = evaluate_generation(pipe, judge, digits_data, [1.0, 2.0], n_per_class=3, options=opts)
    assert calls == [
        (16, 1.0, 0.1, "ar", "np"),
        (14, 1.0, 0.1, "ar", "np"),
        (16, 2.0, 0.1, "ar", "np"),
        (14, 2.0, 0.1, "ar", "np"),
    ]
    real_acc = tiny_judge[1]["heldout_accuracy"]
    for run in result["runs"]:
        assert run["n"] == 30 and run["accuracy"]["overall"] >= real_acc - 0.25
        assert np.isfinite(run["frechet"]) and run["frechet"] >= 0
    assert result["runs"][0]["frechet"] == result["runs"][1]["frechet"]  # same seeds at each scale
    plot_guidance(result, tmp_path / "plot.png")
    assert (tmp_path / "plot.png").stat().st_size > 0


# ---- shapes check ---------------------------------------------------------------------------------
def test_real_floor_averages_draws_and_is_seeded(tiny_judge, digits_data) -> None:
    """The floor is the mean over subsets; one subset alone can sit far from it."""
    judge = tiny_judge[0]
    floor = real_floor(judge, digits_data, n=200, draws=4)
    assert floor["draws"] == 4 and floor["n_train"] == 200 and floor["n_heldout"] == 297
    assert floor["train_vs_heldout_std"] > 0  # subsets differ
    singles = [real_floor(judge, digits_data, n=200, seed=s, draws=1)["train_vs_heldout"]
               for s in range(4)]  # fmt: skip
    assert min(singles) < max(singles)
    assert real_floor(judge, digits_data, n=200, draws=4) == floor  # seeded: the same again
    with pytest.raises(ValueError, match="draws"):
        real_floor(judge, digits_data, n=200, draws=0)


def test_parse_prompt() -> None:
    p = parse_prompt("a small red circle at the top left")
    assert (p.size, p.color, p.shape, p.position) == ("small", "red", "circle", "top left")
    assert parse_prompt("a large blue square at the top").position == "top"
    assert parse_prompt("in the center: a purple triangle").position == "center"
    c = parse_prompt("green square")  # a class name names two attributes
    assert (c.color, c.shape, c.position, c.size) == ("green", "square", None, None)


def test_shapes_check_real_vs_shuffled() -> None:
    ds = load_shapes("test", 32, num_scenes=300)
    captions = ds["caption"]
    real = check_shapes(ds["image"], captions)
    for attr in ("color", "shape", "position", "size"):
        assert real[attr] >= 0.95, (attr, real)
    shuffled = list(captions)
    random.Random(0).shuffle(shuffled)
    wrong = check_shapes(dataset_images(ds), shuffled)  # tensors in [-1, 1] work too
    assert wrong["overall"] < 0.1 and wrong["color"] < 0.4 and wrong["position"] < 0.4
    blank = read_image(np.zeros((32, 32, 3), np.uint8))
    assert (
        blank.shape is None
        and check_shapes([np.zeros((32, 32, 3), np.uint8)], ["red circle"])["overall"] == 0
    )
    with pytest.raises(ValueError, match="prompts"):
        check_shapes(ds["image"][:2], captions[:3])


# ---- Inception ------------------------------------------------------------------------------------
def test_inception_needs_local_weights_and_package(tmp_path) -> None:
    with pytest.raises(ValueError, match="local weights"):
        load_inception(None)
    with pytest.raises(FileNotFoundError, match="nowhere.pth"):
        load_inception(tmp_path / "nowhere.pth")
    fake = tmp_path / "weights.pth"
    fake.write_bytes(b"not weights")
    try:
        import torch_fidelity  # noqa: F401
    except ImportError:
        with pytest.raises(ImportError, match="torch-fidelity"):
            load_inception(fake)
    # IS maths: confident and uniform over K classes -> K; all identical -> 1
    eye = torch.eye(10).repeat(3, 1) * 50
    assert inception_score(eye, splits=3)[0] == pytest.approx(10.0, rel=1e-6)
    assert inception_score(torch.zeros(30, 10), splits=3)[0] == pytest.approx(1.0)


def test_generation_scores_with_a_stand_in_extractor() -> None:
    """FID/IS plumbing (uint8 conversion, batching, splits) with a tiny stand-in for Inception:
    pool = per-channel means, logits = a fixed projection of them."""
    from evaluation.inception import generation_scores

    class StandIn(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.proj = torch.nn.Linear(3, 5)

        def forward(self, x: torch.Tensor):
            assert x.dtype == torch.uint8  # torch-fidelity's input convention
            pool = x.float().mean((2, 3))  # [B, 3]
            return pool, self.proj(pool)

    torch.manual_seed(0)
    real = torch.rand(40, 3, 8, 8) * 2 - 1
    same = generation_scores(StandIn(), real, real, batch_size=16)
    assert same["fid"] == pytest.approx(0.0, abs=1e-6) and same["is_mean"] >= 1.0
    shifted = generation_scores(StandIn(), real, (real + 0.5).clamp(-1, 1), batch_size=16)
    assert shifted["fid"] > 100 * max(same["fid"], 1e-6)

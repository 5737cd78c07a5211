"""MaskGIT prior: schedule, exact mask counts, loss on masked positions only, bidirectionality."""

import math

import pytest
import torch
import torch.nn.functional as F

from prior import MaskGIT, MaskGITConfig, cosine_schedule, load_prior, mask_count
from prior.maskgit import random_mask
from prior.objective import PriorObjective

V, GRID = 16, [4, 4]
N = 16


def make(**extra):
    torch.manual_seed(0)
    return MaskGIT(MaskGITConfig(vocab_size=V, grid=GRID, num_classes=3, **extra)).eval()


def test_schedule_endpoints_and_monotone():
    assert cosine_schedule(0.0) == 1.0 and abs(cosine_schedule(1.0)) < 1e-12
    r = torch.linspace(0, 1, 101)
    g = cosine_schedule(r)
    assert bool((g[1:] <= g[:-1]).all())
    torch.testing.assert_close(g, torch.cos(math.pi * r / 2))
    assert (
        mask_count(256, 0.0) == 256
        and mask_count(256, 1.0) == 1
        and mask_count(256, 0.5) == round(256 * math.cos(math.pi / 4))
    )
    torch.testing.assert_close(
        mask_count(256, r), torch.tensor([mask_count(256, float(x)) for x in r])
    )


def test_random_mask_counts_follow_schedule():
    b = 64
    mask = random_mask(b, N, "cpu", torch.Generator().manual_seed(7))
    r = torch.rand(b, generator=torch.Generator().manual_seed(7))  # the same first draw
    assert torch.equal(mask.sum(1), mask_count(N, r))
    assert bool((mask.sum(1) >= 1).all())


def test_loss_ignores_unmasked_positions():
    """The training objective's MaskGIT loss is label-smoothed CE over the masked positions only."""
    model = make().train()
    objective = PriorObjective(model).eval()  # eval: no condition dropout, a fixed check
    codes = torch.randint(0, V, (4, N), generator=torch.Generator().manual_seed(1))
    labels = torch.tensor([0, 1, 2, 3])
    res = objective(codes, labels, [""] * 4, generator=torch.Generator().manual_seed(2))
    mask = random_mask(4, N, "cpu", torch.Generator().manual_seed(2))
    cond = model.condition(class_ids=labels)
    logits = model(torch.where(mask, V, codes), cond)
    ref = F.cross_entropy(logits[mask], codes[mask], label_smoothing=model.config.label_smoothing)
    torch.testing.assert_close(res["loss"], ref)
    assert torch.equal(res["count"], mask.sum(1).float())  # only masked positions count


def test_training_loss_masks_with_mask_token_and_trains():
    model = make().train()
    codes = torch.randint(0, V, (4, N), generator=torch.Generator().manual_seed(1))
    seen = {}

    def grab(module, args, out):
        seen["ids"] = args[0]

    handle = model.tok_embeddings.register_forward_hook(grab)
    res = PriorObjective(model)(
        codes, torch.tensor([0, 1, 2, 3]), [""] * 4, generator=torch.Generator().manual_seed(2)
    )
    handle.remove()
    mask = random_mask(4, N, "cpu", torch.Generator().manual_seed(2))
    assert torch.equal(
        seen["ids"], torch.where(mask, V, codes)
    )  # exactly those positions -> [MASK]
    torch.testing.assert_close(res["count"].sum() / codes.numel(), mask.float().mean())
    res["loss"].backward()


def test_forward_is_bidirectional_and_shapes():
    model = make(tie_embeddings=True)
    codes = torch.full((2, N), V)  # all [MASK]
    codes[:, 10] = 3
    cond = model.condition(class_ids=torch.tensor([0, 3]))
    logits = model(codes, cond)
    assert logits.shape == (2, N, V)
    changed = codes.clone()
    changed[:, 10] = 4
    assert not torch.allclose(
        model(changed, cond)[:, 0], logits[:, 0]
    )  # earlier positions see later ones
    with pytest.raises(ValueError, match="length"):
        model(codes[:, :5], cond)


def test_save_load_round_trip(tmp_path):
    model = make(rope="1d")
    model.save_pretrained(tmp_path / "m")
    loaded = load_prior(tmp_path / "m")
    assert isinstance(loaded, MaskGIT) and loaded.config == model.config
    codes = torch.randint(0, V + 1, (2, N), generator=torch.Generator().manual_seed(3))
    cond = model.null_condition(2)
    torch.testing.assert_close(
        loaded(codes, loaded.null_condition(2)), model(codes, cond), atol=0, rtol=0
    )

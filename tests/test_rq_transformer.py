"""RQ-Transformer: shapes, causality over positions and depths, cached API == full forward."""

import pytest
import torch

from prior import RQTransformer, RQTransformerConfig, TokenizerInfo, load_prior

V, GRID, D = 12, [2, 3], 3
N = 6


def make(**extra):
    torch.manual_seed(0)
    return RQTransformer(
        RQTransformerConfig(vocab_size=V, grid=GRID, depth=D, num_classes=4, **extra)
    ).eval()


def codes_for(b, seed=1):
    return torch.randint(0, V, (b, N, D), generator=torch.Generator().manual_seed(seed))


def test_shapes_and_validation():
    model = make()
    cond = model.condition(class_ids=torch.tensor([0, 4]))
    assert model(codes_for(2), cond).shape == (2, N, D, V)
    with pytest.raises(ValueError, match="D=3"):
        model(codes_for(2)[..., :2], cond)
    with pytest.raises(ValueError, match="tokenizer.depth"):
        RQTransformerConfig(
            vocab_size=V, grid=GRID, depth=D, tokenizer=TokenizerInfo(codebook_size=V, depth=4)
        )
    with pytest.raises(ValueError, match="tie_embeddings"):
        RQTransformer(RQTransformerConfig(tie_embeddings=True))


def test_causal_over_positions_and_depths():
    model = make(rope="1d")
    codes, cond = codes_for(2), model.condition(class_ids=torch.tensor([1, 2]))
    base = model(codes, cond)
    i, d = 3, 1
    changed = codes.clone()
    changed[:, i, d] = (changed[:, i, d] + 1) % V
    out = model(changed, cond)
    torch.testing.assert_close(out[:, :i], base[:, :i], atol=0, rtol=0)  # earlier positions
    torch.testing.assert_close(
        out[:, i, : d + 1], base[:, i, : d + 1], atol=0, rtol=0
    )  # depths <= d
    assert not torch.allclose(out[:, i, d + 1 :], base[:, i, d + 1 :])  # later depths see it
    assert not torch.allclose(out[:, i + 1 :], base[:, i + 1 :])  # later positions see it


def test_cached_decode_and_depth_logits_equal_forward():
    model = make(cond="none")
    b = 2
    codes, cond = codes_for(b), model.condition(batch_size=b)
    full = model(codes, cond)  # [B, N, D, V]
    with torch.no_grad():
        model.setup_caches(b, N)
        h = model.prefill(cond)  # [B, dim]
        for i in range(N):
            for d in range(D):
                got = model.depth_logits(h, codes[:, i, :d])
                torch.testing.assert_close(got, full[:, i, d], atol=1e-5, rtol=1e-5)
            if i < N - 1:
                h = model.decode(codes[:, i : i + 1], torch.full((b,), i))[:, 0]
        # chunked decode with per-row positions after a rollback
        model.prefill(cond)
        model.decode(codes[:, :5], torch.zeros(b, dtype=torch.long))
        back = torch.tensor([1, 3])
        hs = model.decode(
            torch.stack([codes[r, back[r] : back[r] + 2] for r in range(b)]), back
        )  # [B, 2, dim]
        for r in range(b):
            for t in range(2):
                got = model.depth_logits(hs[r : r + 1, t], codes[r : r + 1, back[r] + t + 1, :0])
                torch.testing.assert_close(
                    got[0], full[r, back[r] + t + 1, 0], atol=1e-5, rtol=1e-5
                )


def test_save_load_round_trip(tmp_path):
    model = make()
    model.save_pretrained(tmp_path / "m")
    loaded = load_prior(tmp_path / "m")
    assert isinstance(loaded, RQTransformer) and loaded.config == model.config
    codes = codes_for(2)
    cond = model.condition(class_ids=torch.tensor([0, 1]))
    torch.testing.assert_close(
        loaded(codes, loaded.condition(class_ids=torch.tensor([0, 1]))), model(codes, cond)
    )
    assert model.flops_per_token() > 0

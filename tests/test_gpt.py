"""GPT prior: causality, cached decode == full forward, RoPE, conditioning, save/load, configs."""

import dataclasses
import math

import pytest
import torch

from prior import (
    GPT,
    Condition,
    GPTConfig,
    TextEncoderConfig,
    TokenizerInfo,
    check_tokenizer,
    load_prior,
    word_vocab,
)
from prior.conditioning import word_tokenizer
from prior.rope import apply_rope, inv_freq, rope_table

CAPTIONS = [
    "a red circle on the left",
    "a big blue square",
    "small green triangle at the top right",
    "red",
]
V, GRID = 16, [3, 4]
N = GRID[0] * GRID[1]


def make(cond="class", rope="2d", seed=0, **extra):
    text = TextEncoderConfig(
        vocab=word_vocab(CAPTIONS),
        hidden_size=16,
        intermediate_size=32,
        num_heads=2,
        max_text_len=6,
        freeze=False,
    )
    cfg = GPTConfig(
        vocab_size=V, grid=GRID, cond=cond, num_classes=5, rope=rope, text=text, **extra
    )
    torch.manual_seed(seed)
    return GPT(cfg).eval()


def cond_for(model, b, seed=0):
    kind = model.config.cond
    if kind == "class":
        return model.condition(class_ids=torch.arange(b) % 6)  # includes the null class 5
    if kind == "text":
        return model.condition(texts=(CAPTIONS * 2)[:b])
    return model.condition(batch_size=b)


def codes_for(b, seed=1):
    return torch.randint(0, V, (b, N), generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize(
    "cond,rope", [("class", "2d"), ("class", "1d"), ("text", "2d"), ("none", "1d")]
)
def test_causality(cond, rope):
    model = make(cond, rope)
    codes = codes_for(3)
    c = cond_for(model, 3)
    logits = model(codes, c)
    assert logits.shape == (3, N, V) and logits.dtype == torch.float32
    changed = codes.clone()
    changed[:, 7] = (changed[:, 7] + 1) % V
    other = model(changed, c)
    torch.testing.assert_close(
        other[:, :8], logits[:, :8], atol=0, rtol=0
    )  # logits[:, i] sees codes < i
    assert not torch.allclose(other[:, 8:], logits[:, 8:])


@pytest.mark.parametrize("cond,rope", [("class", "2d"), ("text", "1d"), ("none", "2d")])
def test_decode_token_by_token_and_chunks_equal_forward(cond, rope):
    model = make(cond, rope)
    b = 3
    codes, c = codes_for(b), cond_for(model, b)
    full = model(codes, c)  # [B, N, V]
    with torch.no_grad():
        model.setup_caches(b, N)
        steps = [model.prefill(c)[:, None]]
        for i in range(N - 1):
            steps.append(model.decode(codes[:, i : i + 1], torch.full((b,), i)))
        torch.testing.assert_close(torch.cat(steps, 1), full, atol=1e-5, rtol=1e-5)
        # chunks of 4, 5, 2 tokens
        parts, start = [model.prefill(c)[:, None]], 0
        for t in (4, 5, 2):
            parts.append(model.decode(codes[:, start : start + t], torch.full((b,), start)))
            start += t
        torch.testing.assert_close(torch.cat(parts, 1), full, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("cond", ["class", "text"])
def test_decode_per_row_positions_after_rollback(cond):
    """Rows roll back to different positions and continue with new tokens: stale slots are ignored."""
    model = make(cond, "2d")
    b = 3
    codes, c = codes_for(b), cond_for(model, b)
    new = codes_for(b, seed=9)
    with torch.no_grad():
        model.setup_caches(b, N)
        model.prefill(c)
        model.decode(
            codes[:, :9], torch.zeros(b, dtype=torch.long)
        )  # slots for positions 0..8 filled
        back = torch.tensor([2, 5, 7])  # per-row rollback points
        tokens = torch.stack([new[r, back[r] : back[r] + 3] for r in range(b)])  # [B, 3]
        got = model.decode(tokens, back)  # [B, 3, V]
        for r in range(b):
            seq = codes[r].clone()
            seq[back[r] : back[r] + 3] = tokens[r]
            ref = model(seq[None], Condition(c.prefix[r : r + 1], c.mask[r : r + 1]))[0]
            torch.testing.assert_close(got[r], ref[back[r] + 1 : back[r] + 4], atol=1e-5, rtol=1e-5)


def test_decode_errors_before_setup():
    model = make()
    with pytest.raises(ValueError, match="setup_caches"):
        model.decode(codes_for(1)[:, :1], torch.zeros(1, dtype=torch.long))
    with pytest.raises(ValueError, match="max_len"):
        model.setup_caches(1, N + 1)


def test_rope_2d_rotates_rows_and_columns_separately():
    hd, base, p = 8, 100.0, 2
    cos, sin = rope_table("2d", hd, p, GRID, base)
    assert cos.shape == (p + N, hd)
    assert torch.equal(cos[:p], torch.ones(p, hd)) and torch.equal(
        sin[:p], torch.zeros(p, hd)
    )  # identity prefix
    f = inv_freq(hd // 2, base).float()  # per-axis frequencies, hd/4 pairs each
    for i in range(N):
        r, col = divmod(i, GRID[1])
        pair = torch.cat([r * f, col * f])  # [hd/2]: row pairs, then column pairs
        torch.testing.assert_close(cos[p + i], torch.cat([pair, pair]).cos())
        torch.testing.assert_close(sin[p + i], torch.cat([pair, pair]).sin())
    # a vector living on row pairs only is rotated by the row alone; likewise for columns
    x = torch.zeros(1, 1, 1, hd)
    x[..., [0, 1, 4, 5]] = torch.randn(4)  # pair j = dims (j, j + hd/2); j < hd/4 follow the row
    same_row = [p + 1 * GRID[1] + 0, p + 1 * GRID[1] + 3]  # (1, 0) and (1, 3)
    a, b = (apply_rope(x, cos[s : s + 1], sin[s : s + 1]) for s in same_row)
    torch.testing.assert_close(a, b)
    # relative property: <R(p1) q, R(p2) k> depends only on p1 - p2 per axis
    q, k = torch.randn(1, 1, 1, hd), torch.randn(1, 1, 1, hd)

    def dot(s1, s2):
        return (
            apply_rope(q, cos[s1 : s1 + 1], sin[s1 : s1 + 1])
            * apply_rope(k, cos[s2 : s2 + 1], sin[s2 : s2 + 1])
        ).sum()

    slot = lambda r, col: p + r * GRID[1] + col  # noqa: E731
    torch.testing.assert_close(dot(slot(2, 3), slot(1, 1)), dot(slot(1, 2), slot(0, 0)))


def test_rope_1d_matches_hf_layout():
    cos, sin = rope_table("1d", 8, 1, GRID, 10000.0)
    ang = torch.arange(1 + N)[:, None].double() * inv_freq(8, 10000.0)[None]
    torch.testing.assert_close(cos, torch.cat([ang, ang], -1).cos().float())


def test_condition_shapes_and_null():
    for cond, p in [("class", 1), ("text", 6), ("none", 1)]:
        model = make(cond)
        c = cond_for(model, 4)
        assert (
            c.prefix.shape == (4, p, 32) and c.mask.shape == (4, p) and c.mask.dtype == torch.bool
        )
        null = model.null_condition(4)
        assert null.prefix.shape == (4, p, 32) and bool(null.mask.all())
        both = Condition.cat([c, null])
        assert both.batch_size == 8
    text = make("text")
    c = text.condition(texts=["red", "a red circle on the left"])
    assert c.mask.tolist() == [[False, False, False, True, True, True], [True] * 6]  # left-padded
    assert torch.equal(c.prefix[0, :3], torch.zeros(3, 32))
    with pytest.raises(ValueError, match="class"):
        make("class").condition(class_ids=torch.tensor([6]))
    with pytest.raises(ValueError, match="texts"):
        text.condition(class_ids=torch.tensor([0]))
    with pytest.raises(ValueError, match="batch_size"):
        make("none").condition(class_ids=torch.tensor([0]))


def test_word_tokenizer_handles_unknown_words():
    tok = word_tokenizer(word_vocab(CAPTIONS))
    ids = tok(["Red zebra"])["input_ids"][0]
    vocab = word_vocab(CAPTIONS)
    assert [vocab[i] for i in ids] == ["[CLS]", "red", "[UNK]", "[SEP]"]


def test_class_dropout_rate():
    model = make(cond_dropout=0.25)
    ids = torch.zeros(20000, dtype=torch.long)
    null_row = model.conditioner.class_embedding.weight[5]
    c = model.condition(class_ids=ids, drop=True, generator=torch.Generator().manual_seed(0))
    rate = (c.prefix[:, 0] == null_row).all(-1).float().mean().item()
    assert abs(rate - 0.25) < 4 * math.sqrt(0.25 * 0.75 / 20000)
    kept = model.condition(class_ids=ids)  # drop=False: nothing dropped
    assert not (kept.prefix[:, 0] == null_row).all(-1).any()


def test_text_dropout_uses_learned_null():
    model = make("text", cond_dropout=0.5)
    c = model.condition(texts=CAPTIONS * 50, drop=True, generator=torch.Generator().manual_seed(0))
    dropped = (c.prefix == model.conditioner.null_text).flatten(1).all(1)
    assert 0.3 < dropped.float().mean().item() < 0.7
    assert bool(c.mask[dropped].all())


@pytest.mark.parametrize("cond", ["class", "text"])
def test_save_load_round_trip(tmp_path, cond):
    model = make(cond, tie_embeddings=True)
    model.config.tokenizer = TokenizerInfo(
        hash="abc", codebook_size=V, grid=GRID, depth=1, class_names=list("abcde")
    )
    model.save_pretrained(tmp_path / "m")
    loaded = load_prior(tmp_path / "m")
    assert isinstance(loaded, GPT) and loaded.config == model.config
    codes = codes_for(2)
    torch.testing.assert_close(
        loaded(codes, cond_for(loaded, 2)), model(codes, cond_for(model, 2)), atol=0, rtol=0
    )
    assert loaded.output.weight is loaded.tok_embeddings.weight  # tying survives the round trip


def test_gradient_checkpointing_same_loss_and_grads():
    grads = []
    for flag in (False, True):
        model = make(dropout=0.1, gradient_checkpointing=flag).train()
        torch.manual_seed(3)
        codes = codes_for(2)
        logits = model(codes, cond_for(model, 2))
        loss = torch.nn.functional.cross_entropy(logits.flatten(0, 1), codes.flatten())
        loss.backward()
        grads.append(
            (loss.detach(), [p.grad.clone() for p in model.parameters() if p.grad is not None])
        )
    torch.testing.assert_close(grads[0][0], grads[1][0])
    for a, b in zip(grads[0][1], grads[1][1]):
        torch.testing.assert_close(a, b, atol=1e-6, rtol=1e-5)


def test_presets_and_param_count():
    tiny = GPTConfig.from_preset("tiny")
    assert (tiny.dim, tiny.n_layers) == (32, 2)
    big = dataclasses.replace(
        GPTConfig.from_preset("B"), vocab_size=16384, grid=[16, 16], num_classes=1000
    )
    assert (big.dim, big.n_layers, big.n_heads, big.ffn_dim) == (768, 12, 12, 2048)
    with torch.device("meta"):  # no memory: count parameters of LlamaGen GPT-B (111M)
        model = GPT(big)
    assert 110e6 < model.num_params() < 112e6
    assert model.flops_per_token() > 6 * model.num_params(exclude_embeddings=True)
    assert (GPTConfig.from_preset("L").dim, GPTConfig.from_preset("XL").n_layers) == (1024, 36)
    with pytest.raises(ValueError, match="preset"):
        GPTConfig.from_preset("XXXL")


def test_config_validation_and_tokenizer_check():
    with pytest.raises(ValueError, match="cond"):
        GPTConfig(cond="image")
    with pytest.raises(ValueError, match="rope"):
        GPTConfig(rope="3d")
    with pytest.raises(ValueError, match="codebook_size"):
        GPTConfig(vocab_size=16, tokenizer=TokenizerInfo(codebook_size=32))
    info = TokenizerInfo(hash="h1", codebook_size=16, grid=[4, 4], depth=1, class_names=["a", "b"])
    check_tokenizer(
        info,
        {"hash": "h1", "codebook_size": 16, "grid": (4, 4), "depth": 1, "class_names": ["a", "b"]},
    )
    with pytest.raises(ValueError, match=r"codebook_size.*grid|grid.*codebook_size") as err:
        check_tokenizer(info, {"hash": "h1", "codebook_size": 32, "grid": [8, 8], "depth": 1})
    assert "hash" not in str(err.value)


def test_pretrained_text_encoder_by_path_is_frozen(tmp_path):
    from transformers import T5Config, T5EncoderModel

    vocab = word_vocab(CAPTIONS)
    torch.manual_seed(0)
    T5EncoderModel(
        T5Config(vocab_size=len(vocab), d_model=16, d_kv=8, d_ff=32, num_layers=1, num_heads=2)
    ).save_pretrained(tmp_path / "t5")
    word_tokenizer(vocab).save_pretrained(tmp_path / "t5")
    cfg = GPTConfig(
        vocab_size=V,
        grid=GRID,
        cond="text",
        text=TextEncoderConfig(name_or_path=str(tmp_path / "t5"), max_text_len=6),
    )
    model = GPT(cfg).train()
    assert type(model.conditioner.encoder).__name__ == "T5EncoderModel"
    assert not model.conditioner.encoder.training  # frozen encoder stays in eval mode
    assert all(not p.requires_grad for p in model.conditioner.encoder.parameters())
    assert model.num_params(trainable_only=True) < model.num_params()
    c = model.condition(texts=["a red circle", "blue"])
    assert c.prefix.shape == (2, 6, 32) and c.mask.sum(1).tolist() == [5, 3]


def test_presets_from_yaml_and_conflicts(tmp_path):
    from prior.train_config import PriorTrainConfig
    from training.config import load_config

    cfg = load_config(PriorTrainConfig, None, ["model.gpt.preset=L"])
    assert (cfg.model.gpt.dim, cfg.model.gpt.n_layers, cfg.model.gpt.n_heads) == (1024, 24, 16)
    with pytest.raises(ValueError, match="preset 'B' sets dim=768; got dim=512"):
        GPTConfig(preset="B", dim=512)

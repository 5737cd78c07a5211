"""Pipeline: prompts -> images through tokenizer + prior (+ draft), errors on bad combinations."""

import dataclasses

import pytest
import torch

from prior import GPT, GPTConfig, MaskGIT, MaskGITConfig, TokenizerInfo
from sampling import Pipeline
from sampling.autoregressive import generate_ar
from sampling.guidance import GuidanceSchedule
from sampling.logits import SamplingConfig
from tokenizer import Tokenizer, TokenizerConfig
from tokenizer.quantizers import QuantizerConfig

CLASSES = ["zero", "one", "two"]


def tiny_tokenizer(seed: int = 0) -> Tokenizer:
    torch.manual_seed(seed)
    cfg = TokenizerConfig(
        resolution=16, encoder_channels=8, decoder_channels=8, ch_mult=[1, 2, 2], num_res_blocks=1,
        latent_dim=4, norm_groups=4, quantizer=QuantizerConfig(kind="vq", codebook_size=16, codebook_dim=4),
    )  # fmt: skip
    return Tokenizer(cfg).eval()


def info_for(tok: Tokenizer) -> TokenizerInfo:
    return tok.identity().with_classes(CLASSES)


def tiny_prior(tok: Tokenizer, cls=GPT, cfg_cls=GPTConfig, dim: int = 32, seed: int = 0):
    torch.manual_seed(seed)
    cfg = cfg_cls(
        vocab_size=tok.codebook_size,
        grid=list(tok.grid),
        num_classes=len(CLASSES),
        dim=dim,
        tokenizer=info_for(tok),
    )
    return cls(cfg).eval()


@pytest.fixture(scope="module")
def parts():
    tok = tiny_tokenizer()
    return tok, tiny_prior(tok), tiny_prior(tok, dim=16, seed=1)


def test_images_and_equivalence_with_generate_ar(parts):
    tok, prior, _ = parts
    pipe = Pipeline(tok, prior)
    out = pipe(
        ["one", 2],
        guidance_scale=2.0,
        num_images_per_prompt=2,
        generator=torch.Generator().manual_seed(0),
    )
    assert (
        len(out.images) == 4
        and out.images[0].size == (16, 16)
        and out.prompts == ["one", "one", 2, 2]
    )
    ids = torch.tensor([1, 1, 2, 2])
    codes = generate_ar(
        prior, prior.condition(class_ids=ids), prior.null_condition(4), 16, SamplingConfig(),
        GuidanceSchedule(2.0), torch.Generator().manual_seed(0),
    )  # fmt: skip
    assert torch.equal(out.codes, codes)
    arr = pipe("zero", output_type="np", generator=torch.Generator().manual_seed(0)).images
    assert arr.shape == (1, 16, 16, 3) and arr.dtype.name == "uint8"


def test_greedy_speculative_and_jacobi_equal_greedy_ar(parts):
    tok, prior, draft = parts
    pipe = Pipeline(tok, prior, draft)
    ar = pipe(CLASSES, guidance_scale=3.0, temperature=0, output_type="codes").codes
    for method in ("speculative", "relaxed", "jacobi"):
        out = pipe(
            CLASSES,
            guidance_scale=3.0,
            temperature=0,
            method=method,
            output_type="codes",
            **({"relaxed_delta": 0.0} if method == "relaxed" else {}),  # options are per method
        )
        assert torch.equal(out.codes, ar), method
        assert out.stats is not None and out.stats.target_calls >= 1


def test_method_options_for_other_methods_are_errors(parts):
    tok, prior, draft = parts
    pipe = Pipeline(tok, prior, draft)
    with pytest.raises(ValueError, match="draft_len applies to method speculative / relaxed"):
        pipe(["one"], draft_len=8)  # method "ar" ignores it
    with pytest.raises(ValueError, match="num_steps applies to method maskgit only, not 'jacobi'"):
        pipe(["one"], method="jacobi", num_steps=4)
    with pytest.raises(TypeError):
        pipe(["one"], 3.0)  # keyword-only after the prompts


def test_bad_arguments_are_clear_errors(parts):
    tok, prior, draft = parts
    pipe = Pipeline(tok, prior)
    with pytest.raises(ValueError, match="unknown class 'seven'.*zero, one, two"):
        pipe("seven")
    with pytest.raises(ValueError, match="outside 0..2"):
        pipe(5)
    with pytest.raises(ValueError, match="needs a draft prior"):
        pipe("one", method="speculative")
    with pytest.raises(ValueError, match="does not fit a GPT"):
        pipe("one", method="maskgit")
    with pytest.raises(ValueError, match="method must be one of"):
        pipe("one", method="beam")
    with pytest.raises(ValueError, match="negative prompts need a text"):
        pipe("one", negative_prompts=["two"], guidance_scale=2.0)


def test_wrong_tokenizer_is_refused(parts):
    tok, prior, _ = parts
    other = tiny_tokenizer(seed=1)
    with pytest.raises(ValueError, match="hash"):
        Pipeline(other, prior)
    small = dataclasses.replace(
        prior.config, vocab_size=8, tokenizer=TokenizerInfo(codebook_size=8, grid=[4, 4])
    )
    with pytest.raises(ValueError, match="codebook_size"):
        Pipeline(tok, GPT(small))


def test_maskgit_and_round_trip_from_pretrained(parts, tmp_path):
    tok, _, _ = parts
    maskgit = tiny_prior(tok, MaskGIT, MaskGITConfig)
    tok.save_pretrained(tmp_path / "tok")
    maskgit.save_pretrained(tmp_path / "prior")
    pipe = Pipeline.from_pretrained(tmp_path / "tok", tmp_path / "prior", device="cpu")
    out = pipe(
        CLASSES,
        method="maskgit",
        num_steps=4,
        guidance_scale=2.0,
        output_type="codes",
        generator=torch.Generator().manual_seed(0),
    )
    assert out.codes.shape == (3, 16) and int(out.codes.max()) < 16
    assert sum(out.reveal_counts) == 16


def test_generate_cli_writes_grid_and_codes(parts, tmp_path):
    import numpy as np
    from PIL import Image

    from scripts.generate import main

    tok, prior, _ = parts
    tok.save_pretrained(tmp_path / "tok")
    prior.save_pretrained(tmp_path / "prior")
    out, codes = tmp_path / "grid.png", tmp_path / "codes.npy"
    main(["--tokenizer", str(tmp_path / "tok"), "--prior", str(tmp_path / "prior"), "--prompt", "one",
          "--prompt", "2", "--guidance", "3", "--n", "3", "--out", str(out), "--codes", str(codes)])  # fmt: skip
    assert Image.open(out).size == (3 * 16, 2 * 16)
    saved = np.load(codes)
    assert saved.shape == (6, 16) and saved.dtype == np.uint16

"""Token export: plain `datasets` readability, exact codes, a foreign consumer, atomicity, sharding."""

import json
import os
import subprocess
import sys
from pathlib import Path

import datasets
import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from tokenizer.data import DataConfig, ImageTransform, load_image_dataset
from tokenizer.export import (
    AugmentConfig,
    ExportConfig,
    augment_views,
    export_tokens,
    view_params,
)
from tokenizer.manifest import read_manifest
from tokenizer.model import Tokenizer, TokenizerConfig
from tokenizer.quantizers import QuantizerConfig

ROOT = Path(__file__).resolve().parents[1]
RES = 16


def tiny_tokenizer(kind: str = "vq", seed: int = 0) -> Tokenizer:
    quantizer = (
        QuantizerConfig(kind="vq", codebook_size=32)
        if kind == "vq"
        else QuantizerConfig(kind="rq", codebook_size=16, depth=2)
    )
    cfg = TokenizerConfig(
        resolution=RES, encoder_channels=8, decoder_channels=8, ch_mult=[1, 2, 2],
        num_res_blocks=1, latent_dim=4, norm_groups=4, mid_attention=False, quantizer=quantizer,
    )  # fmt: skip
    torch.manual_seed(seed)
    return Tokenizer(cfg).eval()


def digits(n: int) -> datasets.Dataset:
    return load_image_dataset(DataConfig(source="digits", resolution=RES, max_samples=n), "train")


def export(tok: Tokenizer, out: Path, n: int = 12, views: int = 2, **kw) -> Path:
    cfg = ExportConfig(views=views, batch_size=kw.pop("batch_size", 8), progress=False)
    return export_tokens(tok, digits(n), out, cfg, {"data": "digits"}, **kw)


@pytest.fixture(scope="module")
def vq_export(tmp_path_factory) -> tuple[Tokenizer, Path]:
    tok = tiny_tokenizer()
    return tok, export(tok, tmp_path_factory.mktemp("vq") / "tokens")


def test_plain_load_from_disk_uint16_and_exact_codes(vq_export):
    tok, out = vq_export
    ds = datasets.load_from_disk(str(out))
    assert ds.features["codes"] == datasets.Array2D((4, 4), "uint16")
    assert ds.features["label"].names == [str(d) for d in range(10)]
    assert set(ds.column_names) == {"codes", "label", "caption", "view", "index"}
    rows = ds.with_format("numpy", dtype=np.uint16)[:]
    assert rows["codes"].dtype == np.uint16 and rows["codes"].shape == (24, 4, 4)
    assert rows["index"].tolist() == [i for i in range(12) for _ in range(2)]
    assert rows["view"].tolist() == [0, 1] * 12
    # view 0 is exactly tokenizer.encode of the clean image
    src = digits(12)
    transform = ImageTransform(RES, interpolation="bicubic")
    images = torch.stack([transform(im) for im in src["image"]])
    with torch.no_grad():
        expected = tok.encode(images)
    assert torch.equal(torch.from_numpy(rows["codes"][0::2].astype(np.int64)), expected)
    assert not np.array_equal(rows["codes"][1::2], rows["codes"][0::2])  # views 1 are warped
    assert list(ds["caption"][:2]) == [src["caption"][0]] * 2
    manifest = read_manifest(out)
    assert manifest["tokenizer"] == tok.identity().tokenizer_fields()
    assert manifest["num_samples"] == 24 and manifest["views"] == 2 and manifest["num_images"] == 12
    assert manifest["class_names"] == [str(d) for d in range(10)]
    tensors = load_file(str(out / "codebook.safetensors"))
    torch.testing.assert_close(tensors["codebook"], tok.codebook().float())
    codes = torch.arange(32).reshape(1, 8, 4) % 32  # any codes: embedding rows are their latents
    with torch.no_grad():
        latents = tok.quantizer.embed(codes)[0]  # [C, 8, 4]
    torch.testing.assert_close(tensors["embedding"][codes[0]].permute(2, 0, 1), latents)


def test_views_are_seeded_by_image_not_batch(tmp_path, vq_export):
    tok, first = vq_export
    again = export(tok, tmp_path / "again", batch_size=5)  # different batching
    a = datasets.load_from_disk(str(first)).with_format("numpy", dtype=np.uint16)["codes"]
    b = datasets.load_from_disk(str(again)).with_format("numpy", dtype=np.uint16)["codes"]
    assert np.array_equal(a, b)
    aug = AugmentConfig(flip=True)
    assert view_params(0, 3, 0, aug) == [0.0, 1.0, 0.0, 0.0, 0.0]
    assert view_params(0, 3, 1, aug) == view_params(0, 3, 1, aug) != view_params(0, 4, 1, aug)
    x = torch.rand(2, 3, 8, 8) * 2 - 1
    same = augment_views(x, torch.tensor([[0.0, 1.0, 0.0, 0.0, 0.0]] * 2), aug)
    assert torch.equal(same, x)  # view 0 stays bit-exact
    flipped = augment_views(x, torch.tensor([[0.0, 1.0, 0.0, 0.0, 1.0]] * 2), aug)
    torch.testing.assert_close(flipped, x.flip(-1))


def test_rq_export_is_array3d(tmp_path):
    tok = tiny_tokenizer("rq")
    out = export(tok, tmp_path / "rq", n=4, views=1)
    ds = datasets.load_from_disk(str(out))
    assert ds.features["codes"] == datasets.Array3D((4, 4, 2), "uint16")
    assert read_manifest(out)["tokenizer"]["depth"] == 2
    assert "embedding" not in load_file(str(out / "codebook.safetensors"))


def test_llama_trains_on_exported_tokens(vq_export):
    from transformers import LlamaConfig, LlamaForCausalLM

    tok, out = vq_export
    ds = datasets.load_from_disk(str(out)).with_format("numpy", dtype=np.int64)
    k, classes = tok.codebook_size, len(ds.features["label"].names)
    codes = torch.from_numpy(ds["codes"][:]).flatten(1)  # [B, 16]
    labels = torch.from_numpy(ds["label"][:])
    ids = torch.cat([(k + labels)[:, None], codes], dim=1)  # class token prefix, then codes
    torch.manual_seed(0)
    cfg = LlamaConfig(
        vocab_size=k + classes + 1, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
        num_attention_heads=2, num_key_value_heads=2, max_position_embeddings=32,
    )  # fmt: skip
    model = LlamaForCausalLM(cfg)
    before = [p.detach().clone() for p in model.parameters()]
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    losses = []
    for _ in range(3):
        loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        opt.step()
        opt.zero_grad()
        losses.append(loss.item())
    assert all(np.isfinite(losses)) and losses[-1] < losses[0]
    assert any(not torch.equal(a, b) for a, b in zip(before, model.parameters()))


def test_interrupted_export_leaves_nothing(tmp_path, monkeypatch):
    tok = tiny_tokenizer()
    calls = {"n": 0}
    encode = tok.encode

    def failing(images):
        calls["n"] += 1
        if calls["n"] == 2:
            raise RuntimeError("injected failure")
        return encode(images)

    monkeypatch.setattr(tok, "encode", failing)
    with pytest.raises(RuntimeError, match="injected"):
        export(tok, tmp_path / "tokens", n=12, views=1, batch_size=4)
    assert list(tmp_path.iterdir()) == []  # no output, no temporary shards


def test_refuses_to_overwrite(tmp_path, vq_export):
    tok, _ = vq_export
    out = export(tok, tmp_path / "tokens", n=2, views=1)
    stamp = (out / "manifest.json").read_text()
    with pytest.raises(FileExistsError, match="overwrite"):
        export(tok, out, n=3, views=1)
    assert (out / "manifest.json").read_text() == stamp
    export(tok, out, n=3, views=1, overwrite=True)
    assert json.loads((out / "manifest.json").read_text())["num_images"] == 3


@pytest.mark.slow
def test_two_process_export_writes_each_index_once(tmp_path, vq_export):
    tok, single = vq_export
    tok_dir = tmp_path / "tok"
    tok.save_pretrained(tok_dir)
    out = tmp_path / "mp"
    env = {**os.environ, "ACCELERATE_USE_CPU": "true", "OMP_NUM_THREADS": "1"}
    cmd = [
        sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", "29531",
        str(ROOT / "scripts" / "export_tokens.py"), "--tokenizer", str(tok_dir), "--data", "digits",
        "--out", str(out), "--views", "2", "--max-samples", "12", "--batch-size", "6", "--no-progress",
    ]  # fmt: skip
    run = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300, cwd=ROOT)
    assert run.returncode == 0, run.stderr[-3000:]
    rows = datasets.load_from_disk(str(out)).with_format("numpy", dtype=np.int64)[:]
    pairs = list(zip(rows["index"].tolist(), rows["view"].tolist()))
    assert sorted(pairs) == [(i, v) for i in range(12) for v in range(2)]  # each exactly once
    ref = datasets.load_from_disk(str(single)).with_format("numpy", dtype=np.int64)[:]
    assert np.array_equal(rows["codes"], ref["codes"])  # same as the single-process export
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".tmp")] == []


def test_rq_with_depth_one_is_refused_and_code_shapes_agree():
    """One predicate for 'codes have a depth axis': an RQ tokenizer has depth >= 2 (depth 1 would
    be plain VQ, and used to export Array2D codes that the model then rejected)."""
    from tokenizer.manifest import TokenizerIdentity
    from tokenizer.quantizers import QuantizerConfig

    with pytest.raises(ValueError, match="kind='rq' needs depth >= 2.*kind='vq'"):
        QuantizerConfig(kind="rq", codebook_size=16, depth=1)
    for kind, depth, shape in (("vq", 1, [4, 4]), ("rq", 3, [4, 4, 3])):
        torch.manual_seed(0)
        cfg = TokenizerConfig(
            resolution=16, encoder_channels=8, decoder_channels=8, ch_mult=[1, 2, 2],
            num_res_blocks=1, latent_dim=4, norm_groups=4,
            quantizer=QuantizerConfig(kind=kind, codebook_size=16, depth=depth),
        )  # fmt: skip
        tok = Tokenizer(cfg).eval()
        identity = tok.identity()
        codes = tok.encode(torch.rand(2, 3, 16, 16) * 2 - 1)
        assert identity.code_shape == shape == list(codes.shape[1:])
        assert tok.codes_have_depth == (len(shape) == 3)
        assert (
            TokenizerIdentity.from_manifest({"tokenizer": identity.tokenizer_fields()}) == identity
        )

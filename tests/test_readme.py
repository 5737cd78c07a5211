"""The README's Python train-and-export example runs as written (with fewer steps)."""

from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
FAST = '"runtime.max_steps=2", "runtime.progress=false", "runtime.tracker=none"'


def readme_block(after: str) -> str:
    """The first ```python block after the line containing `after`."""
    text = (ROOT / "README.md").read_text()
    return text.split(after, 1)[1].split("```python\n", 1)[1].split("```", 1)[0]


def test_train_and_export_example_runs(tmp_path, monkeypatch):
    code = readme_block("Train and export")
    fast = code.replace('["runtime.max_steps=400"]', f"[{FAST}]").replace(
        '"data.tokenizer=runs/tok/final"]', f'"data.tokenizer=runs/tok/final", {FAST}]'
    )
    assert fast.count("max_steps=2") == 2, "the README example changed: update this test"
    (tmp_path / "configs").symlink_to(ROOT / "configs")
    monkeypatch.chdir(tmp_path)
    exec(compile(fast, "README.md", "exec"), {"__name__": "readme"})
    runs = tmp_path / "runs"
    for model in ("tok", "gpt"):
        assert (runs / model / "final" / "model.safetensors").is_file()
    assert (runs / "tokens" / "manifest.json").is_file()


def test_generate_and_encode_examples_run(tmp_path, monkeypatch):
    """The Generate and Encode blocks, as written, on tiny models saved where `make demo` puts
    its models (class names "0".."9", a draft for the speculative call)."""
    import torch

    from prior import GPT, GPTConfig
    from tokenizer import Tokenizer, TokenizerConfig
    from tokenizer.quantizers import QuantizerConfig

    torch.manual_seed(0)
    tok = Tokenizer(TokenizerConfig(
        resolution=16, encoder_channels=8, decoder_channels=8, ch_mult=[1, 2, 2],
        num_res_blocks=1, latent_dim=4, norm_groups=4,
        quantizer=QuantizerConfig(kind="vq", codebook_size=16),
    )).eval()  # fmt: skip
    identity = tok.identity().with_classes([str(i) for i in range(10)])
    demo = tmp_path / "outputs" / "demo"
    tok.save_pretrained(demo / "tokenizer" / "final")
    for name, dim in (("prior", 32), ("draft", 16)):
        cfg = GPTConfig(vocab_size=16, grid=[4, 4], num_classes=10, dim=dim, tokenizer=identity)
        GPT(cfg).save_pretrained(demo / name / "final")
    monkeypatch.chdir(tmp_path)
    for after in ("Generate and encode/decode", "Encode and decode your own images"):
        exec(compile(readme_block(after), "README.md", "exec"), {"__name__": "readme"})
    assert (tmp_path / "seven.png").is_file() and (tmp_path / "seven_again.png").is_file()

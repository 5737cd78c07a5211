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

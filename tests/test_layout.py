"""The package layering holds: imports point one way (training <- tokenizer <- prior <- sampling
<- evaluation), serving and evaluation never import each other, and only scripts/, bench/ and
tests/ sit on top. Every import statement counts, including those inside functions."""

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
LAYERS = {"training": 0, "tokenizer": 1, "prior": 2, "sampling": 3, "evaluation": 4, "serving": 4}
TOP = ("scripts", "bench")


def imported_packages(path: Path) -> set[str]:
    found = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            found |= {alias.name.split(".")[0] for alias in node.names}
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            found.add(node.module.split(".")[0])
    return found


def violations() -> list[str]:
    bad = []
    for package, level in LAYERS.items():
        for path in sorted((ROOT / package).rglob("*.py")):
            for dep in imported_packages(path):
                if dep in TOP or dep == "tests":
                    bad.append(f"{path.relative_to(ROOT)} imports {dep}")
                elif dep in LAYERS and dep != package and LAYERS[dep] >= level:
                    bad.append(f"{path.relative_to(ROOT)} imports {dep} (same or higher layer)")
    return bad


def test_imports_point_one_way():
    assert violations() == []


def test_the_checker_sees_a_violation(tmp_path, monkeypatch):
    """Negative control: an upward import (here: inside a function) is reported."""
    fake = tmp_path / "tokenizer"
    fake.mkdir()
    (fake / "bad.py").write_text("def f():\n    from sampling import Pipeline\n")
    monkeypatch.setattr(__import__(__name__), "ROOT", tmp_path)
    assert violations() == ["tokenizer/bad.py imports sampling (same or higher layer)"]

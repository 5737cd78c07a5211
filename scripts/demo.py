"""The whole pipeline on embedded data: tokenizer -> tokens -> prior (+ draft) -> samples -> metrics.

python scripts/demo.py --config configs/demo/digits.yaml --output-dir outputs/demo [key=value ...]

Each stage runs the same command a user would (scripts/train_tokenizer.py, export_tokens.py,
train_prior.py) in a subprocess, so the demo doubles as an end-to-end check of the CLIs. A stage
whose result exists is reused only if it was made by the same command, config file and upstream
stages (`<folder>.stage.json` records that fingerprint); otherwise the old folder is moved to
`<folder>.stale` and the stage runs again. On a machine with a GPU, accelerate puts the training
on it.
"""

from __future__ import annotations

import hashlib
import json
import shutil
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout, uninstalled

import torch  # noqa: E402

from evaluation.judge import dataset_images  # noqa: E402
from evaluation.judge_cache import load_or_train_judge  # noqa: E402
from evaluation.plots import plot_guidance  # noqa: E402
from evaluation.real_data import real_data  # noqa: E402
from evaluation.runner import SampleOptions, evaluate_generation  # noqa: E402
from sampling import Pipeline  # noqa: E402
from tokenizer.images import save_png, to_pil, viewing_grid  # noqa: E402
from tokenizer.metrics import reconstruction_metrics  # noqa: E402
from training import cli  # noqa: E402
from training.config import parse_cli  # noqa: E402
from training.serialization import atomic_write_text  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]


@dataclass
class StageConfig:
    """A training stage: its YAML config and extra `key.sub=value` overrides."""

    config: str = ""
    overrides: list[str] = field(default_factory=list)


@dataclass
class DemoConfig:
    data: str = "digits"  # embedded dataset
    resolution: int = 32
    prompt_mode: str = "class"  # class | text
    tokenizer: StageConfig = field(
        default_factory=lambda: StageConfig("configs/tokenizer/digits.yaml")
    )
    prior: StageConfig = field(default_factory=lambda: StageConfig("configs/prior/digits_gpt.yaml"))
    draft: StageConfig = field(
        default_factory=lambda: StageConfig("configs/prior/digits_gpt_draft.yaml")
    )
    export_views: int = 8  # augmented views per training image (view 0 = clean)
    export_overrides: list[str] = field(default_factory=list)
    grid_per_prompt: int = 8
    grid_prompts: list[str] = field(default_factory=list)  # empty: every class name
    grid_guidance: float = 3.0
    guidance_plausibility: float = 0.0  # CFG cutoff alpha for grids and evaluation (0 = off)
    guidance_scales: list[float] = field(default_factory=lambda: [1.0, 3.0])
    eval_per_class: int = 50
    draft_len: int = 4
    tree_guidance: float = 3.0  # the guidance the tree draft is distilled for (bench/sampling.py's)
    seed: int = 0  # training (tokenizer, views, prior; draft: seed + 1) and sampling


def run(cmd: list[str]) -> None:
    """Run a stage's CLI; its output streams to the console, a failure stops the demo."""
    print("$ " + " ".join(cmd), flush=True)
    subprocess.run([sys.executable, *cmd], cwd=ROOT, check=True)


def fingerprint(cmd: list[str], upstream: str = "") -> str:
    """What a stage's result depends on: its command line, its config file's text, upstream."""
    digest = hashlib.sha256(json.dumps([cmd, upstream]).encode())
    if "--config" in cmd:
        digest.update((ROOT / cmd[cmd.index("--config") + 1]).read_bytes())
    return digest.hexdigest()[:16]


def stage(
    name: str,
    folder: Path,
    done: Path,
    cmd: list[str],
    timings: dict[str, float],
    upstream: str = "",
) -> str:
    """Run `cmd` unless `done` exists with this fingerprint; returns the fingerprint."""
    key = fingerprint(cmd, upstream)
    stamp = folder.with_name(folder.name + ".stage.json")
    made_by = json.loads(stamp.read_text())["fingerprint"] if stamp.is_file() else None
    if done.exists() and made_by == key:
        print(f"[{name}] reusing {done}")
        return key
    if folder.exists() and made_by != key:  # another config, or an older demo: keep it aside
        stale = folder.with_name(folder.name + ".stale")
        print(f"[{name}] {folder} was made by another command or config: moved to {stale}")
        shutil.rmtree(stale, ignore_errors=True)
        folder.rename(stale)
    folder.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_text(stamp, json.dumps({"fingerprint": key, "cmd": cmd}, indent=2) + "\n")
    start = time.perf_counter()
    run(cmd)
    timings[name] = round(time.perf_counter() - start, 1)
    print(f"[{name}] done in {timings[name]} s")
    return key


def train_models(cfg: DemoConfig, out: Path, timings: dict[str, float]) -> None:
    tok_dir, tokens = out / "tokenizer", out / "tokens"
    tok_key = stage("tokenizer", tok_dir, tok_dir / "final", ["scripts/train_tokenizer.py", "--config",
                    cfg.tokenizer.config, "--output-dir", str(tok_dir), "--resume", "latest",
                    f"runtime.seed={cfg.seed}", *cfg.tokenizer.overrides], timings)  # fmt: skip
    token_keys = []
    for split, views in (("train", cfg.export_views), ("test", 1)):
        token_keys.append(stage(f"export_{split}", tokens / split, tokens / split, ["scripts/export_tokens.py",
              "--tokenizer", str(tok_dir / "final"), "--data", cfg.data, "--split", split, "--out",
              str(tokens / split), "--views", str(views), "--seed", str(cfg.seed), *cfg.export_overrides], timings,
              tok_key))  # fmt: skip
    for name, sub, seed in (("prior", cfg.prior, cfg.seed), ("draft", cfg.draft, cfg.seed + 1)):
        stage(name, out / name, out / name / "final", ["scripts/train_prior.py", "--config", sub.config,
              "--output-dir", str(out / name), "--resume", "latest", f"runtime.seed={seed}",
              f"data.tokens={tokens / 'train'}",
              f"data.val_tokens={tokens / 'test'}", f"data.tokenizer={tok_dir / 'final'}", *sub.overrides],
              timings, "".join(token_keys))  # fmt: skip
    if cfg.prompt_mode == "class":  # method="tree"'s draft, distilled from the trained prior
        prior_stamp = (out / "prior.stage.json").read_text()
        stage("tree_draft", out / "tree_draft", out / "tree_draft" / "config.json",
              ["scripts/distill_tree_draft.py", "--prior", str(out / "prior" / "final"), "--out",
               str(out / "tree_draft"), "--guidance", str(cfg.tree_guidance), "--seed", str(cfg.seed)],
              timings, prior_stamp)  # fmt: skip


def sample_grids(cfg: DemoConfig, pipe: Pipeline, out: Path) -> dict[str, dict]:
    """samples.png (plain AR) and samples_speculative.png (same prompts, draft-accelerated)."""
    prompts = cfg.grid_prompts or pipe.class_names
    report = {}
    for method, name in (("ar", "samples.png"), ("speculative", "samples_speculative.png")):
        start = time.perf_counter()
        draft_len = cfg.draft_len if method == "speculative" else None
        result = pipe(prompts, guidance_scale=cfg.grid_guidance, guidance_plausibility=cfg.guidance_plausibility,
                      method=method, draft_len=draft_len,
                      num_images_per_prompt=cfg.grid_per_prompt, generator=torch.Generator().manual_seed(cfg.seed))  # fmt: skip
        seconds = time.perf_counter() - start
        save_png(viewing_grid(result.images, cfg.grid_per_prompt, labels=list(prompts)), out / name)
        report[method] = {
            "seconds": round(seconds, 2),
            "images": len(result.images),
            "grid": str(out / name),
        }
        if result.stats is not None:
            stats = result.stats.as_dict()
            report[method] |= {
                k: stats[k] for k in ("acceptance_rate", "tokens_per_target_call", "target_calls")
            }
    report["speculative"]["speedup_vs_ar"] = round(
        report["ar"]["seconds"] / report["speculative"]["seconds"], 2
    )
    return report


@torch.no_grad()
def save_reconstructions(pipe: Pipeline, images: torch.Tensor, path: Path) -> None:
    """Held-out images [n, 3, H, W] over their tokenizer reconstructions, enlarged for viewing."""
    recon = pipe.tokenizer.decode(pipe.tokenizer.encode(images)).clamp(-1, 1)
    grid = viewing_grid(to_pil(images) + to_pil(recon), len(images), labels=["held-out", "recon"])
    save_png(grid, path)


def main(argv: list[str] | None = None) -> None:
    cfg, args = parse_cli(DemoConfig, argv, description=__doc__)
    out = Path(args.output_dir).resolve()  # stages run with cwd=ROOT: no relative paths
    out.mkdir(parents=True, exist_ok=True)
    timings: dict[str, float] = {}
    start = time.perf_counter()
    train_models(cfg, out, timings)

    device = "cuda" if torch.cuda.is_available() else "cpu"
    tree_draft = out / "tree_draft" if (out / "tree_draft" / "config.json").is_file() else None
    pipe = Pipeline.from_pretrained(
        out / "tokenizer" / "final",
        out / "prior" / "final",
        out / "draft" / "final",
        device=device,
        tree_draft_dir=tree_draft,
    )
    data = real_data(cfg.data, cfg.resolution)
    metrics: dict = {"device": torch.cuda.get_device_name() if device == "cuda" else "cpu"}
    held = dataset_images(data.heldout)  # [N, 3, H, W]
    metrics["tokenizer"] = reconstruction_metrics(pipe.tokenizer, held.split(64))
    save_reconstructions(pipe, held[:12], out / "reconstructions.png")
    metrics["sampling"] = sample_grids(cfg, pipe, out)
    judge, judge_report = load_or_train_judge(out / "judge", data)
    metrics["judge"] = {k: judge_report[k] for k in judge_report if k != "train_config"}

    def save_eval_grid(scale: float, images: torch.Tensor) -> None:
        """The first 16 evaluation samples of each prompt group, one labelled row per group."""
        groups = images.split(cfg.eval_per_class)  # class-balanced: prompt blocks in order
        shown = min(16, cfg.eval_per_class)
        labels = pipe.class_names if cfg.prompt_mode == "class" else None
        cells = [im for group in groups for im in to_pil(group[:shown])]
        grid = viewing_grid(cells, shown, labels=labels[: len(groups)] if labels else None)
        save_png(grid, out / f"eval_guidance_{scale:g}.png")

    metrics["generation"] = evaluate_generation(
        pipe,
        judge,
        data,
        cfg.guidance_scales,
        cfg.eval_per_class,
        cfg.prompt_mode,
        cfg.seed,
        SampleOptions(plausibility=cfg.guidance_plausibility),
        on_samples=save_eval_grid,
    )
    plot_guidance(metrics["generation"], out / "guidance.png")
    metrics["timings_s"] = timings | {"total": round(time.perf_counter() - start, 1)}
    atomic_write_text(out / "metrics.json", json.dumps(metrics, indent=2))
    summary = {f"guidance {r['guidance_scale']:g}": {"accuracy": round(r["accuracy"]["overall"], 4), "frechet": round(r["frechet"], 3)}
               for r in metrics["generation"]["runs"]}  # fmt: skip
    print(
        json.dumps({"tokenizer_psnr": round(metrics["tokenizer"]["psnr"], 2), **summary}, indent=2)
    )
    print(f"\noutputs in {out}/: samples.png, samples_speculative.png, reconstructions.png, guidance.png, metrics.json,"
          f" tokenizer/final, prior/final, draft/final, tree_draft")  # fmt: skip


def console() -> None:
    """The installed command's entry point: user errors as one line."""
    cli.run(main)


if __name__ == "__main__":
    console()

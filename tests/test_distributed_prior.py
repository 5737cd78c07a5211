"""Two-process prior training on CPU: DeepSpeed ZeRO-2 / ZeRO-3 (through `accelerate launch`) and
DDP (gloo, through torchrun): train, checkpoint, resume from latest, identical weights on every
rank, and a final/ that `load_prior` reads back with exactly those weights."""

import hashlib
import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from test_export import export, tiny_tokenizer

from prior import load_prior

pytestmark = pytest.mark.slow
ROOT = Path(__file__).resolve().parents[1]
ARGS = [
    "runtime.batch_size=4", "runtime.log_every=1", "runtime.eval_every=2", "runtime.sample_every=2",
    "runtime.save_every=2", "runtime.tracker=none", "runtime.progress=false", "optim.lr=0.01",
    "data.val_fraction=0.2", "sample.rows=2", "sample.per_row=2",
]  # fmt: skip


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def tokens(tmp_path_factory) -> tuple[Path, Path]:
    root = tmp_path_factory.mktemp("dist")
    tok = tiny_tokenizer("vq")
    tok.save_pretrained(root / "tok")
    return export(tok, root / "tokens", n=20, views=1), root / "tok"


def launch(launcher: list[str], env: dict[str, str], out: Path, tokens, steps: int, *extra: str):
    data, tok = tokens
    cmd = launcher + [
        str(ROOT / "scripts" / "train_prior.py"), "--output-dir", str(out), "--resume", "latest",
        f"data.tokens={data}", f"data.tokenizer={tok}", f"runtime.max_steps={steps}", *ARGS, *extra,
    ]  # fmt: skip
    env = {**os.environ, "OMP_NUM_THREADS": "1", **env}
    run = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=400, cwd=ROOT)
    assert run.returncode == 0, (run.stdout + run.stderr)[-4000:]
    return run.stdout + run.stderr


def accelerate_launch(config: str) -> list[str]:
    return [
        sys.executable, "-m", "accelerate.commands.launch", "--config_file",
        str(ROOT / "configs" / "accelerate" / config), "--num_processes", "2",
        "--main_process_port", str(free_port()),
    ]  # fmt: skip


def torchrun() -> list[str]:
    return [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2",
            "--master_port", str(free_port())]  # fmt: skip


def final_digest(path: Path) -> str:
    """What `prior.trainer.weights_digest` computes on each rank, from the saved final model."""
    digest = hashlib.sha256()
    for name, param in load_prior(path).named_parameters():
        digest.update(f"prior.{name}".encode())
        digest.update(param.detach().float().contiguous().numpy().tobytes())
    return digest.hexdigest()


def check(out: Path, log: str, ranks: int = 2, final_is_raw: bool = True) -> None:
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows if "loss" in r] == [1, 2, 3, 4]
    assert [r["step"] for r in rows if "val_loss" in r] == [2, 4]
    assert "resumed from" in log and "step_000002" in log
    ckpt = out / "checkpoints" / "step_000004"
    assert {f"random_states_{r}.pkl" for r in range(ranks)} <= {p.name for p in ckpt.iterdir()}
    digests = json.loads((out / "final_weights.json").read_text())["sha256_per_rank"]
    assert len(digests) == ranks and len(set(digests)) == 1  # every rank holds the same weights
    if final_is_raw:  # (with an EMA, final/ holds the average instead)
        assert final_digest(out / "final") == digests[0]  # final/ holds exactly those weights
    assert (out / "samples" / "step_000004.png").is_file()


# ZeRO-1 is not run: DeepSpeed drives stages 1 and 2 with one optimizer (DeepSpeedZeroOptimizer,
# partition_gradients on or off) and one checkpoint format, so stage 2 covers its code (~40 s)
@pytest.mark.parametrize("stage,ema", [(2, False), (3, False), (3, True)])
def test_deepspeed_zero_two_processes_train_resume_and_save(tmp_path, tokens, stage, ema):
    # the EMA run also checkpoints activations: ZeRO-3 gathers inside recomputed blocks
    extra = ("optim.ema_decay=0.9", "gradient_checkpointing=true") if ema else ()
    out = tmp_path / f"zero{stage}"
    launch(accelerate_launch(f"deepspeed_zero{stage}.yaml"), {}, out, tokens, 2, *extra)
    log = launch(accelerate_launch(f"deepspeed_zero{stage}.yaml"), {}, out, tokens, 4, *extra)
    check(out, log, final_is_raw=not ema)
    ckpt = {p.name for p in (out / "checkpoints" / "step_000004").iterdir()}
    assert "pytorch_model" in ckpt  # DeepSpeed's sharded engine state
    assert ("custom_checkpoint_0.pkl" in ckpt) == ema  # the EMA travels with the checkpoint


def test_ddp_two_cpu_processes_train_resume_and_save(tmp_path, tokens):
    out = tmp_path / "ddp"
    env = {"ACCELERATE_USE_CPU": "true"}  # MULTI_CPU: DDP over gloo
    launch(torchrun(), env, out, tokens, 2, "optim.ema_decay=0.9")
    log = launch(torchrun(), env, out, tokens, 4, "optim.ema_decay=0.9")
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows if "loss" in r] == [1, 2, 3, 4]
    assert "resumed from" in log
    digests = json.loads((out / "final_weights.json").read_text())["sha256_per_rank"]
    assert len(digests) == 2 and len(set(digests)) == 1
    load_prior(out / "final")  # the EMA weights


@pytest.mark.skipif(
    torch.cuda.device_count() < 2,
    reason="accelerate selects FSDP only on GPU-type devices (MULTI_CPU is never FSDP), so FSDP "
    "cannot run on CPU/gloo; needs 2 GPUs",
)
def test_fsdp_two_gpus_train_resume_and_save(tmp_path, tokens):
    out = tmp_path / "fsdp"
    launch(accelerate_launch("fsdp.yaml"), {}, out, tokens, 2, "runtime.mixed_precision=bf16")
    log = launch(accelerate_launch("fsdp.yaml"), {}, out, tokens, 4, "runtime.mixed_precision=bf16")
    check(out, log)

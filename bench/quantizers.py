"""Quantizer benchmark: Tessera's VQ/RQ vs vector-quantize-pytorch on identical inputs.

Both sides get the same settings (EMA codebook, decay 0.99, commitment 0.25, straight-through,
k-means init) and the same batches; forward+backward steps alternate between them so load on the
machine hits both alike. Reports the median step time, the quantization error (MSE of quantized
vs input on a held-out batch, eval mode), code usage on that batch, peak CUDA memory of one step,
and ours/theirs ratios. Prints JSON.

    python bench/quantizers.py                 # CPU, ~1-2 min on 2 cores
    python bench/quantizers.py --device cuda
"""

from __future__ import annotations

import argparse
import importlib.metadata
import statistics
import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from einops import rearrange
from torch import Tensor, nn
from vector_quantize_pytorch import ResidualVQ, VectorQuantize

from tokenizer.quantizers import QuantizerConfig, build_quantizer

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from bench.common import device_name, emit, timed  # noqa: E402

DECAY, BETA, KMEANS_ITERS = 0.99, 0.25, 3


@dataclass
class Case:
    name: str
    codebook_size: int
    dim: int
    cosine: bool
    depth: int


CASES = [
    Case("vq_16384x8_l2", 16384, 8, True, 1),
    Case("vq_1024x64", 1024, 64, False, 1),
    Case("rq_1024x64_d4", 1024, 64, False, 4),
]


def build_ours(case: Case, device: str) -> nn.Module:
    cfg = QuantizerConfig(
        kind="rq" if case.depth > 1 else "vq",
        codebook_size=case.codebook_size,
        l2_normalize=case.cosine,
        ema=True,
        ema_decay=DECAY,
        beta=BETA,
        estimator="ste",
        kmeans_init=True,
        kmeans_iters=KMEANS_ITERS,
        depth=case.depth,
        shared_codebook=False,
    )
    return build_quantizer(cfg, case.dim).to(device)


def build_theirs(case: Case, device: str) -> nn.Module:
    common = dict(
        dim=case.dim,
        codebook_size=case.codebook_size,
        decay=DECAY,
        commitment_weight=BETA,
        rotation_trick=False,
        kmeans_init=True,
        kmeans_iters=KMEANS_ITERS,
    )
    if case.depth > 1:
        return ResidualVQ(num_quantizers=case.depth, shared_codebook=False, **common).to(device)
    return VectorQuantize(use_cosine_sim=case.cosine, **common).to(device)


def make_batch(case: Case, centers: Tensor, n: int, gen: torch.Generator) -> Tensor:
    """n vectors [n, dim] from a Gaussian mixture (unit norm for the cosine case)."""
    pick = torch.randint(len(centers), (n,), generator=gen)
    x = centers[pick] + 0.3 * torch.randn(n, case.dim, generator=gen)
    return F.normalize(x, dim=-1) if case.cosine else x


class Side:
    """One implementation with its native input layout: ours [B,C,h,w], theirs [B,N,C]."""

    def __init__(self, name: str, module: nn.Module, grid: int) -> None:
        self.name, self.module, self.grid = name, module, grid

    def layout(self, x: Tensor) -> Tensor:
        if self.name == "ours":
            return rearrange(x, "(b h w) c -> b c h w", h=self.grid, w=self.grid).contiguous()
        return rearrange(x, "(b n) c -> b n c", n=self.grid * self.grid).contiguous()

    def run(self, x: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """-> (quantized rows [M,C], codes [M, depth], aux loss)."""
        if self.name == "ours":
            out = self.module(x)
            rows = rearrange(out.quantized, "b c h w -> (b h w) c")
            return rows, out.codes.reshape(rows.shape[0], -1), out.loss
        quantized, codes, loss = self.module(x)
        rows = rearrange(quantized, "b n c -> (b n) c")
        return rows, codes.reshape(rows.shape[0], -1), loss.sum()

    def step(self, x: Tensor) -> None:
        x = x.detach().requires_grad_()
        rows, _, loss = self.run(x)
        (rows.square().mean() + loss).backward()


def peak_memory_mb(fn: Callable[[], None], device: str) -> float | None:
    if device != "cuda":
        return None
    torch.cuda.synchronize()
    torch.cuda.empty_cache()
    base = torch.cuda.memory_allocated()
    torch.cuda.reset_peak_memory_stats()
    fn()
    torch.cuda.synchronize()
    return (torch.cuda.max_memory_allocated() - base) / 2**20


def bench_case(case: Case, args: argparse.Namespace) -> dict:
    device, n, grid = args.device, args.vectors, 32
    gen = torch.Generator().manual_seed(0)
    centers = torch.randn(4 * case.codebook_size, case.dim, generator=gen)
    batches = [make_batch(case, centers, n, gen) for _ in range(1 + args.warmup + args.repeats)]
    held_out = make_batch(case, centers, n, gen).to(device)
    torch.manual_seed(0)
    sides = [
        Side("ours", build_ours(case, device), grid),
        Side("theirs", build_theirs(case, device), grid),
    ]
    inputs = {s.name: [s.layout(b).to(device) for b in batches] for s in sides}
    result: dict = {s.name: {} for s in sides}
    for s in sides:  # first training step runs k-means: timed on its own
        result[s.name]["init_step_ms"] = 1e3 * timed(lambda s=s: s.step(inputs[s.name][0]), device)
    times: dict[str, list[float]] = {s.name: [] for s in sides}
    for i in range(1, len(batches)):
        order = sides if i % 2 else sides[::-1]  # alternate who goes first
        for s in order:
            t = timed(lambda s=s, i=i: s.step(inputs[s.name][i]), device)
            if i > args.warmup:
                times[s.name].append(t)
    for s in sides:
        s.module.eval()
        with torch.no_grad():
            rows, codes, _ = s.run(s.layout(held_out))
        result[s.name]["fwd_bwd_ms"] = 1e3 * statistics.median(times[s.name])
        result[s.name]["mse"] = F.mse_loss(rows, held_out).item()
        result[s.name]["usage"] = torch.unique(codes[:, 0]).numel() / case.codebook_size
        s.module.train()
        result[s.name]["peak_mem_mb"] = peak_memory_mb(
            lambda s=s: s.step(inputs[s.name][-1]), device
        )
    ours, theirs = result["ours"], result["theirs"]
    result["time_ratio"] = ours["fwd_bwd_ms"] / theirs["fwd_bwd_ms"]
    result["mse_ratio"] = ours["mse"] / theirs["mse"]
    if device == "cuda":
        result["mem_ratio"] = ours["peak_mem_mb"] / theirs["peak_mem_mb"]
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    parser.add_argument(
        "--vectors", type=int, default=8192, help="vectors per batch (multiple of 1024)"
    )
    parser.add_argument("--repeats", type=int, default=5, help="timed steps per side (median)")
    parser.add_argument(
        "--warmup", type=int, default=0, help="untimed steps after the k-means step"
    )
    parser.add_argument("--cases", default=",".join(c.name for c in CASES))
    args = parser.parse_args()
    if args.vectors % 1024:
        raise ValueError(f"--vectors must be a multiple of 1024 (32x32 grids), got {args.vectors}")
    if args.device == "cuda" and not torch.cuda.is_available():
        raise ValueError("--device cuda requested but CUDA is not available")
    wanted = args.cases.split(",")
    unknown = set(wanted) - {c.name for c in CASES}
    if unknown:
        raise ValueError(
            f"unknown --cases {sorted(unknown)}; choose from {[c.name for c in CASES]}"
        )
    report = {
        "benchmark": "quantizers",
        "device": device_name(args.device),
        "torch": torch.__version__,
        "vector_quantize_pytorch": importlib.metadata.version("vector-quantize-pytorch"),
        "vectors": args.vectors,
        "repeats": args.repeats,
        "settings": "EMA codebook decay 0.99, commitment 0.25, straight-through, k-means init 3 iters",
        "ratios": "ours / theirs (lower is better for time, mse, memory)",
        "cases": {c.name: bench_case(c, args) for c in CASES if c.name in wanted},
    }
    emit(report)


if __name__ == "__main__":
    main()

"""The draft of tree speculation: a tiny network over a code's committed neighbours, distilled
from the target's own guided distributions, cheap enough to run inside the target's round.

A draft prior's call costs a large part of a small target's step (both are overhead; see
sampling/draft_length.py), and a count table of the training codes ranks the guided target's
choice first only about a third of the time. This draft reads what is already known about a
position: the class, the position, and the codes at fixed raster offsets before it (left, two
left, above-right, above, above-left on the code grid), sums their embeddings and maps them
through a two-layer MLP to logits. It is fitted to the target's guided distributions p on
samples the target drew itself (soft cross-entropy, i.e. KL(p || q)), so it predicts what the
target does under that guidance, not what the data does. A round calls it once per tree level,
a few microseconds of arithmetic in the same compiled graph (`round_logits`: its matrix
products as fused loops, not library calls). Exactness never depends on it
(sampling/tree.py only uses its ranking to choose candidates).
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field

import torch
from huggingface_hub import PyTorchModelHubMixin
from torch import Tensor, nn
from tqdm.auto import tqdm

from sampling.autoregressive import generate_ar
from sampling.guidance import GuidanceSchedule
from sampling.logits import SamplingConfig
from sampling.noise import RowNoise
from training.serialization import SafetensorsConfigMixin


def neighbour_offsets(grid_width: int, num_tokens: int) -> list[int]:
    """Raster offsets of left, two left, above-right, above, above-left (those inside N)."""
    wanted = (1, 2, grid_width - 1, grid_width, grid_width + 1)
    return sorted({k for k in wanted if 1 <= k < num_tokens})


@dataclass
class TreeDraftConfig:
    """Sizes of a TreeDraft and what it was distilled from (for the record)."""

    vocab_size: int
    num_tokens: int
    grid_width: int
    num_classes: int = 1  # 1: one shared class (text / unconditional priors)
    dim: int = 64
    hidden: int = 256
    guidance_scale: float = 1.0  # the target's guidance when distilled
    offsets: list[int] = field(default_factory=list)  # filled from the grid when empty

    def __post_init__(self) -> None:
        for name in ("vocab_size", "num_tokens", "grid_width", "num_classes", "dim", "hidden"):
            if getattr(self, name) < 1:
                raise ValueError(f"TreeDraftConfig.{name} must be >= 1, got {getattr(self, name)}")
        if not self.offsets:
            self.offsets = neighbour_offsets(self.grid_width, self.num_tokens)
        if any(not 1 <= k < max(self.num_tokens, 2) for k in self.offsets):
            raise ValueError(f"offsets must lie in [1, {self.num_tokens}), got {self.offsets}")


class TreeDraft(nn.Module, SafetensorsConfigMixin, PyTorchModelHubMixin):
    """q(code at position t | class, t, codes at t - offsets): logits [R, m, V]."""

    _config_schema = TreeDraftConfig
    _hub_downloads = False

    def __init__(self, config: TreeDraftConfig) -> None:
        super().__init__()
        if isinstance(config, dict):
            config = TreeDraftConfig(**config)
        self.config = cfg = config
        self.where = nn.Embedding(cfg.num_classes * cfg.num_tokens, cfg.dim)
        # one table per offset, plus a "no code there" entry (id V) in each
        self.context = nn.Embedding(len(cfg.offsets) * (cfg.vocab_size + 1), cfg.dim)
        self.mlp = nn.Sequential(
            nn.SiLU(),
            nn.Linear(cfg.dim, cfg.hidden),
            nn.SiLU(),
            nn.Linear(cfg.hidden, cfg.vocab_size),
        )
        shift = torch.arange(len(cfg.offsets)) * (cfg.vocab_size + 1)
        self.register_buffer("shift", shift, persistent=False)

    def forward(self, classes: Tensor, positions: Tensor, context: Tensor) -> Tensor:
        """classes Long[R], positions Long[R, m], context Long[R, m, K] (codes at the offsets,
        V where the position is before the image) -> logits [R, m, V]."""
        return self.mlp(self._inputs(classes, positions, context))

    def _inputs(self, classes: Tensor, positions: Tensor, context: Tensor) -> Tensor:
        """The MLP's input [R, m, dim]: the (class, position) and neighbour-code embeddings."""
        where = classes[:, None] * self.config.num_tokens + positions  # [R, m]
        return self.where(where) + self.context(context + self.shift).sum(-2)

    def round_logits(self, classes: Tensor, positions: Tensor, context: Tensor) -> Tensor:
        """`forward` for a tree round's few rows: each Linear as a broadcast multiply-sum, which
        the compiled round fuses into its own loops. A round drafts one to a few dozen rows,
        where two GEMM library calls per level cost more in launch than in arithmetic."""
        x = self._inputs(classes, positions, context)  # [R, m, dim]
        for layer in self.mlp:
            if isinstance(layer, nn.Linear):  # [R, m, in] x [out, in] -> [R, m, out]
                x = (x[..., None, :] * layer.weight).sum(-1) + layer.bias
            else:
                x = layer(x)
        return x

    def check_fits(self, *, vocab_size: int, num_tokens: int, num_classes: int | None) -> None:
        """ValueError naming the mismatch when this draft was distilled for another prior."""
        cfg = self.config
        if cfg.vocab_size != vocab_size or cfg.num_tokens != num_tokens:
            raise ValueError(
                f"tree draft predicts {cfg.num_tokens} codes of a {cfg.vocab_size}-code "
                f"tokenizer; the prior samples {num_tokens} codes of {vocab_size}"
            )
        if cfg.num_classes != 1 and cfg.num_classes != num_classes:
            raise ValueError(
                f"tree draft knows {cfg.num_classes} classes; the prior has {num_classes}"
            )

    def row_classes(self, classes: Tensor | None, batch: int, device: torch.device) -> Tensor:
        """The class row each of `batch` rows reads: its class id, or 0 for a draft of a prior
        without classes (ValueError when class ids are missing or not one per row)."""
        if classes is None:
            if self.config.num_classes != 1:
                raise ValueError(
                    "this tree draft knows classes: pass the rows' class ids (classes=)"
                )
            return torch.zeros(batch, dtype=torch.long, device=device)
        if classes.shape != (batch,):
            raise ValueError(
                f"classes must be one id per row ({batch}), got {tuple(classes.shape)}"
            )
        return classes if self.config.num_classes != 1 else torch.zeros_like(classes)

    @staticmethod
    def context_of(codes: Tensor, offsets: list[int], vocab_size: int) -> Tensor:
        """Codes Long[B, N] -> their context Long[B, N, K] (V before the image)."""
        columns = []
        for k in offsets:
            shifted = torch.full_like(codes, vocab_size)
            shifted[:, k:] = codes[:, :-k]
            columns.append(shifted)
        return torch.stack(columns, dim=-1)


@dataclass
class DistillConfig:
    """How a TreeDraft is fitted to a target prior."""

    guidance_scale: float = 3.0  # the guidance the draft will serve (acceptance falls elsewhere)
    plausibility: float = 0.0
    # digits demo, AR's code ranked first by q / E on 2000 fresh samples: 72 % with 20,000
    # samples and 8000 steps, 73 % with 80,000 and 8000, 75 % with 80,000 and 16,000 (~7 min)
    samples: int = 80_000  # target samples whose distributions are the training targets
    sample_batch: int = 1000
    steps: int = 16_000
    batch_size: int = 2048
    lr: float = 3e-3
    dim: int = 64
    hidden: int = 256
    seed: int = 0


def target_samples(
    target: nn.Module, config: DistillConfig, *, progress: bool = True
) -> tuple[Tensor, Tensor, Tensor]:
    """(codes Long[M, N], distributions [M, N, V], classes Long[M]): the target's own guided
    samples, classes cycling, seeds from config.seed (not the ones a user would pass)."""
    cfg = target.config
    if cfg.cond not in ("class", "none"):
        raise ValueError(
            f"a tree draft is distilled from a class or unconditional prior, not {cfg.cond!r}"
        )
    device = next(target.parameters()).device
    guidance = GuidanceSchedule(config.guidance_scale, plausibility=config.plausibility)
    codes, probs, classes = [], [], []
    base = (config.seed + 1) * 1_000_000_007  # away from small user seeds
    batches = -(-config.samples // config.sample_batch)
    for b in tqdm(range(batches), desc="target samples", disable=not progress):
        rows = min(config.sample_batch, config.samples - b * config.sample_batch)
        first = b * config.sample_batch
        if cfg.cond == "class":
            ids = (torch.arange(rows, device=device) + first) % cfg.num_classes
            cond = target.condition(class_ids=ids)
        else:
            ids = torch.zeros(rows, dtype=torch.long, device=device)
            cond = target.condition(batch_size=rows)
        noise = RowNoise.from_seeds(list(range(base + first, base + first + rows)), device=device)
        x, p = generate_ar(target, cond, target.null_condition(rows), cfg.seq_len, SamplingConfig(),
                           guidance, return_probs=True, noise=noise)  # fmt: skip
        codes.append(x)
        probs.append(p)
        classes.append(ids)
    return torch.cat(codes), torch.cat(probs), torch.cat(classes)


def distill_tree_draft(
    target: nn.Module, config: DistillConfig | None = None, *, progress: bool = True
) -> tuple[TreeDraft, dict[str, float]]:
    """Fit a TreeDraft to `target` under config's guidance; returns it (eval mode) and a report
    (final soft cross-entropy, seconds). Position 0 is never drafted (the prefill draws it)."""
    config = config if config is not None else DistillConfig()
    if config.samples < 1 or config.steps < 1:
        raise ValueError(f"samples and steps must be >= 1, got {config.samples}, {config.steps}")
    start = time.perf_counter()
    cfg = target.config
    torch.manual_seed(config.seed)
    with torch.no_grad():
        codes, probs, classes = target_samples(target, config, progress=progress)
    width = cfg.grid[1] if hasattr(cfg, "grid") else cfg.seq_len
    draft_cfg = TreeDraftConfig(
        vocab_size=cfg.vocab_size, num_tokens=cfg.seq_len, grid_width=width,
        num_classes=cfg.num_classes if cfg.cond == "class" else 1, dim=config.dim,
        hidden=config.hidden, guidance_scale=config.guidance_scale,
    )  # fmt: skip
    draft = TreeDraft(draft_cfg).to(codes.device)
    m, n = codes.shape
    context = TreeDraft.context_of(codes, draft_cfg.offsets, cfg.vocab_size)[:, 1:]  # [M, N-1, K]
    positions = torch.arange(1, n, device=codes.device).expand(m, n - 1)
    rows = classes[:, None].expand(m, n - 1)
    flat = (rows.reshape(-1), positions.reshape(-1), context.reshape(-1, context.shape[-1]))
    targets = probs[:, 1:].reshape(-1, probs.shape[-1])
    opt = torch.optim.AdamW(draft.parameters(), lr=config.lr, weight_decay=0.01)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, config.steps)
    loss = torch.zeros(())
    with torch.enable_grad():  # callers may sit under no_grad
        for _ in tqdm(range(config.steps), desc="distil tree draft", disable=not progress):
            loss = _fit_step(draft, opt, flat, targets, config.batch_size)
            sched.step()
    report = {"soft_cross_entropy": float(loss), "seconds": time.perf_counter() - start}
    return draft.eval(), report


def _fit_step(
    draft: TreeDraft,
    opt: torch.optim.Optimizer,
    flat: tuple[Tensor, Tensor, Tensor],
    targets: Tensor,
    batch_size: int,
) -> Tensor:
    """One AdamW step on soft cross-entropy against the target's distributions."""
    i = torch.randint(0, targets.shape[0], (batch_size,), device=targets.device)
    logits = draft(flat[0][i], flat[1][i][:, None], flat[2][i][:, None])[:, 0]  # [b, V]
    loss = -(targets[i] * logits.log_softmax(-1)).sum(-1).mean()
    opt.zero_grad(set_to_none=True)
    loss.backward()
    opt.step()
    return loss.detach()

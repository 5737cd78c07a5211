"""Stub priors with known logits for testing the decoding algorithms.

They implement the cached sampling API of prior/blocks.py's CachedPriorMixin (setup_caches /
prefill / decode with
per-row positions, condition / null_condition, teacher-forcing forward) with a tiny recurrent
state instead of attention: s_0 = condition vector, s_{i+1} = s_i + W[i, x_i], and the logits of
position i are tanh(s_i) @ out + bias[i]. The cache stores s per position, so decoding at a wrong
or stale position gives wrong logits, exactly like a real KV cache would.
"""

from __future__ import annotations

import copy
import itertools
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from prior.conditioning import Condition


@dataclass
class StubConfig:
    vocab_size: int = 4
    num_classes: int = 3
    dim: int = 8
    max_positions: int = 64
    depth: int = 1
    seed: int = 0
    gain: float = 1.5


class _StubBase(nn.Module):
    """Shared weights, conditioning and call counters."""

    def __init__(self, config: StubConfig) -> None:
        super().__init__()
        self.config = config
        g = torch.Generator().manual_seed(config.seed)
        c, v, d, n = config.num_classes, config.vocab_size, config.dim, config.max_positions
        self.class_emb = nn.Parameter(torch.randn(c + 1, d, generator=g), requires_grad=False)
        self.token_w = nn.Parameter(
            torch.randn(n, config.depth, v + 1, d, generator=g) * 0.8, requires_grad=False
        )
        self.out = nn.Parameter(
            torch.randn(config.depth, d, v, generator=g) * config.gain, requires_grad=False
        )
        self.bias = nn.Parameter(torch.randn(n + 1, v, generator=g) * 0.5, requires_grad=False)
        self.depth_emb = nn.Parameter(
            torch.randn(config.depth, v, d, generator=g) * 0.8, requires_grad=False
        )
        self.prefill_calls = 0
        self.decode_calls = 0
        self.forward_calls = 0
        self.batch_sizes: set[int] = set()

    def perturbed(self, amount: float, seed: int) -> _StubBase:
        """A copy with noise on every weight: a draft model close to (but not equal to) self."""
        other = copy.deepcopy(self)
        g = torch.Generator().manual_seed(seed)
        for param in other.parameters():
            param.data += amount * torch.randn(param.shape, generator=g)
        other.reset_counters()
        return other

    def reset_counters(self) -> None:
        self.prefill_calls = self.decode_calls = self.forward_calls = 0
        self.batch_sizes = set()

    def condition(self, class_ids: Tensor) -> Condition:
        prefix = self.class_emb[class_ids][:, None, :]  # [B, 1, dim]
        return Condition(prefix, torch.ones(prefix.shape[:2], dtype=torch.bool))

    def null_condition(self, batch_size: int) -> Condition:
        ids = torch.full((batch_size,), self.config.num_classes, dtype=torch.long)
        return self.condition(ids)


class StubGPT(_StubBase):
    """GPT-shaped stub: next-token logits from a cached recurrent state."""

    def setup_caches(self, batch_size: int, max_len: int) -> None:
        self.max_len = max_len
        self.state = torch.full((batch_size, max_len + 1, self.config.dim), float("nan"))
        self._engine_owner = None

    def cache_state(self) -> tuple:
        return self.state, self.max_len

    def restore_cache_state(self, state: tuple) -> None:
        self.state, self.max_len = state

    def _logits(self, state: Tensor, position: Tensor) -> Tensor:
        return torch.tanh(state) @ self.out[0] + self.bias[position]  # [..., V]

    def prefill(self, cond: Condition, rows: Tensor | None = None) -> Tensor:
        self.prefill_calls += 1
        self.batch_sizes.add(cond.prefix.shape[0])
        if rows is None:
            if cond.prefix.shape[0] != self.state.shape[0]:
                raise ValueError("prefill batch differs from setup_caches batch")
            rows = torch.arange(self.state.shape[0])
        self.state[rows] = float("nan")  # anything not rewritten is visibly wrong
        self.state[rows, 0] = cond.prefix[:, 0]
        return self._logits(self.state[rows, 0], torch.zeros((), dtype=torch.long))

    def decode(self, tokens: Tensor, positions: Tensor) -> Tensor:
        self.decode_calls += 1
        self.batch_sizes.add(tokens.shape[0])
        batch, steps = tokens.shape
        if int(positions.min()) < 0 or int(positions.max()) + steps > self.max_len:
            raise ValueError(f"decode positions {positions.tolist()} + {steps} exceed the cache")
        rows = torch.arange(batch)
        s = self.state[rows, positions]  # [B, dim] state before each row's first token
        out = []
        for t in range(steps):
            pos = positions + t
            s = s + self.token_w[pos, 0, tokens[:, t]]
            self.state[rows, pos + 1] = s
            out.append(self._logits(s, pos + 1))
        return torch.stack(out, dim=1)  # [B, T, V]

    def forward(self, codes: Tensor, cond: Condition) -> Tensor:
        """Teacher forcing: logits[:, i] predicts codes[:, i], recomputed from scratch."""
        self.forward_calls += 1
        n = codes.shape[1]
        emb = self.token_w[torch.arange(n)[None], 0, codes]  # [B, N, dim]
        states = torch.cat([cond.prefix[:, :1], cond.prefix[:, :1] + emb.cumsum(1)], dim=1)
        return self._logits(states[:, :n], torch.arange(n))  # [B, N, V]


class StubRQ(_StubBase):
    """RQ-Transformer-shaped stub: spatial state per position + depth logits."""

    def setup_caches(self, batch_size: int, max_len: int) -> None:
        self.max_len = max_len
        self.state = torch.full((batch_size, max_len + 1, self.config.dim), float("nan"))

    def prefill(self, cond: Condition) -> Tensor:
        self.prefill_calls += 1
        self.batch_sizes.add(cond.prefix.shape[0])
        self.state[:, 0] = cond.prefix[:, 0]
        return torch.tanh(self.state[:, 0])  # [B, dim]

    def _step(self, codes: Tensor, pos: Tensor) -> Tensor:
        """Sum of per-depth embeddings of codes [B, D] at positions pos [B] -> [B, dim]."""
        depth = torch.arange(codes.shape[1])
        return self.token_w[pos[:, None], depth, codes].sum(1)

    def decode(self, codes: Tensor, positions: Tensor) -> Tensor:
        self.decode_calls += 1
        self.batch_sizes.add(codes.shape[0])
        batch, steps, _ = codes.shape
        if int(positions.min()) < 0 or int(positions.max()) + steps > self.max_len:
            raise ValueError("decode positions exceed the cache")
        rows = torch.arange(batch)
        s = self.state[rows, positions]
        out = []
        for t in range(steps):
            s = s + self._step(codes[:, t], positions + t)
            self.state[rows, positions + t + 1] = s
            out.append(torch.tanh(s))
        return torch.stack(out, dim=1)  # [B, T, dim]

    def depth_logits(self, h: Tensor, prev: Tensor) -> Tensor:
        d = prev.shape[1]
        x = h + sum((self.depth_emb[j, prev[:, j]] for j in range(d)), torch.zeros_like(h))
        return torch.tanh(x) @ self.out[d]  # [B, V]

    def forward(self, codes: Tensor, cond: Condition) -> Tensor:
        """Teacher forcing: logits [B, N, D, V], recomputed without the cache."""
        self.forward_calls += 1
        batch, n, depth = codes.shape
        s, hs = cond.prefix[:, 0], []
        for i in range(n):
            hs.append(torch.tanh(s))
            s = s + self._step(codes[:, i], torch.full((batch,), i))
        out = [
            [self.depth_logits(h, codes[:, i, :d]) for d in range(depth)] for i, h in enumerate(hs)
        ]
        return torch.stack([torch.stack(row, dim=1) for row in out], dim=1)


class StubMaskGIT(_StubBase):
    """Bidirectional stub: logits of every position from the whole (partly masked) canvas."""

    def forward(self, codes: Tensor, cond: Condition) -> Tensor:
        self.forward_calls += 1
        self.batch_sizes.add(codes.shape[0])
        n = codes.shape[1]
        emb = self.token_w[torch.arange(n)[None], 0, codes]  # [B, N, dim] (mask id = V is a row)
        context = cond.prefix[:, :1] + emb.mean(1, keepdim=True)  # [B, 1, dim]
        return torch.tanh(context + emb) @ self.out[0] + self.bias[:n]  # [B, N, V]


def sequence_probabilities(
    model: StubGPT,
    class_id: int,
    length: int,
    probs_fn,
    guided: bool,
) -> tuple[Tensor, Tensor]:
    """Every sequence of `length` tokens and its exact probability under the guided, processed
    distribution: probs_fn(cond_logits [S, L, V], uncond_logits | None, position) -> [S, V]."""
    vocab = model.config.vocab_size
    seqs = torch.tensor(list(itertools.product(range(vocab), repeat=length)))  # [S, L]
    cond = model.condition(torch.full((len(seqs),), class_id))
    c = model(seqs, cond)
    u = model(seqs, model.null_condition(len(seqs))) if guided else None
    logp = torch.zeros(len(seqs), dtype=torch.float64)
    for i in range(length):
        p = probs_fn(c[:, i], None if u is None else u[:, i], i)  # [S, V]
        logp += p.double().gather(1, seqs[:, i : i + 1])[:, 0].log()
    return seqs, logp.exp()


def exactness_pvalue(codes: Tensor, probs: Tensor, vocab: int) -> float:
    """Chi-square p-value of sampled sequences codes [S, L] against exact probabilities [V^L]
    (in itertools.product order). Cells with probability 0 must never be sampled; cells
    expecting fewer than 5 samples are pooled into one (the chi-square approximation needs it)."""
    from scipy.stats import chisquare

    length = codes.shape[1]
    weights = vocab ** torch.arange(length - 1, -1, -1)
    counts = torch.bincount((codes * weights).sum(1), minlength=vocab**length).double()
    possible = probs > 0
    if counts[~possible].sum() > 0:
        return 0.0
    expected = probs.double() / probs[possible].double().sum() * counts.sum()
    small = possible & (expected < 5)
    big = possible & ~small
    obs, exp = counts[big], expected[big]
    if small.any():
        obs = torch.cat([obs, counts[small].sum()[None]])
        exp = torch.cat([exp, expected[small].sum()[None]])
    return float(chisquare(obs.numpy(), exp.numpy()).pvalue)


def tiny_prior(
    kind: str = "gpt",
    vocab: int = 8,
    grid: tuple[int, int] = (3, 4),
    seed: int = 0,
    sharpen: float = 30.0,
    rope: str = "2d",
    depth: int = 2,
) -> nn.Module:
    """A tiny real prior (dim 32, 2 layers) in eval mode. Random init gives near-uniform logits,
    so the output head is scaled by `sharpen` to make distributions (and argmaxes) distinct."""
    from prior import GPT, GPTConfig, MaskGIT, MaskGITConfig, RQTransformer, RQTransformerConfig

    torch.manual_seed(seed)
    common = dict(vocab_size=vocab, grid=list(grid), num_classes=3, rope=rope)
    if kind == "gpt":
        model = GPT(GPTConfig(**common))
    elif kind == "maskgit":
        model = MaskGIT(MaskGITConfig(**common))
    else:
        model = RQTransformer(RQTransformerConfig(depth=depth, **common))
    with torch.no_grad():
        for name, param in model.named_parameters():
            if name.startswith("output"):
                param.mul_(sharpen)
    return model.eval()


def perturbed_copy(model: nn.Module, amount: float, seed: int) -> nn.Module:
    """A copy of `model` with relative Gaussian noise on its weights: a draft close to it."""
    other = copy.deepcopy(model)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for param in other.parameters():
            param.add_(amount * param.std().nan_to_num() * torch.randn(param.shape, generator=g))
    return other

"""Vector quantization: a codebook with its statistics, and the VQ quantizer built on it.

The codebook owns everything that must stay identical across ranks: the vectors, the EMA counts
and sums, the k-means init and the dead-code restarts (counts and sums are all-reduced; k-means
results and restart vectors are broadcast from rank 0). Distances are computed in row chunks so
that a 16384-code book never materialises an (B*h*w) x K matrix at once.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from einops import rearrange
from torch import Tensor, nn

from tokenizer.quantizers import Quantizer, QuantizerConfig, QuantizerOutput
from tokenizer.quantizers.distributed import all_reduce_sum_, broadcast_, rank
from tokenizer.quantizers.rotation import apply_estimator


@torch.no_grad()
def nearest_code(x: Tensor, codebook: Tensor, *, cosine: bool, chunk_size: int) -> Tensor:
    """Index of the closest codeword for each row: x [M,d], codebook [K,d] -> Long[M].

    Cosine: largest dot product (both sides unit norm). Euclidean: argmin |c|^2 - 2 x.c (|x|^2 is
    constant per row). At most chunk_size x K scores exist at a time (chunk_size 0 = all rows).
    """
    chunk = chunk_size if chunk_size > 0 else max(x.shape[0], 1)
    out = torch.empty(x.shape[0], dtype=torch.long, device=x.device)
    sq = None if cosine else codebook.square().sum(dim=1)[None]  # [1,K]
    for start in range(0, x.shape[0], chunk):
        rows = x[start : start + chunk]  # [m,d]
        if cosine:
            out[start : start + chunk] = (rows @ codebook.T).argmax(dim=1)
        else:
            out[start : start + chunk] = torch.addmm(sq, rows, codebook.T, alpha=-2.0).argmin(dim=1)
    return out


def sample_rows(x: Tensor, n: int) -> Tensor:
    """n random rows of x [M,d]: without replacement when M >= n, else with."""
    m = x.shape[0]
    if m >= n:
        return x[torch.randperm(m, device=x.device)[:n]]
    return x[torch.randint(m, (n,), device=x.device)]


@torch.no_grad()
def kmeans(x: Tensor, k: int, iters: int, *, cosine: bool, chunk_size: int) -> Tensor:
    """Lloyd's k-means (spherical when cosine) on x [M,d] -> centroids [k,d]; empty clusters keep
    their previous centroid. Seeds from k random rows (with replacement when M < k)."""
    centroids = sample_rows(x, k).clone()  # [k,d]
    for _ in range(iters):
        assign = nearest_code(x, centroids, cosine=cosine, chunk_size=chunk_size)  # [M]
        counts = torch.bincount(assign, minlength=k).to(x.dtype)  # [k]
        sums = torch.zeros_like(centroids).index_add_(0, assign, x)  # [k,d]
        means = sums / counts.clamp_min(1.0)[:, None]
        if cosine:
            means = F.normalize(means, dim=-1)
        centroids = torch.where(counts[:, None] > 0, means, centroids)
    return centroids


def code_stats(counts: Tensor) -> dict[str, Tensor]:
    """Batch usage (fraction of codes hit) and perplexity exp(H) of the code histogram [K]."""
    p = counts / counts.sum().clamp_min(1.0)
    entropy = -(p * p.clamp_min(1e-12).log()).sum()
    return {"batch_usage": (counts > 0).float().mean(), "perplexity": entropy.exp()}


class CodeUsage(nn.Module):
    """Which codes were used in the last `window` training steps (buffers, so it checkpoints).

    A per-batch fraction is noisy and says nothing about codes the batch happened to miss;
    this is the fraction of the codebook that training actually visits.
    """

    def __init__(self, size: int, window: int) -> None:
        super().__init__()
        self.window = window
        self.register_buffer("last_used", torch.zeros(size, dtype=torch.long))  # step, 0 = never
        self.register_buffer("steps", torch.zeros((), dtype=torch.long))

    @torch.no_grad()
    def update(self, counts: Tensor) -> None:
        """counts [K]: this step's (already all-reduced) histogram."""
        self.steps += 1
        self.last_used.copy_(torch.where(counts > 0, self.steps, self.last_used))

    def fraction(self) -> Tensor:
        recent = (self.last_used > 0) & (self.last_used > self.steps - self.window)
        return recent.float().mean()


def make_projection(in_dim: int, out_dim: int) -> nn.Module:
    """Linear map between latent and lookup space (a 1x1 conv on the grid), or identity."""
    return Fp32Linear(in_dim, out_dim) if in_dim != out_dim else nn.Identity()


class Fp32Linear(nn.Linear):
    """nn.Linear that computes in fp32 even if the module was cast to half precision."""

    def forward(self, x: Tensor) -> Tensor:
        bias = None if self.bias is None else self.bias.float()
        return F.linear(x.float(), self.weight.float(), bias)


class Codebook(nn.Module):
    """K vectors of the lookup space plus the statistics that keep them alive.

    `cluster_size` is an EMA (decay `ema_decay`) of how many vectors per step each code gets,
    kept with or without the EMA codebook: dead-code restarts read it. A fresh code starts at
    `max(1, 2 * threshold)` so it has ~70 steps (decay 0.99) to attract data before a restart.
    """

    def __init__(self, cfg: QuantizerConfig, dim: int) -> None:
        super().__init__()
        self.size, self.dim = cfg.codebook_size, dim
        self.cosine, self.use_ema = cfg.l2_normalize, cfg.ema
        self.decay, self.eps = cfg.ema_decay, cfg.ema_eps
        self.threshold = cfg.dead_code_threshold
        self.fresh_count = max(1.0, 2.0 * cfg.dead_code_threshold)
        self.kmeans_iters, self.chunk_size = cfg.kmeans_iters, cfg.chunk_size
        weight = torch.randn(self.size, dim)
        if self.cosine:
            weight = F.normalize(weight, dim=-1)
        self.weight = nn.Parameter(weight, requires_grad=not cfg.ema)  # [K,d]
        self.register_buffer("cluster_size", torch.full((self.size,), self.fresh_count))  # [K]
        if cfg.ema:
            self.register_buffer("embed_sum", weight * self.fresh_count)  # [K,d]
        self.register_buffer("initted", torch.tensor(not cfg.kmeans_init))
        self.usage = CodeUsage(self.size, cfg.usage_window)
        self._init_seen = not cfg.kmeans_init  # python mirror of `initted`: one host sync at most

    def vectors(self) -> Tensor:
        """[K,d] fp32 codewords as the search sees them (unit norm when cosine)."""
        w = self.weight.float()
        return F.normalize(w, dim=-1) if self.cosine else w

    def lookup(self, idx: Tensor) -> Tensor:
        """Codewords for Long indices [...] -> [..., d], differentiable w.r.t. the codebook.
        Normalises the gathered rows only, so in-place codebook updates after the lookup
        cannot corrupt tensors saved for backward."""
        rows = F.embedding(idx, self.weight.float())
        return F.normalize(rows, dim=-1) if self.cosine else rows

    def search(self, x: Tensor) -> Tensor:
        """x [M,d] (detached, lookup space) -> nearest code indices Long[M]."""
        return nearest_code(
            x, self.vectors().detach(), cosine=self.cosine, chunk_size=self.chunk_size
        )

    @torch.no_grad()
    def maybe_init(self, x: Tensor) -> None:
        """k-means on the first training batch (rank 0's), broadcast to every rank."""
        if self._init_seen:
            return
        if bool(self.initted):
            self._init_seen = True
            return
        if rank() == 0:
            x = x.float()
            centroids = kmeans(
                x, self.size, self.kmeans_iters, cosine=self.cosine, chunk_size=self.chunk_size
            )
        else:
            centroids = x.new_empty(self.size, self.dim, dtype=torch.float32)
        broadcast_(centroids)
        self.weight.data.copy_(centroids)
        self.cluster_size.fill_(self.fresh_count)
        if self.use_ema:
            self.embed_sum.copy_(centroids * self.fresh_count)
        self.initted.fill_(True)
        self._init_seen = True

    @torch.no_grad()
    def observe(self, x: Tensor, idx: Tensor) -> dict[str, Tensor]:
        """Record a batch: x [M,d] detached inputs, idx Long[M] their codes. In training, update
        the EMA statistics (all ranks identical), the EMA codebook and restart dead codes."""
        counts = torch.bincount(idx, minlength=self.size).float()  # [K]
        if not self.training:
            return {"usage": self.usage.fraction(), **code_stats(counts)}
        if self.use_ema:
            sums = torch.zeros(self.size, self.dim, device=x.device).index_add_(0, idx, x.float())
            stats = all_reduce_sum_(torch.cat([counts[:, None], sums], dim=1))  # one collective
            counts, sums = stats[:, 0], stats[:, 1:]
        else:
            all_reduce_sum_(counts)
        self.cluster_size.lerp_(counts, 1.0 - self.decay)
        if self.use_ema:
            self.embed_sum.lerp_(sums, 1.0 - self.decay)
            total = self.cluster_size.sum()
            # Laplace smoothing: no code's count reaches 0, the total is preserved
            smoothed = (self.cluster_size + self.eps) / (total + self.size * self.eps) * total
            self.weight.data.copy_(self.embed_sum / smoothed[:, None])
        self.usage.update(counts)
        restarted = self.restart_dead(x) if self.threshold > 0 else 0
        metrics = {"usage": self.usage.fraction(), **code_stats(counts)}
        metrics["restarted"] = torch.tensor(float(restarted), device=x.device)
        return metrics

    @torch.no_grad()
    def restart_dead(self, x: Tensor) -> int:
        """Move codes whose EMA count fell below the threshold onto random batch vectors (rank 0's
        batch, broadcast). Returns how many were restarted."""
        dead = self.cluster_size < self.threshold  # [K], identical on all ranks
        n = int(dead.sum())
        if n == 0:
            return 0
        if rank() == 0:
            fresh = sample_rows(x, n).float()  # [n,d]
        else:
            fresh = x.new_empty(n, self.dim, dtype=torch.float32)
        broadcast_(fresh)
        self.weight.data[dead] = fresh.to(self.weight.dtype)
        self.cluster_size[dead] = self.fresh_count
        if self.use_ema:
            self.embed_sum[dead] = fresh * self.fresh_count
        return n


class VectorQuantizer(Quantizer):
    """Nearest-neighbour VQ (euclidean or cosine), optionally in a projected lookup space.

    loss = |sg(e) - q|^2 + beta |e - sg(q)|^2 (the codebook term is dropped with the EMA
    codebook); the output's value is exactly the codeword, its gradient per `estimator`.
    A training forward updates the codebook (EMA, restarts) after quantizing, so `embed` of its
    codes equals its output bit for bit in eval mode, or until the next update.
    """

    def __init__(self, cfg: QuantizerConfig, latent_dim: int) -> None:
        super().__init__()
        if cfg.kind != "vq":
            raise ValueError(f"VectorQuantizer needs kind='vq', got {cfg.kind!r}")
        self.cfg = cfg
        self.latent_dim, self.codebook_dim = latent_dim, cfg.codebook_dim or latent_dim
        self.codebook_size, self.depth = cfg.codebook_size, 1
        self.proj_in = make_projection(latent_dim, self.codebook_dim)
        self.proj_out = make_projection(self.codebook_dim, latent_dim)
        self.embedding = Codebook(cfg, self.codebook_dim)

    def forward(self, z: Tensor) -> QuantizerOutput:
        self._check_latents(z)
        b, _, h, w = z.shape
        with torch.autocast(device_type=z.device.type, enabled=False):
            e = self.proj_in(rearrange(z.float(), "b c h w -> (b h w) c"))  # [M,d]
            if self.cfg.l2_normalize:
                e = F.normalize(e, dim=-1)
            if self.training:
                self.embedding.maybe_init(e.detach())
            idx = self.embedding.search(e.detach())  # [M]
            q = self.embedding.lookup(idx)  # [M,d]
            commit = F.mse_loss(e, q.detach())
            loss = self.cfg.beta * commit
            metrics = {"commit_loss": commit.detach()}
            if not self.cfg.ema:
                codebook_loss = F.mse_loss(q, e.detach())
                loss = loss + codebook_loss
                metrics["codebook_loss"] = codebook_loss.detach()
            out = apply_estimator(self.cfg.estimator, e, q)  # value == q
            metrics.update(self.embedding.observe(e.detach(), idx))
            quantized = rearrange(self.proj_out(out), "(b h w) c -> b c h w", b=b, h=h, w=w)
        codes = rearrange(idx, "(b h w) -> b h w", b=b, h=h, w=w)
        return QuantizerOutput(quantized=quantized, codes=codes, loss=loss, metrics=metrics)

    def embed(self, codes: Tensor) -> Tensor:
        self._check_codes(codes)
        b, h, w = codes.shape
        with torch.autocast(device_type=codes.device.type, enabled=False):
            q = self.embedding.lookup(rearrange(codes.long(), "b h w -> (b h w)"))  # [M,d]
            return rearrange(self.proj_out(q), "(b h w) c -> b c h w", b=b, h=h, w=w)

    def codebook(self) -> Tensor:
        return self.embedding.vectors().detach()

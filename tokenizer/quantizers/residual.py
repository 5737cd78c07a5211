"""Residual quantization (RQ-VAE): D codes per position, each quantizing what the previous left.

r_0 = e; c_d = NN(r_{d-1}); r_d = r_{d-1} - q(c_d); output sum_d q(c_d) with the estimator on
the sum. Searches run on detached residuals; the commitment term is averaged over depths on the
partial sums: mean_d |e - sg(sum_{i<=d} q_i)|^2. Each codebook's own loss pulls q_d towards the
residual it quantized (the gradient analogue of the EMA update, which averages those residuals).
k-means init runs per codebook on the first residual it sees: depth by depth for per-depth
books, on e itself for a shared book (restarts then seed codes from every depth's residuals).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from einops import rearrange
from torch import Tensor, nn

from tokenizer.quantizers import Quantizer, QuantizerConfig, QuantizerOutput
from tokenizer.quantizers.rotation import apply_estimator
from tokenizer.quantizers.vq import Codebook, make_projection


class ResidualQuantizer(Quantizer):
    """Depth-D residual VQ with one shared codebook or one per depth. Codes Long [B,h,w,D]."""

    codes_have_depth = True

    def __init__(self, cfg: QuantizerConfig, latent_dim: int) -> None:
        super().__init__()
        if cfg.kind != "rq":
            raise ValueError(f"ResidualQuantizer needs kind='rq', got {cfg.kind!r}")
        self.cfg = cfg
        self.latent_dim, self.codebook_dim = latent_dim, cfg.codebook_dim or latent_dim
        self.codebook_size, self.depth = cfg.codebook_size, cfg.depth
        self.proj_in = make_projection(latent_dim, self.codebook_dim)
        self.proj_out = make_projection(self.codebook_dim, latent_dim)
        n_books = 1 if cfg.shared_codebook else cfg.depth
        self.books = nn.ModuleList(Codebook(cfg, self.codebook_dim) for _ in range(n_books))

    def book(self, depth: int) -> Codebook:
        """The codebook used at `depth` (the same one for every depth when shared)."""
        return self.books[0 if self.cfg.shared_codebook else depth]

    def forward(self, z: Tensor) -> QuantizerOutput:
        self._check_latents(z)
        b, _, h, w = z.shape
        with torch.autocast(device_type=z.device.type, enabled=False):
            e = self.proj_in(rearrange(z.float(), "b c h w -> (b h w) c"))  # [M,d]
            residual = e.detach()
            partial = torch.zeros_like(residual)  # sum of codewords so far (carries codebook grads)
            commit = e.new_zeros(())
            codebook_loss = e.new_zeros(())
            inputs, indices, metrics = [], [], {}
            for d in range(self.depth):
                book = self.book(d)
                if self.training:
                    book.maybe_init(residual)
                idx = book.search(residual)  # [M]
                q = book.lookup(idx)  # [M,d]
                if not self.cfg.ema:
                    codebook_loss = codebook_loss + F.mse_loss(q, residual)
                inputs.append(residual)
                indices.append(idx)
                residual = residual - q.detach()
                partial = partial + q
                err = F.mse_loss(e, partial.detach())
                commit = commit + err
                metrics[f"error_d{d}"] = err.detach()
            commit = commit / self.depth
            loss = self.cfg.beta * commit
            metrics["commit_loss"] = commit.detach()
            if not self.cfg.ema:
                codebook_loss = codebook_loss / self.depth
                loss = loss + codebook_loss
                metrics["codebook_loss"] = codebook_loss.detach()
            out = apply_estimator(self.cfg.estimator, e, partial)  # value == sum of codewords
            metrics.update(self._observe(inputs, indices))
            quantized = rearrange(self.proj_out(out), "(b h w) c -> b c h w", b=b, h=h, w=w)
        codes = rearrange(torch.stack(indices, dim=-1), "(b h w) d -> b h w d", b=b, h=h, w=w)
        return QuantizerOutput(quantized=quantized, codes=codes, loss=loss, metrics=metrics)

    def _observe(self, inputs: list[Tensor], indices: list[Tensor]) -> dict[str, Tensor]:
        """Statistics per codebook (a shared one sees every depth's residuals), averaged."""
        if self.cfg.shared_codebook:
            per_book = [self.books[0].observe(torch.cat(inputs), torch.cat(indices))]
        else:
            per_book = [book.observe(x, i) for book, x, i in zip(self.books, inputs, indices)]
        return {k: torch.stack([m[k] for m in per_book]).mean() for k in per_book[0]}

    def embed(self, codes: Tensor) -> Tensor:
        self._check_codes(codes)
        b, h, w, _ = codes.shape
        flat = rearrange(codes.long(), "b h w d -> (b h w) d")
        with torch.autocast(device_type=codes.device.type, enabled=False):
            total = torch.zeros(flat.shape[0], self.codebook_dim, device=codes.device)  # [M,d]
            for d in range(self.depth):
                total = total + self.book(d).lookup(flat[:, d])  # same order as forward: exact
            return rearrange(self.proj_out(total), "(b h w) c -> b c h w", b=b, h=h, w=w)

    def codebook(self, depth: int = 0) -> Tensor:
        """[K, codebook_dim] codewords of `depth`'s codebook (the shared one by default)."""
        if not 0 <= depth < self.depth:
            raise ValueError(f"depth must be in [0, {self.depth}), got {depth}")
        return self.book(depth).vectors().detach()

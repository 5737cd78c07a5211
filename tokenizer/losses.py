"""VQGAN training losses: reconstruction (L1/L2 + optional LPIPS), hinge GAN, adaptive weight.

Generator side:  L = L_rec + w_p * LPIPS + quant_loss + [step >= disc_start] * lambda * L_G
with lambda = clamp(||grad_W L_nll|| / (||grad_W L_G|| + 1e-4), 0, 1e4) * disc_weight, W the
decoder's last conv weight, L_nll = L_rec + w_p * LPIPS. The discriminator has its own loss and
its own optimizer (`loss.discriminator.parameters()`); the generator step also puts gradients on
the discriminator, so zero them before the discriminator step. Under DDP, wrap the discriminator
in place (`loss.discriminator = accelerator.prepare(loss.discriminator)`) so both losses call
the wrapped module.
"""

from __future__ import annotations

import importlib
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

from tokenizer.discriminator import DiscriminatorConfig, PatchDiscriminator

REC_LOSSES = ("l1", "l2")


@dataclass
class LossConfig:
    """Defaults follow taming's VQGAN; LPIPS is off unless a local weights file is given."""

    rec_loss: str = "l1"
    rec_weight: float = 1.0
    perceptual_weight: float = 0.0
    lpips_path: str | None = None
    quant_weight: float = 1.0
    disc_weight: float = 0.5
    disc_start: int = 10_000
    adaptive_weight: bool = True
    discriminator: DiscriminatorConfig = field(default_factory=DiscriminatorConfig)

    def __post_init__(self) -> None:
        if isinstance(self.discriminator, dict):
            self.discriminator = DiscriminatorConfig(**self.discriminator)
        if self.rec_loss not in REC_LOSSES:
            raise ValueError(f"rec_loss must be one of {REC_LOSSES}, got {self.rec_loss!r}")
        if self.perceptual_weight > 0 and not self.lpips_path:
            raise ValueError("perceptual_weight > 0 needs lpips_path (a local LPIPS weights file)")
        for name in ("rec_weight", "perceptual_weight", "quant_weight", "disc_weight"):
            if getattr(self, name) < 0:
                raise ValueError(f"{name} must be >= 0, got {getattr(self, name)}")
        if self.disc_start < 0:
            raise ValueError(f"disc_start must be >= 0, got {self.disc_start}")


def reconstruction_loss(x: torch.Tensor, recon: torch.Tensor, kind: str = "l1") -> torch.Tensor:
    """Mean absolute (l1) or squared (l2) error."""
    if kind == "l1":
        return (x - recon).abs().mean()
    if kind == "l2":
        return F.mse_loss(recon, x)
    raise ValueError(f"kind must be one of {REC_LOSSES}, got {kind!r}")


def hinge_d_loss(logits_real: torch.Tensor, logits_fake: torch.Tensor) -> torch.Tensor:
    """0.5 * (E[relu(1 - D(x))] + E[relu(1 + D(G(z)))])."""
    return 0.5 * (F.relu(1.0 - logits_real).mean() + F.relu(1.0 + logits_fake).mean())


def hinge_g_loss(logits_fake: torch.Tensor) -> torch.Tensor:
    """-E[D(G(z))]."""
    return -logits_fake.mean()


def adaptive_weight(
    nll_loss: torch.Tensor, g_loss: torch.Tensor, last_layer: torch.Tensor, base: float = 1.0
) -> torch.Tensor:
    """base * clamp(||grad nll|| / (||grad g|| + 1e-4), 0, 1e4), detached (Esser et al. 2021).

    Under DDP both gradients are averaged over ranks first (`autograd.grad` bypasses DDP's
    all-reduce), so every rank uses the weight of the global batch, as one process would.
    """
    (nll_grad,) = torch.autograd.grad(nll_loss, last_layer, retain_graph=True)
    (g_grad,) = torch.autograd.grad(g_loss, last_layer, retain_graph=True)
    nll_grad, g_grad = _mean_over_ranks(nll_grad), _mean_over_ranks(g_grad)
    weight = nll_grad.norm() / (g_grad.norm() + 1e-4)
    return (weight.clamp(0.0, 1e4) * base).detach()


def _mean_over_ranks(grad: torch.Tensor) -> torch.Tensor:
    """The gradient of the global-batch mean loss: the mean of the ranks' gradients."""
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return grad
    grad = grad.clone()
    dist.all_reduce(grad)  # SUM: gloo has no AVG
    return grad / dist.get_world_size()


def load_lpips(weights_path: str | Path) -> nn.Module:
    """A frozen LPIPS(vgg) from a local file holding its full state dict (backbone + linear heads).

    Never downloads: the torchvision backbone is built untrained and then overwritten. Make the
    file once on a machine with internet: `torch.save(lpips.LPIPS(net="vgg").state_dict(), p)`
    (or save it with safetensors).
    """
    path = Path(weights_path)
    if not path.is_file():
        raise FileNotFoundError(
            f"LPIPS weights not found at {path}: supply a local state-dict file "
            "(LPIPS is never downloaded) or set perceptual_weight=0"
        )
    try:
        lpips = importlib.import_module("lpips")
    except ImportError as err:
        raise ImportError(
            "LPIPS needs the optional 'lpips' package: pip install -c constraints.txt -e '.[eval]'"
        ) from err
    model = lpips.LPIPS(net="vgg", pretrained=False, pnet_rand=True, verbose=False)
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        state = load_file(str(path))
    else:
        state = torch.load(path, map_location="cpu", weights_only=True)
    model.load_state_dict(state, strict=True)
    model.eval().requires_grad_(False)
    return model


@dataclass
class LossOutput:
    loss: torch.Tensor  # what to backpropagate
    logs: dict[str, torch.Tensor]  # detached scalars


class TokenizerLoss(nn.Module):
    """Generator-side total (`generator_loss`) and discriminator loss (`discriminator_loss`)."""

    def __init__(self, cfg: LossConfig) -> None:
        super().__init__()
        self.cfg = cfg
        self.discriminator = PatchDiscriminator(cfg.discriminator)
        # Kept out of the module tree: frozen, and never part of a checkpoint.
        self._lpips: list[nn.Module] = []
        if cfg.perceptual_weight > 0:
            self._lpips.append(load_lpips(cfg.lpips_path))

    def gan_active(self, step: int) -> bool:
        return self.cfg.disc_weight > 0 and step >= self.cfg.disc_start

    def perceptual(self, x: torch.Tensor, recon: torch.Tensor) -> torch.Tensor:
        if not self._lpips:
            return x.new_zeros(())
        net = self._lpips[0].to(x.device)
        return net(recon.float(), x.float()).mean()

    def generator_loss(
        self,
        images: torch.Tensor,
        recon: torch.Tensor,
        quant_loss: torch.Tensor,
        step: int,
        last_layer: torch.Tensor | None = None,
    ) -> LossOutput:
        """Total generator loss; `last_layer` (decoder's last conv weight) is needed once the
        GAN is on and `adaptive_weight` is set."""
        cfg = self.cfg
        rec = reconstruction_loss(images, recon, cfg.rec_loss)
        p_loss = self.perceptual(images, recon)
        nll = cfg.rec_weight * rec + cfg.perceptual_weight * p_loss
        total = nll + cfg.quant_weight * quant_loss
        logs = {"rec_loss": rec, "perceptual_loss": p_loss, "quant_loss": quant_loss}
        if self.gan_active(step):
            g_loss = hinge_g_loss(self.discriminator(recon))
            if cfg.adaptive_weight and torch.is_grad_enabled():
                if last_layer is None:
                    raise ValueError(
                        "adaptive_weight needs last_layer (the decoder's last conv weight)"
                    )
                weight = adaptive_weight(nll, g_loss, last_layer, cfg.disc_weight)
            else:
                weight = torch.tensor(cfg.disc_weight, device=images.device)
            total = total + weight * g_loss
            logs.update(g_loss=g_loss, disc_adaptive_weight=weight)
        logs["total_loss"] = total
        return LossOutput(total, {k: v.detach() for k, v in logs.items()})

    def discriminator_loss(
        self,
        images: torch.Tensor,
        recon: torch.Tensor,
        step: int,
        discriminator: nn.Module | None = None,
    ) -> LossOutput:
        """Hinge loss on real images vs detached reconstructions; zero before `disc_start`.
        `discriminator`: the module to call (the trainer passes its DDP-wrapped copy, so the
        gradients are synced); default: this loss's own discriminator."""
        disc = discriminator if discriminator is not None else self.discriminator
        logits_real = disc(images.detach())
        logits_fake = disc(recon.detach())
        d_loss = hinge_d_loss(logits_real, logits_fake)
        factor = 1.0 if self.gan_active(step) else 0.0
        logs = {
            "d_loss": d_loss,
            "logits_real": logits_real.mean(),
            "logits_fake": logits_fake.mean(),
        }
        return LossOutput(factor * d_loss, {k: v.detach() for k, v in logs.items()})

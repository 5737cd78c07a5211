"""Train a stage-2 prior (GPT, MaskGIT or RQ-Transformer) on a token export.

    python scripts/train_prior.py --config configs/prior/digits_gpt.yaml --output-dir outputs/prior
    accelerate launch --config_file configs/accelerate/deepspeed_zero2.yaml \
        scripts/train_prior.py --config configs/prior/imagenet_gpt_b.yaml --output-dir runs/b \
        [--resume latest] [key.sub=value ...]

Sample grids (output_dir/samples/step_XXXXXX.png) use the decoding algorithms in `sampling/`.
"""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout, uninstalled

import torch  # noqa: E402
from torch import Tensor, nn  # noqa: E402

from prior.conditioning import Condition  # noqa: E402
from prior.train_config import PriorTrainConfig, SampleConfig  # noqa: E402
from prior.trainer import Sampler, train  # noqa: E402
from sampling.generate import DecodeOptions, generate_codes  # noqa: E402
from sampling.guidance import GuidanceSchedule  # noqa: E402
from sampling.logits import SamplingConfig  # noqa: E402
from training import cli  # noqa: E402
from training.config import parse_cli  # noqa: E402
from training.distributed import shutdown_distributed  # noqa: E402


def make_sampler(cfg: SampleConfig) -> Sampler:
    """Sample grids through the one dispatcher (sampling.generate): plain AR for a GPT,
    depth-wise AR for an RQ-Transformer, MaskGIT decoding (guidance ramped linearly) for MaskGIT."""
    sampling = SamplingConfig(temperature=cfg.temperature, top_k=cfg.top_k, top_p=cfg.top_p)

    def sampler(
        model: nn.Module, cond: Condition, uncond: Condition, generator: torch.Generator
    ) -> Tensor:
        maskgit = model.config.model_type == "maskgit"
        decode = (
            DecodeOptions("maskgit", num_steps=cfg.maskgit_steps) if maskgit else DecodeOptions()
        )
        guidance = GuidanceSchedule(cfg.guidance_scale, "linear" if maskgit else "constant")
        return generate_codes(model, cond, uncond, decode=decode, sampling=sampling,
                              guidance=guidance, generator=generator).codes  # fmt: skip

    return sampler


def main(argv: list[str] | None = None) -> None:
    cfg, args = parse_cli(PriorTrainConfig, argv, description=__doc__)
    train(
        cfg,
        args.output_dir,
        args.resume,
        overwrite=args.overwrite,
        sampler=make_sampler(cfg.sample),
    )
    shutdown_distributed()


def console() -> None:
    """The installed command's entry point: user errors as one line."""
    cli.run(main)


if __name__ == "__main__":
    console()

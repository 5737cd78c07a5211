"""Train a stage-2 prior (GPT, MaskGIT or RQ-Transformer) on a token export.

    python scripts/train_prior.py --config configs/prior/digits_gpt.yaml --output-dir outputs/prior
    accelerate launch --config_file configs/accelerate/deepspeed_zero2.yaml \
        scripts/train_prior.py --config configs/prior/imagenet_gpt_b.yaml --output-dir runs/b \
        [--resume latest] [key.sub=value ...]

Sample grids (output_dir/samples/step_XXXXXX.png) use the decoding algorithms in `sampling/`.
"""

from __future__ import annotations

import sys

import torch
from torch import Tensor, nn

from prior.conditioning import Condition
from prior.train_config import PriorTrainConfig, SampleConfig
from prior.trainer import Sampler, train
from sampling.autoregressive import generate_ar, generate_rq
from sampling.guidance import GuidanceSchedule
from sampling.logits import SamplingConfig
from sampling.maskgit import generate_maskgit
from training.config import parse_cli
from training.distributed import shutdown_distributed


def make_sampler(cfg: SampleConfig) -> Sampler:
    """Plain AR (GPT), depth-wise AR (RQ) or MaskGIT decoding with constant CFG."""
    sampling = SamplingConfig(temperature=cfg.temperature, top_k=cfg.top_k, top_p=cfg.top_p)
    guidance = GuidanceSchedule(scale=cfg.guidance_scale)

    def sampler(
        model: nn.Module, cond: Condition, uncond: Condition, generator: torch.Generator
    ) -> Tensor:
        mc = model.config
        if mc.model_type == "gpt":
            return generate_ar(model, cond, uncond, mc.seq_len, sampling, guidance, generator)
        if mc.model_type == "rq_transformer":
            return generate_rq(
                model, cond, uncond, mc.seq_len, mc.depth, sampling, guidance, generator
            )
        codes, _ = generate_maskgit(
            model, cond, uncond, mc.seq_len, cfg.maskgit_steps, sampling,
            guidance=GuidanceSchedule(scale=cfg.guidance_scale, kind="linear"), generator=generator,
        )  # fmt: skip
        return codes

    return sampler


def main(argv: list[str] | None = None) -> None:
    cfg, args = parse_cli(PriorTrainConfig, argv, description=__doc__)
    train(cfg, args.output_dir, args.resume, sampler=make_sampler(cfg.sample))
    shutdown_distributed()


if __name__ == "__main__":
    main(sys.argv[1:])

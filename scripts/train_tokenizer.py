"""Train a stage-1 tokenizer (VQ / RQ / FSQ autoencoder, optional PatchGAN).

    accelerate launch scripts/train_tokenizer.py --config configs/tokenizer/digits.yaml \
        --output-dir outputs/tok [--resume latest|DIR] [key.sub=value ...]

Also runs as plain `python scripts/train_tokenizer.py ...` (one process) or under `torchrun`.
Use DDP (not DeepSpeed): the GAN's two optimizers and the adaptive weight need plain modules.
The model lands in OUTPUT_DIR/final/ (config.json + model.safetensors), metrics in eval.json.
"""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout, uninstalled

from tokenizer.trainer import TokenizerTrainConfig, train  # noqa: E402
from training import cli  # noqa: E402
from training.config import parse_cli  # noqa: E402
from training.distributed import shutdown_distributed  # noqa: E402


def main(argv: list[str] | None = None) -> None:
    cfg, args = parse_cli(TokenizerTrainConfig, argv, description=__doc__.splitlines()[0])
    train(cfg, args.output_dir, args.resume, overwrite=args.overwrite)
    shutdown_distributed()


def console() -> None:
    """The installed command's entry point: user errors as one line."""
    cli.run(main)


if __name__ == "__main__":
    console()

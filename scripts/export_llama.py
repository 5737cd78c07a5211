"""Export a trained 1D-RoPE GPT prior as a `transformers` LlamaForCausalLM checkpoint.

    python scripts/export_llama.py --prior outputs/demo/prior/final --out outputs/llama [--overwrite]

The exported logits equal the prior's (prior/hf_export.py says how prefix tokens map to ids);
2D-RoPE and text-conditioned priors are refused with the reason.
"""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout, uninstalled

from prior import GPT, load_prior  # noqa: E402
from prior.hf_export import export_to_llama  # noqa: E402
from training import cli  # noqa: E402


def main(argv: list[str] | None = None) -> Path:
    p = cli.parser(__doc__)
    p.add_argument("--prior", type=Path, required=True, help="a trained GPT prior (final/)")
    p.add_argument("--out", type=Path, required=True, help="output folder (written atomically)")
    p.add_argument("--overwrite", action="store_true", help="replace an existing folder")
    p.add_argument("--print-config", action="store_true", help="print the options (YAML), exit")
    args = p.parse_args(argv)
    if args.print_config:
        print(cli.options_yaml(args), end="")
        return args.out
    prior = load_prior(args.prior)
    if not isinstance(prior, GPT):
        raise ValueError(
            f"{args.prior} is a {type(prior).__name__}: only GPT priors export to Llama"
        )
    out = export_to_llama(prior, args.out, overwrite=args.overwrite)
    print(f"wrote {out} (LlamaForCausalLM)")
    return out


def console() -> None:
    """The installed command's entry point: user errors as one line."""
    cli.run(main)


if __name__ == "__main__":
    console()

"""Distil a tree draft (sampling/tree_draft.py) from a trained GPT prior, for method="tree".

    python scripts/distill_tree_draft.py --prior outputs/demo/prior/final \
        --out outputs/demo/tree_draft --guidance 3

It samples the prior at that guidance and fits the draft to the prior's own distributions
(about 2 minutes for the digits demo on one CPU core). The draft only picks candidates: method
"tree" gives plain AR's codes whatever the draft, so a draft fitted at another guidance, or a
poor one, costs speed, never correctness.
"""

from __future__ import annotations

import json
import sys
from dataclasses import asdict
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout, uninstalled

import torch  # noqa: E402

from prior import GPT, load_prior  # noqa: E402
from sampling.tree_draft import DistillConfig, distill_tree_draft  # noqa: E402
from training import cli  # noqa: E402
from training.serialization import atomic_write_text  # noqa: E402


def main(argv: list[str] | None = None) -> Path:
    defaults = DistillConfig()
    p = cli.parser(__doc__)
    p.add_argument("--prior", type=Path, required=True, help="a trained GPT prior (final/)")
    p.add_argument("--out", type=Path, required=True, help="output folder (written atomically)")
    p.add_argument("--guidance", type=float, default=defaults.guidance_scale,
                   help="the guidance scale the draft will serve")  # fmt: skip
    p.add_argument("--plausibility", type=float, default=defaults.plausibility)
    p.add_argument("--samples", type=int, default=defaults.samples)
    p.add_argument("--steps", type=int, default=defaults.steps)
    p.add_argument("--dim", type=int, default=defaults.dim, help="the draft's embedding width")
    p.add_argument("--hidden", type=int, default=defaults.hidden, help="the draft's MLP width")
    p.add_argument("--seed", type=int, default=defaults.seed)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--print-config", action="store_true", help="print the options (YAML), exit")
    args = p.parse_args(argv)
    if args.print_config:
        print(cli.options_yaml(args), end="")
        return args.out
    prior = load_prior(args.prior)
    if not isinstance(prior, GPT):
        raise ValueError(
            f"{args.prior} is a {type(prior).__name__}: a tree draft needs a GPT prior"
        )
    config = DistillConfig(guidance_scale=args.guidance, plausibility=args.plausibility,
                           samples=args.samples, steps=args.steps, dim=args.dim,
                           hidden=args.hidden, seed=args.seed)  # fmt: skip
    draft, report = distill_tree_draft(prior.to(args.device).eval(), config)
    draft.save_pretrained(args.out)
    report = {"prior": str(args.prior), "distill": asdict(config), **report}
    atomic_write_text(args.out / "distill.json", json.dumps(report, indent=2) + "\n")
    print(f"wrote {args.out} (soft cross-entropy {report['soft_cross_entropy']:.3f}, "
          f"{report['seconds']:.0f} s)")  # fmt: skip
    return args.out


def console() -> None:
    """The installed command's entry point: user errors as one line."""
    cli.run(main)


if __name__ == "__main__":
    console()

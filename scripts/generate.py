"""Generate a PNG grid from class or text prompts.

python scripts/generate.py --tokenizer DIR --prior DIR --prompt 7 --prompt 3 --guidance 3 --n 8 \
    --out samples.png [--method ar|speculative|relaxed|jacobi|tree|maskgit] [--draft DIR] [--tree-draft DIR] [--codes codes.npy]
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout, uninstalled

import numpy as np  # noqa: E402
import torch  # noqa: E402

from sampling import Pipeline  # noqa: E402
from sampling.generate import METHODS  # noqa: E402
from tokenizer.images import image_grid, save_png, viewing_grid  # noqa: E402
from training import cli  # noqa: E402


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = cli.parser(__doc__)
    p.add_argument("--tokenizer", type=Path, required=True, help="tokenizer directory (final/)")
    p.add_argument("--prior", type=Path, required=True, help="prior directory (final/)")
    p.add_argument("--draft", type=Path, default=None, help="draft prior for speculative/relaxed")
    p.add_argument("--tree-draft", type=Path, default=None,
                   help="distilled tree draft for --method tree (scripts/distill_tree_draft.py)")  # fmt: skip
    p.add_argument(
        "--prompt", action="append", default=None, help="class name, class id or text; repeatable"
    )
    p.add_argument(
        "--negative-prompt", action="append", default=None, help="text priors only; one per prompt"
    )
    p.add_argument("--guidance", type=float, default=1.0, help="classifier-free guidance scale")
    p.add_argument("--schedule", default="constant", choices=["constant", "linear", "cosine"])
    p.add_argument(
        "--plausibility", type=float, default=0.0, help="CFG cutoff: drop p < alpha * max p (cond)"
    )
    p.add_argument("--num-images-per-prompt", "--n", dest="n", type=int, default=4,
                   help="images per prompt (--n: the old name)")  # fmt: skip
    p.add_argument("--method", default="ar", choices=METHODS)
    p.add_argument("--num-steps", "--steps", dest="steps", type=int, default=None,
                   help="MaskGIT steps (default 8; --steps: the old name)")  # fmt: skip
    p.add_argument("--temperature", type=float, default=1.0)
    p.add_argument("--top-k", type=int, default=0)
    p.add_argument("--top-p", type=float, default=1.0)
    p.add_argument("--draft-len", type=int, default=None, help="speculative / relaxed (default 4)")
    p.add_argument("--tree-size", type=int, default=None, help="tree (default 4 candidate nodes)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--device", default=None)
    p.add_argument("--out", type=Path, default=Path("samples.png"))
    p.add_argument("--codes", type=Path, default=None, help="also save the codes as .npy")
    p.add_argument(
        "--view",
        action="store_true",
        help="a grid for people: cells enlarged (nearest), one labelled row per prompt",
    )
    p.add_argument("--print-config", action="store_true", help="print the options (YAML), exit")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    if args.print_config:
        print(cli.options_yaml(args), end="")
        return
    pipe = Pipeline.from_pretrained(args.tokenizer, args.prior, args.draft, device=args.device,
                                    tree_draft_dir=args.tree_draft)  # fmt: skip
    prompts = args.prompt or (pipe.class_names or ["0"])
    print(f"generating {len(prompts) * args.n} images ({args.method}, guidance {args.guidance:g}) "
          f"on {pipe.device} ...", file=sys.stderr, flush=True)  # fmt: skip
    start = time.perf_counter()
    out = pipe(
        prompts,
        guidance_scale=args.guidance,
        guidance_schedule=args.schedule,
        guidance_plausibility=args.plausibility,
        negative_prompts=args.negative_prompt,
        method=args.method,
        num_steps=args.steps,
        num_images_per_prompt=args.n,
        temperature=args.temperature,
        top_k=args.top_k,
        top_p=args.top_p,
        draft_len=args.draft_len,
        tree_size=args.tree_size,
        generator=torch.Generator(pipe.device).manual_seed(args.seed),
    )
    args.out.parent.mkdir(parents=True, exist_ok=True)
    labels = [str(p) for p in prompts]  # one row per prompt
    grid = (
        viewing_grid(out.images, args.n, labels=labels)
        if args.view
        else image_grid(out.images, args.n)
    )
    save_png(grid, args.out)
    if args.codes is not None:
        np.save(args.codes, out.codes.cpu().numpy().astype(np.uint16))
    report = {"out": str(args.out), "images": len(out.images), "method": args.method,
              "seconds": round(time.perf_counter() - start, 2)}  # fmt: skip
    if out.stats is not None:
        report |= {k: v for k, v in out.stats.as_dict().items() if k != "draft_lengths"}
    print(json.dumps(report))


def console() -> None:
    """The installed command's entry point: user errors as one line."""
    cli.run(main)


if __name__ == "__main__":
    console()

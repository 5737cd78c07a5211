"""Serve a tokenizer + prior over HTTP: continuous batching, an images API and a page.

    python scripts/serve.py --tokenizer outputs/demo/tokenizer/final \\
        --prior outputs/demo/prior/final [--draft outputs/demo/draft/final] [--port 8000]

Then open http://127.0.0.1:8000/ or POST /v1/images/generations (see serving/app.py).
SIGTERM / Ctrl-C stops admitting, finishes what is in flight and exits.
"""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout, uninstalled

import torch  # noqa: E402

from sampling import Pipeline  # noqa: E402
from training import cli  # noqa: E402


def parse_args(argv: list[str] | None = None):
    p = cli.parser(__doc__)
    p.add_argument("--tokenizer", required=True, help="tokenizer folder (final/ of a run)")
    p.add_argument("--prior", required=True, help="prior folder (final/ of a run)")
    p.add_argument("--draft", default=None, help="draft prior, enables speculative methods")
    p.add_argument("--tree-draft", default=None, help="distilled tree draft, enables method tree")
    p.add_argument("--host", default="127.0.0.1", help="loopback by default")
    p.add_argument("--port", type=int, default=8000)
    p.add_argument("--max-rows", type=int, default=16, help="images decoded together")
    p.add_argument("--max-queue", type=int, default=256, help="images waiting; more -> 429")
    p.add_argument("--device", default=None, help="cuda / cpu (default: cuda if available)")
    p.add_argument("--compile", default="auto", choices=["auto", "true", "false"],
                   help="compile the decode step (auto: on CUDA)")  # fmt: skip
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> None:
    import uvicorn

    from serving import Scheduler, create_app

    args = parse_args(argv)
    cli.quiet_startup()
    torch.set_grad_enabled(False)
    pipe = Pipeline.from_pretrained(args.tokenizer, args.prior, args.draft, device=args.device,
                                    tree_draft_dir=args.tree_draft)  # fmt: skip
    compile = {"auto": "auto", "true": True, "false": False}[args.compile]
    scheduler = Scheduler(pipe, max_rows=args.max_rows, max_queue=args.max_queue,
                          compile=compile).start()  # fmt: skip
    print(f"Tessera serving on http://{args.host}:{args.port}/  (Ctrl-C stops)", flush=True)
    uvicorn.run(create_app(scheduler), host=args.host, port=args.port, log_level="warning")


def console() -> None:
    cli.run(main)


if __name__ == "__main__":
    console()

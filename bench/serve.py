"""Load test of the HTTP server on loopback: continuous batching under 1 / 4 / 16 / 64 clients.

Each client sends `--requests` requests (one image each, its own seed) and waits for each
answer before the next. Reported: images/s, p50 / p99 latency per client count, the ratio of
images/s at 16 clients to one client sending the same requests one after another through the
same server, failed or garbled responses (must be 0), and resident memory after the run
against after warm-up. The last line is the JSON summary.

    python bench/serve.py                    # the `make demo` models, CPU
    python bench/serve.py --random --quick   # tiny random models, seconds
    python bench/serve.py --screenshot bench/results/serve_page.png   # + the page in Chromium
"""

from __future__ import annotations

import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
for entry in [p for p in sys.path if Path(p or ".").resolve() == ROOT / "bench"]:
    sys.path.remove(entry)
sys.path.insert(0, str(ROOT))

import argparse  # noqa: E402
import base64  # noqa: E402
import io  # noqa: E402
import json  # noqa: E402
import socket  # noqa: E402
import statistics  # noqa: E402
import threading  # noqa: E402
import time  # noqa: E402
from concurrent.futures import ThreadPoolExecutor  # noqa: E402

import httpx  # noqa: E402
import torch  # noqa: E402
import uvicorn  # noqa: E402
from PIL import Image  # noqa: E402

from bench.common import device_name  # noqa: E402
from sampling import Pipeline  # noqa: E402
from serving import Scheduler, create_app  # noqa: E402
from serving.browser import generate_on_page, headless_chromium  # noqa: E402


def rss_mb() -> float:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * 4096 / 2**20


def load(args) -> Pipeline:
    if not args.random:
        return Pipeline.from_pretrained(args.tokenizer, args.prior, device="cpu")
    sys.path.insert(0, str(ROOT / "tests"))
    from test_pipeline import tiny_prior, tiny_tokenizer

    tok = tiny_tokenizer()
    return Pipeline(tok, tiny_prior(tok))


def serve(pipe: Pipeline, max_rows: int) -> tuple[str, uvicorn.Server]:
    scheduler = Scheduler(pipe, max_rows=max_rows, max_queue=4096).start()
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    server = uvicorn.Server(uvicorn.Config(create_app(scheduler), host="127.0.0.1", port=port,
                                           log_level="error"))  # fmt: skip
    threading.Thread(target=server.run, daemon=True).start()
    while not server.started:
        time.sleep(0.02)
    return f"http://127.0.0.1:{port}", server


def client(url: str, bodies: list[dict]) -> tuple[list[float], int]:
    """Send the requests one after another: (latencies, failed or garbled)."""
    latencies, bad = [], 0
    with httpx.Client(timeout=600) as http:
        for body in bodies:
            start = time.perf_counter()
            reply = http.post(f"{url}/v1/images/generations", json=body)
            latencies.append(time.perf_counter() - start)
            try:
                assert reply.status_code == 200
                png = base64.b64decode(reply.json()["data"][0]["b64_json"])
                Image.open(io.BytesIO(png)).verify()
            except Exception:
                bad += 1
    return latencies, bad


def run(url: str, clients: int, bodies: list[list[dict]]) -> dict:
    start = time.perf_counter()
    with ThreadPoolExecutor(clients) as pool:
        results = list(pool.map(lambda b: client(url, b), bodies))
    wall = time.perf_counter() - start
    latencies = sorted(x for lat, _ in results for x in lat)
    images = len(latencies)
    return {"clients": clients, "images": images, "images_per_s": round(images / wall, 3),
            "p50_s": round(statistics.median(latencies), 4),
            "p99_s": round(latencies[min(images - 1, int(0.99 * images))], 4),
            "failed": sum(bad for _, bad in results)}  # fmt: skip


def screenshot(url: str, path: str, *, prompt: str, n: int, guidance: float) -> None:
    """Generate from the page in Debian's headless Chromium (selenium) and save a screenshot."""
    try:
        driver = headless_chromium(window=(1000, 760))
    except FileNotFoundError:
        raise SystemExit("--screenshot needs chromium and chromium-driver (make browser)") from None
    try:
        generate_on_page(
            driver, url, prompt=prompt, images=n, fields={"n": n, "guidance": guidance}
        )
        Path(path).parent.mkdir(parents=True, exist_ok=True)
        driver.save_screenshot(path)
    finally:
        driver.quit()


def main() -> None:
    p = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--tokenizer", default="outputs/demo/tokenizer/final")
    p.add_argument("--prior", default="outputs/demo/prior/final")
    p.add_argument("--random", action="store_true", help="tiny random models (no demo needed)")
    p.add_argument("--clients", type=int, nargs="+", default=[1, 4, 16, 64])
    p.add_argument("--requests", type=int, default=4, help="requests per client")
    p.add_argument("--max-rows", type=int, default=64)
    p.add_argument("--guidance", type=float, default=1.75)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--quick", action="store_true", help="clients 1 4 16, 2 requests each")
    p.add_argument("--screenshot", default=None, help="PNG of the page after generating there")
    p.add_argument("--screenshot-prompt", default="7", help="class name (or text) for the page")
    args = p.parse_args()
    if args.quick:
        args.clients, args.requests = [1, 4, 16], 2
    torch.set_num_threads(args.threads)
    torch.set_grad_enabled(False)
    pipe = load(args)
    classes = (
        list(range(pipe.prior.config.num_classes)) if pipe.prior.config.cond == "class" else None
    )

    def bodies(clients: int, offset: int) -> list[list[dict]]:
        def body(c: int, r: int) -> dict:
            prompt = classes[(c + r) % len(classes)] if classes else "a small red circle"
            return {
                "prompt": prompt,
                "seed": offset + c * 1000 + r,
                "guidance_scale": args.guidance,
            }

        return [[body(c, r) for r in range(args.requests)] for c in range(clients)]

    url, server = serve(pipe, args.max_rows)
    top = max(args.clients)
    run(url, top, bodies(top, 10**6))  # warm-up at the largest load: allocations settle
    warm = rss_mb()
    report = {"benchmark": "serve", "device": device_name("cpu"), "max_rows": args.max_rows,
              "guidance": args.guidance, "requests_per_client": args.requests,
              "models": "random tiny" if args.random else args.prior}  # fmt: skip
    report["load"] = [run(url, c, bodies(c, 10**7 * (i + 1))) for i, c in enumerate(args.clients)]
    same = bodies(16, 10**8)
    concurrent = run(url, 16, same)
    sequential = run(url, 1, [[b for client_bodies in same for b in client_bodies]])
    after = rss_mb()
    if args.screenshot:
        screenshot(url, args.screenshot, prompt=args.screenshot_prompt, n=8, guidance=args.guidance)
    server.should_exit = True
    summary = {
        "images_per_s": {str(r["clients"]): r["images_per_s"] for r in report["load"]},
        "p50_s": {str(r["clients"]): r["p50_s"] for r in report["load"]},
        "p99_s": {str(r["clients"]): r["p99_s"] for r in report["load"]},
        "clients16_vs_sequential": round(concurrent["images_per_s"] / sequential["images_per_s"], 2),
        "failed": sum(r["failed"] for r in report["load"]) + concurrent["failed"] + sequential["failed"],
        "memory_growth": round(after / warm - 1.0, 4),
        "device": report["device"],
    }  # fmt: skip
    report.update(
        concurrent_16=concurrent,
        sequential_same_requests=sequential,
        rss_mb={"after_warmup": round(warm, 1), "after_run": round(after, 1)},
    )
    print(json.dumps(report, indent=2))
    print(json.dumps(summary))


if __name__ == "__main__":
    main()

"""The HTTP API: an OpenAI-images-shaped endpoint over the scheduler, a page, health, metrics.

    POST /v1/images/generations   {"prompt": "7", "n": 4, "guidance_scale": 3.0, "seed": 0, ...}
    GET  /v1/models               what is loaded (kind, classes, grid, codebook, methods)
    GET  /health                  {"status": "ok", ...}
    GET  /metrics                 Prometheus text: queue depth, rows in flight, tokens/s, latency
    GET  /                        the page (no CDN: works offline)

Errors are JSON {"error": {"message": ..., "field": ...}} with a 4xx naming the field; a full
queue is 429, shutting down 503, a deadline 504. The HTTP side never touches the model.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import math
import random
import time
from pathlib import Path
from typing import Any, Literal

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import HTMLResponse, JSONResponse, PlainTextResponse
from pydantic import BaseModel, ConfigDict, Field

from sampling.guidance import GuidanceSchedule
from sampling.logits import SamplingConfig
from serving.scheduler import (
    DeadlineExceeded,
    Job,
    QueueFull,
    Scheduler,
    ShuttingDown,
    describe,
    methods_for,
)

PAGE = Path(__file__).with_name("page.html")
MAX_BODY_BYTES = 64 * 1024
MAX_IMAGES = 16


class GenerationRequest(BaseModel):
    """The body of POST /v1/images/generations; omitted fields take the Pipeline's defaults."""

    model_config = ConfigDict(extra="forbid", allow_inf_nan=False)

    prompt: str | int | list[str | int]
    n: int = Field(1, ge=1, le=MAX_IMAGES)
    guidance_scale: float = Field(1.0, ge=0.0)
    seed: int | None = Field(None, ge=0, lt=2**63)
    method: str | None = None
    temperature: float = Field(1.0, gt=0.0)
    top_k: int = Field(0, ge=0)
    top_p: float = Field(1.0, gt=0.0, le=1.0)
    response_format: Literal["b64_json"] = "b64_json"
    timeout_s: float = Field(120.0, gt=0.0, le=3600.0)


class BadRequest(ValueError):
    def __init__(self, field: str, message: str, status: int = 400) -> None:
        super().__init__(message)
        self.field, self.status = field, status


def error(status: int, message: str, field: str | None = None) -> JSONResponse:
    return JSONResponse({"error": {"message": message, "field": field}}, status_code=status)


def create_app(scheduler: Scheduler) -> FastAPI:
    """The ASGI app over a started scheduler (stopped when the app shuts down)."""
    pipe = scheduler.pipeline

    @contextlib.asynccontextmanager
    async def lifespan(app: FastAPI):
        yield
        await asyncio.get_running_loop().run_in_executor(None, scheduler.stop)

    app = FastAPI(title="Tessera", version="1", docs_url=None, redoc_url=None, lifespan=lifespan)
    app.state.scheduler = scheduler
    started = time.time()

    app.add_middleware(BodyLimit, limit=MAX_BODY_BYTES)

    @app.exception_handler(RequestValidationError)
    async def invalid(request: Request, exc: RequestValidationError) -> JSONResponse:
        first = exc.errors()[0]
        where = [str(p) for p in first.get("loc", ()) if p != "body"]
        field = ".".join(where) or "body"
        if first.get("type") == "json_invalid":
            return error(400, f"malformed JSON: {first.get('msg')}", "body")
        return error(422, f"{field}: {first.get('msg')}", field)

    @app.get("/health")
    async def health() -> dict[str, Any]:
        return {"status": "ok" if scheduler.admitting else "stopping",
                "uptime_s": round(time.time() - started, 1)}  # fmt: skip

    @app.get("/v1/models")
    async def models() -> dict[str, Any]:
        return {"object": "list", "data": [{"id": "tessera", **describe(pipe)}]}

    @app.get("/metrics")
    async def metrics() -> PlainTextResponse:
        return PlainTextResponse(prometheus(scheduler, started))

    @app.get("/")
    async def page() -> HTMLResponse:
        return HTMLResponse(PAGE.read_text())

    @app.post("/v1/images/generations")
    async def generate(body: GenerationRequest, request: Request) -> JSONResponse:
        try:
            job = build_job(body, scheduler)
        except BadRequest as bad:
            return error(bad.status, str(bad), bad.field)
        loop = asyncio.get_running_loop()
        done = asyncio.Event()
        job.on_done = lambda _: loop.call_soon_threadsafe(done.set)
        try:
            scheduler.submit(job)
        except QueueFull as full:
            return error(429, str(full), None)
        except ShuttingDown as stopping:
            return error(503, str(stopping), None)
        while not done.is_set():
            try:
                await asyncio.wait_for(done.wait(), timeout=0.05)
            except TimeoutError:
                if await request.is_disconnected():
                    scheduler.cancel(job)
                    return error(499, "client disconnected", None)
        if job.error is not None:
            status = {DeadlineExceeded: 504, ShuttingDown: 503}.get(type(job.error), 500)
            return error(status, str(job.error), None)
        data = [{"b64_json": base64.b64encode(png).decode(), "seed": job.seed, "index": i,
                 "prompt": job.prompts[i]} for i, png in enumerate(job.images)]  # fmt: skip
        latency = job.finished - job.submitted
        stats = {"latency_s": round(latency, 4), "images": len(data), "method": job.method,
                 "tokens": len(data) * scheduler.num_tokens}  # fmt: skip
        return JSONResponse({"created": int(time.time()), "data": data, "stats": stats})

    return app


class BodyLimit:
    """413 for a declared body over `limit` bytes: a plain ASGI middleware (Starlette's
    BaseHTTPMiddleware would hide client disconnects from the endpoint)."""

    def __init__(self, app, limit: int) -> None:
        self.app, self.limit = app, limit

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] == "http":
            size = dict(scope.get("headers") or []).get(b"content-length", b"0").decode()
            if not size.isdigit() or int(size) > self.limit:
                response = error(413, f"request body over {self.limit} bytes", "body")
                await response(scope, receive, send)
                return
        await self.app(scope, receive, send)


def build_job(body: GenerationRequest, scheduler: Scheduler) -> Job:
    """Check the request against the loaded models; BadRequest names the field."""
    pipe = scheduler.pipeline
    prompts = body.prompt if isinstance(body.prompt, list) else [body.prompt]
    if not prompts or len(prompts) * body.n > MAX_IMAGES:
        raise BadRequest("n", f"{len(prompts)} prompts x n={body.n} images: between 1 and "
                              f"{MAX_IMAGES} images per request")  # fmt: skip
    cond = pipe.prior.config.cond
    for p in prompts:
        if cond == "class":
            try:
                pipe.class_id(p)
            except ValueError as bad:
                raise BadRequest("prompt", str(bad)) from None
        elif cond == "text" and not isinstance(p, str):
            raise BadRequest("prompt", "a text-conditioned prior needs text prompts")
    method = body.method or pipe.default_method
    allowed = methods_for(pipe)
    if method not in allowed:
        why = {"speculative": " (speculative methods need a draft: start the server with --draft)",
               "tree": " (method tree needs a distilled draft: start the server with --tree-draft)",
               }.get("speculative" if method == "relaxed" else method, "")  # fmt: skip
        raise BadRequest("method", f"method '{method}' is not available; use one of "
                                   f"{', '.join(allowed)}{why}")  # fmt: skip
    if not math.isfinite(body.guidance_scale):
        raise BadRequest("guidance_scale", "guidance_scale must be a finite number >= 0")
    seed = body.seed if body.seed is not None else random.randrange(2**31)
    return Job(
        prompts=[p for p in prompts for _ in range(body.n)],
        seed=seed,
        sampling=SamplingConfig(body.temperature, body.top_k, body.top_p),
        guidance=GuidanceSchedule(body.guidance_scale),
        method=method,
        deadline=time.monotonic() + body.timeout_s,
    )


def prometheus(scheduler: Scheduler, started: float) -> str:
    """Prometheus text exposition of the scheduler's counters and the latency histogram."""
    s = scheduler.stats
    uptime = max(time.time() - started, 1e-9)
    lines = [
        "# TYPE tessera_queue_depth gauge", f"tessera_queue_depth {scheduler.queued_rows}",
        "# TYPE tessera_rows_in_flight gauge", f"tessera_rows_in_flight {scheduler.rows_in_flight}",
        "# TYPE tessera_tokens_total counter", f"tessera_tokens_total {s.tokens}",
        "# TYPE tessera_images_total counter", f"tessera_images_total {s.images}",
        "# TYPE tessera_failed_total counter", f"tessera_failed_total {s.failed}",
        "# TYPE tessera_cancelled_rows_total counter", f"tessera_cancelled_rows_total {s.cancelled}",
        "# TYPE tessera_tokens_per_second gauge", f"tessera_tokens_per_second {s.tokens / uptime:.3f}",
        "# TYPE tessera_request_latency_seconds histogram",
    ]  # fmt: skip
    h = s.latency
    for bound, count in zip(h.bounds, h.counts, strict=True):
        lines.append(f'tessera_request_latency_seconds_bucket{{le="{bound}"}} {count}')
    lines.append(f'tessera_request_latency_seconds_bucket{{le="+Inf"}} {h.total}')
    lines.append(f"tessera_request_latency_seconds_sum {h.sum_s:.6f}")
    lines.append(f"tessera_request_latency_seconds_count {h.total}")
    return "\n".join(lines) + "\n"

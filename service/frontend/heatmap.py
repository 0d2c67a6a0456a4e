"""POST /attend/heatmap (a PNG of one sequence's attention weights) and GET / (a page to look at them).

The weights come through the batcher like every inference; the picture is drawn by
``mha_client.plot.render_heatmaps`` in a worker thread of the event loop's default executor
(not the batcher's forward thread), one at a time, so drawing never blocks the loop or the model.
Waiting for the renderer is bounded like waiting for the model: at most HEATMAP_MAX_WAITING
pictures wait (429 beyond), each until its request's deadline (504), and a client that hangs up
stops waiting (the route answers 499 to nobody).
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import logging
import time
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
from fastapi import APIRouter, Request
from fastapi.responses import HTMLResponse, Response

from mha_client.plot import render_heatmaps
from service.errors import INFERENCE_ERRORS, ServiceError, validation
from service.frontend.decode import decode_object, parse_json
from service.frontend.httputil import Answer, disconnected, infer, read_body, require_ready
from service.frontend.schemas import error_responses
from service.tracing import stage

if TYPE_CHECKING:
    from service.frontend.state import AppState

log = logging.getLogger("mha_serve.heatmap")

HEATMAP_MAX_T = 128  # longest sequence drawn: 128 positions still show as cells ~2 px wide
HEATMAP_MAX_HEADS = 16  # most panels in one picture (4 rows of 4)
HEATMAP_MAX_RENDERS = 1  # pictures drawn at once; others wait. Drawing is mostly Python (the GIL): more gains little
HEATMAP_MAX_WAITING = 8  # pictures waiting for the renderer; past it, 429 (a picture takes ~0.1-0.3 s to draw)

STATIC = Path(__file__).parent / "static"


def build_router(state: AppState) -> APIRouter:
    """The heatmap routes, bound to the app's state (wired by ``create_app``)."""
    router = APIRouter()
    page = (STATIC / "index.html").read_text(encoding="utf-8")
    renderer = _Renderer()
    warmed: list[asyncio.Task] = []

    async def warm() -> None:
        async with renderer.slots:
            await asyncio.to_thread(_warm_renderer)

    @router.get("/", response_class=HTMLResponse, include_in_schema=False)
    async def index() -> HTMLResponse:
        if not warmed:  # someone is about to ask for a picture: import matplotlib and draw once, off the loop
            warmed.append(asyncio.create_task(warm()))
        return HTMLResponse(page)

    @router.post(
        "/attend/heatmap",
        tags=["attention"],
        summary="A PNG heatmap of each head's attention weights for one sequence",
        description=f"The body of POST /attend with x of shape [1, T, E], T <= {HEATMAP_MAX_T}; `heads` picks up "
        f"to {HEATMAP_MAX_HEADS} panels (default all), return_weights is implied. Keys across, queries down, "
        "one shared colour scale. Padding positions (beyond lengths[0]) are cropped.",
        response_class=Response,
        responses={
            200: {
                "content": {"image/png": {}},
                "description": "the PNG; headers x-queue-time-ms, x-compute-time-ms, x-batch-size, x-render-time-ms",
            },
            **error_responses(*INFERENCE_ERRORS),
        },
        openapi_extra={
            "requestBody": {
                "required": True,
                "content": {"application/json": {"schema": {"$ref": "#/components/schemas/AttendRequest"}}},
            }
        },
    )
    async def heatmap(request: Request) -> Response:
        started = time.monotonic()
        require_ready(state)
        body = await read_body(request, state.settings.max_body_bytes)
        obj = parse_json(body)  # parsed once
        del body
        if isinstance(obj, dict):  # weights are the point: heads need not come with return_weights
            obj["return_weights"] = True
        cfg = state.engine.model.config
        with stage(state.tracing, "decode"):
            dec = decode_object(obj, cfg, state.limits)
        del obj
        inp = dataclasses.replace(dec.input, out_dtype="float32")  # the picture's weights: float32 values
        B, T, _ = inp.x.shape
        if B != 1:
            raise validation(
                f"a heatmap shows one sequence: x must have B = 1, got B = {B} (shape {list(inp.x.shape)})"
            )
        if T > HEATMAP_MAX_T:
            raise validation(f"x has T = {T} positions, more than HEATMAP_MAX_T = {HEATMAP_MAX_T} a heatmap shows")
        heads = list(inp.heads) if inp.heads is not None else list(range(cfg.num_heads))
        if len(heads) > HEATMAP_MAX_HEADS:
            raise validation(
                f"{len(heads)} heads asked for, more than HEATMAP_MAX_HEADS = {HEATMAP_MAX_HEADS} panels in one "
                "picture; choose some with heads"
            )
        res = await infer(state, inp, started=started, timeout_s=dec.timeout_s, request=request, priority=dec.priority)
        if res is None:
            return Response(status_code=499)
        n = int(inp.lengths[0]) if inp.lengths is not None else T
        weights = np.ascontiguousarray(res.output.weights[0, :, :n, :n])  # (H', n, n)
        info = state.model_info or {}
        how = "causal" if inp.causal else "not causal"
        if inp.mask is not None:
            how += ", masked"
        title = (
            f"{info.get('name', 'mha')}: {cfg.num_heads} heads, emb {cfg.emb_size}, head {cfg.head_size}"
            f"  |  T = {n}, {how}"
        )
        with stage(state.tracing, "encode"):
            png, render_s = await renderer.render(
                weights, heads, title, deadline=started + dec.timeout_s, timeout_s=dec.timeout_s, request=request
            )
        if png is None:
            return Response(status_code=499)
        extra = ((b"x-render-time-ms", b"%.3f" % (render_s * 1000)), (b"cache-control", b"no-store"))
        return Answer(png, b"image/png", res, extra)

    return router


class _Renderer:
    """One picture drawn at a time; a bounded number wait, each until its deadline or its client leaves."""

    def __init__(self) -> None:
        self.slots = asyncio.Semaphore(HEATMAP_MAX_RENDERS)
        self.waiting = 0

    async def render(
        self, weights: np.ndarray, heads: list[int], title: str, *, deadline: float, timeout_s: float, request: Request
    ) -> tuple[bytes | None, float]:
        """(png, seconds drawing), or (None, 0) when the client went away while waiting."""
        gone: asyncio.Future | None = None
        done: set = set()
        if self.slots.locked():  # someone is drawing: wait, within bounds
            if self.waiting >= HEATMAP_MAX_WAITING:
                raise ServiceError(
                    "overloaded",
                    f"the heatmap renderer is busy ({self.waiting} pictures waiting; limit HEATMAP_MAX_WAITING "
                    f"{HEATMAP_MAX_WAITING})",
                    headers={"retry-after": "1"},
                )
            self.waiting += 1
            acquire = asyncio.ensure_future(self.slots.acquire())
            gone = asyncio.ensure_future(disconnected(request))
            try:
                done, _ = await asyncio.wait(
                    {acquire, gone},
                    timeout=max(0.0, deadline - time.monotonic()),
                    return_when=asyncio.FIRST_COMPLETED,
                )
            finally:
                self.waiting -= 1
                gone.cancel()
                if not acquire.done():
                    acquire.cancel()
                    with contextlib.suppress(asyncio.CancelledError):
                        await acquire
            if not acquire.done() or acquire.cancelled():
                if gone in done:
                    return None, 0.0
                raise ServiceError(
                    "deadline_exceeded",
                    f"the request's deadline passed while it waited for the heatmap renderer (timeout "
                    f"{timeout_s * 1000:g} ms)",
                )
        else:
            await self.slots.acquire()  # free: taken at once, no yield
        try:
            if gone in done:  # acquired, but nobody is listening any more
                return None, 0.0
            t0 = time.perf_counter()
            png = await asyncio.to_thread(render_heatmaps, weights, head_ids=heads, title=title)
            return png, time.perf_counter() - t0
        finally:
            self.slots.release()


def _warm_renderer() -> None:
    """The first picture costs seconds (importing matplotlib, loading fonts); later ones a fraction."""
    try:
        render_heatmaps(np.full((1, 2, 2), 0.5, np.float32), title="warm-up")
    except Exception:  # a failure here will show, with its message, on the first real request
        log.exception("heatmap warm-up failed")

"""POST /attend/heatmap and GET / in-process, through ASGI, inside the app's lifespan."""

from __future__ import annotations

import asyncio
import io
import threading
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

import httpx
import numpy as np
import pytest
from asgi_lifespan import LifespanManager

pytest.importorskip("matplotlib")
import matplotlib.image as mpimg

import service.frontend.heatmap as heatmap_module
from service.app import create_app
from service.frontend.heatmap import HEATMAP_MAX_HEADS, HEATMAP_MAX_T, build_router
from service.settings import Settings
from tests.integration.conftest import TINY

E = TINY["emb_size"]


def with_heatmap(app):
    """create_app wires the router itself once it includes it; until then the test does."""
    if not any(getattr(r, "path", None) == "/attend/heatmap" for r in app.routes):
        app.include_router(build_router(app.state.mha))
    return app


@asynccontextmanager
async def serve(**settings_kw) -> AsyncIterator[httpx.AsyncClient]:
    # max_seq_len above HEATMAP_MAX_T, so that the heatmap's own limit is the one that answers
    app = with_heatmap(create_app(settings=Settings(**{**TINY, "max_seq_len": 256, **settings_kw})))
    async with LifespanManager(app) as manager:
        transport = httpx.ASGITransport(app=manager.app)
        async with httpx.AsyncClient(transport=transport, base_url="http://test") as c:
            yield c


@pytest.fixture
async def client() -> AsyncIterator[httpx.AsyncClient]:
    async with serve() as c:
        yield c


def body(B: int = 1, T: int = 8, **extra) -> dict:
    x = np.random.default_rng(0).standard_normal((B, T, E)).round(4)
    return {"x": x.tolist(), **extra}


def size(png: bytes) -> tuple[int, int]:
    h, w = mpimg.imread(io.BytesIO(png), format="png").shape[:2]
    return w, h


async def test_heatmap_is_a_png_with_timing_headers(client: httpx.AsyncClient) -> None:
    r = await client.post("/attend/heatmap", json=body())
    assert r.status_code == 200, r.text
    assert r.headers["content-type"] == "image/png"
    assert r.content.startswith(b"\x89PNG\r\n\x1a\n")
    for name in ("x-queue-time-ms", "x-compute-time-ms", "x-render-time-ms"):
        assert float(r.headers[name]) >= 0
    assert r.headers["x-batch-size"] == "1" and r.headers["cache-control"] == "no-store"
    assert r.headers["x-served-by"] == TINY["replica_id"]
    img = mpimg.imread(io.BytesIO(r.content), format="png")
    assert img[..., :3].std() > 0.1  # not blank
    assert size(r.content)[0] > size(r.content)[1]  # 4 panels in a row


async def test_concurrent_requests_all_get_their_picture(client: httpx.AsyncClient) -> None:
    rs = await asyncio.gather(*(client.post("/attend/heatmap", json=body(T=4 + i)) for i in range(4)))
    assert [r.status_code for r in rs] == [200] * 4
    assert len({r.content for r in rs}) == 4


async def test_heads_pick_the_panels_and_need_no_return_weights(client: httpx.AsyncClient) -> None:
    every = await client.post("/attend/heatmap", json=body())
    two = await client.post("/attend/heatmap", json=body(heads=[1, 3], causal=False))
    assert two.status_code == 200, two.text
    assert size(two.content)[0] < size(every.content)[0]


async def test_lengths_and_a_base64_body(client: httpx.AsyncClient) -> None:
    from mha_client._wire import encode_tensor

    x = np.random.default_rng(1).standard_normal((1, 8, E)).astype(np.float32)
    r = await client.post("/attend/heatmap", json={"x": encode_tensor(x, "base64", "float16"), "lengths": [5]})
    assert r.status_code == 200, r.text


async def test_drawing_runs_in_a_worker_thread(client: httpx.AsyncClient, monkeypatch) -> None:
    threads = []
    real = heatmap_module.render_heatmaps

    def spy(*args, **kwargs):
        threads.append(threading.current_thread())
        return real(*args, **kwargs)

    monkeypatch.setattr(heatmap_module, "render_heatmaps", spy)
    r = await client.post("/attend/heatmap", json=body())
    assert r.status_code == 200
    (thread,) = threads
    assert thread is not threading.main_thread()
    assert not thread.name.startswith("mha-forward")  # not the batcher's forward thread


@pytest.mark.parametrize(
    ("request_body", "message"),
    [
        (body(B=2), "x must have B = 1, got B = 2 (shape [2, 8, 32])"),
        (body(T=HEATMAP_MAX_T + 1), f"T = {HEATMAP_MAX_T + 1} positions, more than HEATMAP_MAX_T = {HEATMAP_MAX_T}"),
        (body(heads=[4]), "head index 4 is out of range 0..3"),
        (body(heads=[0] * (HEATMAP_MAX_HEADS + 1)), f"more than HEATMAP_MAX_HEADS = {HEATMAP_MAX_HEADS}"),
        ({"x": [[[1.0] * (E - 1)]]}, f"but the model expects {E}"),
    ],
    ids=["two-sequences", "too-long", "head-out-of-range", "too-many-heads", "wrong-emb-size"],
)
async def test_bad_requests_get_422_with_the_reason(client: httpx.AsyncClient, request_body, message) -> None:
    r = await client.post("/attend/heatmap", json=request_body)
    assert r.status_code == 422, r.text
    err = r.json()["error"]
    assert err["type"] == "validation_error"
    assert message in err["message"]


async def test_malformed_json_is_400(client: httpx.AsyncClient) -> None:
    r = await client.post("/attend/heatmap", content=b"{not json", headers={"content-type": "application/json"})
    assert r.status_code == 400
    assert r.json()["error"]["type"] == "malformed_json"


async def test_the_page(client: httpx.AsyncClient) -> None:
    r = await client.get("/")
    assert r.status_code == 200
    assert r.headers["content-type"].startswith("text/html")
    for element in ('id="run"', 'id="heatmap"', 'id="error"', 'id="random"', 'id="x"', "/attend/heatmap"):
        assert element in r.text


async def test_with_api_keys_the_page_is_open_and_the_picture_is_not() -> None:
    async with serve(api_keys="k1") as c:
        assert (await c.get("/")).status_code == 200
        assert (await c.post("/attend/heatmap", json=body())).status_code == 401
        r = await c.post("/attend/heatmap", json=body(), headers={"authorization": "Bearer k1"})
        assert r.status_code == 200 and r.headers["content-type"] == "image/png"


def _slow_renderer(monkeypatch, seconds: float) -> list[float]:
    drawn: list[float] = []

    def slow(weights, **kw):
        import time

        time.sleep(seconds)
        drawn.append(float(weights.sum()))
        return b"\x89PNG slow"

    monkeypatch.setattr(heatmap_module, "render_heatmaps", slow)
    return drawn


async def test_renderer_queue_is_bounded_429(client: httpx.AsyncClient, monkeypatch) -> None:
    drawn = _slow_renderer(monkeypatch, 0.3)
    monkeypatch.setattr(heatmap_module, "HEATMAP_MAX_WAITING", 2)
    tasks = [asyncio.create_task(client.post("/attend/heatmap", json=body())) for _ in range(5)]
    results = await asyncio.gather(*tasks)
    statuses = sorted(r.status_code for r in results)
    assert statuses == [200, 200, 200, 429, 429], statuses  # one drawing, two waiting, two refused
    refused = [r for r in results if r.status_code == 429]
    for r in refused:
        assert r.headers["retry-after"] == "1"
        assert r.json()["error"]["type"] == "overloaded"
        assert "2 pictures waiting; limit HEATMAP_MAX_WAITING 2" in r.json()["error"]["message"]
    assert len(drawn) == 3


async def test_waiting_for_the_renderer_ends_at_the_deadline_504(client: httpx.AsyncClient, monkeypatch) -> None:
    drawn = _slow_renderer(monkeypatch, 0.8)
    first = asyncio.create_task(client.post("/attend/heatmap", json=body()))
    await asyncio.sleep(0.2)  # the first one is drawing
    r = await client.post("/attend/heatmap", json=body(timeout_ms=300))
    assert r.status_code == 504, r.text
    assert r.json()["error"]["type"] == "deadline_exceeded"
    assert "while it waited for the heatmap renderer (timeout 300 ms)" in r.json()["error"]["message"]
    assert (await first).status_code == 200
    assert len(drawn) == 1  # the late one was never drawn


async def test_the_body_is_parsed_once(client: httpx.AsyncClient, monkeypatch) -> None:
    import orjson

    calls = []
    real = orjson.loads

    def counting(data):
        calls.append(len(data))
        return real(data)

    monkeypatch.setattr("service.frontend.decode.orjson.loads", counting)
    r = await client.post("/attend/heatmap", json=body(heads=[1]))
    assert r.status_code == 200, r.text
    assert len(calls) == 1

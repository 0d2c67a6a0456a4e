"""The hot routes as plain ASGI beside FastAPI (service/frontend/fastroute.py): the contract of their declarations."""

from __future__ import annotations

import asyncio
import base64
import json
import re

import httpx
import numpy as np
import pytest

from service.frontend.fastroute import HotRoutes
from service.frontend.v2 import HEADER_LENGTH

INFER = "/v2/models/mha/infer"


def b64_body(x: np.ndarray) -> dict:
    return {"x": {"dtype": "float32", "shape": list(x.shape), "b64": base64.b64encode(x.tobytes()).decode()}}


def v2_binary(x: np.ndarray) -> tuple[bytes, dict[str, str]]:
    raw = x.astype("<f4").tobytes()
    head = {
        "inputs": [
            {"name": "x", "shape": list(x.shape), "datatype": "FP32", "parameters": {"binary_data_size": len(raw)}}
        ],
        "outputs": [{"name": "output", "parameters": {"binary_data": True}}],
    }
    h = json.dumps(head).encode()
    return h + raw, {"content-type": "application/octet-stream", HEADER_LENGTH: str(len(h))}


async def test_dispatch_takes_only_hot_posts() -> None:
    """Hot POSTs go through the declared middlewares to their handlers, with the path's parameters and the
    declared route in the scope; other methods and paths go through FastAPI's stack to its router."""
    from fastapi import FastAPI
    from starlette.middleware import Middleware
    from starlette.responses import Response

    seen: list = []

    class Tag:  # a user middleware: it must wrap both kinds of request
        def __init__(self, app, *, tag: bytes) -> None:
            self.app, self.tag = app, tag

        async def __call__(self, scope, receive, send) -> None:
            async def tagged(message) -> None:
                if message["type"] == "http.response.start":
                    message["headers"] = [*message.get("headers", []), (b"x-tag", self.tag)]
                await send(message)

            await self.app(scope, receive, tagged)

    middleware = [Middleware(Tag, tag=b"t1")]
    api = FastAPI(middleware=middleware)

    @api.api_route("/{rest:path}", methods=["GET", "POST"])
    async def routed(rest: str) -> Response:
        seen.append(("router", rest))
        return Response(b"router")

    async def handler(request, **params):
        seen.append(("hot", params, request.scope["route"], request.path_params))
        return Response(b"hot")

    pattern = r"/v2/models/(?P<name>[^/]+)(?:/versions/(?P<version>[^/]+))?/infer"
    app = HotRoutes(api, [(r"/attend", handler, "attend-route"), (pattern, handler, "v2-route")], middleware)
    async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://t") as c:
        for path in ("/attend", "/v2/models/m/versions/7/infer", "/v2/models/m/infer"):
            r = await c.post(path, content=b"{}")
            assert r.content == b"hot" and r.headers["x-tag"] == "t1"
        for method, path in [("GET", "/attend"), ("POST", "/attend/heatmap"), ("POST", "/v2/models/a/b/infer")]:
            r = await c.request(method, path)
            assert r.content == b"router" and r.headers["x-tag"] == "t1"
    assert seen == [
        ("hot", {}, "attend-route", {}),
        ("hot", {"name": "m", "version": "7"}, "v2-route", {"name": "m", "version": "7"}),
        ("hot", {"name": "m", "version": None}, "v2-route", {"name": "m"}),
        ("router", "attend"),
        ("router", "attend/heatmap"),
        ("router", "v2/models/a/b/infer"),
    ]


async def test_the_served_app_composes_fastapi_and_patches_none_of_it(app) -> None:
    """The hot routes are an ASGI app of their own beside a plain FastAPI app: FastAPI's ``__call__`` and
    ``build_middleware_stack`` are its class's own, and the FastAPI app stays reachable with its state."""
    from fastapi import FastAPI

    assert isinstance(app, HotRoutes) and type(app.api) is FastAPI
    assert "__call__" not in vars(app.api) and "build_middleware_stack" not in vars(app.api)
    assert app.state is app.api.state and app.state.mha.ready
    assert [m.cls.__name__ for m in app.api.user_middleware] == [
        "ObserveMiddleware",
        "InternalErrors",
        "AdmissionMiddleware",
    ]


async def test_attend_answers_with_headers_and_values(app, client) -> None:
    x = np.random.default_rng(1).standard_normal((2, 5, 32), dtype=np.float32)
    r = await client.post("/attend", json=b64_body(x), headers={"x-request-id": "abc-123"})
    assert r.status_code == 200, r.text
    assert r.headers["x-request-id"] == "abc-123" and r.headers["x-served-by"] == "test-replica"
    assert int(r.headers["x-batch-size"]) >= 1 and float(r.headers["x-compute-time-ms"]) >= 0
    assert "x-queue-time-ms" in r.headers and r.headers["content-type"] == "application/json"
    out = r.json()["output"]
    got = np.frombuffer(base64.b64decode(out["b64"]), np.float32).reshape(out["shape"])
    want = app.state.mha.engine.runner.module(__import__("torch").from_numpy(x)).output.numpy()
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize(
    ("body", "ctype", "status", "kind"),
    [
        (b"{not json", "application/json", 400, "malformed_json"),
        (b"{}", "text/plain", 415, "unsupported_media_type"),
        (
            b'{"x": {"dtype": "float32", "shape": [1, 2, 7], "b64": "AAAA"}}',
            "application/json",
            422,
            "validation_error",
        ),
    ],
)
async def test_attend_errors_keep_their_shape(client, body, ctype, status, kind) -> None:
    r = await client.post("/attend", content=body, headers={"content-type": ctype, "x-request-id": "e-1"})
    assert r.status_code == status, r.text
    assert r.json()["error"]["type"] == kind and r.json()["error"]["message"]
    assert r.headers["x-request-id"] == "e-1" and r.headers["x-served-by"] == "test-replica"


async def test_other_methods_still_get_405_and_head_probes(client) -> None:
    r = await client.get("/attend")
    assert r.status_code == 405 and r.json()["error"]["type"] == "method_not_allowed"
    r = await client.get(INFER)
    assert r.status_code == 405 and isinstance(r.json()["error"], str) and "GET" in r.json()["error"]
    assert (await client.head("/healthz")).status_code == 200


async def test_v2_infer_versions_and_errors(app, client) -> None:
    x = np.random.default_rng(2).standard_normal((1, 4, 32), dtype=np.float32)
    body, headers = v2_binary(x)
    for path in (INFER, "/v2/models/mha/versions/1/infer"):
        r = await client.post(path, content=body, headers=headers)
        assert r.status_code == 200, r.text
        assert r.headers["content-type"] == "application/octet-stream" and r.headers["x-served-by"] == "test-replica"
        n = int(r.headers[HEADER_LENGTH])
        got = np.frombuffer(r.content[n:], "<f4").reshape(x.shape)
        want = app.state.mha.engine.runner.module(__import__("torch").from_numpy(x)).output.numpy()
        np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)
    r = await client.post("/v2/models/other/infer", content=body, headers=headers)
    assert r.status_code == 404 and "other" in r.json()["error"]
    r = await client.post("/v2/models/mha/versions/9/infer", content=body, headers=headers)
    assert r.status_code == 404 and isinstance(r.json()["error"], str)
    r = await client.post(INFER, content=body, headers={**headers, HEADER_LENGTH: "x"})
    assert r.status_code == 400 and "Inference-Header-Content-Length" in r.json()["error"]


@pytest.mark.parametrize("settings_kw", [{"fault_injection": True}])
async def test_internal_errors_are_opaque_500s_with_ids(client) -> None:
    x = np.random.default_rng(3).standard_normal((1, 4, 32), dtype=np.float32)
    body, headers = v2_binary(x)
    r = await client.post(INFER, content=body, headers={**headers, "x-mha-fault": "raise", "x-request-id": "f-2"})
    assert r.status_code == 500 and re.fullmatch(
        r"internal error \(id [0-9a-f]{12}\); see the server log", r.json()["error"]
    )
    assert r.headers["x-request-id"] == "f-2"
    r = await client.post("/attend", json=b64_body(x), headers={"x-mha-fault": "raise"})
    assert r.status_code == 500 and r.json()["error"]["type"] == "internal_error"


async def test_openapi_keeps_the_hot_routes(client) -> None:
    paths = (await client.get("/openapi.json")).json()["paths"]
    assert "422" in paths["/attend"]["post"]["responses"] and "429" in paths["/attend"]["post"]["responses"]
    for p in ("/v2/models/{name}/infer", "/v2/models/{name}/versions/{version}/infer"):
        assert set(paths[p]) == {"post"} and "404" in paths[p]["post"]["responses"]


async def test_metrics_count_the_hot_routes(client) -> None:
    x = np.random.default_rng(4).standard_normal((1, 4, 32), dtype=np.float32)
    body, headers = v2_binary(x)
    for _ in range(3):
        assert (await client.post(INFER, content=body, headers=headers)).status_code == 200
    assert (await client.post("/attend", content=b"{", headers={"content-type": "application/json"})).status_code == 400
    text = (await client.get("/metrics")).text
    assert 'mha_requests_total{route="/v2",status="200"} 3.0' in text
    assert 'mha_requests_total{route="/attend",status="400"} 1.0' in text
    assert 'mha_request_latency_seconds_count{route="/v2"} 3.0' in text


@pytest.mark.parametrize("settings_kw", [{"fault_injection": True, "max_batch_size": 1}])
@pytest.mark.parametrize("path", [INFER, "/attend"])
async def test_a_client_gone_while_queued_is_never_computed(app, client, path) -> None:
    """Behind a stalled forward, a request whose client disconnects leaves the queue uncomputed."""
    x = np.random.default_rng(5).standard_normal((1, 4, 32), dtype=np.float32)
    if path == INFER:
        body, headers = v2_binary(x)
    else:
        body, headers = json.dumps(b64_body(x)).encode(), {"content-type": "application/json"}
    stalled = asyncio.create_task(client.post(path, content=body, headers={**headers, "x-mha-fault": "stall:400"}))
    await asyncio.sleep(0.15)  # the stall computes; the next request queues behind it
    messages = [{"type": "http.request", "body": body, "more_body": False}]
    gone, sent = asyncio.Event(), []

    async def receive() -> dict:
        if messages:
            return messages.pop(0)
        await gone.wait()
        return {"type": "http.disconnect"}

    async def send(message) -> None:
        sent.append(message)

    scope = _post_scope(path, headers, body)
    task = asyncio.create_task(app(scope, receive, send))
    await asyncio.sleep(0.05)
    assert app.state.mha.engine.batcher.queue_depth()[0] == 1  # queued behind the stall
    gone.set()
    await asyncio.wait_for(task, 5)
    assert app.state.mha.engine.batcher.queue_depth() == (0, 0)  # left the queue at once
    assert (await stalled).status_code == 200
    text = (await client.get("/metrics")).text
    assert 'mha_requests_dropped_total{reason="disconnect"} 1.0' in text
    assert "mha_batch_size_requests_count 1.0" in text  # only the stalled request was computed


def _broken_schedule() -> None:
    """The request tally's first call on a request raises: an exception inside ObserveMiddleware, outside
    InternalErrors."""
    raise RuntimeError("metric store broke: secret detail")


async def test_an_exception_in_an_outer_middleware_is_still_our_json_500(app, client, monkeypatch, caplog) -> None:
    """HotRoutes skips Starlette's ServerErrorMiddleware: an exception raised by the request-id middleware
    itself (outside InternalErrors) is our opaque JSON 500, with the request id, logged once."""
    import logging

    monkeypatch.setattr(app.state.mha.metrics.tally, "schedule", _broken_schedule)
    x = np.zeros((1, 3, 32), np.float32)
    body, headers = v2_binary(x)
    for path, kw, shape in (("/attend", {"json": b64_body(x)}, dict), (INFER, {"content": body}, str)):
        caplog.clear()
        extra = headers if path == INFER else {}
        r = await client.post(path, headers={**extra, "x-request-id": "broken-7"}, **kw)
        assert r.status_code == 500 and r.headers["content-type"] == "application/json", r.text
        assert r.headers["x-request-id"] == "broken-7"
        error = r.json()["error"]
        message = error["message"] if shape is dict else error
        assert isinstance(error, shape) and message.startswith("internal error (id ") and "secret" not in message
        if shape is dict:
            assert error["type"] == "internal_error"
        error_id = message.split("(id ")[1].split(")")[0]
        records = [rec for rec in caplog.records if rec.levelno >= logging.ERROR]
        assert len(records) == 1, records  # once
        assert records[0].error_id == error_id and "secret detail" in records[0].exc_text
        assert records[0].getMessage().startswith(f"internal error {error_id} on POST {path}")


async def test_an_exception_after_the_answer_is_logged_once_and_the_answer_stands(app, client, monkeypatch, caplog):
    import logging

    def broken(route, status, elapsed_s):
        raise RuntimeError("late")

    monkeypatch.setattr(app.state.mha.metrics.tally, "done", broken)  # in its finally: the response is out
    r = await client.post("/attend", json=b64_body(np.zeros((1, 3, 32), np.float32)))
    assert r.status_code == 200 and "output" in r.json() and r.headers["x-batch-size"] == "1"
    records = [rec for rec in caplog.records if rec.levelno >= logging.ERROR]
    assert len(records) == 1 and "late" in records[0].exc_text


@pytest.mark.parametrize("path", [INFER, "/attend"])
async def test_a_client_gone_mid_body_is_not_an_internal_error(app, client, path, caplog) -> None:
    """A client that disconnects while its body is read gets nothing (nobody is there) and logs no internal
    error on either hot route; the next request is served."""
    import logging

    x = np.random.default_rng(6).standard_normal((1, 4, 32), dtype=np.float32)
    if path == INFER:
        body, headers = v2_binary(x)
    else:
        body, headers = json.dumps(b64_body(x)).encode(), {"content-type": "application/json"}
    messages = [{"type": "http.request", "body": body[:10], "more_body": True}, {"type": "http.disconnect"}]
    sent: list = []

    async def receive() -> dict:
        return messages.pop(0)

    async def send(message) -> None:
        sent.append(message)

    scope = _post_scope(path, headers, body)
    caplog.set_level(logging.INFO)
    await asyncio.wait_for(app(scope, receive, send), 5)
    assert sent == [] and not messages
    assert not [r for r in caplog.records if r.levelno >= logging.ERROR], caplog.text
    assert (await client.post(path, content=body, headers=headers)).status_code == 200


def _post_scope(path: str, headers: dict, body: bytes) -> dict:
    """An HTTP POST's ASGI scope, as uvicorn makes it, for calling the app directly."""
    raw = [(k.lower().encode(), v.encode()) for k, v in {**headers, "content-length": str(len(body))}.items()]
    return {
        "type": "http", "asgi": {"version": "3.0"}, "http_version": "1.1", "method": "POST", "scheme": "http",
        "path": path, "raw_path": path.encode(), "query_string": b"", "root_path": "", "headers": raw,
        "client": ("127.0.0.1", 1), "server": ("test", 80),
    }  # fmt: skip

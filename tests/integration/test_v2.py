"""The Open Inference Protocol (KServe v2) routes, in-process through ASGI, with raw httpx."""

from __future__ import annotations

import asyncio
import gzip
import time
from typing import Any

import httpx
import numpy as np
import orjson
import pytest
import torch
from asgi_lifespan import LifespanManager

from service.app import create_app
from service.engine.runner import Runner
from service.frontend.codecs import bf16_to_f32, f32_to_bf16
from service.settings import Settings

from .conftest import TINY

rng = np.random.default_rng()
INFER = "/v2/models/mha/infer"
WIRE = {"FP32": "<f4", "FP16": "<f2", "BF16": "<u2", "INT32": "<i4", "INT64": "<i8", "BOOL": "u1"}


def direct(app, x, **kw):
    """The module run alone on this request: the reference for every response."""
    res = app.state.mha.engine.runner.module(torch.from_numpy(np.asarray(x, np.float32)), **kw)
    return res.output.numpy(), None if res.weights is None else res.weights.numpy()


def wire_bytes(arr: np.ndarray, datatype: str) -> bytes:
    if datatype == "BF16":
        return f32_to_bf16(arr).tobytes()
    return np.ascontiguousarray(arr, dtype=WIRE[datatype]).tobytes()


def received(arr: np.ndarray, datatype: str) -> np.ndarray:
    """What the server holds after decoding ``arr`` sent as ``datatype``."""
    if datatype == "BF16":
        return bf16_to_f32(f32_to_bf16(arr))
    return arr.astype(WIRE[datatype]).astype(np.float32)


def request(
    inputs: list[tuple[str, str, np.ndarray, bool]],
    outputs: list[tuple[str, bool | None]] | None = None,
    **extra: Any,
) -> tuple[bytes, dict[str, str]]:
    """A v2 body: JSON header, then the blobs of the inputs marked binary."""
    specs, blobs = [], []
    for name, datatype, arr, binary in inputs:
        spec: dict[str, Any] = {"name": name, "shape": list(arr.shape), "datatype": datatype}
        if binary:
            blobs.append(wire_bytes(arr, datatype))
            spec["parameters"] = {"binary_data_size": len(blobs[-1])}
        else:
            spec["data"] = arr.reshape(-1).tolist()
        specs.append(spec)
    head: dict[str, Any] = {"inputs": specs, **extra}
    if outputs is not None:
        head["outputs"] = [
            {"name": n} if b is None else {"name": n, "parameters": {"binary_data": b}} for n, b in outputs
        ]
    header = orjson.dumps(head)
    if not blobs:
        return header, {"content-type": "application/json"}
    return header + b"".join(blobs), {
        "content-type": "application/octet-stream",
        "inference-header-content-length": str(len(header)),
    }


def parse(r: httpx.Response) -> tuple[dict, dict[str, np.ndarray]]:
    """A v2 response -> (JSON header, float32 arrays by output name)."""
    assert r.status_code == 200, r.text
    hl = r.headers.get("inference-header-content-length")
    body = r.content
    if hl is None:
        assert r.headers["content-type"] == "application/json"
        head, rest = orjson.loads(body), b""
    else:
        assert r.headers["content-type"] == "application/octet-stream"
        head, rest = orjson.loads(body[: int(hl)]), body[int(hl) :]
    arrays, offset = {}, 0
    for out in head["outputs"]:
        size = out.get("parameters", {}).get("binary_data_size")
        if size is None:
            arr = np.array(out["data"], np.float32)
        else:
            arr = np.frombuffer(rest[offset : offset + size], WIRE[out["datatype"]])
            offset += size
            arr = bf16_to_f32(arr) if out["datatype"] == "BF16" else arr.astype(np.float32)
        arrays[out["name"]] = arr.reshape(out["shape"])
    assert offset == len(rest)
    return head, arrays


async def test_metadata_health_and_versions(client):
    assert (await client.get("/v2")).json() == {
        "name": "mha-serve",
        "version": "0.1.0",
        "extensions": [
            "binary_tensor_data",
            "model_configuration",
            "statistics",
            "parameters",
            "sequence",
            "sequence(string_id)",
        ],
    }
    assert (await client.get("/v2/health/live")).status_code == 200
    assert (await client.get("/v2/health/ready")).status_code == 200
    assert (await client.get("/v2/models/mha/ready")).json() == {"name": "mha", "ready": True}
    assert (await client.get("/v2/models/mha/versions/1/ready")).status_code == 200
    meta = (await client.get("/v2/models/mha")).json()
    assert meta == (await client.get("/v2/models/mha/versions/1")).json()
    assert meta["name"] == "mha" and meta["versions"] == ["1"]
    ins = {t["name"]: t for t in meta["inputs"]}
    assert ins["x"]["shape"] == [-1, -1, 32] and ins["x"]["parameters"]["datatypes"] == ["FP32", "FP16", "BF16"]
    assert ins["lengths"]["shape"] == [-1, 1] and ins["lengths"]["optional"] is True
    assert ins["attn_mask"]["datatype"] == "BOOL"
    outs = {t["name"]: t for t in meta["outputs"]}
    assert outs["output"]["shape"] == [-1, -1, 32] and outs["weights"]["shape"] == [-1, -1, -1, -1]
    assert meta["parameters"]["num_heads"] == 4
    for path in (
        "/v2/models/nope",
        "/v2/models/nope/ready",
        "/v2/models/mha/versions/2",
        "/v2/models/mha/versions/2/ready",
    ):
        r = await client.get(path)
        assert r.status_code == 404, path
        assert isinstance(r.json()["error"], str)
    r = await client.post("/v2/models/nope/infer", json={})
    want = {"error": "unknown model 'nope'; this server serves 'mha' and 'mha-seq'"}
    assert r.status_code == 404 and r.json() == want
    r = await client.post("/v2/models/mha/versions/2/infer", json={})
    assert r.status_code == 404 and "no version '2'" in r.json()["error"]
    r = await client.get("/v2/repository/index")
    assert r.status_code == 405 and r.json() == {"error": "/v2/repository/index does not accept GET"}
    r = await client.get("/v2/models/mha/metrics")
    assert r.status_code == 404 and r.json() == {"error": "no route GET /v2/models/mha/metrics"}
    r = await client.get(INFER)
    assert r.status_code == 405 and r.json() == {"error": "/v2/models/mha/infer does not accept GET"}
    assert "/v2/models/{name}/infer" in (await client.get("/openapi.json")).json()["paths"]


async def test_json_request_equals_module(app, client):
    x = rng.standard_normal((2, 10, 32)).astype(np.float32)
    lengths = np.array([10, 6], np.int32)
    body, headers = request(
        [("x", "FP32", x, False), ("lengths", "INT32", lengths, False)],
        [("output", None), ("weights", False)],
        id="req-7",
        parameters={"heads": "2,0"},
    )
    r = await client.post(INFER, content=body, headers=headers)
    head, got = parse(r)
    assert head["id"] == "req-7" and head["model_name"] == "mha" and head["model_version"] == "1"
    assert [o["datatype"] for o in head["outputs"]] == ["FP32", "FP32"]
    want, want_w = direct(app, x, lengths=[10, 6], need_weights=True, heads=[2, 0])
    np.testing.assert_allclose(got["output"], want, atol=1e-5)
    np.testing.assert_allclose(got["weights"], want_w, atol=1e-5)
    assert np.all(got["output"][1, 6:] == 0)
    assert float(r.headers["x-compute-time-ms"]) > 0 and r.headers["x-batch-size"] == "1"
    assert float(r.headers["x-queue-time-ms"]) >= 0


async def test_json_nested_data_and_only_output_by_default(app, client):
    x = rng.standard_normal((1, 4, 32)).astype(np.float32)
    spec = {"name": "x", "shape": [1, 4, 32], "datatype": "FP32", "data": x.tolist()}
    r = await client.post(INFER, json={"inputs": [spec], "parameters": {"causal": False}})
    head, got = parse(r)
    assert [o["name"] for o in head["outputs"]] == ["output"] and "id" not in head
    np.testing.assert_allclose(got["output"], direct(app, x, causal=False)[0], atol=1e-5)


@pytest.mark.parametrize(("datatype", "atol"), [("FP32", 1e-5), ("FP16", 3e-3), ("BF16", 3e-2)])
async def test_binary_request_answers_in_the_datatype_of_x(app, client, datatype, atol):
    x = rng.standard_normal((2, 9, 32)).astype(np.float32)
    lengths = np.array([9, 3], np.int64)
    body, headers = request(
        [("x", datatype, x, True), ("lengths", "INT64", lengths, True)],
        [("output", True), ("weights", False)],
        parameters={"heads": [1], "timeout_ms": 5000},
    )
    head, got = parse(await client.post("/v2/models/mha/versions/1/infer", content=body, headers=headers))
    assert [o["datatype"] for o in head["outputs"]] == [datatype, datatype]
    assert head["outputs"][0]["parameters"]["binary_data_size"] == 2 * 9 * 32 * (4 if datatype == "FP32" else 2)
    want, want_w = direct(app, received(x, datatype), lengths=[9, 3], need_weights=True, heads=[1])
    assert got["weights"].shape == (2, 1, 9, 9)
    np.testing.assert_allclose(got["output"], want, atol=atol, rtol=1e-2)
    np.testing.assert_allclose(got["weights"], want_w, atol=atol, rtol=1e-2)


async def test_binary_data_output_mask_and_gzip(app, client):
    x = rng.standard_normal((2, 6, 32)).astype(np.float32)
    mask = rng.random((2, 6, 6)) > 0.3
    mask[:, :, 0] = True
    body, headers = request(
        [("x", "FP32", x, True), ("attn_mask", "BOOL", mask, True)],
        parameters={"binary_data_output": True, "causal": False},
    )
    want, _ = direct(app, x, attn_mask=torch.from_numpy(mask), causal=False)
    head, got = parse(await client.post(INFER, content=body, headers=headers))
    assert head["outputs"][0]["parameters"]["binary_data_size"] == x.nbytes
    np.testing.assert_allclose(got["output"], want, atol=1e-5)
    zipped = {**headers, "content-encoding": "gzip"}
    _, got = parse(await client.post(INFER, content=gzip.compress(body), headers=zipped))
    np.testing.assert_allclose(got["output"], want, atol=1e-5)
    body, headers = request([("x", "FP32", x, False), ("attn_mask", "BOOL", mask[0], False)])  # JSON [T, T] mask
    _, got = parse(await client.post(INFER, content=body, headers=headers))
    np.testing.assert_allclose(got["output"], direct(app, x, attn_mask=torch.from_numpy(mask[0]))[0], atol=1e-5)


X = np.zeros((1, 3, 32), np.float32)
X_BIN, X_HDR = request([("x", "FP32", X, True)])


def _json(head: dict) -> tuple[bytes, dict[str, str]]:
    return orjson.dumps(head), {"content-type": "application/json"}


def _x_spec(**kw) -> dict:
    return {"name": "x", "shape": [1, 3, 32], "datatype": "FP32", "data": [0.0] * 96, **kw}


@pytest.mark.parametrize(
    ("body", "headers", "status", "message"),
    [
        (b"{", {}, 400, "not valid JSON"),
        (X_BIN, {**X_HDR, "inference-header-content-length": "abc"}, 400, "must be a non-negative integer"),
        (X_BIN, {**X_HDR, "inference-header-content-length": "-5"}, 400, "must be a non-negative integer"),
        (X_BIN, {**X_HDR, "inference-header-content-length": "100000"}, 400, "but the body has"),
        (X_BIN, {**X_HDR, "inference-header-content-length": "7"}, 400, "not valid JSON"),
        (X_BIN[:-4], X_HDR, 422, "add up to 384 bytes, but the body has 380 bytes after the"),
        (X_BIN + b"\0" * 4, X_HDR, 422, "add up to 384 bytes, but the body has 388 bytes"),
        (X_BIN, {"content-type": "application/octet-stream"}, 400, "not valid JSON"),
        (*request([("x", "FP32", np.zeros((1, 3, 31), np.float32), True)]), 422, "x has emb_size 31"),
        (*_json({"inputs": [_x_spec(datatype="INT8")]}), 422, "input 'x' has datatype 'INT8'; expected one of FP32"),
        (*_json({"inputs": [_x_spec(data=[0.0] * 95)]}), 422, "data has 95 elements, but shape [1, 3, 32] needs 96"),
        (*_json({"inputs": [_x_spec(shape=[3, 32], data=[0.0] * 96)]}), 422, "must have shape [B, T, E]"),
        (*_json({"inputs": [_x_spec(), {"name": "y", "shape": [1], "datatype": "FP32", "data": [1]}]}), 422, "'y'"),
        (*_json({"inputs": [_x_spec(), _x_spec()]}), 422, "input 'x' is given twice"),
        (*_json({"inputs": []}), 422, "inputs must be a non-empty list"),
        (
            *_json({"inputs": [{"name": "lengths", "shape": [1], "datatype": "INT64", "data": [3]}]}),
            422,
            "'x' is required",
        ),
        (*_json({"inputs": [_x_spec()], "outputs": [{"name": "attention"}]}), 422, "unknown output 'attention'"),
        (*_json({"inputs": [_x_spec()], "parameters": {"heads": [0]}}), 422, "needs the 'weights' output"),
        (*_json({"inputs": [_x_spec()], "parameters": {"causal": "yes"}}), 422, "parameters.causal must be a boolean"),
        (*_json({"inputs": [_x_spec()], "parameters": {"timeout_ms": -1}}), 422, "timeout_ms must be > 0"),
        (*_json({"inputs": [_x_spec(parameters={"binary_data_size": 384})]}), 422, "has both 'data' and binary"),
        (
            *_json({"inputs": [_x_spec(), {"name": "lengths", "shape": [1], "datatype": "INT64", "data": [1.5]}]}),
            422,
            "its data must be integers",
        ),
        (
            *_json({"inputs": [_x_spec(), {"name": "lengths", "shape": [1], "datatype": "INT64", "data": [9]}]}),
            422,
            "lengths[0] = 9 is out of range 1..3",
        ),
        (
            *_json(
                {"inputs": [_x_spec(), {"name": "attn_mask", "shape": [3, 3], "datatype": "BOOL", "data": [1] * 9}]}
            ),
            422,
            "attn_mask must contain only true/false values",
        ),
        (
            *_json(
                {"inputs": [_x_spec(), {"name": "attn_mask", "shape": [2, 2], "datatype": "BOOL", "data": [True] * 4}]}
            ),
            422,
            "attn_mask must have shape [3, 3] or [1, 3, 3]",
        ),
        (*request([("x", "FP32", np.full((1, 2, 32), np.nan, np.float32), True)]), 422, "non-finite"),
    ],
)
async def test_bad_requests_answer_the_protocol_error_and_the_server_keeps_serving(
    client, body, headers, status, message
):
    r = await client.post(INFER, content=body, headers=headers)
    assert r.status_code == status, r.text
    err = r.json()["error"]
    assert isinstance(err, str) and message in err, err
    _, got = parse(await client.post(INFER, content=X_BIN, headers=X_HDR))
    assert got["output"].shape == (1, 3, 32)


async def test_binary_size_that_does_not_match_the_shape_names_the_numbers(client):
    head = {"inputs": [{"name": "x", "shape": [1, 3, 32], "datatype": "FP16", "parameters": {"binary_data_size": 384}}]}
    header = orjson.dumps(head)
    r = await client.post(
        INFER, content=header + b"\0" * 384, headers={"inference-header-content-length": str(len(header))}
    )
    assert r.status_code == 422
    assert r.json() == {
        "error": "input 'x' has binary_data_size 384, but shape [1, 3, 32] of FP16 needs 96 x 2 = 192 bytes"
    }


@pytest.mark.parametrize("settings_kw", [{"max_body_bytes": 2048}])
async def test_body_limits_and_encodings(client):
    r = await client.post(INFER, content=b"x" * 4096, headers={"content-type": "application/octet-stream"})
    assert r.status_code == 413 and "max_body_bytes 2048" in r.json()["error"]
    bomb = gzip.compress(b" " * 100_000)
    r = await client.post(INFER, content=bomb, headers={"content-encoding": "gzip"})
    assert r.status_code == 413 and "inflated" in r.json()["error"]
    r = await client.post(INFER, content=b"{}", headers={"content-encoding": "br"})
    assert r.status_code == 415
    r = await client.post(INFER, content=b"not gzip", headers={"content-encoding": "gzip"})
    assert r.status_code == 400


async def test_not_ready_is_503(app, client):
    app.state.mha.ready = False
    try:
        for r in (await client.get("/v2/health/ready"), await client.get("/v2/models/mha/ready")):
            assert r.status_code == 503 and r.json() == {"error": "the model is not ready yet"}
        r = await client.post(INFER, content=X_BIN, headers=X_HDR)
        assert r.status_code == 503
        assert (await client.get("/v2/health/live")).status_code == 200
    finally:
        app.state.mha.ready = True


@pytest.fixture
async def slow_app(monkeypatch):
    """An app whose forward takes 50 ms longer and records each batch's sequence lengths."""
    batches: list[list[int]] = []
    run = Runner.run

    def slow_run(self, items):
        batches.append([it.seq_len for it in items])
        time.sleep(0.05)
        return run(self, items)

    monkeypatch.setattr(Runner, "run", slow_run)
    app = create_app(settings=Settings(**{**TINY, "max_queue_requests": 8}))
    app.state.batches = batches
    transport = httpx.ASGITransport(app=app)
    async with LifespanManager(app), httpx.AsyncClient(transport=transport, base_url="http://test") as c:
        yield app, c


async def test_v2_and_attend_requests_share_batches(slow_app):
    app, client = slow_app
    xs = [rng.standard_normal((1, 5 if i % 2 else 7, 32)).astype(np.float32) for i in range(8)]

    async def send(i, x):
        if i % 2:  # v2 binary, T = 5
            body, headers = request([("x", "FP32", x, True)], [("output", True)])
            return parse(await client.post(INFER, content=body, headers=headers))[1]["output"]
        r = await client.post("/attend", json={"x": x.tolist()})  # /attend, T = 7
        assert r.status_code == 200, r.text
        return np.array(r.json()["output"], np.float32)

    outs = await asyncio.gather(*(send(i, x) for i, x in enumerate(xs)))
    for x, got in zip(xs, outs, strict=True):
        np.testing.assert_allclose(got, direct(app, x)[0], atol=1e-5)
    assert any({5, 7} <= set(b) for b in app.state.batches), app.state.batches
    metrics = (await client.get("/metrics")).text
    assert 'mha_requests_total{route="/v2",status="200"} 4.0' in metrics


async def test_overloaded_is_429_and_deadline_is_504(slow_app):
    _, client = slow_app
    body, headers = request([("x", "FP32", X, True)])
    rs = await asyncio.gather(*(client.post(INFER, content=body, headers=headers) for _ in range(12)))
    codes = sorted(r.status_code for r in rs)
    assert 429 in codes and 200 in codes, codes
    busy = next(r for r in rs if r.status_code == 429)
    assert int(busy.headers["retry-after"]) >= 1 and "queue is full" in busy.json()["error"]

    late, late_headers = request([("x", "FP32", X, True)], parameters={"timeout_ms": 20})
    rs = await asyncio.gather(
        client.post(INFER, content=body, headers=headers),
        client.post(INFER, content=late, headers=late_headers),
    )
    assert rs[1].status_code == 504 and "deadline" in rs[1].json()["error"], rs[1].text


async def test_a_failing_forward_is_an_opaque_500_and_the_server_keeps_serving(monkeypatch):
    run = Runner.run

    def failing(self, items):
        if any(it.seq_len == 13 for it in items):
            raise RuntimeError("secret internals")
        return run(self, items)

    monkeypatch.setattr(Runner, "run", failing)
    app = create_app(settings=Settings(**TINY))
    transport = httpx.ASGITransport(app=app)
    async with LifespanManager(app), httpx.AsyncClient(transport=transport, base_url="http://test") as client:
        body, headers = request([("x", "FP32", np.ones((1, 13, 32), np.float32), True)])
        r = await client.post(INFER, content=body, headers=headers)
        assert r.status_code == 500
        assert r.json()["error"].startswith("internal error (id ") and "secret" not in r.text
        _, got = parse(await client.post(INFER, content=X_BIN, headers=X_HDR))
        assert got["output"].shape == (1, 3, 32)


# -- repeated headers (service.frontend.v2.HeaderPlans) ---------------------------------------------


def _header(body: bytes, headers: dict[str, str]) -> bytes:
    return body[: int(headers["inference-header-content-length"])]


async def test_a_repeated_header_answers_each_request_with_its_own_values(app, client):
    first = None
    for _ in range(4):  # the same JSON header every time; only the tensors differ
        x = rng.standard_normal((2, 5, 32)).astype(np.float32)
        lengths = rng.integers(1, 6, 2).astype(np.int32)
        body, headers = request(
            [("x", "FP32", x, True), ("lengths", "INT32", lengths, True)],
            [("output", True), ("weights", True)],
            id="same",
            parameters={"heads": [1, 3], "causal": False},
        )
        first = first or _header(body, headers)
        assert _header(body, headers) == first
        head, got = parse(await client.post(INFER, content=body, headers=headers))
        assert head["id"] == "same" and [o["shape"] for o in head["outputs"]] == [[2, 5, 32], [2, 2, 5, 5]]
        want, want_w = direct(app, x, lengths=lengths.tolist(), need_weights=True, heads=[1, 3], causal=False)
        np.testing.assert_allclose(got["output"], want, atol=1e-5)
        np.testing.assert_allclose(got["weights"], want_w, atol=1e-5)


async def test_a_bad_request_gets_the_same_message_whether_its_header_is_known_or_not(client):
    x = rng.standard_normal((1, 4, 32)).astype(np.float32)
    bad_header = request([("x", "FP32", x, True)], [("output", True)], parameters={"heads": [0]})
    answers = [await client.post(INFER, content=bad_header[0], headers=bad_header[1]) for _ in range(2)]
    assert [r.status_code for r in answers] == [422, 422]
    assert (
        answers[0].json()
        == answers[1].json()
        == {"error": "parameters.heads selects weights: it needs the 'weights' output in outputs"}
    )
    # value faults: told the same before the header is known (first) and after (two good requests taught it)
    nan = x.copy()
    nan[0, 2, 7] = np.nan
    mask = np.ones((4, 4), np.uint8)
    mask[1, 2] = 2
    for faulty, message in (
        ([("x", "FP32", nan, True)], "x contains 1 non-finite value(s) (NaN or Inf), the first at [0, 2, 7]"),
        ([("x", "FP32", nan, True), ("attn_mask", "BOOL", mask, True)], "attn_mask bool bytes must be 0 or 1"),
    ):
        body, headers = request(faulty)
        good = request([(n, d, x if n == "x" else np.ones((4, 4), bool), b) for n, d, _, b in faulty])
        assert _header(*good) == _header(body, headers)
        for send in (body, good[0], good[0], body):
            r = await client.post(INFER, content=send, headers=headers)
            if send is body:
                assert r.status_code == 422 and r.json() == {"error": message}
            else:
                assert r.status_code == 200


def _respaced(body: bytes, headers: dict[str, str], old: bytes, new: bytes) -> tuple[bytes, dict[str, str]]:
    """The request with ``old`` in its JSON header replaced by ``new``."""
    header = _header(body, headers)
    assert header.count(old) == 1
    respaced = header.replace(old, new)
    return respaced + body[len(header) :], {**headers, "inference-header-content-length": str(len(respaced))}


async def test_headers_that_differ_in_one_place_are_not_confused(app, client):
    """Same header length, same body length: a plan looked up by the lengths alone would answer wrongly."""
    a = rng.standard_normal((1, 4, 32)).astype(np.float32)
    b = rng.standard_normal((2, 2, 32)).astype(np.float32)
    one = request([("x", "FP32", a, True)], [("output", True)], id="a")
    two = request([("x", "FP32", b, True)], [("output", True)], id="a")
    three = _respaced(*request([("x", "FP32", a, True)], [("output", True)], id="b"), b"true}", b"false}")
    one = _respaced(*one, b"true}", b"true }")  # JSON allows the space: now as long as "false"
    two = _respaced(*two, b"true}", b"true }")
    assert len({len(r[0]) for r in (one, two, three)}) == 1
    assert len({_header(*r) for r in (one, two, three)}) == 3
    for _ in range(3):  # seen, remembered, answered from the plans
        for (body, headers), x, rid, binary in ((one, a, "a", True), (two, b, "a", True), (three, a, "b", False)):
            r = await client.post(INFER, content=body, headers=headers)
            head, got = parse(r)
            assert head["id"] == rid and head["outputs"][0]["shape"] == list(x.shape)
            assert ("inference-header-content-length" in r.headers) is binary
            np.testing.assert_allclose(got["output"], direct(app, x)[0], atol=1e-5)


async def test_the_remembered_headers_stay_bounded(app, monkeypatch):
    from service.frontend import v2

    made = []

    class Spy(v2.HeaderPlans):
        def __init__(self, *args: Any, **kw: Any) -> None:
            super().__init__(*args, **kw)
            made.append(self)

    monkeypatch.setattr(v2, "PLAN_CACHE_SIZE", 4)
    monkeypatch.setattr(v2, "HeaderPlans", Spy)
    small = create_app(settings=Settings(**TINY))
    transport = httpx.ASGITransport(app=small)
    async with LifespanManager(small), httpx.AsyncClient(transport=transport, base_url="http://test") as client:
        (plans,) = made
        for n, i in enumerate(range(10)):  # more distinct headers than the capacity, each sent twice
            for _ in range(2):
                x = rng.standard_normal((1, 3, 32)).astype(np.float32)
                body, headers = request([("x", "FP32", x, True)], [("output", True)], id=f"r{i}")
                head, got = parse(await client.post(INFER, content=body, headers=headers))
                assert head["id"] == f"r{i}"
                np.testing.assert_allclose(got["output"], direct(small, x)[0], atol=1e-5)
            assert len(plans) == min(n + 1, 4)


@pytest.mark.parametrize("planned", [False, True], ids=["first", "remembered"])
@pytest.mark.parametrize("batch", [1, 9], ids=["small", "large"])
async def test_a_binary_output_is_sent_from_its_array_without_a_join(app, planned, batch):
    """A large answer: the response's JSON header, then the output's bytes as a view of the answer's own array (no
    copy into one body); a small one (under httputil.SEND_PARTS_FROM): one body, one send. Either way a content-length
    that counts both, and a client reads the same bytes as before."""
    from service.frontend.httputil import SEND_PARTS_FROM

    x = rng.standard_normal((batch, 64, 32)).astype(np.float32)
    body, headers = request([("x", "FP32", x, True)], [("output", True)])
    want = direct(app, x)[0]
    for _ in range(3 if planned else 1):  # a header seen twice has a plan (its answer's header written once)
        sent: list[dict] = []
        chunks = iter([{"type": "http.request", "body": body[:100], "more_body": True},
                       {"type": "http.request", "body": body[100:]}])  # fmt: skip

        async def receive(chunks=chunks) -> dict:
            return next(chunks, {"type": "http.disconnect"})

        async def send(message: dict, sent=sent) -> None:
            sent.append(message)

        scope = {
            "type": "http",
            "asgi": {"version": "3.0"},
            "http_version": "1.1",
            "method": "POST",
            "scheme": "http",
            "path": INFER,
            "raw_path": INFER.encode(),
            "query_string": b"",
            "root_path": "",
            "headers": [(k.encode(), v.encode()) for k, v in headers.items()]
            + [(b"content-length", str(len(body)).encode()), (b"host", b"test")],
            "client": ("127.0.0.1", 1),
            "server": ("127.0.0.1", 80),
            "state": {},
        }
        await app(scope, receive, send)
    start, *parts = sent
    assert start["status"] == 200
    got_headers = dict(start["headers"])
    head_len = int(got_headers[b"inference-header-content-length"])
    payload = b"".join(p["body"] for p in parts)
    assert int(got_headers[b"content-length"]) == len(payload) == head_len + x.nbytes
    assert [p.get("more_body", False) for p in parts] == [True] * (len(parts) - 1) + [False]
    blob = parts[-1]["body"]
    if x.nbytes >= SEND_PARTS_FROM:
        assert isinstance(blob, memoryview) and blob.nbytes == x.nbytes  # the array's memory, not a joined copy
    else:
        assert len(parts) == 1 and isinstance(blob, bytes)  # header and blob joined: one send
    head = orjson.loads(payload[:head_len])
    assert head["outputs"][0]["parameters"]["binary_data_size"] == x.nbytes
    np.testing.assert_allclose(np.frombuffer(payload[head_len:], "<f4").reshape(x.shape), want, atol=1e-5, rtol=1e-4)

"""POST /attend and the other routes, in-process through ASGI."""

from __future__ import annotations

import asyncio
import base64

import numpy as np
import pytest
import torch

from service.frontend.codecs import bf16_to_f32, f32_to_bf16

rng = np.random.default_rng()


def module(app):
    return app.state.mha.engine.runner.module


def direct(app, x, **kw):
    """The module run alone on this request: the reference for every response."""
    res = module(app)(torch.from_numpy(np.asarray(x, np.float32)), **kw)
    return res.output.numpy(), None if res.weights is None else res.weights.numpy()


def b64(x: np.ndarray, dtype="float32") -> dict:
    raw = f32_to_bf16(x).tobytes() if dtype == "bfloat16" else x.astype(dtype).tobytes()
    return {"dtype": dtype, "shape": list(x.shape), "b64": base64.b64encode(raw).decode()}


def from_b64(obj) -> np.ndarray:
    raw = base64.b64decode(obj["b64"])
    if obj["dtype"] == "bfloat16":
        return bf16_to_f32(np.frombuffer(raw, "<u2")).reshape(obj["shape"])
    return np.frombuffer(raw, obj["dtype"]).reshape(obj["shape"]).astype(np.float32)


async def test_lists_request_equals_module(app, client):
    x = rng.standard_normal((2, 10, 32)).astype(np.float32)
    r = await client.post(
        "/attend", json={"x": x.tolist(), "lengths": [10, 6], "return_weights": True, "heads": [2, 0]}
    )
    assert r.status_code == 200, r.text
    body = r.json()
    want, want_w = direct(app, x, lengths=[10, 6], need_weights=True, heads=[2, 0])
    np.testing.assert_allclose(np.array(body["output"]), want, atol=1e-6)
    np.testing.assert_allclose(np.array(body["weights"]), want_w, atol=1e-6)
    assert np.all(np.array(body["output"])[1, 6:] == 0)
    assert body["model"]["num_heads"] == 4 and body["model"]["checksum"].startswith("sha256:")
    assert float(r.headers["x-compute-time-ms"]) > 0
    assert float(r.headers["x-queue-time-ms"]) >= 0
    assert r.headers["x-batch-size"] == "1"
    assert r.headers["x-served-by"] == "test-replica"


@pytest.mark.parametrize(("dtype", "atol"), [("float32", 1e-6), ("float16", 2e-3), ("bfloat16", 2e-2)])
async def test_base64_request_answers_in_its_dtype(app, client, dtype, atol):
    x = rng.standard_normal((1, 7, 32)).astype(np.float32)
    r = await client.post("/attend", json={"x": b64(x, dtype), "causal": False})
    assert r.status_code == 200, r.text
    out = r.json()["output"]
    assert out["dtype"] == dtype and out["shape"] == [1, 7, 32]
    sent = from_b64(b64(x, dtype))  # what the server actually received
    want, _ = direct(app, sent, causal=False)
    np.testing.assert_allclose(from_b64(out), want, atol=atol, rtol=1e-2)


async def test_response_encoding_override_and_mask(app, client):
    x = rng.standard_normal((2, 5, 32)).astype(np.float32)
    mask = rng.random((2, 5, 5)) > 0.3
    mask[:, :, 0] = True
    body = {
        "x": x.tolist(),
        "attn_mask": b64(mask.astype(np.uint8), "uint8") | {"dtype": "bool"},
        "response_encoding": "base64",
        "return_weights": True,
    }
    r = await client.post("/attend", json=body)
    assert r.status_code == 200, r.text
    want, want_w = direct(app, x, attn_mask=torch.from_numpy(mask), need_weights=True)
    np.testing.assert_allclose(from_b64(r.json()["output"]), want, atol=1e-6)
    np.testing.assert_allclose(from_b64(r.json()["weights"]), want_w, atol=1e-6)


async def test_concurrent_mixed_requests_are_batched_and_each_equals_module_alone(app, client):
    reqs = []
    for i in range(24):
        T = int(rng.integers(1, 65))
        B = int(rng.integers(1, 3))
        req = {"x": rng.standard_normal((B, T, 32)).astype(np.float32)}
        if i % 3 == 0:
            req["lengths"] = [int(n) for n in rng.integers(1, T + 1, size=B)]
        if i % 4 == 0:
            req["return_weights"] = True
        if i % 5 == 0:
            req["causal"] = False
        reqs.append(req)

    async def send(req):
        body = {k: (v.tolist() if isinstance(v, np.ndarray) else v) for k, v in req.items()}
        return await client.post("/attend", json=body)

    responses = await asyncio.gather(*(send(r) for r in reqs))
    sizes = []
    for req, r in zip(reqs, responses, strict=True):
        assert r.status_code == 200, r.text
        sizes.append(int(r.headers["x-batch-size"]))
        kw = {
            "lengths": req.get("lengths"),
            "causal": req.get("causal"),
            "need_weights": req.get("return_weights", False),
        }
        want, want_w = direct(app, req["x"], **kw)
        np.testing.assert_allclose(np.array(r.json()["output"]), want, atol=1e-5, rtol=0)
        if want_w is not None:
            np.testing.assert_allclose(np.array(r.json()["weights"]), want_w, atol=1e-5, rtol=0)
    assert max(sizes) > 1, sizes  # some requests shared a forward pass
    metrics = (await client.get("/metrics")).text
    assert "mha_batch_size_requests_bucket" in metrics
    assert 'mha_requests_total{route="/attend",status="200"} 24.0' in metrics


@pytest.mark.parametrize(
    ("body", "status", "type_", "message"),
    [
        (b"{", 400, "malformed_json", "not valid JSON"),
        (b'{"x": [[[1, 2]]]}', 422, "validation_error", "x has emb_size 2 (shape [1, 1, 2]), but the model expects 32"),
        (b'{"x": [[[0.5]]], "foo": 1}', 422, "validation_error", "unknown field 'foo'"),
        (b'{"x": [[[0.5]]], "timeout_ms": -1}', 422, "validation_error", "timeout_ms must be > 0"),
    ],
)
async def test_bad_requests_get_clear_errors_and_the_server_keeps_serving(client, body, status, type_, message):
    r = await client.post("/attend", content=body, headers={"content-type": "application/json"})
    assert r.status_code == status
    err = r.json()["error"]
    assert err["type"] == type_ and message in err["message"]
    ok = await client.post("/attend", json={"x": [[[0.1] * 32]]})
    assert ok.status_code == 200


@pytest.mark.parametrize("settings_kw", [{"max_body_bytes": 2048}])
async def test_body_over_the_limit_is_413_before_parsing(client):
    r = await client.post("/attend", content=b"x" * 4096, headers={"content-type": "application/json"})
    assert r.status_code == 413
    assert r.json()["error"] == {
        "type": "payload_too_large",
        "message": "the body is 4096 bytes, more than max_body_bytes 2048",
    }

    async def chunks():  # no content-length: the limit holds while streaming
        for _ in range(4):
            yield b"[" * 1024

    r = await client.post("/attend", content=chunks(), headers={"content-type": "application/json"})
    assert r.status_code == 413


async def test_routes_and_errors_share_one_body_shape(client):
    assert (await client.get("/healthz")).json() == {"status": "alive"}
    assert (await client.get("/readyz")).json() == {"status": "ready"}
    r = await client.get("/nope")
    assert r.status_code == 404 and r.json()["error"]["type"] == "not_found"
    r = await client.get("/attend")
    assert r.status_code == 405 and r.json()["error"] == {
        "type": "method_not_allowed",
        "message": "/attend does not accept GET",
    }
    r = await client.post("/attend", content=b"a=1", headers={"content-type": "application/x-www-form-urlencoded"})
    assert r.status_code == 415


async def test_model_description(client):
    info = (await client.get("/v1/model")).json()
    assert {k: info[k] for k in ("name", "num_heads", "emb_size", "head_size", "max_seq_len", "causal")} == {
        "name": "mha",
        "num_heads": 4,
        "emb_size": 32,
        "head_size": 8,
        "max_seq_len": 64,
        "causal": True,
    }
    assert info["device"] == "cpu" and info["dtype"] == "float32"
    assert info["batching"]["max_batch_size"] == 32
    assert info["limits"]["max_request_batch"] == 32


async def test_openapi_documents_the_contract(client):
    spec = (await client.get("/openapi.json")).json()
    attend = spec["paths"]["/attend"]["post"]
    assert (
        attend["requestBody"]["content"]["application/json"]["schema"]["$ref"] == "#/components/schemas/AttendRequest"
    )
    assert {"200", "400", "413", "415", "422", "429", "500", "503", "504"} <= set(attend["responses"])
    props = spec["components"]["schemas"]["AttendRequest"]["properties"]
    assert {
        "x",
        "lengths",
        "causal",
        "attn_mask",
        "return_weights",
        "heads",
        "timeout_ms",
        "response_encoding",
        "priority",
        "sequence",
    } == set(props)
    seq = spec["components"]["schemas"]["SequenceParams"]["properties"]
    assert set(seq) == {"id", "start", "end"} and "unsigned 64-bit" in seq["id"]["description"]
    assert (await client.get("/docs")).status_code == 200


async def test_not_ready_is_503():
    from service.app import create_app
    from service.settings import Settings

    from .conftest import TINY

    app = create_app(settings=Settings(**TINY))
    import httpx

    async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://t") as c:
        r = await c.get("/readyz")  # lifespan not run: nothing loaded
        assert r.status_code == 503 and r.json()["error"]["type"] == "unavailable"
        r = await c.post("/attend", json={"x": [[[0.0] * 32]]})
        assert r.status_code == 503


async def test_repeated_base64_bodies_answer_each_its_own_x(app, client):
    """Bodies that differ only in x's base64 text are decoded from a plan after the second (BodyPlans):
    each still answers for its own x, and a bad one gets the full decode's error."""
    fields = {"lengths": [7, 3], "return_weights": True, "heads": [1], "timeout_ms": 5000.0}
    for _ in range(4):
        x = rng.standard_normal((2, 7, 32)).astype(np.float32)
        r = await client.post("/attend", json={"x": b64(x), **fields})
        assert r.status_code == 200, r.text
        want, want_w = direct(app, x, lengths=[7, 3], need_weights=True, heads=[1])
        np.testing.assert_allclose(from_b64(r.json()["output"]), want, atol=1e-6)
        np.testing.assert_allclose(from_b64(r.json()["weights"]), want_w, atol=1e-6)
    assert len(app.state.mha.offload.plans) == 1
    x[1, 2, 3] = np.nan
    r = await client.post("/attend", json={"x": b64(x), **fields})
    assert r.status_code == 422
    assert r.json()["error"]["message"] == "x contains 1 non-finite value(s) (NaN or Inf), the first at [1, 2, 3]"

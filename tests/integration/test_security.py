"""API keys, CORS, request ids, structured logs, JSON depth."""

from __future__ import annotations

import json
import logging

import pytest

from service.frontend.observability import ApiKeys
from service.logs import JsonFormatter, request_id_var

X = {"x": [[[0.25] * 32] * 3]}


@pytest.mark.parametrize("settings_kw", [{"api_keys": "k-one,k-two"}])
async def test_api_keys(client):
    r = await client.post("/attend", json=X)
    assert r.status_code == 401
    assert r.headers["www-authenticate"].startswith("Bearer")
    assert r.json() == {
        "error": {"type": "unauthorized", "message": "missing or invalid API key: send Authorization: Bearer <key>"}
    }
    for bad in ("Bearer k-three", "Bearer ", "Basic k-one", "k-one", "Bearer k-one-and-more"):
        r = await client.post("/attend", json=X, headers={"authorization": bad})
        assert r.status_code == 401, bad
        assert "invalid API key" in r.json()["error"]["message"]  # the same answer, whatever was wrong
    for good in ("Bearer k-one", "bearer k-two"):
        assert (await client.post("/attend", json=X, headers={"authorization": good})).status_code == 200
    assert (await client.get("/v1/model")).status_code == 401
    for open_path in ("/healthz", "/readyz", "/metrics", "/openapi.json"):
        assert (await client.get(open_path)).status_code == 200, open_path
    r = await client.post("/v2/models/mha/infer", json={})
    assert r.status_code == 401 and r.json() == {
        "error": "missing or invalid API key: send Authorization: Bearer <key>"
    }


@pytest.mark.parametrize("settings_kw", [{"api_keys": "secret", "protect_metrics": True}])
async def test_metrics_can_be_protected(client):
    assert (await client.get("/metrics")).status_code == 401
    assert (await client.get("/metrics", headers={"authorization": "Bearer secret"})).status_code == 200
    assert (await client.get("/healthz")).status_code == 200


def test_api_key_check_compares_every_key():
    keys = ApiKeys(["a" * 32, "b" * 32])
    assert keys.check(b"Bearer " + b"b" * 32)
    assert not keys.check(b"Bearer " + b"a" * 31)
    assert not keys.check(None)
    assert not ApiKeys([])


async def test_cors_is_off_by_default(client):
    r = await client.options("/attend", headers={"origin": "http://a.example", "access-control-request-method": "POST"})
    assert "access-control-allow-origin" not in r.headers


@pytest.mark.parametrize("settings_kw", [{"cors_origins": "http://a.example"}])
async def test_cors_when_configured(client):
    r = await client.options("/attend", headers={"origin": "http://a.example", "access-control-request-method": "POST"})
    assert r.headers["access-control-allow-origin"] == "http://a.example"
    r = await client.options(
        "/attend", headers={"origin": "http://evil.example", "access-control-request-method": "POST"}
    )
    assert "access-control-allow-origin" not in r.headers


@pytest.mark.parametrize("settings_kw", [{"api_keys": "k-one"}])
async def test_of_repeated_request_id_and_authorization_headers_the_last_counts(client):
    r = await client.post(
        "/attend",
        json=X,
        headers=[("x-request-id", "first-1"), ("authorization", "Bearer wrong"), ("x-request-id", "second-2"),
                 ("authorization", "Bearer k-one")],
    )  # fmt: skip
    assert r.status_code == 200 and r.headers["x-request-id"] == "second-2"
    r = await client.post(
        "/attend", json=X, headers=[("authorization", "Bearer k-one"), ("authorization", "Bearer wrong")]
    )
    assert r.status_code == 401


async def test_request_id_is_echoed_or_generated(client, caplog):
    caplog.set_level(logging.INFO, logger="mha_serve.access")
    r = await client.post("/attend", json=X, headers={"x-request-id": "abc-123"})
    assert r.headers["x-request-id"] == "abc-123"
    gen = (await client.get("/healthz", headers={"x-request-id": "bad id with spaces"})).headers["x-request-id"]
    assert len(gen) == 32 and gen != "bad id with spaces"
    rec = next(r for r in caplog.records if getattr(r, "path", None) == "/attend")
    assert (rec.method, rec.status) == ("POST", 200) and rec.duration_ms > 0
    line = json.loads(JsonFormatter().format(rec))
    assert line["status"] == 200 and line["path"] == "/attend" and line["logger"] == "mha_serve.access"


def test_json_formatter_carries_request_id_and_exceptions():
    token = request_id_var.set("rid-7")
    try:
        try:
            raise ValueError("boom")
        except ValueError:
            rec = logging.getLogger("t").makeRecord("t", logging.ERROR, "f", 1, "failed %s", ("x",), exc_info=True)
            import sys

            rec.exc_info = sys.exc_info()
        line = json.loads(JsonFormatter().format(rec))
    finally:
        request_id_var.reset(token)
    assert line["msg"] == "failed x" and line["request_id"] == "rid-7" and line["level"] == "error"
    assert "ValueError: boom" in line["exc"]


async def test_unexpected_error_is_opaque_500_with_an_id_in_the_log(app, client, caplog, monkeypatch):
    def broken(items):
        raise RuntimeError("secret internals /etc/passwd")

    monkeypatch.setattr(app.state.mha.engine.batcher, "_run_fn", broken)
    r = await client.post("/attend", json=X, headers={"x-request-id": "req-500"})
    assert r.status_code == 500
    msg = r.json()["error"]["message"]
    assert "secret" not in msg and "RuntimeError" not in msg
    error_id = msg.split("(id ")[1].split(")")[0]
    logged = [rec for rec in caplog.records if getattr(rec, "error_id", None) == error_id]
    assert logged and "secret internals" in logged[0].exc_text
    monkeypatch.undo()
    assert (await client.post("/attend", json=X)).status_code == 200  # still serving


async def test_json_nested_too_deep_is_a_clear_400(client):
    body = b'{"x": ' + b"[" * 2000 + b"]" * 2000 + b"}"
    r = await client.post("/attend", content=body, headers={"content-type": "application/json"})
    assert r.status_code == 400
    assert r.json()["error"]["message"] == "the body nests JSON deeper than the limit of 1024 levels"
    r = await client.post("/attend", content=b'{"x": ' + b"[" * 10 + b"1" + b"]" * 10 + b"}")
    assert r.status_code == 422 and "x must have 3 dimensions, got 10" in r.json()["error"]["message"]


@pytest.mark.parametrize("settings_kw", [{"cors_origins": "http://a.example", "api_keys": "k"}])
async def test_cors_preflight_needs_no_key(client):
    r = await client.options(
        "/attend",
        headers={
            "origin": "http://a.example",
            "access-control-request-method": "POST",
            "access-control-request-headers": "authorization",
        },
    )
    assert r.status_code == 200 and r.headers["access-control-allow-origin"] == "http://a.example"
    assert (await client.post("/attend", json=X, headers={"origin": "http://a.example"})).status_code == 401

"""Every answer carries x-request-id, 500s included; an error is logged once, with the id, and its traceback once.

Before: an exception that escaped a route was answered by Starlette's outermost middleware (outside
the request-id middleware): no x-request-id on the 500, no request id on the log line, and uvicorn
logged the same traceback a second time ("Exception in ASGI application").
"""

from __future__ import annotations

import json
import os
import textwrap
from pathlib import Path

import httpx
import numpy as np

from .conftest import start_server

# Loaded by Python at start-up (sitecustomize on PYTHONPATH): a body holding "boom" makes /attend's
# decoding raise an exception no handler expects, as a bug would.
SITECUSTOMIZE = textwrap.dedent(
    """
    import service.frontend.decode as _d

    _orig = _d.decode_attend

    def _decode_attend(body, *args, **kwargs):
        if b'"boom"' in bytes(body):
            raise RuntimeError("boom: an unexpected bug")
        return _orig(body, *args, **kwargs)

    _d.decode_attend = _decode_attend
    """
)


def log_lines(server) -> list[dict]:
    out = []
    for line in server.log().splitlines():
        try:
            out.append(json.loads(line))
        except ValueError:
            out.append({"raw": line})
    return out


def test_request_id_on_every_answer_and_one_log_line_per_error(tmp_path):
    (tmp_path / "sitecustomize.py").write_text(SITECUSTOMIZE)
    path = os.pathsep.join([str(Path(__file__).parents[2]), str(tmp_path)])  # this checkout's service, then the patch
    server = start_server(tmp_path, {"PYTHONPATH": path, "MHA_FAULT_INJECTION": "true"})
    x = np.random.default_rng().standard_normal((1, 3, 32)).astype(np.float32).tolist()
    try:
        with httpx.Client(base_url=server.url, timeout=30) as c:
            # an exception escaping the route
            r = c.post("/attend", json={"x": x, "note": "boom"}, headers={"x-request-id": "rid-escape-1"})
            assert r.status_code == 500 and r.headers["x-request-id"] == "rid-escape-1"
            assert r.headers["x-served-by"]
            msg = r.json()["error"]["message"]
            assert r.json()["error"]["type"] == "internal_error" and "boom" not in msg
            escape_id = msg.split("(id ")[1].split(")")[0]
            # a failing forward pass (fault injection), on both protocols
            r = c.post("/attend", json={"x": x}, headers={"x-request-id": "rid-fault-2", "x-mha-fault": "raise"})
            assert r.status_code == 500 and r.headers["x-request-id"] == "rid-fault-2"
            v2 = {"inputs": [{"name": "x", "datatype": "FP32", "shape": [1, 3, 32], "data": x}]}
            r = c.post("/v2/models/mha/infer", json=v2, headers={"x-request-id": "rid-v2-3", "x-mha-fault": "raise"})
            assert r.status_code == 500 and r.headers["x-request-id"] == "rid-v2-3"
            assert r.json()["error"].startswith("internal error (id ")
            # 4xx, and a fresh id when the client sends none
            for method, path, body, status in (
                ("POST", "/attend", {"x": [[["1.5"]]]}, 422),
                ("POST", "/attend", None, 400),
                ("GET", "/nope", None, 404),
                ("GET", "/attend", None, 405),
            ):
                r = c.request(method, path, json=body, headers={"x-request-id": f"rid-{status}"})
                assert r.status_code == status and r.headers["x-request-id"] == f"rid-{status}", (path, r.text)
            fresh = c.post("/attend", content=b"{", headers={"content-type": "application/json"})
            assert fresh.status_code == 400 and len(fresh.headers["x-request-id"]) == 32
            assert c.post("/attend", json={"x": x}).status_code == 200  # still serving
    finally:
        server.stop()
    lines = log_lines(server)
    text = server.log()
    assert "Exception in ASGI application" not in text
    for rid, needle in (
        ("rid-escape-1", "RuntimeError: boom: an unexpected bug"),
        ("rid-fault-2", "InjectedFault: injected fault"),
        ("rid-v2-3", "InjectedFault: injected fault"),
    ):
        errors = [ln for ln in lines if ln.get("level") == "error" and ln.get("request_id") == rid]
        assert len(errors) == 1, (rid, errors)
        assert errors[0]["msg"].startswith("internal error ") and needle in errors[0]["exc"]
        assert sum(ln.get("request_id") == rid for ln in lines) == 2  # the error line and the access line
    assert escape_id in text and text.count("RuntimeError: boom: an unexpected bug") == 1  # the traceback once
    access = [ln for ln in lines if ln.get("logger") == "mha_serve.access" and ln.get("request_id") == "rid-escape-1"]
    assert len(access) == 1 and access[0]["status"] == 500

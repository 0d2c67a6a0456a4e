"""What Triton's tools read besides infer: model config, statistics, repository index, protocol details."""

from __future__ import annotations

import numpy as np
import pytest
from google.protobuf import json_format

from service.frontend.triton_proto import grpc_service_pb2 as pb
from service.frontend.triton_proto import model_config_pb2 as mc

from .test_v2 import INFER, request

rng = np.random.default_rng()


@pytest.fixture
def settings_kw() -> dict:
    return {"max_request_batch": 5, "max_wait_ms": 2.0, "max_queue_requests": 9, "default_timeout_ms": 7000}


async def test_config_is_tritons_model_config(client):
    r = await client.get("/v2/models/mha/config")
    assert r.status_code == 200
    cfg = r.json()
    assert cfg == (await client.get("/v2/models/mha/versions/1/config")).json()
    msg = json_format.ParseDict(cfg, mc.ModelConfig())  # the exact field names and enums of model_config.proto
    assert msg.name == "mha" and msg.max_batch_size == 5  # the batch is the first dimension: dims leave it out
    ins = {t.name: t for t in msg.input}
    assert list(ins) == ["x", "lengths", "attn_mask"]
    assert ins["x"].data_type == mc.TYPE_FP32 and list(ins["x"].dims) == [-1, 32] and not ins["x"].optional
    assert ins["lengths"].data_type == mc.TYPE_INT64 and list(ins["lengths"].dims) == [1]
    assert list(ins["lengths"].reshape.shape) == [] and ins["lengths"].HasField("reshape") and ins["lengths"].optional
    assert ins["attn_mask"].data_type == mc.TYPE_BOOL and list(ins["attn_mask"].dims) == [-1, -1]
    assert ins["attn_mask"].optional
    outs = {t.name: list(t.dims) for t in msg.output}
    assert outs == {"output": [-1, 32], "weights": [-1, -1, -1]}
    assert msg.dynamic_batching.max_queue_delay_microseconds == 2000
    assert msg.dynamic_batching.default_queue_policy.max_queue_size == 9
    assert msg.dynamic_batching.default_queue_policy.default_timeout_microseconds == 7_000_000
    assert msg.instance_group[0].kind == mc.ModelInstanceGroup.KIND_CPU
    assert msg.parameters["num_heads"].string_value == "4"
    for path in ("/v2/models/nope/config", "/v2/models/mha/versions/3/config", "/v2/models/nope/stats"):
        r = await client.get(path)
        assert r.status_code == 404 and "error" in r.json(), path


async def test_lengths_as_b_by_1_as_triton_sends_it(app, client):
    x = rng.standard_normal((2, 6, 32)).astype(np.float32)
    lengths = np.array([[6], [3]], np.int64)
    body, headers = request([("x", "FP32", x, True), ("lengths", "INT64", lengths, True)], [("output", True)])
    r = await client.post(INFER, content=body, headers=headers)
    assert r.status_code == 200, r.text
    from .test_v2 import direct, parse

    _, arrays = parse(r)
    want, _ = direct(app, x, lengths=[6, 3])
    np.testing.assert_allclose(arrays["output"], want, atol=1e-5)
    bad = np.array([[6, 1], [3, 1]], np.int64)
    body, headers = request([("x", "FP32", x, True), ("lengths", "INT64", bad, True)])
    r = await client.post(INFER, content=body, headers=headers)
    assert r.status_code == 422 and r.json() == {"error": "input 'lengths' must have shape [B] or [B, 1], got [2, 2]"}


async def test_stats_count_what_was_sent(client):
    empty = (await client.get("/v2/models/mha/stats")).json()["model_stats"][0]
    assert empty["inference_stats"]["success"] == {"count": 0, "ns": 0} and empty["execution_count"] == 0
    sent = [1, 3, 2]  # sequences per request, one at a time: three executions of those batch sizes
    for B in sent:
        x = rng.standard_normal((B, 4, 32)).astype(np.float32)
        body, headers = request([("x", "FP32", x, True)], [("output", True)])
        assert (await client.post(INFER, content=body, headers=headers)).status_code == 200
    x = np.zeros((1, 4, 31), np.float32)  # wrong E: a failed request
    body, headers = request([("x", "FP32", x, True)])
    assert (await client.post(INFER, content=body, headers=headers)).status_code == 422
    assert (await client.post("/attend", json={"x": [[[0.5] * 32] * 2]})).status_code == 200  # /attend counts too

    r = await client.get("/v2/models/mha/versions/1/stats")
    assert r.status_code == 200
    body = r.json()
    stats = body["model_stats"][0]
    json_format.ParseDict(body, pb.ModelStatisticsResponse())  # the exact fields of grpc_service.proto
    assert (stats["name"], stats["version"]) == ("mha", "1")
    inf = stats["inference_stats"]
    assert inf["success"]["count"] == 4 and inf["fail"]["count"] == 1
    for phase in ("queue", "compute_input", "compute_infer", "compute_output"):
        assert inf[phase]["count"] == 4, phase
    assert inf["success"]["ns"] > inf["compute_infer"]["ns"] > 0
    assert inf["success"]["ns"] >= inf["queue"]["ns"] + inf["compute_input"]["ns"] + inf["compute_output"]["ns"]
    assert inf["fail"]["ns"] > 0 and inf["cache_hit"] == {"count": 0, "ns": 0}
    assert stats["inference_count"] == sum(sent) + 1
    assert stats["execution_count"] == 4
    sizes = {b["batch_size"]: b["compute_infer"]["count"] for b in stats["batch_stats"]}
    assert sizes == {1: 2, 2: 1, 3: 1}
    assert sum(b["compute_infer"]["ns"] for b in stats["batch_stats"]) == inf["compute_infer"]["ns"]
    assert stats["last_inference"] > 1_700_000_000_000  # ms since the epoch


async def test_protocol_details(client, app):
    assert (await client.get("/v2/")).json() == (await client.get("/v2")).json()
    for path in ("/healthz", "/readyz", "/v2/health/live", "/v2/health/ready"):
        r = await client.head(path)
        assert r.status_code == 200 and r.content == b"", path
    app.state.mha.ready = False
    try:
        for path in ("/readyz", "/v2/health/ready"):
            assert (await client.head(path)).status_code == 503, path
    finally:
        app.state.mha.ready = True
    for method, path in (("POST", "/v2"), ("DELETE", "/v2/"), ("POST", "/v2/health/live"), ("PUT", "/v2/models/mha")):
        r = await client.request(method, path)
        assert r.status_code == 405, (method, path)
        assert r.json() == {"error": f"{path} does not accept {method}"}
    r = await client.post("/v2/repository/index", json={})
    assert r.json() == [
        {"name": "mha", "version": "1", "state": "READY"},
        {"name": "mha-seq", "version": "1", "state": "READY"},  # the sequence model (test_sequence_protocol.py)
    ]

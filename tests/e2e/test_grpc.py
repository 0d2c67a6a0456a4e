"""The v2 protocol over gRPC on a real ``mha-serve``, driven by NVIDIA's tritonclient[grpc] and a raw stub."""

from __future__ import annotations

import asyncio
import re
import time
from collections.abc import Iterator

import grpc
import httpx
import ml_dtypes
import numpy as np
import pytest
import torch
import tritonclient.grpc as tg
import tritonclient.grpc.aio as tga
from grpc_health.v1 import health_pb2, health_pb2_grpc
from tritonclient.utils import InferenceServerException

from mha_core import MultiHeadAttention
from service.frontend.triton_proto import grpc_service_pb2 as pb
from service.frontend.triton_proto import grpc_service_pb2_grpc as pb_grpc

from .conftest import Server, builtin_model, start_server

rng = np.random.default_rng()
NP = {"FP32": np.float32, "FP16": np.float16, "BF16": ml_dtypes.bfloat16}


@pytest.fixture(scope="module")
def server(tmp_path_factory) -> Iterator[Server]:
    s = start_server(tmp_path_factory.mktemp("grpc"), {"MHA_FAULT_INJECTION": "true"})
    yield s
    assert s.stop() == 0


@pytest.fixture(scope="module")
def client(server) -> Iterator[tg.InferenceServerClient]:
    c = tg.InferenceServerClient(server.grpc_url)
    try:
        yield c
    finally:
        c.close()


@pytest.fixture(scope="module")
def mha() -> MultiHeadAttention:
    return builtin_model()


def stats(server: Server) -> dict:
    return httpx.get(server.url + "/v2/models/mha/stats").json()["model_stats"][0]


def test_health_metadata_config_and_stats(server, client):
    assert client.is_server_live() and client.is_server_ready()
    assert client.is_model_ready("mha") and client.is_model_ready("mha", "1") and not client.is_model_ready("nope")
    assert "statistics" in client.get_server_metadata(as_json=True)["extensions"]
    meta = client.get_model_metadata("mha", as_json=True)
    assert [(t["name"], t["datatype"], t["shape"]) for t in meta["inputs"]] == [
        ("x", "FP32", ["-1", "-1", "32"]),
        ("lengths", "INT64", ["-1", "1"]),
        ("attn_mask", "BOOL", ["-1", "-1", "-1"]),
    ]
    cfg = client.get_model_config("mha").config
    http_cfg = httpx.get(server.url + "/v2/models/mha/config").json()
    assert cfg.max_batch_size == http_cfg["max_batch_size"] == 32 and [i.name for i in cfg.input][1] == "lengths"
    assert [list(o.dims) for o in cfg.output] == [o["dims"] for o in http_cfg["output"]]
    index = client.get_model_repository_index(as_json=True)["models"]
    assert index == [{"name": n, "version": "1", "state": "READY"} for n in ("mha", "mha-seq")]
    with pytest.raises(InferenceServerException) as e:
        client.get_model_metadata("nope")
    assert e.value.status() == "StatusCode.NOT_FOUND" and "unknown model 'nope'" in e.value.message()
    with grpc.insecure_channel(server.grpc_url) as ch:
        check = health_pb2_grpc.HealthStub(ch).Check
        assert check(health_pb2.HealthCheckRequest()).status == health_pb2.HealthCheckResponse.SERVING
        svc = health_pb2.HealthCheckRequest(service="inference.GRPCInferenceService")
        assert check(svc).status == health_pb2.HealthCheckResponse.SERVING
        live = health_pb2.HealthCheckRequest(service="live")  # the k8s liveness probe
        assert check(live).status == health_pb2.HealthCheckResponse.SERVING


@pytest.mark.parametrize(("datatype", "atol"), [("FP32", 1e-5), ("FP16", 3e-3), ("BF16", 3e-2)])
def test_infer_equals_module(server, client, mha, datatype, atol):
    """Outputs in x's datatype; compared with the module in float32 on the values the server received."""
    before = stats(server)
    x = rng.standard_normal((2, 11, 32)).astype(NP[datatype])
    lengths = np.array([11, 4], np.int32)
    xi = tg.InferInput("x", list(x.shape), datatype).set_data_from_numpy(x)
    li = tg.InferInput("lengths", [2], "INT32").set_data_from_numpy(lengths)
    outs = [tg.InferRequestedOutput("output"), tg.InferRequestedOutput("weights")]
    res = client.infer("mha", [xi, li], outputs=outs, request_id="g1", parameters={"heads": "3,0"})
    assert res.get_response().id == "g1"
    out, w = res.as_numpy("output"), res.as_numpy("weights")
    assert out.dtype == NP[datatype] and out.shape == (2, 11, 32) and w.shape == (2, 2, 11, 11)
    want = mha(torch.from_numpy(x.astype(np.float32)), lengths=[11, 4], need_weights=True, heads=[3, 0])
    np.testing.assert_allclose(out.astype(np.float32), want.output.numpy(), atol=atol, rtol=1e-2)
    np.testing.assert_allclose(w.astype(np.float32), want.weights.numpy(), atol=atol, rtol=1e-2)
    after = stats(server)
    assert after["inference_stats"]["success"]["count"] == before["inference_stats"]["success"]["count"] + 1
    assert after["inference_count"] == before["inference_count"] + 2


def test_typed_contents_and_default_outputs(server, mha):
    """fp32_contents / int64_contents / bool_contents instead of raw bytes; no outputs: output alone."""
    x = rng.standard_normal((1, 5, 32)).astype(np.float32)
    mask = np.tril(np.ones((5, 5), bool)) & ~np.eye(5, dtype=bool)
    mask[0, 0] = True
    req = pb.ModelInferRequest(model_name="mha", id="typed")
    req.inputs.add(name="x", datatype="FP32", shape=[1, 5, 32]).contents.fp32_contents.extend(x.reshape(-1).tolist())
    req.inputs.add(name="lengths", datatype="INT64", shape=[1, 1]).contents.int64_contents.append(5)
    req.inputs.add(name="attn_mask", datatype="BOOL", shape=[5, 5]).contents.bool_contents.extend(mask.reshape(-1))
    req.parameters["causal"].bool_param = False
    with grpc.insecure_channel(server.grpc_url) as ch:
        resp = pb_grpc.GRPCInferenceServiceStub(ch).ModelInfer(req, timeout=30)
    assert [o.name for o in resp.outputs] == ["output"] and list(resp.outputs[0].shape) == [1, 5, 32]
    out = np.frombuffer(resp.raw_output_contents[0], "<f4").reshape(1, 5, 32)
    want = mha(torch.from_numpy(x), attn_mask=torch.from_numpy(mask), causal=False).output.numpy()
    np.testing.assert_allclose(out, want, atol=1e-5)


async def test_async_client_concurrent_calls(server, mha):
    xs = [rng.standard_normal((1, T, 32)).astype(np.float32) for T in (3, 17, 64, 40, 9)]
    async with tga.InferenceServerClient(server.grpc_url) as c:

        async def one(x):
            xi = tg.InferInput("x", list(x.shape), "FP32").set_data_from_numpy(x)
            return await c.infer("mha", [xi], outputs=[tg.InferRequestedOutput("output")], client_timeout=30)

        results = await asyncio.gather(*(one(x) for x in xs))
    for x, res in zip(xs, results, strict=True):
        np.testing.assert_allclose(res.as_numpy("output"), mha(torch.from_numpy(x)).output.numpy(), atol=1e-5)


def test_errors_carry_the_http_messages_and_mapped_codes(server, client):
    x = np.zeros((1, 2, 32), np.int8)
    with pytest.raises(InferenceServerException) as e:
        client.infer("mha", [tg.InferInput("x", [1, 2, 32], "INT8").set_data_from_numpy(x)])
    assert e.value.status() == "StatusCode.INVALID_ARGUMENT"
    assert e.value.message() == "input 'x' has datatype 'INT8'; expected one of FP32, FP16, BF16"
    nan = np.full((1, 2, 32), np.nan, np.float32)
    with pytest.raises(InferenceServerException) as e:
        client.infer("mha", [tg.InferInput("x", [1, 2, 32], "FP32").set_data_from_numpy(nan)])
    assert e.value.status() == "StatusCode.INVALID_ARGUMENT" and "non-finite" in e.value.message()
    ok = tg.InferInput("x", [1, 2, 32], "FP32").set_data_from_numpy(np.ones((1, 2, 32), np.float32))
    with pytest.raises(InferenceServerException) as e:
        client.infer("mha", [ok], model_version="2")
    assert e.value.status() == "StatusCode.NOT_FOUND"
    # Triton's priority parameter, checked with /attend's rule and message (one level: 0..1)
    assert client.infer("mha", [ok], priority=1).as_numpy("output").shape == (1, 2, 32)
    with pytest.raises(InferenceServerException) as e:
        client.infer("mha", [ok], priority=3)
    assert e.value.status() == "StatusCode.INVALID_ARGUMENT"
    assert e.value.message().startswith("priority 3 is out of range 0..1")
    with pytest.raises(InferenceServerException) as e:
        client.infer("mha", [ok], headers={"x-mha-fault": "raise"})
    assert e.value.status() == "StatusCode.INTERNAL"
    error_id = re.fullmatch(r"internal error \(id ([0-9a-f]{12})\); see the server log", e.value.message()).group(1)
    time.sleep(0.2)
    assert error_id in server.log() and "InjectedFault" in server.log()
    # the RPC's deadline is the request's: the batcher gives up at it (stall: the forward takes 2 s)
    t0 = time.monotonic()
    with pytest.raises(InferenceServerException) as e:
        client.infer("mha", [ok], headers={"x-mha-fault": "stall:2000"}, client_timeout=0.3)
    assert e.value.status() == "StatusCode.DEADLINE_EXCEEDED" and time.monotonic() - t0 < 1.5
    time.sleep(2)  # let the stalled forward finish


def test_cancelled_call_is_never_computed(server, client):
    """A queued RPC that the client cancels is dropped before compute (the batcher counts it)."""
    metrics = httpx.get(server.url + "/metrics").text
    gone_before = _metric(metrics, 'mha_requests_dropped_total{reason="disconnect"}')
    before = stats(server)
    busy = tg.InferInput("x", [1, 4, 32], "FP32").set_data_from_numpy(np.ones((1, 4, 32), np.float32))
    done: list = []
    client.async_infer(
        "mha", [busy], lambda result, error: done.append((result, error)), headers={"x-mha-fault": "stall:1500"}
    )
    time.sleep(0.3)  # the stalled request holds the model
    queued = tg.InferInput("x", [3, 4, 32], "FP32").set_data_from_numpy(np.ones((3, 4, 32), np.float32))
    cancelled: list = []
    call = client.async_infer("mha", [queued], lambda result, error: cancelled.append((result, error)))
    time.sleep(0.3)
    call.cancel()
    deadline = time.monotonic() + 10
    while not done and time.monotonic() < deadline:
        time.sleep(0.05)
    assert done and done[0][1] is None  # the stalled one was answered
    time.sleep(0.3)
    after = stats(server)
    assert after["execution_count"] == before["execution_count"] + 1  # only the stalled request ran
    assert after["inference_count"] == before["inference_count"] + 1  # not the cancelled 3 sequences
    sizes_before = {b["batch_size"]: b["compute_infer"]["count"] for b in before["batch_stats"]}
    sizes_after = {b["batch_size"]: b["compute_infer"]["count"] for b in after["batch_stats"]}
    assert sizes_after.get(3, 0) == sizes_before.get(3, 0)
    metrics = httpx.get(server.url + "/metrics").text
    assert _metric(metrics, 'mha_requests_dropped_total{reason="disconnect"}') == gone_before + 1


def _metric(text: str, name: str) -> float:
    for line in text.splitlines():
        if line.startswith(name + " "):
            return float(line.split()[-1])
    return 0.0


def test_overloaded_is_resource_exhausted_with_retry_after_and_keys_are_checked(tmp_path):
    s = start_server(tmp_path, {"MHA_FAULT_INJECTION": "true", "MHA_MAX_QUEUE_REQUESTS": "1", "MHA_API_KEYS": "k1,k2"})
    try:
        x = np.ones((1, 4, 32), np.float32)
        with grpc.insecure_channel(s.grpc_url) as ch:
            stub = pb_grpc.GRPCInferenceServiceStub(ch)
            assert stub.ServerLive(pb.ServerLiveRequest()).live  # open, as /v2/health/live is
            req = pb.ModelInferRequest(model_name="mha")
            req.inputs.add(name="x", datatype="FP32", shape=[1, 4, 32])
            req.raw_input_contents.append(x.tobytes())
            with pytest.raises(grpc.RpcError) as e:
                stub.ModelInfer(req, timeout=10)
            assert e.value.code() == grpc.StatusCode.UNAUTHENTICATED
            with pytest.raises(grpc.RpcError) as e:
                stub.ModelInfer(req, timeout=10, metadata=[("authorization", "Bearer nope")])
            assert e.value.code() == grpc.StatusCode.UNAUTHENTICATED
            key = [("authorization", "Bearer k2")]
            assert stub.ModelInfer(req, timeout=10, metadata=key).outputs[0].name == "output"
            stall = [*key, ("x-mha-fault", "stall:1500")]
            running = stub.ModelInfer.future(req, timeout=10, metadata=stall)  # holds the model
            time.sleep(0.3)
            queued = stub.ModelInfer.future(req, timeout=10, metadata=key)  # fills the queue of 1
            time.sleep(0.2)
            with pytest.raises(grpc.RpcError) as e:
                stub.ModelInfer(req, timeout=10, metadata=key)
            assert e.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED and "queue is full" in e.value.details()
            trailers = dict(e.value.trailing_metadata())
            assert int(trailers["retry-after"]) >= 1
            assert running.result().outputs and queued.result().outputs
    finally:
        assert s.stop() == 0


def test_a_taken_grpc_port_fails_start_up_with_a_clear_message(tmp_path):
    import socket

    with socket.socket() as held:
        held.bind(("127.0.0.1", 0))
        held.listen()
        port = held.getsockname()[1]
        with pytest.raises(RuntimeError) as e:
            start_server(tmp_path, {"MHA_GRPC_PORT": str(port)}, ready_timeout=60)
    assert f"cannot serve gRPC on 127.0.0.1:{port} (MHA_GRPC_PORT)" in str(e.value)

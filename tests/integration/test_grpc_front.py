"""gRPC's front door in-process: API keys and admission before the message is read, health that follows readiness."""

from __future__ import annotations

import asyncio
import base64
import socket
from contextlib import asynccontextmanager

import grpc
import httpx
import numpy as np
import pytest
from asgi_lifespan import LifespanManager
from grpc_health.v1 import health_pb2, health_pb2_grpc

from service.app import create_app
from service.frontend.triton_proto import grpc_service_pb2 as pb
from service.frontend.triton_proto import grpc_service_pb2_grpc as pb_grpc
from service.settings import Settings

from .conftest import TINY

SERVING = health_pb2.HealthCheckResponse.SERVING
NOT_SERVING = health_pb2.HealthCheckResponse.NOT_SERVING


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@asynccontextmanager
async def _served(**kw):
    """The app with gRPC on 127.0.0.1: (app, HTTP client, gRPC channel)."""
    port = _free_port()
    app = create_app(settings=Settings(**{**TINY, "host": "127.0.0.1", "grpc_port": port, **kw}))
    async with (
        LifespanManager(app),
        httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://test") as http,
        grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel,
    ):
        yield app, http, channel


def _infer_request(x: np.ndarray) -> pb.ModelInferRequest:
    req = pb.ModelInferRequest(model_name="mha")
    req.inputs.add(name="x", datatype="FP32", shape=list(x.shape))
    req.raw_input_contents.append(x.tobytes())
    return req


def _output(resp: pb.ModelInferResponse, shape: tuple[int, ...]) -> np.ndarray:
    return np.frombuffer(resp.raw_output_contents[0], "<f4").reshape(shape)


async def _http_output(http: httpx.AsyncClient, x: np.ndarray, **headers: str) -> np.ndarray:
    b64 = {"dtype": "float32", "shape": list(x.shape), "b64": base64.b64encode(x.tobytes()).decode()}
    r = await http.post("/attend", json={"x": b64}, headers=headers)
    assert r.status_code == 200, r.text
    return np.frombuffer(base64.b64decode(r.json()["output"]["b64"]), np.float32).reshape(x.shape)


async def test_a_call_without_a_good_key_is_refused_before_its_message_is_read(rng_seed):
    """A message over max_body_bytes would be refused RESOURCE_EXHAUSTED by gRPC itself once read: refused
    UNAUTHENTICATED, it never was."""
    rng = np.random.default_rng(rng_seed)
    async with _served(api_keys="k1", max_body_bytes=64 * 1024) as (_, http, channel):
        stub = pb_grpc.GRPCInferenceServiceStub(channel)
        huge = _infer_request(rng.standard_normal((8, 64, 32)).astype(np.float32))
        huge.raw_input_contents[0] += bytes(256 * 1024)
        for metadata in ((), (("authorization", "Bearer nope"),)):
            with pytest.raises(grpc.aio.AioRpcError) as e:
                await stub.ModelInfer(huge, timeout=10, metadata=metadata)
            assert e.value.code() == grpc.StatusCode.UNAUTHENTICATED, e.value.details()
            assert "API key" in e.value.details()
        x = rng.standard_normal((1, 9, 32)).astype(np.float32)
        resp = await stub.ModelInfer(_infer_request(x), timeout=10, metadata=(("authorization", "Bearer k1"),))
        want = await _http_output(http, x, authorization="Bearer k1")
        np.testing.assert_allclose(_output(resp, x.shape), want, atol=1e-6)
        with pytest.raises(grpc.aio.AioRpcError) as e:  # a good key and a message too large: gRPC's own limit
            await stub.ModelInfer(huge, timeout=10, metadata=(("authorization", "Bearer k1"),))
        assert e.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED


async def test_grpc_and_http_share_the_bound_on_requests_in_flight(rng_seed):
    rng = np.random.default_rng(rng_seed)
    x = rng.standard_normal((1, 6, 32)).astype(np.float32)
    async with _served(max_inflight_requests=1, fault_injection=True) as (_, http, channel):
        stub = pb_grpc.GRPCInferenceServiceStub(channel)
        held = asyncio.ensure_future(_http_output(http, x, **{"x-mha-fault": "stall:1500"}))
        await asyncio.sleep(0.4)  # the HTTP request holds the one slot
        with pytest.raises(grpc.aio.AioRpcError) as e:
            await stub.ModelInfer(_infer_request(x), timeout=10)
        assert e.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
        assert e.value.details() == "too many requests in flight (1; limit max_inflight_requests 1)"
        assert dict(e.value.trailing_metadata())["retry-after"] == "1"
        want = await asyncio.wait_for(held, 10)
        resp = await stub.ModelInfer(_infer_request(x), timeout=10)  # the slot is free again
        np.testing.assert_allclose(_output(resp, x.shape), want, atol=1e-6)

        stalled = stub.ModelInfer(_infer_request(x), timeout=10, metadata=(("x-mha-fault", "stall:1500"),))
        await asyncio.sleep(0.4)  # now a gRPC call holds it: HTTP is refused
        r = await http.post("/attend", json={"x": x.tolist()})
        assert r.status_code == 429 and "max_inflight_requests 1" in r.json()["error"]["message"]
        np.testing.assert_allclose(_output(await stalled, x.shape), want, atol=1e-6)


async def test_grpc_messages_count_against_the_bytes_in_flight(rng_seed):
    rng = np.random.default_rng(rng_seed)
    x = rng.standard_normal((3, 50, 32)).astype(np.float32)  # 19,200 bytes of x: two do not fit in 32,768
    async with _served(max_inflight_bytes=32 * 1024, max_body_bytes=32 * 1024, fault_injection=True) as (
        app,
        _,
        channel,
    ):
        stub = pb_grpc.GRPCInferenceServiceStub(channel)
        stalled = stub.ModelInfer(_infer_request(x), timeout=10, metadata=(("x-mha-fault", "stall:1000"),))
        await asyncio.sleep(0.4)
        admission = app.state.mha.admission
        assert admission.requests == 1 and admission.bytes == _infer_request(x).ByteSize()
        with pytest.raises(grpc.aio.AioRpcError) as e:
            await stub.ModelInfer(_infer_request(x), timeout=10)
        assert e.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
        assert "limit max_inflight_bytes 32768" in e.value.details()
        assert _output(await stalled, x.shape).shape == x.shape
        assert (admission.requests, admission.bytes) == (0, 0)  # all given back


async def _next(stream, timeout: float = 5.0) -> int:
    return (await asyncio.wait_for(stream.read(), timeout)).status


async def test_health_watch_follows_readiness_as_it_changes():
    async with _served() as (app, _, channel):
        state = app.state.mha
        watch = health_pb2_grpc.HealthStub(channel).Watch(health_pb2.HealthCheckRequest(service=""))
        assert await _next(watch) == SERVING
        state.ready = False  # what the engine client does when it loses the model process
        assert await _next(watch) == NOT_SERVING
        check = health_pb2_grpc.HealthStub(channel).Check
        assert (await check(health_pb2.HealthCheckRequest(service="inference.GRPCInferenceService"))).status == (
            NOT_SERVING
        )
        state.ready = True  # and when it is back
        assert await _next(watch) == SERVING
        state.begin_shutdown()
        assert await _next(watch) == NOT_SERVING
        watch.cancel()

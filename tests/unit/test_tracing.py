"""service/tracing.py: when the OTEL_* environment turns tracing on, and what it refuses."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from service.tracing import NO_SPAN, exporters_from_env, from_env, stage

ROOT = Path(__file__).resolve().parents[2]


@pytest.mark.parametrize(
    ("env", "want"),
    [
        ({}, []),  # off by default, unlike the SDK's own default of otlp
        ({"OTEL_TRACES_EXPORTER": "none"}, []),
        ({"OTEL_TRACES_EXPORTER": ""}, []),
        ({"OTEL_EXPORTER_OTLP_ENDPOINT": "http://collector:4318"}, []),  # an endpoint alone does not turn it on
        ({"OTEL_TRACES_EXPORTER": "otlp"}, ["otlp"]),
        ({"OTEL_TRACES_EXPORTER": " OTLP , console,otlp"}, ["otlp", "console"]),
        ({"OTEL_TRACES_EXPORTER": "otlp", "OTEL_SDK_DISABLED": "true"}, []),
        ({"OTEL_TRACES_EXPORTER": "otlp", "OTEL_SDK_DISABLED": "false"}, ["otlp"]),
        ({"OTEL_TRACES_EXPORTER": "otlp", "OTEL_EXPORTER_OTLP_PROTOCOL": "http/protobuf"}, ["otlp"]),
    ],
)
def test_exporters_from_env(env: dict, want: list) -> None:
    assert exporters_from_env(env) == want


@pytest.mark.parametrize(
    ("env", "message"),
    [
        ({"OTEL_TRACES_EXPORTER": "jaeger"}, "unknown exporter 'jaeger'"),
        ({"OTEL_TRACES_EXPORTER": "otlp", "OTEL_EXPORTER_OTLP_PROTOCOL": "grpc"}, "OTLP protocol 'grpc'"),
        ({"OTEL_TRACES_EXPORTER": "otlp", "OTEL_EXPORTER_OTLP_TRACES_PROTOCOL": "http/json"}, "http/protobuf"),
    ],
)
def test_unsupported_settings_fail_at_start_up(env: dict, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        exporters_from_env(env)


def test_off_means_no_tracing_object_and_a_shared_no_op_stage() -> None:
    assert from_env(service_version="0", replica_id="r", environ={}) is None
    with stage(None, "decode") as s:
        assert s is None
    assert stage(None, "encode") is NO_SPAN


NO_OTEL = r"""
import asyncio, sys
import httpx
from asgi_lifespan import LifespanManager
from service.app import create_app
from service.settings import Settings

async def main():
    app = create_app(settings=Settings(
        num_heads=4, emb_size=32, head_size=8, max_seq_len=64, warmup=False, grpc_port=0, decode_processes=0
    ))
    async with LifespanManager(app):
        async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://t") as c:
            tp = "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01"
            r = await c.post("/attend", json={"x": [[[0.5] * 32] * 3]}, headers={"traceparent": tp})
            assert r.status_code == 200, r.text
            r = await c.post("/v2/models/mha/infer", json={"inputs": [
                {"name": "x", "shape": [1, 2, 32], "datatype": "FP32", "data": [0.5] * 64}]})
            assert r.status_code == 200, r.text
    from opentelemetry import trace  # FastAPI >= 0.16x imports the API itself; the SDK is what must stay out

    print(type(trace.get_tracer_provider()).__name__)
    print(sorted(m for m in sys.modules if m.startswith(("opentelemetry.sdk", "opentelemetry.exporter"))))

asyncio.run(main())
"""


def test_tracing_off_configures_no_sdk() -> None:
    """With no OTEL_* variables the service serves traced requests without importing the OpenTelemetry SDK
    or an exporter, and leaves the global tracer provider unconfigured (so FastAPI's own telemetry stays off)."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("OTEL_")}
    env["PYTHONPATH"] = str(ROOT)
    r = subprocess.run([sys.executable, "-c", NO_OTEL], env=env, capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    assert r.stdout.strip().splitlines()[-2:] == ["ProxyTracerProvider", "[]"]


def test_tracing_on_builds_an_sdk_provider_with_the_service_name() -> None:
    tracing = from_env(
        service_version="1.2.3",
        replica_id="replica-7",
        environ={"OTEL_TRACES_EXPORTER": "console"},
    )
    try:
        attrs = tracing.provider.resource.attributes
        assert attrs["service.version"] == "1.2.3" and attrs["service.instance.id"] == "replica-7"
        assert attrs["service.name"] in ("mha-serve", os.environ.get("OTEL_SERVICE_NAME"))
    finally:
        tracing.shutdown()


def test_propagation_from_a_header_mapping_as_grpc_metadata_would_give_it() -> None:
    """start_server_span takes any mapping of lower-case names (HTTP headers, gRPC metadata): the span is the
    caller's child, carries its tracestate, is current until finish, and stage() spans nest under it."""
    from opentelemetry.sdk.trace.export import SimpleSpanProcessor
    from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

    tracing = from_env(service_version="0", replica_id="r", environ={"OTEL_TRACES_EXPORTER": "console"})
    memory = InMemorySpanExporter()
    tracing.provider.add_span_processor(SimpleSpanProcessor(memory))
    try:
        carrier = {
            "traceparent": "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01",
            "tracestate": "congo=t61rcWkgMzE",
        }
        rs = tracing.start_server_span("/mha.Attention/Attend", carrier, {"rpc.system": "grpc"})
        from service.tracing import current_ids

        assert current_ids() == ("0af7651916cd43dd8448eb211c80319c", format(rs.span.get_span_context().span_id, "016x"))
        with stage(tracing, "decode"):
            pass
        rs.finish(error=True)
        assert current_ids() is None  # the context before it is back
        decode, server = memory.get_finished_spans()
        assert server.parent.span_id == 0xB7AD6B7169203331 and server.parent.is_remote
        assert server.context.trace_id == 0x0AF7651916CD43DD8448EB211C80319C
        assert server.context.trace_state.to_header() == "congo=t61rcWkgMzE"
        assert server.status.is_ok is False and server.attributes["rpc.system"] == "grpc"
        assert decode.parent.span_id == server.context.span_id
    finally:
        tracing.shutdown()


def test_a_request_span_context_crosses_the_process_boundary_in_the_request_message() -> None:
    """The front end sends its request span's context with the request (messages.encode_requests); the model
    process's Tracing turns it back into a remote context: its forward span is that span's child."""
    import numpy as np
    from opentelemetry.sdk.trace.export import SimpleSpanProcessor
    from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

    from service.messages import AttendInput, BatchStats, decode, decode_requests, encode_requests

    front = from_env(service_version="0", replica_id="r", environ={"OTEL_TRACES_EXPORTER": "console"})
    engine = from_env(service_version="0", replica_id="r", environ={"OTEL_TRACES_EXPORTER": "console"})
    memory = InMemorySpanExporter()
    engine.provider.add_span_processor(SimpleSpanProcessor(memory))
    try:
        carrier = {"traceparent": "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01", "tracestate": "k=v"}
        rs = front.start_server_span("POST /attend", carrier, {})
        ctx = front.current_span_context()
        rs.finish()
        x = np.zeros((1, 2, 4), np.float32)
        frames = encode_requests([(1, AttendInput(x, trace=ctx), 1.0, None, 0), (2, AttendInput(x), 1.0, None, 0)])
        (_, traced, *_), (_, plain, *_) = decode_requests(decode(frames[0]), frames[1:])
        assert plain.trace is None
        remote = engine.remote_span_context(traced.trace)
        assert (remote.trace_id, remote.span_id, remote.is_remote) == (ctx.trace_id, ctx.span_id, True)
        assert engine.remote_span_context({"traceparent": "garbage"}) is None
        engine.batch_finished([AttendInput(x, trace=remote)], 0.0, BatchStats(sequences=1, real_tokens=2))
        (fwd,) = memory.get_finished_spans()
        assert fwd.parent.span_id == ctx.span_id and fwd.context.trace_id == ctx.trace_id
        assert fwd.context.trace_state.to_header() == "k=v"
    finally:
        front.shutdown()
        engine.shutdown()

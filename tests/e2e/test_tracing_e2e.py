"""OpenTelemetry across the HTTP boundary: a real uvicorn exports over OTLP/HTTP to a receiver in the test.

The receiver is a small HTTP server on 127.0.0.1 that decodes the exporter's
``ExportTraceServiceRequest`` protobufs (opentelemetry-proto). Requests carry W3C ``traceparent``;
a stalled request holds the model while four traced requests queue, so those four share one batch.
"""

from __future__ import annotations

import asyncio
import base64
import gzip
import json
import os
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import httpx
import numpy as np
import pytest

from .conftest import start_server

pb = pytest.importorskip("opentelemetry.proto.collector.trace.v1.trace_service_pb2")
from opentelemetry.proto.trace.v1 import trace_pb2  # noqa: E402

rng = np.random.default_rng()
E = 32  # the e2e servers' tiny model (tests/e2e/conftest.py)


class Receiver:
    """An OTLP/HTTP trace receiver on 127.0.0.1: POST /v1/traces, protobuf in, spans kept."""

    def __init__(self) -> None:
        self.spans: list[trace_pb2.Span] = []
        self.resources: list[dict] = []
        self.pids: dict[bytes, int] = {}  # span id -> the process.pid of its resource
        self.posts = 0
        self.lock = threading.Lock()
        receiver = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:
                body = self.rfile.read(int(self.headers["content-length"]))
                if self.headers.get("content-encoding") == "gzip":
                    body = gzip.decompress(body)
                req = pb.ExportTraceServiceRequest.FromString(body)
                with receiver.lock:
                    receiver.posts += 1
                    for rs in req.resource_spans:
                        receiver.resources.append({a.key: a.value.string_value for a in rs.resource.attributes})
                        pid = next((a.value.int_value for a in rs.resource.attributes if a.key == "process.pid"), 0)
                        for ss in rs.scope_spans:
                            receiver.spans.extend(ss.spans)
                            receiver.pids.update((s.span_id, pid) for s in ss.spans)
                out = pb.ExportTraceServiceResponse().SerializeToString()
                self.send_response(200 if self.path == "/v1/traces" else 404)
                self.send_header("content-type", "application/x-protobuf")
                self.send_header("content-length", str(len(out)))
                self.end_headers()
                self.wfile.write(out)

            def log_message(self, *args) -> None:
                pass

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}"
        self.thread = threading.Thread(target=self.httpd.serve_forever, daemon=True)
        self.thread.start()

    def close(self) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()

    def snapshot(self) -> list[trace_pb2.Span]:
        with self.lock:
            return list(self.spans)


@pytest.fixture
def receiver():
    r = Receiver()
    try:
        yield r
    finally:
        r.close()


def _otel_env(receiver: Receiver, **extra: str) -> dict[str, str]:
    return {
        "OTEL_TRACES_EXPORTER": "otlp",
        "OTEL_EXPORTER_OTLP_TRACES_ENDPOINT": receiver.url + "/v1/traces",
        "OTEL_SERVICE_NAME": "mha-e2e",
        "OTEL_TRACES_SAMPLER": "parentbased_always_on",
        "OTEL_BSP_SCHEDULE_DELAY": "50",  # export within 50 ms, so the test waits little
        "MHA_FAULT_INJECTION": "true",
        "MHA_LOG_FORMAT": "json",
        **extra,
    }


def _traceparent() -> tuple[str, str, str]:
    trace_id, span_id = os.urandom(16).hex(), os.urandom(8).hex()
    return f"00-{trace_id}-{span_id}-01", trace_id, span_id


def _attend_body(B: int, T: int) -> bytes:
    x = rng.standard_normal((B, T, E)).astype(np.float32)
    return json.dumps({"x": {"dtype": "float32", "shape": [B, T, E], "b64": base64.b64encode(x.tobytes()).decode()}})


def _v2_body(B: int, T: int) -> tuple[bytes, dict[str, str]]:
    raw = rng.standard_normal((B, T, E)).astype("<f4").tobytes()
    header = json.dumps(
        {
            "inputs": [
                {"name": "x", "shape": [B, T, E], "datatype": "FP32", "parameters": {"binary_data_size": len(raw)}}
            ],
            "outputs": [{"name": "output", "parameters": {"binary_data": True}}],
        }
    ).encode()
    return header + raw, {
        "inference-header-content-length": str(len(header)),
        "content-type": "application/octet-stream",
    }


def _attrs(span: trace_pb2.Span) -> dict:
    out = {}
    for a in span.attributes:
        v = a.value
        out[a.key] = getattr(v, v.WhichOneof("value"))
    return out


def _metric(url: str, name: str) -> float:
    for line in httpx.get(url + "/metrics").text.splitlines():
        if line.startswith(name + " "):
            return float(line.split()[1])
    raise AssertionError(f"{name} not in /metrics")


def _wait_computing(url: str, timeout: float = 10) -> None:
    """Until exactly one inference request is in flight and nothing is queued: it holds the model."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if _metric(url, "mha_requests_in_flight") == 1 and _metric(url, "mha_queue_depth_requests") == 0:
            return
        time.sleep(0.01)
    raise AssertionError("the stalled request never started computing")


def _wait_spans(receiver: Receiver, done, timeout: float = 15) -> list[trace_pb2.Span]:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        spans = receiver.snapshot()
        if done(spans):
            return spans
        time.sleep(0.05)
    raise AssertionError(f"spans incomplete after {timeout} s: {[s.name for s in receiver.snapshot()]}")


CLOCK_SLACK_NS = 200_000  # monotonic -> wall conversion of the queue and forward spans: well under 0.2 ms


def test_spans_parents_links_and_timings(tmp_path, receiver):
    server = start_server(tmp_path, _otel_env(receiver))
    try:
        url = server.url
        # the stalled request, traced too, holds the model while the members queue
        stall_tp, stall_trace, _ = _traceparent()

        async def go():
            async with httpx.AsyncClient(base_url=url, timeout=60) as c:
                stall = asyncio.create_task(
                    c.post(
                        "/attend",
                        content=_attend_body(1, 4),
                        headers={"traceparent": stall_tp, "x-mha-fault": "stall:600"},
                    )
                )
                await asyncio.to_thread(_wait_computing, url)
                calls = []
                for i, (B, T) in enumerate([(1, 8), (2, 5), (1, 6)]):
                    tp, trace_id, span_id = _traceparent()
                    body = _attend_body(B, T)
                    headers = {"traceparent": tp, "content-type": "application/json", "x-request-id": f"member-{i}"}
                    if i == 0:
                        headers["tracestate"] = "vendor=abc,other=1"
                    calls.append(("/attend", body, headers, trace_id, span_id))
                tp, trace_id, span_id = _traceparent()
                body, headers = _v2_body(1, 7)
                calls.append(("/v2/models/mha/infer", body, {**headers, "traceparent": tp}, trace_id, span_id))
                responses = await asyncio.gather(*(c.post(p, content=b, headers=h) for p, b, h, _, _ in calls))
                return calls, responses, await stall

        calls, responses, stall = asyncio.run(go())
        assert stall.status_code == 200, stall.text
        for r in responses:
            assert r.status_code == 200, r.text
            assert r.headers["x-batch-size"] == "4"  # the four shared one forward pass
        members = {
            trace_id: (path, body, span_id, r)
            for (path, body, _, trace_id, span_id), r in zip(calls, responses, strict=True)
        }

        def complete(spans) -> bool:
            forwards = [s for s in spans if s.name == "forward"]
            servers = [s for s in spans if s.kind == trace_pb2.Span.SPAN_KIND_SERVER]
            return len(forwards) >= 2 and len(servers) >= 5 and sum(s.name == "encode" for s in spans) >= 5

        spans = _wait_spans(receiver, complete)
        assert {r["service.name"] for r in receiver.resources} == {"mha-e2e"}
        by_id = {s.span_id: s for s in spans}
        assert len(by_id) == len(spans), "span ids are unique"

        # the request spans: children of the caller's traceparent, with route, status and sizes
        request_spans = {}
        for trace_id, (path, body, caller_span, r) in members.items():
            (req,) = [s for s in spans if s.trace_id.hex() == trace_id and s.kind == trace_pb2.Span.SPAN_KIND_SERVER]
            assert req.parent_span_id.hex() == caller_span
            a = _attrs(req)
            route = "/attend" if path == "/attend" else "/v2/models/{name}/infer"
            assert req.name == f"POST {route}"
            assert a["http.route"] == route and a["url.path"] == path
            assert a["http.request.method"] == "POST"
            assert a["http.response.status_code"] == 200
            assert a["http.request.body.size"] == len(body)
            assert a["http.response.body.size"] == len(r.content)
            assert a["mha.request_id"] == r.headers["x-request-id"]
            request_spans[trace_id] = req
        first = request_spans[calls[0][3]]
        assert first.trace_state == "vendor=abc,other=1"

        # decode, queue, encode: one each, children of the request span, in order, within it
        (forward,) = [s for s in spans if s.name == "forward" and len(s.links) == 4]
        for req in request_spans.values():
            kids = {s.name: s for s in spans if s.parent_span_id == req.span_id}
            assert sum(s.parent_span_id == req.span_id and s.name != "forward" for s in spans) == 3
            dec, q, enc = kids["decode"], kids["queue"], kids["encode"]
            for s in (dec, q, enc):
                assert s.trace_id == req.trace_id
                assert req.start_time_unix_nano <= s.start_time_unix_nano <= s.end_time_unix_nano
                assert s.end_time_unix_nano <= req.end_time_unix_nano
            assert dec.end_time_unix_nano <= q.start_time_unix_nano + CLOCK_SLACK_NS
            assert q.end_time_unix_nano <= forward.start_time_unix_nano + CLOCK_SLACK_NS  # queued, then computed
            assert forward.end_time_unix_nano <= enc.start_time_unix_nano
            # it waited behind the 600 ms stall
            assert q.end_time_unix_nano - q.start_time_unix_nano > 100e6
            assert _attrs(q)["mha.batch.requests"] == 4

        # one forward span for the batch, linked to every member's request span
        assert {(link.trace_id, link.span_id) for link in forward.links} == {
            (s.trace_id, s.span_id) for s in request_spans.values()
        }
        a = _attrs(forward)
        assert a["mha.batch.requests"] == 4
        assert a["mha.batch.sequences"] == 1 + 2 + 1 + 1
        assert a["mha.batch.padded_tokens"] == 5 * 8  # every sequence padded to the longest T = 8
        assert a["mha.batch.real_tokens"] == 8 + 2 * 5 + 6 + 7
        assert a["mha.batch.padding_ratio"] == pytest.approx(40 / 31)
        parent = by_id[forward.parent_span_id]  # a member's request span: that trace shows it in place
        assert parent in request_spans.values() and forward.trace_id == parent.trace_id
        assert parent.start_time_unix_nano <= forward.start_time_unix_nano
        assert forward.end_time_unix_nano <= parent.end_time_unix_nano

        # the stalled request had its own batch of one
        (stall_req,) = [
            s for s in spans if s.trace_id.hex() == stall_trace and s.kind == trace_pb2.Span.SPAN_KIND_SERVER
        ]
        (stall_fwd,) = [s for s in spans if s.name == "forward" and s.parent_span_id == stall_req.span_id]
        assert [link.span_id for link in stall_fwd.links] == [stall_req.span_id]
        assert stall_fwd.end_time_unix_nano - stall_fwd.start_time_unix_nano >= 550e6
        assert stall_fwd.end_time_unix_nano <= forward.start_time_unix_nano + CLOCK_SLACK_NS

        # the JSON log lines carry the trace id of the request they belong to
        server.stop()
        lines = [json.loads(line) for line in server.log().splitlines() if line.startswith("{")]
        access = {ln["request_id"]: ln for ln in lines if ln.get("logger") == "mha_serve.access"}
        for i in range(3):
            (_, _, _, trace_id, _) = calls[i]
            assert access[f"member-{i}"]["trace_id"] == trace_id
            assert access[f"member-{i}"]["span_id"] == request_spans[trace_id].span_id.hex()
    finally:
        server.stop()


def test_a_request_without_traceparent_starts_its_own_trace(tmp_path, receiver):
    """No traceparent: a new trace. An unsampled traceparent (flags 00): no span at all, but the log lines
    still carry the caller's trace id."""
    server = start_server(tmp_path, _otel_env(receiver))
    try:
        unsampled = os.urandom(16).hex()
        r = httpx.post(
            server.url + "/attend",
            content=_attend_body(1, 3),
            headers={"content-type": "application/json", "traceparent": f"00-{unsampled}-{os.urandom(8).hex()}-00"},
        )
        assert r.status_code == 200
        r = httpx.post(server.url + "/attend", content=_attend_body(1, 3), headers={"content-type": "application/json"})
        assert r.status_code == 200
        bad = httpx.post(server.url + "/attend", content=b"{", headers={"content-type": "application/json"})
        assert bad.status_code == 400
        spans = _wait_spans(
            receiver,
            lambda ss: (
                sum(s.kind == trace_pb2.Span.SPAN_KIND_SERVER for s in ss) >= 2 and any(s.name == "forward" for s in ss)
            ),
        )
        servers = sorted(
            (s for s in spans if s.kind == trace_pb2.Span.SPAN_KIND_SERVER), key=lambda s: s.start_time_unix_nano
        )
        assert all(_attrs(s)["url.path"] == "/attend" for s in servers)  # probes and scrapes are not traced
        ok, err = servers
        assert ok.parent_span_id == b"" and err.parent_span_id == b""  # roots of new traces
        assert ok.trace_id != err.trace_id
        assert _attrs(err)["http.response.status_code"] == 400
        (fwd,) = [s for s in spans if s.name == "forward"]
        assert fwd.parent_span_id == ok.span_id
        assert not any(s.trace_id.hex() == unsampled for s in spans)
        server.stop()
        lines = [json.loads(line) for line in server.log().splitlines() if line.startswith("{")]
        (first,) = [ln for ln in lines if ln.get("logger") == "mha_serve.access" and ln.get("path") == "/attend"][:1]
        assert first["trace_id"] == unsampled
    finally:
        server.stop()


def test_tracing_off_exports_nothing(tmp_path, receiver):
    """OTEL_SDK_DISABLED wins over an exporter and endpoint; and unset OTEL_TRACES_EXPORTER is off."""
    for env in (_otel_env(receiver, OTEL_SDK_DISABLED="true"), {**_otel_env(receiver), "OTEL_TRACES_EXPORTER": ""}):
        server = start_server(tmp_path, env)
        try:
            tp = _traceparent()[0]
            for _ in range(3):
                r = httpx.post(
                    server.url + "/attend",
                    content=_attend_body(1, 3),
                    headers={"content-type": "application/json", "traceparent": tp},
                )
                assert r.status_code == 200
        finally:
            server.stop()
        assert receiver.posts == 0 and receiver.spans == []
        lines = [json.loads(line) for line in server.log().splitlines() if line.startswith("{")]
        assert any(ln.get("logger") == "mha_serve.access" for ln in lines)
        assert not any("trace_id" in ln for ln in lines)


def test_a_grpc_call_is_traced_like_an_http_request(tmp_path, receiver):
    """gRPC: the traceparent in the call's metadata is the server span's parent; decode, queue and encode
    are its children, and the batch's forward span links it."""
    tg = pytest.importorskip("tritonclient.grpc")
    server = start_server(tmp_path, _otel_env(receiver))
    try:
        tp, trace_id, caller = _traceparent()
        x = rng.standard_normal((1, 3, E)).astype(np.float32)
        with tg.InferenceServerClient(server.grpc_url) as client:
            inp = tg.InferInput("x", [1, 3, E], "FP32").set_data_from_numpy(x)
            assert client.infer("mha", [inp], headers={"traceparent": tp}).as_numpy("output").shape == (1, 3, E)
            bad = tg.InferInput("x", [1, 3, E + 1], "FP32").set_data_from_numpy(np.ones((1, 3, E + 1), np.float32))
            with pytest.raises(tg.InferenceServerException):
                client.infer("mha", [bad], headers={"traceparent": _traceparent()[0]})
        name = "inference.GRPCInferenceService/ModelInfer"
        spans = _wait_spans(
            receiver, lambda ss: sum(s.name == name for s in ss) == 2 and any(s.name == "forward" for s in ss)
        )
        (req,) = [s for s in spans if s.name == name and s.trace_id.hex() == trace_id]
        assert req.kind == trace_pb2.Span.SPAN_KIND_SERVER and req.parent_span_id.hex() == caller
        a = _attrs(req)
        assert (a["rpc.system"], a["rpc.method"], a["rpc.grpc.status_code"]) == ("grpc", "ModelInfer", 0)
        assert a["rpc.request.size"] > x.nbytes and a["rpc.response.size"] > x.nbytes
        children = {s.name: s for s in spans if s.parent_span_id == req.span_id}
        assert set(children) == {"decode", "queue", "encode", "forward"}  # forward: under its first member
        for c in children.values():
            assert req.start_time_unix_nano <= c.start_time_unix_nano <= c.end_time_unix_nano <= req.end_time_unix_nano
        fwd = children["forward"]
        assert [link.span_id for link in fwd.links] == [req.span_id]
        (err,) = [s for s in spans if s.name == name and s.trace_id.hex() != trace_id]
        assert _attrs(err)["rpc.grpc.status_code"] == 3  # INVALID_ARGUMENT: the caller's error, not the span's
        assert err.status.code != trace_pb2.Status.STATUS_CODE_ERROR
    finally:
        server.stop()


def test_the_forward_span_crosses_to_the_model_process(tmp_path, receiver):
    """MHA_WORKERS=2: the request's context crosses with it; the model process draws the forward span."""
    from .test_procs_e2e import pids

    server = start_server(tmp_path, _otel_env(receiver, MHA_WORKERS="2"))
    try:
        engine, fronts = pids(server)
        tp, trace_id, caller = _traceparent()
        headers = {"traceparent": tp, "tracestate": "vendor=abc", "content-type": "application/json"}
        r = httpx.post(server.url + "/attend", content=_attend_body(2, 5), headers=headers, timeout=30)
        assert r.status_code == 200, r.text
        spans = _wait_spans(receiver, lambda ss: {"forward", "encode"} <= {s.name for s in ss})
        ours = [s for s in spans if s.trace_id.hex() == trace_id]
        assert {s.name for s in ours} == {"POST /attend", "decode", "queue", "forward", "encode"}, ours
        (req,) = [s for s in ours if s.kind == trace_pb2.Span.SPAN_KIND_SERVER]
        (fwd,) = [s for s in ours if s.name == "forward"]
        assert req.parent_span_id.hex() == caller
        assert fwd.parent_span_id == req.span_id  # its parent chain reaches the HTTP span, then the caller
        assert [(link.trace_id, link.span_id) for link in fwd.links] == [(req.trace_id, req.span_id)]
        assert fwd.trace_state == "vendor=abc"  # tracestate crossed too
        assert receiver.pids[fwd.span_id] == engine and receiver.pids[req.span_id] in fronts
        assert {receiver.pids[s.span_id] for s in ours if s.name != "forward"} == {receiver.pids[req.span_id]}
        assert req.start_time_unix_nano <= fwd.start_time_unix_nano <= fwd.end_time_unix_nano
        assert fwd.end_time_unix_nano <= req.end_time_unix_nano + CLOCK_SLACK_NS
        assert _attrs(fwd)["mha.batch.sequences"] == 2 and _attrs(fwd)["mha.batch.real_tokens"] == 10
    finally:
        server.stop()

"""OpenTelemetry tracing, configured by the standard ``OTEL_*`` variables; off unless asked for.

Tracing is on when ``OTEL_TRACES_EXPORTER`` names an exporter (``otlp``: OTLP over HTTP/protobuf,
``console``: spans printed to stdout) and ``OTEL_SDK_DISABLED`` is not ``true``. Unlike the SDK's own
default (``otlp``), unset means off: a service that nobody told where to send spans sends none.
The SDK reads the rest itself: ``OTEL_EXPORTER_OTLP_[TRACES_]ENDPOINT``/``_HEADERS``/``_TIMEOUT``,
``OTEL_SERVICE_NAME`` and ``OTEL_RESOURCE_ATTRIBUTES``, ``OTEL_TRACES_SAMPLER``/``_ARG``,
``OTEL_BSP_*`` (the batch span processor), ``OTEL_PROPAGATORS`` (W3C ``traceparent``/``tracestate``
and baggage by default).

When tracing is off nothing here imports OpenTelemetry (``from_env`` returns None and the callers
skip every hook with one ``is None`` test; the SDK and the exporter are never loaded), so off costs
nothing measurable (bench/tracing.py). The tracer provider is the app's own, never the global one:
tests can build many apps, and FastAPI's native telemetry (which switches on when a global provider
is set) does not draw a second server span.

Spans, per request: the server span (``POST /attend``; a child of the caller's ``traceparent``),
and under it ``decode``, ``queue`` (the time the request waited for its batch, drawn from the
batcher's figures) and ``encode``. Per batch: one ``forward`` span, with a link to the request span
of every member and the batch's size and padding as attributes. It is parented to the request span
of the first sampled member, so that request's trace shows it in place; the others reach it through
the links. With a model process (MHA_WORKERS >= 2), each request's span context crosses with it as
W3C ``traceparent``/``tracestate`` (``carrier_of``), and the model process, with its own SDK and the
same OTEL_* settings, draws the forward spans (the resource's ``process.pid`` tells the processes
apart).
"""

from __future__ import annotations

import os
import time
from collections.abc import Mapping, Sequence
from typing import Any

EXPORTERS = ("otlp", "console")

_get_current_span: Any = None  # opentelemetry.trace.get_current_span, once some app traces


def exporters_from_env(environ: Mapping[str, str] = os.environ) -> list[str]:
    """The trace exporters the environment asks for; empty means tracing is off."""
    if environ.get("OTEL_SDK_DISABLED", "").strip().lower() == "true":
        return []
    names = [n.strip().lower() for n in environ.get("OTEL_TRACES_EXPORTER", "").split(",") if n.strip()]
    names = [n for n in names if n != "none"]
    for n in names:
        if n not in EXPORTERS:
            raise ValueError(
                f"OTEL_TRACES_EXPORTER={environ['OTEL_TRACES_EXPORTER']!r}: unknown exporter {n!r}; "
                f"mha-serve ships {', '.join(EXPORTERS)} and none"
            )
    if "otlp" in names:
        protocol = (
            environ.get("OTEL_EXPORTER_OTLP_TRACES_PROTOCOL") or environ.get("OTEL_EXPORTER_OTLP_PROTOCOL") or ""
        ).strip()
        if protocol not in ("", "http/protobuf"):
            raise ValueError(
                f"OTLP protocol {protocol!r} is not supported: mha-serve exports OTLP over http/protobuf "
                "(point OTEL_EXPORTER_OTLP_ENDPOINT at the collector's HTTP port, usually 4318)"
            )
    return list(dict.fromkeys(names))


def from_env(*, service_version: str, replica_id: str, environ: Mapping[str, str] = os.environ) -> Tracing | None:
    """A Tracing when the environment turns tracing on, else None (and OpenTelemetry stays unimported)."""
    exporters = exporters_from_env(environ)
    if not exporters:
        return None
    return Tracing(exporters, service_version=service_version, replica_id=replica_id)


def current_ids() -> tuple[str, str] | None:
    """(trace_id, span_id) in hex of the active span, for log lines; None when there is none."""
    if _get_current_span is None:
        return None
    ctx = _get_current_span().get_span_context()
    if not ctx.is_valid:
        return None
    return format(ctx.trace_id, "032x"), format(ctx.span_id, "016x")


class _NoSpan:
    """A reusable context manager that does nothing: the stage span when tracing is off."""

    __slots__ = ()

    def __enter__(self) -> None:
        return None

    def __exit__(self, *exc: object) -> bool:
        return False


NO_SPAN = _NoSpan()


def stage(tracing: Tracing | None, name: str):
    """``with stage(state.tracing, "decode"):`` a child span of the current one; nothing when tracing is
    off, or when the request is not sampled (its children would not be either)."""
    if tracing is None or not _get_current_span().is_recording():
        return NO_SPAN
    return tracing.tracer.start_as_current_span(name)


def carrier_of(span_context: Any) -> dict[str, str]:
    """A span's context as W3C ``traceparent`` (and ``tracestate``) headers: how a request's context
    crosses to the model process (service/messages.py), whose forward span becomes its child."""
    from opentelemetry import trace
    from opentelemetry.trace.propagation.tracecontext import TraceContextTextMapPropagator

    carrier: dict[str, str] = {}
    TraceContextTextMapPropagator().inject(carrier, trace.set_span_in_context(trace.NonRecordingSpan(span_context)))
    return carrier


def _wall_ns(monotonic_s: float) -> int:
    """A time.monotonic() reading as epoch nanoseconds (spans carry wall-clock times)."""
    return int(monotonic_s * 1e9) + (time.time_ns() - time.monotonic_ns())


class Tracing:
    """The tracer provider (SDK, batch span processor, exporters) and the hooks the service calls."""

    def __init__(self, exporters: Sequence[str], *, service_version: str, replica_id: str) -> None:
        global _get_current_span
        from opentelemetry import context, propagate, trace
        from opentelemetry.sdk.resources import Resource
        from opentelemetry.sdk.trace import TracerProvider
        from opentelemetry.sdk.trace.export import BatchSpanProcessor

        self._context, self._propagate, self._trace = context, propagate, trace
        resource = Resource.create(
            {"service.version": service_version, "service.instance.id": replica_id, "process.pid": os.getpid()}
        )  # process.pid: with a model process and front ends, which process drew a span
        if str(resource.attributes.get("service.name", "")).startswith("unknown_service"):
            resource = resource.merge(Resource({"service.name": "mha-serve"}))  # OTEL_SERVICE_NAME unset
        self.provider = TracerProvider(resource=resource)  # the sampler from OTEL_TRACES_SAMPLER(_ARG)
        for name in exporters:
            if name == "otlp":
                from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter

                exporter = OTLPSpanExporter()  # endpoint, headers, timeout from OTEL_EXPORTER_OTLP_*
            else:
                from opentelemetry.sdk.trace.export import ConsoleSpanExporter

                exporter = ConsoleSpanExporter()
            self.provider.add_span_processor(BatchSpanProcessor(exporter))  # OTEL_BSP_* tune it
        self.tracer = self.provider.get_tracer("mha-serve", service_version)
        self.exporters = list(exporters)
        _get_current_span = trace.get_current_span

    def shutdown(self) -> None:
        """Export what is buffered, then stop (the lifespan calls it on the way out)."""
        self.provider.shutdown()

    def force_flush(self, timeout_ms: int = 5000) -> bool:
        return self.provider.force_flush(timeout_ms)

    # -- propagation ---------------------------------------------------------------------------

    def extract(self, carrier: Mapping[str, str]) -> Any:
        """The caller's context from W3C ``traceparent``/``tracestate`` (and baggage) in lower-case
        header names; reusable for gRPC metadata, which is a mapping of the same names."""
        return self._propagate.extract(carrier)

    def remote_span_context(self, carrier: Mapping[str, str]) -> Any:
        """The span context a front end sent with a request (``carrier_of``), or None if it is not valid."""
        from opentelemetry.trace.propagation.tracecontext import TraceContextTextMapPropagator

        ctx = self._trace.get_current_span(TraceContextTextMapPropagator().extract(carrier)).get_span_context()
        return ctx if ctx.is_valid else None

    def current_span_context(self) -> Any:
        """The active span's context, to ride with a request through the batcher (AttendInput.trace);
        None when the request is not sampled (a forward span would not be either)."""
        span = self._trace.get_current_span()
        return span.get_span_context() if span.is_recording() else None

    # -- the request span (ObserveMiddleware) -----------------------------------------------------

    def start_server_span(self, name: str, carrier: Mapping[str, str], attributes: dict[str, Any]) -> RequestSpan:
        """A server span, child of the caller's context in ``carrier`` (HTTP headers or gRPC metadata,
        lower-case names), made current until ``RequestSpan.finish``."""
        parent = self.extract(carrier)
        span = self.tracer.start_span(name, context=parent, kind=self._trace.SpanKind.SERVER, attributes=attributes)
        token = self._context.attach(self._trace.set_span_in_context(span, parent))
        return RequestSpan(self, span, token)

    def start_request(self, scope: dict) -> RequestSpan:
        """The HTTP server span of an ASGI request (named ``METHOD /route`` once the route is known)."""
        headers = {k.decode("latin-1"): v.decode("latin-1") for k, v in scope["headers"]}
        attrs: dict[str, Any] = {
            "http.request.method": scope["method"],
            "url.path": scope["path"],
            "url.scheme": scope.get("scheme", "http"),
            "network.protocol.version": scope.get("http_version", "1.1"),
        }
        if scope.get("server"):
            attrs["server.address"], attrs["server.port"] = scope["server"][0], scope["server"][1]
        if scope.get("client"):
            attrs["client.address"] = scope["client"][0]
        if "user-agent" in headers:
            attrs["user_agent.original"] = headers["user-agent"]
        return self.start_server_span(scope["method"], headers, attrs)

    # -- queue and batch spans ---------------------------------------------------------------------

    def record_queue(self, submitted_monotonic: float, queue_s: float, batch_requests: int) -> None:
        """The ``queue`` span of the current request: from submission until its batch started."""
        if not self._trace.get_current_span().is_recording():
            return
        start = _wall_ns(submitted_monotonic)
        span = self.tracer.start_span("queue", start_time=start, attributes={"mha.batch.requests": batch_requests})
        span.end(end_time=start + int(queue_s * 1e9))

    def batch_finished(self, inputs: Sequence[Any], started_monotonic: float, stats: Any) -> None:
        """One ``forward`` span per batch, linked to the request span of every traced member."""
        trace = self._trace
        members = [i.trace for i in inputs if i.trace is not None and i.trace.is_valid]
        sampled = [c for c in members if c.trace_flags.sampled]
        if not sampled:
            return
        links = [trace.Link(c) for c in members]
        parent = trace.set_span_in_context(trace.NonRecordingSpan(sampled[0]))
        padding = stats.padded_tokens / stats.real_tokens if stats.real_tokens else 1.0
        attrs = {
            "mha.batch.requests": len(inputs),
            "mha.batch.sequences": stats.sequences,
            "mha.batch.padded_tokens": stats.padded_tokens,
            "mha.batch.real_tokens": stats.real_tokens,
            "mha.batch.padding_ratio": padding,
            "mha.forward.compute_ms": stats.compute_s * 1000,
        }
        span = self.tracer.start_span(
            "forward", context=parent, links=links, attributes=attrs, start_time=_wall_ns(started_monotonic)
        )
        span.end()

    def observe_batches(self, inner: Any) -> _BatchObserver:
        """``inner`` (the metrics) as the batcher's observer, plus the forward span of each batch."""
        return _BatchObserver(inner, self)


class _BatchObserver:
    """Forwards every BatcherObserver hook to ``inner``; batch_finished also draws the forward span."""

    def __init__(self, inner: Any, tracing: Tracing) -> None:
        self._inner = inner
        self._tracing = tracing

    def __getattr__(self, name: str) -> Any:
        return getattr(self._inner, name)

    def batch_finished(self, inputs: Sequence[Any], started_monotonic: float, stats: Any) -> None:
        self._inner.batch_finished(inputs, started_monotonic, stats)
        self._tracing.batch_finished(inputs, started_monotonic, stats)


class RequestSpan:
    """The server span of one HTTP request, current while the app handles it."""

    __slots__ = ("_token", "_tracing", "recording", "request_bytes", "response_bytes", "span")

    def __init__(self, tracing: Tracing, span: Any, token: Any) -> None:
        self._tracing = tracing
        self.span = span
        self._token = token
        self.recording = span.is_recording()  # False when sampled out: then only the context is kept
        self.request_bytes = 0
        self.response_bytes = 0

    def wrap_receive(self, receive):
        async def counting_receive():
            message = await receive()
            if message["type"] == "http.request":
                self.request_bytes += len(message.get("body", b""))
            return message

        return counting_receive

    def sent(self, message: dict) -> None:
        if message["type"] == "http.response.body":
            self.response_bytes += len(message.get("body", b""))

    def finish(self, *, error: bool = False) -> None:
        """End the span and restore the context that was current before it."""
        if error:
            self.span.set_status(self._tracing._trace.Status(self._tracing._trace.StatusCode.ERROR))
        self.span.end()
        self._tracing._context.detach(self._token)

    def end(self, scope: dict, status: int, request_id: str) -> None:
        """The HTTP request is answered: route, status and sizes, then finish."""
        if not self.recording:
            self._tracing._context.detach(self._token)
            return
        span = self.span
        route = scope.get("route")
        template = getattr(route, "path", None)
        if template:
            span.set_attribute("http.route", template)
            span.update_name(f"{scope['method']} {template}")
        span.set_attribute("http.response.status_code", status)
        span.set_attribute("http.request.body.size", self.request_bytes)
        span.set_attribute("http.response.body.size", self.response_bytes)
        span.set_attribute("mha.request_id", request_id)
        self.finish(error=status >= 500)  # server spans: 4xx are the caller's errors (semantic conventions)

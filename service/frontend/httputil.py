"""HTTP helpers shared by the routes (/attend, /attend/heatmap, /v2): readiness, bodies, disconnects, 500s."""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Awaitable, Callable
from typing import Any

from starlette.requests import ClientDisconnect, Request
from starlette.responses import Response

from service.engine_api import SequenceFlags, check_step
from service.errors import ServiceError, log_internal_error
from service.frontend.admission import content_length
from service.messages import (
    AttendInput,
    ClientGone,
    EngineFailure,
    ErrorKind,
    Result,
)


def header(request: Request, name: bytes) -> str | None:
    """The first value of header ``name`` (lower-case bytes), or None. Starlette's ``request.headers.get``
    raises and catches a KeyError for every header that is absent (a microsecond each, on the hot routes)."""
    for key, value in request.scope["headers"]:
        if key == name:
            return value.decode("latin-1")
    return None


SEQUENCE_HEADER = b"x-mha-sequence-id"  # what a load balancer hashes on, so that a sequence's steps reach one replica


def check_sequence_header(sequence: SequenceFlags | None, request: Request) -> SequenceFlags | None:
    """``sequence``, once the routing header (when sent) names the same id: a step routed by another id than
    its own would reach a replica that does not hold its sequence."""
    sent = header(request, SEQUENCE_HEADER)
    if sent is not None:
        if sequence is None:
            raise ServiceError("validation_error", "the x-mha-sequence-id header is sent, but the body has no sequence")
        if sent != str(sequence.id):
            raise ServiceError(
                "validation_error",
                f"the x-mha-sequence-id header {sent!r} differs from the body's sequence.id {sequence.id!r}: load "
                "balancers route a step by the header",
            )
    return sequence


def require_ready(state: Any) -> None:
    """503 unless the model is ready and the server is not draining (every route and transport)."""
    if state.draining:
        raise ServiceError("unavailable", "the server is shutting down")
    if not state.ready or state.engine is None or not state.engine.ready:
        raise ServiceError("unavailable", "the model is not ready yet")


async def read_body(request: Request, limit: int) -> bytes:
    """A JSON body (415 for another content-type), refusing (413) anything over ``limit`` bytes."""
    for key, value in request.scope["headers"]:  # header(), without decoding the usual value
        if key == b"content-type":
            if value != b"application/json":
                _check_json(value.decode("latin-1"))
            break
    return await read_limited(request, limit)


def _check_json(value: str) -> None:
    ctype = value.split(";")[0].strip().lower()
    if ctype not in ("application/json", ""):
        raise ServiceError("unsupported_media_type", f"content-type must be application/json, got {ctype!r}")


async def read_limited(request: Request, limit: int) -> bytes | bytearray:
    """The raw body, refusing (413) anything over ``limit`` bytes before reading or parsing it.

    With a Content-Length the body is copied into one buffer of that size as it arrives, so a
    large body takes its size in memory once, not twice (chunks, then their join).
    """
    length = content_length(request.scope)
    if length is not None and length > limit:
        raise ServiceError("payload_too_large", f"the body is {length} bytes, more than max_body_bytes {limit}")
    receive = request.receive  # the ASGI messages as they come: no async generator per chunk (request.stream())
    message = await receive()  # (``_chunk``, inline for the first: one coroutine less for most requests)
    if message["type"] != "http.request":
        raise ClientDisconnect()
    body = message.get("body", b"")
    more = message.get("more_body", False)
    if not more:  # the usual case: the whole body in one message
        if len(body) > limit:
            raise ServiceError("payload_too_large", f"the body exceeds max_body_bytes {limit}")
        return body
    if length is not None and length > 65536:
        buf, pos = bytearray(length), 0
        while True:
            end = pos + len(body)
            if end > length:  # the server enforces Content-Length; never trust it twice
                raise ServiceError("malformed_json", f"the body is longer than its Content-Length {length}")
            buf[pos:end] = body
            pos = end
            if not more:
                break
            body, more = await _chunk(receive)
        del buf[pos:]
        return buf
    chunks, size = [], 0
    while True:
        size += len(body)
        if size > limit:
            raise ServiceError("payload_too_large", f"the body exceeds max_body_bytes {limit}")
        chunks.append(body)
        if not more:
            break
        body, more = await _chunk(receive)
    return b"".join(chunks)


async def _chunk(receive) -> tuple[bytes, bool]:
    """The next piece of the body and whether more follows; ClientDisconnect if the client left instead."""
    message = await receive()
    if message["type"] != "http.request":
        raise ClientDisconnect()
    return message.get("body", b""), message.get("more_body", False)


async def disconnected(request: Request) -> None:
    """Completes when the client goes away (the ASGI server sends http.disconnect)."""
    while True:
        message = await request.receive()
        if message["type"] == "http.disconnect":
            return


def internal_error(exc: BaseException, request: Request) -> ServiceError:
    """Log ``exc`` with a fresh error id; the caller gets the id and nothing of the internals."""
    return log_internal_error(exc, request.method, request.url.path)


async def infer(
    state: Any,
    inp: AttendInput,
    *,
    started: float,
    timeout_s: float,
    request: Request,
    priority: int = 0,
    sequence: SequenceFlags | None = None,
) -> Result | None:
    """Run ``inp`` through the batcher (``run_batcher``), for an HTTP request.

    None means the client went away (the caller answers 499 to nobody). Every route that
    computes attention goes through here, so they share batches, deadlines and fault handling.
    """
    if state.settings.fault_injection and "x-mha-fault" in request.headers:
        inp = dataclasses.replace(inp, fault=request.headers["x-mha-fault"])
    try:
        return await run_batcher(
            state,
            inp,
            deadline=started + timeout_s,
            timeout_s=timeout_s,
            abandoned=lambda: disconnected(request),  # watched only if the answer is not quick
            priority=priority,
            sequence=sequence,
        )
    except ServiceError:
        raise
    except Exception as e:  # the forward failed for this request alone (the batcher isolates faults)
        raise internal_error(e, request) from e


async def run_batcher(
    state: Any,
    inp: AttendInput,
    *,
    deadline: float,
    timeout_s: float,
    abandoned: Awaitable[Any] | Callable[[], Awaitable[Any]] | None,
    priority: int = 0,
    sequence: SequenceFlags | None = None,
) -> Result | None:
    """The batcher's infer (a sequence's step: the engine's ``step``) with its outcomes mapped to the error
    table, for every transport (HTTP, gRPC).

    None means the caller went away (``abandoned`` completed). Other exceptions are the forward's
    own failure for this request; the transport answers them as an opaque internal error.
    """
    engine = state.engine
    tracing = state.tracing
    if tracing is not None:  # the batch's forward span links to this request's span
        submitted = time.monotonic()
        ctx = tracing.current_span_context()
        if ctx is not None:
            inp = dataclasses.replace(inp, trace=ctx)
    try:
        if sequence is None:
            res = await engine.infer(inp, deadline=deadline, abandoned=abandoned, priority=priority)
        else:
            check_step(inp, sequence)  # (a step that cannot be one is refused before it is queued)
            res = await engine.step(inp, sequence, deadline=deadline, abandoned=abandoned, priority=priority)
    except ClientGone:
        return None  # nobody is listening; counted by the engine
    except EngineFailure as e:  # mapped once, by its kind: the kind's value is its error type
        kind = e.kind
        if kind is ErrorKind.INTERNAL:  # the forward's own failure: the transport's opaque 500, logged with an id
            raise
        headers = None
        message = str(e)
        if kind is ErrorKind.OVERLOADED:
            headers = {"retry-after": str(int(e.retry_after_s))}
        elif kind is ErrorKind.DEADLINE:
            message = f"{e} (timeout {timeout_s * 1000:g} ms)"
        raise ServiceError(kind.value, message, headers=headers) from e
    if tracing is not None:
        tracing.record_queue(submitted, res.queue_s, res.batch_requests)
    return res


class Answer(Response):
    """A 200 of the inference routes (/attend, v2 infer, the heatmap), its raw headers built at once:
    content-length, content-type, the timing headers (x-queue-time-ms, x-compute-time-ms, x-batch-size),
    and ``extra``. (Response's own header handling is a tenth of a small request.)"""

    def __init__(self, body: bytes, content_type: bytes, res: Result, extra: tuple = ()) -> None:
        self.status_code = 200
        self.body = body
        self.background = None
        self.raw_headers = [
            (b"content-length", b"%d" % len(body)),
            (b"content-type", content_type),
            (b"x-queue-time-ms", b"%.3f" % (res.queue_s * 1000)),
            (b"x-compute-time-ms", b"%.3f" % (res.compute_s * 1000)),
            (b"x-batch-size", b"%d" % res.batch_requests),
            *extra,
        ]


# A body of at least this many bytes is sent in its pieces, each from where it lies (a join would copy it all
# into fresh pages); a smaller one is joined and sent at once (each ASGI send costs the server a write).
SEND_PARTS_FROM = 64 << 10


def answer_of_parts(parts: list, content_type: bytes, res: Result, extra: tuple = ()) -> Answer:
    """A 200 whose body is ``parts`` (bytes, or arrays of this request's own answer): joined when small, else
    sent in its pieces (:class:`Parts`)."""
    views = [p if type(p) is bytes else memoryview(p).cast("B") for p in parts]
    if sum(len(p) for p in views) < SEND_PARTS_FROM:
        return Answer(b"".join(views), content_type, res, extra)
    return Parts(views, content_type, res, extra)


class Parts(Answer):
    """An Answer whose body goes out in pieces, each as it lies: a binary tensor is sent from the array that holds
    it, not joined with its JSON header into one bytes object first (a fresh allocation and a copy of it all).
    The pieces (bytes or byte memoryviews: ``answer_of_parts`` makes them) must stay unchanged until sent:
    arrays of this request's own answer."""

    def __init__(self, parts: list, content_type: bytes, res: Result, extra: tuple = ()) -> None:
        self.parts = parts
        super().__init__(b"", content_type, res, extra)
        self.raw_headers[0] = (b"content-length", b"%d" % sum(len(p) for p in parts))

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        await send({"type": "http.response.start", "status": self.status_code, "headers": self.raw_headers})
        *first, last = self.parts or [b""]
        for part in first:
            await send({"type": "http.response.body", "body": part, "more_body": True})
        await send({"type": "http.response.body", "body": last})

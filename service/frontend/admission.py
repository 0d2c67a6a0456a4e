"""Admission before parsing: bound the inference requests, and their body bytes, in flight.

One ``Admission`` per app counts HTTP's requests (this middleware) and gRPC's ModelInfer calls
(service.frontend.grpc_server's interceptor) together, against the same two bounds.

A pure ASGI middleware in front of the inference routes (``/attend``, ``/attend/heatmap``,
``/v2/models/{name}[/versions/{v}]/infer``). Before a body is read it admits the request
against two bounds held until the response is sent:

- ``max_inflight_requests`` requests at once, and
- ``max_inflight_bytes`` body bytes at once: the declared ``Content-Length``, or, for a chunked
  body, the bytes counted as they stream in.

Past either bound the answer is 429 with ``Retry-After`` and the route's error body (the same
as the queue's 429), before anything is read. A body must also arrive whole within
``body_read_timeout_s`` of the request's start, or the answer is 408 and the connection is
closed, so a client trickling its body cannot hold a slot, and its bytes, for ever.
(TEI's ``max_concurrent_requests`` is the same idea for the request count.)
"""

from __future__ import annotations

import asyncio
import re
import time
from typing import Any

import orjson

from service.errors import ServiceError
from service.sweep import Sweep

INFERENCE_PATH = re.compile(r"/attend(/heatmap)?|/v2/models/[^/]+(/versions/[^/]+)?/infer")
HOT_MATCH = "mha.fastroute"  # the scope key HotRoutes sets on the hot inference POSTs it dispatches
RETRY_AFTER_S = 1  # bodies in flight drain in well under a second


class Admission:
    """The counters; all calls come from the event loop's thread."""

    def __init__(self, max_requests: int, max_bytes: int) -> None:
        self.max_requests = max_requests
        self.max_bytes = max_bytes
        self.requests = 0
        self.bytes = 0

    def admit(self, nbytes: int) -> None:
        """Take a slot and ``nbytes``, or raise ServiceError(overloaded)."""
        if self.requests >= self.max_requests:
            raise _overloaded(
                f"too many requests in flight ({self.requests}; limit max_inflight_requests {self.max_requests})"
            )
        self.take(nbytes)
        self.requests += 1

    def take(self, nbytes: int) -> None:
        """Take ``nbytes`` more for an admitted request whose size is now known (a gRPC message, once read), or
        raise ServiceError(overloaded)."""
        if self.bytes + nbytes > self.max_bytes:
            raise _overloaded(
                f"too many body bytes in flight ({self.bytes} + this request's {nbytes}; limit "
                f"max_inflight_bytes {self.max_bytes})"
            )
        self.bytes += nbytes

    def grow(self, held: int, more: int) -> None:
        """A chunked body grew by ``more`` bytes: take them too, or raise ServiceError(overloaded)."""
        if self.bytes + more > self.max_bytes:
            raise _overloaded(
                f"too many body bytes in flight ({self.bytes}, this request's body at {held + more} and growing; "
                f"limit max_inflight_bytes {self.max_bytes})"
            )
        self.bytes += more

    def release(self, nbytes: int) -> None:
        """Give back a request's slot and the ``nbytes`` it holds."""
        self.requests -= 1
        self.bytes -= nbytes


def _overloaded(message: str) -> ServiceError:
    return ServiceError("overloaded", message, headers={"retry-after": str(RETRY_AFTER_S)})


class AdmissionMiddleware:
    def __init__(self, app: Any, *, admission: Admission, max_body_bytes: int, body_read_timeout_s: float) -> None:
        self.app = app
        self.admission = admission
        self.max_body_bytes = max_body_bytes
        self.timeout_s = body_read_timeout_s
        self.reads = _Reads()

    async def __call__(self, scope, receive, send) -> None:
        hot = HOT_MATCH in scope  # a hot route (service/frontend/fastroute.py): an inference POST already
        if not hot and (
            scope["type"] != "http" or scope["method"] != "POST" or not INFERENCE_PATH.fullmatch(scope["path"])
        ):
            return await self.app(scope, receive, send)
        declared = content_length(scope)
        # A body declared over max_body_bytes is answered 413 by the route without being read.
        held = declared if declared is not None and declared <= self.max_body_bytes else 0
        try:
            self.admission.admit(held)
        except ServiceError as e:
            return await _answer(scope, send, e)
        deadline = time.monotonic() + self.timeout_s
        body_done = False
        reads = self.reads

        async def guarded_receive() -> dict:
            nonlocal body_done, held
            if body_done:
                return await receive()  # after the body: the disconnect watch, unbounded
            task = reads.start(deadline)
            try:
                message = await receive()
            except asyncio.CancelledError:
                if reads.expired(task):
                    raise ServiceError(
                        "request_timeout",
                        f"the request body did not arrive within body_read_timeout_s {self.timeout_s:g} s",
                        headers={"connection": "close"},
                    ) from None
                raise
            finally:
                reads.end(task)
            if message["type"] == "http.request":
                if declared is None:
                    n = len(message.get("body", b""))
                    self.admission.grow(held, n)
                    held += n
                body_done = not message.get("more_body", False)
            return message

        try:
            await self.app(scope, guarded_receive, send)
        finally:
            self.admission.release(held)


class _Reads:
    """The body reads in progress and their deadlines, swept every SWEEP_S (``service.sweep.Sweep``, the
    batcher's sweeper too): an overdue read's task is cancelled, and ``expired`` tells that cancel from any
    other. A dict entry per read, where a timer per read (``asyncio.timeout_at``) cost a tenth of a small
    request's CPU; the bound holds to within SWEEP_S."""

    SWEEP_S = 0.25

    def __init__(self) -> None:
        self.deadlines: dict[asyncio.Task, float] = {}
        self.overdue: set[asyncio.Task] = set()
        self.sweep = Sweep(self.SWEEP_S, self._expire)

    def start(self, deadline: float) -> asyncio.Task:
        task = asyncio.current_task()
        self.deadlines[task] = deadline
        if not self.sweep.armed:
            self.sweep.arm()
        return task

    def end(self, task: asyncio.Task) -> None:
        self.deadlines.pop(task, None)

    def expired(self, task: asyncio.Task) -> bool:
        """True (once) when the sweep cancelled ``task``: the cancel is ours, and is taken back."""
        if task in self.overdue:
            self.overdue.discard(task)
            if hasattr(task, "uncancel"):  # Python 3.11+
                task.uncancel()
            return True
        return False

    def _expire(self, now: float) -> bool:
        """Cancel the reads past their deadline; whether any read is still in progress (the sweeps go on)."""
        for task, deadline in list(self.deadlines.items()):
            if deadline <= now:
                del self.deadlines[task]
                self.overdue.add(task)
                task.cancel()
        return bool(self.deadlines)


def content_length(scope) -> int | None:
    """The declared Content-Length, or None (absent, or not a plain non-negative integer)."""
    for name, value in scope["headers"]:
        if name == b"content-length":
            return int(value) if value.isdigit() else None
    return None


async def _answer(scope, send, err: ServiceError) -> None:
    """The route's error shape: the Open Inference Protocol's ``{"error": "..."}`` under /v2."""
    body = orjson.dumps({"error": err.message} if scope["path"].startswith("/v2") else err.body())
    headers = [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]
    headers += [(k.encode(), v.encode()) for k, v in err.headers.items()]
    await send({"type": "http.response.start", "status": err.status, "headers": headers})
    await send({"type": "http.response.body", "body": body})

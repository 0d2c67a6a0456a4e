"""One table: error type -> HTTP status, one body shape ``{"error": {"type", "message"}}``."""

from __future__ import annotations

import contextlib
import logging
import uuid
from typing import Any

import orjson
from starlette.requests import ClientDisconnect

from service.logs import new_request_id, request_id_var

log = logging.getLogger("mha_serve")

ERROR_STATUS: dict[str, int] = {
    "malformed_json": 400,
    "sequence_start_required": 400,
    "unauthorized": 401,
    "not_found": 404,
    "method_not_allowed": 405,
    "request_timeout": 408,
    "payload_too_large": 413,
    "unsupported_media_type": 415,
    "validation_error": 422,
    "numeric_overflow": 422,
    "overloaded": 429,
    "internal_error": 500,
    "unavailable": 503,
    "deadline_exceeded": 504,
}

# What a route that computes attention (/attend, /attend/heatmap, /v2 infer) can answer besides 200.
INFERENCE_ERRORS = (
    "malformed_json",
    "payload_too_large",
    "unsupported_media_type",
    "request_timeout",
    "validation_error",
    "sequence_start_required",
    "numeric_overflow",
    "overloaded",
    "internal_error",
    "unavailable",
    "deadline_exceeded",
)

ERROR_DESCRIPTIONS: dict[str, str] = {
    "malformed_json": "the body is not valid JSON",
    "sequence_start_required": "a sequence step without the start flag for a sequence id this server does not "
    "hold (never started, ended, reaped after MHA_SEQUENCE_IDLE_S idle, evicted from a full KV cache, or lost with "
    "its replica): replay the sequence from its first step, with start (Triton's INVALID_ARG)",
    "unauthorized": "missing or wrong API key",
    "not_found": "no such route or model",
    "method_not_allowed": "the route exists but not with this method",
    "request_timeout": "the body did not arrive within body_read_timeout_s; the connection is closed",
    "payload_too_large": "the body exceeds max_body_bytes (checked before parsing)",
    "unsupported_media_type": "the body is not application/json",
    "validation_error": "the request is well-formed JSON but breaks the contract",
    "numeric_overflow": "the result overflowed the model's (or the response's) dtype: send smaller values, or "
    "serve a float32 model; retrying the same request gives the same answer",
    "overloaded": "the queue, or the requests or body bytes in flight, are at their bound; retry after the "
    "Retry-After header's seconds",
    "internal_error": "an unexpected failure; the message carries an error id found in the logs",
    "unavailable": "not ready (starting or shutting down)",
    "deadline_exceeded": "the request's deadline passed before it was answered",
}


class ServiceError(Exception):
    """An error with a type from ERROR_STATUS and a message for the caller."""

    def __init__(self, type: str, message: str, *, headers: dict[str, str] | None = None) -> None:
        if type not in ERROR_STATUS:
            raise KeyError(f"unknown error type {type!r}")
        super().__init__(message)
        self.type = type
        self.message = message
        self.headers = headers or {}

    @property
    def status(self) -> int:
        return ERROR_STATUS[self.type]

    def body(self) -> dict[str, Any]:
        return {"error": {"type": self.type, "message": self.message}}


def validation(message: str) -> ServiceError:
    return ServiceError("validation_error", message)


def status_descriptions(*types: str) -> dict[int, str]:
    """Status -> description, joining the types that share a status (422: validation, overflow)."""
    out: dict[int, str] = {}
    for t in types:
        status = ERROR_STATUS[t]
        out[status] = f"{out[status]}; or {ERROR_DESCRIPTIONS[t]}" if status in out else ERROR_DESCRIPTIONS[t]
    return out


class InternalErrors:
    """ASGI middleware: an exception that escapes a route becomes the one opaque 500, logged once.

    Installed inside the request-id middleware, so the 500 carries ``x-request-id`` and the log
    line its id, like every other answer. Without it the exception reached Starlette's outermost
    ServerErrorMiddleware (outside the request id) and then uvicorn, which logged it a second time.
    """

    def __init__(self, app) -> None:
        self.app = app

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        try:
            await self.app(scope, receive, send)
        except ClientDisconnect:  # the client left while its body was read: nobody to answer, nothing broke
            return
        except Exception as exc:
            err = log_internal_error(exc, scope.get("method", ""), scope.get("path", ""))
            # No send wrapper watches for the response's start (two calls a request): if it had started, the
            # server refuses this second start (uvicorn: RuntimeError) and closes the unfinished response.
            with contextlib.suppress(Exception):
                await _send_error(scope, send, err, [])


async def _send_error(scope, send, err: ServiceError, headers: list) -> None:
    v2 = scope.get("path", "").startswith("/v2")  # the Open Inference Protocol's error shape
    body = orjson.dumps({"error": err.message} if v2 else err.body())
    headers = [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode()), *headers]
    await send({"type": "http.response.start", "status": err.status, "headers": headers})
    await send({"type": "http.response.body", "body": body})


async def answer_escaped(scope, send, exc: Exception) -> None:
    """An exception that escaped every middleware of a hot route (service/frontend/fastroute.py runs them
    without Starlette's ServerErrorMiddleware): raised by a middleware outside InternalErrors, so not yet
    logged. Logged once here, and answered as InternalErrors does, with the request's id, unless the
    response had started (then the server refuses a second start, and the log line is all there is)."""
    if isinstance(exc, ClientDisconnect):
        return
    rid = request_id_var.get() or new_request_id()  # the request-id middleware's, unless it failed before setting it
    token = request_id_var.set(rid)
    try:
        err = log_internal_error(exc, scope.get("method", ""), scope.get("path", ""))
    finally:
        request_id_var.reset(token)
    with contextlib.suppress(Exception):  # RuntimeError from uvicorn when the response had started
        await _send_error(scope, send, err, [(b"x-request-id", rid.encode())])


def log_internal_error(exc: BaseException, method: str, path: str, logger: logging.Logger = log) -> ServiceError:
    """Log ``exc`` with its traceback and a fresh error id; the caller gets the id, nothing of the internals."""
    error_id = uuid.uuid4().hex[:12]
    logger.error(
        "internal error %s on %s %s: %r",
        error_id,
        method,
        path,
        exc,
        exc_info=(type(exc), exc, exc.__traceback__),
        extra={"error_id": error_id},
    )
    return ServiceError("internal_error", f"internal error (id {error_id}); see the server log")

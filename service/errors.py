"""One table: error type -> HTTP status, one body shape ``{"error": {"type", "message"}}``."""

from __future__ import annotations

from typing import Any

ERROR_STATUS: dict[str, int] = {
    "malformed_json": 400,
    "unauthorized": 401,
    "not_found": 404,
    "method_not_allowed": 405,
    "request_timeout": 408,
    "payload_too_large": 413,
    "unsupported_media_type": 415,
    "validation_error": 422,
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
    "overloaded",
    "internal_error",
    "unavailable",
    "deadline_exceeded",
)

ERROR_DESCRIPTIONS: dict[str, str] = {
    "malformed_json": "the body is not valid JSON",
    "unauthorized": "missing or wrong API key",
    "not_found": "no such route or model",
    "method_not_allowed": "the route exists but not with this method",
    "request_timeout": "the body did not arrive within body_read_timeout_s; the connection is closed",
    "payload_too_large": "the body exceeds max_body_bytes (checked before parsing)",
    "unsupported_media_type": "the body is not application/json",
    "validation_error": "the request is well-formed JSON but breaks the contract",
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


def error_responses(*types: str) -> dict[int | str, dict[str, Any]]:
    """OpenAPI ``responses=`` for a route, built from the same table the handlers use."""
    from service.schemas import ErrorBody

    return {ERROR_STATUS[t]: {"model": ErrorBody, "description": ERROR_DESCRIPTIONS[t]} for t in types}

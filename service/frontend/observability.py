"""The ASGI middleware that sets request ids and writes the access log (the logs: ``service.logs``).

The middleware is pure ASGI (cheaper than BaseHTTPMiddleware). For every HTTP request it:
takes ``x-request-id`` from the caller (or makes one) and echoes it; adds ``x-served-by``;
checks the API key where one is needed; counts the request and its latency (and, on the inference
routes, keeps ``mha_requests_in_flight``); writes one JSON access-log line. With tracing on it also
opens the request's server span (a child of the caller's ``traceparent``), current while the app
runs, so log lines carry its ``trace_id``.
"""

from __future__ import annotations

import hmac
import re
import time

import orjson

from service import tracing
from service.frontend.admission import HOT_MATCH
from service.logs import access, new_request_id, request_id_var
from service.metrics import Metrics

_SAFE_ID = re.compile(r"[A-Za-z0-9._:\-]{1,128}")


class ApiKeys:
    """Bearer API keys, compared in constant time against every key (no early exit)."""

    def __init__(self, keys: list[str]) -> None:
        self._keys = [k.encode() for k in keys]

    def __bool__(self) -> bool:
        return bool(self._keys)

    def check(self, authorization: bytes | None) -> bool:
        scheme, _, token = (authorization or b"").partition(b" ")
        token = token.strip() if scheme.lower() == b"bearer" else b""
        ok = False
        for key in self._keys:
            ok |= hmac.compare_digest(token, key)
        return ok and bool(token)


class ObserveMiddleware:
    OPEN = frozenset({"/healthz", "/readyz", "/v2/health/live", "/v2/health/ready", "/docs", "/openapi.json", "/"})
    ROUTES = frozenset({"/attend", "/attend/heatmap", "/healthz", "/readyz", "/v1/model", "/metrics", "/"})
    INFERENCE = frozenset({"/attend", "/attend/heatmap"})  # and /v2/models/.../infer
    UNTRACED = frozenset({"/healthz", "/readyz", "/v2/health/live", "/v2/health/ready", "/metrics"})  # probes

    def __init__(
        self,
        app,
        *,
        metrics: Metrics,
        replica_id: str,
        api_keys: ApiKeys,
        protect_metrics: bool,
        access_log_enabled: bool = True,
        tracing: tracing.Tracing | None = None,
    ) -> None:
        self.app = app
        self.metrics = metrics
        self.served_by = replica_id.encode("latin-1", "replace")
        self.keys = api_keys
        self.keyed = bool(api_keys)  # read per request: ApiKeys.__bool__ is a Python call
        self.open = self.OPEN if protect_metrics else self.OPEN | {"/metrics"}
        self.access_log = access_log_enabled
        self.tracing = tracing
        self.tally = metrics.tally

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        t0 = time.perf_counter()
        path = scope["path"]
        if path == "/metrics":
            self.tally.flush()  # what this turn counted, before it is read
        given = authorization = None
        for name, value in scope["headers"]:  # the last of each counts, as in a dict of them
            if name == b"x-request-id":
                given = value
            elif name == b"authorization":
                authorization = value
        rid = given.decode("latin-1") if given else ""
        if not rid or not _SAFE_ID.fullmatch(rid):
            rid = new_request_id()
        token = request_id_var.set(rid)
        extra = [(b"x-served-by", self.served_by), (b"x-request-id", rid.encode())]
        status = 500
        span = None if self.tracing is None or path in self.UNTRACED else self.tracing.start_request(scope)
        if span is not None and span.recording:
            receive = span.wrap_receive(receive)
        inference = (  # a hot route's POST (service/frontend/fastroute.py) is one; the match says so already
            HOT_MATCH in scope or path in self.INFERENCE or (path.startswith("/v2/models/") and path.endswith("/infer"))
        )
        tally = self.tally
        if inference:
            tally.in_flight += 1
            tally.schedule()

        def send_wrapper(message):  # returns send's awaitable: no coroutine of its own (two calls a request)
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
                message["headers"] = [*message.get("headers", []), *extra]
            if span is not None and span.recording:
                span.sent(message)
            return send(message)

        try:
            needs_key = self.keyed and path not in self.open and scope["method"] != "OPTIONS"  # CORS preflight: no key
            if needs_key and not self.keys.check(authorization):
                await self._unauthorized(path, send_wrapper)
            else:
                await self.app(scope, receive, send_wrapper)
        finally:
            elapsed = time.perf_counter() - t0
            if inference:
                tally.in_flight -= 1
            route = path if path in self.ROUTES else ("/v2" if path.startswith("/v2") else "other")
            tally.done(route, status, elapsed)
            if self.access_log:
                access(scope["method"], path, status, elapsed, rid)
            if span is not None:
                span.end(scope, status, rid)
            request_id_var.reset(token)

    @staticmethod
    async def _unauthorized(path: str, send) -> None:
        message = "missing or invalid API key: send Authorization: Bearer <key>"
        if path.startswith("/v2"):  # the Open Inference Protocol's error shape
            body = orjson.dumps({"error": message})
        else:
            body = orjson.dumps({"error": {"type": "unauthorized", "message": message}})
        await send(
            {
                "type": "http.response.start",
                "status": 401,
                "headers": [
                    (b"content-type", b"application/json"),
                    (b"content-length", str(len(body)).encode()),
                    (b"www-authenticate", b'Bearer realm="mha-serve"'),
                ],
            }
        )
        await send({"type": "http.response.body", "body": body})

"""The Open Inference Protocol (KServe v2) over HTTP, with Triton's binary tensor extension.

``build_router(state)`` answers, for the one served model (``settings.model_name``, version "1"):

    GET  /v2, /v2/                              server metadata and extensions
    GET|HEAD /v2/health/live, /v2/health/ready  200, or 503 while not ready (as /readyz)
    GET  /v2/models/{name}[/versions/1]         model metadata
    GET  /v2/models/{name}[/versions/1]/ready   200, or 503 while not ready
    GET  /v2/models/{name}[/versions/1]/config  Triton's model configuration (what perf_analyzer reads)
    GET  /v2/models/{name}[/versions/1]/stats   Triton's statistics extension (service/frontend/stats.py)
    POST /v2/repository/index                   the one model and its state
    POST /v2/models/{name}[/versions/1]/infer   inference, through the same batcher as /attend

The protocol itself (tensors, parameters, config, metadata) is in service/frontend/oip.py, shared with gRPC.

Contract of ``infer``:
- Inputs: ``x`` FP32|FP16|BF16 [B, T, E]; optional ``lengths`` INT32|INT64 [B] or [B, 1]; optional
  ``attn_mask`` BOOL [T, T] or [B, T, T]. JSON ``data`` may be flat (row-major) or nested; its
  element count must match ``shape``. BF16 in JSON takes numbers, rounded to bfloat16 as the
  binary path would carry them.
- Binary tensor extension: the body is a JSON header of ``Inference-Header-Content-Length``
  bytes, then the raw little-endian, row-major bytes of each input that has
  ``parameters.binary_data_size``, in input order (BOOL: one byte, 0 or 1). Without the header
  the whole body is JSON. ``Content-Encoding: gzip|deflate`` bodies are inflated first.
- Outputs: ``output`` [B, T, E] and ``weights`` [B, H', T, T], in the datatype of ``x``.
  Without ``outputs`` only ``output`` comes back: ``weights`` is computed only when asked for
  by name (an exception to the protocol, explained in docs/protocol.md). An output is binary when
  its ``parameters.binary_data`` is true, or, when it does not say, when the request's
  ``parameters.binary_data_output`` is true; then the response is
  ``application/octet-stream``: JSON header (length in ``Inference-Header-Content-Length``)
  followed by the blobs in output order.
- Request parameters: ``causal`` (bool), ``heads`` (list of ints, one int, or "0,2"),
  ``timeout_ms`` (> 0) or Triton's ``timeout`` (microseconds; 0 = default), and Triton's
  ``priority`` (an integer 0..MHA_PRIORITY_LEVELS, 1 the highest, 0 the default level; the same
  check and message as /attend's field), and Triton's sequence parameters ``sequence_id`` (an
  unsigned 64-bit integer or a string), ``sequence_start``, ``sequence_end`` (booleans): a step of
  a sequence (docs/sequences.md), answered with ``sequence_id`` in the response's parameters. The
  sequence model (``<model>-seq``, its config with ``sequence_batching``) needs them on every
  request; the plain model takes them too. Others are ignored, as Triton ignores what a model does
  not use.
- Errors answer ``{"error": "<message>"}`` with the status of ``service.errors.ERROR_STATUS``,
  the table /attend uses: 400 malformed JSON or header, 404 unknown model or version, 413 too
  large, 415 unknown Content-Encoding, 422 a request that breaks the contract (datatypes,
  shapes, sizes, names), 429 overloaded (Retry-After), 503 not ready, 504 deadline, 500 other.
"""

from __future__ import annotations

import inspect
import logging
import math
import time
import zlib
from collections.abc import Callable, Coroutine
from dataclasses import dataclass
from typing import Any

import numpy as np
import orjson
from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse, Response
from fastapi.routing import APIRoute
from pydantic import BaseModel
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.requests import ClientDisconnect
from starlette.routing import Match

from service.errors import INFERENCE_ERRORS, ServiceError, status_descriptions, validation
from service.frontend import codecs, oip
from service.frontend.decode import Limits, check_priority, lengths_in_range, parse_json
from service.frontend.httputil import Answer, answer_of_parts, header, internal_error, read_limited, require_ready
from service.frontend.httputil import infer as run_inference
from service.frontend.offload_worker import V2_RANKS, Failed
from service.frontend.plans import Recent, Sightings
from service.messages import AttendInput
from service.tracing import stage

log = logging.getLogger("mha_serve.v2")

VERSION = oip.VERSION
HEADER_LENGTH = "inference-header-content-length"
HEADER_LENGTH_RAW = HEADER_LENGTH.encode()
_METHODS = ["GET", "POST", "PUT", "DELETE", "PATCH", "HEAD", "OPTIONS", "TRACE", "CONNECT"]

INFER_ERRORS = ("not_found", *INFERENCE_ERRORS)


class V2Error(BaseModel):
    error: str


def _responses(*types: str) -> dict[int | str, dict[str, Any]]:
    return {status: {"model": V2Error, "description": d} for status, d in status_descriptions(*types).items()}


def _error_response(err: ServiceError) -> JSONResponse:
    return JSONResponse({"error": err.message}, status_code=err.status, headers=err.headers)


async def _answer(request: Request, handler: Callable[..., Coroutine[Any, Any, Response]], *args: Any) -> Response:
    """``handler(request, *args)``, its errors in the protocol's shape (StarletteHTTPException: FastAPI's)."""
    try:
        return await handler(request, *args)
    except Exception as e:
        return _error_of(e, request)


def _error_of(exc: Exception, request: Request) -> Response:
    """A v2 route's exception in the protocol's shape: a ServiceError's own, any other an opaque 500; FastAPI's
    StarletteHTTPException and a ClientDisconnect (nobody to answer; InternalErrors keeps it silent) go on."""
    if isinstance(exc, ServiceError):
        return _error_response(exc)
    if isinstance(exc, (StarletteHTTPException, ClientDisconnect)):
        raise exc
    return _error_response(internal_error(exc, request))


class _V2Route(APIRoute):
    """Errors of v2 routes answer the protocol's ``{"error": "..."}``, not /attend's object."""

    def get_route_handler(self) -> Callable[[Request], Coroutine[Any, Any, Response]]:
        handler = super().get_route_handler()

        async def route(request: Request) -> Response:
            return await _answer(request, handler)

        return route


def build_router(state: Any) -> APIRouter:
    """The v2 routes over ``state`` (service.frontend.state.AppState): its settings, runner, batcher, limits, stats.

    ``router.hot_routes`` lists the inference routes for service.frontend.fastroute.HotRoutes: (path regex, handler,
    path template).
    Its last routes answer every other /v2 path (404/405 in the protocol's shape), so include
    this router after any other route under /v2, and before any catch-all mount at "/".
    """
    settings = state.settings
    router = APIRouter(prefix="/v2", tags=["v2 (Open Inference Protocol)"], route_class=_V2Route)
    plans = HeaderPlans(settings.model_name, PLAN_CACHE_SIZE)  # recent binary requests' headers, checked

    def check_model(name: str, version: str | None = None) -> bool:
        return oip.check_model(name, version, settings.model_name)

    async def server_metadata() -> dict[str, Any]:
        return oip.server_metadata()

    router.add_api_route("", server_metadata, methods=["GET"], summary="Server metadata")
    router.add_api_route("/", server_metadata, methods=["GET"], include_in_schema=False)

    @router.get("/health/live", summary="Liveness: 200 while the process answers (HEAD too)")
    async def live() -> dict[str, bool]:
        return {"live": True}

    @router.get(
        "/health/ready", summary="Readiness: 200 when ready, else 503 (HEAD too)", responses=_responses("unavailable")
    )
    async def ready() -> dict[str, bool]:
        require_ready(state)
        return {"ready": True}

    router.add_api_route("/health/live", live, methods=["HEAD"], include_in_schema=False)
    router.add_api_route("/health/ready", ready, methods=["HEAD"], include_in_schema=False)

    @router.post("/repository/index", summary="The models this server serves, and their state")
    async def repository_index() -> list[dict[str, str]]:
        return oip.repository_index(settings.model_name, state.ready and not state.draining)

    def metadata(name: str, version: str | None) -> dict[str, Any]:
        check_model(name, version)
        if state.engine is None or state.engine.model is None:
            raise ServiceError("unavailable", "the model is still loading")
        return oip.model_metadata(name, state.engine.model.config)

    def config(name: str, version: str | None) -> dict[str, Any]:
        seq = check_model(name, version)
        model = state.engine.model if state.engine is not None else None
        if model is None:
            raise ServiceError("unavailable", "the model is still loading")
        return oip.model_config(name, model.config, settings, model.device, sequence=seq)

    async def stats(name: str, version: str | None) -> dict[str, Any]:
        check_model(name, version)  # (one engine: both models' statistics are its own)
        if state.engine is not None:
            await state.engine.flush_statistics()  # the model process's latest batches too
        return {"model_stats": [state.stats.model_stats(name, VERSION)]}

    def model_ready(name: str, version: str | None) -> dict[str, Any]:
        check_model(name, version)
        require_ready(state)
        return {"name": name, "ready": True}

    async def infer(request: Request, name: str, version: str | None = None) -> Response:
        """POST .../infer, its errors answered here in the protocol's shape (``_error_of``, as ``_answer`` does: the
        hot path calls this directly, a coroutine less a request)."""
        started = time.monotonic()
        try:
            seq_model = check_model(name, version)
        except ServiceError as e:
            return _error_response(e)
        try:
            require_ready(state)
            body = await _read_body(request, settings.max_body_bytes)
            header_length = header(request, HEADER_LENGTH_RAW)
            with stage(state.tracing, "decode"):
                head = await _offloaded_header(state.offload, body, header_length)
                req, inp, timeout_s, priority = plans.decode(
                    body, header_length, state.engine.model.config, state.limits, head=head, sequence_model=seq_model
                )
            decoded = time.monotonic()
            sequence = req.sequence if type(req) is oip.InferPlan else None  # (a Plan is never a step's)
            res = await run_inference(
                state, inp, started=started, timeout_s=timeout_s, request=request, priority=priority, sequence=sequence
            )
            if res is None:
                return Response(status_code=499)
            answered = time.monotonic()
            tensors = {"output": res.output.output, "weights": res.output.weights}
            with stage(state.tracing, "encode"):
                payload, header_len = _encode(req, name, tensors)
        except Exception as e:
            if isinstance(e, ServiceError):
                state.stats.request_failed(time.monotonic() - started)
            return _error_of(e, request)
        state.stats.request_done(sequences=inp.batch, started=started, decoded=decoded, answered=answered, res=res)
        if header_len is None:
            return Answer(payload[0], b"application/json", res)
        extra = ((b"inference-header-content-length", b"%d" % header_len),)
        return answer_of_parts(payload, b"application/octet-stream", res, extra)  # large: from their arrays

    def versioned(fn: Callable[..., Any], *, with_request: bool = False) -> tuple[Callable, Callable]:
        """(handler of /models/{name}/..., handler of /models/{name}/versions/{version}/...)."""
        if with_request:

            async def plain_r(request: Request, name: str) -> Any:
                return await fn(request, name, None)

            async def version_r(request: Request, name: str, version: str) -> Any:
                return await fn(request, name, version)

            return plain_r, version_r

        async def plain(name: str) -> Any:
            out = fn(name, None)
            return await out if inspect.isawaitable(out) else out

        async def with_version(name: str, version: str) -> Any:
            out = fn(name, version)
            return await out if inspect.isawaitable(out) else out

        return plain, with_version

    def add(suffix: str, fn: Callable[..., Any], method: str = "GET", with_request: bool = False, **kw: Any) -> None:
        plain, with_version = versioned(fn, with_request=with_request)
        router.add_api_route("/models/{name}" + suffix, plain, methods=[method], **kw)
        router.add_api_route("/models/{name}/versions/{version}" + suffix, with_version, methods=[method], **kw)

    not_found = _responses("not_found", "unavailable")
    add("", metadata, summary="Model metadata", responses=not_found)
    add("/ready", model_ready, summary="Model readiness: 200 when ready, else 503", responses=not_found)
    add("/config", config, summary="Model configuration (Triton's model_config.proto as JSON)", responses=not_found)
    add("/stats", stats, summary="Model statistics (Triton's statistics extension)", responses=_responses("not_found"))
    inf = {
        "summary": "Inference (JSON, or JSON header + binary tensors)",
        "response_class": Response,
        "responses": {
            200: {
                "description": "JSON, or (when an output is binary) application/octet-stream: JSON header of "
                "Inference-Header-Content-Length bytes, then the output blobs; headers x-queue-time-ms, "
                "x-compute-time-ms, x-batch-size"
            },
            **_responses(*INFER_ERRORS),
        },
        "openapi_extra": {
            "requestBody": {
                "required": True,
                "content": {
                    "application/json": {"schema": {"type": "object"}},
                    "application/octet-stream": {"schema": {"type": "string", "format": "binary"}},
                },
            }
        },
    }
    add("/infer", infer, "POST", with_request=True, **inf)

    # POST .../infer as plain ASGI (service/frontend/fastroute.py); the routes above document it and answer
    # what the fast path passes on. Starlette's str parameters match [^/]+, as here.
    router.hot_routes = [
        (r"/v2/models/(?P<name>[^/]+)/infer", infer, "/v2/models/{name}/infer"),
        (
            r"/v2/models/(?P<name>[^/]+)/versions/(?P<version>[^/]+)/infer",
            infer,
            "/v2/models/{name}/versions/{version}/infer",
        ),
    ]
    routes = list(router.routes)

    async def no_route(request: Request, path: str = "") -> Response:
        """Other /v2 paths and methods answer in the protocol's shape too."""
        if any(r.matches(request.scope)[0] != Match.NONE for r in routes):
            raise ServiceError("method_not_allowed", f"{request.url.path} does not accept {request.method}")
        raise ServiceError("not_found", f"no route {request.method} {request.url.path}")

    router.add_api_route("", no_route, methods=_METHODS, include_in_schema=False)
    router.add_api_route("/{path:path}", no_route, methods=_METHODS, include_in_schema=False)
    return router


# -- decode_request ---------------------------------------------------------------------------


async def _offloaded_header(offload: Any, body: bytes, header_length: str | None) -> Any:
    """The JSON header (the whole body without a binary part) parsed in a decode process when it is large and holds
    lists (service.frontend.offload's rule, as /attend's), else None: parsed inline by ``HeaderPlans.decode``."""
    if offload is None or not offload.enabled or len(body) < offload.min_bytes:
        return None
    hl = _header_length(header_length, len(body))
    text = body if hl == len(body) else bytes(body[:hl])
    return await offload.parse_v2(text) if offload.wants(text) else None


async def _read_body(request: Request, limit: int) -> bytes:
    """The body, inflated if gzip/deflate; 413 beyond ``limit`` bytes, before parsing."""
    body = await read_limited(request, limit)
    encoding = (header(request, b"content-encoding") or "identity").strip().lower()
    if encoding in ("identity", ""):
        return body
    if encoding not in ("gzip", "deflate"):
        raise ServiceError("unsupported_media_type", f"Content-Encoding must be gzip or deflate, got {encoding!r}")
    # gzip: gzip wrapper; deflate: zlib wrapper as HTTP says, or raw deflate as some clients send.
    wbits = (16 + zlib.MAX_WBITS,) if encoding == "gzip" else (zlib.MAX_WBITS, -zlib.MAX_WBITS)
    for i, w in enumerate(wbits):
        d = zlib.decompressobj(w)
        try:
            out = d.decompress(body, limit + 1)
        except zlib.error as e:
            if i + 1 < len(wbits):
                continue
            raise ServiceError("malformed_json", f"the body is not valid {encoding} data: {e}") from e
        if len(out) > limit:
            raise ServiceError("payload_too_large", f"the inflated body exceeds max_body_bytes {limit}")
        if not d.eof:
            raise ServiceError("malformed_json", f"the {encoding} body is truncated")
        return out
    raise AssertionError("unreachable")


def _header_length(raw: str | None, size: int) -> int:
    if raw is None:
        return size
    s = raw.strip()
    if not (s.isascii() and s.isdigit()):
        raise ServiceError(
            "malformed_json", f"Inference-Header-Content-Length must be a non-negative integer, got {raw!r}"
        )
    n = int(s)
    if n == 0 or n > size:
        raise ServiceError(
            "malformed_json", f"Inference-Header-Content-Length is {n}, but the body has {size} bytes (need 1..{size})"
        )
    return n


# -- the plans of repeated headers --------------------------------------------------------------

PLAN_CACHE_SIZE = 64  # distinct headers remembered per app: a client repeats one, perf_analyzer a few
PLAN_MAX_HEADER_BYTES = 2048  # longer headers are parsed and checked every time


@dataclass(frozen=True, slots=True)
class _Place:
    """Where one binary input lies in the body, and the shape the model takes it in."""

    dtype: np.dtype  # of its wire bytes (BF16: uint16)
    offset: int
    shape: tuple[int, ...]
    count: int

    def view(self, body: bytes | bytearray) -> np.ndarray:
        return np.frombuffer(body, self.dtype, self.count, self.offset).reshape(self.shape)


@dataclass(frozen=True, slots=True)
class Plan:
    """What one JSON header decides for a body of ``size`` bytes, against one model and its limits.

    Made from a request that passed every check, so every check that reads no tensor value passes
    again for the same header bytes and body length; what is left is in ``input``. Immutable: the
    requests that share it share nothing else. ``datatype``, ``outputs`` and ``id`` answer as an
    oip.InferPlan's do.
    """

    config: Any  # MHAConfig, compared by identity (one per app's lifespan)
    limits: Limits
    size: int
    x: _Place
    lengths: _Place | None
    mask: _Place | None
    datatype: str
    outputs: tuple[tuple[str, bool], ...]
    id: str | None
    causal: bool
    need_weights: bool
    heads: tuple[int, ...] | None
    timeout_s: float
    priority: int
    model_name: str
    # every output binary: the response's JSON header for outputs of these shapes (what the model returns
    # for this input; checked per response, and any other shape is written as _encode always writes it)
    answer: bytes | None
    answer_for: tuple[tuple[str, tuple[int, ...]], ...]  # (output name, shape) in the order asked for

    def input(self, body: bytes | bytearray) -> AttendInput:
        """This body's tensors (zero-copy views, as oip.from_bytes makes) and the checks that read values,
        in the order oip.plan_request and decode.check_input run them (the mask's bytes, x finite and in
        range, the lengths' values), so that a request with several faults is told the same first one."""
        x = self.x.view(body)  # in its wire dtype (BF16: its bits), to the engine, which casts it on its device
        mask = None if self.mask is None else oip.bool_mask(self.mask.view(body))
        codecs.check_finite(x, "x", self.limits.dtype)
        lengths = None if self.lengths is None else lengths_in_range(self.lengths.view(body), x.shape[1])
        dt = oip.WIRE[self.datatype]  # and the outputs come back in it
        return AttendInput(x, lengths, mask, self.causal, self.need_weights, self.heads, wire_dtype=dt, out_dtype=dt)

    def encode(self, tensors: dict[str, np.ndarray | None]) -> tuple[list, int] | None:
        """The response's parts (its JSON header, written once, then the blobs), when every output has its
        expected shape; else None."""
        blobs = []
        for name, shape in self.answer_for:
            arr = tensors[name]
            if arr is None or arr.shape != shape:
                return None
            blobs.append(memoryview(oip.to_wire(arr, self.datatype, name)))  # the same overflow check, in order
        return [self.answer, *blobs], len(self.answer)


class HeaderPlans:
    """v2 requests whose JSON header was seen before skip its parse and every check that reads no tensor value.

    Clients (perf_analyzer, tritonclient, pipelines) send the same header bytes request after request;
    only the tensors differ. The key is the header's exact bytes; a plan serves a body of the length it
    was made for, and the model and limits it was made against. Remembered: headers of at most
    ``max_header_bytes`` whose every input is binary (JSON data varies), the second time a request with
    them is decoded and checked without error (so a bad header is refused with its message every time,
    and a client that sends a new request id each time pays a set insertion, not a plan per request);
    past ``capacity`` the least recently used goes (the tables of service.frontend.plans). One per app, used from
    the event loop's thread only.
    """

    def __init__(
        self, model_name: str, capacity: int = PLAN_CACHE_SIZE, max_header_bytes: int = PLAN_MAX_HEADER_BYTES
    ) -> None:
        self.model_name = model_name
        self.capacity = capacity
        self.max_header_bytes = max_header_bytes
        self._plans: Recent[bytes, Plan] = Recent(capacity)
        self._seen: Sightings[bytes] = Sightings(capacity)  # headers that passed once, the latest ``capacity``

    def __len__(self) -> int:
        return len(self._plans)

    def decode(
        self,
        body: bytes | bytearray,
        header_length: str | None,
        config: Any,
        limits: Limits,
        *,
        head: Any = None,
        sequence_model: bool = False,
    ) -> tuple[oip.InferPlan | Plan, AttendInput, float, int]:
        """One request's (answer plan, checked input, timeout in s, priority), as _decode and its checks give;
        ``head``: the JSON header already parsed (service.frontend.offload), its data as arrays. Steps of sequences
        get no plan (each carries its own flags), nor any request to the sequence model (which must be a step)."""
        size = len(body)
        hl = _header_length(header_length, size)
        key = None
        if hl <= self.max_header_bytes and self.capacity > 0 and head is None and not sequence_model:
            key = bytes(body[:hl])
            plan = self._plans.get(key)
            if plan is not None and plan.size == size and plan.config is config and plan.limits is limits:
                self._plans.use(key)
                return plan, plan.input(body), plan.timeout_s, plan.priority
        req, layout = _decode(body, hl, head, sequence_model)
        inp, timeout_s = req.check(config=config, limits=limits)
        priority = check_priority(req.priority, limits)
        worth = key is not None and layout is not None and req.sequence is None
        if worth and self._seen.second(key):  # the second time: worth a plan
            self._plans.put(key, _plan(req, inp, timeout_s, priority, layout, size, config, limits, self.model_name))
        return req, inp, timeout_s, priority


def _plan(
    req: oip.InferPlan,
    inp: AttendInput,
    timeout_s: float,
    priority: int,
    layout: dict[str, tuple[np.dtype, int]],
    size: int,
    config: Any,
    limits: Limits,
    model_name: str,
) -> Plan:
    """The Plan of a request that passed: the places from its layout, the rest from what its checks made."""

    def place(name: str, arr: np.ndarray | None) -> _Place | None:
        if arr is None:
            return None
        dtype, offset = layout[name]
        return _Place(dtype, offset, arr.shape, arr.size)

    x = place("x", inp.x)
    assert x is not None
    outputs = tuple(req.outputs)
    B, T, _ = inp.x.shape
    expected = {"output": inp.x.shape, "weights": (B, len(inp.heads) if inp.heads else config.num_heads, T, T)}
    answer_for = tuple((name, expected[name]) for name, _ in outputs)
    answer = None
    if all(binary for _, binary in outputs):
        itemsize = oip.FLOAT[req.datatype].itemsize  # what oip.to_wire writes
        entries = [_binary_output(n, req.datatype, shape, math.prod(shape) * itemsize) for n, shape in answer_for]
        answer = _response_header(model_name, req.id, entries)
    return Plan(
        config=config,
        limits=limits,
        size=size,
        x=x,
        lengths=place("lengths", inp.lengths),
        mask=place("attn_mask", inp.mask),
        datatype=req.datatype,
        outputs=outputs,
        id=req.id,
        causal=inp.causal,
        need_weights=inp.need_weights,
        heads=inp.heads,
        timeout_s=timeout_s,
        priority=priority,
        model_name=model_name,
        answer=answer,
        answer_for=answer_for,
    )


def _decode(
    body: bytes, hl: int, head: Any = None, sequence_model: bool = False
) -> tuple[oip.InferPlan, dict[str, tuple[np.dtype, int]] | None]:
    """bytes -> arrays (checked against the model later, by ``check_input``) + answer plan, and the
    place of each input in the body (name -> (numpy dtype, offset)) when every input is binary.
    ``head``: the JSON header parsed elsewhere (a decode process), else parsed here."""
    view = memoryview(body)
    if head is None:
        head = parse_json(view[:hl])
    if not isinstance(head, dict):
        raise validation(f"the JSON header must be an object, got {type(head).__name__}")
    rid = head.get("id")
    if rid is not None and not isinstance(rid, str):
        raise validation(f"id must be a string, got {type(rid).__name__}")
    params = oip.as_dict(head.get("parameters"), "parameters")
    tensors, x_type, layout = _inputs(head.get("inputs"), view, hl)
    binary_default = oip.parse_bool(params.get("binary_data_output"), "binary_data_output", False)
    outputs = oip.parse_outputs(head.get("outputs"), binary_default)
    return oip.plan_request(tensors, x_type, params, outputs, rid, sequence_model=sequence_model), layout


def _inputs(
    value: Any, body: memoryview, hl: int
) -> tuple[dict[str, np.ndarray], str, dict[str, tuple[np.dtype, int]] | None]:
    """The input tensors, decoded and shaped (floats in their wire dtype, BF16 as uint16 bits), x's
    datatype, and where each input lies in the body when every one is binary (else None)."""
    if not isinstance(value, list) or not value:
        raise validation("inputs must be a non-empty list of tensors")
    specs = []
    seen: set[str] = set()
    offset = hl
    for i, spec in enumerate(value):
        if not isinstance(spec, dict):
            raise validation(f"inputs[{i}] must be an object, got {type(spec).__name__}")
        name, dtype_name, shape = spec.get("name"), spec.get("datatype"), spec.get("shape")
        oip.check_tensor_spec(i, name, dtype_name, shape, seen)
        p = oip.as_dict(spec.get("parameters"), f"input {name!r} parameters")
        if p.get("shared_memory_region") is not None:
            raise validation(f"input {name!r}: shared memory is not supported by this server")
        size = p.get("binary_data_size")
        if size is not None:
            if isinstance(size, bool) or not isinstance(size, int) or size < 0:
                raise validation(f"input {name!r} has binary_data_size {size!r}; it must be an integer >= 0")
            if "data" in spec:
                raise validation(f"input {name!r} has both 'data' and binary_data_size; give one")
            specs.append((name, dtype_name, shape, offset, size))
            offset += size
        else:
            if "data" not in spec:
                raise validation(f"input {name!r} has no data: give 'data' or parameters.binary_data_size")
            specs.append((name, dtype_name, shape, None, spec["data"]))
    if offset != len(body):
        raise validation(
            f"the inputs' binary_data_size add up to {offset - hl} bytes, but the body has {len(body) - hl} "
            f"bytes after the {hl}-byte JSON header"
        )
    if "x" not in seen:
        raise validation("input 'x' is required")

    tensors: dict[str, np.ndarray] = {}
    layout: dict[str, tuple[np.dtype, int]] | None = {}
    x_type = "FP32"
    for name, dtype_name, shape, start, data in specs:
        if start is not None:
            arr = oip.from_bytes(name, dtype_name, shape, body, start, data, f"binary_data_size {data}")
            if layout is not None:
                layout[name] = (arr.dtype, start)
        else:
            arr = _from_json(data, name, dtype_name, shape, math.prod(shape))
            layout = None
        if name == "x":
            x_type = dtype_name
        tensors[name] = arr
    return tensors, x_type, layout


def _from_json(data: Any, name: str, dtype_name: str, shape: list[int], count: int) -> np.ndarray:
    """``data`` as an array; a float or bool one may come decoded by offload_worker.parse_v2 (an array or a Failed)."""
    if isinstance(data, Failed):
        raise data.error()
    decoded = isinstance(data, np.ndarray)
    if not decoded and not isinstance(data, list):
        raise validation(f"input {name!r} data must be a list, got {type(data).__name__}")
    if dtype_name in oip.FLOAT:
        arr = data if decoded else codecs.decode_lists(data, name, V2_RANKS)  # float32; flat or nested
        if dtype_name == "FP16":
            if arr.size and (big := float(np.max(np.abs(arr)))) > codecs.DTYPE_MAX["float16"]:
                raise validation(f"input {name!r} is FP16, but holds {big:g}, beyond FP16's 65504; send it as FP32")
            arr = arr.astype(np.float16)
        elif dtype_name == "BF16":
            arr = codecs.f32_to_bf16(arr)
    elif dtype_name == "BOOL":
        arr = data if decoded else codecs.decode_lists(data, name, V2_RANKS, boolean=True)  # true/false, as /attend's
    else:
        try:
            arr = np.array(data)
        except ValueError as e:
            raise validation(f"input {name!r} data is ragged: its nested lists do not all have the same length") from e
        if arr.size and arr.dtype.kind not in "iu":
            raise validation(f"input {name!r} is {dtype_name}: its data must be integers, got {arr.dtype}")
        if arr.size:
            codecs.reject_bools(data, f"input {name!r}", (arr == 0) | (arr == 1))  # true/false became 1/0
        if arr.size and arr.dtype.kind == "u" and arr.max() > np.iinfo(np.int64).max:
            raise validation(f"input {name!r} has a value beyond the range of INT64: {int(arr.max())}")
        arr = arr.astype(np.int64)
    if arr.size != count:
        raise validation(f"input {name!r} data has {arr.size} elements, but shape {shape} needs {count}")
    return arr.reshape(shape)


# -- encode_response --------------------------------------------------------------------------


def _encode(
    req: oip.InferPlan | Plan, model_name: str, tensors: dict[str, np.ndarray | None]
) -> tuple[list, int | None]:
    """(the body's parts, JSON header length when any output is binary, else None). A binary output is its
    array's own memory (httputil.Parts sends it as it lies); a JSON body is one part."""
    if type(req) is Plan and req.answer is not None and req.model_name == model_name:
        answered = req.encode(tensors)
        if answered is not None:
            return answered
    outputs, blobs = [], []
    dt = req.datatype
    for name, binary in req.outputs:
        arr = tensors[name]
        if binary:
            wire = oip.to_wire(arr, dt, name)
            outputs.append(_binary_output(name, dt, arr.shape, wire.nbytes))
            blobs.append(wire)
        else:
            outputs.append({"name": name, "datatype": dt, "shape": list(arr.shape), "data": oip.to_json(arr, dt, name)})
    sequence = req.sequence if type(req) is oip.InferPlan else None
    header = _response_header(model_name, req.id, outputs, None if sequence is None else sequence.id)
    if not blobs:
        return [header], None
    return [header, *blobs], len(header)


def _binary_output(name: str, datatype: str, shape: tuple[int, ...], nbytes: int) -> dict[str, Any]:
    return {"name": name, "datatype": datatype, "shape": list(shape), "parameters": {"binary_data_size": nbytes}}


def _response_header(
    model_name: str, rid: str | None, outputs: list[dict[str, Any]], sequence_id: int | str | None = None
) -> bytes:
    resp: dict[str, Any] = {"model_name": model_name, "model_version": VERSION}
    if rid is not None:
        resp["id"] = rid
    if sequence_id is not None:  # a step's answer names its sequence, as Triton's do
        resp["parameters"] = {"sequence_id": sequence_id}
    resp["outputs"] = outputs
    return orjson.dumps(resp, option=orjson.OPT_SERIALIZE_NUMPY)

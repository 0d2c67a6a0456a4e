"""The Open Inference Protocol (KServe v2) over HTTP, with Triton's binary tensor extension.

``build_router(state)`` answers, for the one served model (``settings.model_name``, version "1"):

    GET  /v2                                   server metadata and extensions
    GET  /v2/health/live, /v2/health/ready     200, or 503 while not ready (as /readyz)
    GET  /v2/models/{name}[/versions/1]        model metadata
    GET  /v2/models/{name}[/versions/1]/ready  200, or 503 while not ready
    POST /v2/models/{name}[/versions/1]/infer  inference, through the same batcher as /attend

Contract of ``infer``:
- Inputs: ``x`` FP32|FP16|BF16 [B, T, E]; optional ``lengths`` INT32|INT64 [B]; optional
  ``attn_mask`` BOOL [T, T] or [B, T, T]. JSON ``data`` may be flat (row-major) or nested; its
  element count must match ``shape``. BF16 in JSON takes numbers, rounded to bfloat16 as the
  binary path would carry them.
- Binary tensor extension: the body is a JSON header of ``Inference-Header-Content-Length``
  bytes, then the raw little-endian, row-major bytes of each input that has
  ``parameters.binary_data_size``, in input order (BOOL: one byte, 0 or 1). Without the header
  the whole body is JSON. ``Content-Encoding: gzip|deflate`` bodies are inflated first.
- Outputs: ``output`` [B, T, E] and ``weights`` [B, H', T, T], in the datatype of ``x``.
  Without ``outputs`` only ``output`` comes back: ``weights`` is computed only when asked for
  by name. An output is binary when its ``parameters.binary_data`` is true, or, when it does
  not say, when the request's ``parameters.binary_data_output`` is true; then the response is
  ``application/octet-stream``: JSON header (length in ``Inference-Header-Content-Length``)
  followed by the blobs in output order.
- Request parameters: ``causal`` (bool), ``heads`` (list of ints, one int, or "0,2"),
  ``timeout_ms`` (> 0) or Triton's ``timeout`` (microseconds; 0 = default), and Triton's
  ``priority`` (an integer 0..MHA_PRIORITY_LEVELS, 1 the highest, 0 the default level; the same
  check and message as /attend's field). Others, such as ``sequence_id``, are ignored, as
  Triton ignores what a model does not use.
- Errors answer ``{"error": "<message>"}`` with the status of ``service.errors.ERROR_STATUS``,
  the table /attend uses: 400 malformed JSON or header, 404 unknown model or version, 413 too
  large, 415 unknown Content-Encoding, 422 a request that breaks the contract (datatypes,
  shapes, sizes, names), 429 overloaded (Retry-After), 503 not ready, 504 deadline, 500 other.
"""

from __future__ import annotations

import functools
import logging
import math
import time
import zlib
from collections.abc import Callable, Coroutine
from typing import Any

import numpy as np
import orjson
from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse, Response
from fastapi.routing import APIRoute
from pydantic import BaseModel
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.routing import Match

from service import __version__, codecs
from service.decode import check_input, check_priority, parse_json
from service.errors import INFERENCE_ERRORS, ServiceError, status_descriptions, validation
from service.httputil import infer as run_inference
from service.httputil import internal_error, read_limited, timing_headers

log = logging.getLogger("mha_serve.v2")

VERSION = "1"
EXTENSIONS = ["binary_tensor_data"]
HEADER_LENGTH = "inference-header-content-length"

# wire datatype -> little-endian numpy dtype of its bytes (BF16: the upper half of a float32)
_FLOAT = {"FP32": np.dtype("<f4"), "FP16": np.dtype("<f2"), "BF16": np.dtype("<u2")}
_WIRE = {"FP32": "float32", "FP16": "float16", "BF16": "bfloat16"}  # the names codecs uses
_INT = {"INT32": np.dtype("<i4"), "INT64": np.dtype("<i8")}
_BOOL = {"BOOL": np.dtype("u1")}
INPUTS: dict[str, dict[str, np.dtype]] = {"x": _FLOAT, "lengths": _INT, "attn_mask": _BOOL}
OUTPUTS = ("output", "weights")
_METHODS = ["GET", "POST", "PUT", "DELETE", "PATCH", "HEAD", "OPTIONS"]

INFER_ERRORS = ("not_found", *INFERENCE_ERRORS)


class V2Error(BaseModel):
    error: str


def _responses(*types: str) -> dict[int | str, dict[str, Any]]:
    return {status: {"model": V2Error, "description": d} for status, d in status_descriptions(*types).items()}


def _error_response(err: ServiceError) -> JSONResponse:
    return JSONResponse({"error": err.message}, status_code=err.status, headers=err.headers)


class _V2Route(APIRoute):
    """Errors of v2 routes answer the protocol's ``{"error": "..."}``, not /attend's object."""

    def get_route_handler(self) -> Callable[[Request], Coroutine[Any, Any, Response]]:
        handler = super().get_route_handler()

        async def route(request: Request) -> Response:
            try:
                return await handler(request)
            except ServiceError as e:
                return _error_response(e)
            except StarletteHTTPException:
                raise
            except Exception as e:
                return _error_response(internal_error(e, request))

        return route


def build_router(state: Any) -> APIRouter:
    """The v2 routes over ``state`` (service.app.AppState): its settings, runner, batcher, limits.

    Its last route answers every other /v2 path (404/405 in the protocol's shape), so include
    this router after any other route under /v2, and before any catch-all mount at "/".
    """
    settings = state.settings
    router = APIRouter(prefix="/v2", tags=["v2 (Open Inference Protocol)"], route_class=_V2Route)

    def check_model(name: str, version: str | None = None) -> None:
        if name != settings.model_name:
            raise ServiceError("not_found", f"unknown model {name!r}; this server serves {settings.model_name!r}")
        if version is not None and version != VERSION:
            raise ServiceError("not_found", f"model {name!r} has no version {version!r}; versions: [{VERSION!r}]")

    def require_ready() -> None:
        if state.draining:
            raise ServiceError("unavailable", "the server is shutting down")
        if not state.ready or state.runner is None or state.batcher is None:
            raise ServiceError("unavailable", "the model is not ready yet")

    @router.get("", summary="Server metadata")
    async def server_metadata() -> dict[str, Any]:
        return {"name": "mha-serve", "version": __version__, "extensions": EXTENSIONS}

    @router.get("/health/live", summary="Liveness: 200 while the process answers")
    async def live() -> dict[str, bool]:
        return {"live": True}

    @router.get("/health/ready", summary="Readiness: 200 when ready, else 503", responses=_responses("unavailable"))
    async def ready() -> dict[str, bool]:
        require_ready()
        return {"ready": True}

    def metadata(name: str, version: str | None) -> dict[str, Any]:
        check_model(name, version)
        if state.runner is None:
            raise ServiceError("unavailable", "the model is still loading")
        return _metadata(settings.model_name, state.runner.config)

    def model_ready(name: str, version: str | None) -> dict[str, Any]:
        check_model(name, version)
        require_ready()
        return {"name": name, "ready": True}

    async def infer(request: Request, name: str, version: str | None) -> Response:
        started = time.monotonic()
        check_model(name, version)
        require_ready()
        body = await _read_body(request, settings.max_body_bytes)
        req = _decode(body, request.headers.get(HEADER_LENGTH))
        inp, timeout_s = req.check(config=state.runner.config, limits=state.limits)
        priority = check_priority(req.priority, state.limits)
        res = await run_inference(state, inp, started=started, timeout_s=timeout_s, request=request, priority=priority)
        if res is None:
            return Response(status_code=499)
        tensors = {"output": res.output.output, "weights": res.output.weights}
        payload, header_len = _encode(req, settings.model_name, tensors)
        headers = timing_headers(res)
        if header_len is None:
            return Response(payload, media_type="application/json", headers=headers)
        headers["Inference-Header-Content-Length"] = str(header_len)
        return Response(payload, media_type="application/octet-stream", headers=headers)

    async def model_metadata(name: str) -> dict[str, Any]:
        return metadata(name, None)

    async def model_version_metadata(name: str, version: str) -> dict[str, Any]:
        return metadata(name, version)

    async def ready_model(name: str) -> dict[str, Any]:
        return model_ready(name, None)

    async def ready_model_version(name: str, version: str) -> dict[str, Any]:
        return model_ready(name, version)

    async def infer_model(request: Request, name: str) -> Response:
        return await infer(request, name, None)

    async def infer_model_version(request: Request, name: str, version: str) -> Response:
        return await infer(request, name, version)

    meta = {"summary": "Model metadata", "responses": _responses("not_found", "unavailable")}
    router.add_api_route("/models/{name}", model_metadata, methods=["GET"], **meta)
    router.add_api_route("/models/{name}/versions/{version}", model_version_metadata, methods=["GET"], **meta)
    rdy = {"summary": "Model readiness: 200 when ready, else 503", "responses": _responses("not_found", "unavailable")}
    router.add_api_route("/models/{name}/ready", ready_model, methods=["GET"], **rdy)
    router.add_api_route("/models/{name}/versions/{version}/ready", ready_model_version, methods=["GET"], **rdy)
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
    router.add_api_route("/models/{name}/infer", infer_model, methods=["POST"], **inf)
    router.add_api_route("/models/{name}/versions/{version}/infer", infer_model_version, methods=["POST"], **inf)
    routes = list(router.routes)

    async def no_route(request: Request, path: str) -> Response:
        """Other /v2 paths (Triton's repository, stats, config...) answer in the protocol's shape too."""
        if any(r.matches(request.scope)[0] != Match.NONE for r in routes):
            raise ServiceError("method_not_allowed", f"{request.url.path} does not accept {request.method}")
        raise ServiceError("not_found", f"no route {request.method} {request.url.path}")

    router.add_api_route("/{path:path}", no_route, methods=_METHODS, include_in_schema=False)
    return router


def _metadata(name: str, cfg: Any) -> dict[str, Any]:
    E = cfg.emb_size
    return {
        "name": name,
        "versions": [VERSION],
        "platform": "pytorch",
        "inputs": [
            {"name": "x", "datatype": "FP32", "shape": [-1, -1, E], "parameters": {"datatypes": list(_FLOAT)}},
            {
                "name": "lengths",
                "datatype": "INT64",
                "shape": [-1],
                "optional": True,
                "parameters": {"datatypes": list(_INT)},
            },
            {
                "name": "attn_mask",
                "datatype": "BOOL",
                "shape": [-1, -1, -1],
                "optional": True,
                "parameters": {"shapes": "[T, T] or [B, T, T]; true = may attend"},
            },
        ],
        "outputs": [
            {"name": "output", "datatype": "FP32", "shape": [-1, -1, E], "parameters": {"datatype": "that of x"}},
            {
                "name": "weights",
                "datatype": "FP32",
                "shape": [-1, -1, -1, -1],
                "parameters": {"datatype": "that of x", "computed": "only when requested by name"},
            },
        ],
        "parameters": {
            "num_heads": cfg.num_heads,
            "emb_size": E,
            "head_size": cfg.head_size,
            "max_seq_len": cfg.max_seq_len,
            "causal": cfg.causal,
            "request_parameters": ["causal", "heads", "timeout_ms", "timeout", "priority", "binary_data_output"],
        },
    }


# -- decode_request ---------------------------------------------------------------------------


class _Request:
    """A decoded infer request: its checks against the model (``check_input``), and how to answer."""

    __slots__ = ("check", "datatype", "id", "outputs", "priority")

    def __init__(
        self,
        check: Callable[..., tuple[Any, float]],
        datatype: str,
        outputs: list[tuple[str, bool]],
        id: str | None,
        priority: int | None = None,
    ) -> None:
        self.priority = priority  # Triton's request parameter; range-checked with /attend's rule
        self.check = check
        self.datatype = datatype  # datatype of x, and so of the outputs
        self.outputs = outputs  # (name, binary) in the order asked for
        self.id = id


async def _read_body(request: Request, limit: int) -> bytes:
    """The body, inflated if gzip/deflate; 413 beyond ``limit`` bytes, before parsing."""
    body = await read_limited(request, limit)
    encoding = request.headers.get("content-encoding", "identity").strip().lower()
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


def _decode(body: bytes, header_length: str | None) -> _Request:
    """bytes -> arrays (checked against the model later, by ``check_input``) + answer plan."""
    hl = _header_length(header_length, len(body))
    view = memoryview(body)
    head = parse_json(view[:hl])
    if not isinstance(head, dict):
        raise validation(f"the JSON header must be an object, got {type(head).__name__}")
    rid = head.get("id")
    if rid is not None and not isinstance(rid, str):
        raise validation(f"id must be a string, got {type(rid).__name__}")
    params = _dict(head.get("parameters"), "parameters")
    tensors, x_type = _inputs(head.get("inputs"), view, hl)
    outputs = _outputs(head.get("outputs"), _bool(params.get("binary_data_output"), "binary_data_output", False))
    want_weights = any(n == "weights" for n, _ in outputs)

    heads = _heads(params.get("heads"))
    if heads is not None and not want_weights:
        raise validation("parameters.heads selects weights: it needs the 'weights' output in outputs")
    timeout_ms = _timeout_ms(params)
    priority = params.get("priority")
    if priority is not None and (isinstance(priority, bool) or not isinstance(priority, int)):
        raise validation(f"parameters.priority must be an integer, got {priority!r}")
    causal = params.get("causal")
    if causal is not None and not isinstance(causal, bool):
        raise validation(f"parameters.causal must be a boolean, got {causal!r}")

    x = tensors["x"]
    if x.ndim != 3:
        raise validation(f"input 'x' must have shape [B, T, E], got {list(x.shape)}")
    if x.shape[0] < 1:
        raise validation(f"x must have B >= 1 and T >= 1, got shape {list(x.shape)}")
    if x_type == "BF16":
        x = codecs.bf16_to_f32(x)
    lengths = tensors.get("lengths")
    if lengths is not None and lengths.ndim != 1:
        raise validation(f"input 'lengths' must have shape [B], got {list(lengths.shape)}")
    mask = tensors.get("attn_mask")
    if mask is not None:
        if mask.size and mask.max() > 1:
            raise validation("attn_mask bool bytes must be 0 or 1")
        mask = mask.astype(np.bool_)
    check = functools.partial(
        check_input, x, lengths, mask, causal=causal, need_weights=want_weights, heads=heads, timeout_ms=timeout_ms
    )
    return _Request(check, x_type, outputs, rid, priority)


def _dict(value: Any, where: str) -> dict:
    if value is None:
        return {}
    if not isinstance(value, dict):
        raise validation(f"{where} must be an object, got {type(value).__name__}")
    return value


def _bool(value: Any, name: str, default: bool) -> bool:
    if value is None:
        return default
    if not isinstance(value, bool):
        raise validation(f"parameters.{name} must be a boolean, got {value!r}")
    return value


def _heads(value: Any) -> list[int] | None:
    """A list of ints, one int, or a comma-separated string (Triton's parameters are scalars)."""
    if value is None:
        return None
    if isinstance(value, str):
        try:
            return [int(p) for p in value.split(",") if p.strip()]
        except ValueError as e:
            raise validation(f"parameters.heads must be head indices like '0,2', got {value!r}") from e
    if isinstance(value, int) and not isinstance(value, bool):
        return [value]
    if isinstance(value, list) and all(isinstance(h, int) and not isinstance(h, bool) for h in value):
        return value
    raise validation(f"parameters.heads must be a list of ints, an int or a string like '0,2', got {value!r}")


def _timeout_ms(params: dict) -> float | None:
    value = params.get("timeout_ms")
    if value is not None:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise validation(f"parameters.timeout_ms must be a number, got {value!r}")
        return float(value)
    value = params.get("timeout")  # Triton's, in microseconds; 0 = the default
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        raise validation(f"parameters.timeout must be microseconds >= 0, got {value!r}")
    return value / 1000 if value else None


def _outputs(value: Any, binary_default: bool) -> list[tuple[str, bool]]:
    if value is None or value == []:
        return [("output", binary_default)]
    if not isinstance(value, list):
        raise validation(f"outputs must be a list, got {type(value).__name__}")
    seen: list[tuple[str, bool]] = []
    for i, spec in enumerate(value):
        if not isinstance(spec, dict) or not isinstance(spec.get("name"), str):
            raise validation(f"outputs[{i}] must be an object with a string 'name'")
        name = spec["name"]
        if name not in OUTPUTS:
            raise validation(f"unknown output {name!r}; the model's outputs are {', '.join(OUTPUTS)}")
        if any(n == name for n, _ in seen):
            raise validation(f"output {name!r} is asked for twice")
        p = _dict(spec.get("parameters"), f"outputs[{i}].parameters")
        for unsupported in ("classification", "shared_memory_region"):
            if p.get(unsupported) not in (None, 0):
                raise validation(f"output {name!r}: parameter {unsupported!r} is not supported by this server")
        binary = p.get("binary_data")
        if binary is not None and not isinstance(binary, bool):
            raise validation(f"outputs[{i}].parameters.binary_data must be a boolean, got {binary!r}")
        seen.append((name, binary_default if binary is None else binary))
    return seen


def _inputs(value: Any, body: memoryview, hl: int) -> tuple[dict[str, np.ndarray], str]:
    """The input tensors, decoded and shaped (floats in their wire dtype, BF16 as uint16 bits)."""
    if not isinstance(value, list) or not value:
        raise validation("inputs must be a non-empty list of tensors")
    specs = []
    offset = hl
    for i, spec in enumerate(value):
        if not isinstance(spec, dict):
            raise validation(f"inputs[{i}] must be an object, got {type(spec).__name__}")
        name, dtype_name, shape = spec.get("name"), spec.get("datatype"), spec.get("shape")
        if not isinstance(name, str):
            raise validation(f"inputs[{i}] needs a string 'name'")
        if name not in INPUTS:
            raise validation(f"unknown input {name!r}; the model's inputs are {', '.join(INPUTS)}")
        if any(s[0] == name for s in specs):
            raise validation(f"input {name!r} is given twice")
        if dtype_name not in INPUTS[name]:
            raise validation(f"input {name!r} has datatype {dtype_name!r}; expected one of {', '.join(INPUTS[name])}")
        if not isinstance(shape, list) or not all(isinstance(d, int) and not isinstance(d, bool) for d in shape):
            raise validation(f"input {name!r} needs 'shape', a list of integers, got {shape!r}")
        if any(d < 0 for d in shape):
            raise validation(f"input {name!r} has a negative dimension in shape {shape}")
        p = _dict(spec.get("parameters"), f"input {name!r} parameters")
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
    if not any(s[0] == "x" for s in specs):
        raise validation("input 'x' is required")

    tensors: dict[str, np.ndarray] = {}
    x_type = "FP32"
    for name, dtype_name, shape, start, data in specs:
        npdtype = INPUTS[name][dtype_name]
        count = math.prod(shape)
        if start is not None:
            if data != count * npdtype.itemsize:
                raise validation(
                    f"input {name!r} has binary_data_size {data}, but shape {shape} of {dtype_name} needs "
                    f"{count} x {npdtype.itemsize} = {count * npdtype.itemsize} bytes"
                )
            arr = np.frombuffer(body, dtype=npdtype, count=count, offset=start).reshape(shape)
        else:
            arr = _from_json(data, name, dtype_name, shape, count)
        if name == "x":
            x_type = dtype_name
        tensors[name] = arr
    return tensors, x_type


def _from_json(data: Any, name: str, dtype_name: str, shape: list[int], count: int) -> np.ndarray:
    if not isinstance(data, list):
        raise validation(f"input {name!r} data must be a list, got {type(data).__name__}")
    if dtype_name in _FLOAT:
        arr = codecs.decode_lists(data, name, range(1, 64))  # float32; flat or nested
        if dtype_name == "FP16":
            if arr.size and (big := float(np.max(np.abs(arr)))) > codecs.DTYPE_MAX["float16"]:
                raise validation(f"input {name!r} is FP16, but holds {big:g}, beyond FP16's 65504; send it as FP32")
            arr = arr.astype(np.float16)
        elif dtype_name == "BF16":
            arr = codecs.f32_to_bf16(arr)
    elif dtype_name == "BOOL":
        arr = codecs.decode_lists(data, name, range(1, 64), boolean=True)  # true/false only, as /attend's
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


def _encode(req: _Request, model_name: str, tensors: dict[str, np.ndarray | None]) -> tuple[bytes, int | None]:
    """(body, JSON header length when any output is binary, else None)."""
    outputs, blobs = [], []
    dt = req.datatype
    for name, binary in req.outputs:
        arr = tensors[name]
        entry: dict[str, Any] = {"name": name, "datatype": dt, "shape": list(arr.shape)}
        if binary:
            wire = _to_wire(arr, dt, name)
            entry["parameters"] = {"binary_data_size": wire.nbytes}
            blobs.append(wire)
        else:
            entry["data"] = _to_json(arr, dt, name)
        outputs.append(entry)
    resp: dict[str, Any] = {"model_name": model_name, "model_version": VERSION}
    if req.id is not None:
        resp["id"] = req.id
    resp["outputs"] = outputs
    header = orjson.dumps(resp, option=orjson.OPT_SERIALIZE_NUMPY)
    if not blobs:
        return header, None
    return b"".join([header, *(memoryview(b) for b in blobs)]), len(header)


def _to_wire(arr: np.ndarray, datatype: str, name: str) -> np.ndarray:
    """float32 -> contiguous 1-D little-endian array of the datatype's bytes (an overflow is a 422)."""
    return codecs.to_wire(arr, _WIRE[datatype], name).reshape(-1)


def _to_json(arr: np.ndarray, datatype: str, name: str) -> np.ndarray:
    """A flat array orjson writes as a list (BF16: the bfloat16 values, as float32 numbers)."""
    wire = codecs.to_wire(arr, _WIRE[datatype], name)
    return (codecs.bf16_to_f32(wire) if datatype == "BF16" else wire).reshape(-1)

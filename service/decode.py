"""decode_request for /attend: bytes -> envelope (pydantic) -> arrays (numpy) -> checks against the model."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np
import orjson
from pydantic import ValidationError

from mha_core import MHAConfig
from service import codecs
from service.errors import ServiceError, validation
from service.runner import AttendInput
from service.schemas import AttendRequest, TensorB64

MAX_JSON_DEPTH = 1024  # orjson's fixed limit; /attend needs 4


@dataclass(frozen=True)
class Limits:
    max_request_batch: int
    max_weights_elements: int
    default_timeout_ms: float
    max_timeout_ms: float


@dataclass(frozen=True)
class DecodedRequest:
    input: AttendInput
    encoding: str  # response encoding: "lists" | "base64"
    dtype: str  # wire dtype of base64 responses
    timeout_s: float


def parse_json(body: bytes) -> Any:
    if not body:
        raise ServiceError("malformed_json", "the request body is empty; expected a JSON object")
    try:
        return orjson.loads(body)
    except orjson.JSONDecodeError as e:
        if "depth" in str(e) or "recursion" in str(e):
            raise ServiceError(
                "malformed_json", f"the body nests JSON deeper than the limit of {MAX_JSON_DEPTH} levels"
            ) from e
        raise ServiceError("malformed_json", f"the body is not valid JSON: {e}") from e


def format_validation_error(e: ValidationError, prefix: str = "") -> str:
    parts = []
    for err in e.errors(include_url=False):
        loc = ".".join(str(p) for p in (prefix, *err["loc"]) if p != "")
        if err["type"] == "extra_forbidden":
            parts.append(f"unknown field {loc!r}")
        elif err["type"] == "missing":
            parts.append(f"{loc} is required")
        else:
            parts.append(f"{loc}: {err['msg']}")
    return "; ".join(parts)


def decode_tensor(value: Any, name: str, ndims: tuple[int, ...], *, boolean: bool = False) -> tuple[np.ndarray, str]:
    """Either encoding -> (array, encoding name, wire dtype)."""
    if isinstance(value, dict):
        try:
            env = TensorB64.model_validate(value)
        except ValidationError as e:
            raise validation(format_validation_error(e, name)) from e
        arr, dtype = codecs.decode_b64(env.model_dump(), name, ndims, boolean=boolean)
        return arr, dtype
    return codecs.decode_lists(value, name, ndims, boolean=boolean), "lists"


def decode_attend(body: bytes, config: MHAConfig, limits: Limits) -> DecodedRequest:
    obj = parse_json(body)
    if not isinstance(obj, dict):
        raise validation(f"the body must be a JSON object, got {type(obj).__name__}")
    try:
        req = AttendRequest.model_validate(obj)
    except ValidationError as e:
        raise validation(format_validation_error(e)) from e
    return to_input(req, config, limits)


def to_input(req: AttendRequest, config: MHAConfig, limits: Limits) -> DecodedRequest:
    if req.timeout_ms is not None and not req.timeout_ms > 0:  # cheap checks before the tensor
        raise validation(f"timeout_ms must be > 0, got {req.timeout_ms:g}")
    x, wire = decode_tensor(req.x, "x", (3,))
    B, T, E = x.shape
    if E != config.emb_size:
        raise validation(f"x has emb_size {E} (shape {[B, T, E]}), but the model expects {config.emb_size}")
    if B < 1 or T < 1:
        raise validation(f"x must have B >= 1 and T >= 1, got shape {[B, T, E]}")
    if T > config.max_seq_len:
        raise validation(f"x has sequence length {T}, more than the model's max_seq_len {config.max_seq_len}")
    if B > limits.max_request_batch:
        raise validation(
            f"x has {B} sequences, more than the per-request limit max_request_batch {limits.max_request_batch}"
        )
    codecs.check_finite(x, "x")
    if x.dtype != np.float32:
        x = x.astype(np.float32)

    lengths = None
    if req.lengths is not None:
        if len(req.lengths) != B:
            raise validation(f"lengths has {len(req.lengths)} entries, but x has B = {B} sequences")
        for b, n in enumerate(req.lengths):
            if not 1 <= n <= T:
                raise validation(f"lengths[{b}] = {n} is out of range 1..{T}")
        lengths = np.asarray(req.lengths, dtype=np.int64)

    mask = None
    if req.attn_mask is not None:
        mask, _ = decode_tensor(req.attn_mask, "attn_mask", (2, 3), boolean=True)
        if list(mask.shape) not in ([T, T], [B, T, T]):
            raise validation(f"attn_mask must have shape [{T}, {T}] or [{B}, {T}, {T}], got {list(mask.shape)}")

    heads = None
    H = config.num_heads
    if req.heads is not None:
        if not req.return_weights:
            raise validation("heads selects weights to return: it needs return_weights = true")
        if not req.heads:
            raise validation("heads must name at least one head")
        for h in req.heads:
            if not 0 <= h < H:
                raise validation(f"head index {h} is out of range 0..{H - 1}")
        heads = tuple(req.heads)
    if req.return_weights:
        n = B * (len(heads) if heads else H) * T * T
        if n > limits.max_weights_elements:
            raise validation(
                f"the weights would have {n} elements (B={B} x heads={len(heads) if heads else H} x T={T} x T={T}), "
                f"more than max_weights_elements {limits.max_weights_elements}; ask for fewer heads or sequences"
            )

    timeout_ms = min(req.timeout_ms or limits.default_timeout_ms, limits.max_timeout_ms)

    encoding = req.response_encoding or ("lists" if wire == "lists" else "base64")
    dtype = "float32" if wire == "lists" else wire
    causal = config.causal if req.causal is None else req.causal
    inp = AttendInput(x, lengths, mask, causal, req.return_weights, heads)
    return DecodedRequest(inp, encoding, dtype, timeout_ms / 1000)


def encode_attend(output: np.ndarray, weights: np.ndarray | None, req: DecodedRequest, model: dict) -> bytes:
    body = {
        "output": codecs.encode(output, req.encoding, req.dtype),
        "weights": None if weights is None else codecs.encode(weights, req.encoding, req.dtype),
        "model": model,
    }
    return orjson.dumps(body, option=orjson.OPT_SERIALIZE_NUMPY)

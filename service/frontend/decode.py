"""decode_request for /attend: bytes -> envelope (pydantic) -> arrays (numpy) -> checks against the model."""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import orjson
from pydantic import ValidationError

from mha_core import MHAConfig
from service.engine_api import UINT64_MAX, SequenceFlags, SequenceId
from service.errors import ServiceError, validation
from service.frontend import codecs
from service.frontend.plans import Recent, Sightings
from service.frontend.schemas import AttendRequest, TensorB64
from service.messages import AttendInput, wire_dtype_of

MAX_JSON_DEPTH = 1024  # orjson's fixed limit; /attend needs 4


@dataclass(frozen=True)
class Limits:
    max_request_batch: int
    max_weights_elements: int
    default_timeout_ms: float
    max_timeout_ms: float
    dtype: str = "float32"  # the model's: inputs must fit its range before the cast to it
    priority_levels: int = 1


@dataclass(frozen=True)
class DecodedRequest:
    input: AttendInput
    encoding: str  # response encoding: "lists" | "base64"
    dtype: str  # wire dtype of base64 responses (the engine answers in it: input.out_dtype)
    timeout_s: float
    priority: int = 0  # 1..priority_levels, 0 = the default level
    sequence: SequenceFlags | None = None  # a step of this sequence (None: no step)


def parse_json(body: bytes) -> Any:
    if not body:
        raise ServiceError("malformed_json", "the request body is empty; expected a JSON object")
    try:
        return orjson.loads(body)
    except orjson.JSONDecodeError as e:
        raise json_error(str(e)) from e


def json_error(reason: str) -> ServiceError:
    """orjson's reason for refusing a body, as the caller is told it (also for a body parsed in a decode process)."""
    if "depth" in reason or "recursion" in reason:
        return ServiceError("malformed_json", f"the body nests JSON deeper than the limit of {MAX_JSON_DEPTH} levels")
    return ServiceError("malformed_json", f"the body is not valid JSON: {reason}")


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
    if isinstance(value, np.ndarray):  # nested lists already decoded off the event loop (service.frontend.offload)
        return value, "lists"
    if isinstance(value, dict):
        if _plain_b64(value):  # what TensorB64 would accept unchanged: its copy is not needed
            return codecs.decode_b64(value, name, ndims, boolean=boolean)
        try:
            env = TensorB64.model_validate(value)
        except ValidationError as e:
            raise validation(format_validation_error(e, name)) from e
        arr, dtype = codecs.decode_b64(
            {"dtype": env.dtype, "shape": env.shape, "b64": env.b64}, name, ndims, boolean=boolean
        )
        return arr, dtype
    return codecs.decode_lists(value, name, ndims, boolean=boolean), "lists"


def decode_attend(body: bytes, config: MHAConfig, limits: Limits) -> DecodedRequest:
    return decode_object(parse_json(body), config, limits)


def decode_object(obj: Any, config: MHAConfig, limits: Limits) -> DecodedRequest:
    """decode_attend after the JSON parse (which may have run elsewhere: heatmap, the decode processes)."""
    if not isinstance(obj, dict):
        raise validation(f"the body must be a JSON object, got {type(obj).__name__}")
    fields = _plain_request(obj)
    if fields is None:  # anything unusual, valid or not, goes through pydantic: its values and its messages
        try:
            req = AttendRequest.model_validate(obj)
        except ValidationError as e:
            raise validation(format_validation_error(e)) from e
        fields = dict(req)
    return _to_input(fields, config, limits)


_DEFAULTS = {name: f.default for name, f in AttendRequest.model_fields.items() if not f.is_required()}
_FIELD_TYPES = {  # field -> the exact JSON types that AttendRequest keeps as they are
    "lengths": (list, type(None)),
    "causal": (bool, type(None)),
    "return_weights": (bool,),
    "heads": (list, type(None)),
    "timeout_ms": (float, type(None)),
    "response_encoding": (str, type(None)),
    "priority": (int, type(None)),
}
_ENCODINGS = (None, "lists", "base64")
_B64_KEYS = frozenset(TensorB64.model_fields)


def _plain_request(obj: dict) -> dict | None:
    """The request's fields without a pydantic pass, when the body holds only what AttendRequest would
    take unchanged: known fields, each of its exact type (ints for the int lists, no booleans for numbers).
    None for anything else (an int timeout_ms included: pydantic makes it a float), which pydantic then
    validates as before, with the same values and messages."""
    if "x" not in obj:
        return None
    types = _FIELD_TYPES
    for key, value in obj.items():
        if key == "x" or key == "attn_mask":
            continue  # any JSON: decode_tensor checks them
        allowed = types.get(key)
        if allowed is None or type(value) not in allowed:
            return None
        if type(value) is list and not all(type(v) is int for v in value):
            return None
    if obj.get("response_encoding") not in _ENCODINGS:
        return None
    return _DEFAULTS | obj


def _plain_b64(value: dict) -> bool:
    """Whether TensorB64 would take ``value`` unchanged: its three keys, two strings and a list of ints."""
    if value.keys() != _B64_KEYS:
        return False
    shape = value["shape"]
    return (
        type(value["dtype"]) is str
        and type(value["b64"]) is str
        and type(shape) is list
        and all(type(d) is int for d in shape)
    )


def to_input(req: AttendRequest, config: MHAConfig, limits: Limits) -> DecodedRequest:
    return _to_input(dict(req), config, limits)


def _to_input(req: dict[str, Any], config: MHAConfig, limits: Limits) -> DecodedRequest:
    """An AttendRequest's fields (every one, defaults included) -> the checked input."""
    timeout_ms = req["timeout_ms"]
    if timeout_ms is not None and not timeout_ms > 0:  # cheap checks before the tensor
        raise validation(f"timeout_ms must be > 0, got {timeout_ms:g}")
    priority = check_priority(req["priority"], limits)
    seq = req.get("sequence")
    sequence = None if seq is None else SequenceFlags(sequence_id(seq.id, "sequence.id"), seq.start, seq.end)
    x, wire = decode_tensor(req["x"], "x", (3,))
    encoding = req["response_encoding"] or ("lists" if wire == "lists" else "base64")
    dtype = "float32" if wire == "lists" else wire
    mask = None
    if req["attn_mask"] is not None:
        mask, _ = decode_tensor(req["attn_mask"], "attn_mask", (2, 3), boolean=True)
    inp, timeout_s = check_input(
        x,
        req["lengths"],
        mask,
        causal=req["causal"],
        need_weights=req["return_weights"],
        heads=req["heads"],
        timeout_ms=timeout_ms,
        config=config,
        limits=limits,
        sequence=sequence,
        out_dtype="float32" if encoding == "lists" else dtype,
    )
    return DecodedRequest(inp, encoding, dtype, timeout_s, priority, sequence)


def sequence_id(value: Any, where: str) -> SequenceId:
    """A sequence id as Triton takes it: an unsigned 64-bit integer other than 0, or a non-empty string."""
    if isinstance(value, str):
        if not value:
            raise validation(f"{where} must be a non-empty string or an integer 1..{UINT64_MAX}, got ''")
        return value
    if isinstance(value, bool) or not isinstance(value, int):
        raise validation(f"{where} must be an unsigned 64-bit integer or a string, got {value!r}")
    if not 1 <= value <= UINT64_MAX:
        raise validation(f"{where} must be an integer 1..{UINT64_MAX} (0 is no sequence), got {value}")
    return value


def check_priority(priority: int | None, limits: Limits) -> int:
    """A request's priority (0 = the default level); the same rule and message on every route."""
    if priority is None:
        return 0
    if not 0 <= priority <= limits.priority_levels:
        raise validation(
            f"priority {priority} is out of range 0..{limits.priority_levels} "
            "(1 = the highest level; 0 = the server's default level)"
        )
    return priority


def check_input(
    x: np.ndarray,
    lengths: Sequence[int] | np.ndarray | None,
    mask: np.ndarray | None,
    *,
    causal: bool | None,
    need_weights: bool,
    heads: Sequence[int] | None,
    timeout_ms: float | None,
    config: MHAConfig,
    limits: Limits,
    sequence: SequenceFlags | None = None,
    out_dtype: str = "float32",
) -> tuple[AttendInput, float]:
    """Decoded arrays -> (AttendInput, timeout in s), checked against the model and the limits.

    Shared by every wire format (/attend's lists and base64, the v2 protocol's JSON and binary):
    x is a float array [B, T, E] in its wire dtype (float32, float16, or bfloat16's bits as uint16), which
    it keeps to the engine; mask a bool array, lengths B integers. ``out_dtype``: the response's dtype,
    which the engine answers in.
    """
    if timeout_ms is not None and not timeout_ms > 0:
        raise validation(f"timeout_ms must be > 0, got {timeout_ms:g}")
    if x.ndim != 3:
        raise validation(f"x must have 3 dimensions [B, T, E], got shape {list(x.shape)}")
    B, T, E = x.shape
    if E != config.emb_size:
        raise validation(f"x has emb_size {E} (shape {[B, T, E]}), but the model expects {config.emb_size}")
    if B < 1 or (T < 1 and not (sequence is not None and sequence.end)):  # [1, 0, E]: a step that only ends
        raise validation(f"x must have B >= 1 and T >= 1, got shape {[B, T, E]}")
    if T > config.max_seq_len:
        raise validation(f"x has sequence length {T}, more than the model's max_seq_len {config.max_seq_len}")
    if B > limits.max_request_batch:
        raise validation(
            f"x has {B} sequences, more than the per-request limit max_request_batch {limits.max_request_batch}"
        )
    codecs.check_finite(x, "x", limits.dtype)

    if lengths is not None:
        if len(lengths) != B:
            raise validation(f"lengths has {len(lengths)} entries, but x has B = {B} sequences")
        lengths = lengths_in_range(lengths, T)

    if mask is not None and list(mask.shape) not in ([T, T], [B, T, T]):
        raise validation(f"attn_mask must have shape [{T}, {T}] or [{B}, {T}, {T}], got {list(mask.shape)}")

    H = config.num_heads
    if heads is not None:
        if not need_weights:
            raise validation("heads selects weights to return: it needs return_weights = true")
        if not heads:
            raise validation("heads must name at least one head")
        for h in heads:
            if not 0 <= h < H:
                raise validation(f"head index {h} is out of range 0..{H - 1}")
        heads = tuple(int(h) for h in heads)
    if need_weights:
        n = B * (len(heads) if heads else H) * T * T
        if n > limits.max_weights_elements:
            raise validation(
                f"the weights would have {n} elements (B={B} x heads={len(heads) if heads else H} x T={T} x T={T}), "
                f"more than max_weights_elements {limits.max_weights_elements}; ask for fewer heads or sequences"
            )

    timeout = min(timeout_ms or limits.default_timeout_ms, limits.max_timeout_ms)
    causal = config.causal if causal is None else causal
    inp = AttendInput(x, lengths, mask, causal, need_weights, heads, wire_dtype=wire_dtype_of(x), out_dtype=out_dtype)
    return inp, timeout / 1000


def lengths_in_range(lengths: Sequence[int] | np.ndarray, T: int) -> np.ndarray:
    """The values of ``lengths`` (its length already checked) in 1..T, as int64."""
    for b, n in enumerate(lengths):
        if not 1 <= n <= T:
            raise validation(f"lengths[{b}] = {n} is out of range 1..{T}")
    return np.asarray(lengths, dtype=np.int64)


# -- the plans of repeated bodies ------------------------------------------------------------------

PLAN_CACHE_SIZE = 64  # distinct bodies (all but x's base64 text) remembered per app, as v2's headers
PLAN_MAX_BYTES = 2048  # bodies with more than this around x's base64 text are decoded in full every time
_B64_VALUE = re.compile(rb'"b64"[ \t\n\r]*:[ \t\n\r]*"')


@dataclass(frozen=True, slots=True)
class _BodyPlan:
    """What a base64 /attend body decides apart from x's base64 text, made from one that passed every check."""

    config: Any  # MHAConfig, compared by identity (one per app's lifespan)
    limits: Limits
    x: dict[str, Any]  # x's dtype and shape (its b64 is this request's)
    lengths: np.ndarray | None
    mask: np.ndarray | None
    causal: bool
    need_weights: bool
    heads: tuple[int, ...] | None
    encoding: str
    timeout_s: float
    priority: int
    sequence: SequenceFlags | None

    def decode(self, text: bytes | memoryview) -> DecodedRequest:
        """This text's x with the checks that read it, in the order the full decode runs them."""
        x, dtype = codecs.decode_b64({**self.x, "b64": text}, "x", (3,))
        codecs.check_finite(x, "x", self.limits.dtype)
        lengths = None if self.lengths is None else self.lengths.copy()  # each request its own arrays
        mask = None if self.mask is None else self.mask.copy()
        out = "float32" if self.encoding == "lists" else dtype
        inp = AttendInput(x, lengths, mask, self.causal, self.need_weights, self.heads, wire_dtype=dtype, out_dtype=out)
        return DecodedRequest(inp, self.encoding, dtype, self.timeout_s, self.priority, self.sequence)


class BodyPlans:
    """Base64 /attend bodies that differ from one seen before only in x's base64 text skip the JSON parse
    and every check that reads no tensor value.

    A client sends the same fields request after request; only the tensor differs. The key is the
    body's exact bytes before and after x's base64 text. Base64 holds no quote or backslash, so a text
    that decodes as strict base64 between the same bytes makes the same JSON with only that string
    changed: the checks that read x's values (its base64, its length, finiteness and range) run as
    always, and any failure is decoded again in full, so every request gets the same answer and
    the same error message either way. Remembered, as v2's headers: bodies whose only ``"b64"`` is
    x's, with no backslash around it and at most ``max_bytes`` around it, the second time one is decoded
    without error; past ``capacity`` the least recently used goes (the tables of service.frontend.plans).
    One per app, used from the event loop's thread only.
    """

    def __init__(self, capacity: int = PLAN_CACHE_SIZE, max_bytes: int = PLAN_MAX_BYTES) -> None:
        self.capacity = capacity
        self.max_bytes = max_bytes
        self._plans: Recent[tuple[bytes, bytes], _BodyPlan] = Recent(capacity)
        self._seen: Sightings[tuple[bytes, bytes]] = Sightings(capacity)  # passed once, the latest ``capacity``
        self._never: Recent[tuple[bytes, bytes], None] = Recent(capacity)  # passed, but cannot have a plan

    def __len__(self) -> int:
        return len(self._plans)

    def decode(self, body: bytes | bytearray, config: MHAConfig, limits: Limits) -> DecodedRequest:
        """``decode_attend(body, config, limits)``, from a plan when one fits."""
        found = self._split(body)
        if found is None:
            return decode_attend(body, config, limits)
        key, text = found
        plan = self._plans.get(key)
        if plan is not None and plan.config is config and plan.limits is limits:
            try:
                dec = plan.decode(text)
            except ServiceError:
                dec = None  # decoded in full below: its message, as the full decode words it
            if dec is not None:
                self._plans.use(key)
                return dec
        dec = decode_attend(body, config, limits)
        if key in self._never:
            return dec
        if plan is None and not self._seen.second(key):  # a plan the second time, or now to replace a stale one
            return dec
        plan = _body_plan(body, key, text, dec, config, limits)
        if plan is None:  # what decides it lies in the key: not looked at again
            self._never.put(key, None)
        else:
            self._plans.put(key, plan)
        return dec

    def _split(self, body: bytes | bytearray) -> tuple[tuple[bytes, bytes], memoryview] | None:
        """((the bytes before the first base64 text, those after it), the text itself).

        The text is a view into the body: a bytes slice would copy most of the body once more. A body
        that arrived in several messages is a bytearray (httputil.read_limited), the usual case for a
        tensor's worth of base64: its key is copied out as bytes, which a dict can hold.
        """
        if self.capacity < 1:
            return None
        at = body.find(b'"b64"')  # a plain search, fast over the long lists bodies that have none
        m = None if at < 0 else _B64_VALUE.match(body, at)
        if m is None:
            return None
        start = m.end()
        end = body.find(b'"', start)
        if end < 0 or len(body) - (end - start) > self.max_bytes:
            return None
        view = memoryview(body)
        return (bytes(view[:start]), bytes(view[end:])), view[start:end]


def _body_plan(
    body: bytes | bytearray,
    key: tuple[bytes, bytes],
    text: memoryview,
    dec: DecodedRequest,
    config: MHAConfig,
    limits: Limits,
) -> _BodyPlan | None:
    """The plan of a body that passed, when x's base64 text is the only thing that may change in it."""
    before, after = key
    if b"\\" in before or b"\\" in after or body.count(b'"b64"') != 1:  # one literal "b64" key: x's
        return None
    obj = orjson.loads(body)
    x = obj.get("x")
    if type(x) is not dict or x.get("b64") != str(text, "ascii", "replace") or isinstance(obj.get("attn_mask"), dict):
        return None
    inp = dec.input
    return _BodyPlan(
        config=config,
        limits=limits,
        x={"dtype": x["dtype"], "shape": x["shape"]},
        lengths=None if inp.lengths is None else inp.lengths.copy(),  # not the arrays of the request in flight
        mask=None if inp.mask is None else inp.mask.copy(),
        causal=inp.causal,
        need_weights=inp.need_weights,
        heads=inp.heads,
        encoding=dec.encoding,
        timeout_s=dec.timeout_s,
        priority=dec.priority,
        sequence=dec.sequence,
    )


def encode_attend(output: np.ndarray, weights: np.ndarray | None, req: DecodedRequest, model: dict) -> bytes:
    if req.encoding == "base64":
        _model_json(model)
        return _base64_body(output, weights, req.dtype, _model_cache[2])
    return orjson.dumps(attend_body(output, weights, req, _model_json(model)), option=orjson.OPT_SERIALIZE_NUMPY)


def _base64_body(output: np.ndarray, weights: np.ndarray | None, dtype: str, model: bytes) -> bytes:
    """What ``orjson.dumps(attend_body(...))`` writes for base64 tensors, byte for byte, joined from the base64
    texts as pybase64 writes them: one copy of each into the body, where a str in a dict for orjson costs a
    copy into the str, a scan for characters to escape (base64 has none) and a copy into the body."""
    kind = orjson.dumps(dtype)
    parts = [b'{"output":']
    for name, arr in (("output", output), ("weights", weights)):
        if arr is None:
            parts.append(b"null")
        else:
            text = codecs.b64_text(arr, dtype, name)
            parts += (b'{"dtype":', kind, b',"shape":', orjson.dumps(arr.shape), b',"b64":"', text, b'"}')
        parts.append(b',"weights":' if name == "output" else b',"model":')
    parts += (model, b"}")
    return b"".join(parts)


_model_cache: list = [None, None, b""]  # [the model description, its JSON as a Fragment, and as bytes]


def _model_json(model: dict) -> orjson.Fragment:
    """``model`` as JSON written once per model description (state.model_info, never changed in place)."""
    cache = _model_cache
    if cache[0] is not model:
        cache[2] = orjson.dumps(model)
        cache[1] = orjson.Fragment(cache[2])
        cache[0] = model
    return cache[1]


def attend_body(
    output: np.ndarray, weights: np.ndarray | None, req: DecodedRequest, model: dict | orjson.Fragment
) -> dict:
    """The response object before serialisation (orjson, OPT_SERIALIZE_NUMPY); large ones are written
    by the decode processes (service.frontend.offload)."""
    return {
        "output": codecs.encode(output, req.encoding, req.dtype, "output"),
        "weights": None if weights is None else codecs.encode(weights, req.encoding, req.dtype, "weights"),
        "model": model,
    }

"""Tensors <-> wire. Pure functions on numpy arrays; they raise ServiceError(validation_error).

Two JSON encodings of a tensor:
- ``lists``: nested lists of numbers;
- ``base64``: ``{"dtype": "float32"|"float16"|"bfloat16"|"bool", "shape": [...], "b64": "..."}``,
  base64 of the little-endian, row-major bytes (bool: one byte per element, 0 or 1).

bfloat16 has no numpy dtype: on the wire it is the upper 16 bits of a float32. A decoded bfloat16 tensor
stays those bits (uint16) all the way to the engine, which views them as torch.bfloat16 on its device
(service/messages.py: tensors cross in their wire dtype); float32 is rounded to it to nearest-even.
"""

from __future__ import annotations

import base64
import binascii
import math
from array import array
from collections.abc import Sequence
from typing import Any

import numpy as np
import orjson

try:  # SIMD base64: ~30-50x faster than binascii on a [1,128,512] float32 tensor (350 KB of text)
    import pybase64
except ImportError:  # pragma: no cover - the stdlib path below stays the reference
    pybase64 = None

from mha_client._wire import bf16_to_f32, f32_to_bf16  # one implementation for client and server
from service.errors import ServiceError, validation
from service.messages import (  # shared with the model side (its overflow messages and result check)
    DTYPE_MAX,
    HALF_INF,
    all_finite,
    as_float32,
    bits_value,
    largest_bits,
    narrowing_overflow,
    wire_dtype_of,
)

__all__ = [
    "all_finite",
    "as_float32",
    "b64_text",
    "bf16_to_f32",
    "check_finite",
    "decode_b64",
    "decode_lists",
    "encode",
    "encode_b64",
    "f32_to_bf16",
    "reject_bools",
    "to_wire",
]

FLOAT_DTYPES = ("float32", "float16", "bfloat16")
_NUMPY = {"float32": np.dtype("<f4"), "float16": np.dtype("<f2"), "bfloat16": np.dtype("<u2"), "bool": np.dtype("u1")}


def decode_lists(data: Any, name: str, ndims: Sequence[int], *, boolean: bool = False) -> np.ndarray:
    """Nested lists -> array (float32, or bool), with the shape checked to be rectangular.

    Strict: numbers only (a mask: true/false only), with no per-element Python loop on the happy
    path. Numbers are packed row by row by ``array.fromlist``, which converts in C and refuses a
    string, null, object or list (as fast as numpy's own conversion, which would parse "1.5"). A
    boolean is an int to it, so true/false mixed with numbers become 1/0: they are looked for,
    exactly, in the rows holding a 0 or a 1 only. A mask is checked by numpy's type inference:
    a number or string anywhere gives a kind other than 'b'.
    """
    if not isinstance(data, list):
        raise validation(f"{name} must be nested lists or a base64 tensor object, got {type(data).__name__}")
    if boolean:
        return _decode_bools(data, name, ndims)
    shape, inner = [], data
    while isinstance(inner, list):
        shape.append(len(inner))
        inner = inner[0] if inner else None
    if len(shape) not in ndims:
        want = " or ".join(str(n) for n in ndims)
        raise validation(f"{name} must have {want} dimensions, got {len(shape)} (shape {shape})")
    rows = [data]  # the innermost lists, row-major, each checked to have its dimension's length
    for n in shape[:-1]:
        nxt: list = []
        for r in rows:
            if type(r) is not list or len(r) != n:
                raise validation(f"{name} is ragged: its nested lists do not all have the same length")
            nxt.extend(r)
        rows = nxt
    packed = array("f")
    try:
        for r in rows:
            if type(r) is not list or len(r) != shape[-1]:
                raise validation(f"{name} is ragged: its nested lists do not all have the same length")
            packed.fromlist(r)  # float32 in C; a number beyond its range becomes inf (check_finite reports it)
    except OverflowError as e:  # an integer beyond any float
        raise validation(f"{name} holds a number beyond float32's range: {e}") from e
    except TypeError as e:  # not a number: find it (error path only)
        r, j = next((r, j) for r, row in enumerate(rows) for j, v in enumerate(row) if type(v) not in _NUMBERS)
        bad = rows[r][j]
        if isinstance(bad, list):
            raise validation(f"{name} is ragged: its nested lists do not all have the same length") from e
        index = [int(i) for i in np.unravel_index(r, shape[:-1])] if len(shape) > 1 else []
        where = name + "".join(f"[{i}]" for i in (*index, j))
        what = "null" if bad is None else f"{_json_type(bad)} {_short(bad)}"
        raise validation(f"{name} must contain only numbers, got {what} at {where}") from e
    arr = np.frombuffer(packed, dtype=np.float32).reshape(shape)
    if arr.size:
        candidates = (arr == 0) | (arr == 1)
        if candidates.any():
            _reject_bools_in_rows(rows, name, candidates)
    return arr


def _decode_bools(data: list, name: str, ndims: Sequence[int]) -> np.ndarray:
    try:
        arr = np.array(data)
    except ValueError as e:
        msg = str(e)
        if "inhomogeneous" in msg or "sequence" in msg:
            raise validation(f"{name} is ragged: its nested lists do not all have the same length") from e
        raise validation(f"{name} must contain only true/false values: {msg}") from e
    if arr.ndim not in ndims:
        want = " or ".join(str(n) for n in ndims)
        raise validation(f"{name} must have {want} dimensions, got {arr.ndim} (shape {list(arr.shape)})")
    if arr.dtype.kind != "b" and arr.size:
        raise validation(f"{name} must contain only true/false values, {_first_offender(data, name, bool)}")
    return arr.astype(np.bool_, copy=False)


_NUMBERS = (float, int, bool)  # what array("f") takes; booleans are looked for separately


def _first_offender(data: Any, name: str, ok) -> str:
    """'got <json type> <value> at name[i][j]...': the first element failing ``ok`` (error path only)."""
    if ok is bool:
        ok = lambda v: type(v) is bool  # noqa: E731
    stack = [(data, name)]
    while stack:
        value, where = stack.pop()
        if isinstance(value, list):
            stack.extend((v, f"{where}[{i}]") for i, v in reversed(list(enumerate(value))))
        elif not ok(value):
            what = "null" if value is None else f"{_json_type(value)} {_short(value)}"
            return f"got {what} at {where}"
    return "got a value numpy cannot hold"


def _json_type(v: Any) -> str:
    if v is None:
        return "null"
    return {bool: "boolean", str: "string", dict: "object", int: "number", float: "number"}.get(
        type(v), type(v).__name__
    )


def _short(v: Any) -> str:
    text = orjson.dumps(v).decode() if isinstance(v, (bool, str, dict)) else repr(v)
    return text if len(text) <= 40 else text[:37] + "..."


def reject_bools(data: list, name: str, candidates: np.ndarray) -> None:
    """true/false among numbers turned into 1/0 (``candidates``: where the array holds 0 or 1)."""
    if not candidates.any():
        return
    rows = [data]
    for _ in range(candidates.ndim - 1):  # the innermost lists, row-major
        rows = [r for sub in rows for r in sub]
    _reject_bools_in_rows(rows, name, candidates)


def _reject_bools_in_rows(rows: list[list], name: str, candidates: np.ndarray) -> None:
    """Look for true/false, exactly, in the rows (innermost lists) that hold a 0 or a 1."""
    per_row = candidates.reshape(len(rows), -1)
    hit = per_row.any(axis=1)
    full = per_row.all(axis=1) & hit
    if full.any():  # rows of only 0s and 1s (zero padding): orjson writes them ~7x faster than type() walks them
        text = orjson.dumps([rows[r] for r in np.flatnonzero(full)])
        if b"t" not in text and b"f" not in text:  # no true/false: numbers are written with digits, '.', 'e', '-'
            hit &= ~full
    for r in np.flatnonzero(hit):
        row = rows[r]
        if bool in map(type, row):
            j = next(j for j, v in enumerate(row) if type(v) is bool)
            index = [int(i) for i in np.unravel_index(r, candidates.shape[:-1])] if candidates.ndim > 1 else []
            where = name + "".join(f"[{i}]" for i in (*index, j))
            raise validation(f"{name} must contain only numbers, got boolean {_short(row[j])} at {where}")


def decode_b64(obj: dict, name: str, ndims: Sequence[int], *, boolean: bool = False) -> tuple[np.ndarray, str]:
    """``{"dtype","shape","b64"}`` -> (array, wire dtype). Floats come back in their wire dtype: float32, float16,
    or bfloat16's bits as uint16 (``as_float32`` widens them where values are needed)."""
    dtype, shape, b64 = obj["dtype"], obj["shape"], obj["b64"]
    if boolean and dtype != "bool":
        raise validation(f"{name}.dtype must be 'bool', got {dtype!r}")
    if not boolean and dtype not in FLOAT_DTYPES:
        raise validation(f"{name}.dtype must be one of {list(FLOAT_DTYPES)}, got {dtype!r}")
    if len(shape) not in ndims:
        want = " or ".join(str(n) for n in ndims)
        raise validation(f"{name}.shape must have {want} dimensions, got {shape}")
    if shape and min(shape) < 0:
        raise validation(f"{name}.shape must not be negative, got {shape}")
    npdtype = _NUMPY[dtype]
    count = math.prod(shape)  # Python ints: a shape like [2**32, 2**32, 1] cannot wrap around
    nbytes = count * npdtype.itemsize
    raw = _b64decode(b64, nbytes, name)
    if len(raw) != nbytes:
        raise validation(
            f"{name}.b64 holds {len(raw)} bytes, but shape {shape} of {dtype} needs "
            f"{count} x {npdtype.itemsize} = {nbytes}"
        )
    arr = np.frombuffer(raw, dtype=npdtype).reshape(shape)
    if dtype == "bool":
        if arr.size and arr.max() > 1:
            raise validation(f"{name} bool bytes must be 0 or 1")
        arr = arr.astype(np.bool_)
    return arr, dtype


def _b64decode(text: str | bytes | memoryview, nbytes: int, name: str) -> bytes:
    """base64 -> bytes, as strictly as ``b64decode(validate=True)`` but much faster (SIMD).

    The lenient decoder skips characters outside the alphabet. A text of exactly the padded
    length of ``nbytes`` that decodes to ``nbytes`` skipped nothing, so it was valid; anything
    else is decoded again strictly, for the error message.
    """
    if pybase64 is not None:
        try:
            return pybase64.b64decode(text, validate=True)
        except (binascii.Error, ValueError) as e:
            raise validation(f"{name}.b64 is not valid base64: {e}") from e
    if len(text) == 4 * ((nbytes + 2) // 3):
        try:
            raw = binascii.a2b_base64(text)
        except (binascii.Error, ValueError):
            raw = b""
        if len(raw) == nbytes:
            return raw
    try:
        return base64.b64decode(text, validate=True)
    except (binascii.Error, ValueError) as e:
        raise validation(f"{name}.b64 is not valid base64: {e}") from e


def check_finite(arr: np.ndarray, name: str, dtype: str = "float32") -> None:
    """Every value finite and within ``dtype``'s range (the model's: checked before the cast to it).

    ``arr`` is float32, float16, or bfloat16's bits (uint16). One pass on the happy path (finiteness; for
    a half-precision model also the largest magnitude; a half's both at once, by its bits, without widening
    it). JSON numbers beyond float32's range arrive here as Inf.
    """
    if not arr.size:
        return
    limit = DTYPE_MAX[dtype]
    if arr.dtype.itemsize == 2:  # a half: its largest magnitude says both, and a failure is told in float32
        wire = wire_dtype_of(arr)
        bits = largest_bits(arr)
        if bits < HALF_INF[wire] and bits_value(bits, wire) <= limit:
            return
        arr = as_float32(arr, wire)
    elif all_finite(arr):  # no NaN or Inf: then, below float32's limit, the largest magnitude
        if limit >= DTYPE_MAX["float32"] and arr.dtype.itemsize <= 4:
            return
        largest = max(float(np.maximum.reduce(arr, axis=None)), -float(np.minimum.reduce(arr, axis=None)))
        if largest <= limit:
            return
    finite = np.isfinite(arr)
    if not finite.all():
        bad = np.argwhere(~finite)
        first = [int(i) for i in bad[0]]
        raise validation(f"{name} contains {len(bad)} non-finite value(s) (NaN or Inf), the first at {first}")
    over = np.argwhere(np.abs(arr) > limit)
    first = [int(i) for i in over[0]]
    advice = (
        "send smaller values"
        if dtype == "float32"
        else "send smaller values, or serve a float32 model (MHA_DTYPE=float32)"
    )
    raise validation(
        f"{name} holds {len(over)} value(s) beyond the range of the model's dtype {dtype} (|{name}| <= {limit:g}), "
        f"the first {float(arr[tuple(first)]):g} at {first}; {advice}"
    )


def to_wire(arr: np.ndarray, dtype: str, name: str) -> np.ndarray:
    """Results -> a contiguous array of the wire dtype's values (bfloat16: its bits as uint16).

    The engine answers in the response's dtype already (its runner cast and checked them): those pass as
    they are. A float32 array is narrowed here, where narrowing to half precision can overflow values that
    float32 held: that is a numeric_overflow naming the tensor, never an Inf or a NaN on the wire.
    """
    if dtype == "float32" or arr.dtype == _NUMPY[dtype]:
        return np.ascontiguousarray(arr, dtype=_NUMPY[dtype])  # what the model computed: the runner checked it
    if dtype == "bfloat16":
        out = f32_to_bf16(arr).astype("<u2", copy=False)
        bits, inf = out, 0x7F80
    else:
        with np.errstate(over="ignore"):
            out = np.ascontiguousarray(arr, dtype=_NUMPY["float16"])
        bits, inf = out.view("<u2"), 0x7C00
    if out.size and int(np.max(bits & 0x7FFF)) >= inf:  # the exponent all ones: Inf or NaN
        raise ServiceError("numeric_overflow", str(narrowing_overflow(name, arr, dtype)))
    return out


def b64_text(arr: np.ndarray, dtype: str, name: str = "output") -> bytes:
    """A float array's base64 in the given wire dtype, as ASCII bytes (what ``encode_b64``'s ``b64`` holds)."""
    raw = to_wire(arr, dtype, name)
    if pybase64 is not None:  # takes the contiguous array's buffer as it is
        return pybase64.b64encode(raw)
    return binascii.b2a_base64(memoryview(raw).cast("B"), newline=False)


def encode_b64(arr: np.ndarray, dtype: str, name: str = "output") -> dict[str, Any]:
    """array -> ``{"dtype","shape","b64"}`` in the given wire dtype."""
    raw = np.ascontiguousarray(arr, dtype=np.uint8) if dtype == "bool" else to_wire(arr, dtype, name)
    if pybase64 is not None:  # takes the contiguous array's buffer as it is (a cast to bytes costs half as much again)
        text = pybase64.b64encode_as_string(raw)
    else:
        text = binascii.b2a_base64(memoryview(raw).cast("B"), newline=False).decode("ascii")
    return {"dtype": dtype, "shape": list(arr.shape), "b64": text}


def encode_lists(arr: np.ndarray, name: str = "output") -> np.ndarray:
    """Lists are written by orjson straight from a float32 array (OPT_SERIALIZE_NUMPY), which writes
    NaN and Inf as null: a non-finite value is refused here, never sent."""
    if not all_finite(arr):
        bad = int(arr.size - np.count_nonzero(np.isfinite(arr)))
        raise ServiceError("numeric_overflow", f"{name} has {bad} non-finite value(s); send smaller values")
    return np.ascontiguousarray(arr, dtype=np.float32)


def encode(arr: np.ndarray, encoding: str, dtype: str, name: str = "output") -> Any:
    return encode_lists(arr, name) if encoding == "lists" else encode_b64(arr, dtype, name)

"""Tensors <-> the JSON wire format of mha-serve. numpy only: the client must not need the service.

Two encodings of a tensor (the same as ``service/frontend/codecs.py``, which the unit tests check):
- ``lists``: nested lists of numbers (or of true/false for a mask);
- ``base64``: ``{"dtype", "shape", "b64"}``, base64 of the little-endian, row-major bytes;
  ``bfloat16`` is the upper 16 bits of a float32, ``bool`` one byte per element.
"""

from __future__ import annotations

import base64
from typing import Any

import numpy as np

ENCODINGS = ("base64", "lists")
FLOAT_DTYPES = ("float32", "float16", "bfloat16")
_NUMPY = {"float32": np.dtype("<f4"), "float16": np.dtype("<f2"), "bfloat16": np.dtype("<u2"), "bool": np.dtype("u1")}


def to_numpy(value: Any, name: str) -> np.ndarray:
    """A numpy array from an array, a torch tensor (duck-typed: no torch import) or nested lists."""
    if hasattr(value, "detach"):  # a torch tensor, on any device, with or without grad
        t = value.detach().cpu()
        try:
            return t.numpy()
        except TypeError:  # bfloat16 has no numpy dtype
            return t.float().numpy()
    try:
        return np.asarray(value)
    except ValueError as e:
        raise ValueError(f"{name} is not a rectangular array: {e}") from e


def bf16_to_f32(bits: np.ndarray) -> np.ndarray:
    return (bits.astype(np.uint32) << 16).view(np.float32)


def f32_to_bf16(arr: np.ndarray) -> np.ndarray:
    """float32 -> bfloat16 bits, rounding to nearest even (NaN stays NaN)."""
    u = np.ascontiguousarray(arr, dtype=np.float32).view(np.uint32)
    rounded = ((u + 0x7FFF + ((u >> 16) & 1)) >> 16).astype(np.uint16)
    nan = np.isnan(arr)
    if nan.any():
        rounded[nan] = 0x7FC0
    return rounded


def encode_tensor(arr: np.ndarray, encoding: str, dtype: str) -> Any:
    """An array -> its wire form: nested lists, or ``{"dtype","shape","b64"}`` in ``dtype``."""
    if encoding == "lists":
        return arr.tolist()
    if dtype == "bfloat16":
        raw = f32_to_bf16(arr)
    elif dtype == "bool":
        raw = np.ascontiguousarray(arr, dtype=np.uint8)
    else:
        raw = np.ascontiguousarray(arr, dtype=_NUMPY[dtype])
    return {"dtype": dtype, "shape": list(arr.shape), "b64": base64.b64encode(raw.tobytes()).decode("ascii")}


def decode_tensor(value: Any, name: str) -> np.ndarray:
    """A wire tensor -> float32 array (bool for a ``bool`` tensor)."""
    if isinstance(value, list):
        return np.asarray(value, dtype=np.float32)
    if not isinstance(value, dict) or not {"dtype", "shape", "b64"} <= value.keys():
        raise ValueError(f"{name} in the response is neither nested lists nor a base64 tensor: {str(value)[:80]}")
    dtype, shape = value["dtype"], value["shape"]
    if dtype not in _NUMPY:
        raise ValueError(f"{name} in the response has an unknown dtype {dtype!r}")
    raw = base64.b64decode(value["b64"])
    arr = np.frombuffer(raw, dtype=_NUMPY[dtype]).reshape(shape)
    if dtype == "bfloat16":
        return bf16_to_f32(arr)
    if dtype == "bool":
        return arr.astype(np.bool_)
    return arr.astype(np.float32)

"""/attend's fast path (fields read by hand, the response written by hand) against the reference:
pydantic's validation of every field and ``orjson.dumps(attend_body(...))``. Same values, same bytes,
same errors and messages, for valid and invalid bodies alike."""

from __future__ import annotations

import base64
import copy
from typing import Any

import numpy as np
import orjson
import pytest

from mha_client._wire import f32_to_bf16
from mha_core import MHAConfig
from service.errors import ServiceError
from service.frontend import codecs, decode
from service.frontend.decode import DecodedRequest, Limits, attend_body, decode_attend, encode_attend
from tests.unit.test_body_plans import same as same_request  # values equal, not only shapes

CFG = MHAConfig(num_heads=4, emb_size=8, head_size=2, max_seq_len=6)
LIMITS = Limits(
    max_request_batch=3, max_weights_elements=400, default_timeout_ms=1000, max_timeout_ms=5000, priority_levels=3
)
MODEL = {"name": "mha", "num_heads": 4, "emb_size": 8, "head_size": 2, "max_seq_len": 6, "causal": True,
         "dtype": "float32", "device": "cpu", "checksum": "sha256:ab\u00e9"}  # fmt: skip
RNG = np.random.default_rng(7)


def b64(arr: np.ndarray, dtype: str) -> dict[str, Any]:
    if dtype == "bfloat16":
        raw = f32_to_bf16(arr.astype(np.float32)).astype("<u2").tobytes()
    elif dtype == "bool":
        raw = arr.astype(np.uint8).tobytes()
    else:
        raw = arr.astype({"float32": "<f4", "float16": "<f2"}[dtype]).tobytes()
    return {"dtype": dtype, "shape": list(arr.shape), "b64": base64.b64encode(raw).decode()}


X = RNG.standard_normal((2, 4, 8)).astype(np.float32)
MASK = RNG.random((4, 4)) > 0.3

VALID: list[dict[str, Any]] = [
    {"x": b64(X, "float32")},
    {"x": b64(X, "float16")},
    {"x": b64(X, "bfloat16")},
    {"x": X.round(3).tolist()},
    {"x": b64(X, "float32"), "lengths": [4, 2], "causal": False, "return_weights": True, "heads": [3, 1]},
    {"x": b64(X, "float16"), "attn_mask": b64(MASK, "bool"), "timeout_ms": 250.5, "priority": 2},
    {"x": b64(X, "float32"), "attn_mask": MASK.tolist(), "response_encoding": "lists", "return_weights": True},
    {"x": X.tolist(), "response_encoding": "base64", "causal": None, "heads": None, "lengths": None},
    {"x": b64(X, "bfloat16"), "return_weights": True, "response_encoding": "base64", "priority": 0},
    {"x": b64(X, "float32"), "timeout_ms": 250},  # an int: pydantic's float, through pydantic
    {"x": b64(X, "float32"), "timeout_ms": 99999.0, "attn_mask": None},
    {"x": b64(X[:1], "float32"), "lengths": [3], "return_weights": True, "heads": [0]},
]

INVALID: list[dict[str, Any] | list] = [
    [1, 2],
    {},
    {"lengths": [1, 2]},
    {"x": None},
    {"x": b64(X, "float32"), "extra": 1},
    {"x": b64(X, "float32"), "lengths": [4, True]},
    {"x": b64(X, "float32"), "lengths": [4, 2.0]},
    {"x": b64(X, "float32"), "lengths": "4"},
    {"x": b64(X, "float32"), "lengths": [4, 9]},
    {"x": b64(X, "float32"), "lengths": [4]},
    {"x": b64(X, "float32"), "causal": 1},
    {"x": b64(X, "float32"), "return_weights": None},
    {"x": b64(X, "float32"), "return_weights": "yes"},
    {"x": b64(X, "float32"), "heads": [1], "return_weights": False},
    {"x": b64(X, "float32"), "heads": [True], "return_weights": True},
    {"x": b64(X, "float32"), "heads": [7], "return_weights": True},
    {"x": b64(X, "float32"), "timeout_ms": True},
    {"x": b64(X, "float32"), "timeout_ms": "100"},
    {"x": b64(X, "float32"), "timeout_ms": -1.0},
    {"x": b64(X, "float32"), "timeout_ms": 0},
    {"x": b64(X, "float32"), "response_encoding": "binary"},
    {"x": b64(X, "float32"), "response_encoding": 1},
    {"x": b64(X, "float32"), "priority": 4},
    {"x": b64(X, "float32"), "priority": True},
    {"x": b64(X, "float32"), "priority": 1.0},
    {"x": {**b64(X, "float32"), "extra": 1}},
    {"x": {"dtype": "float32", "shape": [2, 4, 8]}},
    {"x": {**b64(X, "float32"), "shape": [2, 4, True]}},
    {"x": {**b64(X, "float32"), "shape": [2, 4, 8.0]}},
    {"x": {**b64(X, "float32"), "shape": "2,4,8"}},
    {"x": {**b64(X, "float32"), "dtype": 32}},
    {"x": {**b64(X, "float32"), "b64": None}},
    {"x": {**b64(X, "float32"), "dtype": "int8"}},
    {"x": {**b64(X, "float32"), "shape": [2, 4, 4]}},
    {"x": {**b64(X, "float32"), "b64": "!!!!"}},
    {"x": b64(X, "float32"), "attn_mask": {**b64(MASK, "bool"), "dtype": "float32"}},
    {"x": b64(X, "float32"), "attn_mask": {**b64(MASK, "bool"), "shape": [4, True]}},
    {"x": b64(X, "float32"), "attn_mask": b64(np.ones((3, 3), bool), "bool")},
    {"x": b64(np.full((1, 2, 8), np.inf, np.float32), "float32")},
]


@pytest.fixture
def reference(monkeypatch):
    """The code before the fast path: pydantic validates every request."""

    def slow(body: bytes) -> DecodedRequest:
        with monkeypatch.context() as m:
            m.setattr(decode, "_plain_request", lambda obj: None)
            m.setattr(decode, "_plain_b64", lambda value: False)
            return decode_attend(body, CFG, LIMITS)

    return slow


@pytest.mark.parametrize("body", VALID, ids=range(len(VALID)))
def test_valid_bodies_decode_as_pydantic_does(body, reference):
    raw = orjson.dumps(body)
    same_request(decode_attend(raw, CFG, LIMITS), reference(raw))


def test_the_usual_bodies_skip_pydantic(monkeypatch):
    """What the fast path is for: base64 tensors and the usual fields never reach a pydantic model."""

    def fail(*a, **k):
        raise AssertionError("pydantic ran")

    monkeypatch.setattr(decode.AttendRequest, "model_validate", fail)
    monkeypatch.setattr(decode.TensorB64, "model_validate", fail)
    for body in VALID[:9] + VALID[10:]:
        decode_attend(orjson.dumps(body), CFG, LIMITS)
    with pytest.raises(AssertionError, match="pydantic ran"):  # an int timeout_ms: pydantic makes it a float
        decode_attend(orjson.dumps(VALID[9]), CFG, LIMITS)


@pytest.mark.parametrize("body", INVALID, ids=range(len(INVALID)))
def test_invalid_bodies_get_the_same_error(body, reference):
    raw = orjson.dumps(body)
    with pytest.raises(ServiceError) as fast:
        decode_attend(raw, CFG, LIMITS)
    with pytest.raises(ServiceError) as slow:
        reference(raw)
    assert (fast.value.status, fast.value.body()) == (slow.value.status, slow.value.body())
    assert fast.value.status in (400, 422)


@pytest.mark.parametrize("dtype", ["float32", "float16", "bfloat16"])
@pytest.mark.parametrize("with_weights", [False, True])
@pytest.mark.parametrize("encoding", ["base64", "lists"])
def test_responses_are_the_bytes_orjson_writes(dtype, with_weights, encoding):
    out = RNG.standard_normal((2, 3, 8)).astype(np.float32)
    weights = RNG.random((2, 2, 3, 3)).astype(np.float32) if with_weights else None
    req = DecodedRequest(input=None, encoding=encoding, dtype=dtype, timeout_s=1.0)
    want = orjson.dumps(attend_body(out, weights, req, MODEL), option=orjson.OPT_SERIALIZE_NUMPY)
    assert encode_attend(out, weights, req, MODEL) == want
    other = {**MODEL, "name": "other"}  # a new model description is written anew, not the one remembered
    want_other = orjson.dumps(attend_body(out, weights, req, other), option=orjson.OPT_SERIALIZE_NUMPY)
    assert encode_attend(out, weights, req, other) == want_other


def test_base64_text_is_of_the_row_major_bytes():
    """encode_b64 hands the array's own buffer to the encoder: the text is that of its bytes, for every shape."""
    for shape in [(1,), (2, 3), (1, 5, 4), (2, 1, 3, 3)]:  # outputs are never empty
        base = RNG.random(shape).astype(np.float32)
        for arr in (base, np.asfortranarray(base), base[..., ::-1]):  # not contiguous: copied first
            for dtype in ("float32", "float16", "bfloat16", "bool"):
                a = arr > 0.5 if dtype == "bool" else arr
                raw = codecs.to_wire(a, dtype, "x") if dtype != "bool" else a.astype(np.uint8)
                got = codecs.encode_b64(copy.copy(a), dtype)
                assert got == {"dtype": dtype, "shape": list(a.shape), "b64": base64.b64encode(raw.tobytes()).decode()}


def test_base64_overflow_is_the_same_error():
    arr = np.full((1, 2, 2), 1e6, np.float32)
    req = DecodedRequest(input=None, encoding="base64", dtype="float16", timeout_s=1.0)
    with pytest.raises(ServiceError) as fast:
        encode_attend(arr, None, req, MODEL)
    with pytest.raises(ServiceError) as slow:
        attend_body(arr, None, req, MODEL)
    assert fast.value.body() == slow.value.body()
    assert "output has values beyond float16's range" in fast.value.body()["error"]["message"]

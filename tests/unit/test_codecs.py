"""Wire codecs: round trips in every encoding and dtype, and their errors."""

from __future__ import annotations

import base64

import numpy as np
import orjson
import pytest
import torch

from service.errors import ServiceError
from service.frontend import codecs


def test_lists_round_trip_is_exact_for_float32():
    x = np.random.default_rng().standard_normal((2, 3, 5)).astype(np.float32)
    wire = orjson.loads(orjson.dumps({"x": codecs.encode(x, "lists", "float32")}, option=orjson.OPT_SERIALIZE_NUMPY))
    back = codecs.decode_lists(wire["x"], "x", (3,))
    assert back.dtype == np.float32
    np.testing.assert_array_equal(back, x)


@pytest.mark.parametrize("dtype", ["float32", "float16", "bfloat16"])
def test_base64_round_trip_every_dtype(dtype):
    x = np.random.default_rng().standard_normal((2, 3, 5)).astype(np.float32)
    wire = codecs.encode(x, "base64", dtype)
    assert wire["dtype"] == dtype and wire["shape"] == [2, 3, 5]
    back, got = codecs.decode_b64(wire, "x", (3,))
    assert got == dtype
    tdtype = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}[dtype]
    # the reference rounding is torch's own cast to the dtype
    want = torch.from_numpy(x).to(tdtype).float().numpy()
    assert back.dtype == {"float32": np.float32, "float16": np.float16, "bfloat16": np.uint16}[dtype]  # as it came
    np.testing.assert_array_equal(codecs.as_float32(back, got), want)


def test_bfloat16_bytes_match_torch_layout():
    t = torch.tensor([1.0, -2.5, 3.14159, 1e-3, 65504.0], dtype=torch.bfloat16)
    raw = t.view(torch.int16).numpy().astype("<i2").tobytes()
    arr, _ = codecs.decode_b64({"dtype": "bfloat16", "shape": [5], "b64": base64.b64encode(raw).decode()}, "x", (1,))
    np.testing.assert_array_equal(arr, t.view(torch.uint16).numpy())  # its bits, not widened
    np.testing.assert_array_equal(codecs.as_float32(arr, "bfloat16"), t.float().numpy())
    assert base64.b64decode(codecs.encode_b64(t.float().numpy(), "bfloat16")["b64"]) == raw


def test_bool_mask_round_trip():
    m = np.random.default_rng().random((4, 4)) > 0.5
    wire = codecs.encode_b64(m, "bool")
    back, _ = codecs.decode_b64(wire, "attn_mask", (2, 3), boolean=True)
    np.testing.assert_array_equal(back, m)
    np.testing.assert_array_equal(codecs.decode_lists(m.tolist(), "attn_mask", (2, 3), boolean=True), m)


def b64(arr: np.ndarray) -> str:
    return base64.b64encode(arr.tobytes()).decode()


@pytest.mark.parametrize(
    ("call", "message"),
    [
        (lambda: codecs.decode_lists([[[1, 2], [3]]], "x", (3,)), "x is ragged"),
        (lambda: codecs.decode_lists([[1, 2]], "x", (3,)), "x must have 3 dimensions, got 2 (shape [1, 2])"),
        (lambda: codecs.decode_lists([[["a", 1]]], "x", (3,)), "x must contain only numbers"),
        (
            lambda: codecs.decode_lists([[[1, 0]]], "attn_mask", (2, 3), boolean=True),
            "true/false values, got number 1 at attn_mask[0][0][0]",
        ),
        (
            lambda: codecs.decode_b64(
                {"dtype": "float32", "shape": [1, 2, 3], "b64": b64(np.zeros(5, np.float32))}, "x", (3,)
            ),
            "x.b64 holds 20 bytes, but shape [1, 2, 3] of float32 needs 6 x 4 = 24",
        ),
        (
            lambda: codecs.decode_b64({"dtype": "float32", "shape": [1, 1, 1], "b64": "@@@"}, "x", (3,)),
            "not valid base64",
        ),
        (lambda: codecs.decode_b64({"dtype": "int8", "shape": [1], "b64": ""}, "x", (1,)), "x.dtype must be one of"),
        (
            lambda: codecs.decode_b64({"dtype": "float32", "shape": [2, -1], "b64": ""}, "x", (2,)),
            "must not be negative",
        ),
        (
            lambda: codecs.check_finite(np.array([[1.0, np.nan], [np.inf, 2.0]], np.float32), "x"),
            "x contains 2 non-finite value(s) (NaN or Inf), the first at [0, 1]",
        ),
    ],
)
def test_decode_errors_say_what_is_wrong(call, message):
    with pytest.raises(ServiceError) as e:
        call()
    assert e.value.status == 422
    assert message in e.value.message


@pytest.mark.parametrize("simd", [True, False])
def test_fast_base64_is_as_strict_as_validate_true(simd, monkeypatch):
    """Both fast decoders (pybase64, and the stdlib fallback) reject exactly what b64decode(validate=True) does."""
    if not simd:
        monkeypatch.setattr(codecs, "pybase64", None)
    rnd = np.random.default_rng()
    for _ in range(3000):
        n = int(rnd.integers(1, 40))
        good = base64.b64encode(rnd.bytes(n)).decode()
        pos = int(rnd.integers(len(good)))
        bad = good[:pos] + str(rnd.choice(list("*!@ \n=-_.A/+"))) + good[pos + 1 :]
        try:
            strict = base64.b64decode(bad, validate=True)
        except ValueError:
            strict = None
        try:
            fast = codecs._b64decode(bad, n, "x")
        except ServiceError:
            fast = None
        assert fast == strict, (good, bad)


@pytest.mark.parametrize(
    ("rows", "where"),
    [
        ([[0.0, 0.0, False], [0.5, 1.5, 2.5]], "x[0][0][2]"),  # a row of only 0s and 1s (zero padding)
        ([[0.0, 1.0, 1.0], [1.0, True, 0.0]], "x[0][1][1]"),
        ([[0.25, 0.0, 2.0], [0.5, 1.5, True]], "x[0][1][2]"),  # a row that also holds other numbers
    ],
)
def test_lists_booleans_among_numbers_are_found_exactly(rows, where):
    with pytest.raises(ServiceError) as e:
        codecs.decode_lists([rows], "x", (3,))
    assert e.value.message.startswith("x must contain only numbers, got boolean ") and e.value.message.endswith(where)
    ok = [[[0.0, 0.0, 0.0], [1.0, 0, 1]], [[1e-3, 0.0, 1.0], [2, 3, 1]]]  # 0s and 1s, ints too, are numbers
    np.testing.assert_array_equal(codecs.decode_lists(ok, "x", (3,)), np.array(ok, np.float32))


@pytest.mark.parametrize("dtype", ["float32", "float16", "bfloat16"])
@pytest.mark.parametrize("with_weights", [False, True])
def test_a_base64_attend_body_is_what_orjson_writes_byte_for_byte(dtype, with_weights, rng_seed):
    """encode_attend joins the base64 texts into the body itself: the same bytes as orjson.dumps of attend_body."""
    import orjson

    from service.frontend.decode import DecodedRequest, attend_body, encode_attend
    from service.messages import AttendInput

    rng = np.random.default_rng(rng_seed)
    out = rng.standard_normal((2, 5, 8)).astype(np.float32)
    weights = rng.random((2, 3, 5, 5)).astype(np.float32) if with_weights else None
    req = DecodedRequest(AttendInput(out), "base64", dtype, 1.0)
    model = {"name": "mha", "emb_size": 8, "dtype": "float32"}
    want = orjson.dumps(attend_body(out, weights, req, model), option=orjson.OPT_SERIALIZE_NUMPY)
    assert encode_attend(out, weights, req, model) == want
    assert encode_attend(out[:, :3], weights, req, model) == orjson.dumps(attend_body(out[:, :3], weights, req, model))

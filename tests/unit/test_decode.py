"""The /attend envelope and its checks: each bad input gets its status and a message with numbers."""

from __future__ import annotations

import base64

import numpy as np
import orjson
import pytest

from mha_core import MHAConfig
from service.errors import ServiceError
from service.frontend.decode import Limits, decode_attend

CFG = MHAConfig(num_heads=4, emb_size=8, head_size=2, max_seq_len=6)
LIMITS = Limits(max_request_batch=3, max_weights_elements=200, default_timeout_ms=1000, max_timeout_ms=5000)


def x_lists(B=1, T=4, E=8):
    return np.random.default_rng().standard_normal((B, T, E)).round(3).tolist()


def decode(body):
    raw = body if isinstance(body, bytes) else orjson.dumps(body)
    return decode_attend(raw, CFG, LIMITS)


def test_good_request_decodes_every_field():
    x = x_lists(2, 4)
    mask = (np.random.default_rng().random((4, 4)) > 0.3).tolist()
    d = decode(
        {
            "x": x,
            "lengths": [4, 2],
            "causal": False,
            "attn_mask": mask,
            "return_weights": True,
            "heads": [3, 1],
            "timeout_ms": 250,
            "response_encoding": "base64",
        }
    )
    np.testing.assert_array_equal(d.input.x, np.asarray(x, np.float32))
    np.testing.assert_array_equal(d.input.lengths, [4, 2])
    np.testing.assert_array_equal(d.input.mask, mask)
    assert (d.input.causal, d.input.need_weights, d.input.heads) == (False, True, (3, 1))
    assert (d.encoding, d.dtype, d.timeout_s) == ("base64", "float32", 0.25)


def test_defaults_and_timeout_cap():
    d = decode({"x": x_lists()})
    assert (d.input.causal, d.input.need_weights, d.input.lengths, d.encoding) == (True, False, None, "lists")
    assert d.timeout_s == 1.0
    assert decode({"x": x_lists(), "timeout_ms": 10**9}).timeout_s == 5.0


def test_base64_float16_request_answers_in_float16():
    x = np.random.default_rng().standard_normal((1, 3, 8)).astype(np.float16)
    d = decode({"x": {"dtype": "float16", "shape": [1, 3, 8], "b64": base64.b64encode(x.tobytes()).decode()}})
    assert (d.encoding, d.dtype) == ("base64", "float16")
    assert d.input.x.dtype == np.float16  # no float32 copy: it crosses to the engine as it came
    assert (d.input.wire_dtype, d.input.out_dtype) == ("float16", "float16")
    np.testing.assert_array_equal(d.input.x, x)


@pytest.mark.parametrize(
    ("body", "status", "message"),
    [
        (b"{not json", 400, "not valid JSON"),
        (b"", 400, "body is empty"),
        ([1, 2], 422, "must be a JSON object, got list"),
        ({}, 422, "x is required"),
        ({"x": x_lists(), "extra": 1}, 422, "unknown field 'extra'"),
        ({"x": [[[1.0] * 8] * 3, [[1.0] * 8] * 2]}, 422, "x is ragged"),
        ({"x": x_lists(E=5)}, 422, "x has emb_size 5 (shape [1, 4, 5]), but the model expects 8"),
        ({"x": x_lists(T=7)}, 422, "sequence length 7, more than the model's max_seq_len 6"),
        ({"x": x_lists(B=4)}, 422, "x has 4 sequences, more than the per-request limit max_request_batch 3"),
        ({"x": [[[1e39] + [0.0] * 7]]}, 422, "non-finite value(s) (NaN or Inf), the first at [0, 0, 0]"),
        ({"x": {"dtype": "float32", "shape": [1, 1, 8], "b64": "AAAA"}}, 422, "holds 3 bytes, but shape [1, 1, 8]"),
        ({"x": {"dtype": "float32", "shape": [1, 1, 8], "b64": "%%%"}}, 422, "x.b64 is not valid base64"),
        ({"x": {"dtype": "float32", "shape": [1, 1, 8]}}, 422, "x.b64 is required"),
        ({"x": {"dtype": "float32", "shape": [1, 1, 8], "b64": "", "zip": 1}}, 422, "unknown field 'x.zip'"),
        ({"x": x_lists(2), "lengths": [4]}, 422, "lengths has 1 entries, but x has B = 2 sequences"),
        ({"x": x_lists(2), "lengths": [4, 5]}, 422, "lengths[1] = 5 is out of range 1..4"),
        ({"x": x_lists(2), "lengths": [0, 4]}, 422, "lengths[0] = 0 is out of range 1..4"),
        ({"x": x_lists(), "lengths": ["4"]}, 422, "lengths.0: Input should be a valid integer"),
        ({"x": x_lists(), "causal": "yes"}, 422, "causal: Input should be a valid boolean"),
        (
            {"x": x_lists(), "attn_mask": [[True] * 3] * 3},
            422,
            "attn_mask must have shape [4, 4] or [1, 4, 4], got [3, 3]",
        ),
        ({"x": x_lists(), "return_weights": True, "heads": [4]}, 422, "head index 4 is out of range 0..3"),
        ({"x": x_lists(), "heads": [1]}, 422, "heads selects weights to return: it needs return_weights = true"),
        (
            {"x": x_lists(3, 6), "return_weights": True},
            422,
            "the weights would have 432 elements (B=3 x heads=4 x T=6 x T=6)",
        ),
        ({"x": x_lists(), "timeout_ms": 0}, 422, "timeout_ms must be > 0, got 0"),
        ({"x": x_lists(), "timeout_ms": -5}, 422, "timeout_ms must be > 0, got -5"),
        ({"x": x_lists(), "response_encoding": "xml"}, 422, "response_encoding: Input should be 'lists' or 'base64'"),
        ({"x": "abc"}, 422, "x must be nested lists or a base64 tensor object, got str"),
    ],
)
def test_bad_requests(body, status, message):
    with pytest.raises(ServiceError) as e:
        decode(body)
    assert e.value.status == status
    assert message in e.value.message, e.value.message


def test_weights_cap_counts_only_requested_heads():
    d = decode({"x": x_lists(3, 6), "return_weights": True, "heads": [0]})  # 3*1*36 = 108 <= 200
    assert d.input.heads == (0,)

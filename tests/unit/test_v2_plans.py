"""v2 binary requests whose JSON header was seen before (service.frontend.v2.HeaderPlans): a hit skips the
header's parse and checks, and is indistinguishable from today's path (a HeaderPlans of capacity 0)."""

from __future__ import annotations

from typing import Any

import numpy as np
import orjson
import pytest

from mha_core import MHAConfig
from service.errors import ServiceError
from service.frontend import oip, v2
from service.frontend.codecs import bf16_to_f32, f32_to_bf16
from service.frontend.decode import Limits
from service.messages import WIRE_NUMPY, as_float32

CFG = MHAConfig(num_heads=4, emb_size=8, head_size=2, max_seq_len=6)
LIMITS = Limits(
    max_request_batch=3, max_weights_elements=10_000, default_timeout_ms=1000, max_timeout_ms=5000, priority_levels=2
)
WIRE = {"FP32": "<f4", "FP16": "<f2", "INT32": "<i4", "INT64": "<i8", "BOOL": "u1"}
rng = np.random.default_rng()


def wire(arr: np.ndarray, datatype: str) -> bytes:
    return f32_to_bf16(arr).tobytes() if datatype == "BF16" else np.ascontiguousarray(arr, WIRE[datatype]).tobytes()


def body(inputs: list[tuple[str, str, np.ndarray]], head: dict[str, Any] | None = None) -> tuple[bytes, str]:
    """(JSON header + each input's bytes, Inference-Header-Content-Length)."""
    specs, blobs = [], []
    for name, datatype, arr in inputs:
        blobs.append(wire(arr, datatype))
        specs.append(
            {
                "name": name,
                "datatype": datatype,
                "shape": list(arr.shape),
                "parameters": {"binary_data_size": len(blobs[-1])},
            }
        )
    header = orjson.dumps({**(head or {}), "inputs": specs})
    return header + b"".join(blobs), str(len(header))


def today(raw: bytes, hl: str | None, limits: Limits = LIMITS):
    """The path without plans: parse and check everything."""
    return v2.HeaderPlans("mha", capacity=0).decode(raw, hl, CFG, limits)


def learn(plans: v2.HeaderPlans, raw: bytes, hl: str, limits: Limits = LIMITS) -> None:
    """Decode a good request twice: a header is remembered the second time it passes."""
    for _ in range(2):
        plans.decode(raw, hl, CFG, limits)


def error(fn, *args) -> tuple[str, str]:
    with pytest.raises(ServiceError) as e:
        fn(*args)
    return e.value.type, e.value.message


def assert_same(got, want) -> None:
    """Two decodes of one request: the same input, timeout, priority and answer plan."""
    (req, inp, timeout_s, priority), (wreq, winp, wtimeout_s, wpriority) = got, want
    assert (req.datatype, tuple(req.outputs), req.id) == (wreq.datatype, tuple(wreq.outputs), wreq.id)
    assert (timeout_s, priority) == (wtimeout_s, wpriority)
    assert (inp.causal, inp.need_weights, inp.heads) == (winp.causal, winp.need_weights, winp.heads)
    for a, b in ((inp.x, winp.x), (inp.lengths, winp.lengths), (inp.mask, winp.mask)):
        assert (a is None) == (b is None)
        if a is not None:
            assert (a.dtype, a.shape) == (b.dtype, b.shape)
            np.testing.assert_array_equal(a, b)


def outputs_for(inp, heads: int) -> dict[str, np.ndarray]:
    B, T, E = inp.x.shape
    return {
        "output": rng.standard_normal((B, T, E)).astype(np.float32),
        "weights": rng.random((B, heads, T, T)).astype(np.float32),
    }


# (inputs as (name, datatype, shape or values maker), header extras, heads the weights have)
CASES = {
    "fp32, default output as JSON": ([("x", "FP32", (1, 4, 8))], {}, 4),
    "fp16, lengths [B], binary_data_output": (
        [("x", "FP16", (2, 5, 8)), ("lengths", "INT32", "lengths")],
        {"parameters": {"binary_data_output": True}},
        4,
    ),
    "bf16, lengths [B, 1], shared mask, both outputs binary, every parameter": (
        [("x", "BF16", (3, 6, 8)), ("lengths", "INT64", "lengths_b1"), ("attn_mask", "BOOL", "mask_tt")],
        {
            "id": "req-1",
            "parameters": {"heads": "2,0", "causal": False, "timeout_ms": 250, "priority": 1},
            "outputs": [
                {"name": "output", "parameters": {"binary_data": True}},
                {"name": "weights", "parameters": {"binary_data": True}},
            ],
        },
        2,
    ),
    "fp32, per-sequence mask, weights alone as JSON": (
        [("x", "FP32", (2, 3, 8)), ("attn_mask", "BOOL", "mask_btt")],
        {"id": "w", "outputs": [{"name": "weights"}], "parameters": {"timeout": 7000}},
        4,
    ),
}


def make_inputs(spec: list[tuple[str, str, Any]]) -> list[tuple[str, str, np.ndarray]]:
    """Fresh values for one case's inputs (the same shapes every time)."""
    out = []
    B, T = spec[0][2][0], spec[0][2][1]
    for name, datatype, what in spec:
        if what == "lengths":
            arr = rng.integers(1, T + 1, B)
        elif what == "lengths_b1":
            arr = rng.integers(1, T + 1, (B, 1))
        elif what == "mask_tt":
            arr = np.tril(rng.random((T, T)) > 0.3) | np.eye(T, dtype=bool)
        elif what == "mask_btt":
            arr = (rng.random((B, T, T)) > 0.3) | np.eye(T, dtype=bool)
        else:
            arr = rng.standard_normal(what).astype(np.float32)
        out.append((name, datatype, arr))
    return out


@pytest.mark.parametrize("case", CASES)
def test_a_repeated_header_decodes_each_body_as_today(case):
    spec, head, heads = CASES[case]
    plans = v2.HeaderPlans("mha", capacity=8)
    first = make_inputs(spec)
    raw, hl = body(first, head)
    assert_same(plans.decode(raw, hl, CFG, LIMITS), today(raw, hl))
    assert len(plans) == 0  # seen once
    assert_same(plans.decode(raw, hl, CFG, LIMITS), today(raw, hl))
    assert len(plans) == 1  # twice: remembered
    for _ in range(3):  # the same header bytes, other tensor values
        inputs = make_inputs(spec)
        raw2, hl2 = body(inputs, head)
        assert raw2[: int(hl2)] == raw[: int(hl)] and raw2 != raw
        got = plans.decode(raw2, hl2, CFG, LIMITS)
        assert type(got[0]) is v2.Plan  # served from the plan
        assert_same(got, today(raw2, hl2))
        # and what a straightforward reading of the body gives
        values = dict((n, a) for n, _, a in inputs)
        dt = spec[0][1]
        want_x = bf16_to_f32(f32_to_bf16(values["x"])) if dt == "BF16" else values["x"].astype(WIRE[dt])
        assert got[1].wire_dtype == got[1].out_dtype == oip.WIRE[dt]  # x crosses as it came; answers come in it
        assert got[1].x.dtype == WIRE_NUMPY[oip.WIRE[dt]]  # no float32 copy of a half x
        np.testing.assert_array_equal(as_float32(got[1].x, got[1].wire_dtype), want_x.astype(np.float32))
        if "lengths" in values:
            np.testing.assert_array_equal(got[1].lengths, values["lengths"].reshape(-1))
        if "attn_mask" in values:
            np.testing.assert_array_equal(got[1].mask, values["attn_mask"])
        # the response: byte for byte what today's encoder writes, for the expected shapes and any other
        for h in (heads, heads + 1):
            tensors = outputs_for(got[1], h)
            want_body, want_hl = v2._encode(today(raw2, hl2)[0], "mha", tensors)
            got_body, got_hl = v2._encode(got[0], "mha", tensors)
            assert (b"".join(got_body), got_hl) == (b"".join(want_body), want_hl)
            if h == heads and got[0].answer is not None:  # every output binary: its header was written once
                assert got_hl == len(got[0].answer) and b"".join(got_body).startswith(got[0].answer)
    assert len(plans) == 1


def test_hits_share_no_state():
    spec, head, _ = CASES["bf16, lengths [B, 1], shared mask, both outputs binary, every parameter"]
    plans = v2.HeaderPlans("mha", capacity=8)
    learn(plans, *body(make_inputs(spec), head))
    a, b = make_inputs(spec), make_inputs(spec)
    _, one, _, _ = plans.decode(*body(a, head), CFG, LIMITS)
    _, two, _, _ = plans.decode(*body(b, head), CFG, LIMITS)
    assert one.x is not two.x and one.mask is not two.mask and one.lengths is not two.lengths
    np.testing.assert_array_equal(one.x, f32_to_bf16(a[0][2]))  # its bits, not overwritten by the second
    np.testing.assert_array_equal(two.x, f32_to_bf16(b[0][2]))
    two.mask[...] = False  # a request's arrays are its own
    np.testing.assert_array_equal(one.mask, a[2][2])


def faulty(kind: str) -> tuple[bytes, str]:
    """x FP32 [2, 4, 8], lengths INT32 [2], attn_mask [2, 4, 4]: good, or with faults in the values."""
    x = rng.standard_normal((2, 4, 8)).astype(np.float32)
    lengths = np.array([4, 2], np.int32)
    mask = np.ones((2, 4, 4), bool).view(np.uint8).copy()
    if "nan" in kind:
        x[1, 2, 3] = np.nan
    if "mask" in kind:
        mask[0, 1, 1] = 2
    if "lengths" in kind:
        lengths[1] = 9
    return body([("x", "FP32", x), ("lengths", "INT32", lengths), ("attn_mask", "BOOL", mask)], {"id": "f"})


@pytest.mark.parametrize(
    "kind", ["nan", "mask", "lengths", "nan+mask", "nan+lengths", "mask+lengths", "nan+mask+lengths"]
)
def test_value_faults_on_a_known_header_name_the_same_first_fault(kind):
    plans = v2.HeaderPlans("mha", capacity=8)
    learn(plans, *faulty("good"))
    raw, hl = faulty(kind)
    want = error(today, raw, hl)
    assert want[0] == "validation_error"
    assert error(plans.decode, raw, hl, CFG, LIMITS) == want
    assert len(plans) == 1  # the header stays good
    assert type(plans.decode(*faulty("good"), CFG, LIMITS)[0]) is v2.Plan


def test_half_precision_range_is_checked_on_a_hit():
    limits = Limits(3, 10_000, 1000, 5000, dtype="float16")
    plans = v2.HeaderPlans("mha", capacity=8)
    x = rng.standard_normal((1, 4, 8)).astype(np.float32)
    learn(plans, *body([("x", "FP32", x)]), limits)
    x[0, 3, 5] = 1e5
    raw, hl = body([("x", "FP32", x)])
    assert error(plans.decode, raw, hl, CFG, limits) == error(today, raw, hl, limits)


def test_a_bad_header_is_never_remembered():
    plans = v2.HeaderPlans("mha", capacity=8)
    x = rng.standard_normal((1, 4, 8)).astype(np.float32)
    raw, hl = body([("x", "FP32", x)], {"parameters": {"heads": [0]}})  # heads without the weights output
    want = error(today, raw, hl)
    assert "needs the 'weights' output" in want[1]
    for _ in range(2):
        assert error(plans.decode, raw, hl, CFG, LIMITS) == want
    assert len(plans) == 0
    # a good header whose first request had a bad value is remembered once a request passes
    x[0, 0, 0] = np.inf
    raw, hl = body([("x", "FP32", x)])
    assert error(plans.decode, raw, hl, CFG, LIMITS) == error(today, raw, hl)
    assert len(plans) == 0
    x[0, 0, 0] = 1.0
    learn(plans, *body([("x", "FP32", x)]))
    assert len(plans) == 1


def test_the_same_header_with_another_body_length_is_refused_as_today():
    plans = v2.HeaderPlans("mha", capacity=8)
    raw, hl = body([("x", "FP32", rng.standard_normal((1, 4, 8)).astype(np.float32))])
    learn(plans, raw, hl)
    for bad in (raw[:-4], raw + b"\0\0\0\0"):
        want = error(today, bad, hl)
        assert "add up to 128 bytes" in want[1]
        assert error(plans.decode, bad, hl, CFG, LIMITS) == want
    assert type(plans.decode(raw, hl, CFG, LIMITS)[0]) is v2.Plan


def with_outputs(raw: bytes, hl: str, binary: bytes) -> tuple[bytes, str]:
    """The request with ``"outputs": [{"name": "output", "parameters": {"binary_data": <binary>}}]``."""
    outs = b'"outputs":[{"name":"output","parameters":{"binary_data":' + binary + b"}}],"
    return raw[:1] + outs + raw[1:], str(int(hl) + len(outs))


@pytest.mark.parametrize(
    ("a", "b"),
    [
        # the same number of elements in another shape
        (((1, 4, 8), {}, None), ((2, 2, 8), {}, None)),
        # the output binary or not (JSON allows the space that keeps the length)
        (((1, 4, 8), {}, b"true "), ((1, 4, 8), {}, b"false")),
        # another request id, another timeout
        (((1, 4, 8), {"id": "a"}, None), ((1, 4, 8), {"id": "b"}, None)),
        (
            ((1, 4, 8), {"parameters": {"timeout_ms": 100}}, None),
            ((1, 4, 8), {"parameters": {"timeout_ms": 200}}, None),
        ),
    ],
)
def test_headers_of_the_same_length_are_not_confused(a, b):
    """What a plan looked up by the lengths alone would get wrong: the headers differ in one place."""
    plans = v2.HeaderPlans("mha", capacity=8)
    raws = []
    for shape, head, binary in (a, b):
        raw, hl = body([("x", "FP32", rng.standard_normal(shape).astype(np.float32))], head)
        raws.append(with_outputs(raw, hl, binary) if binary else (raw, hl))
    (ra, ha), (rb, hb) = raws
    assert len(ra) == len(rb) and ha == hb and ra[: int(ha)] != rb[: int(hb)]
    learn(plans, ra, ha)
    assert type(plans.decode(ra, ha, CFG, LIMITS)[0]) is v2.Plan  # remembered
    for raw, hl in ((rb, hb), (rb, hb), (rb, hb), (ra, ha)):
        got, want = plans.decode(raw, hl, CFG, LIMITS), today(raw, hl)
        assert_same(got, want)
        tensors = outputs_for(got[1], 4)
        assert b"".join(v2._encode(got[0], "mha", tensors)[0]) == b"".join(v2._encode(want[0], "mha", tensors)[0])


def test_a_plan_serves_only_the_model_and_limits_it_was_made_against():
    plans = v2.HeaderPlans("mha", capacity=8)
    raw, hl = body([("x", "FP32", rng.standard_normal((2, 4, 8)).astype(np.float32))])
    learn(plans, raw, hl)
    assert len(plans) == 1
    one_sequence = Limits(1, 10_000, 1000, 5000)
    want = error(today, raw, hl, one_sequence)
    assert "more than the per-request limit max_request_batch 1" in want[1]
    assert error(plans.decode, raw, hl, CFG, one_sequence) == want
    other = MHAConfig(num_heads=4, emb_size=8, head_size=2, max_seq_len=3)
    assert "max_seq_len 3" in error(plans.decode, raw, hl, other, LIMITS)[1]


def test_the_plans_stay_bounded_and_the_least_recently_used_goes():
    plans = v2.HeaderPlans("mha", capacity=4)
    x = rng.standard_normal((1, 4, 8)).astype(np.float32)

    def send(i: int):
        return plans.decode(*body([("x", "FP32", x)], {"id": f"r{i}"}), CFG, LIMITS)[0]

    def hit(i: int) -> bool:
        return type(send(i)) is v2.Plan

    for i in range(4):
        assert [hit(i), hit(i)] == [False, False]  # seen, then remembered
    assert hit(0)  # r0 is now the most recently used: r1 the least
    assert [hit(4), hit(4)] == [False, False]  # r4 remembered, r1 goes
    assert hit(0) and hit(2) and not hit(1)
    for i in range(5, 13):  # more distinct headers than the capacity
        assert send(i).id == f"r{i}" and send(i).id == f"r{i}"
        assert len(plans) == 4
    assert [hit(i) for i in (9, 10, 11, 12)] == [True] * 4


def test_headers_seen_once_make_no_plans():
    """A client that sends a new request id each time: no plan per request, and the record stays bounded."""
    plans = v2.HeaderPlans("mha", capacity=4)
    x = rng.standard_normal((1, 4, 8)).astype(np.float32)
    for i in range(20):
        raw, hl = body([("x", "FP32", x)], {"id": f"unique-{i}"})
        assert type(plans.decode(raw, hl, CFG, LIMITS)[0]) is not v2.Plan
    assert len(plans) == 0 and len(plans._seen) == 4
    assert type(plans.decode(raw, hl, CFG, LIMITS)[0]) is not v2.Plan  # the latest, seen twice: remembered
    assert len(plans) == 1 and type(plans.decode(raw, hl, CFG, LIMITS)[0]) is v2.Plan


def test_what_is_not_remembered():
    x = rng.standard_normal((1, 4, 8)).astype(np.float32)
    plans = v2.HeaderPlans("mha", capacity=8, max_header_bytes=64)
    raw, hl = body([("x", "FP32", x)], {"id": "a header longer than sixty-four bytes"})
    for _ in range(2):
        assert_same(plans.decode(raw, hl, CFG, LIMITS), today(raw, hl))
    assert len(plans) == 0
    plans = v2.HeaderPlans("mha", capacity=8)
    spec = {"name": "x", "datatype": "FP32", "shape": [1, 4, 8], "data": x.reshape(-1).tolist()}
    raw = orjson.dumps({"inputs": [spec]})  # JSON data: no Inference-Header-Content-Length
    for hl in (None, str(len(raw))):
        assert_same(plans.decode(raw, hl, CFG, LIMITS), today(raw, hl))
    assert len(plans) == 0
    lengths = {"name": "lengths", "datatype": "INT64", "shape": [1], "data": [3]}  # one JSON input of two
    header = orjson.dumps({"inputs": [{**spec, "data": None, "parameters": {"binary_data_size": 128}}, lengths]})
    header = header.replace(b'"data":null,', b"")
    raw = header + x.tobytes()
    for _ in range(2):
        got = plans.decode(raw, str(len(header)), CFG, LIMITS)
        assert_same(got, today(raw, str(len(header))))
        np.testing.assert_array_equal(got[1].lengths, [3])
    assert len(plans) == 0

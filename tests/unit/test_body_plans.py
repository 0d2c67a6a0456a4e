"""BodyPlans: repeated base64 /attend bodies skip the parse and the field checks, with the same answers
and the same errors as decode_attend, for every body."""

from __future__ import annotations

import base64
import itertools
import json

import numpy as np
import orjson
import pytest

from mha_core import MHAConfig
from service.errors import ServiceError
from service.frontend.decode import BodyPlans, Limits, decode_attend

CFG = MHAConfig(num_heads=4, emb_size=8, head_size=2, max_seq_len=6)
LIMITS = Limits(3, 400, 1000, 5000, dtype="float16", priority_levels=3)
RNG = np.random.default_rng(3)


def text(x: np.ndarray, dtype: str = "float32") -> str:
    return base64.b64encode(x.astype({"float32": "<f4", "float16": "<f2"}[dtype]).tobytes()).decode()


def body(x: np.ndarray, dtype: str = "float32", dumps=orjson.dumps, **fields) -> bytes:
    raw = dumps({"x": {"dtype": dtype, "shape": list(x.shape), "b64": text(x, dtype)}, **fields})
    return raw if isinstance(raw, bytes) else raw.encode()


def same(a, b) -> None:
    assert (a.encoding, a.dtype, a.timeout_s, a.priority) == (b.encoding, b.dtype, b.timeout_s, b.priority)
    ia, ib = a.input, b.input
    assert (ia.causal, ia.need_weights, ia.heads) == (ib.causal, ib.need_weights, ib.heads)
    for name in ("x", "lengths", "mask"):
        va, vb = getattr(ia, name), getattr(ib, name)
        assert (va is None) == (vb is None)
        if va is not None:
            assert va.dtype == vb.dtype and np.array_equal(va, vb)


def error(fn, *args) -> tuple[int, dict]:
    with pytest.raises(ServiceError) as e:
        fn(*args)
    return e.value.status, e.value.body()


FIELDS = [
    {},
    {"lengths": [3, 1], "causal": False, "return_weights": True, "heads": [2, 0], "timeout_ms": 20.0},
    {"attn_mask": (RNG.random((2, 4, 4)) > 0.3).tolist(), "response_encoding": "lists", "priority": 2},
    {"timeout_ms": 30, "priority": 0},  # an int timeout: through pydantic in full, remembered the same
]


@pytest.mark.parametrize("dumps", [orjson.dumps, json.dumps], ids=["compact", "spaced"])
@pytest.mark.parametrize("dtype", ["float32", "float16"])
@pytest.mark.parametrize("fields", FIELDS, ids=range(len(FIELDS)))
def test_repeated_bodies_decode_as_in_full(fields, dtype, dumps):
    plans = BodyPlans()
    decoded = []
    for i in range(4):
        x = RNG.standard_normal((2, 4, 8)).astype(np.float32)
        raw = body(x, dtype, dumps, **fields)
        dec = plans.decode(raw, CFG, LIMITS)
        same(dec, decode_attend(raw, CFG, LIMITS))
        assert len(plans) == (1 if i >= 1 else 0)  # remembered the second time
        decoded.append(dec)
    for a, b in itertools.pairwise(decoded):  # no array shared between requests
        for name in ("x", "lengths", "mask"):
            va, vb = getattr(a.input, name), getattr(b.input, name)
            assert va is None or not np.shares_memory(va, vb)


def planned(**fields) -> tuple[BodyPlans, np.ndarray]:
    plans = BodyPlans()
    x = RNG.standard_normal((2, 4, 8)).astype(np.float32)
    for _ in range(2):
        plans.decode(body(x, **fields), CFG, LIMITS)
    assert len(plans) == 1
    return plans, x


def test_bad_values_get_the_full_decodes_error():
    plans, x = planned(causal=True)
    raw = body(x, causal=True)
    good = text(x).encode()
    bad = [
        body(np.full((2, 4, 8), np.inf, np.float32), causal=True),  # not finite
        body(np.full((2, 4, 8), 1e5, np.float32), causal=True),  # beyond the float16 model's range
        raw.replace(good, good[:-8]),  # too short
        raw.replace(good, good[:-4] + b"!!!!"),  # not base64
        raw.replace(good, good[:-4] + b"\\u00"),  # a JSON escape: another string, or none
        raw.replace(good, good[:-1] + b"\\"),  # an escaped quote: another structure
        raw.replace(good, good[:-2] + b"\n="),  # a control character
        raw.replace(good, good[:-2] + b" ="),
    ]
    for b in bad:
        assert b != raw
        assert error(plans.decode, b, CFG, LIMITS) == error(decode_attend, b, CFG, LIMITS)
    same(plans.decode(raw, CFG, LIMITS), decode_attend(raw, CFG, LIMITS))  # the plan still serves


def test_an_escape_that_makes_a_valid_body_is_decoded_in_full():
    """A backslash in the changing part could close x's string early and open another: never planned."""
    plans, _ = planned(response_encoding="lists")
    x2 = np.ones((2, 4, 8), np.float32)
    raw = body(x2, response_encoding="lists")
    # the same bytes around a text that ends in an escaped quote, then valid JSON of another shape
    t = text(x2).encode()
    tricky = raw.replace(t, t + b'\\"')
    assert error(plans.decode, tricky, CFG, LIMITS) == error(decode_attend, tricky, CFG, LIMITS)


def test_bodies_not_planned():
    x = RNG.standard_normal((2, 4, 8)).astype(np.float32)
    mask = (RNG.random((4, 4)) > 0.3).astype(np.uint8)
    mask_b64 = {"dtype": "bool", "shape": [4, 4], "b64": base64.b64encode(mask.tobytes()).decode()}
    cases = [
        body(x, attn_mask=mask_b64),  # two base64 texts
        body(x).replace(b'"b64"', b'"b\\u0036\\u0034"').replace(b'"shape"', b'"sh\\u0061pe"'),  # escapes
        body(x, heads=[0], return_weights=True, lengths=[4, 4], priority=1, timeout_ms=5.0).replace(
            b"}", b"}" + b" " * 3000, 1
        ),  # too much around the text
        orjson.dumps({"attn_mask": mask_b64, "x": x.tolist()}),  # the base64 text is not x's
    ]
    for raw in cases:
        plans = BodyPlans()
        for _ in range(3):
            same(plans.decode(raw, CFG, LIMITS), decode_attend(raw, CFG, LIMITS))
        assert len(plans) == 0


def test_a_bad_body_is_never_remembered():
    plans = BodyPlans()
    raw = body(RNG.standard_normal((2, 4, 8)).astype(np.float32), heads=[9], return_weights=True)
    for _ in range(3):
        assert error(plans.decode, raw, CFG, LIMITS) == error(decode_attend, raw, CFG, LIMITS)
    assert len(plans) == 0


def test_plans_are_for_one_model_and_its_limits():
    plans, x = planned()
    other = Limits(3, 400, 1000, 5000, dtype="float32")
    raw = body(np.full((2, 4, 8), 1e5, np.float32))  # beyond float16 (the plan's limits), not float32
    same(plans.decode(raw, CFG, other), decode_attend(raw, CFG, other))
    assert error(plans.decode, raw, CFG, LIMITS) == error(decode_attend, raw, CFG, LIMITS)
    cfg = MHAConfig(num_heads=2, emb_size=8, head_size=4, max_seq_len=6)
    raw = body(x, return_weights=True, heads=[3])  # head 3 exists in CFG, not in cfg
    for _ in range(2):
        plans.decode(raw, CFG, LIMITS)
    assert error(plans.decode, raw, cfg, LIMITS) == error(decode_attend, raw, cfg, LIMITS)


def test_the_least_recently_used_plan_goes():
    plans = BodyPlans(capacity=2)
    x = RNG.standard_normal((2, 4, 8)).astype(np.float32)
    for t in (1.0, 2.0, 3.0):
        for _ in range(2):
            plans.decode(body(x, timeout_ms=t), CFG, LIMITS)
    assert len(plans) == 2
    assert BodyPlans(capacity=0)._split(body(x)) is None
    assert len(BodyPlans(capacity=0)) == 0


def test_a_planned_body_is_not_parsed(monkeypatch):
    from service.frontend import decode

    plans, _ = planned(lengths=[4, 2])

    def fail(*a, **k):
        raise AssertionError("decoded in full")

    monkeypatch.setattr(decode, "decode_attend", fail)
    monkeypatch.setattr(decode.orjson, "loads", fail)
    x = RNG.standard_normal((2, 4, 8)).astype(np.float32)
    dec = plans.decode(body(x, lengths=[4, 2]), CFG, LIMITS)
    assert np.array_equal(dec.input.x, x) and dec.input.lengths.tolist() == [4, 2]


def test_a_body_read_in_several_messages_is_planned_and_its_text_not_copied(monkeypatch):
    """read_limited returns a bytearray for a body that came in several messages (a tensor's worth of base64
    always does): it gets a plan as bytes do, and the plan decodes x's text where it lies in the body."""
    from service.frontend import codecs, decode

    plans = BodyPlans()
    for _ in range(2):
        x = RNG.standard_normal((2, 4, 8)).astype(np.float32)
        same(
            plans.decode(bytearray(body(x, lengths=[4, 2])), CFG, LIMITS),
            decode_attend(body(x, lengths=[4, 2]), CFG, LIMITS),
        )
    assert len(plans) == 1
    texts = []
    real = codecs._b64decode
    monkeypatch.setattr(codecs, "_b64decode", lambda text, *a: texts.append(text) or real(text, *a))
    monkeypatch.setattr(decode.orjson, "loads", lambda b: pytest.fail("decoded in full"))
    x = RNG.standard_normal((2, 4, 8)).astype(np.float32)
    raw = bytearray(body(x, lengths=[4, 2]))
    dec = plans.decode(raw, CFG, LIMITS)
    assert np.array_equal(dec.input.x, x) and dec.input.lengths.tolist() == [4, 2]
    (seen,) = texts
    assert isinstance(seen, memoryview) and seen.obj is raw  # a view into the body, no copy of its text
    assert bytes(seen) == text(x).encode()
    monkeypatch.undo()
    for bad in (b"!", b"="):  # a bad text is still decoded in full, for its message
        wrong = bytearray(body(x, lengths=[4, 2]).replace(text(x)[:4].encode(), bad * 4, 1))
        assert error(plans.decode, wrong, CFG, LIMITS) == error(decode_attend, bytes(wrong), CFG, LIMITS)


def test_a_body_that_cannot_have_a_plan_is_not_looked_at_again(monkeypatch):
    from service.frontend import decode

    plans = BodyPlans()
    mask_b64 = {"dtype": "bool", "shape": [4, 4], "b64": base64.b64encode(np.ones(16, np.uint8).tobytes()).decode()}
    raw = orjson.dumps({"attn_mask": mask_b64, "x": RNG.standard_normal((2, 4, 8)).tolist()})  # its text: the mask's
    loads = []
    real = decode.orjson.loads
    monkeypatch.setattr(decode.orjson, "loads", lambda b: loads.append(1) or real(b))
    for _ in range(6):
        same(plans.decode(raw, CFG, LIMITS), decode_attend(raw, CFG, LIMITS))
    assert len(plans) == 0 and len(plans._never) == 1
    assert len(loads) == 6 * 2 + 1  # each decode in full (twice a turn here), and one look for a plan

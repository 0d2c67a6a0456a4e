"""service.messages: requests and outcomes cross the process boundary as a header, one frame for the small
arrays, and a zero-copy frame for each large one."""

from __future__ import annotations

import subprocess
import sys

import numpy as np

from service import messages
from service.messages import (
    AttendInput,
    AttendOutput,
    Outcome,
    decode,
    decode_outcomes,
    decode_requests,
    encode_outcomes,
    encode_requests,
)
from service.settings import default_workers


def _split(frames):
    return decode(frames[0]), [memoryview(f) for f in frames[1:]]


def test_requests_round_trip_several_per_message_without_pickling():
    rng = np.random.default_rng(0)
    a = AttendInput(rng.standard_normal((2, 5, 8)).astype(np.float32), lengths=np.array([5, 3]))
    b = AttendInput(
        rng.standard_normal((1, 4, 8)).astype(np.float16),
        mask=np.tril(np.ones((4, 4), bool)),
        causal=False,
        need_weights=True,
        heads=(0, 2),
        fault="raise",
    )
    big = AttendInput(rng.standard_normal((1, 128, 512)).astype(np.float32))  # 256 KiB: a frame of its own
    frames = encode_requests([(7, a, 123.5, "rid-a", 0), (8, b, 124.0, None, 2), (9, big, 125.0, "rid-c", 0)])
    assert len(frames) == 1 + 1 + 1  # header, the small arrays packed in one frame, the large one
    assert len(frames[1]) == 320 + 16 + 64 + 16  # a.x, a.lengths, b.x (float16), b.mask: each at a 16-byte offset
    assert frames[2] is big.x  # the array itself (no copy) goes to the connection
    header, bufs = _split(frames)
    (ia, ra, da, qa, pa), (ib, rb, db, qb, pb), (ic, rc, *_) = decode_requests(header, bufs)
    assert (ia, da, qa, pa, ib, db, qb, pb, ic) == (7, 123.5, "rid-a", 0, 8, 124.0, None, 2, 9)
    np.testing.assert_array_equal(rc.x, big.x)
    np.testing.assert_array_equal(ra.x, a.x)
    np.testing.assert_array_equal(ra.lengths, [5, 3])
    assert ra.mask is None and ra.key == a.key
    assert rb.x.dtype == np.float16 and rb.mask.dtype == bool
    np.testing.assert_array_equal(rb.mask, b.mask)
    assert (rb.causal, rb.need_weights, rb.heads, rb.fault) == (False, True, (0, 2), "raise")


def test_outcomes_round_trip_results_and_typed_errors():
    out = AttendOutput(np.arange(24, dtype=np.float32).reshape(1, 3, 8), np.ones((1, 2, 3, 3), np.float32))
    frames = encode_outcomes(
        [
            Outcome(1, out, queue_s=0.01, compute_s=0.02, batch_requests=3, batch_sequences=4),
            Outcome(2, error="overloaded", message="queue is full", retry_after_s=2.0),
            Outcome(3, AttendOutput(out.output, None)),
        ]
    )
    assert len(frames) == 2  # the header, and every array in one frame
    header, bufs = _split(frames)
    one, two, three = decode_outcomes(header, bufs)
    np.testing.assert_array_equal(one.output.output, out.output)
    np.testing.assert_array_equal(one.output.weights, out.weights)
    assert (one.queue_s, one.compute_s, one.batch_requests, one.batch_sequences) == (0.01, 0.02, 3, 4)
    assert (two.error, two.message, two.retry_after_s, two.output) == ("overloaded", "queue is full", 2.0, None)
    assert three.output.weights is None and three.error is None


def test_packed_arrays_keep_their_values_dtypes_and_alignment():
    arrays = [
        np.arange(5, dtype=np.float32).reshape(1, 5),  # 20 bytes: the next one starts at 32
        np.zeros((0, 3), np.float32),
        np.array([3, 1, 2], np.int64),
        np.array([[True, False, True]]),
        np.arange(7, dtype=np.float16),
        np.ones((1, 128, 128), np.float32),  # 64 KiB: PACK_BELOW, a frame of its own
    ]
    pack = messages._Packer()
    metas = [pack.add(a) for a in arrays]
    frames = pack.frames()
    assert [[m.frame, m.offset] for m in metas] == [[0, 0], [0, 32], [0, 32], [0, 64], [0, 80], [1, 0]]
    for a, meta in zip(arrays, metas, strict=True):
        b = messages._array([bytes(frames[0]), frames[1]], meta)
        assert b.dtype == a.dtype and b.shape == a.shape and b.flags.c_contiguous
        assert not b.flags.owndata  # a view of its frame, not a copy
        np.testing.assert_array_equal(b, a)


def test_default_workers_rule():
    assert default_workers("cpu", cores=2) == 1
    assert default_workers("cpu", cores=32) == 1
    assert default_workers("cuda", cores=2) == 1
    assert default_workers("cuda:0", cores=16) == 8
    assert default_workers("cuda", cores=6) == 5


def test_the_front_end_modules_import_no_torch():
    """Every module of service/frontend/, the shared top level and the engine's client side, loaded together."""
    code = (
        "import sys, importlib, pkgutil, service.frontend as f; "
        "[importlib.import_module(m.name) for m in pkgutil.walk_packages(f.__path__, 'service.frontend.')]; "
        "import service.app, service.cli, service.messages, service.logs, service.metrics, service.tracing, "
        "service.errors, service.engine.client, service.engine.supervise; "
        "from service.settings import Settings; Settings(); "
        "assert 'torch' not in sys.modules, 'torch imported'"
    )
    subprocess.run([sys.executable, "-c", code], check=True)


def test_a_non_contiguous_array_crosses_as_its_values():
    """A view (an output cut to its own T, a transposed input) is packed as a contiguous copy of its values."""
    base = np.arange(2 * 6 * 4, dtype=np.float32).reshape(2, 6, 4)
    views = [base[:, :3], base.transpose(0, 2, 1), base[::2]]
    frames = encode_outcomes([Outcome(i, AttendOutput(v, None)) for i, v in enumerate(views)])
    header, bufs = _split(frames)
    for o, v in zip(decode_outcomes(header, bufs), views, strict=True):
        assert o.output.output.shape == v.shape
        np.testing.assert_array_equal(o.output.output, v)


def test_every_message_kind_is_one_typed_struct_decoded_by_the_one_decoder():
    """Declared once (service.messages), msgpack in array form: each kind comes back as its own Struct, and a header
    that is not one of them is refused by the decoder, naming what is wrong (read_waiting logs it and reads on)."""
    import msgspec
    import pytest

    from service.messages import Cancel, Heartbeat, Hello, Info, Ping, decode, encode

    sent = [
        Cancel([1, 2]),
        Ping(),
        Heartbeat(True, (3, 96)),
        Hello(1234),
        Info(False, (0, 0), {"num_heads": 2}, {"dtype": "float32"}),
    ]
    for msg in sent:
        (frame,) = encode(msg)
        assert decode(frame) == msg and type(decode(frame)) is type(msg)
    assert encode(Ping()) == [msgspec.msgpack.encode(["ping", []])]  # the tag first, fields by position: no key strings
    with pytest.raises(msgspec.ValidationError, match=r"Expected `array`, got `str` - at `\$\[1\]`"):
        decode(msgspec.msgpack.encode(["cancel", "not a list"]))
    with pytest.raises(msgspec.ValidationError):
        decode(msgspec.msgpack.encode(["nosuch"]))


def _frame_bytes(frames) -> int:
    """What crosses the socket for a message: its header and every array frame."""
    return sum(memoryview(f).nbytes for f in frames)


def test_a_half_request_and_its_answer_cross_at_half_the_bytes_of_float32():
    """[1, 128, 512] x and its answer: float16 and bfloat16 (its uint16 bits) move half of float32's bytes, and the
    dtype tags cross with them, so the model process views bfloat16 bits as torch.bfloat16, never as integers."""
    import torch

    x32 = np.random.default_rng().standard_normal((1, 128, 512)).astype(np.float32)
    wires = {
        "float32": x32,
        "float16": x32.astype(np.float16),
        "bfloat16": torch.from_numpy(x32).to(torch.bfloat16).view(torch.uint16).numpy(),
    }
    sent, answered = {}, {}
    for dtype, x in wires.items():
        frames = encode_requests([(7, AttendInput(x, wire_dtype=dtype, out_dtype=dtype), 1e9, "r", 0)])
        sent[dtype] = _frame_bytes(frames)
        msg, bufs = _split(frames)
        ((rid, got, *_),) = decode_requests(msg, bufs)
        assert (rid, got.wire_dtype, got.out_dtype) == (7, dtype, dtype)
        assert got.x.dtype == x.dtype
        np.testing.assert_array_equal(got.x, x)
        out = x[::-1].copy()  # an answer of the same dtype and shape
        frames = encode_outcomes([Outcome(7, AttendOutput(out, None), 0.1, 0.2, 1, 1)])
        answered[dtype] = _frame_bytes(frames)
        ((o,),) = [decode_outcomes(*_split(frames))]
        assert o.output.output.dtype == out.dtype
        np.testing.assert_array_equal(o.output.output, out)
    tensor = x32.nbytes
    print(f"bytes crossing [1,128,512]: request {sent}, answer {answered}")
    for dtype in ("float16", "bfloat16"):
        # half the tensor's bytes; the header differs only by its dtype names' lengths
        assert abs((sent[dtype] - tensor // 2) - (sent["float32"] - tensor)) <= 4
        assert abs((answered[dtype] - tensor // 2) - (answered["float32"] - tensor)) <= 4
        assert sent[dtype] < 0.51 * sent["float32"] and answered[dtype] < 0.51 * answered["float32"]
    bits = decode_requests(
        *_split(encode_requests([(1, AttendInput(wires["bfloat16"], wire_dtype="bfloat16"), 1e9, None, 0)]))
    )
    as_bf16 = torch.from_numpy(bits[0][1].x.copy()).view(torch.bfloat16)  # what the runner does on arrival
    np.testing.assert_array_equal(as_bf16.float().numpy(), torch.from_numpy(x32).to(torch.bfloat16).float().numpy())


def test_largest_bits_equals_the_largest_magnitude_of_the_values_whatever_the_sizes_before_it():
    """The masked bits go to a buffer the thread reuses: a shorter array after a longer one, a non-contiguous
    one and NaN/Inf of either sign still give the largest magnitude's bits, computed here from the values."""
    rng = np.random.default_rng(11)

    def naive(bits: np.ndarray, dtype: str) -> int:  # from the values: the largest |value|, as its bits
        if dtype == "float16":
            values = bits.view(np.float16).astype(np.float32)
        else:
            values = (bits.astype(np.uint32) << 16).view(np.float32)
        a = np.abs(values.reshape(-1))
        top = np.isnan(a) if np.isnan(a).any() else a == a.max()  # NaN lies above Inf: the largest NaN pattern
        return int((bits.reshape(-1)[top] & 0x7FFF).max())

    for dtype, inf in (("float16", 0x7C00), ("bfloat16", 0x7F80)):
        for n in (70_000, 5, 1_000, 65_536):
            x = rng.standard_normal(n).astype(np.float32) * 100
            if dtype == "float16":
                bits = x.astype(np.float16).view(np.uint16)
            else:
                bits = (x.view(np.uint32) >> 16).astype(np.uint16)
            assert messages.largest_bits(bits) == naive(bits, dtype)
            neg_inf = bits.copy()
            neg_inf[n // 2] = inf | 0x8000
            assert messages.largest_bits(neg_inf) == inf and not messages.finite_as(neg_inf, dtype)
            nan = bits.copy()
            nan[-1] = inf | 0x8001
            assert messages.largest_bits(nan) == inf | 1
        strided = bits.reshape(-1)[::3].reshape(1, -1)  # not contiguous
        assert messages.largest_bits(strided) == naive(np.ascontiguousarray(strided), dtype)
        assert messages.finite_as(strided, dtype)
    assert messages.largest_bits(np.zeros(0, np.uint16)) == 0

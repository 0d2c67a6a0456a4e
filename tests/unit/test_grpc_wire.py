"""gRPC messages -> the protocol's request (service/frontend/grpc_wire.py), and the status table."""

from __future__ import annotations

import grpc
import numpy as np
import pytest

from mha_core import MHAConfig
from service.errors import ERROR_STATUS, ServiceError
from service.frontend import grpc_wire
from service.frontend.decode import Limits
from service.frontend.grpc_server import GRPC_STATUS
from service.frontend.grpc_wire import decode_infer, encode_infer
from service.frontend.triton_proto import grpc_service_pb2 as pb

CFG = MHAConfig(4, 32, 8, 64)
LIMITS = Limits(8, 1 << 20, 30000, 60000)


def _req(x: np.ndarray, datatype: str = "FP32", raw: bool = True) -> pb.ModelInferRequest:
    req = pb.ModelInferRequest(model_name="mha")
    t = req.inputs.add(name="x", datatype=datatype, shape=list(x.shape))
    if raw:
        req.raw_input_contents.append(x.tobytes())
    else:
        t.contents.fp32_contents.extend(x.reshape(-1).tolist())
    return req


def _error(req: pb.ModelInferRequest, deadline_ms: float | None = None) -> str:
    with pytest.raises(ServiceError) as e:
        decode_infer(req, deadline_ms).check(config=CFG, limits=LIMITS)
    return e.value.message


def test_every_error_type_has_a_grpc_status():
    assert set(GRPC_STATUS) == set(ERROR_STATUS)
    assert GRPC_STATUS["validation_error"] == grpc.StatusCode.INVALID_ARGUMENT
    assert GRPC_STATUS["overloaded"] == grpc.StatusCode.RESOURCE_EXHAUSTED
    assert GRPC_STATUS["unauthorized"] == grpc.StatusCode.UNAUTHENTICATED


def test_raw_and_typed_contents_give_the_same_input_and_the_deadline_caps_the_timeout():
    x = np.random.default_rng(1).standard_normal((2, 3, 32)).astype(np.float32)
    raw, _ = decode_infer(_req(x), None).check(config=CFG, limits=LIMITS)
    typed, timeout_s = decode_infer(_req(x, raw=False), 250.0).check(config=CFG, limits=LIMITS)
    np.testing.assert_array_equal(raw.x, typed.x)
    np.testing.assert_array_equal(raw.x, x)
    assert timeout_s == pytest.approx(0.25)
    req = _req(x)
    req.parameters["timeout_ms"].double_param = 100.0
    assert decode_infer(req, 5000.0).check(config=CFG, limits=LIMITS)[1] == pytest.approx(0.1)


def test_malformed_messages_are_named():
    x = np.ones((1, 2, 32), np.float32)
    req = _req(x)
    req.inputs.add(name="lengths", datatype="INT32", shape=[1])
    assert "raw_input_contents has 1 entries, but the request has 2 inputs" in _error(req)
    assert _error(pb.ModelInferRequest(model_name="mha")) == "inputs must be a non-empty list of tensors"
    req = pb.ModelInferRequest(model_name="mha")
    req.inputs.add(name="x", datatype="FP16", shape=[1, 2, 32])
    assert "no typed contents in the protocol: send it in raw_input_contents" in _error(req)
    req = _req(x)
    req.raw_input_contents[0] = x.tobytes()[:-4]
    assert (
        _error(req)
        == "input 'x' has 252 bytes in raw_input_contents, but shape [1, 2, 32] of FP32 needs 64 x 4 = 256 bytes"
    )
    req = pb.ModelInferRequest(model_name="mha")
    req.inputs.add(name="x", datatype="FP32", shape=[1, 2, 32]).contents.int_contents.extend([1] * 64)
    assert _error(req) == "input 'x' is FP32: its data goes in contents.fp32_contents, not int_contents"
    req = _req(x)
    req.outputs.add(name="logits")
    assert _error(req) == "unknown output 'logits'; the model's outputs are output, weights"
    req = _req(x)
    req.parameters["causal"].string_param = "yes"
    assert _error(req) == "parameters.causal must be a boolean, got 'yes'"
    assert _error(_req(x), deadline_ms=0.0) == "the request's deadline passed before it was queued"


def test_outputs_are_raw_in_the_datatype_of_x():
    x = np.ones((1, 2, 32), np.float16)
    req = _req(x, "FP16")
    req.outputs.add(name="weights")
    req.outputs.add(name="output")
    plan = decode_infer(req, None)
    out = np.full((1, 2, 32), 0.5, np.float32)
    w = np.full((1, 4, 2, 2), 0.25, np.float32)
    resp = encode_infer(plan, "mha", {"output": out, "weights": w})
    assert [(o.name, o.datatype, list(o.shape)) for o in resp.outputs] == [
        ("weights", "FP16", [1, 4, 2, 2]),
        ("output", "FP16", [1, 2, 32]),
    ]
    np.testing.assert_array_equal(np.frombuffer(resp.raw_output_contents[0], "<f2"), np.full(16, 0.25, np.float16))


def test_typed_contents_read_from_the_wire_equal_numpys_conversion(rng_seed):
    """Every datatype with typed contents, with the extremes of each (negatives: ten-byte varints)."""
    rng = np.random.default_rng(rng_seed)
    i32 = np.iinfo(np.int32)
    i64 = np.iinfo(np.int64)
    values = [
        ("FP32", np.concatenate([rng.standard_normal(300), [0.0, -0.0, 3.4e38, -1e-45, np.inf]]).astype(np.float32)),
        ("INT32", np.concatenate([rng.integers(i32.min, i32.max, 300), [0, 1, -1, 127, 128, i32.min, i32.max]])),
        ("INT64", np.concatenate([rng.integers(i64.min, i64.max, 300), [0, -1, 2**35, i64.min, i64.max]])),
        ("INT64", rng.integers(0, 128, 300)),  # one byte each: read from the wire
        ("INT32", rng.integers(0, 128, 300)),
        ("BOOL", rng.random(307) < 0.5),
    ]
    for datatype, want in values:
        field, dtype = grpc_wire._TYPED[datatype]
        t = pb.ModelInferRequest.InferInputTensor(name="v", datatype=datatype, shape=[want.size])
        getattr(t.contents, field).extend(want.tolist())
        got = grpc_wire._typed(t, [want.size])
        assert got.dtype == dtype and got.flags.writeable
        np.testing.assert_array_equal(got, np.array(getattr(t.contents, field), dtype=dtype))
        np.testing.assert_array_equal(got, want.astype(dtype))
    empty = pb.ModelInferRequest.InferInputTensor(name="v", datatype="INT64", shape=[0])
    assert grpc_wire._typed(empty, [0]).shape == (0,)


@pytest.mark.parametrize(
    ("datatype", "field", "values"),
    [
        ("FP32", "fp32_contents", np.arange(1_000_000, dtype=np.float32) - 5e5),
        ("BOOL", "bool_contents", np.arange(1_000_000) % 3 == 0),
        ("INT32", "int_contents", np.arange(1_000_000) % 128),  # one byte each on the wire
    ],
)
def test_large_typed_contents_are_read_from_the_wire_not_value_by_value(monkeypatch, datatype, field, values):
    """np.array over the repeated field makes a Python object of each value, on the event loop (as slow as parsing
    JSON lists); the wire read takes the packed bytes at once. Checked by what is called, not by a timing: no
    np.array over the field, and the values equal."""
    n = len(values)
    t = pb.ModelInferRequest.InferInputTensor(name="x", datatype=datatype, shape=[n])
    getattr(t.contents, field).extend(values.tolist())
    real, converted = np.array, []

    def spy(obj, *args, **kwargs):
        if not isinstance(obj, np.ndarray | list | tuple | int | float) and len(obj) == n:  # the repeated field
            converted.append(type(obj).__name__)
        return real(obj, *args, **kwargs)

    monkeypatch.setattr(grpc_wire.np, "array", spy)
    got = grpc_wire._typed(t, [n])
    monkeypatch.undo()
    assert converted == []
    assert got.shape == (n,) and np.array_equal(got, values)


def test_ints_of_several_bytes_are_converted_by_numpy_with_the_same_values():
    """Varints over 127 (and negatives) are not read from the wire: numpy converts them, and the values are the
    same."""
    values = [0, 127, 128, -1, 2**31 - 1, -(2**31)]
    t = pb.ModelInferRequest.InferInputTensor(name="x", datatype="INT32", shape=[len(values)])
    t.contents.int_contents.extend(values)
    assert grpc_wire._from_wire(t.contents, "int_contents", np.int32) is None
    assert grpc_wire._typed(t, [len(values)]).tolist() == values

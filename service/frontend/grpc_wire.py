"""Triton's gRPC messages <-> the protocol's tensors and parameters (service/frontend/oip.py). Pure functions.

The checks and messages of a request are oip's (and so /v2 HTTP's): this module only reads the
tensors out of ``raw_input_contents`` or the typed ``contents``, and writes the outputs into
``raw_output_contents``, as Triton does.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np
from google.protobuf import json_format

from service.errors import validation
from service.frontend import oip
from service.frontend.triton_proto import grpc_service_pb2 as pb
from service.frontend.triton_proto import model_config_pb2 as mc

# datatype -> (typed contents field, numpy dtype); FP16 and BF16 have none: raw bytes only.
_TYPED = {
    "FP32": ("fp32_contents", np.float32),
    "INT32": ("int_contents", np.int32),
    "INT64": ("int64_contents", np.int64),
    "BOOL": ("bool_contents", np.bool_),
}


def param_value(p: pb.InferParameter) -> Any:
    which = p.WhichOneof("parameter_choice")
    return None if which is None else getattr(p, which)


def decode_infer(
    req: pb.ModelInferRequest, deadline_ms: float | None, *, sequence_model: bool = False
) -> oip.InferPlan:
    """ModelInferRequest -> an InferPlan; ``deadline_ms`` is what is left of the RPC's deadline; ``sequence_model``:
    the request is to the sequence model (its sequence_id is a uint64_param, int64_param or string_param)."""
    params = {k: param_value(v) for k, v in req.parameters.items()}
    raw = req.raw_input_contents
    if raw and len(raw) != len(req.inputs):
        raise validation(
            f"raw_input_contents has {len(raw)} entries, but the request has {len(req.inputs)} inputs: "
            "give raw contents for every input, in input order, or for none"
        )
    if not req.inputs:
        raise validation("inputs must be a non-empty list of tensors")
    tensors: dict[str, np.ndarray] = {}
    seen: set[str] = set()
    x_type = "FP32"
    for i, t in enumerate(req.inputs):
        shape = list(t.shape)
        oip.check_tensor_spec(i, t.name, t.datatype, shape, seen)
        if "shared_memory_region" in t.parameters:
            raise validation(f"input {t.name!r}: shared memory is not supported by this server")
        if raw:
            if t.HasField("contents"):
                raise validation(f"input {t.name!r} has typed contents and raw_input_contents; give one")
            blob = raw[i]
            arr = oip.from_bytes(
                t.name, t.datatype, shape, blob, 0, len(blob), f"{len(blob)} bytes in raw_input_contents"
            )
        else:
            arr = _typed(t, shape)
        if t.name == "x":
            x_type = t.datatype
        tensors[t.name] = arr
    outputs = oip.parse_outputs(
        [{"name": o.name, "parameters": {k: param_value(v) for k, v in o.parameters.items()}} for o in req.outputs],
        True,
    )
    return oip.plan_request(
        tensors, x_type, params, outputs, req.id or None, deadline_ms=deadline_ms, sequence_model=sequence_model
    )


def _typed(t: pb.ModelInferRequest.InferInputTensor, shape: list[int]) -> np.ndarray:
    if t.datatype not in _TYPED:
        raise validation(
            f"input {t.name!r} is {t.datatype}, which has no typed contents in the protocol: send it in "
            "raw_input_contents"
        )
    field, dtype = _TYPED[t.datatype]
    values = getattr(t.contents, field)
    others = [f.name for f, v in t.contents.ListFields() if f.name != field and len(v)]
    if others:
        raise validation(f"input {t.name!r} is {t.datatype}: its data goes in contents.{field}, not {others[0]}")
    count = math.prod(shape)
    if len(values) != count:
        raise validation(
            f"input {t.name!r} has {len(values)} elements in contents.{field}, but shape {shape} needs {count}"
        )
    arr = _from_wire(t.contents, field, dtype)
    return (np.array(values, dtype=dtype) if arr is None else arr).reshape(shape)


def _from_wire(contents: pb.InferTensorContents, field: str, dtype: type) -> np.ndarray | None:
    """The one set field of ``contents`` as an array, read from its wire bytes; None for ints of several bytes
    (negative or over 127), which numpy converts value by value: fast enough for lengths' B values, and
    faster than decoding varints with numpy.

    ``np.array`` over a repeated field makes a Python object of every value, on the event loop: as
    slow as parsing JSON lists, and for as long. proto3 packs repeated numbers: the field's
    serialization is its tag, its length and then the values, little-endian (fp32) or as varints
    (bool: one byte 0 or 1; ints 0..127: one byte), so numpy reads them at once. The serialization
    is upb's, canonical, whatever bytes the client sent.
    """
    raw = contents.SerializeToString()
    if not raw:
        return np.zeros(0, dtype)
    length, shift, at = 0, 0, 1  # after the tag: one byte, as every field number of InferTensorContents is < 16
    while True:
        byte = raw[at]
        at += 1
        length |= (byte & 0x7F) << shift
        shift += 7
        if byte < 0x80:
            break
    payload = np.frombuffer(raw, np.uint8, length, at)
    if dtype is np.float32:
        return payload.view("<f4").astype(np.float32)  # a copy: aligned, writable, native
    if dtype is np.bool_:
        return payload.astype(np.bool_)
    if payload.size and payload.max() >= 0x80:  # a value of several bytes
        return None
    return payload.astype(dtype)


def encode_infer(plan: oip.InferPlan, model_name: str, tensors: dict[str, np.ndarray | None]) -> pb.ModelInferResponse:
    resp = pb.ModelInferResponse(model_name=model_name, model_version=oip.VERSION, id=plan.id or "")
    if plan.sequence is not None:  # a step's answer names its sequence, as Triton's do
        sid = plan.sequence.id
        if isinstance(sid, str):
            resp.parameters["sequence_id"].string_param = sid
        else:
            resp.parameters["sequence_id"].uint64_param = sid
    for name, _binary in plan.outputs:
        arr = tensors[name]
        resp.outputs.add(name=name, datatype=plan.datatype, shape=list(arr.shape))
        resp.raw_output_contents.append(oip.to_wire(arr, plan.datatype, name).tobytes())
    return resp


def model_metadata(meta: dict[str, Any]) -> pb.ModelMetadataResponse:
    """The HTTP metadata (oip.model_metadata) as the message; its extra keys (parameters, optional) drop out."""
    return json_format.ParseDict(meta, pb.ModelMetadataResponse(), ignore_unknown_fields=True)


def model_config(config: dict[str, Any]) -> pb.ModelConfigResponse:
    return pb.ModelConfigResponse(config=json_format.ParseDict(config, mc.ModelConfig()))


def model_statistics(stats: dict[str, Any]) -> pb.ModelStatisticsResponse:
    return json_format.ParseDict({"model_stats": [stats]}, pb.ModelStatisticsResponse())

"""The Open Inference Protocol (KServe v2 / Triton), apart from its transports.

HTTP (service/frontend/v2.py) and gRPC (service/frontend/grpc_server.py) decode their own wire formats into numpy
tensors and plain parameter values, and both build the request here, so that the checks and the
messages are the same on both: ``plan_request`` checks names, datatypes and shapes and hands the
arrays to ``service.frontend.decode.check_input``, the check every route shares. The model's metadata,
its configuration (Triton's model_config.proto, in JSON form) and the server metadata are built
here too, once, and each transport writes them in its own encoding.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Callable
from typing import Any

import numpy as np

from service import __version__
from service.engine_api import UINT64_MAX, SequenceFlags
from service.errors import ServiceError, validation
from service.frontend import codecs
from service.frontend.decode import check_input, sequence_id

VERSION = "1"
# binary_tensor_data: HTTP's raw tensors; model_configuration, statistics: the config and stats routes
# (what perf_analyzer reads); parameters: request and response parameters; sequence, sequence(string_id):
# Triton's sequence extension, with uint64 and string ids.
EXTENSIONS = [
    "binary_tensor_data",
    "model_configuration",
    "statistics",
    "parameters",
    "sequence",
    "sequence(string_id)",
]
# The sequence model's name is the model's with this suffix: the same module, checkpoint and batcher, with a
# config of ``sequence_batching``. In model_config.proto ``dynamic_batching`` and ``sequence_batching`` are one
# oneof, and perf_analyzer sends sequence flags on every request to (only) a model whose config has the latter.
SEQUENCE_SUFFIX = "-seq"

# wire datatype -> little-endian numpy dtype of its bytes (BF16: the upper half of a float32)
FLOAT = {"FP32": np.dtype("<f4"), "FP16": np.dtype("<f2"), "BF16": np.dtype("<u2")}
WIRE = {"FP32": "float32", "FP16": "float16", "BF16": "bfloat16"}  # the names codecs uses
INT = {"INT32": np.dtype("<i4"), "INT64": np.dtype("<i8")}
BOOL = {"BOOL": np.dtype("u1")}
INPUTS: dict[str, dict[str, np.dtype]] = {"x": FLOAT, "lengths": INT, "attn_mask": BOOL}
OUTPUTS = ("output", "weights")
REQUEST_PARAMETERS = [
    "causal",
    "heads",
    "timeout_ms",
    "timeout",
    "priority",
    "binary_data_output",
    "sequence_id",
    "sequence_start",
    "sequence_end",
]


def sequence_model(model_name: str) -> str:
    return model_name + SEQUENCE_SUFFIX


def check_model(name: str, version: str | None, model_name: str) -> bool:
    """Whether ``name`` is the sequence model (``model_name`` + SEQUENCE_SUFFIX); 404 for another model or
    version ("" or None is the latest, as in Triton)."""
    seq = sequence_model(model_name)
    if name != model_name and name != seq:
        raise ServiceError("not_found", f"unknown model {name!r}; this server serves {model_name!r} and {seq!r}")
    if version not in (None, "", VERSION):
        raise ServiceError("not_found", f"model {name!r} has no version {version!r}; versions: [{VERSION!r}]")
    return name == seq


def parse_sequence(params: dict, required: bool = False) -> SequenceFlags | None:
    """Triton's sequence parameters -> the step's flags; None for a request that is no step. ``required``: the
    sequence model's requests, each a step (Triton's words for one without an id)."""
    sid = params.get("sequence_id")
    start = parse_bool(params.get("sequence_start"), "sequence_start", False)
    end = parse_bool(params.get("sequence_end"), "sequence_end", False)
    if sid is None:
        if required:
            raise validation(
                "a request to a sequence model must specify a non-zero or non-empty parameters.sequence_id "
                f"(an unsigned 64-bit integer 1..{UINT64_MAX} or a string)"
            )
        if start or end:
            raise validation("parameters.sequence_start and parameters.sequence_end need parameters.sequence_id")
        return None
    return SequenceFlags(sequence_id(sid, "parameters.sequence_id"), start, end)


def server_metadata() -> dict[str, Any]:
    return {"name": "mha-serve", "version": __version__, "extensions": EXTENSIONS}


def model_metadata(name: str, cfg: Any) -> dict[str, Any]:
    E = cfg.emb_size
    return {
        "name": name,
        "versions": [VERSION],
        "platform": "pytorch",
        "inputs": [
            {"name": "x", "datatype": "FP32", "shape": [-1, -1, E], "parameters": {"datatypes": list(FLOAT)}},
            {
                "name": "lengths",
                "datatype": "INT64",
                "shape": [-1, 1],
                "optional": True,
                "parameters": {"datatypes": list(INT), "shapes": "[B] or [B, 1]"},
            },
            {
                "name": "attn_mask",
                "datatype": "BOOL",
                "shape": [-1, -1, -1],
                "optional": True,
                "parameters": {"shapes": "[T, T] or [B, T, T]; true = may attend"},
            },
        ],
        "outputs": [
            {"name": "output", "datatype": "FP32", "shape": [-1, -1, E], "parameters": {"datatype": "that of x"}},
            {
                "name": "weights",
                "datatype": "FP32",
                "shape": [-1, -1, -1, -1],
                "parameters": {"datatype": "that of x", "computed": "only when requested by name"},
            },
        ],
        "parameters": {
            "num_heads": cfg.num_heads,
            "emb_size": E,
            "head_size": cfg.head_size,
            "max_seq_len": cfg.max_seq_len,
            "causal": cfg.causal,
            "request_parameters": REQUEST_PARAMETERS,
        },
    }


def model_config(name: str, cfg: Any, settings: Any, device: str, *, sequence: bool = False) -> dict[str, Any]:
    """Triton's ModelConfig (model_config.proto) in the JSON form Triton's tools read.

    The first dimension of every tensor is the batch, so, as Triton states such a model,
    ``max_batch_size`` is the most sequences one request may carry and ``dims`` leave the batch
    out: x [T, E], attn_mask [T, T] (the per-sequence form; the shared [T, T] form is accepted
    too), output [T, E], weights [H', T, T]. lengths, one integer per sequence, is stated as
    Triton states a per-sequence scalar, ``dims: [1]`` with ``reshape: {shape: []}``: clients
    send [B, 1] (the server also takes [B]). perf_analyzer needs that: it refuses an input whose
    dims are empty. So perf_analyzer sends x [b, T, E], lengths [b, 1], attn_mask [b, T, T].
    """
    E = cfg.emb_size

    def tensor(tname: str, data_type: str, dims: list[int], **extra: Any) -> dict[str, Any]:
        return {"name": tname, "data_type": data_type, "dims": dims, **extra}

    batching = {
        "max_queue_delay_microseconds": int(settings.max_wait_ms * 1000),
        "default_queue_policy": {
            "timeout_action": "REJECT",
            "default_timeout_microseconds": int(settings.default_timeout_ms * 1000),
            "allow_timeout_override": True,
            "max_queue_size": settings.max_queue_requests,
        },
    }

    return {
        "name": name,
        "platform": "pytorch",
        "backend": "mha-serve",
        "version_policy": {"latest": {"num_versions": 1}},
        "max_batch_size": settings.max_request_batch,
        "input": [
            tensor("x", "TYPE_FP32", [-1, E], format="FORMAT_NONE"),
            tensor("lengths", "TYPE_INT64", [1], reshape={"shape": []}, optional=True),
            tensor("attn_mask", "TYPE_BOOL", [-1, -1], optional=True),
        ],
        "output": [tensor("output", "TYPE_FP32", [-1, E]), tensor("weights", "TYPE_FP32", [-1, -1, -1])],
        **({"sequence_batching": _sequence_batching(settings)} if sequence else {"dynamic_batching": batching}),
        "instance_group": [{"name": name, "kind": "KIND_GPU" if device.startswith("cuda") else "KIND_CPU", "count": 1}],
        "parameters": {
            k: {"string_value": str(v)}
            for k, v in {
                "num_heads": cfg.num_heads,
                "emb_size": E,
                "head_size": cfg.head_size,
                "max_seq_len": cfg.max_seq_len,
                "causal": cfg.causal,
                "max_batch_sequences": settings.max_batch_size,
                "max_weights_elements": settings.max_weights_elements,
                "datatypes": "x: FP32|FP16|BF16 (outputs follow x); lengths: INT32|INT64",
            }.items()
        },
    }


def _sequence_batching(settings: Any) -> dict[str, Any]:
    return {
        "max_sequence_idle_microseconds": int(settings.sequence_idle_s * 1_000_000),
        "oldest": {
            "max_candidate_sequences": settings.max_batch_size,
            "max_queue_delay_microseconds": int(settings.max_wait_ms * 1000),
        },
    }


def repository_index(name: str, ready: bool) -> list[dict[str, str]]:
    state = "READY" if ready else "UNAVAILABLE"
    return [{"name": n, "version": VERSION, "state": state} for n in (name, sequence_model(name))]


# -- one tensor ---------------------------------------------------------------------------------


def check_tensor_spec(index: int, name: Any, datatype: Any, shape: Any, seen: set[str]) -> np.dtype:
    """The numpy dtype of a well-named, well-typed input; 422 naming what is wrong otherwise."""
    if not isinstance(name, str) or not name:
        raise validation(f"inputs[{index}] needs a string 'name'")
    if name not in INPUTS:
        raise validation(f"unknown input {name!r}; the model's inputs are {', '.join(INPUTS)}")
    if name in seen:
        raise validation(f"input {name!r} is given twice")
    seen.add(name)
    if datatype not in INPUTS[name]:
        raise validation(f"input {name!r} has datatype {datatype!r}; expected one of {', '.join(INPUTS[name])}")
    if not isinstance(shape, list) or not all(isinstance(d, int) and not isinstance(d, bool) for d in shape):
        raise validation(f"input {name!r} needs 'shape', a list of integers, got {shape!r}")
    if any(d < 0 for d in shape):
        raise validation(f"input {name!r} has a negative dimension in shape {shape}")
    return INPUTS[name][datatype]


def from_bytes(name: str, datatype: str, shape: list[int], buf: Any, offset: int, size: int, where: str) -> np.ndarray:
    """Raw little-endian, row-major bytes -> array of ``shape`` (no copy). ``where`` names the size."""
    npdtype = INPUTS[name][datatype]
    count = math.prod(shape)
    if size != count * npdtype.itemsize:
        raise validation(
            f"input {name!r} has {where}, but shape {shape} of {datatype} needs "
            f"{count} x {npdtype.itemsize} = {count * npdtype.itemsize} bytes"
        )
    return np.frombuffer(buf, dtype=npdtype, count=count, offset=offset).reshape(shape)


# -- the request --------------------------------------------------------------------------------


class InferPlan:
    """A decoded infer request: its checks against the model (``check_input``), and how to answer."""

    __slots__ = ("check", "datatype", "id", "outputs", "priority", "sequence")

    def __init__(
        self,
        check: Callable[..., tuple[Any, float]],
        datatype: str,
        outputs: list[tuple[str, bool]],
        id: str | None,
        priority: int | None = None,
        sequence: SequenceFlags | None = None,
    ) -> None:
        self.check = check  # check(config=, limits=) -> (AttendInput, timeout_s)
        self.datatype = datatype  # datatype of x, and so of the outputs
        self.outputs = outputs  # (name, binary) in the order asked for
        self.id = id
        self.priority = priority  # the request's priority parameter (None: the default level)
        self.sequence = sequence  # the step's sequence flags (None: no step)


def plan_request(
    tensors: dict[str, np.ndarray],
    x_type: str,
    params: dict[str, Any],
    outputs: list[tuple[str, bool]],
    rid: str | None,
    *,
    deadline_ms: float | None = None,
    sequence_model: bool = False,
) -> InferPlan:
    """Tensors (floats in their wire dtype, BF16 as uint16 bits) + parameters -> an InferPlan.

    ``deadline_ms``: the transport's own deadline (gRPC's), which caps the request's timeout;
    ``sequence_model``: the request is to the sequence model, so it must be a step.
    """
    sequence = parse_sequence(params, sequence_model)
    want_weights = any(n == "weights" for n, _ in outputs)
    heads = parse_heads(params.get("heads"))
    if heads is not None and not want_weights:
        raise validation("parameters.heads selects weights: it needs the 'weights' output in outputs")
    timeout_ms = parse_timeout_ms(params)
    if deadline_ms is not None:
        timeout_ms = deadline_ms if timeout_ms is None else min(timeout_ms, deadline_ms)
        if timeout_ms <= 0:
            raise ServiceError("deadline_exceeded", "the request's deadline passed before it was queued")
    causal = params.get("causal")
    if causal is not None and not isinstance(causal, bool):
        raise validation(f"parameters.causal must be a boolean, got {causal!r}")
    priority = params.get("priority")  # Triton's schedule-policy parameter; range-checked with /attend's rule
    if priority is not None and (isinstance(priority, bool) or not isinstance(priority, int)):
        raise validation(f"parameters.priority must be an integer, got {priority!r}")

    x = tensors.get("x")
    if x is None:
        raise validation("input 'x' is required")
    if x.ndim != 3:
        raise validation(f"input 'x' must have shape [B, T, E], got {list(x.shape)}")
    if x.shape[0] < 1:
        raise validation(f"x must have B >= 1 and T >= 1, got shape {list(x.shape)}")
    lengths = tensors.get("lengths")
    if lengths is not None and lengths.ndim == 2 and lengths.shape[1] == 1:
        lengths = lengths.reshape(-1)  # Triton's [B, 1] form of a per-sequence scalar (see model_config)
    if lengths is not None and lengths.ndim != 1:
        raise validation(f"input 'lengths' must have shape [B] or [B, 1], got {list(lengths.shape)}")
    mask = tensors.get("attn_mask")
    if mask is not None:
        mask = bool_mask(mask)
    check = functools.partial(
        check_input,
        x,  # in its wire dtype (BF16: its bits), to the engine; the outputs come back in it
        lengths,
        mask,
        causal=causal,
        need_weights=want_weights,
        heads=heads,
        timeout_ms=timeout_ms,
        sequence=sequence,
        out_dtype=WIRE[x_type],
    )
    return InferPlan(check, x_type, outputs, rid, priority, sequence)


def bool_mask(mask: np.ndarray) -> np.ndarray:
    """A BOOL input's bytes (0 or 1, else a 422) -> a bool array of its own."""
    if mask.size and mask.max() > 1:
        raise validation("attn_mask bool bytes must be 0 or 1")
    return mask.astype(np.bool_)


def parse_outputs(value: Any, binary_default: bool) -> list[tuple[str, bool]]:
    """The outputs asked for, as (name, binary). None or []: ``output`` alone (docs/protocol.md says why)."""
    if value is None or value == []:
        return [("output", binary_default)]
    if not isinstance(value, list):
        raise validation(f"outputs must be a list, got {type(value).__name__}")
    seen: list[tuple[str, bool]] = []
    for i, spec in enumerate(value):
        if not isinstance(spec, dict) or not isinstance(spec.get("name"), str):
            raise validation(f"outputs[{i}] must be an object with a string 'name'")
        name = spec["name"]
        if name not in OUTPUTS:
            raise validation(f"unknown output {name!r}; the model's outputs are {', '.join(OUTPUTS)}")
        if any(n == name for n, _ in seen):
            raise validation(f"output {name!r} is asked for twice")
        p = as_dict(spec.get("parameters"), f"outputs[{i}].parameters")
        for unsupported in ("classification", "shared_memory_region"):
            if p.get(unsupported) not in (None, 0):
                raise validation(f"output {name!r}: parameter {unsupported!r} is not supported by this server")
        binary = p.get("binary_data")
        if binary is not None and not isinstance(binary, bool):
            raise validation(f"outputs[{i}].parameters.binary_data must be a boolean, got {binary!r}")
        seen.append((name, binary_default if binary is None else binary))
    return seen


def as_dict(value: Any, where: str) -> dict:
    if value is None:
        return {}
    if not isinstance(value, dict):
        raise validation(f"{where} must be an object, got {type(value).__name__}")
    return value


def parse_bool(value: Any, name: str, default: bool) -> bool:
    if value is None:
        return default
    if not isinstance(value, bool):
        raise validation(f"parameters.{name} must be a boolean, got {value!r}")
    return value


def parse_heads(value: Any) -> list[int] | None:
    """A list of ints, one int, or a comma-separated string (Triton's parameters are scalars)."""
    if value is None:
        return None
    if isinstance(value, str):
        try:
            return [int(p) for p in value.split(",") if p.strip()]
        except ValueError as e:
            raise validation(f"parameters.heads must be head indices like '0,2', got {value!r}") from e
    if isinstance(value, int) and not isinstance(value, bool):
        return [value]
    if isinstance(value, list) and all(isinstance(h, int) and not isinstance(h, bool) for h in value):
        return value
    raise validation(f"parameters.heads must be a list of ints, an int or a string like '0,2', got {value!r}")


def parse_timeout_ms(params: dict) -> float | None:
    value = params.get("timeout_ms")
    if value is not None:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise validation(f"parameters.timeout_ms must be a number, got {value!r}")
        return float(value)
    value = params.get("timeout")  # Triton's, in microseconds; 0 = the default
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        raise validation(f"parameters.timeout must be microseconds >= 0, got {value!r}")
    return value / 1000 if value else None


def to_wire(arr: np.ndarray, datatype: str, name: str) -> np.ndarray:
    """float32 -> contiguous 1-D little-endian array of the datatype's bytes (an overflow is a 422)."""
    return codecs.to_wire(arr, WIRE[datatype], name).reshape(-1)


def to_json(arr: np.ndarray, datatype: str, name: str) -> np.ndarray:
    """A flat array orjson writes as a list (BF16: the bfloat16 values, as float32 numbers)."""
    wire = codecs.to_wire(arr, WIRE[datatype], name)
    return (codecs.bf16_to_f32(wire) if datatype == "BF16" else wire).reshape(-1)

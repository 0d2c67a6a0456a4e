"""What the decode processes run (service.frontend.offload): parse JSON lists into arrays, write JSON.

Imported in the worker processes, so it imports neither torch nor the app: numpy, orjson and
the codecs only, so that a worker starts quickly and stays small.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Any

import orjson

from service.errors import ServiceError
from service.frontend import codecs
from service.proc import die_with_parent, set_title

# /attend's list tensors and their allowed ranks; everything else is checked by the event loop's side.
LIST_TENSORS = (("x", (3,), False), ("attn_mask", (2, 3), True))
V2_RANKS = range(1, 64)  # v2 JSON data: flat or nested, as service.frontend.v2 decodes it inline
V2_LIST_TYPES = {"FP32": False, "FP16": False, "BF16": False, "BOOL": True}  # datatype -> boolean


@dataclass(frozen=True)
class Failed:
    """A v2 input's data that did not decode, in place of it: raised when the event loop's checks reach that
    input, so that a request with several faults is told the same first one as inline.
    (ServiceError does not pickle: its parts do.)"""

    type: str
    message: str

    def error(self) -> ServiceError:
        return ServiceError(self.type, self.message)


def started(pids: Any) -> None:
    """The pool's initializer: tell the parent this worker's pid (service.frontend.offload.Offload.worker_pids),
    take the decode title, and die with the parent (a pool worker otherwise outlives a killed front end,
    holding its memory)."""
    pids.put(os.getpid())
    set_title("mha-serve: decode")
    die_with_parent()


def parse_lists(body: bytes) -> tuple[str, Any]:
    """/attend: ("ok", the object with its list tensors as arrays) | ("error", (type, message))
    | ("invalid", orjson's reason): not JSON, worded by the caller (service.frontend.decode.json_error)."""
    try:
        obj = orjson.loads(body)
    except orjson.JSONDecodeError as e:
        return "invalid", str(e)
    if isinstance(obj, dict):
        for name, ndims, boolean in LIST_TENSORS:
            value = obj.get(name)
            if isinstance(value, list):
                try:
                    obj[name] = codecs.decode_lists(value, name, ndims, boolean=boolean)
                except ServiceError as e:
                    return "error", (e.type, e.message)
    return "ok", obj


def parse_v2(body: bytes) -> tuple[str, Any]:
    """A v2 JSON body (or header): as ``parse_lists``, with each input's float or bool ``data`` as an array
    (or a ``Failed``); the rest is checked by service.frontend.v2 on the event loop."""
    try:
        obj = orjson.loads(body)
    except orjson.JSONDecodeError as e:
        return "invalid", str(e)
    inputs = obj.get("inputs") if isinstance(obj, dict) else None
    for spec in inputs if isinstance(inputs, list) else ():
        if not isinstance(spec, dict):
            continue
        name, datatype = spec.get("name"), spec.get("datatype")
        boolean = V2_LIST_TYPES.get(datatype) if isinstance(datatype, str) else None
        if boolean is None or not isinstance(name, str) or not isinstance(spec.get("data"), list):
            continue
        try:
            spec["data"] = codecs.decode_lists(spec["data"], name, V2_RANKS, boolean=boolean)
        except ServiceError as e:
            spec["data"] = Failed(e.type, e.message)
    return "ok", obj


def dumps(obj: Any) -> bytes:
    return orjson.dumps(obj, option=orjson.OPT_SERIALIZE_NUMPY)


def ready() -> bool:
    return True

"""What the decode processes run (service.frontend.offload): parse JSON lists into arrays, write JSON.

Imported in the worker processes, so it imports neither torch nor the app: numpy, orjson and
the codecs only (a worker starts in ~0.4 s and takes ~60 MB).
"""

from __future__ import annotations

import contextlib
from typing import Any

import orjson

from service.errors import ServiceError
from service.frontend import codecs

# /attend's list tensors and their allowed ranks; everything else is checked by the event loop's side.
LIST_TENSORS = (("x", (3,), False), ("attn_mask", (2, 3), True))


def die_with_parent() -> None:
    """Linux: this process gets SIGKILL when the process that started it dies (even by kill -9).

    A pool worker otherwise outlives a killed front end (MHA_WORKERS >= 2), holding its memory.
    """
    import ctypes
    import signal
    import sys

    import setproctitle

    setproctitle.setproctitle("mha-serve: decode")  # (the pool's initializer: the one call at the worker's start)
    if sys.platform.startswith("linux"):
        with contextlib.suppress(OSError, AttributeError):
            ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG


def parse_lists(body: bytes) -> tuple[str, Any]:
    """("ok", the object with its list tensors as arrays) | ("error", (type, message)) | ("invalid", None).

    "invalid" (not JSON) is parsed again by the caller, inline, for its exact error message.
    """
    try:
        obj = orjson.loads(body)
    except orjson.JSONDecodeError:
        return "invalid", None
    if isinstance(obj, dict):
        for name, ndims, boolean in LIST_TENSORS:
            value = obj.get(name)
            if isinstance(value, list):
                try:
                    obj[name] = codecs.decode_lists(value, name, ndims, boolean=boolean)
                except ServiceError as e:  # ServiceError does not pickle: send its parts
                    return "error", (e.type, e.message)
    return "ok", obj


def dumps(obj: Any) -> bytes:
    return orjson.dumps(obj, option=orjson.OPT_SERIALIZE_NUMPY)


def ready() -> bool:
    return True

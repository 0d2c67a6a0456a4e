"""Structured logs: one JSON object a line, with the request id and the current trace ids.

Shared by both sides (the front end's access log and the model process's logs), so the engine
needs no front-end module to log. The HTTP middleware that sets ``request_id_var`` and writes
``access_log`` is ``service.frontend.observability``.
"""

from __future__ import annotations

import contextvars
import json
import logging
import time
from typing import Any

from service import tracing

request_id_var: contextvars.ContextVar[str | None] = contextvars.ContextVar("request_id", default=None)
access_log = logging.getLogger("mha_serve.access")

_ENCODER = json.JSONEncoder(default=str)
_STANDARD = set(vars(logging.LogRecord("", 0, "", 0, "", None, None))) | {"message", "asctime"}


class JsonFormatter(logging.Formatter):
    """One JSON object a line: ts, level, logger, msg, request_id, trace_id and span_id (when a span is
    active), and any ``extra=`` fields."""

    def format(self, record: logging.LogRecord) -> str:
        out: dict[str, Any] = {
            "ts": time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(record.created)) + f".{int(record.msecs):03d}Z",
            "level": record.levelname.lower(),
            "logger": record.name,
            "msg": record.getMessage(),
        }
        rid = getattr(record, "request_id", None) or request_id_var.get()
        if rid:
            out["request_id"] = rid
        ids = tracing.current_ids()
        if ids is not None:
            out["trace_id"], out["span_id"] = ids
        for k, v in record.__dict__.items():
            if k not in _STANDARD and k != "request_id":
                out[k] = v
        if record.exc_info:
            out["exc"] = self.formatException(record.exc_info)
        return _ENCODER.encode(out)  # json.dumps(out, default=str), without building an encoder a line


def configure_logging(level: str, fmt: str) -> None:
    handler = logging.StreamHandler()
    if fmt == "json":
        handler.setFormatter(JsonFormatter())
    else:
        handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    # Neither format prints the caller's file, line, thread or process: do not look them up for every record
    # (the logging HOWTO's "Optimization"); the access log writes one record a request.
    logging._srcfile = None
    logging.logThreads = logging.logProcesses = logging.logMultiprocessing = False
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level.upper())
    for name in ("uvicorn", "uvicorn.error"):
        logging.getLogger(name).handlers[:] = []
        logging.getLogger(name).propagate = True

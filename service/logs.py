"""Structured logs: one JSON object a line, with the request id and the current trace ids.

Shared by both sides (the front end's access log and the model process's logs), so the engine
needs no front-end module to log. The HTTP middleware that sets ``request_id_var`` and writes
``access_log`` is ``service.frontend.observability``.
"""

from __future__ import annotations

import contextvars
import io
import json
import logging
import os
import threading
import time
from typing import Any

from service import tracing

request_id_var: contextvars.ContextVar[str | None] = contextvars.ContextVar("request_id", default=None)


def new_request_id() -> str:
    """A fresh request id: 32 random hex digits (as random as ``uuid4().hex``, a quarter of its cost)."""
    return os.urandom(16).hex()


ACCESS_LOGGER = "mha_serve.access"
access_log = logging.getLogger(ACCESS_LOGGER)

_ENCODER = json.JSONEncoder(default=str)
_STANDARD = set(vars(logging.LogRecord("", 0, "", 0, "", None, None))) | {"message", "asctime"}


class JsonFormatter(logging.Formatter):
    """One JSON object a line: ts, level, logger, msg, request_id, trace_id and span_id (when a span is
    active), and any ``extra=`` fields."""

    _second = -1
    _stamp = ""

    def _ts(self, created: float) -> str:
        second = int(created)
        if second != self._second:  # the date and time, formatted once a second
            self._second, self._stamp = second, time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(second))
        return self._stamp

    def format(self, record: logging.LogRecord) -> str:
        out: dict[str, Any] = {
            "ts": f"{self._ts(record.created)}.{int(record.msecs):03d}Z",
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


class BufferedStderr(logging.StreamHandler):
    """Standard error through a 64 KiB buffer: access-log lines are written within FLUSH_S (by a daemon
    thread), when the buffer fills, with the next other record, or at exit (``logging.shutdown``); every
    other record is written at once. A write a line was a system call a request. A process killed with
    SIGKILL loses at most FLUSH_S of access lines."""

    FLUSH_S = 0.1

    def __init__(self) -> None:
        try:
            raw = io.FileIO(os.dup(2), "w")
        except OSError:  # no file descriptor 2 (a daemon): Python's own stderr, written a line at a time
            super().__init__()
            self._own = False
        else:
            super().__init__(io.TextIOWrapper(io.BufferedWriter(raw, 1 << 16), encoding="utf-8", errors="replace"))
            self._own = True
        self._dirty = False
        threading.Thread(target=self._flusher, name="mha-log-flush", daemon=True).start()

    def emit(self, record: logging.LogRecord) -> None:
        try:
            self.stream.write(self.format(record) + self.terminator)
            if record.name != ACCESS_LOGGER:
                self.stream.flush()
                self._dirty = False
            else:
                self._dirty = True
        except RecursionError:
            raise
        except Exception:
            self.handleError(record)

    def close(self) -> None:
        """Write what is buffered, and close the duplicate of descriptor 2 (``logging.shutdown`` calls this)."""
        with self.lock:
            self.flush()
            if self._own and not self.stream.closed:
                self.stream.close()
        super().close()

    def _flusher(self) -> None:
        while True:
            time.sleep(self.FLUSH_S)
            if self._dirty:
                self._dirty = False
                with self.lock:
                    if not self.stream.closed:
                        self.stream.flush()


def configure_logging(level: str, fmt: str) -> None:
    handler = BufferedStderr()
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

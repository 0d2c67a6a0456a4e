"""Structured logs: one JSON object a line, with the request id and the current trace ids.

Shared by both sides (the front end's access log and the model process's logs), so the engine
needs no front-end module to log. The HTTP middleware that sets ``request_id_var`` and writes
``access_log`` is ``service.frontend.observability``.
"""

from __future__ import annotations

import asyncio
import contextvars
import io
import json
import logging
import os
import threading
import time
from typing import Any

import orjson

from service import tracing
from service.proc import title_thread

request_id_var: contextvars.ContextVar[str | None] = contextvars.ContextVar("request_id", default=None)


_IDS: list[str] = []  # request ids drawn ahead, 256 at a time: one getrandom call for 256 requests
os.register_at_fork(after_in_child=_IDS.clear)  # a forked child never hands out its parent's ids


def new_request_id() -> str:
    """A fresh request id: 32 random hex digits from the OS's random source (as random as ``uuid4().hex``),
    drawn 256 at a time (a system call per id cost more than the rest of the id)."""
    try:
        return _IDS.pop()
    except IndexError:
        raw = os.urandom(16 * 256).hex()
        _IDS.extend([raw[i : i + 32] for i in range(0, len(raw), 32)])
        return _IDS.pop()


ACCESS_LOGGER = "mha_serve.access"
access_log = logging.getLogger(ACCESS_LOGGER)

_ENCODER = json.JSONEncoder(default=str)
_STANDARD = set(vars(logging.LogRecord("", 0, "", 0, "", None, None))) | {"message", "asctime"}


class JsonFormatter(logging.Formatter):
    """One JSON object a line: ts, level, logger, msg, request_id, trace_id and span_id (when a span is
    active), and any ``extra=`` fields. Written by orjson (a fraction of the standard encoder's cost):
    compact, no spaces; anything it cannot write is written as ``str()``."""

    _second = -1
    _stamp = ""
    _ms = (-1, -1)
    _ts_ms = ""

    def _ts(self, created: float, msecs: float) -> str:
        second, ms = int(created), int(msecs)
        if (second, ms) == self._ms:  # the same millisecond as the last line (busy: several lines a millisecond)
            return self._ts_ms
        if second != self._second:  # the date and time, formatted once a second
            self._second, self._stamp = second, time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(second))
        self._ms, self._ts_ms = (second, ms), f"{self._stamp}.{ms:03d}Z"
        return self._ts_ms

    def head(
        self, created: float, msecs: float, level: str, name: str, msg: str, rid: str | None, ids: Any = ()
    ) -> dict[str, Any]:
        """The fields every line starts with, in their order; ``ids`` the (trace_id, span_id) it was written under
        (None: none), the current span's when not given."""
        out: dict[str, Any] = {"ts": self._ts(created, msecs), "level": level, "logger": name, "msg": msg}
        if rid:
            out["request_id"] = rid
        if ids == ():
            ids = tracing.current_ids()
        if ids is not None:
            out["trace_id"], out["span_id"] = ids
        return out

    def format(self, record: logging.LogRecord) -> str:
        out = self.head(
            record.created,
            record.msecs,
            record.levelname.lower(),
            record.name,
            record.getMessage(),
            getattr(record, "request_id", None) or request_id_var.get(),
        )
        for k, v in record.__dict__.items():
            if k not in _STANDARD and k != "request_id":
                out[k] = v
        if record.exc_info:
            out["exc"] = self.formatException(record.exc_info)
        return dumps_line(out)


def dumps_line(out: dict[str, Any]) -> str:
    return _dumps_line_bytes(out)[:-1].decode()


def _dumps_line_bytes(out: dict[str, Any]) -> bytes:
    """One JSON line and its newline, UTF-8: orjson's, or the standard encoder's (ASCII) for what orjson cannot
    write (an integer beyond 64 bits, say)."""
    try:
        return orjson.dumps(out, default=str, option=orjson.OPT_NON_STR_KEYS | orjson.OPT_APPEND_NEWLINE)
    except (TypeError, orjson.JSONEncodeError):
        return (_ENCODER.encode(out) + "\n").encode()


def _access_line(fmt: logging.Formatter | None, entry: tuple) -> bytes:
    """An access line's JSON, as ``logging`` would write its record (JsonFormatter), UTF-8 with its newline."""
    created, method, path, status, elapsed_s, rid, ids = entry
    if type(fmt) is not JsonFormatter:  # (the handler's formatter was replaced after the line was made)
        fmt = JsonFormatter()
    out = fmt.head(
        created, (created - int(created)) * 1000, "info", ACCESS_LOGGER, f"{method} {path} {status}", rid, ids
    )
    out["method"], out["path"], out["status"], out["duration_ms"] = method, path, status, round(elapsed_s * 1e3, 3)
    return _dumps_line_bytes(out)


class BufferedStderr(logging.StreamHandler):
    """Standard error through a 64 KiB buffer: access-log lines are written within FLUSH_S (by a daemon
    thread), when the buffer fills, with the next other record, or at exit (``logging.shutdown``); every
    other record is written at once. A write a line was a system call a request. A process killed with
    SIGKILL loses at most FLUSH_S of access lines.

    Access lines of the direct path (``access``) made on an event loop are formatted together at the end of
    its turn (``add_access``): formatted together, the lines cost a fraction of what each cost formatted among
    its request's other work. Another record written on that thread writes them
    first, so the order holds."""

    FLUSH_S = 0.1

    def __init__(self) -> None:
        try:
            raw = io.FileIO(os.dup(2), "w")
        except OSError:  # no file descriptor 2 (a daemon): Python's own stderr, written a line at a time
            super().__init__()
            self._own = False
        else:
            # write_through: a text write goes to the buffer at once, so access lines written to it as bytes
            # (``write_access``) keep their order among the other records.
            buffered = io.BufferedWriter(raw, 1 << 16)
            super().__init__(io.TextIOWrapper(buffered, encoding="utf-8", errors="replace", write_through=True))
            self._own = True
        self._bytes = buffered if self._own else None
        self._dirty = False
        self._pending: list[tuple] = []  # this turn's access lines: (created, method, path, status, s, rid, ids)
        self._drain_loop: asyncio.AbstractEventLoop | None = None  # the loop whose turn's end writes them
        self._owner = 0  # its thread (``threading.get_ident``)
        threading.Thread(target=self._flusher, name="mha-log-flush", daemon=True).start()

    def emit(self, record: logging.LogRecord) -> None:
        try:
            if self._pending and threading.get_ident() == self._owner:  # the turn's access lines come first
                self.write_pending()
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

    def write_access(self, line: bytes) -> None:
        """An access line formatted already, UTF-8 with its newline (``access``): buffered, as ``emit`` buffers an
        access record. Straight into the binary buffer, whose own lock makes the write whole (no text layer to
        encode it again, no handler lock)."""
        try:
            if self._bytes is not None:
                self._bytes.write(line)
            else:
                with self.lock:
                    self.stream.write(line.decode("utf-8", "replace"))
            self._dirty = True
        except Exception:
            self.handleError(logging.makeLogRecord({"name": ACCESS_LOGGER, "msg": line.decode("utf-8", "replace")}))

    def add_access(self, entry: tuple) -> None:
        """An access line's fields (``access``): on an event loop, kept for the end of its turn; elsewhere (no loop,
        or another running loop holds this turn's lines) written now."""
        try:
            loop = asyncio.get_running_loop()
        except RuntimeError:  # no loop runs in this thread
            loop = None
        if loop is not None:
            if self._drain_loop is loop:
                self._pending.append(entry)
                return
            if self._drain_loop is None or not self._drain_loop.is_running():
                if self._pending:  # kept by a loop that stopped before its turn ended
                    self.write_pending()
                self._drain_loop, self._owner = loop, threading.get_ident()
                self._pending.append(entry)
                loop.call_soon(self.write_pending)
                return
        self.write_access(_access_line(self.formatter, entry))

    def write_pending(self) -> None:
        """Write the access lines kept so far (the end of a turn, another record, or close)."""
        self._drain_loop = None
        entries, self._pending = self._pending, []
        if entries:
            fmt = self.formatter
            self.write_access(b"".join([_access_line(fmt, e) for e in entries]))

    def close(self) -> None:
        """Write what is buffered, and close the duplicate of descriptor 2 (``logging.shutdown`` calls this)."""
        with self.lock:
            if not self.stream.closed:  # (closed already: a second close)
                if self._pending:
                    self.write_pending()
                self.flush()
                if self._own:
                    self.stream.close()
        super().close()

    def _flusher(self) -> None:
        title_thread()
        while True:
            time.sleep(self.FLUSH_S)
            if self._dirty:
                self._dirty = False
                with self.lock:
                    if not self.stream.closed:
                        self.stream.flush()


def access(method: str, path: str, status: int, elapsed_s: float, rid: str | None) -> None:
    """One access-log line: ``mha_serve.access`` at INFO, "METHOD PATH STATUS" with method, path, status and
    duration_ms fields. With the service's own JSON set-up (``configure_logging``, and nothing added since:
    no other handler, no filter, the logger enabled) the line goes straight to the handler's buffer, the
    same line the logging module would write, without a LogRecord and the handler's dispatch (most of what
    access logging cost a small request). Any other set-up gets the record through ``logging``."""
    handler = _direct
    if handler is not None and _direct_ok(handler):
        handler.add_access((time.time(), method, path, status, elapsed_s, rid, tracing.current_ids()))
    elif access_log.isEnabledFor(logging.INFO):
        access_log.info(
            "%s %s %d",
            method,
            path,
            status,
            extra={"method": method, "path": path, "status": status, "duration_ms": round(elapsed_s * 1e3, 3)},
        )


_direct: BufferedStderr | None = None  # the JSON handler configure_logging installed on the root logger


def _direct_ok(handler: BufferedStderr) -> bool:
    """The logging module would write an access record to ``handler`` alone, formatted by JsonFormatter."""
    root = logging.root
    hs = root.handlers
    if len(hs) != 1 or hs[0] is not handler or handler.filters or type(handler.formatter) is not JsonFormatter:
        return False
    if not access_log.isEnabledFor(logging.INFO) or handler.level > logging.INFO:
        return False
    logger: logging.Logger | None = access_log
    while logger is not root and logger is not None:  # mha_serve.access, mha_serve: no handler, no filter
        if logger.handlers or logger.filters or not logger.propagate or logger.disabled:
            return False
        logger = logger.parent
    return not root.filters


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
    global _direct
    _direct = handler if fmt == "json" else None
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level.upper())
    for name in ("uvicorn", "uvicorn.error"):
        logging.getLogger(name).handlers[:] = []
        logging.getLogger(name).propagate = True

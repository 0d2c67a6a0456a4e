"""service.logs: the buffered standard-error handler and the formatter's timestamp."""

from __future__ import annotations

import json
import logging
import time

from service.logs import ACCESS_LOGGER, BufferedStderr, JsonFormatter


def record(name: str, msg: str, level: int = logging.INFO) -> logging.LogRecord:
    return logging.LogRecord(name, level, __file__, 1, msg, None, None)


def test_access_lines_wait_briefly_and_every_other_record_is_written_at_once(capfd):
    handler = BufferedStderr()
    handler.setFormatter(logging.Formatter("%(name)s %(message)s"))
    try:
        handler.handle(record(ACCESS_LOGGER, "a1"))
        assert "a1" not in capfd.readouterr().err  # in the buffer, not yet a system call
        handler.handle(record("mha_serve", "started"))
        assert capfd.readouterr().err.splitlines() == [f"{ACCESS_LOGGER} a1", "mha_serve started"]  # in order
        handler.handle(record(ACCESS_LOGGER, "a2"))
        deadline = time.monotonic() + 5
        err = ""
        while "a2" not in err and time.monotonic() < deadline:
            time.sleep(BufferedStderr.FLUSH_S / 2)
            err += capfd.readouterr().err
        assert err.splitlines() == [f"{ACCESS_LOGGER} a2"]  # written by the flusher, within about FLUSH_S
        handler.handle(record(ACCESS_LOGGER, "a3"))
    finally:
        handler.close()  # what logging.shutdown does at exit: the rest is written
    assert capfd.readouterr().err.splitlines() == [f"{ACCESS_LOGGER} a3"]


def test_the_timestamp_is_the_records_own_to_the_millisecond():
    fmt = JsonFormatter()
    rec = record("mha_serve", "x")
    for created in (1796065651.2366958, 1796065651.9994, 1796065652.0001):  # the cached second changes
        rec.created, rec.msecs = created, (created - int(created)) * 1000
        want = time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(created)) + f".{int(rec.msecs):03d}Z"
        assert json.loads(fmt.format(rec))["ts"] == want

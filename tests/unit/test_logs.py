"""service.logs: the buffered standard-error handler, the formatter's timestamp, and access lines written
straight to the handler."""

from __future__ import annotations

import asyncio
import calendar
import json
import logging
import os
import threading
import time

import pytest

from service import logs
from service.logs import ACCESS_LOGGER, BufferedStderr, JsonFormatter, request_id_var


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
    # the cached second changes, and the cached millisecond: repeated, then another in the same second, then the
    # same millisecond of another second
    for created in (
        1796065651.2366958,
        1796065651.2369,
        1796065651.9994,
        1796065652.0001,
        1796065652.0009,
        1796065652.0011,
        1796065653.0011,
    ):
        rec.created, rec.msecs = created, (created - int(created)) * 1000
        want = time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(created)) + f".{int(rec.msecs):03d}Z"
        assert json.loads(fmt.format(rec))["ts"] == want


@pytest.fixture
def json_logging(capfd):
    """``configure()`` for one test: the root logger as it was afterwards."""
    root = logging.getLogger()
    saved = root.handlers[:], root.level, logs._direct
    yield
    for handler in root.handlers:
        if isinstance(handler, BufferedStderr):
            handler.close()
    root.handlers[:], logs._direct = saved[0], saved[2]
    root.setLevel(saved[1])


def configure() -> BufferedStderr:
    """configure_logging("info", "json") inside the test (on the fd 2 that capfd captures then), its handler
    alone on the root logger (pytest adds its own capture handler after the fixtures run)."""
    logs.configure_logging("info", "json")
    root = logging.getLogger()
    handler = next(h for h in root.handlers if isinstance(h, BufferedStderr))
    root.handlers[:] = [handler]
    return handler


def written(handler, capfd) -> list[dict]:
    handler.flush()
    return [json.loads(line) for line in capfd.readouterr().err.splitlines()]


def test_an_access_line_written_directly_is_the_line_logging_writes(json_logging, capfd):
    handler = configure()
    token = request_id_var.set("rid-1")
    try:
        logs.access("POST", "/attend", 200, 0.0012345, "rid-1")  # the direct path
        handler.addFilter(lambda r: True)  # a filter: the record goes through logging
        logs.access("POST", "/attend", 200, 0.0012345, "rid-1")
    finally:
        request_id_var.reset(token)
    direct, logged = written(handler, capfd)
    want = {
        "level": "info",
        "logger": ACCESS_LOGGER,
        "msg": "POST /attend 200",
        "request_id": "rid-1",
        "method": "POST",
        "path": "/attend",
        "status": 200,
        "duration_ms": 1.234,
    }
    assert list(direct) == ["ts", *want] and list(logged) == ["ts", *want]  # the same fields, in one order
    assert {k: v for k, v in direct.items() if k != "ts"} == want == {k: v for k, v in logged.items() if k != "ts"}
    for line in (direct, logged):
        assert abs(time.time() - calendar.timegm(time.strptime(line["ts"][:19], "%Y-%m-%dT%H:%M:%S"))) < 5


def test_access_lines_made_on_an_event_loop_are_written_at_the_end_of_its_turn_in_order(json_logging, capfd):
    """On a loop, the direct path keeps a turn's lines and writes them together when the turn ends: the same
    lines (fields, order, each its own time and request id), before any other record of that thread, and what
    is still kept when the handler closes."""
    handler = configure()

    async def turn() -> tuple[list[dict], list[dict], list[dict]]:
        logs.access("POST", "/attend", 200, 0.001, "rid-a")
        time.sleep(0.002)  # the second line's own millisecond
        logs.access("POST", "/v2/models/mha/infer", 429, 0.5, "rid-b")
        kept = written(handler, capfd)  # nothing yet: kept for the end of the turn
        await asyncio.sleep(0)
        at_end = written(handler, capfd)
        logs.access("POST", "/attend", 201, 0.002, "rid-c")
        logging.getLogger("mha_serve").warning("after the access line")  # written after it, not before
        ordered = written(handler, capfd)
        logs.access("POST", "/attend", 202, 0.003, "rid-d")
        return kept, at_end, ordered

    kept, at_end, ordered = asyncio.run(turn())
    assert kept == []
    assert [(x["request_id"], x["status"], x["path"], x["duration_ms"]) for x in at_end] == [
        ("rid-a", 200, "/attend", 1.0),
        ("rid-b", 429, "/v2/models/mha/infer", 500.0),
    ]
    assert at_end[0]["ts"] < at_end[1]["ts"] and list(at_end[0]) == list(at_end[1])  # own times; the same fields
    assert [(x["logger"], x.get("request_id")) for x in ordered] == [(ACCESS_LOGGER, "rid-c"), ("mha_serve", None)]
    assert [x["request_id"] for x in written(handler, capfd)] == ["rid-d"]  # asyncio.run's last turns wrote it


def test_access_lines_kept_by_a_loop_that_stopped_are_written_by_the_next_line_or_at_close(json_logging, capfd):
    handler = configure()
    loop = asyncio.new_event_loop()
    try:
        _line_then_stop(loop, "rid-1")  # the loop stops before the turn that would write the line: kept
        assert written(handler, capfd) == []
        other = asyncio.new_event_loop()
        try:  # another loop's first line writes the stopped loop's first, and keeps its own for its turn
            other.run_until_complete(_two_turns("rid-2"))
        finally:
            other.close()
        assert [x["request_id"] for x in written(handler, capfd)] == ["rid-1", "rid-2"]
        _line_then_stop(loop, "rid-3")
    finally:
        loop.close()
    assert written(handler, capfd) == []
    handler.close()  # logging.shutdown at exit: what is kept is written
    assert [json.loads(line)["request_id"] for line in capfd.readouterr().err.splitlines()] == ["rid-3"]


def _line_then_stop(loop: asyncio.AbstractEventLoop, rid: str) -> None:
    loop.call_soon(logs.access, "POST", "/attend", 200, 0.001, rid)
    loop.call_soon(loop.stop)
    loop.run_forever()


async def _two_turns(rid: str) -> None:
    logs.access("POST", "/attend", 200, 0.001, rid)
    await asyncio.sleep(0)


def test_access_lines_of_another_loops_thread_are_written_at_once(json_logging, capfd):
    """Two event loops (threads): the lines kept belong to the first; the other's are written at once, none lost."""
    handler = configure()

    async def other() -> None:
        logs.access("POST", "/attend", 200, 0.001, "rid-other")

    async def first() -> list[str]:
        logs.access("POST", "/attend", 200, 0.001, "rid-first")
        worker = threading.Thread(target=asyncio.run, args=(other(),))
        worker.start()
        worker.join()
        now = [x["request_id"] for x in written(handler, capfd)]
        await asyncio.sleep(0)
        return now + [x["request_id"] for x in written(handler, capfd)]

    assert asyncio.run(first()) == ["rid-other", "rid-first"]


def test_access_lines_go_through_logging_when_another_handler_listens(json_logging, capfd, caplog):
    handler = configure()
    logging.getLogger().addHandler(caplog.handler)  # another handler: a test's, or a user's set-up
    with caplog.at_level(logging.INFO, logger=ACCESS_LOGGER):
        logs.access("POST", "/v2/models/mha/infer", 429, 0.5, "rid-2")
    (rec,) = [r for r in caplog.records if r.name == ACCESS_LOGGER]
    assert (rec.getMessage(), rec.status, rec.path, rec.duration_ms) == (
        "POST /v2/models/mha/infer 429",
        429,
        "/v2/models/mha/infer",
        500.0,
    )
    assert [line["status"] for line in written(handler, capfd)] == [429]  # and the service's handler too


def test_no_access_line_below_the_loggers_level(json_logging, capfd):
    handler = configure()
    access_logger = logging.getLogger(ACCESS_LOGGER)
    access_logger.setLevel(logging.WARNING)
    try:
        logs.access("POST", "/attend", 200, 0.001, "rid-3")
    finally:
        access_logger.setLevel(logging.NOTSET)
    logs.access("POST", "/attend", 201, 0.001, "rid-4")
    assert [line["status"] for line in written(handler, capfd)] == [201]


def test_what_orjson_cannot_write_is_written_by_the_standard_encoder():
    assert json.loads(logs.dumps_line({"big": 2**70, "obj": object})) == {"big": 2**70, "obj": str(object)}


def test_request_ids_are_32_hex_digits_unique_and_not_shared_with_a_forked_child():
    ids = [logs.new_request_id() for _ in range(1000)]  # several refills
    assert len(set(ids)) == 1000 and all(len(i) == 32 and int(i, 16) >= 0 for i in ids)
    read, write = os.pipe()
    pid = os.fork()
    if pid == 0:  # the child: its next ids are its own draw, not what the parent holds ahead
        os.write(write, "".join(logs.new_request_id() for _ in range(3)).encode())
        os._exit(0)
    os.waitpid(pid, 0)
    child = os.read(read, 200).decode()
    parent = "".join(logs.new_request_id() for _ in range(3))
    assert len(child) == 96 and child != parent

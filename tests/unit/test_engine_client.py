"""service.engine.client.MPClient against a scripted model process (a Unix socket server in the test):
the wait's safety-net deadline, and the caller watched only once an answer is not quick."""

from __future__ import annotations

import asyncio
import contextlib
import time

import numpy as np
import pytest

from service import channel
from service.engine import client as client_mod
from service.engine.client import EngineUnavailable, MPClient
from service.messages import (
    WATCH_AFTER_S,
    AttendInput,
    AttendOutput,
    Cancel,
    ClientGone,
    DeadlineExceeded,
    Heartbeat,
    Hello,
    Info,
    NumericOverflow,
    Outcome,
    OutcomesWriter,
    Ping,
    Requests,
    ShuttingDown,
    decode,
    decode_requests,
    encode,
    encode_outcomes,
)
from service.sweep import Sweep
from tests.waiting import until

MODEL_CONFIG = {"num_heads": 2, "emb_size": 8, "head_size": 4, "max_seq_len": 4}
MODEL_INFO = {"name": "mha", **MODEL_CONFIG, "dtype": "float32", "device": "cpu", "checksum": "0"}
INFO = {"config": MODEL_CONFIG, "model_info": MODEL_INFO}  # what the model process says of its model


class FakeEngine:
    """Answers hello with info, records requests and cancels, answers a request only when told to."""

    def __init__(self, address: str) -> None:
        self.listener = channel.listen(address)  # bound now: a client may connect at once
        self.conns: list[channel.Connection] = []
        self.paused = False
        self.requests: dict[int, tuple[channel.Connection, AttendInput]] = {}
        self.arrived: list[int] = []  # request ids in the order they came
        self.cancelled: list[int] = []
        self.events: list[tuple[str, int]] = []  # ("req" | "cancel", id) in the order they came
        self.hold_pings = False  # pings wait in ``held`` for ``answer_ping``
        self.held: list[channel.Connection] = []
        self.server: asyncio.AbstractServer | None = None
        self.serving = asyncio.ensure_future(self._serve())

    async def _serve(self) -> None:
        self.server = await asyncio.get_running_loop().create_unix_server(self._connected, sock=self.listener)

    def _connected(self) -> channel.Connection:
        conn = channel.Connection(lambda frames: self._handle(conn, frames), lambda exc: None)
        self.conns.append(conn)
        if self.paused:
            asyncio.get_running_loop().call_soon(lambda: conn.transport and conn.transport.pause_reading())
        return conn

    def pause(self) -> None:
        """Stop reading: the front end's messages pile up in the kernel's buffers, then in its connection's."""
        self.paused = True
        for c in self.conns:
            if c.transport is not None:
                c.transport.pause_reading()

    def resume(self) -> None:
        self.paused = False
        for c in self.conns:
            if c.transport is not None:
                c.transport.resume_reading()

    def _handle(self, conn: channel.Connection, frames: list) -> None:
        msg = decode(frames[0])
        if isinstance(msg, Hello):
            conn.send(encode(Info(True, (0, 0), **INFO)))
        elif isinstance(msg, Ping):
            if self.hold_pings:
                self.held.append(conn)
            else:
                conn.send(encode(Heartbeat(True, (0, 0))))
        elif isinstance(msg, Requests):
            for rid, inp, *_ in decode_requests(msg, frames[1:]):
                self.requests[rid] = (conn, inp)
                self.arrived.append(rid)
                self.events.append(("req", rid))
        elif isinstance(msg, Cancel):
            self.cancelled += msg.ids
            self.events += [("cancel", rid) for rid in msg.ids]

    def answer_ping(self) -> None:
        """The heartbeat that answers the oldest ping held."""
        self.held.pop(0).send(encode(Heartbeat(True, (0, 0))))

    async def answer(self, rid: int) -> None:
        conn, inp = self.requests[rid]
        out = Outcome(rid, AttendOutput(np.asarray(inp.x) * 2, None), 0.001, 0.002, 1, 1)
        conn.send(encode_outcomes([out]))

    async def send(self, outcomes: list[Outcome]) -> None:
        """Several outcomes in one message, as the model process sends a batch's."""
        self.requests[outcomes[0].id][0].send(encode_outcomes(outcomes))

    async def close(self) -> None:
        """Its end of every connection closes, as when the model process dies."""
        await self.serving
        for c in self.conns:
            c.close()
        self.server.close()
        self.listener.close()


@contextlib.asynccontextmanager
async def connected(tmp_path):
    """A scripted model process and an MPClient started against it, both closed after."""
    engine = FakeEngine(f"ipc://{tmp_path}/engine.sock")
    client = MPClient(f"ipc://{tmp_path}/engine.sock")
    await client.start(timeout_s=5)
    try:
        yield engine, client
    finally:
        await client.stop()
        await engine.close()


@pytest.fixture
async def pair(tmp_path):
    async with connected(tmp_path) as p:
        yield p


def x(value: float) -> AttendInput:
    return AttendInput(np.full((1, 2, 4), value, np.float32))


async def test_a_quick_answer_never_calls_the_watch_and_a_slow_one_calls_it_after_watch_after_s(pair):
    engine, client = pair
    calls: list[float] = []

    def watch():
        calls.append(time.monotonic())
        return asyncio.get_running_loop().create_future()  # the caller stays

    quick = asyncio.create_task(client.infer(x(1.0), deadline=time.monotonic() + 30, abandoned=watch))
    await until(lambda: 0 in engine.requests)
    await engine.answer(0)
    res = await quick
    np.testing.assert_array_equal(res.output.output, np.full((1, 2, 4), 2.0, np.float32))
    assert calls == []  # answered before WATCH_AFTER_S: no watcher

    gone = asyncio.get_running_loop().create_future()

    def watch_gone():
        calls.append(time.monotonic())
        return gone

    t0 = time.monotonic()
    slow = asyncio.create_task(client.infer(x(3.0), deadline=time.monotonic() + 30, abandoned=watch_gone))
    await until(lambda: 1 in engine.requests)
    await until(lambda: calls, timeout_s=2)
    assert calls[0] - t0 >= WATCH_AFTER_S * 0.9  # watched from WATCH_AFTER_S on, within a sweep
    gone.set_result(None)  # the caller leaves: ClientGone, and the model process is told to drop it
    with pytest.raises(ClientGone):
        await slow
    await until(lambda: engine.cancelled == [1])


async def test_a_model_process_that_never_answers_ends_the_wait_after_the_deadline_and_slack(pair, monkeypatch):
    engine, client = pair
    monkeypatch.setattr(client_mod, "ANSWER_SLACK_S", 0.1)
    t0 = time.monotonic()
    with pytest.raises(DeadlineExceeded, match="did not answer"):
        await client.infer(x(1.0), deadline=t0 + 0.2)
    waited = time.monotonic() - t0
    assert 0.3 <= waited <= 0.3 + client_mod.SWEEP_S + 0.2, waited
    await until(lambda: engine.cancelled == [0])  # and it is told to drop it


async def test_a_numeric_overflow_crosses_the_boundary_typed_with_its_message_and_the_rest_of_the_batch_answers(pair):
    """The model process's own mapping (process._failure_of) -> one message -> the client's typed error."""
    from service.engine.process import _failure_of

    engine, client = pair
    message = "the model's float16 computation overflowed: output has 3 non-finite value(s) of 8. (...)"
    waits = [asyncio.ensure_future(client.infer(x(v), deadline=time.monotonic() + 5)) for v in (1.0, 2.0)]
    await until(lambda: len(engine.requests) == 2)
    (ok_id, ok_inp), (bad_id, _) = sorted((rid, inp) for rid, (_, inp) in engine.requests.items())
    writer = OutcomesWriter()  # one message, as the model process writes a batch's answers
    writer.answer(ok_id, AttendOutput(np.asarray(ok_inp.x) * 2, None), 0.001, 0.002, 2, 2)
    _failure_of(writer, bad_id, NumericOverflow(message))
    overflow = writer.items[1]
    assert (overflow.kind, overflow.message) == ("numeric_overflow", message)
    engine.requests[ok_id][0].send(writer.frames())
    ok, bad = await asyncio.gather(*waits, return_exceptions=True)
    assert type(bad) is NumericOverflow and str(bad) == message
    np.testing.assert_array_equal(ok.output.output, np.full((1, 2, 4), 2.0, np.float32))
    assert ok.batch_requests == 2


async def test_messages_a_model_process_does_not_read_yet_wait_and_go_later_in_order_with_none_lost(tmp_path):
    """A model process that stops reading fills the kernel's buffers between the two (1 MiB requests, one message
    each): the client's connection keeps the rest, and a cancel behind them, without blocking its loop, until the
    model process reads again; then they all arrive, in order, and are answered."""
    waits = []
    async with connected(tmp_path) as (engine, client):
        engine.pause()
        try:
            n, row = 12, 1 << 18  # 12 requests of 1 MiB: more than the sockets' buffers between the two processes
            for i in range(n):
                inp = AttendInput(np.full((1, 1, row), float(i), np.float32))
                waits.append(asyncio.ensure_future(client.infer(inp, deadline=time.monotonic() + 30)))
                await until(lambda i=i: i in client._pending and not client._outbox)  # flushed alone: one message each
            assert client._conn.buffered() > 0, "the kernel took every message: the test did not reach the buffer"
            waits[n - 1].cancel()  # its cancel waits behind the request it cancels
            await asyncio.sleep(0.05)
            assert engine.arrived == list(range(len(engine.arrived))) and len(engine.arrived) < n - 1
            engine.resume()
            await until(lambda: len(engine.arrived) == n and engine.cancelled == [n - 1])
            assert engine.arrived == list(range(n))  # nothing lost, nothing reordered
            await until(lambda: client._conn.buffered() == 0)
            for i in range(n - 1):
                np.testing.assert_array_equal(engine.requests[i][1].x, np.full((1, 1, row), float(i), np.float32))
                await engine.answer(i)
            for i in range(n - 1):
                res = await waits[i]
                np.testing.assert_array_equal(res.output.output, np.full((1, 1, row), 2.0 * i, np.float32))
        finally:
            for w in waits:
                w.cancel()


async def test_the_model_process_going_away_fails_waiting_requests_at_once_and_stop_leaves_nothing_on_the_loop(
    tmp_path,
):
    address = f"ipc://{tmp_path}/engine.sock"
    engine = FakeEngine(address)
    client = MPClient(address)
    await client.start(timeout_s=5)
    conn = client._conn
    wait = asyncio.ensure_future(client.infer(x(1.0), deadline=time.monotonic() + 30))
    await until(lambda: 0 in engine.requests)
    t0 = time.monotonic()
    await engine.close()  # its socket closes, as when the model process dies
    with pytest.raises(EngineUnavailable, match="its socket closed"):
        await wait
    assert time.monotonic() - t0 < 1.0
    with pytest.raises(EngineUnavailable):
        await client.infer(x(2.0), deadline=time.monotonic() + 30)
    await client.stop()
    assert client._conn is None and conn.transport is None  # nothing left open
    await engine.close()


async def test_a_start_that_times_out_leaves_nothing_open(tmp_path):
    client = MPClient(f"ipc://{tmp_path}/nobody.sock")  # no model process there: tried again until the timeout
    t0 = time.monotonic()
    with pytest.raises(TimeoutError):
        await client.start(timeout_s=0.3)
    assert 0.25 <= time.monotonic() - t0 < 2.0
    assert client._conn is None and client._arena is None


async def test_a_start_whose_model_process_never_says_hello_times_out_and_closes_its_connection(tmp_path):
    address = f"ipc://{tmp_path}/engine.sock"
    listener = channel.listen(address)  # something listens, and never answers
    client = MPClient(address)
    try:
        with pytest.raises(TimeoutError):
            await client.start(timeout_s=0.3)
        assert client._conn is None and client._arena is None
    finally:
        listener.close()


async def test_a_start_on_a_bad_address_raises_what_an_address_must_be_and_leaves_nothing_open():
    client = MPClient("nosuch://engine")
    with pytest.raises(ValueError, match="ipc://"):
        await client.start(timeout_s=1)
    assert client._conn is None


async def test_a_silent_model_process_is_unavailable_until_it_is_heard_again(pair, monkeypatch):
    """No heartbeat for LOST_AFTER_S: waiting and new requests fail at once (503); when it answers again (a stall
    shorter than the supervisor's MHA_ENGINE_HANG_S), the front end serves again instead of answering 503 for ever."""
    engine, client = pair
    monkeypatch.setattr(client_mod, "HEARTBEAT_S", 0.02)
    monkeypatch.setattr(client_mod, "LOST_AFTER_S", 0.3)
    engine.pause()  # stalled: reads nothing, answers no ping
    waiting = asyncio.create_task(client.infer(x(1.0), deadline=time.monotonic() + 30))
    await until(lambda: client.lost is not None, timeout_s=3)
    assert "no heartbeat" in client.lost and not client.ready
    with pytest.raises(EngineUnavailable):
        await waiting
    with pytest.raises(EngineUnavailable):
        await client.infer(x(2.0), deadline=time.monotonic() + 30)
    engine.resume()
    await until(lambda: client.lost is None and client.ready, timeout_s=3)
    again = asyncio.create_task(client.infer(x(3.0), deadline=time.monotonic() + 30))
    await until(lambda: 1 in engine.requests)
    await engine.answer(1)
    np.testing.assert_array_equal((await again).output.output, np.full((1, 2, 4), 6.0, np.float32))


async def test_a_socket_that_closes_during_a_silence_leaves_it_unavailable_for_good(pair, monkeypatch):
    engine, client = pair
    monkeypatch.setattr(client_mod, "HEARTBEAT_S", 0.02)
    monkeypatch.setattr(client_mod, "LOST_AFTER_S", 0.3)
    engine.pause()
    await until(lambda: client.lost is not None, timeout_s=3)
    await engine.close()  # the supervisor killed the stalled process: its socket closes
    await until(lambda: client.lost == "its socket closed", timeout_s=3)
    replacement = FakeEngine(client.address)  # even a peer at the same address is not taken for it
    try:
        await asyncio.sleep(0.3)
        assert client.lost == "its socket closed" and not client.ready
    finally:
        await replacement.close()


async def test_requests_answered_503_during_a_silence_are_cancelled_before_any_new_request_reaches_it(
    pair, monkeypatch
):
    """A stall shorter than the hang bound: the requests it held were answered 503, so when it reads again it must
    drop them (their cancel arrives first) rather than compute them ahead of fresh traffic."""
    engine, client = pair
    monkeypatch.setattr(client_mod, "HEARTBEAT_S", 0.02)
    monkeypatch.setattr(client_mod, "LOST_AFTER_S", 0.3)
    engine.pause()  # stalled: reads nothing, answers no ping
    held = [asyncio.create_task(client.infer(x(v), deadline=time.monotonic() + 30)) for v in (1.0, 2.0)]
    await until(lambda: client.lost is not None, timeout_s=3)
    for wait in held:
        with pytest.raises(EngineUnavailable):
            await wait
    engine.resume()
    await until(lambda: client.lost is None and client.ready, timeout_s=3)
    fresh = asyncio.create_task(client.infer(x(3.0), deadline=time.monotonic() + 30))
    await until(lambda: 2 in engine.requests)
    assert engine.events == [("req", 0), ("req", 1), ("cancel", 0), ("cancel", 1), ("req", 2)]
    await engine.answer(2)
    np.testing.assert_array_equal((await fresh).output.output, np.full((1, 2, 4), 6.0, np.float32))


async def test_the_deadline_sweep_runs_while_requests_wait_and_stops_with_the_client(pair):
    """The front end's waits are swept by the shared Sweep (service/sweep.py): armed by a request, idle once
    nothing waits, cancelled by stop."""
    engine, client = pair
    assert isinstance(client._sweep, Sweep) and not client._sweep.armed
    quick = asyncio.create_task(client.infer(x(1.0), deadline=time.monotonic() + 30))
    await until(lambda: 0 in engine.requests)
    assert client._sweep.armed
    await engine.answer(0)
    await quick
    await until(lambda: not client._sweep.armed, timeout_s=1)  # nothing waits: no more sweeps
    waiting = asyncio.create_task(client.infer(x(2.0), deadline=time.monotonic() + 30))
    await until(lambda: 1 in engine.requests)
    assert client._sweep.armed
    await client.stop()
    assert not client._sweep.armed  # no sweep left on the loop after stop
    with pytest.raises(ShuttingDown):
        await waiting


def test_a_slot_given_back_while_the_freed_list_is_taken_goes_with_the_next_message(tmp_path):
    """The lent answers' callbacks append to the client's ``freed`` list from whichever thread drops the last
    reference (an encoder thread, say), so one may land between the copy of the list and its clearing: taking
    must remove only what it copied, or that slot is never given back (a leak of the model process's arena)."""

    class Racing(list):
        """A list that another thread appends to right after its contents are copied (the slice)."""

        raced = False

        def __getitem__(self, index):
            out = super().__getitem__(index)
            if isinstance(index, slice) and not self.raced:
                self.raced = True
                self.append(99)  # given back "meanwhile"
            return out

    client = MPClient(f"ipc://{tmp_path}/engine.sock")
    try:
        client._freed = Racing([1, 2])
        assert client._take_freed() == (1, 2)
        assert client._freed.raced
        assert list(client._freed) == [99]  # still there, for the next message
        assert client._take_freed() == (99,)
        assert client._take_freed() == ()
    finally:
        client._sweep.cancel()


@pytest.fixture
async def quiet_pair(tmp_path, monkeypatch):
    """A pair whose client sends no ping of its own (its heartbeat's period is long)."""
    monkeypatch.setattr(client_mod, "HEARTBEAT_S", 3600.0)
    async with connected(tmp_path) as p:
        yield p


async def test_flush_statistics_returns_with_the_heartbeat_that_answers_its_own_ping(quiet_pair):
    """The model process writes its metrics when a ping comes, before the heartbeat: a flush waits for the answer
    to its own ping, not to one sent before it (a periodic ping's heartbeat may have been sent before its)."""
    engine, client = quiet_pair
    engine.hold_pings = True
    client._ping()  # a periodic ping, not yet answered
    flush = asyncio.create_task(client.flush_statistics(timeout_s=30))
    await until(lambda: len(engine.held) == 2)
    engine.answer_ping()  # the earlier ping's heartbeat
    await asyncio.sleep(0.05)
    assert not flush.done()
    engine.answer_ping()  # its own
    await asyncio.wait_for(flush, 5)
    assert client._flushes == []


async def test_flush_statistics_gives_up_after_its_timeout_when_no_heartbeat_comes(quiet_pair):
    engine, client = quiet_pair
    engine.hold_pings = True
    started = time.monotonic()
    await asyncio.wait_for(client.flush_statistics(timeout_s=0.2), 5)
    assert 0.2 <= time.monotonic() - started < 2
    assert client.ready  # a slow answer to a flush is no failure: its requests are unaffected


async def test_flush_statistics_returns_at_once_when_the_model_process_goes(quiet_pair):
    engine, client = quiet_pair
    engine.hold_pings = True
    flush = asyncio.create_task(client.flush_statistics(timeout_s=60))
    await until(lambda: len(engine.held) == 1)
    await engine.close()  # it died: no heartbeat will come
    await asyncio.wait_for(flush, 5)
    assert client.lost == "its socket closed"
    await asyncio.wait_for(client.flush_statistics(timeout_s=60), 1)  # gone: nothing to wait for

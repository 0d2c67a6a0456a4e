"""The model process's socket loop (service/engine/process.py Engine.serve) with a fake batcher: it reads its
zmq socket through the FD, which is edge-triggered, so every message must still be read and answered when
arrivals, heartbeats and answers interleave (a lost edge would leave requests unanswered: a hang)."""

from __future__ import annotations

import asyncio
import select
import time
from functools import partial

import numpy as np
import zmq
import zmq.asyncio

from service.engine import process
from service.engine.process import Engine
from service.messages import (
    DRAIN_MAX,
    AttendInput,
    AttendOutput,
    Cancel,
    Heartbeat,
    Ping,
    Result,
    decode,
    decode_outcomes,
    encode,
    encode_requests,
)
from service.settings import Settings


class AnswerNextTurn:
    """A batcher that answers each request on the next turn of the loop with x * 2 (or refuses priority 9)."""

    running = True

    def __init__(self) -> None:
        self.submitted = 0

    def submit(self, inp, *, deadline, done, priority=0):
        if priority == 9:
            raise ValueError("priority 9 is out of range 0..1")
        self.submitted += 1
        asyncio.get_running_loop().call_soon(done, Result(AttendOutput(inp.x * 2, None), 0.0, 0.0, 1, 1))
        return object()

    def cancel(self, handle, reason="disconnect"):
        pass

    def queue_depth(self) -> tuple[int, int]:
        return (0, 0)


async def test_every_request_is_answered_while_arrivals_pings_and_answers_interleave(tmp_path):
    address = f"ipc://{tmp_path}/engine.sock"
    engine = Engine(Settings(), address)
    engine.batcher = AnswerNextTurn()
    engine.bind()
    serving = asyncio.create_task(engine.serve())
    ctx = zmq.asyncio.Context()
    dealers = [ctx.socket(zmq.DEALER) for _ in range(3)]  # three front ends
    try:
        for d in dealers:
            d.connect(address)
        values: dict[tuple[int, int], float] = {}
        got: dict[tuple[int, int], np.ndarray] = {}
        beats = [0, 0, 0]
        refused: list[str] = []

        async def read(i: int, d: zmq.asyncio.Socket) -> None:
            while True:
                frames = await d.recv_multipart(copy=False)
                msg = decode(frames[0].buffer)
                if isinstance(msg, Heartbeat):
                    beats[i] += 1
                    continue
                for o in decode_outcomes(msg, frames[1:]):
                    if o.error is not None:
                        refused.append(o.message)
                    else:
                        got[(i, o.id)] = o.output.output.copy()

        readers = [asyncio.create_task(read(i, d)) for i, d in enumerate(dealers)]
        rid = 0
        for burst in range(60):  # bursts larger than DRAIN_MAX messages, answers flowing back meanwhile
            for i, d in enumerate(dealers):
                for _ in range(DRAIN_MAX // 20 + burst % 3):
                    items = []
                    for _ in range(1 + rid % 3):
                        rid += 1
                        values[(i, rid)] = float(rid)
                        items.append((rid, AttendInput(np.full((1, 2, 4), float(rid), np.float32)), 1e12, None, 0))
                    await d.send_multipart(encode_requests(items))
                if burst % 7 == 0:
                    await d.send_multipart(encode(Ping()))
            await asyncio.sleep(0 if burst % 2 else 0.001)
        await dealers[0].send_multipart(
            encode_requests([(0, AttendInput(np.zeros((1, 2, 4), np.float32)), 1e12, None, 9)])
        )
        deadline = time.monotonic() + 10
        while (len(got) < len(values) or not refused) and time.monotonic() < deadline:
            await asyncio.sleep(0.01)
        assert len(got) == len(values), f"{len(values) - len(got)} of {len(values)} requests never answered"
        for key, v in values.items():
            np.testing.assert_array_equal(got[key], np.full((1, 2, 4), 2 * v, np.float32))
        assert refused == ["ValueError: priority 9 is out of range 0..1"]  # answered at once, typed
        assert beats == [9, 9, 9]  # every ping answered, to its own front end
        assert engine._pending == {}  # every answered request forgotten
        for r in readers:
            r.cancel()
    finally:
        engine._stop.set()
        await asyncio.wait_for(serving, 5)
        for d in dealers:
            d.close(linger=0)
        ctx.destroy(linger=0)
        engine.close()


async def test_a_backlog_longer_than_one_drain_is_read_on_without_a_new_arrival(tmp_path):
    """Messages that send nothing back (cancels of requests already answered) fill several drains; the ping
    behind them is still answered, with no further message to raise the FD again."""
    address = f"ipc://{tmp_path}/engine.sock"
    engine = Engine(Settings(), address)
    engine.batcher = AnswerNextTurn()
    engine.bind()
    ctx = zmq.asyncio.Context()
    dealer = ctx.socket(zmq.DEALER)
    dealer.connect(address)
    serving = None
    try:
        for i in range(3 * DRAIN_MAX):  # queued before the engine reads at all
            await dealer.send_multipart(encode(Cancel([i])))
        await dealer.send_multipart(encode(Ping()))
        await asyncio.sleep(0.05)
        serving = asyncio.create_task(engine.serve())
        frames = await asyncio.wait_for(dealer.recv_multipart(), 5)
        assert isinstance(decode(frames[0]), Heartbeat)
    finally:
        engine._stop.set()
        if serving is not None:
            await asyncio.wait_for(serving, 5)
        dealer.close(linger=0)
        ctx.destroy(linger=0)
        engine.close()


class HoldFirst(AnswerNextTurn):
    """A batcher that holds the first request's ``done`` for the test to call, and answers the others on the next
    turn of the loop with x * 2."""

    def __init__(self) -> None:
        super().__init__()
        self.held: list = []

    def submit(self, inp, *, deadline, done, priority=0):
        if self.submitted == 0:
            self.submitted += 1
            self.held.append(partial(done, Result(AttendOutput(inp.x * 2, None), 0.0, 0.0, 1, 1)))
            return object()
        return super().submit(inp, deadline=deadline, done=done, priority=priority)


async def test_a_request_that_arrives_as_an_answer_is_sent_is_still_read(tmp_path):
    """zmq's FD is edge-triggered: a send outside a drain processes the socket's pending commands, and so consumes
    the edge that a message arriving just before it raised. The engine looks at EVENTS after such a send; without
    that, the message would wait, unread, for the next arrival (here: for ever).

    Made deterministic: front end A's request is answered after A has gone (its answer is dropped, so no traffic
    back raises the FD again), and the send of that answer (the flush, call_soon from ``done``) runs right after a
    callback, in the same turn of asyncio's loop and after its select, that sends front end B's request and waits
    until it has reached the engine's socket (the FD readable: polled, not read)."""
    address = f"ipc://{tmp_path}/engine.sock"
    engine = Engine(Settings(), address)
    batcher = engine.batcher = HoldFirst()
    engine.bind()
    fd = engine._sock.getsockopt(zmq.FD)
    serving = asyncio.create_task(engine.serve())
    ctx = zmq.Context()
    a, b = ctx.socket(zmq.DEALER), ctx.socket(zmq.DEALER)  # plain sockets: b sends from inside a loop callback
    for d in (a, b):
        d.connect(address)
    answers: dict[int, np.ndarray] = {}

    def request(rid: int) -> list:
        return encode_requests([(rid, AttendInput(np.full((1, 2, 4), float(rid), np.float32)), 1e12, None, 0)])

    def readable() -> bool:
        return bool(select.select([fd], [], [], 0)[0])

    def arrive_now() -> None:
        """Runs just before the flush: B's request reaches the engine's socket, and its edge is raised."""
        b.send_multipart(request(2))
        assert select.select([fd], [], [], 5)[0], "request 2 never reached the engine's socket"
        time.sleep(0.01)  # past zmq's throttle of command processing on send (about a millisecond)

    try:
        a.send_multipart(request(1))
        deadline = time.monotonic() + 3
        while not batcher.held and time.monotonic() < deadline:
            await asyncio.sleep(0.005)
        assert batcher.held, "request 1 never reached the batcher"
        a.close(linger=0)  # front end A goes while its request is computing
        await asyncio.sleep(0.05)  # the engine reads the disconnect (its drain ends at EAGAIN): nothing is waiting
        while readable() and time.monotonic() < deadline + 3:
            await asyncio.sleep(0.01)
        assert not readable()
        asyncio.get_running_loop().call_soon(arrive_now)
        batcher.held.pop()()  # request 1 answered: its flush, a send outside a drain, runs after arrive_now
        deadline = time.monotonic() + 3
        while 2 not in answers and time.monotonic() < deadline:
            while b.poll(0):
                frames = b.recv_multipart(copy=False)
                for o in decode_outcomes(decode(frames[0].buffer), frames[1:]):
                    answers[o.id] = o.output.output.copy()
            await asyncio.sleep(0.005)
        assert list(answers) == [2], "front end B's request was never read"
        np.testing.assert_array_equal(answers[2], np.full((1, 2, 4), 4.0, np.float32))
        assert batcher.submitted == 2 and engine._pending == {}
    finally:
        engine._stop.set()
        await asyncio.wait_for(serving, 5)
        for d in (a, b):
            d.close(linger=0)
        ctx.destroy(linger=0)
        engine.close()


async def test_every_answer_reaches_a_front_end_that_does_not_read_for_a_while_in_order(tmp_path, monkeypatch):
    """A high-water mark of 1 on both sides and a front end whose loop is busy: zmq takes no more answers for it
    (EAGAIN under ROUTER_MANDATORY, where a plain ROUTER dropped them in silence), so they wait in its backlog and
    all arrive, in order, once it reads again."""
    monkeypatch.setattr(process, "HWM", 1)
    address = f"ipc://{tmp_path}/engine.sock"
    engine = Engine(Settings(), address)
    engine.batcher = AnswerNextTurn()
    engine.bind()
    serving = asyncio.create_task(engine.serve())
    ctx = zmq.Context()
    dealer = ctx.socket(zmq.DEALER)
    dealer.setsockopt(zmq.RCVHWM, 1)
    dealer.setsockopt(zmq.SNDHWM, 1)
    dealer.connect(address)
    n, row = 200, 1 << 14  # 64 KiB answers: more than the kernel's socket buffers hold between the two
    try:
        for rid in range(n):  # one message each, sent as room comes (the engine reads them meanwhile)
            frames = encode_requests([(rid, AttendInput(np.full((1, 1, row), float(rid), np.float32)), 1e12, None, 0)])
            deadline = time.monotonic() + 5
            while True:
                try:
                    dealer.send_multipart(frames, zmq.NOBLOCK)
                    break
                except zmq.Again:
                    assert time.monotonic() < deadline, "the engine stopped reading"
                    await asyncio.sleep(0.001)
        deadline = time.monotonic() + 5
        while engine.batcher.submitted < n and time.monotonic() < deadline:
            await asyncio.sleep(0.01)
        assert engine.batcher.submitted == n
        await asyncio.sleep(0.2)  # the answers are sent meanwhile, and the front end still reads nothing
        reached = bool(getattr(engine, "_backlogs", None))
        got: list[int] = []
        deadline = time.monotonic() + 10
        while len(got) < n and time.monotonic() < deadline:
            while dealer.poll(0):
                frames = dealer.recv_multipart(copy=False)
                for o in decode_outcomes(decode(frames[0].buffer), frames[1:]):
                    assert o.error is None, o.message
                    np.testing.assert_array_equal(o.output.output, np.full((1, 1, row), 2.0 * o.id, np.float32))
                    got.append(o.id)
            await asyncio.sleep(0.002)
        assert got == list(range(n)), f"{n - len(got)} of {n} answers lost or out of order"
        assert reached, "zmq took every answer: the test did not reach the backlog"
        assert engine._backlogs == {} and engine._pending == {}
    finally:
        engine._stop.set()
        await asyncio.wait_for(serving, 5)
        dealer.close(linger=0)
        ctx.destroy(linger=0)
        engine.close()


class HoldAll(AnswerNextTurn):
    """A batcher that holds every request (the test answers them) and records the cancelled ones."""

    def __init__(self) -> None:
        super().__init__()
        self.held: list = []
        self.cancelled: list = []

    def submit(self, inp, *, deadline, done, priority=0):
        self.submitted += 1
        handle = object()
        self.held.append((handle, partial(done, Result(AttendOutput(inp.x * 2, None), 0.0, 0.0, 1, 1))))
        return handle

    def cancel(self, handle, reason="disconnect"):
        self.cancelled.append((handle, reason))


async def test_a_front_end_that_is_gone_has_its_pending_requests_cancelled_when_an_answer_cannot_reach_it(tmp_path):
    address = f"ipc://{tmp_path}/engine.sock"
    engine = Engine(Settings(), address)
    batcher = engine.batcher = HoldAll()
    engine.bind()
    serving = asyncio.create_task(engine.serve())
    ctx = zmq.Context()
    dealer = ctx.socket(zmq.DEALER)
    dealer.connect(address)
    try:
        items = [(rid, AttendInput(np.full((1, 2, 4), float(rid), np.float32)), 1e12, None, 0) for rid in range(3)]
        dealer.send_multipart(encode_requests(items))
        deadline = time.monotonic() + 5
        while len(batcher.held) < 3 and time.monotonic() < deadline:
            await asyncio.sleep(0.005)
        assert len(batcher.held) == 3
        dealer.close(linger=0)  # the front end goes while its requests wait
        await asyncio.sleep(0.1)
        engine._sock.getsockopt(zmq.EVENTS)  # the ROUTER takes in the disconnect
        batcher.held[0][1]()  # the first answer cannot reach it: EHOSTUNREACH
        await asyncio.sleep(0.05)
        assert sorted(map(id, (h for h, _ in batcher.cancelled))) == sorted(id(h) for h, _ in batcher.held[1:])
        assert {reason for _, reason in batcher.cancelled} == {"disconnect"}
        assert engine._pending == {} and engine._backlogs == {}
    finally:
        engine._stop.set()
        await asyncio.wait_for(serving, 5)
        ctx.destroy(linger=0)
        engine.close()

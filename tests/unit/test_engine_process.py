"""The model process's connection loop (service/engine/process.py Engine.serve) with a fake batcher: every message
is read and answered, to its own front end, when arrivals, heartbeats and answers interleave; answers wait for a
front end that does not read; a front end that goes is known at once."""

from __future__ import annotations

import asyncio
from functools import partial

import numpy as np

from service import channel
from service.engine.process import Engine
from service.messages import (
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
from tests.waiting import until


class FrontEnd:
    """A raw front end: a connection to the engine, whose messages (decoded header, frames) land in ``got``."""

    def __init__(self) -> None:
        self.got: list[tuple[object, list]] = []
        self.conn: channel.Connection | None = None
        self.lost = False

    async def connect(self, address: str) -> FrontEnd:
        self.conn = await channel.connect(address, self._message, self._lost, 5)
        return self

    def _message(self, frames: list) -> None:
        self.got.append((decode(frames[0]), [bytes(f) for f in frames[1:]]))

    def _lost(self, exc) -> None:
        self.lost = True

    def send(self, frames: list) -> None:
        assert self.conn.send(frames)

    def outcomes(self):
        for msg, frames in self.got:
            if not isinstance(msg, Heartbeat):
                yield from decode_outcomes(msg, frames)


def request(rid: int, value: float, shape=(1, 2, 4), priority: int = 0) -> list:
    return encode_requests([(rid, AttendInput(np.full(shape, value, np.float32)), 1e12, None, priority)])


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
    fronts = [await FrontEnd().connect(address) for _ in range(3)]
    try:
        values: dict[tuple[int, int], float] = {}
        rid = 0
        for burst in range(60):  # bursts of messages, answers flowing back meanwhile
            for i, f in enumerate(fronts):
                for _ in range(3 + burst % 3):
                    items = []
                    for _ in range(1 + rid % 3):
                        rid += 1
                        values[(i, rid)] = float(rid)
                        items.append((rid, AttendInput(np.full((1, 2, 4), float(rid), np.float32)), 1e12, None, 0))
                    f.send(encode_requests(items))
                if burst % 7 == 0:
                    f.send(encode(Ping()))
            await asyncio.sleep(0 if burst % 2 else 0.001)
        fronts[0].send(request(0, 0.0, priority=9))

        def answered() -> int:
            return sum(1 for f in fronts for o in f.outcomes() if o.error is None)

        await until(lambda: answered() == len(values) and any(o.error for o in fronts[0].outcomes()), 10)
        for i, f in enumerate(fronts):
            for o in f.outcomes():
                if o.error is None:
                    np.testing.assert_array_equal(
                        o.output.output, np.full((1, 2, 4), 2 * values[(i, o.id)], np.float32)
                    )
        refused = [o.message for f in fronts for o in f.outcomes() if o.error is not None]
        assert refused == ["ValueError: priority 9 is out of range 0..1"]  # answered at once, typed
        beats = [sum(isinstance(m, Heartbeat) for m, _ in f.got) for f in fronts]
        assert beats == [9, 9, 9]  # every ping answered, to its own front end
        assert engine._pending == {}  # every answered request forgotten
    finally:
        engine._stop.set()
        await asyncio.wait_for(serving, 5)
        for f in fronts:
            f.conn.close()
        engine.close()


async def test_messages_sent_before_the_engine_serves_are_all_read(tmp_path):
    """Front ends may connect as soon as the socket is bound (``bind``), before ``serve`` runs: what they sent
    meanwhile (many messages that send nothing back, then a ping) is read, and the ping answered."""
    address = f"ipc://{tmp_path}/engine.sock"
    engine = Engine(Settings(), address)
    engine.batcher = AnswerNextTurn()
    engine.bind()
    front = await FrontEnd().connect(address)
    serving = None
    try:
        for i in range(200):  # queued before the engine reads at all
            front.send(encode(Cancel([i])))
        front.send(encode(Ping()))
        await asyncio.sleep(0.05)
        assert front.got == []
        serving = asyncio.create_task(engine.serve())
        await until(lambda: front.got)
        assert [type(m) for m, _ in front.got] == [Heartbeat]
    finally:
        engine._stop.set()
        if serving is not None:
            await asyncio.wait_for(serving, 5)
        front.conn.close()
        engine.close()


async def test_every_answer_reaches_a_front_end_that_does_not_read_for_a_while_in_order(tmp_path):
    """A front end whose loop is busy reads nothing for a while: the answers fill the kernel's buffers, then wait in
    its connection's buffer in the model process (where a zmq ROUTER at its high-water mark once dropped them in
    silence), and all arrive, in order, once it reads again."""
    address = f"ipc://{tmp_path}/engine.sock"
    engine = Engine(Settings(), address)
    engine.batcher = AnswerNextTurn()
    engine.bind()
    serving = asyncio.create_task(engine.serve())
    front = await FrontEnd().connect(address)
    n, row = 200, 1 << 14  # 64 KiB answers: 12.5 MiB, more than the kernel's socket buffers hold between the two
    try:
        front.conn.transport.pause_reading()  # busy: reads nothing
        for rid in range(n):  # one message each
            front.send(request(rid, float(rid), (1, 1, row)))
        await until(lambda: engine.batcher.submitted == n)
        (conn,) = engine._peers.values()
        await until(lambda: conn.buffered() > 0)  # the kernel's buffers are full: the rest waits here
        await asyncio.sleep(0.1)
        assert front.got == []
        front.conn.transport.resume_reading()
        await until(lambda: sum(1 for _ in front.outcomes()) == n, 10)  # (several may share a message)
        got = []
        for o in front.outcomes():
            assert o.error is None, o.message
            np.testing.assert_array_equal(o.output.output, np.full((1, 1, row), 2.0 * o.id, np.float32))
            got.append(o.id)
        assert got == list(range(n)), "answers lost or out of order"
        assert conn.buffered() == 0 and engine._pending == {}
    finally:
        engine._stop.set()
        await asyncio.wait_for(serving, 5)
        front.conn.close()
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


async def test_a_front_end_that_is_gone_has_its_pending_requests_cancelled_at_once(tmp_path):
    """Its connection ends: the model process knows at once (no answer needs to fail first), cancels its requests
    still pending in the batcher, and a late answer to it goes nowhere, quietly."""
    address = f"ipc://{tmp_path}/engine.sock"
    engine = Engine(Settings(), address)
    batcher = engine.batcher = HoldAll()
    engine.bind()
    serving = asyncio.create_task(engine.serve())
    front = await FrontEnd().connect(address)
    try:
        items = [(rid, AttendInput(np.full((1, 2, 4), float(rid), np.float32)), 1e12, None, 0) for rid in range(3)]
        front.send(encode_requests(items))
        await until(lambda: len(batcher.held) == 3)
        front.conn.close()  # the front end goes while its requests wait
        await until(lambda: len(batcher.cancelled) == 3, 1.0)
        assert sorted(map(id, (h for h, _ in batcher.cancelled))) == sorted(id(h) for h, _ in batcher.held)
        assert {reason for _, reason in batcher.cancelled} == {"disconnect"}
        assert engine._pending == {} and engine._peers == {}
        batcher.held[0][1]()  # an answer computed anyway: nobody to send it to
        await asyncio.sleep(0.05)
        assert engine._replies == {}
    finally:
        engine._stop.set()
        await asyncio.wait_for(serving, 5)
        engine.close()


async def test_a_front_end_that_flushes_reads_every_batch_the_model_process_observed_before(tmp_path):
    """The model process keeps its metrics (EngineMetrics) and writes them when a ping comes, before the heartbeat
    answers it: MPClient.flush_statistics returns with them written, whatever the front end's own pings."""
    from service.engine.client import MPClient
    from service.messages import BatchStats
    from service.metrics import EngineMetrics

    address = f"ipc://{tmp_path}/engine.sock"
    engine = Engine(Settings(), address)
    engine.batcher = AnswerNextTurn()
    engine.metrics = EngineMetrics()
    engine.info = {"config": {"num_heads": 2, "emb_size": 8, "head_size": 4, "max_seq_len": 4}, "model_info": {}}
    engine.bind()
    serving = asyncio.create_task(engine.serve())
    client = MPClient(address)
    await client.start(timeout_s=5)
    try:
        value = engine.metrics.registry.get_sample_value
        for n in (3, 5):
            stats = BatchStats(sequences=n, padded_tokens=8 * n, real_tokens=8 * n, compute_s=0.002)
            engine.metrics.batch_done(n, stats, [0.001] * n)
        engine.metrics.dropped("deadline")
        engine.metrics.queue_changed(4, 32)
        assert value("mha_batch_size_requests_count") == 0.0  # kept, not written
        await client.flush_statistics(timeout_s=5)
        assert value("mha_batch_size_requests_count") == 2.0
        assert value("mha_batch_size_requests_sum") == 8.0
        assert value("mha_requests_dropped_total", {"reason": "deadline"}) == 1.0
        assert value("mha_queue_depth_requests") == 4.0
        assert value("mha_tokens_total", {"kind": "real"}) == 64.0
    finally:
        await client.stop()
        engine._stop.set()
        await asyncio.wait_for(serving, 5)
        engine.close()

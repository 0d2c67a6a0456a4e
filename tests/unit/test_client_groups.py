"""A front end's plain requests of one turn cross to the model process as one (service/engine/client.py's
``_grouped``): each member gets its own rows of the answer; limits, deadlines, priorities and what may not be merged
keep requests apart; a failure that may be one member's is retried member by member; a member that leaves does not
cancel the others, and the merged request is cancelled once all have left. Served by a real model process's socket
loop (``Engine``) over a stand-in batcher, in one event loop."""

from __future__ import annotations

import asyncio
import contextlib
import time

import numpy as np
import pytest

from service import messages, shm
from service.engine import client as client_mod
from service.engine.batcher import Batcher, BatchLimits
from service.engine.client import MPClient
from service.messages import (
    AttendInput,
    AttendOutput,
    BatcherObserver,
    DeadlineExceeded,
    NumericOverflow,
    Overloaded,
    Result,
    ShuttingDown,
)
from tests.fakes import FakeRunner, StubBatcher, serving_engine
from tests.waiting import until

pytestmark = pytest.mark.unit

LIMITS = (32, 32768)  # (sequences, tokens): the defaults of max_batch_size and max_batch_tokens


class Doubler(StubBatcher):
    """A batcher that answers x * 2 on the next turn and keeps what it was given. A request whose x holds NaN gets
    NumericOverflow (a member's own failure); ``hold`` answers nothing; ``refuse`` is raised at submit; with ``room``
    set, it takes that many requests (a merged one counts as its number) and refuses the rest, as a full queue does."""

    def __init__(self) -> None:
        super().__init__()
        self.submitted: list[AttendInput] = []
        self.hold = False
        self.refuse: Exception | None = None
        self.room: int | None = None

    def submit(self, inp, *, deadline, done, priority=0):
        if self.refuse is not None:
            raise self.refuse
        if self.room is not None:
            if inp.requests > self.room:
                raise Overloaded(f"the queue is full: room for {self.room}, not {inp.requests}", 0.5)
            self.room -= inp.requests
        self.submitted.append(inp)
        if self.hold:
            return object()
        if np.isnan(inp.x).any():
            res: object = NumericOverflow("the output holds NaN or Inf")
        else:
            res = Result(AttendOutput(inp.x * 2, None), 0.0, 0.0, 1, inp.batch)
        asyncio.get_running_loop().call_soon(done, res)
        return object()


@contextlib.asynccontextmanager
async def served(tmp_path, monkeypatch, group_limits=LIMITS):
    async with serving_engine(tmp_path, monkeypatch, Doubler()) as engine:
        client = MPClient(engine.address, group_limits=group_limits)
        try:
            await client.start(timeout_s=10)
            assert client._inputs is not None
            yield engine.batcher, client
        finally:
            await client.stop()


def xs(n: int, rows: int = 1, seed: int = 0) -> list[np.ndarray]:
    rng = np.random.default_rng(seed)
    return [rng.standard_normal((rows, 16, 64)).astype(np.float32) for _ in range(n)]


async def ask(client: MPClient, inputs: list[AttendInput], deadlines: list[float] | None = None, priority: int = 0):
    """All in one turn of the loop (one message), as a burst of requests reaches a front end."""
    deadlines = deadlines or [time.monotonic() + 10] * len(inputs)
    calls = [client.infer(i, deadline=d, priority=priority) for i, d in zip(inputs, deadlines, strict=True)]
    return await asyncio.gather(*calls, return_exceptions=True)


async def test_a_turns_plain_requests_cross_as_one_and_each_gets_its_own_rows(tmp_path, monkeypatch):
    async with served(tmp_path, monkeypatch) as (batcher, client):
        plain = xs(5) + xs(1, rows=3, seed=1)
        weighted = AttendInput(xs(1, seed=2)[0], need_weights=True)  # not merged: its own weights come back
        results = await ask(client, [AttendInput(x) for x in plain] + [weighted])
        merged, alone = batcher.submitted
        assert merged.requests == 6 and merged.x.shape == (8, 16, 64)
        assert np.array_equal(merged.x, np.concatenate(plain))  # in order, each once
        assert alone.requests == 1 and alone.need_weights
        for x, r in zip(plain, results[:-1], strict=True):
            assert np.array_equal(r.output.output, x * 2) and r.output.weights is None
        assert np.array_equal(results[-1].output.output, weighted.x * 2)
        assert client._inputs.used == 0 and not client._groups and not client._group_of  # its slot is back
        del results, r
        await until(lambda: bool(client._freed))  # the answer's slot, lent to 6 views, goes back once


async def test_limits_deadlines_priorities_and_dtypes_keep_requests_apart(tmp_path, monkeypatch):
    async with served(tmp_path, monkeypatch, group_limits=(4, 48)) as (batcher, client):
        await ask(client, [AttendInput(x) for x in xs(6)])  # 4 sequences at most
        assert [i.requests for i in batcher.submitted] == [3, 3]  # 48 tokens at most: 3 of T=16
        batcher.submitted.clear()
        now = time.monotonic()
        await ask(client, [AttendInput(x) for x in xs(2)], [now + 5, now + 6])  # deadlines a second apart
        assert [i.requests for i in batcher.submitted] == [1, 1]
        batcher.submitted.clear()
        x16 = [x.astype(np.float16) for x in xs(2)]
        await ask(
            client, [AttendInput(x, wire_dtype="float16", out_dtype="float16") for x in x16] + [AttendInput(xs(1)[0])]
        )
        assert sorted(i.requests for i in batcher.submitted) == [1, 2]
    async with served(tmp_path, monkeypatch, group_limits=None) as (batcher, client):
        await ask(client, [AttendInput(x) for x in xs(3)])  # no limits given: none merged
        assert [i.requests for i in batcher.submitted] == [1, 1, 1]


async def test_a_members_numeric_overflow_is_its_own_the_others_get_their_rows(tmp_path, monkeypatch):
    async with served(tmp_path, monkeypatch) as (batcher, client):
        plain = xs(4)
        plain[2][0, 3, 5] = np.nan
        results = await ask(client, [AttendInput(x) for x in plain])
        assert [i.requests for i in batcher.submitted] == [4, 1, 1, 1, 1]  # merged, then sent again one by one
        assert isinstance(results[2], NumericOverflow)
        for i in (0, 1, 3):
            assert np.array_equal(results[i].output.output, plain[i] * 2)
        assert client._inputs.used == 0 and not client._solo


async def test_a_refusal_of_the_merged_request_is_every_members(tmp_path, monkeypatch):
    async with served(tmp_path, monkeypatch) as (batcher, client):
        batcher.refuse = ShuttingDown("the server is shutting down")
        results = await ask(client, [AttendInput(x) for x in xs(3)])
        assert all(isinstance(r, ShuttingDown) for r in results), results
        assert len({id(r) for r in results}) == 3  # each its own exception
        assert batcher.submitted == [] and client._inputs.used == 0 and not client._groups


async def test_a_merged_request_refused_for_a_full_queue_is_admitted_member_by_member(tmp_path, monkeypatch):
    """Room for 2 in the queue: the merged request of 3 is refused, its members are sent again one by one, the
    first 2 are computed and only the third gets 429, as without merging."""
    async with served(tmp_path, monkeypatch) as (batcher, client):
        batcher.room = 2
        plain = xs(3)
        results = await ask(client, [AttendInput(x) for x in plain])
        assert [i.requests for i in batcher.submitted] == [1, 1]
        for x, r in zip(plain[:2], results[:2], strict=True):
            assert np.array_equal(r.output.output, x * 2)
        assert isinstance(results[2], Overloaded) and results[2].retry_after_s == 0.5
        assert "room for 0, not 1" in str(results[2])
        assert client._inputs.used == 0 and not client._groups and not client._solo


async def test_a_member_that_leaves_leaves_the_others_and_the_last_cancels_it(tmp_path, monkeypatch):
    async with served(tmp_path, monkeypatch) as (batcher, client):
        batcher.hold = True
        tasks = [asyncio.create_task(client.infer(AttendInput(x), deadline=time.monotonic() + 30)) for x in xs(3)]
        await until(lambda: len(batcher.submitted) == 1)
        assert batcher.submitted[0].requests == 3
        used = client._inputs.used
        assert used >= 3 * 16 * 64 * 4
        for t in tasks[:2]:
            t.cancel()
        await asyncio.gather(*tasks[:2], return_exceptions=True)
        await asyncio.sleep(0.05)
        assert batcher.cancelled == 0 and client._inputs.used == used  # one still waits: computed for it
        tasks[2].cancel()
        await asyncio.gather(tasks[2], return_exceptions=True)
        await until(lambda: batcher.cancelled == 1)  # the last one gone: the merged request is cancelled
        assert client._inputs.used == 0 and not client._groups and not client._group_of


async def test_a_member_whose_own_deadline_passed_while_it_computed_gets_504(tmp_path, monkeypatch):
    """The merged request carries its members' latest deadline; one whose own deadline passed before the answer
    gets DeadlineExceeded, as the model process answers a request that finishes late."""
    monkeypatch.setattr(client_mod, "GROUP_DEADLINE_SPREAD_S", 60.0)
    async with served(tmp_path, monkeypatch) as (batcher, client):
        batcher.hold = True
        now = time.monotonic()
        soon, later = xs(2)
        tasks = [
            asyncio.create_task(client.infer(AttendInput(soon), deadline=now + 0.05)),
            asyncio.create_task(client.infer(AttendInput(later), deadline=now + 30)),
        ]
        await until(lambda: len(batcher.submitted) == 1)
        assert batcher.submitted[0].requests == 2
        await asyncio.sleep(max(0.0, now + 0.06 - time.monotonic()))
        # the answer to the merged request, by hand: its id is the one after its members'
        (gid,) = client._groups
        merged = batcher.submitted[0].x * 2
        engine_writer = messages.OutcomesWriter(None)
        engine_writer.answer(gid, AttendOutput(merged, None), 0.0, 0.0, 2, 2)
        client._handle([memoryview(f) if not isinstance(f, np.ndarray) else f for f in engine_writer.frames()])
        first, second = await asyncio.gather(*tasks, return_exceptions=True)
        assert isinstance(first, DeadlineExceeded), first
        assert np.array_equal(second.output.output, later * 2)


async def test_a_member_still_waiting_at_its_own_deadline_gets_504_then_not_at_the_groups(tmp_path, monkeypatch):
    """The model process knows only the merged request's deadline (its members' latest): a member whose own passes
    while it waits is answered DeadlineExceeded by the front end's sweep at that deadline, the others wait on, and
    the merged request is cancelled once the last has left."""
    monkeypatch.setattr(client_mod, "GROUP_DEADLINE_SPREAD_S", 60.0)
    async with served(tmp_path, monkeypatch) as (batcher, client):
        batcher.hold = True  # queued for ever: no answer comes
        now = time.monotonic()
        soon, later = xs(2)
        first = asyncio.create_task(client.infer(AttendInput(soon), deadline=now + 0.05))
        second = asyncio.create_task(client.infer(AttendInput(later), deadline=now + 30))
        await until(lambda: len(batcher.submitted) == 1)
        assert batcher.submitted[0].requests == 2
        with pytest.raises(DeadlineExceeded, match="before its answer came"):
            await first
        took = time.monotonic() - now
        assert 0.05 <= took < 0.5, took  # at its own deadline, not a second later (its wait's give-up) or at 30 s
        await asyncio.sleep(0.05)
        assert not second.done() and batcher.cancelled == 0  # the other still waits: nothing is cancelled
        second.cancel()
        await asyncio.gather(second, return_exceptions=True)
        await until(lambda: batcher.cancelled == 1)
        assert client._inputs.used == 0 and not client._groups and not client._group_of


async def test_the_batcher_counts_a_merged_request_as_its_number():
    """mha_batch_size_requests, the queue waits and each Result's batch_requests count the requests a merged one
    stands for, not the one that crossed."""

    class Obs(BatcherObserver):
        def __init__(self) -> None:
            self.batches: list[tuple[int, int]] = []

        def batch_done(self, requests, stats, queue_waits_s):
            self.batches.append((requests, len(queue_waits_s)))

    obs = Obs()
    b = Batcher(FakeRunner(), BatchLimits(), obs)
    await b.start()
    try:
        x = np.ones((3, 4, 2), np.float32)
        res = await b.infer(AttendInput(x, requests=3), deadline=time.monotonic() + 10)
        assert res.batch_requests == 3 and obs.batches == [(3, 3)]
        res = await b.infer(AttendInput(x[:1]), deadline=time.monotonic() + 10)
        assert res.batch_requests == 1 and obs.batches[-1] == (1, 1)
    finally:
        await b.stop()


def test_rows_cross_as_their_concatenation_through_the_arena_or_a_frame():
    arena = shm.Arena(1 << 20)
    try:
        parts = messages.Rows(np.full((1, 128, 512), float(i), np.float32) for i in range(3))  # 256 KiB each
        for target in (arena, None):
            frames = messages.encode_requests([(7, AttendInput(parts, requests=3), 1.0, None, 0)], target)
            msg = messages.decode(frames[0])
            tail = None if target is None else shm.Mapped(arena.name).tail
            ((rid, got, *_),) = messages.decode_requests(msg, [memoryview(f) for f in frames[1:]], tail)
            assert rid == 7 and got.requests == 3 and np.array_equal(got.x, np.concatenate(parts))
            assert (msg.items[0].x.frame == messages.ARENA) == (target is not None)
        assert arena.used == 3 * (1 << 18)
    finally:
        arena.close()


async def test_the_batchers_queue_counts_and_bounds_a_merged_request_as_its_number():
    """The queue's depth (mha_queue_depth_requests, the heartbeat's) and its bound (max_queue_requests) count the
    requests a merged one stands for; an empty queue takes a merged request however many it stands for."""
    runner = FakeRunner()
    b = Batcher(runner, BatchLimits(max_queue_requests=4, max_batch_size=1))
    await b.start()
    try:
        runner.gate.clear()  # the first forward holds: what follows queues
        x = np.ones((1, 4, 2), np.float32)
        first = asyncio.create_task(b.infer(AttendInput(x), deadline=time.monotonic() + 10))
        await asyncio.to_thread(runner.started.wait, 2)
        big = asyncio.create_task(
            b.infer(AttendInput(np.ones((6, 4, 2), np.float32), requests=6), deadline=time.monotonic() + 10)
        )
        await until(lambda: b.queue_depth() == (6, 24))
        with pytest.raises(Overloaded, match="6 requests"):
            await b.infer(AttendInput(x), deadline=time.monotonic() + 10)
        runner.gate.set()
        res = await big
        await first
        assert res.batch_requests == 6 and b.queue_depth() == (0, 0)
    finally:
        runner.gate.set()
        await b.stop()

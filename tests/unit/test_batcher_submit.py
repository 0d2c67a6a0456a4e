"""The batcher's callback path (``submit``/``cancel``, the model process's): ``done`` is called exactly once
per outcome, never for a request refused at submit or cancelled, and a slot is released however it ends."""

from __future__ import annotations

import asyncio
import threading
import time

import numpy as np
import pytest

from service.engine.batcher import SWEEP_S, Batcher, BatchLimits
from service.messages import (
    WATCH_AFTER_S,
    AttendInput,
    AttendOutput,
    BatcherObserver,
    BatchStats,
    DeadlineExceeded,
    NumericOverflow,
    Overloaded,
    RequestTooLarge,
    Result,
    ShuttingDown,
)
from tests.fakes import FakeRunner


def inp(T=4, B=1, value=1.0) -> AttendInput:
    return AttendInput(np.full((B, T, 2), value, np.float32))


def far() -> float:
    return time.monotonic() + 30


class Drops(BatcherObserver):
    def __init__(self) -> None:
        self.drops: list[str] = []

    def dropped(self, reason: str) -> None:
        self.drops.append(reason)


class Answers:
    """A ``done`` that records every call: (value, whether the runner was still held then)."""

    def __init__(self, runner: FakeRunner | None = None) -> None:
        self.calls: list[Result | BaseException] = []
        self.held: list[bool] = []
        self._runner = runner

    def __call__(self, value: Result | BaseException) -> None:
        self.calls.append(value)
        self.held.append(self._runner is not None and not self._runner.gate.is_set())

    async def wait(self, n: int = 1, timeout: float = 2.0) -> None:
        end = time.monotonic() + timeout
        while len(self.calls) < n and time.monotonic() < end:
            await asyncio.sleep(0.002)


@pytest.fixture
async def make():
    started = []

    async def _make(runner=None, **limits):
        runner = runner or FakeRunner()
        obs = Drops()
        b = Batcher(runner, BatchLimits(**limits), obs)
        await b.start()
        started.append((b, runner))
        return b, runner, obs

    yield _make
    for b, runner in started:
        if isinstance(runner, FakeRunner):
            runner.gate.set()
        await b.stop()


async def _hold(b: Batcher, runner: FakeRunner) -> Answers:
    """Hold the model with one computing request (x = 1); returns its ``done``."""
    runner.gate.clear()
    runner.started.clear()
    first = Answers(runner)
    b.submit(inp(), deadline=far(), done=first)
    await asyncio.to_thread(runner.started.wait, 2)
    return first


async def test_a_result_is_answered_once_with_its_own_values(make):
    b, _, obs = await make()
    done = [Answers() for _ in range(3)]
    for i, d in enumerate(done):
        b.submit(inp(value=float(i + 1)), deadline=far(), done=d)
    for d in done:
        await d.wait()
    await asyncio.sleep(3 * SWEEP_S)  # a sweep after the answer must not answer again
    for i, d in enumerate(done):
        assert len(d.calls) == 1
        res = d.calls[0]
        assert isinstance(res, Result)
        np.testing.assert_array_equal(res.output.output, np.full((1, 4, 2), 2.0 * (i + 1)))
    assert [r.batch_requests for d in done for r in d.calls] == [3, 3, 3]  # submitted in one turn: one batch
    assert obs.drops == [] and b.queue_depth() == (0, 0)


async def test_refused_at_submit_raises_and_never_calls_done(make):
    b, runner, _ = await make(max_queue_requests=1, max_batch_tokens=16)
    first = await _hold(b, runner)
    queued = Answers(runner)
    b.submit(inp(value=2.0), deadline=far(), done=queued)
    refused = Answers()
    with pytest.raises(Overloaded, match=r"queue is full \(1 requests, 4 tokens queued; limits 1 requests"):
        b.submit(inp(), deadline=far(), done=refused)
    with pytest.raises(RequestTooLarge, match="B=1 x T=20 = 20 tokens, more than max_batch_tokens 16"):
        b.submit(inp(T=20), deadline=far(), done=refused)
    with pytest.raises(ValueError, match=r"priority 2 is out of range 0\.\.1"):
        b.submit(inp(), deadline=far(), done=refused, priority=2)
    assert b.queue_depth() == (1, 4)
    runner.gate.set()
    await queued.wait()
    assert [float(r.output.output[0, 0, 0]) for r in (*first.calls, *queued.calls)] == [2.0, 4.0]
    await b.stop()
    with pytest.raises(ShuttingDown, match="the batcher is not running"):
        b.submit(inp(), deadline=far(), done=refused)
    assert refused.calls == []


async def test_a_deadline_while_queued_releases_the_slot_within_the_sweep_while_a_batch_computes(make):
    b, runner, obs = await make(max_queue_requests=2)
    first = await _hold(b, runner)
    doomed = Answers(runner)
    t0 = time.monotonic()
    b.submit(inp(value=7.0), deadline=t0 + 0.03, done=doomed)
    kept = Answers(runner)
    b.submit(inp(value=3.0), deadline=far(), done=kept)
    assert b.queue_depth() == (2, 8)
    await doomed.wait()
    assert len(doomed.calls) == 1 and doomed.held == [True]  # answered while the long batch still computes
    assert isinstance(doomed.calls[0], DeadlineExceeded)
    assert str(doomed.calls[0]) == "the request's deadline passed while it was queued"
    assert b.queue_depth() == (1, 4)  # its slot is free already: not only when the next batch forms
    assert obs.drops == ["deadline"]
    runner.gate.set()
    await kept.wait()
    await first.wait()
    assert len(doomed.calls) == 1 and len(kept.calls) == 1
    assert runner.flat == [1.0, 3.0]  # never computed


async def test_a_deadline_while_computing_answers_late_once(make):
    b, runner, obs = await make()
    runner.gate.clear()
    slow = Answers(runner)
    b.submit(inp(value=5.0), deadline=time.monotonic() + 0.03, done=slow)
    await slow.wait()
    assert slow.held == [True]  # at the deadline, not when the forward ends
    assert isinstance(slow.calls[0], DeadlineExceeded)
    assert str(slow.calls[0]) == "the request's deadline passed while it was computing"
    runner.gate.set()
    after = Answers()
    b.submit(inp(value=2.0), deadline=far(), done=after)
    await after.wait()
    assert len(slow.calls) == 1  # its result, when it came, was not answered again
    assert obs.drops == ["late"]
    assert runner.flat == [5.0, 2.0]


async def test_a_result_that_comes_after_the_deadline_is_late(make, monkeypatch):
    monkeypatch.setattr("service.engine.batcher.SWEEP_S", 30.0)  # no sweep before the result: the result's own check
    b, runner, obs = await make(runner=FakeRunner(delay=0.05))
    done = Answers()
    b.submit(inp(), deadline=time.monotonic() + 0.01, done=done)
    await done.wait()
    assert runner.flat == [1.0]  # it computed: the answer came with its result
    assert len(done.calls) == 1 and isinstance(done.calls[0], DeadlineExceeded)
    assert str(done.calls[0]) == "the request's deadline passed while it was computing"
    assert obs.drops == ["late"]


async def test_cancel_while_queued_is_never_computed_and_frees_the_slot_at_once(make):
    b, runner, obs = await make(max_queue_requests=2)
    first = await _hold(b, runner)
    leaving = Answers(runner)
    handle = b.submit(inp(value=9.0), deadline=far(), done=leaving)
    b.submit(inp(value=4.0), deadline=far(), done=Answers())
    assert b.queue_depth() == (2, 8)
    b.cancel(handle)
    assert b.queue_depth() == (1, 4)  # at once, while the batch still computes
    assert obs.drops == ["disconnect"]
    again = Answers()
    b.submit(inp(value=6.0), deadline=far(), done=again)  # the freed slot takes a new request
    b.cancel(handle)  # a second cancel is a no-op
    runner.gate.set()
    await again.wait()
    await first.wait()
    assert leaving.calls == []
    assert obs.drops == ["disconnect"]
    assert sorted(runner.flat) == [1.0, 4.0, 6.0]


async def test_cancel_while_computing_goes_unanswered(make):
    b, runner, obs = await make()
    runner.gate.clear()
    runner.started.clear()
    leaving = Answers(runner)
    handle = b.submit(inp(value=8.0), deadline=far(), done=leaving)
    await asyncio.to_thread(runner.started.wait, 2)
    b.cancel(handle, "cancelled")
    runner.gate.set()
    after = Answers()
    b.submit(inp(value=2.0), deadline=far(), done=after)
    await after.wait()
    assert leaving.calls == []  # it computed, but nobody is answered
    assert runner.flat == [8.0, 2.0]
    assert obs.drops == ["cancelled"]
    assert float(after.calls[0].output.output[0, 0, 0]) == 4.0


async def test_one_requests_error_fails_it_alone(make):
    def run(items):
        outs = [
            NumericOverflow("the output overflowed") if it.x[0, 0, 0] == 13.0 else AttendOutput(it.x * 2, None)
            for it in items
        ]
        return outs, BatchStats(len(items))

    b, _, obs = await make(runner=run)
    done = {v: Answers() for v in (1.0, 13.0, 2.0)}
    for v, d in done.items():
        b.submit(inp(value=v), deadline=far(), done=d)
    for d in done.values():
        await d.wait()
    assert [len(d.calls) for d in done.values()] == [1, 1, 1]
    assert isinstance(done[13.0].calls[0], NumericOverflow) and str(done[13.0].calls[0]) == "the output overflowed"
    assert float(done[2.0].calls[0].output.output[0, 0, 0]) == 4.0
    assert obs.drops == []


class FailsTogether:
    """A runner whose batches of several fail (once ``release`` is set) and whose batches of one double x; it
    records the x[0,0,0] of every input of every call, retries included."""

    def __init__(self) -> None:
        self.calls: list[list[float]] = []
        self.started = threading.Event()
        self.release = threading.Event()

    def __call__(self, items):
        self.calls.append([float(it.x[0, 0, 0]) for it in items])
        if len(items) > 1:
            self.started.set()
            self.release.wait(5)
            raise RuntimeError("boom")
        return [AttendOutput(it.x * 2, None) for it in items], BatchStats(len(items))


async def test_a_failed_batch_retries_neither_a_cancelled_nor_an_expired_request(make, monkeypatch):
    monkeypatch.setattr("service.engine.batcher.SWEEP_S", 30.0)  # no sweep: the retry itself must see the deadline
    runner = FailsTogether()
    b, _, obs = await make(runner=runner)
    kept, leaving, expiring = Answers(), Answers(), Answers()
    b.submit(inp(value=1.0), deadline=far(), done=kept)
    handle = b.submit(inp(value=2.0), deadline=far(), done=leaving)
    b.submit(inp(value=3.0), deadline=time.monotonic() + 0.05, done=expiring)
    await asyncio.to_thread(runner.started.wait, 2)  # the three compute together
    b.cancel(handle, "cancelled")
    await asyncio.sleep(0.1)  # the third's deadline passes while its batch computes
    runner.release.set()  # the batch fails: its requests are retried one by one
    await kept.wait()
    await expiring.wait()
    assert runner.calls == [[1.0, 2.0, 3.0], [1.0]]  # only the request still waiting, still in time, is recomputed
    assert len(kept.calls) == 1 and float(kept.calls[0].output.output[0, 0, 0]) == 2.0
    assert leaving.calls == []
    assert len(expiring.calls) == 1 and isinstance(expiring.calls[0], DeadlineExceeded)
    assert str(expiring.calls[0]) == "the request's deadline passed while it was computing"
    assert obs.drops == ["cancelled", "late"]


async def test_stop_answers_queued_and_computing_requests_with_shutting_down_once(make):
    b, runner, _ = await make()
    first = await _hold(b, runner)
    queued = [Answers(runner) for _ in range(2)]
    for d in queued:
        b.submit(inp(), deadline=far(), done=d)
    await b.stop(grace_s=0.02)
    for d in (first, *queued):
        assert len(d.calls) == 1 and isinstance(d.calls[0], ShuttingDown)
        assert str(d.calls[0]) == "the server is shutting down before this request could finish"
    assert b.queue_depth() == (0, 0)
    runner.gate.set()
    await asyncio.sleep(0.05)  # the held forward ends in its thread: its results answer nobody again
    assert [len(d.calls) for d in (first, *queued)] == [1, 1, 1]


async def test_watch_is_called_once_only_for_a_request_still_waiting(make):
    b, runner, _ = await make()
    quick_watch: list[float] = []
    quick = Answers()
    b.submit(inp(), deadline=far(), done=quick, watch=lambda: quick_watch.append(time.monotonic()))
    await quick.wait()
    first = await _hold(b, runner)
    slow_watch: list[float] = []
    t0 = time.monotonic()
    b.submit(inp(), deadline=far(), done=Answers(), watch=lambda: slow_watch.append(time.monotonic()))
    for _ in range(200):
        await asyncio.sleep(0.005)
        if slow_watch:
            break
    await asyncio.sleep(3 * SWEEP_S)
    assert quick_watch == []  # answered before WATCH_AFTER_S
    assert len(slow_watch) == 1 and slow_watch[0] - t0 >= WATCH_AFTER_S
    runner.gate.set()
    await first.wait()


async def test_a_done_that_raises_does_not_stop_the_batcher(make):
    b, _, _ = await make()

    def broken(value):
        raise RuntimeError("caller bug")

    b.submit(inp(), deadline=far(), done=broken)
    ok = Answers()
    b.submit(inp(value=3.0), deadline=far(), done=ok)
    await ok.wait()
    assert float(ok.calls[0].output.output[0, 0, 0]) == 6.0


async def test_a_watch_that_raises_does_not_stop_the_sweep(make):
    b, runner, obs = await make()
    first = await _hold(b, runner)

    def broken_watch():
        raise RuntimeError("caller bug")

    b.submit(inp(value=2.0), deadline=far(), done=Answers(), watch=broken_watch)
    doomed = Answers(runner)
    b.submit(inp(value=3.0), deadline=time.monotonic() + WATCH_AFTER_S + 0.05, done=doomed)
    await doomed.wait()
    assert doomed.held == [True] and isinstance(doomed.calls[0], DeadlineExceeded)  # the sweep went on
    assert obs.drops == ["deadline"]
    runner.gate.set()
    await first.wait()

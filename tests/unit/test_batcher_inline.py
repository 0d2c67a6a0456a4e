"""The batcher runs a forward expected to be shorter than the hand-off to its thread on the event loop
(``inline_below_s``, MHA_FORWARD_INLINE_US), from the forwards timed so far; the others in the forward thread."""

from __future__ import annotations

import asyncio
import threading
import time

import numpy as np
import pytest

from service.engine.batcher import Batcher, BatchLimits
from service.messages import AttendInput, AttendOutput, BatchStats

pytestmark = pytest.mark.timeout(30)


class Recorder:
    """A runner that answers x * 2 and records the thread each forward ran in; ``slow`` sleeps that long in
    the next forward, ``hold`` blocks a forward of more than 16 tokens until it is set."""

    def __init__(self) -> None:
        self.threads: list[int] = []
        self.slow = 0.0
        self.hold: threading.Event | None = None

    def __call__(self, items: list[AttendInput]):
        self.threads.append(threading.get_ident())
        if self.hold is not None and sum(it.x.shape[0] * it.x.shape[1] for it in items) > 16:
            self.hold.wait(10)
        if self.slow:
            time.sleep(self.slow)
            self.slow = 0.0
        tokens = sum(it.x.shape[0] * it.x.shape[1] for it in items)
        return [AttendOutput(it.x * 2, None) for it in items], BatchStats(len(items), tokens, tokens)


def inp(value: float, T: int = 4, fault: str | None = None) -> AttendInput:
    return AttendInput(np.full((1, T, 2), value, np.float32), fault=fault)


def far() -> float:
    return time.monotonic() + 30


@pytest.fixture
async def batcher():
    made: list[Batcher] = []

    async def make(runner: Recorder, inline_below_s: float, depth: int = 1) -> Batcher:
        b = Batcher(runner, BatchLimits(), depth=depth, inline_below_s=inline_below_s)
        await b.start()
        made.append(b)
        return b

    yield make
    for b in made:
        await b.stop()


async def answer(b: Batcher, value: float, **kw) -> float:
    res = await b.infer(inp(value, **kw), deadline=far())
    np.testing.assert_array_equal(res.output.output, np.full(res.output.output.shape, 2 * value, np.float32))
    return value


async def test_a_quick_forward_runs_on_the_loop_once_one_was_timed(batcher):
    runner = Recorder()
    b = await batcher(runner, inline_below_s=0.05)
    loop_thread = threading.get_ident()
    for i in range(4):
        await answer(b, float(i))
    assert runner.threads[0] != loop_thread  # no estimate yet: the thread
    assert runner.threads[1:] == [loop_thread] * 3


async def test_with_no_bound_every_forward_runs_in_the_thread(batcher):
    runner = Recorder()
    b = await batcher(runner, inline_below_s=0.0)
    for i in range(4):
        await answer(b, float(i))
    assert threading.get_ident() not in runner.threads


async def test_a_forward_longer_than_the_bound_goes_back_to_the_thread(batcher):
    """The estimate follows the forwards: one that took long (a mispredicted batch) sends the next to the thread."""
    runner = Recorder()
    b = await batcher(runner, inline_below_s=0.005)
    loop_thread = threading.get_ident()
    await answer(b, 1.0)
    await answer(b, 2.0)
    assert runner.threads[1] == loop_thread
    runner.slow = 0.05  # ten times the bound, on the loop
    await answer(b, 3.0)
    await answer(b, 4.0)
    assert runner.threads[2] == loop_thread and runner.threads[3] != loop_thread


async def test_a_batch_with_an_injected_fault_runs_in_the_thread(batcher):
    runner = Recorder()
    b = await batcher(runner, inline_below_s=0.05)
    await answer(b, 1.0)
    await answer(b, 2.0, fault="stall:1")
    await answer(b, 3.0)
    loop_thread = threading.get_ident()
    assert runner.threads[1] != loop_thread and runner.threads[2] == loop_thread


async def test_no_forward_runs_on_the_loop_while_another_batch_computes(batcher):
    """With two batches in flight (a GPU's pipeline), a quick one beside a running one goes to the thread: the loop
    must not hold the first one's answer back."""
    runner = Recorder()
    b = await batcher(runner, inline_below_s=0.001, depth=2)
    await answer(b, 1.0)  # timed: 4 tokens take far under 1 ms
    runner.hold = threading.Event()
    long = asyncio.create_task(answer(b, 2.0, T=30_000))  # expected long (7,500 times the tokens): the thread
    while len(runner.threads) < 2:
        await asyncio.sleep(0.005)
    quick = asyncio.create_task(answer(b, 3.0))
    while len(runner.threads) < 3:
        await asyncio.sleep(0.005)
    assert await asyncio.wait_for(quick, 5) == 3.0  # answered while the long one still computes
    assert not long.done()
    runner.hold.set()
    assert await asyncio.wait_for(long, 5) == 2.0
    loop_thread = threading.get_ident()
    assert runner.threads[1] != loop_thread and runner.threads[2] != loop_thread


async def test_an_inline_batch_is_answered_in_the_turn_that_dispatches_it(batcher):
    """The dispatch is a callback of the loop's next turn, and an inline batch computes and is answered in it: no
    task, no second turn (each cost the model process a loop turn a batch)."""
    runner = Recorder()
    b = await batcher(runner, inline_below_s=0.05)
    await answer(b, 1.0)  # timed: the next ones are inline
    first_task = b._batch_task  # the first forward's, in the thread
    got: list = []
    for value in (2.0, 3.0):
        b.submit(inp(value), deadline=far(), done=got.append)
    assert got == []  # never from submit
    await asyncio.sleep(0)  # one turn: the dispatch
    assert [float(r.output.output[0, 0, 0]) for r in got] == [4.0, 6.0]
    assert [r.batch_requests for r in got] == [2, 2]  # one batch
    assert b._batch_task is first_task  # no task since


async def test_an_inline_batch_that_fails_is_retried_one_by_one_and_only_the_bad_request_errs(batcher):
    class Failing(Recorder):
        def __call__(self, items):
            if len(items) > 1 and any(float(it.x[0, 0, 0]) == 13.0 for it in items):
                self.threads.append(threading.get_ident())
                raise RuntimeError("boom in the batch")
            if float(items[0].x[0, 0, 0]) == 13.0:
                raise RuntimeError("boom in 13")
            return super().__call__(items)

    runner = Failing()
    b = await batcher(runner, inline_below_s=0.05)
    await answer(b, 1.0)
    got: list = []
    for value in (2.0, 13.0, 3.0):
        b.submit(inp(value), deadline=far(), done=got.append)
    while len(got) < 3:
        await asyncio.sleep(0.005)
    assert runner.threads[1] == threading.get_ident()  # the batch ran inline and failed there
    assert runner.threads[2:] and threading.get_ident() not in runner.threads[2:]  # the retries: in the thread
    errors = [str(r) for r in got if isinstance(r, BaseException)]
    assert errors == ["boom in 13"]  # only the bad request errs, with its own error
    assert sorted(float(r.output.output[0, 0, 0]) for r in got if not isinstance(r, BaseException)) == [4.0, 6.0]
    await answer(b, 4.0)  # and it serves on


async def test_a_dispatch_that_breaks_turns_readiness_off(batcher, caplog):
    runner = Recorder()
    b = await batcher(runner, inline_below_s=0.05)
    await answer(b, 1.0)
    assert b.running

    def broken() -> list:
        raise RuntimeError("a bug in the selection")

    b._select = broken
    got: list = []
    b.submit(inp(2.0), deadline=time.monotonic() + 0.05, done=got.append)
    await asyncio.sleep(0.01)
    assert not b.running  # /readyz says 503: the orchestrator restarts the replica
    assert "dispatch failed" in caplog.text and "a bug in the selection" in caplog.text
    while not got:  # the sweep still answers its deadline
        await asyncio.sleep(0.01)
    assert "deadline" in str(got[0])

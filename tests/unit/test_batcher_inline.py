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

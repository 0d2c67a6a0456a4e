"""Priority levels in the batcher: order, per-level bounds and retry-after, starvation bounded (oldest every K)."""

from __future__ import annotations

import asyncio
import time

import numpy as np
import pytest

from service.engine.batcher import Batcher, BatchLimits
from service.messages import AttendInput, BatcherObserver, Overloaded
from tests.fakes import FakeRunner as Runner  # its order/flat: x[0,0,0] marks the request

HIGH, LOW = 1.0, 2.0  # x's value marks the request's class in the runner's log


def inp(value: float, T: int = 4) -> AttendInput:
    return AttendInput(np.full((1, T, 2), value, np.float32))


def far() -> float:
    return time.monotonic() + 30


@pytest.fixture
async def make():
    started = []

    async def _make(runner=None, observer=None, **limits):
        runner = runner or Runner()
        b = Batcher(runner, BatchLimits(**limits), observer=observer)
        await b.start()
        started.append(b)
        return b, runner

    yield _make
    for b in started:
        await b.stop()


async def _block(b: Batcher, runner: Runner) -> asyncio.Task:
    """Hold the model busy with one request (x = 0) so that the next ones queue."""
    runner.gate.clear()
    blocker = asyncio.create_task(b.infer(inp(0.0), deadline=far(), priority=1))
    await asyncio.to_thread(runner.started.wait, 2)
    return blocker


async def test_higher_priority_is_batched_first_and_zero_means_the_default_level(make):
    b, runner = await make(priority_levels=3, max_batch_size=1)
    blocker = await _block(b, runner)
    sent = [(31.0, 3), (21.0, 2), (11.0, 1), (30.0, 0), (12.0, 1)]  # 0: the default level, the lowest (3)
    tasks = [asyncio.create_task(b.infer(inp(v), deadline=far(), priority=p)) for v, p in sent]
    await asyncio.sleep(0.02)
    assert b.queue_depth_by_level() == [(2, 8), (1, 4), (2, 8)]
    runner.gate.set()
    await asyncio.gather(blocker, *tasks)
    assert runner.flat == [0.0, 11.0, 12.0, 21.0, 31.0, 30.0]


async def test_default_priority_level_is_configurable(make):
    b, runner = await make(priority_levels=3, default_priority_level=2, max_batch_size=1)
    blocker = await _block(b, runner)
    sent = [(30.0, 3), (20.0, 0), (10.0, 1)]
    tasks = [asyncio.create_task(b.infer(inp(v), deadline=far(), priority=p)) for v, p in sent]
    await asyncio.sleep(0.02)
    runner.gate.set()
    await asyncio.gather(blocker, *tasks)
    assert runner.flat == [0.0, 10.0, 20.0, 30.0]


async def test_a_batch_fills_from_the_highest_level_first(make):
    b, runner = await make(priority_levels=2, max_batch_size=2)
    blocker = await _block(b, runner)
    sent = [(21.0, 2), (22.0, 2), (11.0, 1)]
    tasks = [asyncio.create_task(b.infer(inp(v), deadline=far(), priority=p)) for v, p in sent]
    await asyncio.sleep(0.02)
    runner.gate.set()
    await asyncio.gather(blocker, *tasks)
    assert runner.order == [[0.0], [11.0, 21.0], [22.0]]


async def test_each_level_has_its_own_bound_and_retry_after(make):
    b, runner = await make(priority_levels=2, max_queue_requests=2, max_queue_tokens=1000)
    blocker = await _block(b, runner)
    low = [asyncio.create_task(b.infer(inp(LOW), deadline=far(), priority=2)) for _ in range(2)]
    await asyncio.sleep(0.01)
    with pytest.raises(Overloaded, match=r"queue of priority level 2 is full \(2 requests, 8 tokens queued"):
        await b.infer(inp(LOW), deadline=far(), priority=2)
    # the low level is full, the high one still admits
    high = [asyncio.create_task(b.infer(inp(HIGH), deadline=far(), priority=1)) for _ in range(2)]
    await asyncio.sleep(0.01)
    assert b.queue_depth() == (4, 16)
    b._drain_tokens_per_s = 4.0  # the model drains 4 tokens/s: retry-after = tokens queued at and above / 4
    with pytest.raises(Overloaded, match="level 1 is full") as e1:
        await b.infer(inp(HIGH), deadline=far(), priority=1)
    with pytest.raises(Overloaded, match="level 2 is full") as e2:
        await b.infer(inp(LOW), deadline=far(), priority=2)
    assert (e1.value.retry_after_s, e2.value.retry_after_s) == (2, 4)
    # a cancelled request frees its level's slot at once
    low[0].cancel()
    await asyncio.sleep(0.01)
    again = asyncio.create_task(b.infer(inp(LOW), deadline=far(), priority=2))
    await asyncio.sleep(0.01)
    assert b.queue_depth_by_level() == [(2, 8), (2, 8)]
    runner.gate.set()
    await asyncio.gather(blocker, *high, low[1], again)
    assert runner.flat == [0.0, HIGH, HIGH, LOW, LOW]


async def test_priority_outside_the_levels_is_refused(make):
    b, _ = await make(priority_levels=2)
    for bad in (-1, 3):
        with pytest.raises(ValueError, match=rf"priority {bad} is out of range 0..2"):
            await b.infer(inp(HIGH), deadline=far(), priority=bad)
    with pytest.raises(ValueError, match=r"default_priority_level must be in 1\.\.2, got 3"):
        BatchLimits(priority_levels=2, default_priority_level=3)


async def test_level_depths_reach_the_observer(make):
    class Obs(BatcherObserver):
        def __init__(self) -> None:
            self.levels: dict[int, tuple[int, int]] = {}

        def level_queue_changed(self, level: int, requests: int, tokens: int) -> None:
            self.levels[level] = (requests, tokens)

    obs = Obs()
    b, runner = await make(observer=obs, priority_levels=2)
    blocker = await _block(b, runner)
    t = asyncio.create_task(b.infer(inp(LOW, T=5), deadline=far(), priority=2))
    await asyncio.sleep(0.01)
    assert obs.levels == {1: (0, 0), 2: (1, 5)}
    runner.gate.set()
    await asyncio.gather(blocker, t)
    assert obs.levels[2] == (0, 0)


async def _high_load(b: Batcher, stop: asyncio.Event, workers: int) -> None:
    """Closed-loop high-priority load: ``workers`` callers that resend as soon as they are answered."""

    async def worker() -> None:
        while not stop.is_set():
            await b.infer(inp(HIGH), deadline=far(), priority=1)

    await asyncio.gather(*(worker() for _ in range(workers)))


async def _low_under_load(b: Batcher, runner: Runner, *, workers: int, wait_s: float) -> tuple[int, bool]:
    """Send one low request under the load; (high requests computed after it was sent, whether it was served)."""
    stop = asyncio.Event()
    load = asyncio.create_task(_high_load(b, stop, workers))
    while len(runner.flat) < 5:  # the load is running and the high queue is non-empty
        await asyncio.sleep(0.005)
    seen = len(runner.flat)
    low = asyncio.create_task(b.infer(inp(LOW), deadline=far(), priority=2))
    done, _ = await asyncio.wait({low}, timeout=wait_s)
    stop.set()
    if low in done:
        await low
    else:
        low.cancel()
    await load
    after = runner.flat[seen:]
    served = LOW in after
    return (after.index(LOW) if served else len(after)), served


async def test_a_low_request_under_continuous_high_load_is_served_within_k_batches(make):
    # batches of one, K = 4: at the low request's arrival at most `workers` high requests are queued or
    # computing before it; normal batches take those (the oldest high first), then the low request is the
    # oldest queued and at most K batches later one takes it, however many high requests keep coming.
    k, workers = 4, 4
    b, runner = await make(Runner(delay=0.005), priority_levels=2, max_batch_size=1, priority_oldest_every=k)
    ahead, served = await _low_under_load(b, runner, workers=workers, wait_s=10)
    assert served
    assert 1 <= ahead <= workers + k, ahead


async def test_with_k_out_of_reach_the_high_load_starves_the_low_level(make):
    # the same load with K beyond the test's batches: strict priority, the low request waits
    b, runner = await make(Runner(delay=0.005), priority_levels=2, max_batch_size=1, priority_oldest_every=10**6)
    ahead, served = await _low_under_load(b, runner, workers=4, wait_s=0.5)
    assert not served and ahead >= 20


async def test_k_of_1_is_fifo_across_levels(make):
    b, runner = await make(priority_levels=2, max_batch_size=1, priority_oldest_every=1)
    blocker = await _block(b, runner)
    sent = [(21.0, 2), (11.0, 1), (22.0, 2)]
    tasks = [asyncio.create_task(b.infer(inp(v), deadline=far(), priority=p)) for v, p in sent]
    await asyncio.sleep(0.02)
    runner.gate.set()
    await asyncio.gather(blocker, *tasks)
    assert runner.flat == [0.0, 21.0, 11.0, 22.0]


def test_settings_check_the_default_level_at_start_up() -> None:
    from pydantic import ValidationError

    from service.settings import Settings

    with pytest.raises(ValidationError, match=r"default_priority_level \(3\) must be in 1..priority_levels \(2\)"):
        Settings(priority_levels=2, default_priority_level=3)
    with pytest.raises(ValidationError, match="priority_oldest_every"):
        Settings(priority_oldest_every=0)
    assert Settings(priority_levels=3).default_priority_level is None  # the lowest level, 3

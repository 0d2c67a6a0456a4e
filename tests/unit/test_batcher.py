"""The batcher with a fake runner: grouping, closing rules, deadlines, bounded queue, lifecycle."""

from __future__ import annotations

import asyncio
import threading
import time

import numpy as np
import pytest

from service.engine.batcher import Batcher, BatchLimits
from service.messages import (
    AttendInput,
    AttendOutput,
    BatcherObserver,
    BatchStats,
    ClientGone,
    DeadlineExceeded,
    Overloaded,
    RequestTooLarge,
    ShuttingDown,
)
from tests.fakes import FakeRunner


def inp(T=4, B=1, value=1.0, **kw) -> AttendInput:
    return AttendInput(np.full((B, T, 2), value, np.float32), **kw)


def far() -> float:
    return time.monotonic() + 30


@pytest.fixture
async def make():
    started = []

    async def _make(runner=None, **limits):
        runner = runner or FakeRunner()
        b = Batcher(runner, BatchLimits(**limits))
        await b.start()
        started.append(b)
        return b, runner

    yield _make
    for b in started:
        await b.stop()


async def test_idle_request_starts_at_once_and_returns_its_own_result(make):
    b, _ = await make(max_wait_ms=50)
    t0 = time.monotonic()
    res = await b.infer(inp(value=3.0), deadline=far())
    assert time.monotonic() - t0 < 0.04  # no batching timer on an idle model
    np.testing.assert_array_equal(res.output.output, np.full((1, 4, 2), 6.0))
    assert res.batch_requests == 1


async def test_requests_queued_behind_a_batch_share_the_next_one(make):
    b, runner = await make()
    runner.gate.clear()
    first = asyncio.create_task(b.infer(inp(value=0.0), deadline=far()))
    await asyncio.to_thread(runner.started.wait, 2)
    rest = [asyncio.create_task(b.infer(inp(value=float(i)), deadline=far())) for i in range(1, 6)]
    await asyncio.sleep(0.01)
    runner.gate.set()
    results = await asyncio.gather(first, *rest)
    assert [len(batch) for batch in runner.batches] == [1, 5]
    for i, r in enumerate(results):
        np.testing.assert_array_equal(r.output.output, np.full((1, 4, 2), 2.0 * i))  # each gets its own rows
    assert [r.batch_requests for r in results] == [1, 5, 5, 5, 5, 5]


async def test_batch_closes_at_max_batch_size_and_tokens(make):
    b, runner = await make(max_batch_size=4, max_batch_tokens=24)
    runner.gate.clear()
    first = asyncio.create_task(b.infer(inp(), deadline=far()))
    await asyncio.to_thread(runner.started.wait, 2)
    # 3 sequences each: max_batch_size 4 lets one request in at a time... use B=2, T=4: 8 tokens each
    rest = [asyncio.create_task(b.infer(inp(B=2, T=4), deadline=far())) for _ in range(5)]
    await asyncio.sleep(0.01)
    runner.gate.set()
    await asyncio.gather(first, *rest)
    sizes = [sum(it.batch for it in batch) for batch in runner.batches[1:]]
    tokens = [sum(it.batch for it in batch) * max(it.seq_len for it in batch) for batch in runner.batches[1:]]
    assert sizes == [4, 4, 2]  # two requests of B=2 fill max_batch_size 4
    assert max(tokens) <= 24


async def test_groups_by_key_and_limits_padding(make):
    b, runner = await make(max_padding_ratio=1.5)
    runner.gate.clear()
    first = asyncio.create_task(b.infer(inp(), deadline=far()))
    await asyncio.to_thread(runner.started.wait, 2)
    reqs = [
        inp(T=16),
        inp(T=1024),  # too long to share with T=16 at padding ratio 1.5
        inp(T=16, need_weights=True),  # different key
        inp(T=12),
        inp(T=16, causal=False),  # different key
        inp(T=16),
    ]
    tasks = [asyncio.create_task(b.infer(r, deadline=far())) for r in reqs]
    await asyncio.sleep(0.01)
    runner.gate.set()
    await asyncio.gather(first, *tasks)
    shapes = [[(it.seq_len, it.need_weights, it.causal) for it in batch] for batch in runner.batches[1:]]
    assert shapes[0] == [(16, False, True), (12, False, True), (16, False, True)]
    assert [(1024, False, True)] in shapes
    assert [(16, True, True)] in shapes and [(16, False, False)] in shapes


async def test_max_wait_lets_a_batch_grow_under_load(make):
    b, runner = await make(max_wait_ms=80)
    runner.gate.clear()
    first = asyncio.create_task(b.infer(inp(), deadline=far()))
    await asyncio.to_thread(runner.started.wait, 2)
    early = asyncio.create_task(b.infer(inp(), deadline=far()))
    await asyncio.sleep(0.005)
    runner.gate.set()  # the model frees up now, but the queued request may wait up to 80 ms
    await asyncio.sleep(0.03)
    late = asyncio.create_task(b.infer(inp(), deadline=far()))
    await asyncio.gather(first, early, late)
    assert [len(batch) for batch in runner.batches] == [1, 2]


async def test_deadline_in_queue_gives_504_and_is_never_computed(make):
    b, runner = await make()
    runner.gate.clear()
    first = asyncio.create_task(b.infer(inp(), deadline=far()))
    await asyncio.to_thread(runner.started.wait, 2)
    doomed = asyncio.create_task(b.infer(inp(value=7.0), deadline=time.monotonic() + 0.02))
    with pytest.raises(DeadlineExceeded, match="while it was queued"):
        await doomed
    runner.gate.set()
    await first
    await b.infer(inp(), deadline=far())
    assert all(it.x[0, 0, 0] != 7.0 for batch in runner.batches for it in batch)


async def test_finishing_after_the_deadline_is_still_504(make):
    b, _ = await make(runner=FakeRunner(delay=0.1))
    with pytest.raises(DeadlineExceeded):
        await b.infer(inp(), deadline=time.monotonic() + 0.05)


async def test_abandoned_request_is_dropped_before_compute(make):
    class Obs(BatcherObserver):
        def __init__(self):
            self.drops = []

        def dropped(self, reason):
            self.drops.append(reason)

    obs = Obs()
    runner = FakeRunner()
    b = Batcher(runner, BatchLimits(), obs)
    await b.start()
    try:
        runner.gate.clear()
        first = asyncio.create_task(b.infer(inp(), deadline=far()))
        await asyncio.to_thread(runner.started.wait, 2)
        gone = asyncio.get_running_loop().create_future()
        leaving = asyncio.create_task(b.infer(inp(value=9.0), deadline=far(), abandoned=gone))
        await asyncio.sleep(0.01)
        gone.set_result(None)
        with pytest.raises(ClientGone):
            await leaving
        runner.gate.set()
        await first
        await b.infer(inp(), deadline=far())
        assert all(it.x[0, 0, 0] != 9.0 for batch in runner.batches for it in batch)
        assert "disconnect" in obs.drops
    finally:
        await b.stop()


async def test_a_watch_given_as_a_function_starts_only_for_a_request_still_waiting(make):
    """``abandoned`` as a function: a quick answer never calls it (no watcher task per request); a request
    still queued after WATCH_AFTER_S calls it, and a caller gone then is dropped before compute."""
    from service.messages import WATCH_AFTER_S

    b, runner = await make()
    calls = []

    def watch_never():
        calls.append("quick")
        return asyncio.get_running_loop().create_future()

    res = await b.infer(inp(value=2.0), deadline=far(), abandoned=watch_never)
    np.testing.assert_array_equal(res.output.output, np.full((1, 4, 2), 4.0))
    assert calls == []  # answered before WATCH_AFTER_S: the function was never called

    runner.gate.clear()
    first = asyncio.create_task(b.infer(inp(), deadline=far()))
    await asyncio.to_thread(runner.started.wait, 2)
    gone = asyncio.get_running_loop().create_future()
    started_at = []

    def watch_gone():
        started_at.append(time.monotonic())
        return gone

    t0 = time.monotonic()
    leaving = asyncio.create_task(b.infer(inp(value=9.0), deadline=far(), abandoned=watch_gone))
    await asyncio.sleep(WATCH_AFTER_S / 2)
    assert started_at == []  # not yet
    await asyncio.sleep(WATCH_AFTER_S)
    assert len(started_at) == 1 and started_at[0] - t0 >= WATCH_AFTER_S * 0.9
    gone.set_result(None)
    with pytest.raises(ClientGone):
        await leaving
    assert b.queue_depth() == (0, 0)  # its slot freed at once
    runner.gate.set()
    await first
    assert all(it.x[0, 0, 0] != 9.0 for batch in runner.batches for it in batch)


async def test_bounded_queue_answers_overloaded_at_once(make):
    b, runner = await make(max_queue_requests=2, max_queue_tokens=1000)
    runner.gate.clear()
    first = asyncio.create_task(b.infer(inp(), deadline=far()))
    await asyncio.to_thread(runner.started.wait, 2)
    queued = [asyncio.create_task(b.infer(inp(), deadline=far())) for _ in range(2)]
    await asyncio.sleep(0.01)
    t0 = time.monotonic()
    with pytest.raises(Overloaded, match=r"queue is full \(2 requests, 8 tokens queued; limits 2 requests") as e:
        await b.infer(inp(), deadline=far())
    assert time.monotonic() - t0 < 0.05
    assert e.value.retry_after_s >= 1
    with pytest.raises(Overloaded, match="1000 tokens"):
        await b.infer(inp(T=1000), deadline=far())  # over the token bound even though requests fit
    runner.gate.set()
    await asyncio.gather(first, *queued)


async def test_a_failing_request_does_not_fail_its_batch(make):
    runner = FakeRunner()
    runner.fail_on = 13.0
    b, _ = await make(runner=runner)
    runner.gate.clear()
    first = asyncio.create_task(b.infer(inp(), deadline=far()))
    await asyncio.to_thread(runner.started.wait, 2)
    tasks = [asyncio.create_task(b.infer(inp(value=v), deadline=far())) for v in (1.0, 13.0, 2.0)]
    await asyncio.sleep(0.01)
    runner.gate.set()
    await first
    good1, bad, good2 = await asyncio.gather(*tasks, return_exceptions=True)
    assert isinstance(bad, RuntimeError)
    np.testing.assert_array_equal(good1.output.output, np.full((1, 4, 2), 2.0))
    np.testing.assert_array_equal(good2.output.output, np.full((1, 4, 2), 4.0))
    assert (await b.infer(inp(value=5.0), deadline=far())).output.output[0, 0, 0] == 10.0  # still running


async def test_stop_finishes_pending_within_grace():
    runner = FakeRunner(delay=0.02)
    b = Batcher(runner, BatchLimits(max_batch_size=1))
    await b.start()
    tasks = [asyncio.create_task(b.infer(inp(value=float(i)), deadline=far())) for i in range(4)]
    await asyncio.sleep(0)
    await b.stop(grace_s=5)
    results = await asyncio.gather(*tasks)
    assert [r.output.output[0, 0, 0] for r in results] == [0.0, 2.0, 4.0, 6.0]
    with pytest.raises(ShuttingDown):
        await b.infer(inp(), deadline=far())


async def test_stop_fails_what_cannot_finish_never_hangs():
    runner = FakeRunner()
    b = Batcher(runner, BatchLimits(max_batch_size=1))
    await b.start()
    runner.gate.clear()
    tasks = [asyncio.create_task(b.infer(inp(), deadline=far())) for _ in range(3)]
    await asyncio.to_thread(runner.started.wait, 2)
    await b.stop(grace_s=0.05)
    results = await asyncio.wait_for(asyncio.gather(*tasks, return_exceptions=True), 1)
    assert all(isinstance(r, ShuttingDown) for r in results)
    runner.gate.set()


def test_limits_are_checked():
    with pytest.raises(ValueError, match="max_batch_size must be >= 1, got 0"):
        BatchLimits(max_batch_size=0)
    with pytest.raises(ValueError, match=r"max_padding_ratio must be >= 1, got 0\.5"):
        BatchLimits(max_padding_ratio=0.5)


async def test_out_of_memory_halves_the_batch_limits_for_a_while():
    class Obs(BatcherObserver):
        def __init__(self):
            self.scales = []

        def limits_scaled(self, scale):
            self.scales.append(scale)

    runner = FakeRunner()
    runner.fail_on = 13.0
    obs = Obs()
    b = Batcher(
        runner,
        BatchLimits(max_batch_size=8, max_batch_tokens=64, oom_cooldown_s=0.3),
        obs,
        is_oom=lambda e: "boom" in str(e),
    )
    await b.start()
    try:
        runner.gate.clear()
        first = asyncio.create_task(b.infer(inp(), deadline=far()))
        await asyncio.to_thread(runner.started.wait, 2)
        tasks = [asyncio.create_task(b.infer(inp(value=v), deadline=far())) for v in (1.0, 13.0, 2.0)]
        await asyncio.sleep(0.01)
        runner.gate.set()
        await first
        await asyncio.gather(*tasks, return_exceptions=True)
        assert obs.scales == [0.5]
        assert b._effective_limits() == (4, 32)
        # while halved, a queue of 8 sequences goes out in batches of 4
        runner.gate.clear()
        first = asyncio.create_task(b.infer(inp(), deadline=far()))
        await asyncio.to_thread(runner.started.wait, 2)
        n = len(runner.batches)
        tasks = [asyncio.create_task(b.infer(inp(), deadline=far())) for _ in range(8)]
        await asyncio.sleep(0.01)
        runner.gate.set()
        await asyncio.gather(first, *tasks)
        assert [len(batch) for batch in runner.batches[n + 1 :]] == [4, 4]
        await asyncio.sleep(0.35)
        assert b._effective_limits() == (8, 64)  # cool-down over
        assert obs.scales == [0.5, 1.0]
    finally:
        await b.stop()


# -- capacity is released however a request ends; stop awaits what it started ---------------


async def _busy(b, runner):
    """Hold the model with one running batch; returns its task."""
    runner.gate.clear()
    runner.started.clear()
    first = asyncio.create_task(b.infer(inp(), deadline=far()))
    await asyncio.to_thread(runner.started.wait, 2)
    return first


async def test_a_cancelled_request_is_never_computed_and_frees_its_slot_at_once(make):
    b, runner = await make(max_queue_requests=3, max_queue_tokens=12)
    first = await _busy(b, runner)
    cancelled = [asyncio.create_task(b.infer(inp(value=5.0), deadline=far())) for _ in range(2)]
    kept = asyncio.create_task(b.infer(inp(value=6.0), deadline=far()))
    await asyncio.sleep(0.01)
    assert b.queue_depth() == (3, 12)
    for t in cancelled:
        t.cancel()
    await asyncio.gather(*cancelled, return_exceptions=True)
    assert b.queue_depth() == (1, 4)  # released now, while the long batch still runs
    more = [asyncio.create_task(b.infer(inp(value=7.0), deadline=far())) for _ in range(2)]
    await asyncio.sleep(0.01)
    assert b.queue_depth() == (3, 12)  # accepted: no spurious 429
    runner.gate.set()
    await asyncio.gather(first, kept, *more)
    seen = [float(it.x[0, 0, 0]) for batch in runner.batches for it in batch]
    assert 5.0 not in seen
    assert sorted(seen) == [1.0, 6.0, 7.0, 7.0]


async def test_timed_out_and_disconnected_requests_free_their_slot_at_once(make):
    b, runner = await make(max_queue_requests=2, max_queue_tokens=1000)
    first = await _busy(b, runner)
    gone = asyncio.get_running_loop().create_future()
    leaving = asyncio.create_task(b.infer(inp(value=8.0), deadline=far(), abandoned=gone))
    late = asyncio.create_task(b.infer(inp(value=9.0), deadline=time.monotonic() + 0.05))
    await asyncio.sleep(0.01)
    assert b.queue_depth() == (2, 8)
    gone.set_result(None)
    with pytest.raises(ClientGone):
        await leaving
    assert b.queue_depth() == (1, 4)
    with pytest.raises(DeadlineExceeded):
        await late
    assert b.queue_depth() == (0, 0)  # before the next dispatch: the batch still runs
    assert not first.done()
    again = [asyncio.create_task(b.infer(inp(value=3.0), deadline=far())) for _ in range(2)]
    await asyncio.sleep(0.01)
    assert b.queue_depth() == (2, 8)
    runner.gate.set()
    await asyncio.gather(first, *again)
    seen = [float(it.x[0, 0, 0]) for batch in runner.batches for it in batch]
    assert 8.0 not in seen and 9.0 not in seen


async def test_stop_returns_only_when_every_task_it_started_is_done():
    runner = FakeRunner()
    b = Batcher(runner, BatchLimits(max_batch_size=1))
    await b.start()
    first = await _busy(b, runner)
    queued = asyncio.create_task(b.infer(inp(), deadline=far()))
    await asyncio.sleep(0.01)
    batch_task = b._batch_task
    assert batch_task is not None and not batch_task.done()
    await b.stop(grace_s=0.05)
    assert batch_task.done()  # the forward thread may still run; no task waits on it
    assert not b.running and not b._batch_tasks
    for t in (first, queued):
        with pytest.raises(ShuttingDown):
            await t
    runner.gate.set()


async def test_stop_cancels_the_batching_timer():
    runner = FakeRunner()
    b = Batcher(runner, BatchLimits(max_wait_ms=10_000))
    await b.start()
    first = await _busy(b, runner)
    queued = asyncio.create_task(b.infer(inp(), deadline=far()))
    await asyncio.sleep(0.01)
    runner.gate.set()
    await first
    await asyncio.sleep(0.01)
    timer = b._timer
    assert timer is not None and not timer.cancelled()
    await b.stop(grace_s=0)
    assert timer.cancelled()
    with pytest.raises(ShuttingDown):
        await queued


async def test_a_request_larger_than_any_batch_is_refused_naming_the_limit(make):
    b, runner = await make(max_batch_tokens=16, max_batch_weights_elements=100)
    with pytest.raises(RequestTooLarge, match=r"B=2 x T=10 = 20 tokens, more than max_batch_tokens 16"):
        await b.infer(inp(T=10, B=2), deadline=far())
    assert b.queue_depth() == (0, 0) and runner.batches == []


async def test_the_per_batch_weights_budget_splits_batches():
    runner = FakeRunner()
    b = Batcher(runner, BatchLimits(max_batch_weights_elements=25), weights_of=lambda it: 10 * it.batch)
    await b.start()
    try:
        with pytest.raises(RequestTooLarge, match="30 elements, more than max_batch_weights_elements 25"):
            await b.infer(inp(B=3), deadline=far())
        first = await _busy(b, runner)
        tasks = [asyncio.create_task(b.infer(inp(value=float(v)), deadline=far())) for v in range(5)]
        await asyncio.sleep(0.01)
        runner.gate.set()
        await asyncio.gather(first, *tasks)
        assert [len(batch) for batch in runner.batches] == [1, 2, 2, 1]
    finally:
        await b.stop()


async def test_depth_two_keeps_two_batches_in_flight_and_each_answer_is_its_own():
    """The GPU pipeline: with depth 2 a second batch starts while the first is still running (its upload
    overlaps the first's forward), and never a third; stop() waits for both."""
    lock = threading.Lock()
    running, peak = [0], [0]
    gate = threading.Event()

    def run(items):
        with lock:
            running[0] += 1
            peak[0] = max(peak[0], running[0])
        gate.wait(5)
        time.sleep(0.01)
        with lock:
            running[0] -= 1
        return [AttendOutput(it.x * 2, None) for it in items], BatchStats(len(items))

    b = Batcher(run, BatchLimits(max_batch_size=2), depth=2)
    await b.start()
    try:
        tasks = [asyncio.create_task(b.infer(inp(value=float(i)), deadline=far())) for i in range(8)]
        for _ in range(200):  # both workers busy, the rest queued
            await asyncio.sleep(0.005)
            if running[0] == 2:
                break
        assert running[0] == 2
        gate.set()
        results = await asyncio.gather(*tasks)
        assert b._inflight == [] and b.queue_depth() == (0, 0) and b.queue_depth_by_level() == [(0, 0)]
    finally:
        await b.stop(grace_s=5)
    assert peak[0] == 2
    for i, res in enumerate(results):
        np.testing.assert_array_equal(res.output.output, np.full((1, 4, 2), 2.0 * i))

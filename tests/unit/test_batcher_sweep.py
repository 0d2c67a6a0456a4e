"""The deadline sweep (service/sweep.py): one timer while items wait, whatever their number."""

from __future__ import annotations

import asyncio
import logging

import pytest

from service.sweep import Sweep


class Checks:
    """A check that records the ``now`` it is handed and says "still waiting" ``waiting`` times."""

    def __init__(self, waiting: int) -> None:
        self.nows: list[float] = []
        self.waiting = waiting

    def __call__(self, now: float) -> bool:
        self.nows.append(now)
        return len(self.nows) < self.waiting


async def _until(cond, timeout: float = 2.0) -> None:
    for _ in range(int(timeout / 0.005)):
        if cond():
            return
        await asyncio.sleep(0.005)


async def test_one_timer_however_many_items_arm_it_and_it_stops_when_nothing_waits():
    ticks = iter(range(100, 200))
    check = Checks(waiting=3)
    sweep = Sweep(0.01, check, clock=lambda: float(next(ticks)))
    for _ in range(1000):  # a thousand items begin to wait in one turn: still one sweep per period
        sweep.arm()
    assert sweep.armed
    await _until(lambda: not sweep.armed)
    assert check.nows == [100.0, 101.0, 102.0]  # the clock read once per sweep, handed to the check
    await asyncio.sleep(0.05)
    assert len(check.nows) == 3  # stopped: nothing waits
    check.waiting = 4
    sweep.arm()  # a new item: the sweeps start again
    await _until(lambda: len(check.nows) == 4)
    assert check.nows[-1] == 103.0


async def test_cancel_stops_the_sweeps():
    check = Checks(waiting=10**6)
    sweep = Sweep(0.01, check)
    sweep.arm()
    await _until(lambda: len(check.nows) >= 2)
    sweep.cancel()
    seen = len(check.nows)
    await asyncio.sleep(0.05)
    assert not sweep.armed and len(check.nows) == seen


async def test_a_check_that_raises_is_logged_and_the_sweeps_go_on(caplog):
    calls: list[float] = []

    def check(now: float) -> bool:
        calls.append(now)
        if len(calls) == 1:
            raise RuntimeError("bug")
        return len(calls) < 3

    sweep = Sweep(0.01, check)
    with caplog.at_level(logging.ERROR, logger="mha_serve.sweep"):
        sweep.arm()
        await _until(lambda: len(calls) == 3 and not sweep.armed)
    assert len(calls) == 3  # the later deadlines are still checked
    assert [r.getMessage() for r in caplog.records] == ["a sweep's check raised"]


def test_the_period_is_checked():
    with pytest.raises(ValueError, match="every_s must be > 0, got 0"):
        Sweep(0, lambda now: False)

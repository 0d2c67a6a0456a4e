"""The body-read deadlines of admission (service/frontend/admission.py's ``_Reads``) on the shared sweeper."""

from __future__ import annotations

import asyncio
import time

from service.frontend.admission import _Reads
from service.sweep import Sweep


async def test_reads_sweep_with_the_shared_sweeper_and_stop_when_none_is_in_progress():
    reads = _Reads()
    assert isinstance(reads.sweep, Sweep) and reads.sweep.every_s == _Reads.SWEEP_S
    assert not reads.sweep.armed  # nothing read yet: no timer

    async def read(deadline: float) -> bool:
        task = reads.start(deadline)
        try:
            await asyncio.sleep(10)
        except asyncio.CancelledError:
            return reads.expired(task)
        finally:
            reads.end(task)
        return False

    now = time.monotonic()
    overdue = asyncio.create_task(read(now))
    later = asyncio.create_task(read(now + 60))
    await asyncio.sleep(0)
    assert reads.sweep.armed and len(reads.deadlines) == 2
    assert await asyncio.wait_for(overdue, 5 * _Reads.SWEEP_S) is True  # cancelled by the sweep, and told so
    assert set(reads.deadlines) == {later} and reads.overdue == set()
    assert reads.sweep.armed  # a read is still in progress: the sweeps go on
    later.cancel()  # someone else's cancel: not an expiry
    assert await later is False
    await asyncio.sleep(1.5 * _Reads.SWEEP_S)  # the next sweep finds nothing in progress and stops
    assert not reads.sweep.armed and reads.deadlines == {}

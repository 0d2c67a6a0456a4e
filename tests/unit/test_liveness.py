"""The watchdog (service/engine/liveness.py): a hung forward or event loop is declared once, with its reason,
then the process exits; a forward shorter than the bound, or a loop that turns, never trips it."""

from __future__ import annotations

import asyncio
import threading
import time

from service.engine.liveness import HUNG_EXIT, ForwardClock, Watchdog
from tests.waiting import until


class Beat:
    value = 0.0


def watchdog(forwards: ForwardClock, **kw) -> tuple[Watchdog, list, list]:
    hangs: list = []
    exits: list = []
    w = Watchdog(
        forwards=forwards,
        on_hang=lambda: hangs.append(time.monotonic()),
        exit=exits.append,
        exit_after_s=kw.pop("exit_after_s", 0.0),
        **{"forward_hang_s": 0.5, "loop_hang_s": 5.0, **kw},
    )
    return w, hangs, exits


async def test_a_forward_past_the_bound_is_declared_once_then_the_process_exits():
    clock, beat = ForwardClock(), Beat()
    w, hangs, exits = watchdog(clock, beat=beat, exit_after_s=0.3)
    w.start(asyncio.get_running_loop())
    release = threading.Event()

    def forward():
        with clock.timing():
            release.wait(10)  # a forward that does not return

    t = threading.Thread(target=forward)
    t0 = time.monotonic()
    t.start()
    try:
        await until(lambda: hangs)
        declared = hangs[0] - t0
        assert 0.5 <= declared < 3.0, declared
        assert exits == []  # not yet: a probe may see the 503 first
        stamped = beat.value
        await until(lambda: exits)
        assert exits == [HUNG_EXIT] and len(hangs) == 1
        assert time.monotonic() - hangs[0] >= 0.3
        assert beat.value == stamped  # no longer stamped once hung: the parent's watch would end it too
        assert w.hung.startswith("a forward pass has run for") and "MHA_FORWARD_HANG_S=0.5" in w.hung
    finally:
        release.set()
        t.join()
        w.stop()


async def test_forwards_shorter_than_the_bound_and_a_turning_loop_never_trip_it():
    clock, beat = ForwardClock(), Beat()
    w, hangs, exits = watchdog(clock, beat=beat, loop_hang_s=0.5)
    w.start(asyncio.get_running_loop())
    try:
        for _ in range(4):  # back to back, 1.2 s of forwards in all: each is timed on its own
            await asyncio.to_thread(_short, clock)
        before = beat.value
        await asyncio.sleep(0.4)
        assert beat.value > before  # stamped while all is well
        assert hangs == [] and exits == [] and w.hung is None
        assert clock.since() is None
    finally:
        w.stop()


def _short(clock: ForwardClock) -> None:
    with clock.timing():
        time.sleep(0.3)


async def test_an_event_loop_that_does_not_turn_is_declared():
    w, hangs, exits = watchdog(ForwardClock(), loop_hang_s=0.6)
    w.start(asyncio.get_running_loop())
    try:
        time.sleep(1.5)  # blocks this loop
        await until(lambda: exits)
        assert exits == [HUNG_EXIT] and len(hangs) == 1
        assert w.hung.startswith("the event loop has not turned for") and "MHA_ENGINE_HANG_S=0.6" in w.hung
    finally:
        w.stop()


def test_the_clock_reports_the_oldest_forward_running():
    clock = ForwardClock()
    assert clock.since() is None
    with clock.timing():
        first = clock.since()
        time.sleep(0.01)
        with clock.timing():
            assert clock.since() == first  # the longer-running one
        assert clock.since() == first
    assert clock.since() is None

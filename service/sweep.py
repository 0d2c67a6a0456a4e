"""One deadline sweep for many waiting items: one timer while any waits, not a timer (or a task) per item.

A timer per item is made and cancelled for every item, though most are answered long before their deadline;
a sweep every ``every_s`` is one callback for all of them, and notices a deadline within ``every_s`` (plus the
event loop's latency). The owner keeps its items where it already does (its queues, its dict of waits) and
decides what is due: ``check(now)`` answers the items past their deadline and says whether anything still
waits. Shared by both sides (it imports neither): the batcher sweeps its queued requests' deadlines, the
front end's admission its body reads'.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable

log = logging.getLogger("mha_serve.sweep")


class Sweep:
    """Calls ``check(now)`` every ``every_s`` from the first :meth:`arm` until ``check`` returns False (nothing
    waits any more); the next :meth:`arm` starts it again. Call ``arm`` for every item that begins to wait (on a
    hot path, ``if not sweep.armed: sweep.arm()`` skips the call). ``clock`` is read once per sweep and handed to
    ``check``, so that every item of one sweep is judged at the same instant."""

    __slots__ = ("_check", "_clock", "_handle", "armed", "every_s")

    def __init__(self, every_s: float, check: Callable[[float], bool], clock: Callable[[], float] = time.monotonic):
        if every_s <= 0:
            raise ValueError(f"every_s must be > 0, got {every_s}")
        self.every_s = every_s
        self._check = check
        self._clock = clock
        self._handle: asyncio.TimerHandle | None = None
        self.armed = False  # a sweep is coming (a plain attribute: read for every item on a hot path)

    def arm(self) -> None:
        """An item began to wait: make sure a sweep comes within ``every_s``. Call from the event loop."""
        if self._handle is None:
            self._handle = asyncio.get_running_loop().call_later(self.every_s, self._fire)
            self.armed = True

    def cancel(self) -> None:
        """No sweep until the next :meth:`arm` (the owner stops)."""
        if self._handle is not None:
            self._handle.cancel()
            self._handle = None
            self.armed = False

    def _fire(self) -> None:
        self._handle = None
        self.armed = False
        try:
            again = self._check(self._clock())
        except Exception:  # a bug in one check must not end the sweeps, and with them every later deadline
            log.exception("a sweep's check raised")
            again = True
        if again:
            self.arm()

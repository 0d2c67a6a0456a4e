"""One liveness watch for the process that runs the forward pass: the one-process server, or the model process.

A forward pass that never returns (a CUDA hang, a deadlock in a kernel) leaves the event loop free: it
runs in the batcher's thread, so a heartbeat stamped by the loop, or /healthz, would say "alive" for ever
while every request times out. So a thread of its own (``Watchdog``) looks at both things that can stop:

- the forward pass, through ``FORWARDS``, which the runner stamps at each forward's start and end: one
  that has run longer than MHA_FORWARD_HANG_S is hung;
- the event loop, through a callback it posts to the loop: a loop that has not run it for
  MHA_ENGINE_HANG_S is hung (a callback stuck in C, a blocking call in a coroutine).

On a hang it logs why, once; calls ``on_hang`` (the one-process app turns /readyz 503 at once); and
after ``exit_after_s`` (time for a readiness probe to see the 503) ends the process with ``HUNG_EXIT``,
without waiting on the stuck thread, so that the orchestrator restarts the replica. In the model process
there is no probe to wait for: it exits at once, the front ends see its socket close and answer 503, and
the supervisor exits 1 (service/engine/supervise.py).

While all is well it stamps ``beat`` (shared memory) for the supervisor, which kills a model process whose
beat stops: one that is frozen (SIGSTOP, swapped out), whose watchdog cannot run either.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import sys
import threading
import time
from collections.abc import Callable, Iterator
from typing import Any

from service.proc import title_thread

log = logging.getLogger("mha_serve.liveness")

HUNG_EXIT = 70  # EX_SOFTWARE (sysexits.h): the orchestrator's "last state" tells a hang from a crash (1)
CHECK_S = 0.1  # how often the watchdog looks, and stamps ``beat``


class ForwardClock:
    """When each forward pass now running began (several run at once with the GPU's copy pipeline).

    One per process, as the watchdog that reads it: a hung forward ends the whole process, whichever
    runner it was in.
    """

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._starts: dict[int, float] = {}
        self._next = 0

    @contextlib.contextmanager
    def timing(self) -> Iterator[None]:
        with self._lock:
            key = self._next
            self._next += 1
            self._starts[key] = time.monotonic()
        try:
            yield
        finally:
            with self._lock:
                del self._starts[key]

    def since(self) -> float | None:
        """The monotonic start of the longest-running forward, or None when none runs."""
        with self._lock:
            return min(self._starts.values(), default=None)


FORWARDS = ForwardClock()


class Watchdog:
    """The watch described above; ``start`` it on the event loop it watches, ``stop`` it at shutdown."""

    def __init__(
        self,
        *,
        forward_hang_s: float,
        loop_hang_s: float,
        on_hang: Callable[[], Any] | None = None,
        beat: Any = None,
        exit_after_s: float = 1.0,
        forwards: ForwardClock = FORWARDS,
        exit: Callable[[int], Any] = os._exit,  # (tests pass their own; os._exit: never waits on the stuck thread)
    ) -> None:
        self.forward_hang_s = forward_hang_s
        self.loop_hang_s = loop_hang_s
        self.hung: str | None = None  # why, once it is
        self._on_hang = on_hang
        self._beat = beat
        self._exit_after_s = exit_after_s
        self._forwards = forwards
        self._exit = exit
        self._loop: asyncio.AbstractEventLoop | None = None
        self._loop_seen = 0.0
        self._poked = False  # a callback waits on the loop
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def start(self, loop: asyncio.AbstractEventLoop) -> None:
        self._loop = loop
        self._loop_seen = time.monotonic()
        if self._beat is not None:
            self._beat.value = self._loop_seen  # before the parent's watch starts
        self._thread = threading.Thread(target=self._watch, name="mha-watchdog", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None and self._thread is not threading.current_thread():
            self._thread.join(1.0)

    def _turned(self) -> None:
        self._loop_seen = time.monotonic()
        self._poked = False

    def _watch(self) -> None:
        title_thread()
        while not self._stop.wait(CHECK_S):
            now = time.monotonic()
            why = self._why_hung(now)
            if why is not None:
                self._declare(why)
                return
            if self._beat is not None:
                self._beat.value = now  # CLOCK_MONOTONIC: one clock for the whole host
            if not self._loop.is_running():  # not started yet, or stopped between runs: not hung
                self._loop_seen = now
                continue
            if not self._poked:
                self._poked = True
                try:
                    self._loop.call_soon_threadsafe(self._turned)
                except RuntimeError:  # the loop closed: the process is on its way out
                    return

    def _why_hung(self, now: float) -> str | None:
        started = self._forwards.since()
        if started is not None and now - started > self.forward_hang_s:
            return f"a forward pass has run for {now - started:.1f} s (MHA_FORWARD_HANG_S={self.forward_hang_s:g})"
        silent = now - self._loop_seen
        if silent > self.loop_hang_s:
            return f"the event loop has not turned for {silent:.1f} s (MHA_ENGINE_HANG_S={self.loop_hang_s:g})"
        return None

    def _declare(self, why: str) -> None:
        self.hung = why
        log.error("hung: %s; exiting %d so that the replica is restarted", why, HUNG_EXIT)
        if self._on_hang is not None:
            try:
                self._on_hang()
            except Exception:
                log.exception("on_hang failed")
        if self._exit_after_s > 0:
            time.sleep(self._exit_after_s)
        for stream in (sys.stdout, sys.stderr):
            with contextlib.suppress(Exception):
                stream.flush()
        self._exit(HUNG_EXIT)

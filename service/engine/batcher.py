"""The dynamic request batcher: queue, grouping, deadlines, answers. Knows no HTTP.

Two entry points, one implementation: ``submit`` queues a request and calls its ``done`` callback once
with the outcome (no task, future or timer per request: the model process's path), and ``cancel``
drops it; ``infer`` is ``submit`` awaited, for callers in tasks (the single-process routes).

Contract:
- Every request waits in a bounded queue (requests and tokens); past the bound ``submit``
  raises :class:`Overloaded` at once, with a retry-after estimated from the drain rate.
- When the model is free, the dispatcher takes a batch at once: the oldest request, plus the
  queued requests that can share its forward pass (same key), in arrival order, while the
  batch stays within ``max_batch_size`` sequences, ``max_batch_tokens`` padded tokens and
  ``max_padding_ratio`` padded/real tokens. A batch always holds at least one request, and
  the oldest request always goes first, so no request starves.
- Priorities (``priority_levels`` > 1; Triton's convention: level 1 is the highest). Each
  level has its own queue, bounded by ``max_queue_requests``/``max_queue_tokens`` on its own,
  so a flood at one level cannot fill the queue of another; its retry-after counts the work
  queued at its level and above. A batch's first request (its anchor) is the oldest request of
  the highest non-empty level, and the batch is filled level by level from the highest, in
  arrival order: a higher level is batched first. Starvation is bounded by counting batches:
  at least every ``priority_oldest_every``-th batch (K) takes the oldest queued request of any
  level (it is the anchor when no earlier batch in the last K took it). So a request that
  arrives with n requests queued before it (at most the levels' queue bounds) reaches the model
  within (n + 1) x K batches, however much higher-priority work keeps arriving, and the
  higher levels keep at least (K - 1)/K of the batches under any flood below them. With one
  level the anchor is the oldest request: the plain FIFO above.
- A request that finds the model idle starts at once. While a batch computes, the next one
  forms from what arrives meanwhile (pipelining). With ``max_wait_ms > 0``, a batch formed
  from requests that queued behind a running batch may wait until its oldest request has
  waited that long, or the batch is full, to grow.
- The forward pass runs in one worker thread; the event loop never blocks on torch, but for a forward
  expected to take less than ``inline_below_s`` (MHA_FORWARD_INLINE_US): one that costs less than the
  hand-off to the thread and back runs on the loop (``_inline``).
- A request whose caller went away or was cancelled is dropped before compute, and its queue slot
  (requests and tokens) is released at once. One past its deadline is too, within SWEEP_S (10 ms):
  one sweep every SWEEP_S while requests wait checks every deadline, not a timer per request
  (:class:`service.sweep.Sweep`).
- A request that could never fit one batch (more than ``max_batch_tokens`` tokens, or weights
  over ``max_batch_weights_elements``) is refused at submit with :class:`RequestTooLarge`.
- If a batch's forward raises, its requests are retried one by one, so only the failing
  request gets the error; the batcher keeps running. A request cancelled or answered meanwhile
  is not retried, nor one past its deadline (answered DeadlineExceeded, dropped "late"). A result
  that is an exception (the runner's ``NumericOverflow``: that request's own values overflowed)
  fails that request alone, unretried.
- ``start``/``stop`` are explicit; ``stop`` finishes pending work within a grace period and
  fails whatever is left, never leaving a request hanging; it returns once every task it
  started (running batches, timers) is done. The forward runs in a daemon thread, so a
  forward still running when the grace is spent cannot hold the process's exit.

The policy (anchor, joining, holding, out-of-memory scaling, retry-after) is pure functions in
:mod:`service.engine.policy`; this module is their mechanics: queues, sweep, threads and answers.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import queue
import threading
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from functools import partial
from typing import TYPE_CHECKING, Any

from service.engine import policy
from service.messages import (
    WATCH_AFTER_S,
    AttendInput,
    AttendOutput,
    BatcherObserver,
    BatchStats,
    ClientGone,
    DeadlineExceeded,
    Overloaded,
    RequestTooLarge,
    Result,
    ShuttingDown,
)
from service.proc import title_thread
from service.sweep import Sweep

if TYPE_CHECKING:
    from service.settings import Settings

log = logging.getLogger("mha_serve.batcher")

# One result per input, in order; an exception in a request's place fails that request alone (the runner's
# NumericOverflow), the others are answered.
RunFn = Callable[[list[AttendInput]], tuple[list[AttendOutput | BaseException], BatchStats]]
# Called once with a request's Result or its error (see Batcher.submit).
Done = Callable[[Result | BaseException], Any]

SWEEP_S = 0.01  # while requests wait, how often the sweep checks their deadlines and starts watching their callers


@dataclass(frozen=True)
class BatchLimits:
    max_batch_size: int = 32
    max_batch_tokens: int = 32768
    max_wait_ms: float = 0.0
    max_padding_ratio: float = 2.0
    max_queue_requests: int = 256
    max_queue_tokens: int = 262144
    oom_cooldown_s: float = 60.0  # how long halved limits last after an out-of-memory error
    max_batch_weights_elements: int = 64 * 1024 * 1024  # attention-weight elements one batch may compute
    priority_levels: int = 1  # 1 = one FIFO queue; N > 1: levels 1 (highest) .. N, each with its own queue bounds
    default_priority_level: int | None = None  # the level of priority 0 (unset): None = the lowest, N
    priority_oldest_every: int = 8  # K: at least every K-th batch takes the oldest queued request, any level

    def __post_init__(self) -> None:
        if self.priority_levels < 1:
            raise ValueError(f"priority_levels must be >= 1, got {self.priority_levels}")
        d = self.default_priority_level
        if d is not None and not 1 <= d <= self.priority_levels:
            raise ValueError(f"default_priority_level must be in 1..{self.priority_levels}, got {d}")
        if self.priority_oldest_every < 1:
            raise ValueError(f"priority_oldest_every must be >= 1, got {self.priority_oldest_every}")
        names = ("max_batch_size", "max_batch_tokens", "max_queue_requests", "max_queue_tokens")
        for name in (*names, "max_batch_weights_elements"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        if self.max_wait_ms < 0:
            raise ValueError(f"max_wait_ms must be >= 0, got {self.max_wait_ms}")
        if self.max_padding_ratio < 1:
            raise ValueError(f"max_padding_ratio must be >= 1, got {self.max_padding_ratio}")

    @classmethod
    def from_settings(cls, s: Settings) -> BatchLimits:
        return cls(
            max_batch_size=s.max_batch_size,
            max_batch_tokens=s.max_batch_tokens,
            max_wait_ms=s.max_wait_ms,
            max_padding_ratio=s.max_padding_ratio,
            max_queue_requests=s.max_queue_requests,
            max_queue_tokens=s.max_queue_tokens,
            oom_cooldown_s=s.oom_cooldown_s,
            max_batch_weights_elements=s.max_batch_weights_elements,
            priority_levels=s.priority_levels,
            default_priority_level=s.default_priority_level,
            priority_oldest_every=s.priority_oldest_every,
        )


class _Pending:
    """One request: queued, then computing, then answered once through ``done`` (unless cancelled first).

    A plain class with slots, not a dataclass: one is made per request on the model process's hot path.
    """

    __slots__ = (
        "arrived",
        "deadline",
        "done",
        "input",
        "key",
        "level",
        "queued_behind_batch",
        "seq_len",
        "seqs",
        "settled",
        "started",
        "tokens",
        "watch",
        "weights",
    )

    def __init__(
        self,
        inp: AttendInput,
        done: Done,
        arrived: float,
        deadline: float,
        queued_behind_batch: bool,
        weights: int = 0,  # attention-weight elements this request computes
        level: int = 0,  # priority level - 1: index of its queue (0 = the highest)
        watch: Callable[[], Any] | None = None,
        shape: tuple[int, int] | None = None,  # (B, T) of its x, when the caller has read them already
    ) -> None:
        self.input = inp
        self.done = done
        self.arrived = arrived
        self.deadline = deadline
        self.queued_behind_batch = queued_behind_batch
        self.weights = weights
        self.level = level
        self.watch = watch  # called once by the sweep if still unanswered WATCH_AFTER_S after arrival
        # read once here, not per look by the batch selection (properties of the input, each a call)
        self.seqs, self.seq_len = shape or inp.x.shape[:2]
        self.tokens = self.seqs * self.seq_len
        self.key = inp.key
        self.settled = False  # answered or cancelled: ``done`` is never called (again)
        self.started = False


class _ForwardThreads:
    """Daemon threads (one per batch in flight) that run the forwards and answer on the event loop.

    Not a ThreadPoolExecutor: its threads are joined at interpreter exit, so a forward still
    running when the shutdown grace is spent would hold the exit past it.
    """

    def __init__(self, name: str, n: int = 1) -> None:
        self._busy = 0  # forwards running now
        self._lock = threading.Lock()
        self._jobs: queue.SimpleQueue = queue.SimpleQueue()
        self._threads = [threading.Thread(target=self._main, name=f"{name}-{i}", daemon=True) for i in range(n)]
        for t in self._threads:
            t.start()

    @property
    def busy(self) -> bool:
        return self._busy > 0

    def submit(self, fn: Callable, *args: Any) -> asyncio.Future:
        loop = asyncio.get_running_loop()
        fut = loop.create_future()
        self._jobs.put((loop, fut, fn, args))
        return fut

    def shutdown(self) -> None:
        for _ in self._threads:
            self._jobs.put(None)

    def _main(self) -> None:
        title_thread()
        while (job := self._jobs.get()) is not None:
            loop, fut, fn, args = job
            with self._lock:
                self._busy += 1
            try:
                ok, value = True, fn(*args)
            except BaseException as e:  # handed to the awaiting task
                ok, value = False, e
            finally:
                with self._lock:
                    self._busy -= 1
            with contextlib.suppress(RuntimeError):  # the loop is closed: nobody waits any more
                loop.call_soon_threadsafe(_settle, fut, ok, value)
            del job, fut, value  # do not keep the last batch's arrays alive until the next one


def _settle(fut: asyncio.Future, ok: bool, value: Any) -> None:
    if fut.done():  # cancelled while it ran (stop)
        return
    if ok:
        fut.set_result(value)
    else:
        fut.set_exception(value)


class Batcher:
    def __init__(
        self,
        run: RunFn,
        limits: BatchLimits,
        observer: BatcherObserver | None = None,
        is_oom: Callable[[BaseException], bool] = lambda e: False,
        weights_of: Callable[[AttendInput], int] = lambda inp: 0,
        depth: int = 1,
        inline_below_s: float = 0.0,
    ) -> None:
        self._run_fn = run
        self._weights_of = weights_of  # attention-weight elements a request computes (the runner knows H)
        self._depth = depth  # batches in flight at once (the runner's pipeline depth: 2 on a GPU)
        # A forward expected to take less than this runs on the event loop, not the forward thread (0: never);
        # expected from the forwards timed so far: a moving average of their wall time per real token.
        self._inline_below_s = inline_below_s
        self._s_per_token = 0.0
        self._running = 0
        self._is_oom = is_oom
        self._scale = 1.0  # batch limits are scaled down after out-of-memory errors
        self._scale_until = 0.0
        self.limits = limits
        self._obs = observer or BatcherObserver()
        self._nlevels = limits.priority_levels
        self._queue_publish = False  # a _publish_queue is scheduled
        self._default_level = (limits.default_priority_level or limits.priority_levels) - 1
        self._oldest_every = limits.priority_oldest_every
        self._since_oldest = 0  # batches since one took the oldest queued request (priority_levels > 1)
        self._queues: list[list[_Pending]] = [[] for _ in range(self._nlevels)]  # one FIFO per level
        self._queued = 0  # queue entries (a front end's merged requests are one)
        self._queued_tokens = 0
        self._level_tokens = [0] * self._nlevels
        # the requests each level's entries are (AttendInput.requests): the depth reported and bounded
        self._level_requests = [0] * self._nlevels
        self._busy = False
        self._inflight: list[_Pending] = []
        self._accepting = False
        self._idle = asyncio.Event()
        # The dispatch is a callback scheduled once per turn of the loop when something changed (``_kick``), not a
        # task awaiting an Event: each wake-up of a task cost a future, a task step and a loop turn a batch.
        self._loop: asyncio.AbstractEventLoop | None = None  # the event loop it runs on (start)
        self._kicked = False  # a _dispatch is scheduled
        self._dead: BaseException | None = None  # what broke the dispatch (a bug): not ready any more
        self._stopped = False
        self._batch_task: asyncio.Task | None = None  # the last batch that needed a task (forward thread, retries)
        self._batch_tasks: set[asyncio.Task] = set()
        self._timer: asyncio.TimerHandle | None = None
        self._sweep = Sweep(SWEEP_S, self._check_deadlines)  # while requests wait (SWEEP_S read now: tests patch it)
        self._worker: _ForwardThreads | None = None
        self._stopping: asyncio.Future | None = None
        self._drain_tokens_per_s = 0.0

    # -- lifecycle -----------------------------------------------------------------------

    @property
    def forward_running(self) -> bool:
        """A forward pass is computing now (after ``stop``: one that ran past the grace, unawaited)."""
        return self._worker is not None and self._worker.busy

    @property
    def running(self) -> bool:
        return self._loop is not None and not self._stopped and self._dead is None and self._accepting

    async def start(self) -> None:
        if self._loop is not None:
            raise RuntimeError("batcher already started")
        self._worker = _ForwardThreads("mha-forward", self._depth)
        self._accepting = True
        self._idle.set()
        self._loop = asyncio.get_running_loop()

    def stop_accepting(self) -> None:
        """New requests get ShuttingDown from now on; queued ones still run."""
        self._accepting = False

    async def stop(self, grace_s: float = 0.0) -> None:
        """Finish queued and running work within ``grace_s``, then fail what is left.

        Returns once every task the batcher started is done. A second call (the signal's drain,
        then the lifespan's shutdown) waits for the first one's end instead of granting more time.
        """
        self._accepting = False
        if self._stopping is None:
            self._stopping = asyncio.ensure_future(self._stop(grace_s))
        await asyncio.shield(self._stopping)

    async def _stop(self, grace_s: float) -> None:
        if self._loop is None:
            return
        deadline = time.monotonic() + grace_s
        while self._queued or self._busy:
            left = deadline - time.monotonic()
            if left <= 0:
                break
            self._idle.clear()
            with contextlib.suppress(asyncio.TimeoutError):
                await asyncio.wait_for(self._idle.wait(), timeout=min(left, 0.05))
        for p in [*(p for q in self._queues for p in q), *self._inflight]:
            self._answer(p, ShuttingDown("the server is shutting down before this request could finish"))
        for q in self._queues:
            q.clear()
        self._queued = self._queued_tokens = 0
        self._level_tokens = [0] * self._nlevels
        self._level_requests = [0] * self._nlevels
        self._queue_changed(now=True)
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        self._sweep.cancel()
        self._stopped = True  # no dispatch from now on
        tasks = [t for t in self._batch_tasks if not t.done()]
        for t in tasks:
            t.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        if self._worker is not None:
            self._worker.shutdown()  # a forward still running finishes in its daemon thread, unawaited
        self._batch_task = None

    # -- requests ------------------------------------------------------------------------

    def queue_depth(self) -> tuple[int, int]:
        return sum(self._level_requests), self._queued_tokens

    def queue_depth_by_level(self) -> list[tuple[int, int]]:
        """(requests, tokens) queued at each priority level, the highest (1) first."""
        return list(zip(self._level_requests, self._level_tokens, strict=True))

    def _queue_changed(self, *, now: bool = False) -> None:
        """The queue's depth changed: the observer hears it once per turn of the event loop (in several
        processes a gauge's write is a memory-mapped file's; a turn queues a whole message of
        requests, and takes a batch), or ``now``."""
        if now:
            self._publish_queue()
        elif not self._queue_publish:
            self._queue_publish = True
            asyncio.get_running_loop().call_soon(self._publish_queue)

    def _publish_queue(self) -> None:
        self._queue_publish = False
        self._obs.queue_changed(sum(self._level_requests), self._queued_tokens)
        if self._nlevels > 1:
            for i in range(self._nlevels):
                self._obs.level_queue_changed(i + 1, self._level_requests[i], self._level_tokens[i])

    async def infer(
        self,
        inp: AttendInput,
        *,
        deadline: float,
        abandoned: Awaitable[Any] | Callable[[], Awaitable[Any]] | None = None,
        priority: int = 0,
    ) -> Result:
        """Queue ``inp`` and wait for its result, its deadline (monotonic) or ``abandoned``.

        ``priority``: 1 (the highest) .. ``priority_levels``; 0 = ``default_priority_level``.
        ``abandoned`` completes when the caller leaves: an awaitable is watched at once; a function
        returning one is called, and its awaitable watched, only if the request is still waiting after
        WATCH_AFTER_S (by the sweep, within SWEEP_S of it: a quick answer starts no task).

        However the wait ends (result, deadline, client gone, this task cancelled), a request
        still queued leaves the queue at once: it is never computed, and its requests and tokens
        stop counting against the queue's bounds. Built on :meth:`submit`: its errors, deadline
        rules and drop counts are this method's; a caller gone raises ClientGone, and this task
        cancelled counts the request as dropped("cancelled").
        """
        loop = asyncio.get_running_loop()
        answer = loop.create_future()
        gone: asyncio.Future | None = None
        p: _Pending | None = None

        def left(_: Any = None) -> None:  # the caller went away before the answer
            if not answer.done():
                self.cancel(p, "disconnect")
                answer.set_exception(ClientGone("the client went away"))

        def watch() -> None:  # still waiting after WATCH_AFTER_S: watch the caller from now on
            nonlocal gone
            gone = asyncio.ensure_future(abandoned())
            gone.add_done_callback(left)

        lazy = callable(abandoned)
        try:
            p = self.submit(
                inp, deadline=deadline, priority=priority, done=partial(_resolve, answer), watch=watch if lazy else None
            )
        except Exception:
            if asyncio.iscoroutine(abandoned):
                abandoned.close()  # never awaited: close it quietly
            raise
        if abandoned is not None and not lazy:
            gone = asyncio.ensure_future(abandoned)
            gone.add_done_callback(left)
        try:
            return await answer
        except asyncio.CancelledError:
            if not p.settled:
                self.cancel(p, "cancelled")
            raise
        finally:
            if gone is not None and not gone.done():
                gone.remove_done_callback(left)
                gone.cancel()

    def submit(
        self,
        inp: AttendInput,
        *,
        deadline: float,
        done: Done,
        priority: int = 0,
        watch: Callable[[], Any] | None = None,
    ) -> _Pending:
        """Queue ``inp``; ``done(result_or_error)`` is called exactly once, from the event loop, never from here.

        The callback path: no task, future or timer per request (the model process's per-request cost).
        Raises at once, and never calls ``done``: Overloaded (queue full), RequestTooLarge, ShuttingDown,
        ValueError (priority out of range). Then ``done`` gets one of:
        - the Result; or the runner's error for this request (its NumericOverflow, or what the forward raised
          when the batch was retried one by one);
        - DeadlineExceeded "... while it was queued" (dropped "deadline": never computed, its slot
          released), or "... while it was computing" (dropped "late": at the deadline, or when a result
          comes after it; the batch computes on without it);
        - ShuttingDown from ``stop``.
        Deadlines and ``watch`` are checked by a sweep every SWEEP_S while any request waits, and at each
        batch's formation: a deadline is noticed within SWEEP_S (plus the event loop's latency).
        ``watch`` (optional) is called once if the request is still unanswered WATCH_AFTER_S after submit.
        Returns the handle for :meth:`cancel`.
        """
        if not self._accepting:
            raise ShuttingDown("the batcher is not running")
        if not 0 <= priority <= self._nlevels:
            raise ValueError(f"priority {priority} is out of range 0..{self._nlevels}")
        level = priority - 1 if priority else self._default_level
        lim = self.limits
        B, T = inp.x.shape[:2]
        tokens = B * T
        if tokens > lim.max_batch_tokens:
            raise RequestTooLarge(
                f"x has B={inp.batch} x T={inp.seq_len} = {tokens} tokens, more than max_batch_tokens "
                f"{lim.max_batch_tokens} (the most one forward pass holds); send fewer sequences per request"
            )
        weights = self._weights_of(inp)
        if weights > lim.max_batch_weights_elements:
            raise RequestTooLarge(
                f"the weights would have {weights} elements, more than max_batch_weights_elements "
                f"{lim.max_batch_weights_elements} (the most one forward pass computes); "
                "ask for fewer heads or sequences"
            )
        q, q_tokens, q_requests = self._queues[level], self._level_tokens[level], self._level_requests[level]
        n = inp.requests
        if (q_requests and q_requests + n > lim.max_queue_requests) or q_tokens + tokens > lim.max_queue_tokens:
            which = "queue" if self._nlevels == 1 else f"queue of priority level {level + 1}"
            raise Overloaded(
                f"{which} is full ({q_requests} requests, {q_tokens} tokens queued; limits "
                f"{lim.max_queue_requests} requests, {lim.max_queue_tokens} tokens)",
                self._retry_after(level),
            )
        pending = _Pending(inp, done, time.monotonic(), deadline, self._busy, weights, level, watch, (B, T))
        q.append(pending)
        self._queued += 1
        self._level_requests[level] += n
        self._queued_tokens += tokens
        self._level_tokens[level] += tokens
        if not self._queue_publish:  # (most submits of a turn find it scheduled: no call)
            self._queue_changed()
        self._kick()
        if not self._sweep.armed:
            self._sweep.arm()
        return pending

    def cancel(self, p: _Pending, reason: str = "disconnect") -> None:
        """Its caller left (counted as dropped ``reason``): ``done`` is never called. A request still queued
        leaves the queue now, never computed, and releases its slot; one computing finishes unanswered."""
        if p.settled:
            return
        p.settled = True
        self._obs.dropped(reason)
        if p.started:
            return
        with contextlib.suppress(ValueError):  # already purged
            self._queues[p.level].remove(p)
            self._unqueued(p)
        if not self._queued and not self._busy:
            self._idle.set()

    def _unqueued(self, p: _Pending) -> None:
        self._queued -= 1
        self._level_requests[p.level] -= p.input.requests
        self._queued_tokens -= p.tokens
        self._level_tokens[p.level] -= p.tokens
        self._queue_changed()

    def _answer(self, p: _Pending, value: Result | BaseException, drop: str | None = None) -> None:
        """Settle ``p`` once: count ``drop`` if given, then call its ``done``."""
        if p.settled:
            return
        p.settled = True
        if drop is not None:
            self._obs.dropped(drop)
        try:
            p.done(value)
        except Exception:  # a caller's bug must not stop the batcher or the other answers
            log.exception("a request's done callback raised")

    def _check_deadlines(self, now: float) -> bool:
        """The sweep's check, every SWEEP_S while requests wait: a queued request past its deadline leaves the
        queue (its slot released) with DeadlineExceeded, a computing one is answered "late"; a request still
        unanswered WATCH_AFTER_S after arrival has its ``watch`` called. Returns whether any still waits."""
        watch_before = now - WATCH_AFTER_S
        expired = False
        for q in self._queues:
            for p in q:
                if now >= p.deadline:
                    expired = True
                elif p.watch is not None and p.arrived <= watch_before:
                    _start_watch(p)
        if expired:
            self._purge(now)
        waiting = False
        for p in self._inflight:
            if p.settled:
                continue
            if now >= p.deadline:
                self._answer(p, DeadlineExceeded("the request's deadline passed while it was computing"), "late")
                continue
            waiting = True
            if p.watch is not None and p.arrived <= watch_before:
                _start_watch(p)
        if waiting or self._queued:
            return True
        if not self._busy:
            self._idle.set()
        return False

    def _retry_after(self, level: int = 0) -> float:
        return policy.retry_after_s(self._level_tokens, level, self._drain_tokens_per_s)

    # -- dispatch ------------------------------------------------------------------------

    def _kick(self) -> None:
        """Something changed (a request queued, a batch ended, the hold timer fired): dispatch in this turn's
        callbacks, once however many kicks the turn had."""
        if not self._kicked and not self._stopped:
            self._kicked = True
            self._loop.call_soon(self._dispatch)

    def _dispatch(self) -> None:
        """Start batches while the model has room (``depth``) and requests wait: a batch expected to be short
        (``_inline``) computes and is answered here, one for the forward thread goes in a task."""
        try:  # (kicks meanwhile, from the batches it starts and ends, need no second call: it looks again)
            if self._stopped or self._dead is not None:
                return
            while self._running < self._depth:
                self._purge(time.monotonic())
                if not self._queued:
                    self._idle.set()
                    return
                hold = self._hold_s()
                if hold > 0:
                    if self._timer is None:
                        self._timer = self._loop.call_later(hold, self._timer_fired)
                    return
                self._start_batch(self._select())
        except Exception as e:  # a bug: not ready any more (readiness 503), and the deadlines answer what waits
            self._dead = e
            log.exception("the batcher's dispatch failed; it takes no more batches")
        finally:
            self._kicked = False

    def _start_batch(self, batch: list[_Pending]) -> None:
        self._inflight = self._inflight + batch
        self._running += 1
        self._busy = True
        self._idle.clear()
        started = time.monotonic()
        waits = [started - p.arrived for p in batch]
        tokens = sum(p.tokens for p in batch)
        forwarded: Any = None
        if self._inline_below_s > 0 and self._inline(batch, tokens):
            try:
                forwarded = self._timed([p.input for p in batch])
            except Exception as e:  # answered by the task below: retried one by one, in the forward thread
                forwarded = e
            except BaseException:  # (the process is going down) never leave a batch's requests unanswered
                for p in batch:
                    self._answer(p, ShuttingDown("the server is shutting down"))
                self._end(batch)
                raise
            else:
                if len(forwarded[0][0]) == len(batch):  # (else the task below fails it as the thread's would)
                    try:
                        self._complete(batch, waits, started, tokens, *forwarded)
                    finally:
                        self._end(batch)
                    return
        task = self._batch_task = asyncio.create_task(self._run_batch(batch, waits, started, tokens, forwarded))
        self._batch_tasks.add(task)  # (the loop keeps only weak references to tasks)
        task.add_done_callback(self._batch_tasks.discard)

    def _timer_fired(self) -> None:
        self._timer = None
        self._kick()

    def _hold_s(self) -> float:
        """How long to let a batch grow before dispatch (0 = now)."""
        wait = self.limits.max_wait_ms / 1000
        if wait <= 0:
            return 0.0
        first = policy.anchor(self._queues, self._since_oldest, self._oldest_every)
        max_size = self._effective_limits()[0]
        return policy.hold_s(first, self._queues, time.monotonic(), max_wait_s=wait, max_size=max_size)

    def _purge(self, now: float) -> None:
        """Drop requests that are abandoned or past their deadline, before they cost compute. The queue's depth is
        published when it dropped any (a batch's selection publishes its own)."""
        dropped = False
        for level, queue_ in enumerate(self._queues):
            keep = []
            for p in queue_:
                if p.settled:
                    pass  # its caller stopped waiting and counted why
                elif now >= p.deadline:
                    self._answer(p, DeadlineExceeded("the request's deadline passed while it was queued"), "deadline")
                else:
                    keep.append(p)
                    continue
                self._queued -= 1
                self._level_requests[level] -= p.input.requests
                self._queued_tokens -= p.tokens
                self._level_tokens[level] -= p.tokens
            if len(keep) != len(queue_):
                self._queues[level] = keep
                dropped = True
        if dropped:
            self._queue_changed()

    def _effective_limits(self) -> tuple[int, int]:
        """(max_batch_size, max_batch_tokens), halved for a while after each out-of-memory error."""
        if self._scale < 1:
            scale = policy.scale_at(self._scale, self._scale_until, time.monotonic())
            if scale != self._scale:
                self._scale = scale
                log.warning("out-of-memory cool-down over: batch limits back to full size")
                self._obs.limits_scaled(scale)
        return policy.scaled_limits(self.limits.max_batch_size, self.limits.max_batch_tokens, self._scale)

    def _out_of_memory(self, batch_requests: int) -> None:
        self._scale = policy.scale_after_oom(self._scale)
        self._scale_until = time.monotonic() + self.limits.oom_cooldown_s
        size, tokens = self._effective_limits()
        log.warning(
            "out of memory in a batch of %d requests: batch limits halved to %d sequences, %d tokens for %.0f s",
            batch_requests,
            size,
            tokens,
            self.limits.oom_cooldown_s,
        )
        self._obs.limits_scaled(self._scale)

    def _select(self) -> list[_Pending]:
        """Take the next batch off the queues: the policy's anchor and the requests that join it."""
        lim = self.limits
        max_size, max_tokens = self._effective_limits()
        queues = self._queues
        first = policy.anchor(queues, self._since_oldest, self._oldest_every)
        chosen, real = policy.join(
            first,
            queues,
            max_size=max_size,
            max_tokens=max_tokens,
            max_padding_ratio=lim.max_padding_ratio,
            max_weights=lim.max_batch_weights_elements,
        )
        if self._nlevels > 1:
            self._since_oldest = policy.since_oldest_after(self._since_oldest, policy.oldest_head(queues), chosen)
        for p in chosen:
            p.started = True
        if self._nlevels == 1:
            q = self._queues[0]
            self._queues[0] = [] if len(chosen) == len(q) else [p for p in q if not p.started]  # often all of it
            self._level_tokens[0] -= real
            self._level_requests[0] -= sum(p.input.requests for p in chosen)
        else:
            for level in {p.level for p in chosen}:
                self._queues[level] = [p for p in self._queues[level] if not p.started]
                self._level_tokens[level] -= sum(p.tokens for p in chosen if p.level == level)
                self._level_requests[level] -= sum(p.input.requests for p in chosen if p.level == level)
        self._queued -= len(chosen)
        self._queued_tokens -= real
        self._queue_changed()
        return chosen

    def _timed(self, inputs: list[AttendInput]) -> tuple[Any, float]:
        """The forward, and its wall time (where it runs: the forward thread, or the loop)."""
        started = time.perf_counter()
        out = self._run_fn(inputs)
        return out, time.perf_counter() - started

    def _inline(self, batch: list[_Pending], tokens: int) -> bool:
        """Whether this batch's forward runs on the event loop: it is expected to take less than the hand-off to
        the forward thread and back costs (two thread wake-ups, and the GIL passed each way: ~90 us of CPU a
        batch, 6 of the model process's ~33 us a request at batches of 14 on a 2-vCPU VM, bench/procs.py --noop),
        no other batch computes meanwhile, and none of its requests carries an injected fault (a test's stand-in
        for a forward that stalls or fails, which no estimate foresees)."""
        per_token = self._s_per_token
        if per_token <= 0 or self._running > 1 or tokens * per_token >= self._inline_below_s:
            return False
        return not any(p.input.fault for p in batch)

    async def _run_batch(
        self, batch: list[_Pending], waits: list[float], started: float, tokens: int, forwarded: Any = None
    ) -> None:
        """A batch whose forward runs in the forward thread, or whose inline forward failed (``forwarded``: its
        error, or its answer when it had the wrong count)."""
        try:
            try:
                if forwarded is None:
                    forwarded = await self._worker.submit(self._timed, [p.input for p in batch])
                if isinstance(forwarded, Exception):
                    raise forwarded
                (outputs, stats), took = forwarded
                if len(outputs) != len(batch):
                    raise RuntimeError(f"runner returned {len(outputs)} results for {len(batch)} requests")
            except Exception as e:
                if self._is_oom(e):
                    self._out_of_memory(len(batch))
                if len(batch) == 1:
                    results, stats = [e], BatchStats(batch[0].input.batch)
                else:
                    # Isolate the fault: run each request alone, so only the failing one errs.
                    self._obs.batch_failed(len(batch))
                    log.warning("batch of %d failed (%r); retrying its requests one by one", len(batch), e)
                    results, stats = await self._run_one_by_one(batch)
                self._answer_all(batch, waits, started, results, stats)
            else:
                self._complete(batch, waits, started, tokens, (outputs, stats), took)
        except BaseException as e:  # never leave a batch's requests unanswered
            for p in batch:
                self._answer(p, e if isinstance(e, Exception) else ShuttingDown("the server is shutting down"))
            if not isinstance(e, Exception):
                raise
        finally:
            self._end(batch)

    def _complete(
        self, batch: list[_Pending], waits: list[float], started: float, tokens: int, forwarded: Any, took: float
    ) -> None:
        """A forward that returned one result a request: its time joins the estimate, and each is answered."""
        outputs, stats = forwarded
        self._s_per_token = policy.seconds_per_token(self._s_per_token, tokens, took)
        try:
            self._answer_all(batch, waits, started, outputs, stats)
        except Exception as e:  # (an observer's bug) never leave a batch's requests unanswered
            for p in batch:
                self._answer(p, e)

    def _answer_all(
        self,
        batch: list[_Pending],
        waits: list[float],
        started: float,
        results: list[AttendOutput | BaseException],
        stats: BatchStats,
    ) -> None:
        now = time.monotonic()
        n = len(batch)
        if any(p.input.requests != 1 for p in batch):  # merged requests count as their number, each wait as theirs
            n = sum(p.input.requests for p in batch)
            waits_each = [w for p, w in zip(batch, waits, strict=True) for _ in range(p.input.requests)]
        else:
            waits_each = waits
        for p, wait, res in zip(batch, waits, results, strict=True):
            if p.settled:
                continue  # cancelled, or answered "late" by the sweep
            if isinstance(res, BaseException):
                self._answer(p, res)
            elif now > p.deadline:
                self._answer(p, DeadlineExceeded("the request's deadline passed while it was computing"), "late")
            else:
                self._answer(p, Result(res, wait, stats.compute_s, n, stats.sequences))
        self._obs.batch_done(n, stats, waits_each)
        self._obs.batch_finished([p.input for p in batch], started, stats)
        self._drain_tokens_per_s = policy.drain_rate(self._drain_tokens_per_s, stats.real_tokens, stats.compute_s)

    def _end(self, batch: list[_Pending]) -> None:
        """A batch is over (answered, or failed whole): the model has room for the next."""
        self._running -= 1
        self._busy = self._running > 0
        if not self._running:  # the only batch in flight: _inflight is this batch
            self._inflight = []
        else:
            done = {id(p) for p in batch}
            self._inflight = [p for p in self._inflight if id(p) not in done]
        self._kick()
        if not self._queued and not self._busy:
            self._idle.set()

    async def _run_one_by_one(self, batch: list[_Pending]) -> tuple[list[AttendOutput | BaseException], BatchStats]:
        """Each request of a failed batch alone, so that only the failing one gets the error. One settled while
        the batch computed (cancelled, or answered "late" by the sweep) is skipped: nobody waits for it. One past
        its deadline is answered now instead: its retry would only be thrown away, and retries run in turn, so
        each is checked when its turn comes."""
        results: list[AttendOutput | BaseException] = []
        total = BatchStats()
        for p in batch:
            if not p.settled and time.monotonic() >= p.deadline:
                self._answer(p, DeadlineExceeded("the request's deadline passed while it was computing"), "late")
            if p.settled:
                results.append(_SKIPPED)  # never answered: _run_batch skips settled requests
                continue
            try:
                (out,), stats = await self._worker.submit(self._run_fn, [p.input])
                results.append(out)
                total.sequences += stats.sequences
                total.padded_tokens += stats.padded_tokens
                total.real_tokens += stats.real_tokens
                total.compute_s += stats.compute_s
            except Exception as e:
                results.append(e)
        return results, total


_SKIPPED = RuntimeError("not retried: the request was settled before its turn")


def _start_watch(p: _Pending) -> None:
    watch, p.watch = p.watch, None
    try:
        watch()
    except Exception:  # a caller's bug must not stop the sweep (and with it every deadline)
        log.exception("a request's watch raised")


def _resolve(fut: asyncio.Future, value: Result | BaseException) -> None:
    """``infer``'s ``done``: hand the answer to its waiting task (unless that task was cancelled)."""
    if fut.done():
        return
    if isinstance(value, BaseException):
        fut.set_exception(value)
    else:
        fut.set_result(value)

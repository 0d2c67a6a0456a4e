"""MPClient: the engine client of a front-end process, served by the model process over a Unix socket
(service/channel.py).

It is the ``service.engine_api.EngineClient`` interface, as ``InprocClient`` is in one process: the
same ``infer(inp, *, deadline, abandoned, priority) -> Result``, the same typed failures (each crosses
as its ``ErrorKind``), readiness, statistics and stop, so the routes need not know which one they talk to. Requests
submitted in the same turn of the event loop cross in one message; a caller that leaves sends a
cancel, so the model process drops the request before compute. When the model process goes away
(its connection ends, or its heartbeat stops) every pending request fails at once with
``EngineUnavailable`` (a 503), and so does every later one.
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import os
import signal
import time
from collections.abc import Awaitable, Callable
from typing import Any

from mha_core import MHAConfig
from service import channel, shm
from service.engine_api import EngineModel, SequenceFlags
from service.logs import request_id_var
from service.messages import (
    WATCH_AFTER_S,
    AttendInput,
    AttendOutput,
    Bye,
    Cancel,
    ClientGone,
    DeadlineExceeded,
    ErrorKind,
    Heartbeat,
    Hello,
    Info,
    Outcome,
    Outcomes,
    Ping,
    Result,
    Rows,
    ShuttingDown,
    decode,
    decode_outcomes,
    encode,
    encode_requests,
    failure_of,
    slots_of,
)
from service.proc import parent_watched_by_kernel
from service.stats import SharedModelStats
from service.sweep import Sweep

log = logging.getLogger("mha_serve.engine")

HEARTBEAT_S = 0.25  # how often the front end pings the model process
LOST_AFTER_S = 3.0  # no heartbeat for this long: the model process is unavailable (503) until it is heard again
ANSWER_SLACK_S = 1.0  # past a request's deadline, the front end stops waiting for the engine's own answer
FLUSH_WAIT_S = 1.0  # flush_statistics waits this long at most for the model process's answer
SWEEP_S = 0.01  # how often waiting requests are checked for their deadline and for watching their caller
# Requests merged into one (``_grouped``) have deadlines this close at most: the group's is the latest, and a member
# whose own passes before the answer is answered DeadlineExceeded by this front end's sweep, at its own deadline
# (within SWEEP_S), as the model process answers a request of its own.
GROUP_DEADLINE_SPREAD_S = 0.05
# A merged request that failed for one of these is sent again member by member, so that each gets its own answer
# (a member whose result overflowed, one too large for a batch with the others, or a forward that failed for one);
# refused for a full queue, its members are admitted one by one as far as there is room, as they would have been
# unmerged (the model process counts a merged request as its number against MHA_MAX_QUEUE_REQUESTS).
_SPLIT_ON = frozenset(
    {
        ErrorKind.NUMERIC_OVERFLOW.value,
        ErrorKind.VALIDATION.value,
        ErrorKind.INTERNAL.value,
        ErrorKind.OVERLOADED.value,
    }
)


class _Group:
    """Plain requests of one turn merged into one request to the model process: its id there, its members (their
    outbox items and rows), its x's arena slots, and how many members still wait."""

    __slots__ = ("id", "items", "live", "rows", "settled", "slots")

    def __init__(self, gid: int, items: list, rows: list[tuple[int, int]]) -> None:
        self.id = gid
        self.items = items
        self.rows = rows  # (start, end) of each member's rows in the merged x
        self.live = len(items)
        self.slots: list[int] = []
        self.settled = False  # answered, failed or cancelled: its slots are back


class EngineUnavailable(ShuttingDown):
    """The model process is gone: 503, at once."""


class MPClient:
    def __init__(
        self,
        address: str,
        *,
        on_ready: Callable[[bool], None] | None = None,
        on_shm_fallback: Callable[[int], Any] | None = None,
        group_limits: tuple[int, int] | None = None,
    ) -> None:
        """``group_limits`` (sequences, tokens): plain requests of one turn that could share a forward pass cross as
        one request of at most that many (``_grouped``); None: each crosses on its own."""
        self.address = address
        self._group_limits = group_limits
        self._groups: dict[int, _Group] = {}  # a merged request's id -> its group, until answered or cancelled
        self._group_of: dict[int, _Group] = {}  # a member's id -> its group, while it waits on it
        self._solo: set[int] = set()  # members of a group that failed as a whole: sent again on their own
        # told how many request arrays this front end's arena had no room for (they crossed as frames)
        self._on_shm_fallback = on_shm_fallback
        self.model: EngineModel | None = None
        self.stats = SharedModelStats()  # the service's totals: the model process and every front end add to them
        self._on_ready = on_ready or (lambda ready: None)
        self._conn: channel.Connection | None = None  # the connection to the model process, until _stop
        self._loop: asyncio.AbstractEventLoop | None = None
        self._pending: dict[int, list] = {}  # id -> [answer, abandoned, give up at, watch from, watch, its slots]
        # Large arrays cross through shared memory (service/shm.py): this front end's arena holds its requests' (used
        # once the model process said it mapped it), the model process's its answers', which are lent to the routes
        # as read-only views (service.messages._lent) and their slots sent back as ``freed`` on the next message
        # after the last reference to them went.
        self._arena: shm.Arena | None = None
        self._inputs: shm.Arena | None = None  # the arena, once the model process mapped it
        self._answers: shm.Mapped | None = None
        self._freed: list[int] = []
        self._sweep = Sweep(SWEEP_S, self._check_waits)  # while requests wait (SWEEP_S read now: tests patch it)
        self._outbox: list[tuple[int, AttendInput, float, str | None, int]] = []
        self._flush_scheduled = False
        self._next_id = 0
        self._heartbeat_task: asyncio.Task | None = None
        # Every ping is answered by one heartbeat, in order: flush_statistics waits for the answer to its own.
        self._pings = 0  # pings sent
        self._beats = 0  # heartbeats heard
        self._flushes: list[tuple[int, asyncio.Future]] = []  # (the ping that answers it, its waiter), in order
        self._info: asyncio.Future | None = None
        self._last_beat = 0.0
        self._engine_ready = False
        self._queue = (0, 0)
        self._lost: str | None = None
        self._silent = False  # lost only because its heartbeat stopped: hearing it again brings it back
        self._accepting = True
        self._stopping: asyncio.Future | None = None
        self._parent = os.getppid()
        self.forward_running = False  # the forward runs in the model process (service.cli asks the batcher)

    # -- lifecycle -----------------------------------------------------------------------

    async def start(self, timeout_s: float = 60.0) -> EngineModel:
        """Connect, and return the model process's description of its model."""
        loop = self._loop = asyncio.get_running_loop()
        self._info = loop.create_future()
        self._last_beat = time.monotonic()
        give_up = loop.time() + timeout_s
        try:
            self._conn = await channel.connect(self.address, self._handle, self._closed, timeout_s)
            if shm.ARENA_BYTES:
                try:
                    self._arena = shm.Arena()
                except OSError as e:
                    log.warning("no shared memory for the requests (%s): their arrays cross as frames", e)
            self._send(encode(Hello(os.getpid(), None if self._arena is None else self._arena.name)))
            info = await asyncio.wait_for(self._info, max(0.001, give_up - loop.time()))
            if info.arena is not None:
                self._answers = shm.Mapped(info.arena)
            if info.mapped:
                self._inputs = self._arena
        except BaseException:
            await self.stop()  # nothing left registered on the loop, no socket left open
            raise
        self._heartbeat_task = asyncio.create_task(self._heartbeat(), name="mha-engine-heartbeat")
        self.model = EngineModel(MHAConfig(**info.config), info.model_info)
        return self.model

    @property
    def ready(self) -> bool:
        return self._accepting and self._lost is None and self._engine_ready

    @property
    def lost(self) -> str | None:
        """Why the model process is considered gone, or None."""
        return self._lost

    def queue_depth(self) -> tuple[int, int]:
        """The model process's queue (requests, tokens), as of its last heartbeat."""
        return self._queue

    def stop_accepting(self) -> None:
        self._accepting = False

    async def flush_statistics(self, timeout_s: float = FLUSH_WAIT_S) -> None:
        """Return once the model process has written its metrics and statistics of every batch answered before
        this call (service.metrics.EngineMetrics writes them when a ping comes, before its heartbeat answers): a
        ping, and the wait for its heartbeat. Bounded by ``timeout_s`` (a model process that is gone or stalled:
        what it wrote is read as it is)."""
        if self._lost is not None or not self._ping():  # (gone, or stopped)
            return
        waiter = self._loop.create_future()
        self._flushes.append((self._pings, waiter))
        try:
            await asyncio.wait_for(waiter, timeout_s)
        except asyncio.TimeoutError:
            log.warning("the model process did not answer a ping within %g s: its metrics read as they are", timeout_s)

    def _ping(self) -> bool:
        """Send a ping; whether it went (one that did not is never answered, and not counted)."""
        sent = self._send(encode(Ping(self._take_freed())) if self._freed else _PING)
        if sent:
            self._pings += 1
        return sent

    def _release_flushes(self) -> None:
        """No heartbeat will come (gone, stopped): the flushes waiting read what there is."""
        flushes, self._flushes = self._flushes, []
        for _, waiter in flushes:
            if not waiter.done():
                waiter.set_result(None)

    def _heard(self) -> None:
        """A heartbeat: the answer to the oldest unanswered ping. The flushes waiting for it, or an earlier one, end."""
        self._beats += 1
        flushes = self._flushes
        while flushes and flushes[0][0] <= self._beats:
            waiter = flushes.pop(0)[1]
            if not waiter.done():  # (timed out)
                waiter.set_result(None)

    async def stop(self, grace_s: float = 0.0) -> None:
        """Wait up to ``grace_s`` for the answers still pending, then fail the rest and disconnect."""
        self._accepting = False
        if self._stopping is None:
            self._stopping = asyncio.ensure_future(self._stop(grace_s))
        await asyncio.shield(self._stopping)

    async def _stop(self, grace_s: float) -> None:
        deadline = time.monotonic() + grace_s
        while self._pending and time.monotonic() < deadline and self._lost is None:
            await asyncio.sleep(0.02)
        if self._pending:
            self._cancel(list(self._pending))
        self._fail_all(ShuttingDown("the server is shutting down before this request could finish"))
        self._sweep.cancel()
        if self._heartbeat_task is not None:
            self._heartbeat_task.cancel()
            await asyncio.gather(self._heartbeat_task, return_exceptions=True)
        conn, self._conn = self._conn, None
        self._release_flushes()
        if conn is not None:
            if self._lost is None and self._info is not None and self._info.done():
                conn.send(encode(Bye()))  # the model process frees what it holds for this front end at once
            conn.close()  # (what is buffered, the Bye among it, is still written)
        self._inputs = None
        for arena in (self._arena, self._answers):
            if arena is not None:
                arena.close()
        self._arena = self._answers = None

    # -- requests ------------------------------------------------------------------------

    async def infer(
        self,
        inp: AttendInput,
        *,
        deadline: float,
        abandoned: Awaitable[Any] | Callable[[], Awaitable[Any]] | None = None,
        priority: int = 0,
    ) -> Result:
        try:
            if self._lost is not None:
                raise EngineUnavailable(f"the model process is unavailable ({self._lost})")
            if not self._accepting:
                raise ShuttingDown("the batcher is not running")
        except Exception:
            if asyncio.iscoroutine(abandoned):
                abandoned.close()
            raise
        loop = asyncio.get_running_loop()
        rid = self._next_id
        self._next_id += 1
        fut = loop.create_future()
        now = time.monotonic()
        # [answer, abandoned, give up at, watch the caller from, the watch]: the sweep (``_check_waits``), not a
        # timer or a task per request, ends the wait at the deadline and starts watching the caller of a
        # request still waiting after WATCH_AFTER_S (an awaitable ``abandoned`` is watched at once).
        wait = [fut, abandoned, deadline + ANSWER_SLACK_S, now + WATCH_AFTER_S, None, None]
        self._pending[rid] = wait
        if abandoned is not None and not callable(abandoned):
            self._watch_caller(wait, abandoned)
        self._outbox.append((rid, inp, deadline, request_id_var.get(), priority))
        if not self._flush_scheduled:  # everything submitted in this turn of the loop goes in one message
            self._flush_scheduled = True
            loop.call_soon(self._flush)
        if not self._sweep.armed:
            self._sweep.arm()
        try:
            return await fut
        finally:
            gone = wait[4]
            if gone is not None and not gone.done():
                gone.cancel()
            self._free_inputs(wait[5])  # its answer came, or nobody waits for it: the model reads it no more
            if self._pending.pop(rid, None) is not None:  # left before the answer: dropped before compute
                if not fut.done():
                    fut.cancel()
                group = self._group_of.pop(rid, None)
                if group is None:
                    self._cancel([rid])
                else:
                    self._member_left(group)

    async def step(
        self,
        inp: AttendInput,
        seq: SequenceFlags,
        *,
        deadline: float,
        abandoned: Awaitable[Any] | Callable[[], Awaitable[Any]] | None = None,
        priority: int = 0,
    ) -> Result:
        """A sequence's step: the same crossing as ``infer``, its id and flags with it; the model process runs it
        in its sequence's turn and keeps its keys and values (service/engine/sequences.py)."""
        inp = dataclasses.replace(inp, sequence=(seq.id, seq.start, seq.end))
        return await self.infer(inp, deadline=deadline, abandoned=abandoned, priority=priority)

    def _watch_caller(self, wait: list, abandoned: Awaitable[Any]) -> None:
        fut = wait[0]

        def left(gone: asyncio.Future) -> None:
            if not gone.cancelled() and not fut.done():
                fut.set_exception(ClientGone("the client went away"))

        wait[4] = asyncio.ensure_future(abandoned)
        wait[4].add_done_callback(left)

    def _check_waits(self, now: float) -> bool:
        """The sweep's check, every SWEEP_S while requests wait: end the waits past their deadline (the model
        process answers those itself; this is for one that does not), and watch the callers of those waiting long.
        Whether any still waits (the sweep stops when none does)."""
        group_of = self._group_of
        for rid, wait in list(self._pending.items()):
            fut = wait[0]
            if fut.done():
                continue
            if now >= wait[2]:
                fut.set_exception(
                    DeadlineExceeded("the request's deadline passed and the model process did not answer")
                )
            elif rid in group_of and now >= wait[2] - ANSWER_SLACK_S:
                # A member of a merged request, whose deadline is the latest of its members': this one's own has
                # passed, and the model process, which knows only the group's, would answer it later. It leaves the
                # group (``infer``'s end), and the last to leave cancels the merged request.
                fut.set_exception(DeadlineExceeded("the request's deadline passed before its answer came"))
            elif wait[4] is None and wait[1] is not None and now >= wait[3]:
                self._watch_caller(wait, wait[1]())
        return bool(self._pending)

    def _flush(self) -> None:
        self._flush_scheduled = False
        items, self._outbox = self._outbox, []
        solo, self._solo = self._solo, set()  # (sent again on their own: all of them are in this outbox)
        pending = self._pending
        items = [it for it in items if it[0] in pending]  # not those cancelled meanwhile
        if items and self._lost is None:
            if self._group_limits is not None and len(items) > 1:
                items = self._grouped(items, solo)
            inputs = self._inputs
            if inputs is None:
                self._send(encode_requests(items))
                return
            slots: list[list[int]] = []
            frames = encode_requests(items, inputs, slots, self._take_freed())
            if inputs.misses and self._on_shm_fallback is not None:
                self._on_shm_fallback(inputs.take_misses())
            groups = self._groups
            for it, taken in zip(items, slots, strict=True):
                if taken:
                    group = groups.get(it[0])
                    if group is None:
                        pending[it[0]][5] = taken
                    else:
                        group.slots = taken
            self._send(frames)

    def _grouped(self, items: list, solo: set[int]) -> list:
        """A turn's requests with those that can share a forward pass merged: the same shape but their sequences
        (B), dtypes, causality and priority, no lengths, mask, weights, trace, fault or sequence, deadlines within
        GROUP_DEADLINE_SPREAD_S, up to ``group_limits``. The model process decodes, queues, computes and answers a
        merged request once, where it took each of them one by one: in the no-op GPU case (bench/procs.py --noop,
        2 front ends, c=64) its CPU a request fell from 41 to 30 us (docs/performance.md). Each group goes where its
        first member was; the rest keep their order."""
        max_rows, max_tokens = self._group_limits
        out: list = []
        open_: dict[tuple, list] = {}  # key -> [members, rows, first deadline, place in out]
        for it in items:
            rid, inp, deadline, _, priority = it
            if (
                inp.lengths is not None
                or inp.mask is not None
                or inp.need_weights
                or inp.fault is not None
                or inp.trace is not None
                or inp.sequence is not None
                or rid in solo
            ):
                out.append(it)
                continue
            x = inp.x
            B, T = x.shape[:2]
            key = (x.shape[1:], x.dtype.str, inp.causal, inp.wire_dtype, inp.out_dtype, priority)
            g = open_.get(key)
            if (
                g is None
                or g[1] + B > max_rows
                or (g[1] + B) * T > max_tokens
                or abs(deadline - g[2]) > GROUP_DEADLINE_SPREAD_S
            ):
                g = open_[key] = [[it], B, deadline, len(out)]
                out.append(g)
            else:
                g[0].append(it)
                g[1] += B
        for i, g in enumerate(out):
            if type(g) is list:
                out[i] = self._merged(g[0]) if len(g[0]) > 1 else g[0][0]
        return out

    def _merged(self, members: list) -> tuple:
        """One request for ``members`` (outbox items): their x's as Rows, the latest deadline, the first's request
        id (the model process's log lines)."""
        gid = self._next_id
        self._next_id += 1
        rows, at = [], 0
        for it in members:
            n = it[1].x.shape[0]
            rows.append((at, at + n))
            at += n
        group = self._groups[gid] = _Group(gid, members, rows)
        for it in members:
            self._group_of[it[0]] = group
        first = members[0][1]
        inp = AttendInput(
            Rows(it[1].x for it in members),
            causal=first.causal,
            wire_dtype=first.wire_dtype,
            out_dtype=first.out_dtype,
            requests=len(members),
        )
        return (gid, inp, max(it[2] for it in members), members[0][3], members[0][4])

    def _group_answered(self, group: _Group, o: Any) -> None:
        """A merged request's outcome, given to each member still waiting: its rows of the output (views of the
        answer, which stays lent until the last of them goes), or the failure; a failure that may be one member's
        sends the others again on their own."""
        self._settle(group)
        pending = self._pending
        if o.error is None:
            out, now = o.output.output, time.monotonic()
            for it, (start, end) in zip(group.items, group.rows, strict=True):
                wait = pending.pop(it[0], None)
                if wait is None or wait[0].done():
                    continue
                if now >= it[2]:  # (the group's deadline is the latest of its members')
                    wait[0].set_exception(DeadlineExceeded("the request's deadline passed while it was computing"))
                    continue
                output = AttendOutput(out[start:end], None)
                wait[0].set_result(Result(output, o.queue_s, o.compute_s, o.batch_requests, o.batch_sequences))
            return
        again = o.error in _SPLIT_ON
        for it in group.items:
            wait = pending.get(it[0])
            if wait is None or wait[0].done():
                continue
            if again:
                self._solo.add(it[0])
                self._outbox.append(it)
            else:
                del pending[it[0]]
                wait[0].set_exception(failure_of(o.error, o.message, o.retry_after_s))
        if again and self._outbox and not self._flush_scheduled:
            self._flush_scheduled = True
            asyncio.get_running_loop().call_soon(self._flush)

    def _member_left(self, group: _Group) -> None:
        """A member's caller left: once none waits, the merged request is cancelled, as a request of one is."""
        group.live -= 1
        if group.live <= 0 and not group.settled:
            self._settle(group)
            self._cancel([group.id])

    def _settle(self, group: _Group) -> None:
        """The group is done with (answered, failed or cancelled): its x's slots come back, its members are their
        own again."""
        group.settled = True
        self._groups.pop(group.id, None)
        for it in group.items:
            if self._group_of.get(it[0]) is group:
                del self._group_of[it[0]]
        slots, group.slots = group.slots, []
        self._free_inputs(slots)

    def _free_inputs(self, slots: list[int] | None) -> None:
        """Slots of this front end's arena that the model process reads no more."""
        inputs = self._inputs
        if slots and inputs is not None:
            for offset in slots:
                inputs.free(offset)

    def _take_freed(self) -> tuple[int, ...]:
        """The answer slots given back since the last message (service.messages._lent), to go back with the next
        one. Taken from the list in place: the lent slots' callbacks hold it, and may append from another thread
        (an answer dropped by an encoder thread) between the copy and the removal, which leaves that one there."""
        freed = self._freed
        if not freed:
            return ()
        n = len(freed)
        taken = tuple(freed[:n])
        del freed[:n]
        return taken

    def _cancel(self, ids: list[int]) -> None:
        if self._lost is None or self._silent:  # (silent: it may read again, and must not compute these then)
            self._send(encode(Cancel(ids, self._take_freed())))

    def _fail_all(self, exc: Exception) -> None:
        pending, self._pending = self._pending, {}
        for group in list(self._groups.values()):
            self._settle(group)
        self._solo.clear()
        for fut, *_ in pending.values():
            if not fut.done():
                fut.set_exception(exc)
                fut.exception()  # retrieved: a caller that left must not log "never retrieved"

    def _gone(self, why: str, *, silent: bool = False) -> None:
        """The model process is unavailable: every waiting request fails with a 503 at once, and so does every
        later one. For good when its socket closed (it died; the supervisor stops the service) or broke; while
        ``silent`` (no heartbeat for LOST_AFTER_S, its socket still open) only until it is heard again: a stall
        that ends before the supervisor's MHA_ENGINE_HANG_S (which kills it) must not leave this front end
        answering 503 for ever beside a model process that serves again."""
        if self._lost is not None:
            if self._silent and not silent:  # silent, then its socket closed: for good
                self._lost, self._silent = why, False
            return
        self._lost, self._silent = why, silent
        log.error("the model process is unavailable (%s): answering 503", why)
        if silent:
            # It may read again (a stall shorter than MHA_ENGINE_HANG_S): the requests answered 503 now must not be
            # computed then, ahead of fresh traffic. Their cancel goes behind whatever it has not read yet (the
            # connection's buffer), so it arrives after those requests and before any later one.
            unsent = {it[0] for it in self._outbox}  # never sent: _flush drops them
            ids = [rid for rid in self._pending if rid not in unsent]
            self._fail_all(EngineUnavailable(f"the model process is unavailable ({why})"))
            if ids:
                self._send(encode(Cancel(ids)))
        else:
            self._fail_all(EngineUnavailable(f"the model process is unavailable ({why})"))
        if self._info is not None and not self._info.done():
            self._info.set_exception(EngineUnavailable(why))
        if not silent:  # no heartbeat will come
            self._release_flushes()
        self._on_ready(False)

    # -- the connection ------------------------------------------------------------------
    # A send never blocks: what the socket does not take now waits in the connection's buffer, in order, and
    # nothing is dropped; the requests' own deadlines bound the wait.

    def _send(self, frames: list) -> bool:
        """Whether it was written (or buffered): not once the connection is closed."""
        conn = self._conn
        return conn is not None and conn.send(frames)  # (stopped: nothing can be waiting for an answer)

    def _closed(self, exc: BaseException | None) -> None:
        """The connection ended without our closing it: the model process died (or its socket broke)."""
        self._conn = None
        if exc is not None:  # (reset, say: it died with our pings unread)
            log.warning("the connection to the model process ended: %s", exc)
        self._gone("its socket closed")

    def _handle(self, frames: list) -> None:
        msg = decode(frames[0])
        kind = type(msg)
        if kind is Outcomes:
            pending = self._pending
            answers = self._answers
            try:
                if answers is not None:
                    answers.grow(msg.segments, msg.shrinks)  # what the model process's arena grew by, mapped first
            except OSError as e:  # a segment that cannot be mapped: its requests fail now, not at their deadline
                log.error("an answer of %d outcome(s) from the model process could not be read: %r", len(msg.items), e)
                self._freed.extend(slots_of(msg, len(answers.tail[-1])))  # their slots go back: nobody reads them
                why = ErrorKind.INTERNAL.value, f"the answer could not be read: {e!r}"
                outcomes = [Outcome(a.id, error=why[0], message=why[1]) for a in msg.items]
            else:
                outcomes = decode_outcomes(msg, frames[1:], None if answers is None else answers.tail, self._freed)
            for o in outcomes:
                wait = pending.pop(o.id, None)
                if wait is None:
                    group = self._groups.get(o.id)
                    if group is not None:
                        self._group_answered(group, o)
                    continue
                if wait[0].done():
                    continue
                fut = wait[0]
                if o.error is None:
                    fut.set_result(Result(o.output, o.queue_s, o.compute_s, o.batch_requests, o.batch_sequences))
                else:
                    fut.set_exception(failure_of(o.error, o.message, o.retry_after_s))
        elif kind is Heartbeat or kind is Info:
            if kind is Heartbeat:
                self._heard()
            self._last_beat = time.monotonic()
            self._queue = msg.queue
            ready = msg.ready
            if self._silent:  # heard again after a silence: serving again
                self._lost, self._silent = None, False
                log.warning("the model process answers again: serving")
                self._engine_ready = ready
                self._on_ready(ready)
            if ready != self._engine_ready:
                self._engine_ready = ready
                self._on_ready(ready and self._lost is None)
            if kind is Info and self._info is not None and not self._info.done():
                self._info.set_result(msg)

    async def _heartbeat(self) -> None:
        while True:
            await asyncio.sleep(HEARTBEAT_S)
            if self._arena is not None:  # a segment a burst of requests grew it by, empty long enough, goes back
                self._arena.trim()
            if self._lost is None or self._silent:  # (silent: pinged on, to hear it again)
                self._ping()
                if self._lost is None and time.monotonic() - self._last_beat > LOST_AFTER_S:
                    self._gone(f"no heartbeat for {LOST_AFTER_S:g} s", silent=True)
            if not parent_watched_by_kernel() and os.getppid() != self._parent:  # (where PDEATHSIG is not to be had)
                log.error("the parent process is gone: shutting down")
                signal.raise_signal(signal.SIGTERM)
                return


_PING = encode(Ping())

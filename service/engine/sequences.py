"""Sequences (Triton's sequence extension) over the KV cache: ids, order of steps, admission, commit, reaping.

A sequence is an id (an unsigned 64-bit integer or a string), a first step carrying ``start`` and a last one
carrying ``end``. Each step sends its new rows x [1, t, E]; the engine answers the causal forward's rows for
them and keeps their keys and values (service/engine/kvcache.py), so the next step sends only its own rows.

Rules (each has a test in tests/unit/test_sequences.py):

- **Order.** The steps of one sequence run one at a time, in the order they arrived: a step submitted before
  the previous one is answered waits here (not in the batcher's queue) until it is. Steps of different
  sequences share forwards (continuous batching, service/engine/steprunner.py).
- **Commit on answer.** A step's k/v are written to the cache, and its sequence's length advanced, only once
  the step is answered with a result. A step cancelled, past its deadline, refused or failed leaves the
  sequence exactly as it was (its reserved blocks are given back): the forward itself never writes the cache.
- **Start required.** A step without ``start`` for an id that is not live (never started, ended, reaped,
  evicted, or lost with the engine) is refused with :class:`SequenceStartRequired`, in Triton's words.
  ``start`` on a live id starts it afresh (its cache dropped), with a warning in the log.
- **Too long.** A step that would take its sequence past ``max_seq_len`` is refused (422, naming both lengths);
  the sequence stays usable.
- **Full cache: evict, then 429.** When a step needs blocks and none are free, the sequences that are not in
  a step are evicted, least recently used first, until the step fits (counted as ``memory``); a client whose
  sequence was evicted gets the start-required error on its next step and replays its prefix (vLLM preempts
  and recomputes the same way). Only when every block belongs to a sequence that is in a step does the step
  get 429 (:class:`CacheFull`) with a Retry-After of the time until the least recently used sequence would be
  reaped. Eviction was chosen over refusing new sequences (TGI's way) so that abandoned sequences, the common
  case of a client that never sent ``end``, never block new ones until they are reaped.
- **Idle.** A sequence with no step for ``idle_s`` is reaped (``idle``), checked at each step and by
  :meth:`Sequences.reap`, which the engine calls periodically. Sequences dropped when the engine stops count
  as ``restart``.
"""

from __future__ import annotations

import asyncio
import logging
import math
import time
from collections import OrderedDict
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any, Protocol

import numpy as np
from torch import Tensor

from service.engine.kvcache import KVCache
from service.engine_api import SequenceFlags, SequenceId, SequenceStartRequired, StepInvalid, check_step
from service.messages import AttendInput, AttendOutput, Overloaded, Result

log = logging.getLogger("mha_serve.sequences")

__all__ = ["CacheFull", "SequenceId", "SequenceStartRequired", "Sequences", "Step", "StepInvalid"]


class CacheFull(Overloaded):
    """No block is free and none can be evicted: every block belongs to a sequence in a step."""


@dataclass(eq=False)
class Step:
    """One step of a sequence: an AttendInput plus the sequence fields. The batcher queues it as it would an
    AttendInput (it reads the same attributes); ``key`` keeps steps in forwards of their own."""

    input: AttendInput
    id: SequenceId
    start: bool = False
    end: bool = False
    # Set at admission, read by the step runner's thread: the cached positions and their slots in the pool.
    past: int = 0
    slots: Tensor | None = None
    span: Tensor | None = None  # the slots of every position the step will have, its own reserved ones last
    # Set by the step runner: the step's own keys and values (t, H, D), written to the cache on answer.
    new_k: Tensor | None = field(default=None, repr=False)
    new_v: Tensor | None = field(default=None, repr=False)

    @property
    def key(self) -> tuple:
        return ("sequence", self.input.need_weights)

    @property
    def x(self) -> Any:
        return self.input.x

    @property
    def batch(self) -> int:
        return self.input.x.shape[0]

    @property
    def seq_len(self) -> int:
        return self.input.x.shape[1]

    def __getattr__(self, name: str) -> Any:  # the rest of AttendInput's surface (need_weights, heads, fault, ...)
        if name == "input":
            raise AttributeError(name)
        return getattr(self.input, name)


class SequenceObserver(Protocol):
    """What the metrics hear (service/metrics.py's Metrics has these)."""

    def sequences_changed(self, active: int, cache_usage: float) -> None: ...
    def sequences_evicted(self, reason: str, n: int) -> None: ...


class _Live:
    __slots__ = ("last_used", "length", "lock", "stepping")

    def __init__(self, now: float) -> None:
        self.length = 0
        self.last_used = now
        self.stepping = 0  # steps of it admitted and not yet answered or waiting for their turn
        self.lock = asyncio.Lock()  # FIFO: its waiters get it in the order they asked


class Sequences:
    """The live sequences of one model and its cache. Lives on the engine's event loop."""

    def __init__(
        self,
        cache: KVCache,
        *,
        max_seq_len: int,
        idle_s: float,
        model_name: str = "mha",
        observer: SequenceObserver | None = None,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.cache = cache
        self.max_seq_len = max_seq_len
        self.idle_s = idle_s
        self.model_name = model_name
        self._obs = observer
        self._clock = clock
        self._live: OrderedDict[SequenceId, _Live] = OrderedDict()  # least recently used first
        self.evicted = {"idle": 0, "memory": 0, "restart": 0}

    @property
    def active(self) -> int:
        return len(self._live)

    def length(self, seq_id: SequenceId) -> int | None:
        live = self._live.get(seq_id)
        return None if live is None else live.length

    async def run(self, step: Step, compute: Callable[[Step], Awaitable[Result]]) -> Result:
        """Admit ``step`` in its sequence's turn, ``compute`` it (the batcher), commit it when answered."""
        check_step(step.input, SequenceFlags(step.id, step.start, step.end))
        self.reap()
        live = self._live.get(step.id)
        if live is None:
            if not step.start:
                raise self._start_required(step.id)
            live = self._live[step.id] = _Live(self._clock())
        live.stepping += 1
        try:
            await live.lock.acquire()
        except BaseException:
            live.stepping -= 1
            raise
        try:
            if self._live.get(step.id) is not live:  # ended, reaped or evicted while this step waited its turn
                if not step.start:
                    raise self._start_required(step.id)
                self._live[step.id] = live  # its own fresh start (the lock is this object's)
                live.length = 0
            elif step.start and live.length:
                log.warning("sequence %r started again while live: its %d cached tokens dropped", step.id, live.length)
                self.cache.release(step.id)
                live.length = 0
            return await self._step(live, step, compute)
        finally:
            live.stepping -= 1
            live.lock.release()
            self._changed()

    async def _step(self, live: _Live, step: Step, compute: Callable[[Step], Awaitable[Result]]) -> Result:
        past, t = live.length, step.seq_len
        if not t:  # an end-only step (check_step: end, no start): the sequence ends, nothing is computed
            self._drop(step.id)
            return Result(AttendOutput(np.zeros((1, 0, step.input.x.shape[-1]), np.float32), None), 0.0, 0.0, 0, 0)
        if past + t > self.max_seq_len:
            if not past:
                self._drop(step.id)
            raise StepInvalid(
                f"sequence {step.id!r} would be {past + t} tokens long ({past} cached + {t} in this step), more "
                f"than max_seq_len {self.max_seq_len}; the sequence is unchanged"
            )
        self._reserve(step.id, past + t, fresh=not past)
        step.past = past
        step.slots = self.cache.slots(step.id, past)
        step.span = self.cache.slots(step.id, past + t)
        try:
            result = await compute(step)
        except BaseException:
            if self._live.get(step.id) is live:
                if past:
                    self.cache.shrink(step.id, past)
                else:
                    self._drop(step.id)
            raise
        live.last_used = self._clock()
        self._live.move_to_end(step.id)
        if step.end:
            self._drop(step.id)
        else:
            self.cache.write(step.id, past, step.new_k, step.new_v)
            live.length = past + t
        step.new_k = step.new_v = step.slots = step.span = None
        return result

    def _reserve(self, seq_id: SequenceId, tokens: int, *, fresh: bool) -> None:
        need = self.cache.missing_blocks(seq_id, tokens)
        if need > self.cache.free_blocks:
            victims = []
            freed = self.cache.free_blocks
            for other, live in self._live.items():  # least recently used first
                if freed >= need:
                    break
                if other == seq_id or live.stepping:
                    continue
                victims.append(other)
                freed += self.cache.held_blocks(other)
            if freed >= need:
                for other in victims:
                    log.info("sequence %r evicted: the cache is full", other)
                    self._drop(other)
                self._count("memory", len(victims))
        if not self.cache.reserve(seq_id, tokens):
            if fresh:
                self._drop(seq_id)
            raise CacheFull(
                f"the KV cache is full ({self.cache.num_blocks} blocks of {self.cache.block_size} tokens, all "
                f"held by sequences in a step); this step needs {need} more",
                self._retry_after(),
            )

    def _retry_after(self) -> float:
        """Seconds until the least recently used sequence would be reaped (at least 1)."""
        now = self._clock()
        for live in self._live.values():
            return max(1.0, math.ceil(live.last_used + self.idle_s - now))
        return 1.0

    def reap(self) -> int:
        """Drop the sequences idle for ``idle_s`` (not those in a step). Returns how many."""
        cutoff = self._clock() - self.idle_s
        stale = [k for k, v in self._live.items() if v.last_used <= cutoff and not v.stepping]
        for k in stale:
            log.info("sequence %r reaped: idle for %.1f s", k, self.idle_s)
            self._drop(k)
        if stale:
            self._count("idle", len(stale))
            self._changed()
        return len(stale)

    def clear(self) -> None:
        """The engine stops: every live sequence is lost (counted as ``restart``)."""
        n = len(self._live)
        for k in list(self._live):
            self._drop(k)
        self._count("restart", n)
        self._changed()

    def _drop(self, seq_id: SequenceId) -> None:
        self._live.pop(seq_id, None)
        self.cache.release(seq_id)

    def _count(self, reason: str, n: int) -> None:
        if n:
            self.evicted[reason] += n
            if self._obs is not None:
                self._obs.sequences_evicted(reason, n)

    def _changed(self) -> None:
        if self._obs is not None:
            self._obs.sequences_changed(len(self._live), self.cache.usage)

    def _start_required(self, seq_id: SequenceId) -> SequenceStartRequired:
        return SequenceStartRequired(
            f"inference request for sequence {seq_id!r} to model '{self.model_name}' must specify the START flag "
            "on the first request of the sequence (the sequence is unknown: never started, ended, reaped after "
            f"{self.idle_s:g} s idle, or evicted)"
        )

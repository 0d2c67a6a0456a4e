"""Large JSON-list payloads parsed and written in worker processes, off the event loop.

orjson and numpy hold the GIL while they parse a body into Python floats and those into an
array, so a worker thread would stall the event loop just the same: a large lists request held
it for hundreds of milliseconds, and /healthz and every small request waited. Bodies of at least
``offload_min_bytes`` that hold number lists (/attend's, and v2's JSON ``data``: many commas;
base64 bodies have almost none and are cheap to parse, see ``many_commas``) go to a small
process pool (``decode_processes``); so do list responses of that size. The loop then only
copies bytes and arrays across a pipe. Everything smaller stays inline: no per-request cost on
the fast path. ``bench/stall.py`` measures both ways in one run. A worker that dies (killed,
out of memory) breaks the pool: it is replaced at once, and only the request it held fails.

The pool uses "spawn" and its worker module (service.frontend.offload_worker) imports no torch.
"""

from __future__ import annotations

import asyncio
import logging
import multiprocessing
import threading
from collections.abc import Callable
from concurrent.futures import ProcessPoolExecutor
from concurrent.futures.process import BrokenProcessPool
from typing import Any

import numpy as np

from mha_core import MHAConfig
from service.errors import ServiceError
from service.frontend import offload_worker
from service.frontend.decode import (
    BodyPlans,
    DecodedRequest,
    Limits,
    attend_body,
    decode_attend,
    decode_object,
    encode_attend,
    json_error,
)

log = logging.getLogger("mha_serve.offload")

_SNIFF = 65536  # bytes counted at once: a lists body has its commas here, unless led by whitespace
_LIST_COMMAS = 1024  # a lists body has a comma every few bytes; a base64 one a handful in all


def many_commas(body: bytes) -> bool:
    """Whether ``body`` holds at least _LIST_COMMAS commas anywhere: what makes a JSON body costly to parse
    is its number of values, and those need commas; whitespace, long strings and base64 have none.

    A lists body answers from its first window; anything else is searched at memchr speed, a small
    part of what decoding a base64 body costs, so no padding can hide its lists.
    """
    n = body.count(b",", 0, _SNIFF)
    at = _SNIFF - 1
    while n < _LIST_COMMAS:
        at = body.find(b",", at + 1)
        if at < 0:
            return False
        n += 1
    return True


CLOSE_JOIN_S = 1.0  # at most this long for the decode pool to wind down at close (it takes milliseconds)


class Offload:
    def __init__(self, processes: int, min_bytes: int) -> None:
        self.processes = processes
        self.min_bytes = min_bytes
        self.plans = BodyPlans()  # repeated base64 bodies: the parse and the checks of fields done once
        self._ctx = multiprocessing.get_context("spawn")  # no fork of a process that runs torch threads
        self._started = self._ctx.SimpleQueue() if processes > 0 else None  # each worker's pid, as it starts
        self._pids: set[int] = set()
        self._pool = self._new_pool() if processes > 0 else None

    def _new_pool(self) -> ProcessPoolExecutor:
        return ProcessPoolExecutor(
            self.processes, mp_context=self._ctx, initializer=offload_worker.started, initargs=(self._started,)
        )

    @property
    def enabled(self) -> bool:
        return self._pool is not None

    async def start(self) -> None:
        """Start the workers now, so the first large request does not pay for it."""
        if self._pool is not None:
            await asyncio.wrap_future(self._pool.submit(offload_worker.ready))

    def worker_pids(self) -> list[int]:
        """The pids of the decode processes alive now (started ones only: the pool starts them on demand)."""
        while self._started is not None and not self._started.empty():
            self._pids.add(self._started.get())
        alive = {p.pid for p in multiprocessing.active_children()}  # also reaps the exited ones
        self._pids &= alive
        return sorted(self._pids)

    def close(self) -> None:
        """Stop the workers at once (called after the drain: no request waits on them any more).

        They hold no state, and a clean join costs most of a second (each worker's interpreter
        shutdown), out of the one shutdown grace.
        """
        pool, self._pool = self._pool, None
        if pool is None:
            return
        pids = set(self.worker_pids())
        for p in multiprocessing.active_children():
            if p.pid in pids:
                p.terminate()
        # A front end ends by the SIGTERM it drained on, which runs no exit handlers: the semaphores of the pool's
        # queues and of ``_started`` are unlinked only if those are collected first (their finalizers unlink them);
        # otherwise the resource tracker warned of 5 leaked semaphores a front end at every shutdown. The pool's
        # manager thread holds its queues until it has seen its workers go, so the shutdown waits for it: in a
        # thread of its own, for a bounded time, so that a pool that does not wind down cannot hold the exit.
        joiner = threading.Thread(
            target=pool.shutdown, kwargs={"wait": True, "cancel_futures": True}, name="mha-decode-close", daemon=True
        )
        joiner.start()
        joiner.join(CLOSE_JOIN_S)
        self._started = None

    async def run(self, fn: Callable[..., Any], *args: Any) -> Any:
        """``fn(*args)`` in a decode process. A dead worker breaks the whole pool (BrokenProcessPool): the pool is
        replaced, the request that was in it is answered 503, and the requests after it are served."""
        pool = self._pool
        try:
            future = pool.submit(fn, *args)
        except BrokenProcessPool:  # broken before this request: it was in no worker, so it runs on the new pool
            pool = self._replace(pool)
            future = pool.submit(fn, *args)
        try:
            return await asyncio.wrap_future(future)
        except BrokenProcessPool as e:
            self._replace(pool)
            raise ServiceError(
                "unavailable", "a decode process died while it handled this request; the server replaced it: retry"
            ) from e

    def _replace(self, broken: ProcessPoolExecutor) -> ProcessPoolExecutor:
        """The pool in use, a new one in place of ``broken`` if that is still it (the first of the requests that
        meet a broken pool replaces it; the others use the new one)."""
        if self._pool is broken:
            log.warning("a decode process died: its pool is replaced")
            broken.shutdown(wait=False, cancel_futures=True)  # its other workers are already stopped by the pool
            self._pool = self._new_pool()
        return self._pool

    def wants(self, body: bytes) -> bool:
        """Whether parsing ``body`` goes to the decode processes: a large one with many values."""
        return self._pool is not None and len(body) >= self.min_bytes and many_commas(body)

    async def parse_v2(self, body: bytes) -> Any:
        """A v2 JSON body (or header) parsed in a decode process (``wants`` said so), its float and bool ``data``
        as arrays (service.frontend.v2 takes them as its inline decode makes them)."""
        return self._parsed(*await self.run(offload_worker.parse_v2, body))

    async def decode_attend(self, body: bytes, config: MHAConfig, limits: Limits) -> DecodedRequest:
        if not self.wants(body):
            return decode_attend(body, config, limits)
        obj = self._parsed(*await self.run(offload_worker.parse_lists, body))
        del body
        return decode_object(obj, config, limits)

    @staticmethod
    def _parsed(status: str, value: Any) -> Any:
        if status == "invalid":  # worded as an inline parse words it: the body is parsed once
            raise json_error(value)
        if status == "error":
            raise ServiceError(*value)
        return value

    def decode_now(self, body: bytes, config: MHAConfig, limits: Limits) -> DecodedRequest | None:
        """``decode_attend`` when it would run on the loop (base64 and small bodies), with no coroutine;
        None when the body goes to the pool (then await ``decode_attend``)."""
        if self.wants(body):
            return None
        return self.plans.decode(body, config, limits)

    async def encode_attend(
        self, output: np.ndarray, weights: np.ndarray | None, req: DecodedRequest, model: dict
    ) -> bytes:
        payload = self.encode_now(output, weights, req, model)
        if payload is not None:
            return payload
        obj = attend_body(output, weights, req, model)
        return await self.run(offload_worker.dumps, obj)

    def encode_now(
        self, output: np.ndarray, weights: np.ndarray | None, req: DecodedRequest, model: dict
    ) -> bytes | None:
        """``encode_attend`` when it would run on the loop (base64 always; lists when small), with no
        coroutine; None when the response is written in the pool (then await ``encode_attend``)."""
        if self._pool is not None and req.encoding == "lists":
            elements = output.size + (0 if weights is None else weights.size)
            if elements * 8 >= self.min_bytes:  # ~8+ bytes a number
                return None
        return encode_attend(output, weights, req, model)

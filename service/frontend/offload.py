"""Large JSON-list payloads parsed and written in worker processes, off the event loop.

orjson and numpy hold the GIL while they parse a body into Python floats and those into an
array, so a worker thread would stall the event loop just the same: a 54 MB lists request held
it for ~330 ms, and /healthz and every small request waited. Bodies of at least
``offload_min_bytes`` that look like number lists (many commas early on; base64 bodies have
almost none and are cheap to parse) go to a small process pool (``decode_processes``); so do
list responses of that size. The loop then only copies bytes and arrays across a pipe.
Everything smaller stays inline: no per-request cost on the fast path. ``bench/stall.py``
measures both ways in one run.

The pool uses "spawn" and its worker module (service.frontend.offload_worker) imports no torch.
"""

from __future__ import annotations

import asyncio
import logging
import multiprocessing
from concurrent.futures import ProcessPoolExecutor

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
)

log = logging.getLogger("mha_serve.offload")

_SNIFF = 65536  # bytes looked at to tell a lists body from a base64 one
_LIST_COMMAS = 1024  # a lists body has a comma every few bytes; a base64 one a handful in all


class Offload:
    def __init__(self, processes: int, min_bytes: int) -> None:
        self.min_bytes = min_bytes
        self.plans = BodyPlans()  # repeated base64 bodies: the parse and the checks of fields done once
        self._pool: ProcessPoolExecutor | None = None
        if processes > 0:
            ctx = multiprocessing.get_context("spawn")  # no fork of a process that runs torch threads
            self._pool = ProcessPoolExecutor(processes, mp_context=ctx, initializer=offload_worker.die_with_parent)

    @property
    def enabled(self) -> bool:
        return self._pool is not None

    async def start(self) -> None:
        """Start the workers now, so the first large request does not pay for it."""
        if self._pool is not None:
            await asyncio.wrap_future(self._pool.submit(offload_worker.ready))

    def close(self) -> None:
        """Stop the workers at once (called after the drain: no request waits on them any more).

        They hold no state, and a clean join costs most of a second (each worker's interpreter
        shutdown), out of the one shutdown grace.
        """
        if self._pool is not None:
            workers = list(getattr(self._pool, "_processes", {}).values())
            self._pool.shutdown(wait=False, cancel_futures=True)
            for p in workers:
                p.terminate()
            self._pool = None

    def _wants(self, body: bytes) -> bool:
        return self._pool is not None and len(body) >= self.min_bytes and body.count(b",", 0, _SNIFF) >= _LIST_COMMAS

    async def decode_attend(self, body: bytes, config: MHAConfig, limits: Limits) -> DecodedRequest:
        if not self._wants(body):
            return decode_attend(body, config, limits)
        status, value = await asyncio.wrap_future(self._pool.submit(offload_worker.parse_lists, body))
        if status == "invalid":
            return decode_attend(body, config, limits)  # raises the parse error, with its message
        if status == "error":
            raise ServiceError(*value)
        del body
        return decode_object(value, config, limits)

    def decode_now(self, body: bytes, config: MHAConfig, limits: Limits) -> DecodedRequest | None:
        """``decode_attend`` when it would run on the loop (base64 and small bodies), with no coroutine;
        None when the body goes to the pool (then await ``decode_attend``)."""
        if self._wants(body):
            return None
        return self.plans.decode(body, config, limits)

    async def encode_attend(
        self, output: np.ndarray, weights: np.ndarray | None, req: DecodedRequest, model: dict
    ) -> bytes:
        payload = self.encode_now(output, weights, req, model)
        if payload is not None:
            return payload
        obj = attend_body(output, weights, req, model)
        return await asyncio.wrap_future(self._pool.submit(offload_worker.dumps, obj))

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

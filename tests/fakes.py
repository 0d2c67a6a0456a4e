"""Fakes shared by the unit tests: of the batcher (tests/unit/test_batcher.py, test_priorities.py), and of a model
process's socket loop served over a stand-in batcher (test_shm.py, test_client_groups.py)."""

from __future__ import annotations

import asyncio
import contextlib
import threading
import time
from collections.abc import AsyncIterator

from service.messages import AttendInput, AttendOutput, BatchStats


class FakeRunner:
    """Doubles x; records each batch; can be held busy with a gate, or told to fail."""

    def __init__(self, delay: float = 0.0) -> None:
        self.batches: list[list[AttendInput]] = []
        self.gate = threading.Event()
        self.gate.set()
        self.started = threading.Event()
        self.delay = delay
        self.fail_on: float | None = None  # a request whose x[0,0,0] equals this makes the forward raise

    def __call__(self, items):
        self.started.set()
        self.gate.wait(5)
        time.sleep(self.delay)
        self.batches.append(items)
        if self.fail_on is not None and any(it.x[0, 0, 0] == self.fail_on for it in items):
            raise RuntimeError("boom")
        T = max(it.seq_len for it in items)
        n = sum(it.batch for it in items)
        real = sum(it.batch * it.seq_len for it in items)
        return [AttendOutput(it.x * 2, None) for it in items], BatchStats(n, n * T, real, self.delay + 1e-4)

    @property
    def order(self) -> list[list[float]]:
        """x[0,0,0] of each request, batch by batch, in the order they reached the model."""
        return [[float(it.x[0, 0, 0]) for it in batch] for batch in list(self.batches)]

    @property
    def flat(self) -> list[float]:
        return [v for batch in self.order for v in batch]


class StubBatcher:
    """What the model process's ``Engine`` asks of its batcher besides ``submit``: running, ``cancel`` (counted) and
    an empty queue. Subclasses answer ``submit``."""

    running = True

    def __init__(self) -> None:
        self.cancelled = 0

    def cancel(self, handle, reason="disconnect"):
        self.cancelled += 1

    def queue_depth(self):
        return (0, 0)


@contextlib.asynccontextmanager
async def serving_engine(
    tmp_path, monkeypatch, batcher: StubBatcher, arena_bytes: int | None = None, arena_max_bytes: int | None = None
) -> AsyncIterator:
    """A model process's ``Engine`` serving ``batcher`` at its address, in this event loop. Arrays of 4 KiB or more
    cross through the arenas (the tests' small ones); with ``arena_bytes``, the arenas are that large and grow to
    ``arena_max_bytes`` (by default they do not)."""
    from service import messages, shm
    from service.engine.process import Engine
    from service.settings import Settings

    if arena_bytes is not None:
        monkeypatch.setattr(shm, "ARENA_BYTES", arena_bytes)
        monkeypatch.setattr(shm, "ARENA_MAX_BYTES", arena_max_bytes or arena_bytes)
    monkeypatch.setattr(messages, "PACK_BELOW", 1 << 12)
    monkeypatch.setattr(messages, "SHM_MIN", 1 << 12)
    engine = Engine(Settings(), f"ipc://{tmp_path}/engine.sock")
    engine.batcher = batcher
    engine.info = {"model_info": {}, "config": {"num_heads": 2, "emb_size": 64, "head_size": 32, "max_seq_len": 64}}
    engine.bind()
    serving = asyncio.create_task(engine.serve())
    try:
        yield engine
    finally:
        engine._stop.set()
        await serving
        engine.close()

"""Fakes shared by the unit tests of the batcher (tests/unit/test_batcher.py, test_priorities.py)."""

from __future__ import annotations

import threading
import time

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

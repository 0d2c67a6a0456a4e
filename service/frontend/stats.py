"""Triton's statistics extension for the served model, from the batcher's own figures.

Two sources, as in Triton:
- per request (``request_done`` / ``request_failed``, called by the inference routes: /attend,
  v2 HTTP and gRPC): success and fail (end-to-end time), queue and compute_infer (the batcher's
  ``Result.queue_s`` and ``compute_s``: the forward pass the request shared), compute_input (body
  to checked tensors) and compute_output (result to response bytes), inference_count (sequences);
- per forward pass (a ``BatcherObserver``): execution_count, and ``batch_stats`` by batch size
  (sequences in the pass), whose compute_infer is the pass's time. The runner pads, stacks and
  unpads inside that time, so a batch's compute_input and compute_output count executions with
  0 ns.

Everything runs on the event loop: plain integers, no locks. With several processes (a model
process and its front ends) ``SharedModelStats`` keeps them instead, in
``service.metrics.TritonCounters``: one model, one set of statistics, whichever front end answers.
"""

from __future__ import annotations

import time
from typing import Any

from service.messages import BatcherObserver, BatchStats, Result
from service.metrics import TritonCounters

_NS = 1_000_000_000
_PHASES = ("success", "fail", "queue", "compute_input", "compute_infer", "compute_output", "cache_hit", "cache_miss")


class _Duration:
    __slots__ = ("count", "ns")

    def __init__(self) -> None:
        self.count = 0
        self.ns = 0

    def add(self, seconds: float, count: int = 1) -> None:
        self.count += count
        self.ns += max(0, int(seconds * _NS))

    def json(self) -> dict[str, int]:
        return {"count": self.count, "ns": self.ns}


class ModelStats(BatcherObserver):
    def __init__(self) -> None:
        self.phases = {p: _Duration() for p in _PHASES}
        self.inference_count = 0
        self.execution_count = 0
        self.last_inference_ms = 0
        self.batches: dict[int, _Duration] = {}

    # -- the inference routes -------------------------------------------------------------------

    def request_done(self, *, sequences: int, started: float, decoded: float, answered: float, res: Result) -> None:
        """A request answered: ``started``, ``decoded`` and ``answered`` are its monotonic times on arrival,
        once its tensors were checked, and once its result came back; encoding ends now."""
        done = time.monotonic()
        p = self.phases
        p["success"].add(done - started)
        p["queue"].add(res.queue_s)
        p["compute_input"].add(decoded - started)
        p["compute_infer"].add(res.compute_s)
        p["compute_output"].add(done - answered)
        self.inference_count += sequences
        self.last_inference_ms = int(time.time() * 1000)

    def request_failed(self, total_s: float) -> None:
        self.phases["fail"].add(total_s)

    # -- BatcherObserver ------------------------------------------------------------------------

    def batch_done(self, requests: int, stats: BatchStats, queue_waits_s: list[float]) -> None:
        if stats.sequences < 1:
            return  # a lone request that failed: nothing was executed
        self.execution_count += 1
        self.batches.setdefault(stats.sequences, _Duration()).add(stats.compute_s)

    # -- the wire (Triton's JSON; the gRPC servicer parses the same dict into its messages) -------

    def model_stats(self, name: str, version: str) -> dict[str, Any]:
        return {
            "name": name,
            "version": version,
            "last_inference": self.last_inference_ms,
            "inference_count": self.inference_count,
            "execution_count": self.execution_count,
            "inference_stats": {p: d.json() for p, d in self.phases.items()},
            "batch_stats": [
                {
                    "batch_size": size,
                    "compute_input": {"count": d.count, "ns": 0},
                    "compute_infer": d.json(),
                    "compute_output": {"count": d.count, "ns": 0},
                }
                for size, d in sorted(self.batches.items())
            ],
            "memory_usage": [],
        }


class SharedModelStats(ModelStats):
    """A front-end process's statistics: the service's totals over every process (TritonCounters).

    Its routes add the per-request part; the model process adds the per-batch part; ``model_stats``
    reads the sum of all of them.
    """

    def __init__(self) -> None:
        super().__init__()
        self.counters = TritonCounters()

    def request_done(self, *, sequences: int, started: float, decoded: float, answered: float, res: Result) -> None:
        done = time.monotonic()
        c = self.counters
        ns = c.phase_ns
        c.success.inc()
        ns["success"].inc(max(0, int((done - started) * _NS)))
        ns["queue"].inc(max(0, int(res.queue_s * _NS)))
        ns["compute_input"].inc(max(0, int((decoded - started) * _NS)))
        ns["compute_infer"].inc(max(0, int(res.compute_s * _NS)))
        ns["compute_output"].inc(max(0, int((done - answered) * _NS)))
        c.inferences.inc(sequences)
        c.last_ms.set(int(time.time() * 1000))

    def request_failed(self, total_s: float) -> None:
        self.counters.fail.inc()
        self.counters.phase_ns["fail"].inc(max(0, int(total_s * _NS)))

    def batch_done(self, requests: int, stats: BatchStats, queue_waits_s: list[float]) -> None:
        self.counters.batch_done(requests, stats, queue_waits_s)  # (the model process's batcher calls it)

    def model_stats(self, name: str, version: str) -> dict[str, Any]:
        t = TritonCounters.totals()

        def one(key: str, label: str = "") -> int:
            return int(t.get(key, {}).get(label, 0))

        done = one("success")
        self.phases = {p: _Duration() for p in _PHASES}
        for phase, d in self.phases.items():
            d.count = one("fail") if phase == "fail" else done if phase in ("success", *TritonCounters.PHASES) else 0
            d.ns = one("ns", phase)
        self.inference_count = one("inferences")
        self.execution_count = one("executions")
        self.last_inference_ms = one("last_ms")
        self.batches = {}
        for size, count in t.get("batches", {}).items():
            d = self.batches[int(size)] = _Duration()
            d.count, d.ns = int(count), one("batch_ns", size)
        return super().model_stats(name, version)

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

import asyncio
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
        p = self.phases
        self._success, self._queue, self._input = p["success"], p["queue"], p["compute_input"]
        self._infer, self._output = p["compute_infer"], p["compute_output"]
        self.inference_count = 0
        self.execution_count = 0
        self.last_inference_ms = 0
        self.batches: dict[int, _Duration] = {}
        self._done: list[tuple] = []  # answered requests not yet added: (done, started, decoded, answered, res, n)

    # -- the inference routes -------------------------------------------------------------------

    def request_done(self, *, sequences: int, started: float, decoded: float, answered: float, res: Result) -> None:
        """A request answered: ``started``, ``decoded`` and ``answered`` are its monotonic times on arrival,
        once its tensors were checked, and once its result came back; encoding ends now. Added to the figures
        at the end of the event loop's turn, with the turn's other requests (``add_done``), or when read."""
        self._done.append((time.monotonic(), started, decoded, answered, res, sequences))
        if len(self._done) == 1:  # the first since the last add: add them at the end of this turn
            try:
                loop = asyncio.get_running_loop()
            except RuntimeError:  # no loop: add them now
                self.add_done()
            else:
                loop.call_soon(self.add_done)

    def add_done(self) -> None:
        """Add the requests answered since the last call to the figures."""
        done, self._done = self._done, []
        if not done:
            return
        success, queue, inp, infer, output = self._success, self._queue, self._input, self._infer, self._output
        for d in (success, queue, inp, infer, output):
            d.count += len(done)
        for end, started, decoded, answered, res, sequences in done:
            for d, seconds in (
                (success, end - started),
                (queue, res.queue_s),
                (inp, decoded - started),
                (infer, res.compute_s),
                (output, end - answered),
            ):
                if seconds > 0:
                    d.ns += int(seconds * _NS)
            self.inference_count += sequences
        last = done[-1][0]  # the last answer's wall-clock time
        self.last_inference_ms = int((time.time() - (time.monotonic() - last)) * 1000)

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
        if self._done:
            self.add_done()
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

    Its routes add the per-request part, as ModelStats does, and what they added goes to the shared
    counters once per turn of the event loop (a batch's answers arrive in one message, so under
    load one write serves many requests); the model process adds the
    per-batch part; ``model_stats`` reads the sum over every process.
    """

    def __init__(self) -> None:
        super().__init__()
        self.counters = TritonCounters()
        self._published: dict[str, int] = {}  # what the shared counters already hold of this process's figures
        self._publish_scheduled = False

    def add_done(self) -> None:
        """The turn's answers, added, go to the shared counters at once (once a turn, as they are added)."""
        super().add_done()
        self._publish()

    def request_failed(self, total_s: float) -> None:
        super().request_failed(total_s)
        self._schedule()

    def _schedule(self) -> None:
        if not self._publish_scheduled:
            self._publish_scheduled = True
            asyncio.get_running_loop().call_soon(self._publish)

    def _publish(self) -> None:
        self._publish_scheduled = False
        c, p, seen = self.counters, self.phases, self._published

        def add(key: str, value: int, counter: Any) -> None:
            delta = value - seen.get(key, 0)
            if delta:
                counter.inc(delta)
                seen[key] = value

        add("success", p["success"].count, c.success)
        add("fail", p["fail"].count, c.fail)
        for phase, counter in c.phase_ns.items():
            add(phase + "_ns", p[phase].ns, counter)
        add("inferences", self.inference_count, c.inferences)
        if self.last_inference_ms != seen.get("last_ms"):
            c.last_ms.set(self.last_inference_ms)
            seen["last_ms"] = self.last_inference_ms

    def model_stats(self, name: str, version: str) -> dict[str, Any]:
        if self._done:  # this process's own latest figures first
            self.add_done()
        if self._publish_scheduled:
            self._publish()
        t = TritonCounters.totals()

        def one(key: str, label: str = "") -> int:
            return int(t.get(key, {}).get(label, 0))

        view = ModelStats()
        done = one("success")
        for phase, d in view.phases.items():
            d.count = one("fail") if phase == "fail" else done if phase in ("success", *TritonCounters.PHASES) else 0
            d.ns = one("ns", phase)
        view.inference_count = one("inferences")
        view.execution_count = one("executions")
        view.last_inference_ms = one("last_ms")
        for size, count in t.get("batches", {}).items():
            d = view.batches[int(size)] = _Duration()
            d.count, d.ns = int(count), one("batch_ns", size)
        return view.model_stats(name, version)

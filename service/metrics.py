"""Prometheus metrics, one registry per app (so tests can build many apps).

What an autoscaler reads: ``mha_requests_in_flight`` (per replica; the KEDA trigger in
docker/k8s/autoscaling/) and ``mha_queue_depth_requests``/``_tokens``. What an operator reads besides:
batch size and padding ratio per forward pass, the drain rate (how many real tokens a second of
compute serves: queue tokens / drain rate is the wait a newcomer faces, and what Retry-After says),
time in queue per request and in compute per batch. docs/operating.md's Metrics table lists them all.

With several processes (``MHA_WORKERS`` >= 2) every process writes its values to
PROMETHEUS_MULTIPROC_DIR (prometheus_client's multiprocess mode; the parent creates the directory
and removes it at exit) and ``/metrics``, in whichever front end answers, merges them all:
counters and histograms add up, the in-flight and queue gauges add up over live processes, the
drain rate and limit scale are the model process's latest values.
"""

from __future__ import annotations

import asyncio
import os
from bisect import bisect_left
from typing import Any

from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Counter, Gauge, Histogram, generate_latest

from service.messages import BatcherObserver, BatchStats

_DRAIN_ALPHA = 0.2  # weight of the newest batch in the drain-rate average
_LATENCY = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30)


class RequestTally:
    """The HTTP requests' metrics, as the middleware counts them, written once per turn of the event loop
    (``flush``, scheduled by the first change), not once per request: each write takes a lock, and with
    several processes writes a shared file. The in-flight gauge and the request counters are written
    once; the latencies of a turn are observed together (``observe_all``), one write per bucket touched."""

    def __init__(self, metrics: Metrics) -> None:
        self.metrics = metrics
        self.in_flight = 0  # inference requests being handled in this process
        self._written = 0
        self._counts: dict[tuple[str, int], int] = {}
        self._latencies: dict[str, list[float]] = {}
        self._counters: dict[tuple[str, int], Any] = {}  # labels() locks and checks on each call
        self._histograms: dict[str, Any] = {}
        self._scheduled = False

    def schedule(self) -> None:
        if not self._scheduled:
            self._scheduled = True
            asyncio.get_running_loop().call_soon(self.flush)

    def done(self, route: str, status: int, elapsed_s: float) -> None:
        key = (route, status)
        self._counts[key] = self._counts.get(key, 0) + 1
        seconds = self._latencies.get(route)
        if seconds is None:
            self._latencies[route] = [elapsed_s]
        else:
            seconds.append(elapsed_s)
        self.schedule()

    def flush(self) -> None:
        """Write what was counted since the last flush (and before any later request, a scrape included)."""
        self._scheduled = False
        m = self.metrics
        if self.in_flight != self._written:
            self._written = self.in_flight
            m.in_flight.set(self.in_flight)
        counts, self._counts = self._counts, {}
        for key, n in counts.items():
            counter = self._counters.get(key)
            if counter is None:
                counter = self._counters[key] = m.requests.labels(key[0], str(key[1]))
            counter.inc(n)
        latencies, self._latencies = self._latencies, {}
        for route, seconds in latencies.items():
            histogram = self._histograms.get(route)
            if histogram is None:
                histogram = self._histograms[route] = m.latency.labels(route)
            observe_all(histogram, seconds)


def observe_all(histogram: Any, values: list[float]) -> None:
    """``histogram.observe(v)`` for each of ``values``, with the same bucket counts, count and sum (the same
    float: added in observe's order), in one write per bucket touched and one for the sum (each ``observe``
    writes two values: in multiprocess mode two memory-mapped writes). The sum is read and
    written back, not incremented: each histogram must have one writer thread, as both callers' do (the
    event loop's: the request tally, the batch observer). Relies on prometheus_client's Histogram keeping
    its upper bounds, sum and per-bucket values as ``_upper_bounds``, ``_sum`` and ``_buckets`` (since
    0.4; tests/unit/test_metrics_tally.py compares with ``observe`` to catch a change); otherwise
    ``observe`` each."""
    bounds = getattr(histogram, "_upper_bounds", None)
    buckets = getattr(histogram, "_buckets", None)
    total = getattr(histogram, "_sum", None)
    if len(values) < 2 or bounds is None or buckets is None or not hasattr(total, "set") or len(bounds) != len(buckets):
        for v in values:
            histogram.observe(v)
        return
    counts = [0] * len(bounds)
    s = total.get()
    for v in values:
        s += v
        counts[bisect_left(bounds, v)] += 1  # the first bound >= v, as observe picks (the last is +Inf)
    if s != s:  # a NaN among them, which observe counts in no bucket (bisect put it in the first)
        counts = [0] * len(bounds)
        for v in values:
            if v == v:
                counts[bisect_left(bounds, v)] += 1
    total.set(s)
    for i, n in enumerate(counts):
        if n:
            buckets[i].inc(n)


class Metrics(BatcherObserver):
    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        r = self.registry
        self.requests = Counter("mha_requests", "HTTP requests by route and status", ["route", "status"], registry=r)
        self.latency = Histogram(
            "mha_request_latency_seconds",
            "End-to-end request latency by route",
            ["route"],
            buckets=_LATENCY,
            registry=r,
        )
        self.in_flight = Gauge(
            "mha_requests_in_flight",
            "Inference requests (/attend, /attend/heatmap, /v2 infer) being handled: reading, queued, computing, "
            "answering",
            multiprocess_mode="livesum",
            registry=r,
        )
        self.tally = RequestTally(self)
        self.tokens = Counter(
            "mha_tokens", "Tokens through forward passes: real (requested) and padded (computed)", ["kind"], registry=r
        )
        self.drain_rate = Gauge(
            "mha_drain_rate_tokens_per_second",
            "Real tokens served per second of forward pass (moving average over batches): the queue's drain rate",
            multiprocess_mode="mostrecent",
            registry=r,
        )
        self.queue_requests = Gauge(
            "mha_queue_depth_requests",
            "Requests waiting in the batcher's queue",
            multiprocess_mode="livesum",
            registry=r,
        )
        self.queue_tokens = Gauge(
            "mha_queue_depth_tokens", "Tokens (B x T) waiting in the queue", multiprocess_mode="livesum", registry=r
        )
        self.level_queue_requests = Gauge(
            "mha_priority_queue_depth_requests",
            "Requests waiting at each priority level (1 = highest; only with MHA_PRIORITY_LEVELS >= 2)",
            ["priority"],
            multiprocess_mode="livesum",
            registry=r,
        )
        self.level_queue_tokens = Gauge(
            "mha_priority_queue_depth_tokens",
            "Tokens (B x T) waiting at each priority level",
            ["priority"],
            multiprocess_mode="livesum",
            registry=r,
        )
        self.batch_requests = Histogram(
            "mha_batch_size_requests",
            "Requests that shared one forward pass",
            buckets=(1, 2, 4, 8, 16, 32, 64, 128),
            registry=r,
        )
        self.batch_sequences = Histogram(
            "mha_batch_size_sequences",
            "Sequences in one forward pass",
            buckets=(1, 2, 4, 8, 16, 32, 64, 128),
            registry=r,
        )
        self.padding_ratio = Histogram(
            "mha_batch_padding_ratio",
            "Padded tokens / real tokens of a forward pass",
            buckets=(1.0, 1.05, 1.1, 1.25, 1.5, 2, 3, 4, 8),
            registry=r,
        )
        self.queue_wait = Histogram(
            "mha_queue_wait_seconds", "Time a request waited before compute", buckets=_LATENCY, registry=r
        )
        self.compute = Histogram("mha_compute_seconds", "Forward pass time of a batch", buckets=_LATENCY, registry=r)
        self.dropped_total = Counter(
            "mha_requests_dropped", "Requests dropped before or after compute", ["reason"], registry=r
        )
        self.limit_scale = Gauge(
            "mha_batch_limit_scale",
            "Scale of the batch limits: 1, or less after out-of-memory errors",
            multiprocess_mode="mostrecent",
            registry=r,
        )
        self.limit_scale.set(1)
        self._drain = 0.0
        self._real_tokens, self._padded_tokens = self.tokens.labels("real"), self.tokens.labels("padded")
        self.batch_failures = Counter(
            "mha_batch_failures", "Batches whose forward raised (then retried one by one)", registry=r
        )
        self.shm_fallbacks = Counter(
            "mha_shm_fallbacks",
            "Arrays of 64 KiB or more that crossed between a front end and the model process as socket frames, "
            "because the sender's shared-memory arena was full and could not grow (MHA_SHM_ARENA_MAX_MIB, or no room "
            "in /dev/shm): slower, never failed; by sender "
            "(front_end: request arrays; model: answers, which a front end holds until their response is written)",
            ["sender"],
            registry=r,
        )
        self.kv_cache_usage = Gauge(
            "mha_kv_cache_usage_ratio",
            "Blocks of the sequences' KV cache held by live sequences / all blocks (MHA_KV_CACHE_BYTES)",
            multiprocess_mode="mostrecent",
            registry=r,
        )
        self.sequences_active = Gauge(
            "mha_sequences_active", "Live sequences (started, not ended, reaped or evicted)", registry=r
        )
        self.evicted_total = Counter(
            "mha_sequences_evicted",
            "Sequences dropped before their end: idle (MHA_SEQUENCE_IDLE_S), memory (the cache was full), restart "
            "(the engine stopped)",
            ["reason"],
            registry=r,
        )
        self.steps_per_forward = Histogram(
            "mha_sequence_steps_per_forward",
            "Sequence steps that shared one forward pass (continuous batching)",
            buckets=(1, 2, 4, 8, 16, 32, 64, 128),
            registry=r,
        )

    # BatcherObserver
    def queue_changed(self, requests: int, tokens: int) -> None:
        self.queue_requests.set(requests)
        self.queue_tokens.set(tokens)

    def level_queue_changed(self, level: int, requests: int, tokens: int) -> None:
        self.level_queue_requests.labels(str(level)).set(requests)
        self.level_queue_tokens.labels(str(level)).set(tokens)

    def batch_done(self, requests: int, stats: BatchStats, queue_waits_s: list[float]) -> None:
        self.batches_done([(requests, stats, queue_waits_s)])

    def batches_done(self, batches: list[tuple[int, BatchStats, list[float]]]) -> None:
        """``batch_done`` of each, in order, written together: one write per bucket touched and one per sum, as
        ``observe_all`` does, the same values as one ``batch_done`` after the other (EngineMetrics' flush)."""
        observe_all(self.batch_requests, [requests for requests, _, _ in batches])
        observe_all(self.batch_sequences, [stats.sequences for _, stats, _ in batches])
        observe_all(self.padding_ratio, [s.padded_tokens / s.real_tokens for _, s, _ in batches if s.real_tokens])
        observe_all(self.compute, [stats.compute_s for _, stats, _ in batches])
        observe_all(self.queue_wait, [w for _, _, waits in batches for w in waits])  # not two writes per request
        real = padded = 0
        drain = self._drain
        for _, stats, _ in batches:
            real += stats.real_tokens
            padded += stats.padded_tokens
            if stats.compute_s > 0 and stats.real_tokens:
                rate = stats.real_tokens / stats.compute_s  # the batcher's Retry-After estimate, same average
                drain = rate if drain == 0 else _DRAIN_ALPHA * rate + (1 - _DRAIN_ALPHA) * drain
        if real:
            self._real_tokens.inc(real)
        if padded:
            self._padded_tokens.inc(padded)
        if drain != self._drain:
            self._drain = drain
            self.drain_rate.set(drain)

    def dropped(self, reason: str) -> None:
        self.dropped_total.labels(reason).inc()

    def batch_failed(self, requests: int) -> None:
        self.batch_failures.inc()

    def limits_scaled(self, scale: float) -> None:
        self.limit_scale.set(scale)

    # service.engine.sequences.SequenceObserver, and the step runner's forwards
    def sequences_changed(self, active: int, cache_usage: float) -> None:
        self.sequences_active.set(active)
        self.kv_cache_usage.set(cache_usage)

    def sequences_evicted(self, reason: str, n: int) -> None:
        self.evicted_total.labels(reason).inc(n)

    def steps_forward(self, steps: int) -> None:
        self.steps_per_forward.observe(steps)


class TritonCounters(BatcherObserver):
    """Triton's statistics (service/frontend/stats.py) with several processes: prometheus_client
    multiprocess counters, so that every process adds to one total.

    Each process writes its own values to PROMETHEUS_MULTIPROC_DIR (memory-mapped files, as the
    metrics above): the model process the per-batch part (``batch_done``: executions and batch
    sizes), each front end the per-request part (its routes' ``request_done``/``request_failed``).
    ``totals()``, in whichever front end answers the stats request, merges every process's values
    at once (no message, no lag), dead front ends' included. They are not metrics: /metrics leaves
    them out (``exposition``).
    """

    PREFIX = "mha_triton_stats_"
    PHASES = ("queue", "compute_input", "compute_infer", "compute_output")  # each success adds one to all

    def __init__(self) -> None:
        r = CollectorRegistry()  # its own: the names must not reach an app's /metrics registry
        p = self.PREFIX
        self.ns = Counter(p + "ns", "Nanoseconds by phase (success, fail, queue, compute_*)", ["phase"], registry=r)
        self.fail = Counter(p + "fail", "Failed requests", registry=r)
        self.success = Counter(p + "success", "Answered requests (and the count of each phase)", registry=r)
        self.inferences = Counter(p + "inferences", "Sequences answered", registry=r)
        self.executions = Counter(p + "executions", "Forward passes", registry=r)
        self.batch_ns = Counter(p + "batch_ns", "Forward nanoseconds by batch size", ["size"], registry=r)
        self.batches = Counter(p + "batches", "Forward passes by batch size (sequences)", ["size"], registry=r)
        self.last_ms = Gauge(p + "last_ms", "Last answer, ms since the epoch", multiprocess_mode="max", registry=r)
        self.phase_ns = {ph: self.ns.labels(ph) for ph in ("success", "fail", *self.PHASES)}

    def batch_done(self, requests: int, stats: BatchStats, queue_waits_s: list[float]) -> None:
        self.batches_done([(requests, stats, queue_waits_s)])

    def batches_done(self, batches: list[tuple[int, BatchStats, list[float]]]) -> None:
        """``batch_done`` of each, written together: one write per counter (and per batch size) touched."""
        sizes: dict[int, list[int]] = {}  # sequences -> [forward passes, their nanoseconds]
        for _, stats, _ in batches:
            if stats.sequences < 1:
                continue  # a lone request that failed: nothing was executed
            d = sizes.get(stats.sequences)
            if d is None:
                d = sizes[stats.sequences] = [0, 0]
            d[0] += 1
            d[1] += max(0, int(stats.compute_s * 1e9))
        if not sizes:
            return
        self.executions.inc(sum(n for n, _ in sizes.values()))
        for sequences, (n, ns) in sizes.items():
            size = str(sequences)
            self.batches.labels(size).inc(n)
            self.batch_ns.labels(size).inc(ns)

    @classmethod
    def totals(cls) -> dict[str, dict[str, float]]:
        """{sample name (the ``_total`` left off): {label value or "": value}} summed over every process."""
        from prometheus_client import multiprocess

        out: dict[str, dict[str, float]] = {}
        for family in multiprocess.MultiProcessCollector(None).collect():
            if not family.name.startswith(cls.PREFIX):
                continue
            for sample in family.samples:
                label = next(iter(sample.labels.values()), "")
                name = sample.name.removeprefix(cls.PREFIX).removesuffix("_total")
                out.setdefault(name, {})[label] = sample.value
        return out


class EngineMetrics(Metrics):
    """The model process's metrics and Triton's per-batch statistics, written at each front end's ping, not at
    each batch.

    In multiprocess mode every value written takes a lock and writes a memory-mapped file: at ~14 requests a
    batch the per-batch writes (4 histograms, the queue waits, tokens, drain rate, Triton's counters, the queue
    gauges) were 5 of the model process's ~33 us of CPU a request (bench/procs.py --noop, this observer's hooks
    left out: 26.4 -> 21.0 us for its event loop). So the batcher's observations are kept here, in plain lists
    and counts, and ``flush`` writes them together (``batches_done``: one write per bucket and counter touched),
    the same values, in the same order, as one write each. The model process flushes when a front end pings
    (every HEARTBEAT_S from each) before its heartbeat answers: so a front end that reads the metrics or the
    statistics pings first and waits for that heartbeat (``MPClient.flush_statistics``), and reads every batch
    answered before it asked."""

    FLUSH_AT = 256  # batches kept at most before a flush, whoever pings

    def __init__(self) -> None:
        super().__init__()
        self.triton = TritonCounters()
        self._batches: list[tuple[int, BatchStats, list[float]]] = []
        self._queue: tuple[int, int] | None = None
        self._levels: dict[int, tuple[int, int]] = {}
        self._dropped: dict[str, int] = {}

    def queue_changed(self, requests: int, tokens: int) -> None:
        self._queue = (requests, tokens)

    def level_queue_changed(self, level: int, requests: int, tokens: int) -> None:
        self._levels[level] = (requests, tokens)

    def batch_done(self, requests: int, stats: BatchStats, queue_waits_s: list[float]) -> None:
        self._batches.append((requests, stats, queue_waits_s))
        if len(self._batches) >= self.FLUSH_AT:
            self.flush()

    def dropped(self, reason: str) -> None:
        self._dropped[reason] = self._dropped.get(reason, 0) + 1

    def flush(self) -> None:
        """Write what was observed since the last flush."""
        if self._queue is not None:
            super().queue_changed(*self._queue)
            self._queue = None
        if self._levels:
            levels, self._levels = self._levels, {}
            for level, (requests, tokens) in levels.items():
                super().level_queue_changed(level, requests, tokens)
        if self._batches:
            batches, self._batches = self._batches, []
            self.batches_done(batches)
            self.triton.batches_done(batches)
        if self._dropped:
            dropped, self._dropped = self._dropped, {}
            for reason, n in dropped.items():
                self.dropped_total.labels(reason).inc(n)


class _WithoutTritonStats:
    """A collector: every process's merged values but Triton's statistics (TritonCounters)."""

    def __init__(self, inner: object) -> None:
        self._inner = inner

    def collect(self):
        return [f for f in self._inner.collect() if not f.name.startswith(TritonCounters.PREFIX)]


def exposition(registry: CollectorRegistry) -> tuple[bytes, str]:
    """The text exposition: this app's registry, or, in multiprocess mode, every process's values merged."""
    if os.environ.get("PROMETHEUS_MULTIPROC_DIR"):
        from prometheus_client import multiprocess

        merged = CollectorRegistry()
        merged.register(_WithoutTritonStats(multiprocess.MultiProcessCollector(None)))
        return generate_latest(merged), CONTENT_TYPE_LATEST
    return generate_latest(registry), CONTENT_TYPE_LATEST

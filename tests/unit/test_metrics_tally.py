"""service.metrics: the request tally writes once per turn, and a turn's latencies observed together are
what ``observe`` of each would have written (the test that catches a prometheus_client change of the
Histogram internals ``observe_all`` relies on)."""

from __future__ import annotations

import asyncio
import random
import subprocess
import sys
import textwrap

from prometheus_client import CollectorRegistry, Histogram, generate_latest

from service.messages import BatchStats
from service.metrics import _LATENCY, EngineMetrics, Metrics, TritonCounters, observe_all

# bounds themselves (observe counts v <= bound in that bucket), between them, zero, beyond the last finite one
VALUES = [0.0, 0.001, 0.0010001, 0.0025, 0.004, 0.05, 0.05, 0.7, 2.5, 29.9, 30.0, 31.0, 1e9, 0.0003]


def exposition(fill) -> list[str]:
    registry = CollectorRegistry()
    h = Histogram("lat", "latency", ["route"], buckets=_LATENCY, registry=registry)
    fill(h.labels("/v2"))
    return [ln for ln in generate_latest(registry).decode().splitlines() if "_created" not in ln]


def test_observe_all_writes_what_observe_of_each_writes():
    def each(child):
        for v in VALUES:
            child.observe(v)

    want = exposition(each)
    assert 'lat_bucket{le="0.001",route="/v2"} 3.0' in want  # 0.0, 0.001 and 0.0003: the bound is inclusive
    assert 'lat_bucket{le="+Inf",route="/v2"} 14.0' in want
    assert exposition(lambda child: observe_all(child, VALUES)) == want
    assert exposition(lambda child: observe_all(child, VALUES[:1])) == exposition(lambda c: c.observe(VALUES[0]))


def test_observe_all_counts_a_nan_in_no_bucket_as_observe_does():
    values = [0.002, float("nan"), 0.3, float("inf")]

    def each(child):
        for v in values:
            child.observe(v)

    want = exposition(each)
    assert 'lat_bucket{le="0.001",route="/v2"} 0.0' in want and 'lat_sum{route="/v2"} NaN' in want
    assert exposition(lambda child: observe_all(child, values)) == want


def batches() -> list[list[float]]:
    """Queue waits of successive batches: the bounds themselves and between them, then ordinary waits (whose
    float sum depends on the order of the additions), a lone request, and a batch with none."""
    rng = random.Random(11)
    waits = [[rng.expovariate(200.0) for _ in range(n)] for n in (32, 7, 64, 3)]
    return [VALUES, *waits[:2], [0.0042], [], *waits[2:]]


def test_the_batch_observer_writes_queue_waits_as_observe_of_each_would():
    """batch_done observes a batch's queue waits together (observe_all): the same buckets, count and sum,
    the same float, as one ``observe`` per request, batch after batch."""
    m = Metrics()
    registry = CollectorRegistry()
    each = Histogram(
        "mha_queue_wait_seconds", "Time a request waited before compute", buckets=_LATENCY, registry=registry
    )
    for waits in batches():
        m.batch_done(max(1, len(waits)), BatchStats(sequences=len(waits), compute_s=0.003), waits)
        for w in waits:
            each.observe(w)

    def lines(reg: CollectorRegistry) -> list[str]:
        text = generate_latest(reg).decode()
        return [ln for ln in text.splitlines() if ln.startswith("mha_queue_wait_seconds_") and "_created" not in ln]

    want = lines(registry)
    n = sum(len(w) for w in batches())
    assert f"mha_queue_wait_seconds_count {float(n)}" in want and len(want) == len(_LATENCY) + 3
    assert lines(m.registry) == want


def test_the_batch_observer_in_multiprocess_mode_matches_observe(tmp_path):
    """The same with memory-mapped values (the model process's case), read through the multiprocess collector."""
    code = textwrap.dedent(
        f"""
        import os
        os.environ["PROMETHEUS_MULTIPROC_DIR"] = {str(tmp_path)!r}
        from prometheus_client import CollectorRegistry, Histogram, generate_latest, multiprocess
        from service.messages import BatchStats
        from service.metrics import _LATENCY, Metrics
        m = Metrics()
        each = Histogram("each_wait", "x", buckets=_LATENCY, registry=None)
        n = 0
        for waits in {batches()!r}:
            m.batch_done(max(1, len(waits)), BatchStats(sequences=len(waits), compute_s=0.003), waits)
            for w in waits:
                each.observe(w)
            n += len(waits)
        registry = CollectorRegistry()
        multiprocess.MultiProcessCollector(registry)
        text = generate_latest(registry).decode()
        lines = lambda name: sorted(ln.replace(name, "X") for ln in text.splitlines() if ln.startswith(name + "_"))
        want = lines("each_wait")
        assert f"X_count {{float(n)}}" in want and len(want) == len(_LATENCY) + 3, text
        assert lines("mha_queue_wait_seconds") == want, (lines("mha_queue_wait_seconds"), want)
        print("ok")
        """
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert out.stdout.strip() == "ok", out.stderr


def test_observe_all_in_multiprocess_mode_matches_observe(tmp_path):
    """The same in prometheus_client's multiprocess mode (memory-mapped values), read through its collector."""
    code = textwrap.dedent(
        f"""
        import os
        os.environ["PROMETHEUS_MULTIPROC_DIR"] = {str(tmp_path)!r}
        from prometheus_client import CollectorRegistry, Histogram, generate_latest, multiprocess
        from service.metrics import _LATENCY, observe_all
        values = {VALUES!r}
        a = Histogram("each", "x", ["route"], buckets=_LATENCY, registry=None).labels("/v2")
        b = Histogram("together", "x", ["route"], buckets=_LATENCY, registry=None).labels("/v2")
        for v in values:
            a.observe(v)
        observe_all(b, values)
        registry = CollectorRegistry()
        multiprocess.MultiProcessCollector(registry)
        text = generate_latest(registry).decode()
        lines = lambda name: sorted(ln.replace(name, "X") for ln in text.splitlines() if ln.startswith(name + "_"))
        assert lines("each") == lines("together") and len(lines("each")) == len(_LATENCY) + 3, text
        print("ok")
        """
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert out.stdout.strip() == "ok", out.stderr


def test_the_tally_writes_a_turns_requests_once_the_turn_ends():
    async def go():
        m = Metrics()
        tally = m.tally
        tally.in_flight = 2
        for route, status, s in (("/attend", 200, 0.002), ("/attend", 200, 0.03), ("/v2", 429, 0.0001)):
            tally.done(route, status, s)
        before = generate_latest(m.registry).decode()
        await asyncio.sleep(0)  # the end of the turn
        return before, generate_latest(m.registry).decode()

    before, after = asyncio.run(go())
    assert 'mha_requests_total{route="/attend",status="200"}' not in before  # nothing written yet
    assert 'mha_requests_total{route="/attend",status="200"} 2.0' in after
    assert 'mha_requests_total{route="/v2",status="429"} 1.0' in after
    assert 'mha_request_latency_seconds_bucket{le="0.0025",route="/attend"} 1.0' in after
    assert 'mha_request_latency_seconds_bucket{le="0.05",route="/attend"} 2.0' in after
    assert 'mha_request_latency_seconds_sum{route="/attend"} 0.032' in after
    assert "mha_requests_in_flight 2.0" in after


def _batches() -> list[tuple[int, BatchStats, list[float]]]:
    """Batches as the batcher reports them: sizes repeat (Triton's per-size counters add up), one failed alone
    (nothing executed), one with padding; each with its queue waits."""
    out = []
    for i, waits in enumerate(batches()):
        n = max(1, len(waits))
        real = 16 * n
        padded = real if i % 2 else real + 8 * i
        stats = BatchStats(sequences=n, padded_tokens=padded, real_tokens=real, compute_s=0.001 * (i + 1))
        out.append((n, stats, waits))
    out.append((1, BatchStats(), [0.5]))  # a lone request that failed: no forward executed
    out.append((7, BatchStats(sequences=7, padded_tokens=70, real_tokens=70, compute_s=0.004), [0.001] * 7))
    return out


def _lines(registry: CollectorRegistry) -> list[str]:
    return [ln for ln in generate_latest(registry).decode().splitlines() if "_created" not in ln]


def _triton(counters: TritonCounters) -> dict[tuple[str, tuple], float]:
    return {
        (s.name, tuple(sorted(s.labels.items()))): s.value
        for c in (counters.executions, counters.batches, counters.batch_ns)
        for family in c.collect()
        for s in family.samples
        if not s.name.endswith("_created")
    }


def test_the_model_process_metrics_write_at_flush_what_a_write_per_batch_writes():
    """EngineMetrics keeps the batcher's observations until ``flush`` (a ping), then writes the same values as
    Metrics and TritonCounters writing each batch, drop and queue change as it came."""
    each, each_triton, kept = Metrics(), TritonCounters(), EngineMetrics()
    for requests, stats, waits in _batches():
        each.batch_done(requests, stats, waits)
        each_triton.batch_done(requests, stats, waits)
        kept.batch_done(requests, stats, waits)
    for m in (each, kept):
        m.dropped("deadline")
        m.dropped("disconnect")
        m.dropped("deadline")
        m.queue_changed(9, 90)
        m.queue_changed(3, 30)  # the latest counts
    assert _lines(kept.registry) == _lines(Metrics().registry)  # nothing written before the flush
    assert _triton(kept.triton) == _triton(TritonCounters())
    kept.flush()
    want = _lines(each.registry)
    assert 'mha_requests_dropped_total{reason="deadline"} 2.0' in want and "mha_queue_depth_requests 3.0" in want
    assert "mha_batch_size_requests_count 9.0" in want
    assert _lines(kept.registry) == want
    assert _triton(kept.triton) == _triton(each_triton)
    assert _triton(kept.triton)[("mha_triton_stats_executions_total", ())] == 8.0  # the failed one executed nothing
    kept.flush()  # nothing new: nothing written twice
    assert _lines(kept.registry) == want


def test_the_model_process_metrics_flush_by_themselves_past_flush_at_batches():
    m = EngineMetrics()
    stats = BatchStats(sequences=1, padded_tokens=4, real_tokens=4, compute_s=0.001)
    for _ in range(EngineMetrics.FLUSH_AT - 1):
        m.batch_done(1, stats, [0.001])
    assert m.registry.get_sample_value("mha_batch_size_requests_count") == 0.0
    m.batch_done(1, stats, [0.001])
    assert m.registry.get_sample_value("mha_batch_size_requests_count") == EngineMetrics.FLUSH_AT

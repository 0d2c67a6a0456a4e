"""/metrics after known traffic: what an autoscaler and an operator read (README's Metrics table)."""

from __future__ import annotations

import asyncio

import numpy as np
import pytest
from prometheus_client.parser import text_string_to_metric_families

rng = np.random.default_rng()


def samples(text: str) -> dict[tuple[str, tuple], float]:
    """{(sample name, sorted labels): value} of a Prometheus text page."""
    out = {}
    for fam in text_string_to_metric_families(text):
        for s in fam.samples:
            out[(s.name, tuple(sorted(s.labels.items())))] = s.value
    return out


def value(m: dict, name: str, **labels) -> float:
    return m[(name, tuple(sorted((k, str(v)) for k, v in labels.items())))]


def attend(B: int, T: int) -> dict:
    return {"x": rng.standard_normal((B, T, 32)).tolist()}


async def scrape(client) -> dict:
    r = await client.get("/metrics")
    assert r.status_code == 200
    return samples(r.text)


async def test_counts_after_known_traffic(client):
    shapes = [(1, 4), (2, 3), (1, 6)]
    for B, T in shapes:
        assert (await client.post("/attend", json=attend(B, T))).status_code == 200
    v2 = {"inputs": [{"name": "x", "shape": [1, 5, 32], "datatype": "FP32", "data": [0.25] * (5 * 32)}]}
    assert (await client.post("/v2/models/mha/infer", json=v2)).status_code == 200
    m = await scrape(client)
    n = 4  # one at a time: four batches of one request
    assert value(m, "mha_queue_wait_seconds_count") == n
    assert value(m, "mha_compute_seconds_count") == n
    assert value(m, "mha_batch_size_requests_count") == n and value(m, "mha_batch_size_requests_sum") == n
    assert value(m, "mha_batch_size_sequences_sum") == 1 + 2 + 1 + 1
    real = 4 + 2 * 3 + 6 + 5
    assert value(m, "mha_tokens_total", kind="real") == real
    assert value(m, "mha_tokens_total", kind="padded") == real  # alone, nothing is padded
    assert value(m, "mha_batch_padding_ratio_count") == n
    assert value(m, "mha_batch_padding_ratio_bucket", le="1.0") == n
    assert value(m, "mha_requests_in_flight") == 0
    assert value(m, "mha_queue_depth_requests") == 0 and value(m, "mha_queue_depth_tokens") == 0
    rate = value(m, "mha_drain_rate_tokens_per_second")
    # a moving average of per-batch rates: within the slowest and fastest batch's, so at least the overall rate's
    # order of magnitude; and positive
    assert rate > 0
    assert rate >= 0.1 * real / value(m, "mha_compute_seconds_sum")
    assert value(m, "mha_requests_total", route="/attend", status=200) == 3
    assert value(m, "mha_requests_total", route="/v2", status=200) == 1


@pytest.mark.parametrize("settings_kw", [{"fault_injection": True}])
async def test_in_flight_queue_depth_and_padding_while_busy(client):
    stall = asyncio.create_task(client.post("/attend", json=attend(1, 4), headers={"x-mha-fault": "stall:500"}))
    for _ in range(200):  # until the stalled request holds the model
        m = await scrape(client)
        if value(m, "mha_requests_in_flight") == 1 and value(m, "mha_queue_depth_requests") == 0:
            break
        await asyncio.sleep(0.01)
    else:
        raise AssertionError("the stalled request never started")
    queued = [asyncio.create_task(client.post("/attend", json=attend(1, T))) for T in (4, 8)]
    for _ in range(200):
        m = await scrape(client)
        if value(m, "mha_queue_depth_requests") == 2:
            break
        await asyncio.sleep(0.005)
    assert value(m, "mha_requests_in_flight") == 3
    assert value(m, "mha_queue_depth_requests") == 2
    assert value(m, "mha_queue_depth_tokens") == 4 + 8
    rs = await asyncio.gather(stall, *queued)
    assert [r.status_code for r in rs] == [200, 200, 200]
    assert [r.headers["x-batch-size"] for r in rs] == ["1", "2", "2"]

    m = await scrape(client)
    assert value(m, "mha_requests_in_flight") == 0
    assert value(m, "mha_queue_depth_requests") == 0 and value(m, "mha_queue_depth_tokens") == 0
    assert value(m, "mha_queue_wait_seconds_count") == 3
    # the stalled one started at once; the two others waited out most of its 500 ms
    assert value(m, "mha_queue_wait_seconds_bucket", le="0.1") == 1
    assert value(m, "mha_queue_wait_seconds_bucket", le="0.25") == 1
    assert value(m, "mha_batch_size_requests_bucket", le="1.0") == 1
    assert value(m, "mha_batch_size_requests_bucket", le="2.0") == 2
    # T=4 padded to 8 next to T=8: 16 computed for 12 asked, ratio 1.33
    assert value(m, "mha_tokens_total", kind="real") == 4 + 4 + 8
    assert value(m, "mha_tokens_total", kind="padded") == 4 + 2 * 8
    assert value(m, "mha_batch_padding_ratio_bucket", le="1.25") == 1
    assert value(m, "mha_batch_padding_ratio_bucket", le="1.5") == 2
    assert value(m, "mha_compute_seconds_bucket", le="0.25") == 1  # the 500 ms stall is the other

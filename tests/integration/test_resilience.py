"""Overload, deadlines, fault isolation through the HTTP layer (a runner told to fail or stall)."""

from __future__ import annotations

import asyncio

import numpy as np
import pytest

X = {"x": [[[0.5] * 32] * 4]}


def metric(text: str, name: str) -> float:
    """The value of an unlabelled metric in Prometheus text (0 when absent)."""
    for line in text.splitlines():
        if line.startswith(name + " "):
            return float(line.rsplit(" ", 1)[1])
    return 0.0


@pytest.mark.parametrize("settings_kw", [{"fault_injection": True}])
async def test_one_failing_request_does_not_fail_its_batch(client):
    stall = asyncio.create_task(client.post("/attend", json=X, headers={"x-mha-fault": "stall:150"}))
    await asyncio.sleep(0.05)  # the model is busy: the next ones queue and share a batch
    xs = [np.random.default_rng(i).standard_normal((1, 4, 32)).tolist() for i in range(4)]
    heads = [{}, {"x-mha-fault": "raise"}, {}, {}]
    rs = await asyncio.gather(
        *(client.post("/attend", json={"x": x}, headers=h) for x, h in zip(xs, heads, strict=True))
    )
    await stall
    assert [r.status_code for r in rs] == [200, 500, 200, 200]
    assert rs[1].json()["error"]["type"] == "internal_error" and "(id " in rs[1].json()["error"]["message"]
    m = (await client.get("/metrics")).text
    assert metric(m, "mha_batch_failures_total") == 1.0
    assert (await client.post("/attend", json=X)).status_code == 200


@pytest.mark.parametrize("settings_kw", [{"fault_injection": True, "max_queue_requests": 2}])
async def test_full_queue_is_429_at_once_with_retry_after(client):
    stall = asyncio.create_task(client.post("/attend", json=X, headers={"x-mha-fault": "stall:300"}))
    await asyncio.sleep(0.05)
    queued = [asyncio.create_task(client.post("/attend", json=X)) for _ in range(2)]
    await asyncio.sleep(0.05)
    r = await client.post("/attend", json=X)
    assert r.status_code == 429
    assert int(r.headers["retry-after"]) >= 1
    assert "queue is full (2 requests" in r.json()["error"]["message"]
    assert all(q.status_code == 200 for q in await asyncio.gather(*queued)) and (await stall).status_code == 200


@pytest.mark.parametrize("settings_kw", [{"fault_injection": True}])
async def test_deadlines_queued_and_computing(client):
    stall = asyncio.create_task(client.post("/attend", json=X, headers={"x-mha-fault": "stall:200"}))
    await asyncio.sleep(0.05)
    r = await client.post("/attend", json={**X, "timeout_ms": 30})
    assert r.status_code == 504 and "while it was queued" in r.json()["error"]["message"]
    await stall
    r = await client.post("/attend", json={**X, "timeout_ms": 50}, headers={"x-mha-fault": "stall:120"})
    assert r.status_code == 504 and "while it was computing" in r.json()["error"]["message"]
    m = (await client.get("/metrics")).text
    assert 'mha_requests_dropped_total{reason="deadline"} 1.0' in m
    assert 'mha_requests_dropped_total{reason="late"} 1.0' in m


async def test_fault_header_is_ignored_unless_enabled(client):
    r = await client.post("/attend", json=X, headers={"x-mha-fault": "raise"})
    assert r.status_code == 200


async def test_draining_turns_not_ready_and_refuses_new_work(app, client):
    app.state.mha.draining = True  # what SIGTERM sets (service.cli), before uvicorn stops accepting
    r = await client.get("/readyz")
    assert r.status_code == 503 and r.json()["error"]["message"] == "the server is shutting down"
    r = await client.post("/attend", json=X)
    assert r.status_code == 503
    assert (await client.get("/healthz")).status_code == 200

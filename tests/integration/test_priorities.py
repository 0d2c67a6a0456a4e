"""Priorities through HTTP: /attend's field and v2's parameter (JSON and binary) reach the batcher."""

from __future__ import annotations

import asyncio

import numpy as np
import pytest

from tests.integration.test_v2 import INFER, request

X = {"x": [[[0.5] * 32] * 4]}
XA = np.full((1, 4, 32), 0.5, np.float32)
LEVELS = {"priority_levels": 3, "fault_injection": True, "max_batch_size": 1}


def spy(app) -> list[int]:
    """Record the priority each request hands to the engine."""
    engine = app.state.mha.engine
    seen: list[int] = []
    real = engine.infer

    async def infer(inp, **kw):
        seen.append(kw["priority"])
        return await real(inp, **kw)

    engine.infer = infer
    return seen


def v2(priority, binary: bool) -> tuple[bytes, dict[str, str]]:
    params = {} if priority is None else {"parameters": {"priority": priority}}
    return request([("x", "FP32", XA, binary)], **params)


@pytest.mark.parametrize("settings_kw", [LEVELS])
async def test_the_priority_of_every_route_reaches_the_batcher(app, client):
    seen = spy(app)
    for p in (1, 3, 0, None):
        body = X if p is None else {**X, "priority": p}
        assert (await client.post("/attend", json=body)).status_code == 200
    for binary in (False, True):
        for p in (2, None):
            content, headers = v2(p, binary)
            r = await client.post(INFER, content=content, headers=headers)
            assert r.status_code == 200, r.text
    assert seen == [1, 3, 0, 0, 2, 0, 2, 0]


@pytest.mark.parametrize("settings_kw", [LEVELS])
async def test_a_high_priority_request_overtakes_queued_low_ones(client):
    stall = asyncio.create_task(client.post("/attend", json=X, headers={"x-mha-fault": "stall:200"}))
    await asyncio.sleep(0.05)  # the model is busy: what follows queues
    done: list[str] = []

    async def send(tag: str, coro) -> None:
        r = await coro
        assert r.status_code == 200, r.text
        done.append(tag)

    low = [send(f"low{i}", client.post("/attend", json={**X, "priority": 3})) for i in range(3)]
    tasks = [asyncio.create_task(c) for c in low]
    await asyncio.sleep(0.05)
    content, headers = v2(1, True)
    tasks.append(asyncio.create_task(send("high", client.post(INFER, content=content, headers=headers))))
    await asyncio.gather(stall, *tasks)
    assert done[0] == "high", done


@pytest.mark.parametrize("settings_kw", [{**LEVELS, "max_queue_requests": 1}])
async def test_a_full_low_level_answers_429_while_a_high_one_is_served(client):
    stall = asyncio.create_task(client.post("/attend", json=X, headers={"x-mha-fault": "stall:300"}))
    await asyncio.sleep(0.05)
    queued = asyncio.create_task(client.post("/attend", json={**X, "priority": 3}))
    await asyncio.sleep(0.05)
    r = await client.post("/attend", json={**X, "priority": 3})
    assert r.status_code == 429 and int(r.headers["retry-after"]) >= 1
    assert "queue of priority level 3 is full (1 requests" in r.json()["error"]["message"]
    m = (await client.get("/metrics")).text
    assert 'mha_priority_queue_depth_requests{priority="3"} 1.0' in m
    assert 'mha_priority_queue_depth_requests{priority="1"} 0.0' in m
    high = await client.post("/attend", json={**X, "priority": 1})
    assert high.status_code == 200
    assert (await queued).status_code == 200 and (await stall).status_code == 200


OUT_OF_RANGE = "priority {} is out of range 0..3 (1 = the highest level; 0 = the server's default level)"


@pytest.mark.parametrize("settings_kw", [LEVELS])
@pytest.mark.parametrize("bad", [4, -1])
async def test_a_priority_outside_the_levels_is_422_with_one_message(client, bad):
    r = await client.post("/attend", json={**X, "priority": bad})
    assert r.status_code == 422 and r.json()["error"]["message"] == OUT_OF_RANGE.format(bad)
    for binary in (False, True):
        content, headers = v2(bad, binary)
        r = await client.post(INFER, content=content, headers=headers)
        assert r.status_code == 422 and r.json()["error"] == OUT_OF_RANGE.format(bad)


@pytest.mark.parametrize("settings_kw", [LEVELS])
async def test_a_priority_that_is_not_an_integer_is_422(client):
    for bad in ("1", 1.0, True):
        r = await client.post("/attend", json={**X, "priority": bad})
        assert r.status_code == 422 and "priority" in r.json()["error"]["message"], r.text
        content, headers = v2(bad, False)
        r = await client.post(INFER, content=content, headers=headers)
        assert r.status_code == 422 and r.json()["error"] == f"parameters.priority must be an integer, got {bad!r}"


async def test_with_one_level_priority_1_is_accepted_and_2_is_not(client):
    assert (await client.post("/attend", json={**X, "priority": 1})).status_code == 200
    r = await client.post("/attend", json={**X, "priority": 2})
    assert r.status_code == 422 and "out of range 0..1" in r.json()["error"]["message"]
    info = (await client.get("/v1/model")).json()["batching"]
    assert (info["priority_levels"], info["default_priority_level"]) == (1, None)


@pytest.mark.parametrize("settings_kw", [{"priority_levels": 2, "max_queue_requests": 256}])
async def test_admission_shared_by_the_levels_is_warned_about(caplog, settings_kw):
    from asgi_lifespan import LifespanManager

    from service.app import create_app
    from service.settings import Settings
    from tests.integration.conftest import TINY

    with caplog.at_level("WARNING", logger="mha_serve"):
        async with LifespanManager(create_app(settings=Settings(**{**TINY, **settings_kw}))):
            pass
    assert any(
        "max_inflight_requests (512) < priority_levels x max_queue_requests" in r.message for r in caplog.records
    )

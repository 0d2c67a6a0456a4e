"""SIGTERM to exit fits in one MHA_SHUTDOWN_GRACE_S under load, and every request in flight is answered."""

from __future__ import annotations

import asyncio
import signal
import time

import httpx
import pytest

from .conftest import start_server

GRACE_S = 3.0


@pytest.mark.parametrize("workers", ["1", "2"])
def test_sigterm_to_exit_fits_one_grace_period_under_load(tmp_path, workers):
    # One request per forward, each stalled 1 s: 10 s of accepted work, far more than the grace.
    s = start_server(
        tmp_path,
        {
            "MHA_FAULT_INJECTION": "true",
            "MHA_MAX_BATCH_SIZE": "1",
            "MHA_SHUTDOWN_GRACE_S": str(GRACE_S),
            "MHA_WORKERS": workers,
        },
    )
    body = {"x": [[[0.5] * 32] * 4]}

    async def go():
        async with httpx.AsyncClient(base_url=s.url, timeout=30) as c:
            tasks = [
                asyncio.create_task(c.post("/attend", json=body, headers={"x-mha-fault": "stall:1000"}))
                for _ in range(10)
            ]
            await asyncio.sleep(0.5)  # all accepted and queued, the first one computing
            t0 = time.monotonic()
            s.proc.send_signal(signal.SIGTERM)
            results = await asyncio.gather(*tasks, return_exceptions=True)
            code = await asyncio.to_thread(s.proc.wait, 30)
            return t0, results, code, time.monotonic()

    t0, results, code, exited = asyncio.run(go())
    statuses = [r.status_code if isinstance(r, httpx.Response) else repr(r) for r in results]
    print(f"SIGTERM to exit: {exited - t0:.2f} s (grace {GRACE_S} s); statuses {statuses}")
    assert code == 0, s.log()
    assert all(st in (200, 503) for st in statuses), statuses  # none cut off, none hanging
    assert 1 <= statuses.count(200) <= 4, statuses  # work went on during the grace...
    assert statuses.count(503) >= 6, statuses  # ...and what could not finish in it was told so
    for r in results:
        if isinstance(r, httpx.Response) and r.status_code == 503:
            assert r.json()["error"]["type"] == "unavailable"
    elapsed = exited - t0
    assert elapsed <= GRACE_S + 2.0, f"SIGTERM to exit took {elapsed:.2f} s, grace {GRACE_S} s\n{s.log()}"

"""Disconnects and shutdown against a real uvicorn."""

from __future__ import annotations

import contextlib
import threading
import time

import httpx

from .conftest import start_server

X = {"x": [[[0.5] * 32] * 4]}


def test_client_that_leaves_is_dropped_before_compute(tmp_path):
    s = start_server(tmp_path, {"MHA_FAULT_INJECTION": "true"})
    try:
        busy = threading.Thread(
            target=httpx.post,
            args=(s.url + "/attend",),
            kwargs={"json": X, "headers": {"x-mha-fault": "stall:800"}, "timeout": 10},
        )
        busy.start()
        time.sleep(0.2)
        with contextlib.suppress(httpx.TimeoutException):  # queued behind the stall, gives up, hangs up
            httpx.post(s.url + "/attend", json={"x": [[[0.25] * 32] * 4]}, timeout=0.2)
        busy.join()
        time.sleep(0.2)
        m = httpx.get(s.url + "/metrics").text
        assert 'mha_requests_dropped_total{reason="disconnect"} 1.0' in m, m
        # only the stalled request was computed: one batch of one request
        assert "mha_batch_size_requests_count 1.0" in m
    finally:
        assert s.stop() == 0

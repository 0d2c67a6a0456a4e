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


def test_a_client_that_trickles_its_body_is_cut_off_with_408(tmp_path):
    import socket

    s = start_server(tmp_path, {"MHA_BODY_READ_TIMEOUT_S": "1"})
    try:
        port = int(s.url.rsplit(":", 1)[1])
        with socket.create_connection(("127.0.0.1", port), timeout=10) as sock:
            sock.sendall(
                b"POST /attend HTTP/1.1\r\nhost: 127.0.0.1\r\ncontent-type: application/json\r\n"
                b"content-length: 5000\r\n\r\n" + b'{"x": [[[0.5, '
            )
            t0 = time.monotonic()
            reply = b""
            while chunk := sock.recv(65536):  # the server answers, then closes: recv returns b""
                reply += chunk
            elapsed = time.monotonic() - t0
        head, _, body = reply.partition(b"\r\n\r\n")
        assert head.startswith(b"HTTP/1.1 408"), reply
        assert b"connection: close" in head.lower()
        assert b'"type":"request_timeout"' in body and b"body_read_timeout_s 1 s" in body, body
        assert 0.8 <= elapsed <= 5, elapsed
        assert httpx.get(s.url + "/healthz").status_code == 200
    finally:
        assert s.stop() == 0

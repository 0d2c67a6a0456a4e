"""A real uvicorn on 127.0.0.1, driven with httpx."""

from __future__ import annotations

import asyncio
import base64
import signal
import subprocess
import sys
import time

import httpx
import numpy as np
import torch

from mha_core import MHAConfig, MultiHeadAttention, save_checkpoint

from .conftest import builtin_model, start_server

rng = np.random.default_rng()


def test_concurrent_requests_over_http_match_the_module(server):
    mha = builtin_model()
    xs = [rng.standard_normal((1, int(rng.integers(1, 65)), 32)).astype(np.float32) for _ in range(32)]

    async def go():
        async with httpx.AsyncClient(base_url=server.url, timeout=30) as c:
            return await asyncio.gather(*(c.post("/attend", json={"x": x.tolist()}) for x in xs))

    responses = asyncio.run(go())
    for x, r in zip(xs, responses, strict=True):
        assert r.status_code == 200, r.text
        want = mha(torch.from_numpy(x)).output.numpy()
        np.testing.assert_allclose(np.array(r.json()["output"]), want, atol=1e-5)
    assert max(int(r.headers["x-batch-size"]) for r in responses) > 1
    info = httpx.get(server.url + "/v1/model").json()
    assert info["checksum"] == r.json()["model"]["checksum"]


def test_checkpoint_from_settings(tmp_path):
    mha = MultiHeadAttention.from_seed(MHAConfig(2, 16, 8, 32, causal=False), seed=42).eval()
    path = tmp_path / "m.safetensors"
    digest = save_checkpoint(mha, path)
    env = {
        "MHA_CHECKPOINT": str(path),
        "MHA_NUM_HEADS": "",
        "MHA_EMB_SIZE": "",
        "MHA_HEAD_SIZE": "",
        "MHA_MAX_SEQ_LEN": "",
    }
    s = start_server(tmp_path, env)
    try:
        x = rng.standard_normal((2, 9, 16)).astype(np.float32)
        body = {"x": {"dtype": "float32", "shape": [2, 9, 16], "b64": base64.b64encode(x.tobytes()).decode()}}
        r = httpx.post(s.url + "/attend", json=body)
        assert r.status_code == 200, r.text
        out = np.frombuffer(base64.b64decode(r.json()["output"]["b64"]), np.float32).reshape(2, 9, 16)
        np.testing.assert_allclose(out, mha(torch.from_numpy(x)).output.numpy(), atol=1e-5)
        assert r.json()["model"]["checksum"] == digest
        assert r.json()["model"]["causal"] is False
    finally:
        assert s.stop() == 0


def test_sigterm_finishes_in_flight_work_then_exits_0(tmp_path):
    s = start_server(tmp_path, {"MHA_MAX_BATCH_SIZE": "1"})
    x = rng.standard_normal((8, 64, 32)).astype(np.float32).tolist()

    async def go():
        async with httpx.AsyncClient(base_url=s.url, timeout=30) as c:
            tasks = [asyncio.create_task(c.post("/attend", json={"x": x, "return_weights": True})) for _ in range(6)]
            await asyncio.sleep(0.3)  # requests accepted and queued
            s.proc.send_signal(signal.SIGTERM)
            return await asyncio.gather(*tasks, return_exceptions=True)

    results = asyncio.run(go())
    assert all(isinstance(r, httpx.Response) and r.status_code == 200 for r in results), results
    assert s.proc.wait(30) == 0, s.log()


def test_invalid_settings_fail_fast_with_a_clear_message():
    env = {"MHA_MAX_BATCH_SIZE": "0", "MHA_DEVICE": "gpu7"}
    import os

    p = subprocess.run(
        [sys.executable, "-m", "service.cli"], env={**os.environ, **env}, capture_output=True, text=True, timeout=60
    )
    assert p.returncode == 2
    assert "MHA_MAX_BATCH_SIZE: Input should be greater than or equal to 1" in p.stderr
    assert "MHA_DEVICE: Value error, device must be auto, cpu, cuda, cuda:N or mps, got 'gpu7'" in p.stderr
    p = subprocess.run(
        [sys.executable, "-m", "service.cli"],
        env={**os.environ, "MHA_MAX_REQUEST_BATCH": "64"},
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert p.returncode == 2
    assert (
        "settings: Value error, max_request_batch x max_seq_len (64 x 1024 = 65536) must be <= max_batch_tokens "
        "(32768)" in p.stderr
    ), p.stderr
    _ = time

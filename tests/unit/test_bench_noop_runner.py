"""MHA_RUNNER names the runner's factory: bench/noop_runner.py's answers each request with its own tensor, bf16 v2
binary included, so that the no-op benchmark measures the service and not a forward pass (or an error)."""

from __future__ import annotations

import asyncio
import json

import httpx
import numpy as np
import pytest
from asgi_lifespan import LifespanManager
from pydantic import ValidationError

from mha_client._wire import f32_to_bf16
from service.app import create_app
from service.settings import Settings

SMALL = {"num_heads": 4, "emb_size": 64, "head_size": 16, "max_seq_len": 64}


def v2_bf16(x: np.ndarray) -> tuple[bytes, dict[str, str], bytes]:
    raw = f32_to_bf16(x).tobytes()
    inp = {"name": "x", "shape": list(x.shape), "datatype": "BF16", "parameters": {"binary_data_size": len(raw)}}
    header = json.dumps({"inputs": [inp], "outputs": [{"name": "output", "parameters": {"binary_data": True}}]})
    headers = {"Inference-Header-Content-Length": str(len(header)), "content-type": "application/octet-stream"}
    return header.encode() + raw, headers, raw


async def answer(runner: str | None, body: bytes, headers: dict[str, str]) -> tuple[int, bytes]:
    s = Settings(**SMALL, grpc_port=0, decode_processes=0, dtype="bfloat16", runner=runner)
    app = create_app(settings=s)
    transport = httpx.ASGITransport(app)  # in-process: no socket
    async with LifespanManager(app), httpx.AsyncClient(transport=transport, base_url="http://t") as c:
        r = await c.post("/v2/models/mha/infer", content=body, headers=headers)
    n = int(r.headers.get("inference-header-content-length", "0"))
    return r.status_code, r.content[n:]


def test_the_noop_runner_answers_with_the_input_and_the_model_does_not() -> None:
    x = np.random.default_rng(0).standard_normal((1, 16, 64)).astype(np.float32)
    body, headers, raw = v2_bf16(x)
    status, out = asyncio.run(answer("bench.noop_runner:runner", body, headers))
    assert status == 200
    assert out == raw  # the request's own bf16 bytes, unchanged
    status, out = asyncio.run(answer(None, body, headers))
    assert status == 200 and len(out) == len(raw) and out != raw  # the model computes something else


@pytest.mark.parametrize("bad", ["bench.noop_runner", "not a name:f", ":runner"])
def test_a_runner_that_is_not_module_colon_function_is_refused_at_start(bad: str) -> None:
    with pytest.raises(ValidationError, match="runner"):
        Settings(runner=bad)

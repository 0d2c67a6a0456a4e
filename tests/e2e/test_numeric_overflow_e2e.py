"""Split mode (MHA_ENGINE=process): an overflow found by the model process's once-per-batch check is the same
422 numeric_overflow, with the same message, on every transport; the rest of its batch is answered."""

from __future__ import annotations

import asyncio
import base64
import signal

import httpx
import numpy as np
import orjson
import pytest
import torch
import tritonclient.grpc as tg
from tritonclient.utils import InferenceServerException

from .conftest import builtin_model, start_server

ADVICE = "send smaller values, or serve a float32 model (MHA_DTYPE=float32)"
rng = np.random.default_rng()


@pytest.fixture(scope="module")
def split(tmp_path_factory):
    env = {"MHA_ENGINE": "process", "MHA_WORKERS": "1", "MHA_DTYPE": "float16", "MHA_FAULT_INJECTION": "true"}
    s = start_server(tmp_path_factory.mktemp("overflow"), env)
    try:
        yield s
    finally:
        s.stop(signal.SIGKILL)


def expected_message(x: np.ndarray) -> str:
    """What the single-process server says (tests/integration/test_numeric_overflow.py): the model's own count."""
    with torch.inference_mode():
        out = builtin_model().half()(torch.from_numpy(x).half()).output
    bad = int((~torch.isfinite(out)).sum())
    assert bad > 0  # the premise: float16 overflows on this input
    return (
        f"the model's float16 computation overflowed: output has {bad} non-finite value(s) of {out.numel()}. "
        f"The largest |x| in this request is {float(np.max(np.abs(x))):g}; the projections and attention scores "
        f"grow with it past float16's range (largest finite 65504). {ADVICE}"
    )


def b64(x: np.ndarray) -> dict:
    return {"dtype": "float32", "shape": list(x.shape), "b64": base64.b64encode(x.tobytes()).decode()}


def test_the_overflow_is_a_422_with_its_message_on_every_route(split):
    x = np.full((1, 4, 32), 60000.0, np.float32)
    want = expected_message(x)
    with httpx.Client(base_url=split.url, timeout=30) as c:
        for body in ({"x": x.tolist()}, {"x": b64(x)}, {"x": b64(x), "return_weights": True}):
            r = c.post("/attend", json=body)
            assert r.status_code == 422, r.text
            assert r.json()["error"] == {"type": "numeric_overflow", "message": want}
        header = orjson.dumps(
            {
                "inputs": [
                    {"name": "x", "datatype": "FP32", "shape": [1, 4, 32], "parameters": {"binary_data_size": 512}}
                ],
                "outputs": [{"name": "output", "parameters": {"binary_data": True}}],
            }
        )
        r = c.post(
            "/v2/models/mha/infer",
            content=header + x.tobytes(),
            headers={"inference-header-content-length": str(len(header))},
        )
        assert r.status_code == 422 and r.json() == {"error": want}  # the Open Inference Protocol's shape
        r = c.post("/attend/heatmap", json={"x": x.tolist()})
        assert r.status_code == 422 and r.json()["error"] == {"type": "numeric_overflow", "message": want}
    grpc = tg.InferenceServerClient(split.grpc_url)
    try:
        with pytest.raises(InferenceServerException) as e:
            grpc.infer("mha", [tg.InferInput("x", [1, 4, 32], "FP32").set_data_from_numpy(x)])
        assert e.value.status() == "StatusCode.INVALID_ARGUMENT" and e.value.message() == want
    finally:
        grpc.close()


def test_only_the_overflowing_request_of_a_batch_fails(split):
    """A stalled first batch holds the model while four requests queue: they share the next forward."""
    big = np.full((1, 4, 32), 60000.0, np.float32)
    xs = [rng.standard_normal((1, t, 32)).astype(np.float32) for t in (6, 7, 5)]
    ref = builtin_model().half()

    async def go():
        async with httpx.AsyncClient(base_url=split.url, timeout=30) as c:
            stall = asyncio.ensure_future(
                c.post("/attend", json={"x": xs[0].tolist()}, headers={"x-mha-fault": "stall:400"})
            )
            await asyncio.sleep(0.15)
            rs = await asyncio.gather(*(c.post("/attend", json={"x": x.tolist()}) for x in (xs[0], big, *xs[1:])))
            return await stall, rs

    first, (r0, rbig, r1, r2) = asyncio.run(go())
    assert first.status_code == 200
    assert rbig.status_code == 422 and rbig.json()["error"] == {
        "type": "numeric_overflow",
        "message": expected_message(big),
    }
    for x, r in zip(xs, (r0, r1, r2), strict=True):
        assert r.status_code == 200, r.text
        assert r.headers["x-batch-size"] == "4"  # in the same forward as the overflowing request
        with torch.inference_mode():
            want = ref(torch.from_numpy(x).half()).output.float().numpy()
        np.testing.assert_allclose(np.array(r.json()["output"]), want, atol=2e-3, rtol=1e-2)

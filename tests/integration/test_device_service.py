"""The service on the test's device and dtype (tests/devices.py): /attend and the v2 binary route answer what
mha_core computes on the CPU in float32, within the serving dtype's tolerance."""

from __future__ import annotations

import base64

import httpx
import numpy as np
import orjson
import torch
from asgi_lifespan import LifespanManager

from mha_core import MHAConfig, MultiHeadAttention
from service.app import create_app
from service.frontend.codecs import bf16_to_f32, f32_to_bf16
from service.settings import Settings
from tests.devices import tol
from tests.integration.conftest import TINY

rng = np.random.default_rng()


async def test_attend_and_v2_binary_equal_the_cpu_reference(device_dtype):
    device, dtype = device_dtype
    name = str(dtype).removeprefix("torch.")
    settings = Settings(**{**TINY, "device": str(device), "dtype": name, "seed": 5, "warmup": True})
    ref = MultiHeadAttention.from_seed(MHAConfig(**settings.model_overrides(with_defaults=True)), 5).eval()
    app = create_app(settings=settings)
    async with (
        LifespanManager(app),
        httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://t") as c,
    ):
        info = (await c.get("/v1/model")).json()
        assert info["device"].startswith(device.type) and info["dtype"] == name
        # /attend, base64 float32 in and out, padded batch with weights
        x = rng.standard_normal((2, 20, 32)).astype(np.float32)
        body = {
            "x": {"dtype": "float32", "shape": [2, 20, 32], "b64": base64.b64encode(x.tobytes()).decode()},
            "lengths": [20, 11],
            "return_weights": True,
            "response_encoding": "base64",
        }
        r = await c.post("/attend", json=body)
        assert r.status_code == 200, r.text
        out = r.json()
        got = np.frombuffer(base64.b64decode(out["output"]["b64"]), "<f4").reshape(2, 20, 32)
        got_w = np.frombuffer(base64.b64decode(out["weights"]["b64"]), "<f4").reshape(2, 4, 20, 20)
        want = ref(torch.from_numpy(x).to(dtype).float(), lengths=[20, 11], need_weights=True)
        np.testing.assert_allclose(got, want.output.numpy(), **tol(dtype))
        np.testing.assert_allclose(got_w, want.weights.numpy(), **tol(dtype, 0.25 if dtype != torch.float32 else 1))
        assert np.all(got[1, 11:] == 0)

        # v2 binary, BF16 in and out ([1, 16, 32]): the GPU serving format
        x2 = rng.standard_normal((1, 16, 32)).astype(np.float32)
        raw = f32_to_bf16(x2).tobytes()
        header = orjson.dumps(
            {
                "inputs": [
                    {
                        "name": "x",
                        "shape": [1, 16, 32],
                        "datatype": "BF16",
                        "parameters": {"binary_data_size": len(raw)},
                    }
                ],
                "outputs": [{"name": "output", "parameters": {"binary_data": True}}],
            }
        )
        r = await c.post(
            "/v2/models/mha/infer",
            content=header + raw,
            headers={"content-type": "application/octet-stream", "inference-header-content-length": str(len(header))},
        )
        assert r.status_code == 200, r.text
        n = int(r.headers["inference-header-content-length"])
        meta = orjson.loads(r.content[:n])
        (o,) = meta["outputs"]
        assert o["datatype"] == "BF16" and o["shape"] == [1, 16, 32]
        got2 = bf16_to_f32(np.frombuffer(r.content[n:], "<u2")).reshape(1, 16, 32)
        want2 = ref(torch.from_numpy(bf16_to_f32(np.frombuffer(raw, "<u2")).reshape(1, 16, 32)).to(dtype).float())
        # the answer itself is rounded to bfloat16 on the way out: one more rounding of values up to ~4
        t = tol(dtype)
        np.testing.assert_allclose(got2, want2.output.numpy(), atol=max(t["atol"], 3e-2), rtol=max(t["rtol"], 1e-2))

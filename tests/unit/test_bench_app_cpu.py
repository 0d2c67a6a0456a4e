"""bench/app_cpu.py keeps working as the app changes: every variant answers 200 through the fake engine, and the
v2 and base64 routes give back the request's tensor (the fake engine's answer), not only a status."""

from __future__ import annotations

import asyncio
import base64
import json
import math

import numpy as np

from bench import app_cpu


def test_every_variant_answers_200_and_takes_a_measurable_time() -> None:
    for variant, log in (("echo", False), ("v2", False), ("v2 bf16", False), ("base64", True)):
        us, statuses = asyncio.run(app_cpu.measure(variant, log, 2 * app_cpu.AT_ONCE, 1, False))
        assert statuses == {200}, variant
        assert math.isfinite(us) and us > 0, variant


def test_the_fake_engine_answers_with_the_requests_tensor() -> None:
    x = np.frombuffer(app_cpu.bodies()["v2"][1][-4 * math.prod(app_cpu.SHAPE) :], np.float32).reshape(app_cpu.SHAPE)

    async def one(variant: str) -> bytes:
        from service.app import create_app
        from service.settings import Settings

        path, body, headers = app_cpu.bodies()[variant]
        app = create_app(settings=Settings(**app_cpu.MODEL, grpc_port=0, warmup=False))
        inbox, lifespan = await app_cpu.started(app)
        app.state.mha.engine = app_cpu.NextTurnEngine(app.state.mha.engine)
        sent: list[bytes] = []

        async def receive() -> dict:
            return {"type": "http.request", "body": body, "more_body": False}

        async def send(message: dict) -> None:
            if message["type"] == "http.response.body":
                sent.append(message["body"])

        await app(app_cpu.scope(path, body, headers), receive, send)
        await inbox.put({"type": "lifespan.shutdown"})
        await lifespan
        return b"".join(sent)

    v2 = asyncio.run(one("v2"))
    np.testing.assert_array_equal(np.frombuffer(v2[-x.nbytes :], np.float32).reshape(x.shape), x)
    out = json.loads(asyncio.run(one("base64")))["output"]
    np.testing.assert_array_equal(np.frombuffer(base64.b64decode(out["b64"]), np.float32).reshape(x.shape), x)
    bits = app_cpu.bodies()["v2 bf16"][1][-2 * math.prod(app_cpu.SHAPE) :]  # x's bfloat16 bits
    assert asyncio.run(one("v2 bf16"))[-len(bits) :] == bits  # answered in BF16: the same bits back

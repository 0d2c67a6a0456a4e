"""Large JSON-list bodies and responses go through the decode processes, with the same answers."""

from __future__ import annotations

import base64

import httpx
import numpy as np
import orjson
from asgi_lifespan import LifespanManager

import service.frontend.offload_worker
from service.app import create_app
from service.settings import Settings

from .conftest import TINY


async def test_large_lists_are_decoded_and_encoded_off_the_loop_with_equal_results(rng_seed):
    apps = [create_app(settings=Settings(**{**TINY, "decode_processes": n, "offload_min_bytes": 4096})) for n in (1, 0)]
    rng = np.random.default_rng(rng_seed)
    x = rng.standard_normal((4, 64, 32)).astype(np.float32)
    mask = np.tril(np.ones((64, 64), bool))
    mask[5, :3] = False
    body = orjson.dumps({"x": x.tolist(), "attn_mask": mask.tolist(), "causal": False, "return_weights": True})
    assert len(body) > 4096 and body.count(b",", 0, 65536) > 1024
    answers = []
    for app in apps:
        async with (
            LifespanManager(app),
            httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://test") as c,
        ):
            offload = app.state.mha.offload
            sent = []
            real = offload._pool.submit if offload.enabled else None
            if real is not None:

                def spy(fn, *args, sent=sent, real=real):
                    sent.append(fn.__name__)
                    return real(fn, *args)

                offload._pool.submit = spy
            r = await c.post("/attend", content=body, headers={"content-type": "application/json"})
            assert r.status_code == 200, r.text
            answers.append(r.content)
            if real is not None:
                assert sent == ["parse_lists", "dumps"]  # both ways through the pool
                small = await c.post("/attend", json={"x": x[:1, :4].tolist()})
                assert small.status_code == 200 and sent == ["parse_lists", "dumps"]  # small: inline
                b64 = {"dtype": "float32", "shape": list(x.shape), "b64": base64.b64encode(x.tobytes()).decode()}
                big_b64 = await c.post("/attend", json={"x": b64})
                assert big_b64.status_code == 200 and sent == ["parse_lists", "dumps"]  # base64: inline
                bad = await c.post("/attend", content=body.replace(b"[[[", b"[[[1.5,", 1))  # errors cross back
                assert bad.status_code == 422 and "x is ragged" in bad.json()["error"]["message"]
                broken = await c.post("/attend", content=body[:-1])
                assert broken.status_code == 400 and broken.json()["error"]["type"] == "malformed_json"
    on, off = (orjson.loads(a) for a in answers)
    assert on == off  # byte-for-byte the same numbers
    assert np.asarray(on["weights"]).shape == (4, 4, 64, 64)


def test_the_decode_processes_import_no_torch():
    """A spawned worker imports the worker module and the parent's __main__ (service.cli under mha-serve)."""
    import subprocess
    import sys

    code = "import sys, service.frontend.offload_worker, service.cli; print('torch' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert out.stdout.strip() == "False", out.stderr
    assert service.frontend.offload_worker.ready()

"""Large JSON-list bodies and responses go through the decode processes, with the same answers."""

from __future__ import annotations

import asyncio
import base64

import numpy as np
import orjson
import pytest

import service.frontend.offload_worker
from service.app import create_app
from service.settings import Settings

from .conftest import TINY, serving


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
        async with serving(app) as c:
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


def _app(**kw):
    return create_app(settings=Settings(**{**TINY, "decode_processes": 1, "offload_min_bytes": 4096, **kw}))


def _spy(offload) -> list[str]:
    """The names of the functions the app sends to its decode processes, from now on."""
    sent: list[str] = []
    real = offload.run

    async def spy(fn, *args):
        sent.append(fn.__name__)
        return await real(fn, *args)

    offload.run = spy
    return sent


def _lists_body(rng, B=2, T=40) -> tuple[np.ndarray, bytes]:
    x = rng.standard_normal((B, T, 32)).astype(np.float32)
    return x, orjson.dumps({"x": x.tolist(), "response_encoding": "base64"})


async def test_a_killed_decode_worker_is_replaced_and_later_large_requests_are_served(rng_seed):
    import os
    import signal
    import time

    rng = np.random.default_rng(rng_seed)
    app = _app()
    async with serving(app) as c:
        offload = app.state.mha.offload
        _, body = _lists_body(rng)
        assert (await c.post("/attend", content=body)).status_code == 200
        [pid] = offload.worker_pids()
        os.kill(pid, signal.SIGKILL)
        deadline = time.monotonic() + 10
        while pid in offload.worker_pids() and time.monotonic() < deadline:
            await asyncio.sleep(0.05)
        assert pid not in offload.worker_pids()
        await asyncio.sleep(0.3)  # the pool's own thread sees the death and marks the pool broken
        sent = _spy(offload)
        for _ in range(3):
            x, body = _lists_body(rng)
            r = await c.post("/attend", content=body)
            assert r.status_code == 200, r.text
            out = np.frombuffer(base64.b64decode(r.json()["output"]["b64"]), np.float32).reshape(x.shape)
            assert np.isfinite(out).all() and not np.array_equal(out, x)
        assert sent == ["parse_lists"] * 3  # through the new pool, not inline
        assert (await c.get("/readyz")).status_code == 200
        [new] = offload.worker_pids()
        assert new != pid


async def test_the_request_in_a_killed_worker_gets_a_clear_503_and_the_next_are_served():
    import os
    import signal
    import time

    from service.errors import ServiceError
    from service.frontend.offload import Offload

    offload = Offload(1, 4096)
    try:
        await offload.start()
        [pid] = offload.worker_pids()
        held = asyncio.ensure_future(offload.run(time.sleep, 30))  # the request the worker holds when it dies
        await asyncio.sleep(0.5)
        os.kill(pid, signal.SIGKILL)
        with pytest.raises(ServiceError) as e:
            await asyncio.wait_for(held, 10)
        assert e.value.type == "unavailable" and "decode process died" in e.value.message
        assert await asyncio.wait_for(offload.run(service.frontend.offload_worker.ready), 30) is True
        assert offload.worker_pids() and pid not in offload.worker_pids()
    finally:
        offload.close()


def test_many_commas_sees_lists_behind_any_whitespace_and_not_in_base64():
    from service.frontend.offload import many_commas

    lists = orjson.dumps({"x": np.zeros((1, 200, 32)).tolist()})
    assert many_commas(lists)
    assert many_commas(b" " * 200_000 + lists)  # the first window is all whitespace
    assert many_commas(lists[:5] + b"\n" * 200_000 + lists[5:])  # and in the middle
    b64 = orjson.dumps({"x": {"dtype": "float32", "shape": [1, 200, 32], "b64": "A" * 200_000}, "heads": [0, 1]})
    assert not many_commas(b64) and not many_commas(b" " * 200_000 + b64)


async def test_a_large_lists_body_led_by_whitespace_goes_to_the_decode_processes(rng_seed):
    rng = np.random.default_rng(rng_seed)
    app = _app()
    async with serving(app) as c:
        sent = _spy(app.state.mha.offload)
        _, body = _lists_body(rng)
        r = await c.post("/attend", content=b" \n" * 40_000 + body)
        assert r.status_code == 200, r.text
        assert sent == ["parse_lists"]
        plain = await c.post("/attend", content=body)
        assert plain.json()["output"] == r.json()["output"]  # the same request, whitespace or not


async def test_a_large_malformed_body_is_parsed_once_with_the_inline_message(rng_seed, monkeypatch):
    import service.frontend.decode as decode

    rng = np.random.default_rng(rng_seed)
    _, body = _lists_body(rng)
    broken = body[:-1]
    messages = []
    parses: list[int] = []
    real = decode.parse_json
    monkeypatch.setattr(decode, "parse_json", lambda b: parses.append(len(b)) or real(b))
    for n in (1, 0):
        app = _app(decode_processes=n)
        async with serving(app) as c:
            r = await c.post("/attend", content=broken)
            assert r.status_code == 400 and r.json()["error"]["type"] == "malformed_json"
            messages.append(r.json()["error"]["message"])
            if n:
                assert parses == []  # parsed in the decode process alone, not again on the loop
    assert parses == [len(broken)]  # the inline app's one parse
    assert messages[0] == messages[1] and messages[0].startswith("the body is not valid JSON: ")


def _v2_body(x: np.ndarray, mask: np.ndarray | None = None) -> bytes:
    inputs = [{"name": "x", "datatype": "FP32", "shape": list(x.shape), "data": x.tolist()}]
    if mask is not None:
        inputs.append({"name": "attn_mask", "datatype": "BOOL", "shape": list(mask.shape), "data": mask.tolist()})
    inputs.append({"name": "lengths", "datatype": "INT64", "shape": [x.shape[0]], "data": [x.shape[1]] * x.shape[0]})
    return orjson.dumps({"inputs": inputs, "parameters": {"causal": False}})


async def test_large_v2_json_data_is_decoded_off_the_loop_with_equal_answers(rng_seed):
    rng = np.random.default_rng(rng_seed)
    x = rng.standard_normal((2, 40, 32)).astype(np.float32)
    mask = rng.random((40, 40)) < 0.7
    np.fill_diagonal(mask, True)
    body = _v2_body(x, mask)
    ragged = orjson.loads(body)
    ragged["inputs"][0]["data"][1][3].append(1.0)
    ragged["inputs"][0]["datatype"] = "FP32"
    bad_type = orjson.loads(body)
    bad_type["inputs"][2]["datatype"] = "INT8"  # a spec error before x's ragged data: told first, as inline
    bad_type["inputs"][0]["data"][1][3].append(1.0)
    answers = []
    for n in (1, 0):
        app = _app(decode_processes=n)
        async with serving(app) as c:
            sent = _spy(app.state.mha.offload)
            r = await c.post("/v2/models/mha/infer", content=body)
            assert r.status_code == 200, r.text
            bad = [await c.post("/v2/models/mha/infer", content=orjson.dumps(b)) for b in (ragged, bad_type)]
            assert [b.status_code for b in bad] == [422, 422]
            answers.append((r.json(), [b.json()["error"] for b in bad]))
            if n:
                assert sent == ["parse_v2"] * 3
    (on, on_errors), (off, off_errors) = answers
    assert on == off  # the same numbers either way
    assert on_errors == off_errors and "ragged" in on_errors[0] and "INT8" in on_errors[1]
    assert on["outputs"][0]["shape"] == [2, 40, 32]

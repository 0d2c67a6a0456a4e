"""The app's own CPU a request, in-process: no server, no socket, no model process, so that a cut of a
microsecond shows (``bench/front.py``'s wrk runs differ by about 5% between runs, 3 us of a front end's 65).

The hot routes (v2 binary infer, base64 /attend) are called as uvicorn calls them (an ASGI scope, ``receive``
with the whole body, ``send``), 16 at a time on one event loop, with the engine replaced by one that answers
each request on the next turn of the loop, as the model process's answer arrives. Beside them, in the same
run, the floor: bench/echo_app.py's bare FastAPI route echoing the same body, called the same way. Pin it to a
core; CPU time (``time.process_time``), median of ``--reps``.

    taskset -c 0 .venv/bin/python bench/app_cpu.py            # the table
    taskset -c 0 .venv/bin/python bench/app_cpu.py --profile v2   # cProfile of one variant instead
    taskset -c 0 .venv/bin/python bench/app_cpu.py --shape 1,128,512   # a GPU host's request (issue 20's bf16 case)

``v2 bf16`` sends x as BF16 and is answered in it. The fake engine answers with the x it was given, in the dtype
it was given: the wire dtype where the engine answers in the response's dtype, float32 where the front end widens
x and narrows the answer (before issue 20), so the row measures what the front end does with half precision.

What it leaves out is the same for every row: uvicorn's HTTP parsing and writes, the kernel, the crossing to
the model process (its Python is in ``MPClient``, which the fake engine replaces).
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import json
import os
import statistics
import sys
import time
from typing import Any

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

SHAPE = (1, 16, 64)  # bench/front.py's request: a tiny model (E=64, H=4, T=16)
MODEL = {"num_heads": 4, "emb_size": 64, "head_size": 16, "max_seq_len": 16}
AT_ONCE = 16  # requests in flight together (one turn's worth, as a batch's answers arrive together)


class NextTurnEngine:
    """An engine client (service.engine_api) answering every request with its input on the next turn of the
    loop; the model's description and statistics are ``real``'s."""

    ready = True
    forward_running = False

    def __init__(self, real) -> None:
        from service.messages import AttendOutput, Result

        self.model, self.stats = real.model, real.stats

        self._result = lambda x: Result(AttendOutput(x.copy(), None), 0.001, 0.001, AT_ONCE, AT_ONCE)

    def queue_depth(self) -> tuple[int, int]:
        return (0, 0)

    async def infer(self, inp, *, deadline, abandoned=None, priority=0):
        if asyncio.iscoroutine(abandoned):
            abandoned.close()
        loop = asyncio.get_running_loop()
        fut = loop.create_future()
        loop.call_soon(fut.set_result, self._result(inp.x))
        return await fut

    async def stop(self, grace_s: float = 0.0) -> None:
        pass

    def stop_accepting(self) -> None:
        pass


def set_shape(shape: tuple[int, int, int]) -> None:
    """Measure requests of ``shape`` (B, T, E) on a model that takes them (4 heads)."""
    global SHAPE, MODEL
    SHAPE = shape
    MODEL = {"num_heads": 4, "emb_size": shape[2], "head_size": shape[2] // 4, "max_seq_len": shape[1]}


def v2_body(raw: bytes, datatype: str) -> tuple[bytes, list]:
    header = json.dumps(
        {
            "inputs": [
                {"name": "x", "shape": list(SHAPE), "datatype": datatype, "parameters": {"binary_data_size": len(raw)}}
            ],
            "outputs": [{"name": "output", "parameters": {"binary_data": True}}],
        }
    ).encode()
    return header + raw, [(b"inference-header-content-length", b"%d" % len(header))]


def bodies() -> dict[str, tuple[str, bytes, list]]:
    from mha_client._wire import f32_to_bf16

    x = np.random.default_rng(0).standard_normal(SHAPE, dtype=np.float32)
    raw = x.tobytes()
    v2, v2_headers = v2_body(raw, "FP32")
    bf16, bf16_headers = v2_body(f32_to_bf16(x).tobytes(), "BF16")
    b64 = json.dumps({"x": {"dtype": "float32", "shape": list(SHAPE), "b64": base64.b64encode(raw).decode()}}).encode()
    octet = [(b"content-type", b"application/octet-stream")]
    return {
        "v2": ("/v2/models/mha/infer", v2, [*octet, *v2_headers]),
        "v2 bf16": ("/v2/models/mha/infer", bf16, [*octet, *bf16_headers]),
        "base64": ("/attend", b64, [(b"content-type", b"application/json")]),
        "echo": ("/echo", v2, octet),
    }


def scope(path: str, body: bytes, headers: list) -> dict[str, Any]:
    return {
        "type": "http", "asgi": {"version": "3.0"}, "http_version": "1.1", "method": "POST", "scheme": "http",
        "path": path, "raw_path": path.encode(), "query_string": b"", "root_path": "",
        "headers": [(b"host", b"127.0.0.1:8000"), (b"content-length", b"%d" % len(body)), *headers],
        "client": ("127.0.0.1", 5555), "server": ("127.0.0.1", 8000),
    }  # fmt: skip


async def started(app) -> tuple[asyncio.Queue, asyncio.Task]:
    """Run ``app``'s lifespan startup; the queue and task to shut it down with."""
    inbox: asyncio.Queue = asyncio.Queue()
    outbox: asyncio.Queue = asyncio.Queue()
    await inbox.put({"type": "lifespan.startup"})
    task = asyncio.create_task(app({"type": "lifespan", "asgi": {"version": "3.0"}}, inbox.get, outbox.put))
    msg = await outbox.get()
    if msg["type"] != "lifespan.startup.complete":
        raise RuntimeError(f"startup failed: {msg}")
    return inbox, task


async def per_request_us(app, case: tuple[str, bytes, list], n: int, reps: int) -> tuple[float, set]:
    """Median over ``reps`` of the CPU a request (us), ``n`` requests, AT_ONCE at a time; and the statuses seen."""
    path, body, headers = case
    base = scope(path, body, headers)
    statuses: set = set()

    async def receive() -> dict:
        return {"type": "http.request", "body": body, "more_body": False}

    async def send(message: dict) -> None:
        if message["type"] == "http.response.start":
            statuses.add(message["status"])

    times = []
    for _ in range(reps):
        t0 = time.process_time()
        for _ in range(n // AT_ONCE):
            await asyncio.gather(*[app(dict(base), receive, send) for _ in range(AT_ONCE)])
        times.append((time.process_time() - t0) / (n // AT_ONCE * AT_ONCE) * 1e6)
    return statistics.median(times), statuses


async def measure(variant: str, access_log: bool, n: int, reps: int, profile: bool) -> tuple[float, set]:
    case = bodies()[variant]
    if variant == "echo":
        from bench.echo_app import fastapi_app as app

        return await per_request_us(app, case, n, reps)
    from service.app import create_app
    from service.settings import Settings

    app = create_app(settings=Settings(**MODEL, access_log=access_log, grpc_port=0, warmup=False))
    inbox, lifespan = await started(app)
    state = app.state.mha
    real = state.engine
    state.engine = NextTurnEngine(real)
    try:
        if profile:
            import cProfile
            import pstats

            pr = cProfile.Profile()
            pr.enable()
            await per_request_us(app, case, n, 1)
            pr.disable()
            pstats.Stats(pr).sort_stats("tottime").print_stats(30)
            return float("nan"), set()
        return await per_request_us(app, case, n, reps)
    finally:
        state.engine = real
        await inbox.put({"type": "lifespan.shutdown"})
        await lifespan


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--requests", type=int, default=16_000, help="per repetition")
    parser.add_argument("--reps", type=int, default=5)
    parser.add_argument("--profile", choices=["v2", "v2 bf16", "base64"], help="cProfile this variant (log off)")
    parser.add_argument("--shape", default=",".join(map(str, SHAPE)), help="x's B,T,E")
    args = parser.parse_args()
    set_shape(tuple(int(d) for d in args.shape.split(",")))

    import uvloop

    from service.logs import configure_logging

    # The service's own log set-up (JSON to standard error), where the access lines go; silenced below warning
    # but for them, as in production. Standard error is this table's noise: send it to /dev/null.
    configure_logging("info", "json")
    if args.profile:
        uvloop.run(measure(args.profile, False, args.requests, 1, True))
        return
    rows = []
    for variant, log in (
        ("echo", False),
        ("v2", False),
        ("v2", True),
        ("v2 bf16", False),
        ("base64", False),
        ("base64", True),
    ):
        us, statuses = uvloop.run(measure(variant, log, args.requests, args.reps, False))
        if statuses != {200}:
            raise SystemExit(f"{variant}: statuses {statuses}")
        rows.append((variant, log, us))
    floor = rows[0][2]
    print(
        f"\nIn-process CPU a request, x {list(SHAPE)} float32 (bf16: BF16), {AT_ONCE} at a time, median of {args.reps}"
    )
    print("| route | access log | us a request | x the FastAPI echo's |")
    print("|---|---|---:|---:|")
    for variant, log, us in rows:
        name = "bare FastAPI echo (floor)" if variant == "echo" else variant
        print(f"| {name} | {'on' if log else 'off' if variant != 'echo' else ''} | {us:.1f} | {us / floor:.2f}x |")


if __name__ == "__main__":
    main()

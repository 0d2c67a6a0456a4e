"""SIGTERM to exit under load: this code, and with ``--against REV`` REV's beside it.

Each server (the default model, one torch thread, MHA_SHUTDOWN_GRACE_S=--grace) gets --clients
requests at once (x [2, 1024, 512] base64, about 5.6 MB each: more queued work than the grace
can finish), then SIGTERM once they are all read and queued. Printed: seconds from SIGTERM to
the process's exit, its exit code, and what the clients got (200, 503, 500, or an error such as
a dropped connection).

Usage: .venv/bin/python bench/shutdown.py [--grace 3] [--clients 40] [--against REV] [--out bench-results]
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import collections
import signal
import sys
import tempfile
import time
from pathlib import Path

import httpx
import numpy as np
import orjson

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from bench.harness import ROOT, Server, add_against, export_tree


async def load_then_sigterm(server: Server, clients: int) -> tuple[float, int, collections.Counter]:
    x = np.random.default_rng(0).standard_normal((2, 1024, 512)).astype(np.float32)
    b64 = {"dtype": "float32", "shape": list(x.shape), "b64": base64.b64encode(x.tobytes()).decode()}
    body = orjson.dumps({"x": b64})  # once: the client must not spend the wait serialising
    headers = {"content-type": "application/json"}
    async with httpx.AsyncClient(base_url=server.url, timeout=120) as c:
        tasks = [asyncio.create_task(c.post("/attend", content=body, headers=headers)) for _ in range(clients)]
        # SIGTERM once every request has been read and queued (or answered), except at most one batch's
        # worth computing: uvicorn closes connections whose request it has not started to read.
        waited = time.monotonic() + 60
        while time.monotonic() < waited:
            await asyncio.sleep(0.2)
            m = (await c.get("/metrics")).text
            queued = next(float(ln.split()[-1]) for ln in m.splitlines() if ln.startswith("mha_queue_depth_requests"))
            if queued + sum(t.done() for t in tasks) >= clients - 8:
                break
        t0 = time.monotonic()
        server.proc.send_signal(signal.SIGTERM)
        code = await asyncio.to_thread(server.proc.wait, 120)
        elapsed = time.monotonic() - t0
        results = await asyncio.gather(*tasks, return_exceptions=True)
    got = collections.Counter(r.status_code if isinstance(r, httpx.Response) else type(r).__name__ for r in results)
    return elapsed, code, got


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--grace", type=float, default=3.0)
    ap.add_argument("--clients", type=int, default=40)
    add_against(ap)
    ap.add_argument("--out", type=Path, default=ROOT / "bench-results")
    args = ap.parse_args()
    # One request per forward (MHA_MAX_BATCH_SIZE=2 sequences): a steady backlog longer than the grace.
    env = {"MHA_SHUTDOWN_GRACE_S": str(args.grace), "MHA_LOG_LEVEL": "error", "MHA_MAX_BATCH_SIZE": "2"}
    print(
        f"{args.clients} requests of x [2, 1024, 512] at once, SIGTERM once all are queued, "
        f"MHA_SHUTDOWN_GRACE_S={args.grace}"
    )
    with tempfile.TemporaryDirectory() as tmp:
        trees = [("this code", ROOT)]
        if args.against:
            old = Path(tmp) / "against"
            trees.insert(0, (f"against ({export_tree(args.against, old)})", old))
        for i, (name, source) in enumerate(trees):
            s = Server(env, args.out / "logs" / f"shutdown-{i}.log", source=source)
            try:
                elapsed, code, got = asyncio.run(load_then_sigterm(s, args.clients))
            finally:
                s.stop()
            print(
                f"{name:20} SIGTERM to exit {elapsed:5.2f} s (grace {args.grace:g} s), exit {code}, "
                f"clients got {dict(got)}"
            )


if __name__ == "__main__":
    main()

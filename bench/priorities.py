"""Priorities under a low-priority flood: the high-priority latency, unloaded and flooded, in one run.

A real mha-serve (``python -m service.cli``, one torch thread) pinned to core 0; this driver (an asyncio
httpx client) pinned to core 1. Every request is a v2 binary-tensor infer (x = [1, T, 512] float32, binary
output), the cheapest wire, so that the model's compute is the bottleneck.

Per server configuration (in turn, the same offered load for all):
  1. capacity   closed loop, 16 low-priority callers, ``--capacity-s`` s: answered req/s (measured once,
                on the first configuration; the flood rate is 2 x this for every configuration)
  2. unloaded   the high-priority trickle alone (``--trickle`` req/s, open loop) for ``--unloaded-s`` s
  3. flood      an open-loop low-priority flood at 2 x capacity plus the same trickle, ``--flood-s`` s
  (2 and 3 alternate in ``--rounds`` rounds, 3 s apart, so a drift of a shared machine hits both alike)
Printed: high-priority p50/p99 unloaded and under the flood, the p99 ratio (target <= 2), the share of
high requests that failed, and the low-priority 429 rate and answered rate.

Configurations: priorities on (MHA_PRIORITY_LEVELS=2; the flood at level 2, the trickle at level 1) with
max_batch_size 1 and 8, and one FIFO level (MHA_PRIORITY_LEVELS=1, no priority sent) with max_batch_size 1
as the before. A batch is never pre-empted: a high request waits for the running batch, so its flooded
latency is about one running batch plus its own; on a CPU, where batching buys little, a small
max_batch_size keeps that floor low.

Usage: .venv/bin/python bench/priorities.py [--seq-len 256] [--flood-s 20] [--out bench-results]
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import sys
import time
from collections import Counter
from pathlib import Path

import httpx
import numpy as np
import orjson

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from bench.harness import CLIENT_CORE, ROOT, SERVER_CORE, Server, pin_all_threads
from bench.measure import percentile

INFER = "/v2/models/mha/infer"


def body(seq_len: int, priority: int | None) -> tuple[bytes, dict[str, str]]:
    x = np.random.default_rng(0).standard_normal((1, seq_len, 512)).astype(np.float32).tobytes()
    head: dict = {
        "inputs": [
            {"name": "x", "shape": [1, seq_len, 512], "datatype": "FP32", "parameters": {"binary_data_size": len(x)}}
        ],
        "outputs": [{"name": "output", "parameters": {"binary_data": True}}],
    }
    if priority is not None:
        head["parameters"] = {"priority": priority}
    h = orjson.dumps(head)
    return h + x, {"content-type": "application/octet-stream", "inference-header-content-length": str(len(h))}


async def post(client: httpx.AsyncClient, req: tuple[bytes, dict[str, str]]) -> tuple[int, float]:
    t0 = time.perf_counter()
    try:
        r = await client.post(INFER, content=req[0], headers=req[1])
        await r.aread()
        status = r.status_code
    except httpx.HTTPError:
        status = -1
    return status, time.perf_counter() - t0


async def open_loop(client, req, rate: float, duration: float, out: list) -> None:
    """``rate`` requests a second for ``duration`` s, each sent on time whatever the others do."""
    tasks = []
    t0 = time.perf_counter()
    n = int(rate * duration)
    for i in range(n):
        delay = t0 + i / rate - time.perf_counter()
        if delay > 0:
            await asyncio.sleep(delay)
        tasks.append(asyncio.create_task(post(client, req)))
    out.extend(await asyncio.gather(*tasks))


async def closed_loop(client, req, callers: int, duration: float) -> float:
    statuses: Counter = Counter()
    end = time.perf_counter() + duration

    async def caller() -> None:
        while time.perf_counter() < end:
            status, _ = await post(client, req)
            statuses[status] += 1

    t0 = time.perf_counter()
    await asyncio.gather(*(caller() for _ in range(callers)))
    if set(statuses) != {200}:
        raise RuntimeError(f"the capacity run got statuses {dict(statuses)}; expected only 200")
    return statuses[200] / (time.perf_counter() - t0)


def summary(results: list[tuple[int, float]]) -> dict:
    ok = [dt * 1000 for s, dt in results if s == 200]
    n = len(results)
    return {
        "sent": n,
        "ok": len(ok),
        "p50_ms": percentile(ok, 50),
        "p99_ms": percentile(ok, 99),
        "rate_429": sum(s == 429 for s, _ in results) / n if n else float("nan"),
        "failed": sum(s != 200 for s, _ in results) / n if n else float("nan"),
        "statuses": {str(k): v for k, v in sorted(Counter(s for s, _ in results).items())},
    }


async def run_config(url: str, levels: int, args, capacity: float | None) -> dict:
    high = body(args.seq_len, 1 if levels > 1 else None)
    low = body(args.seq_len, 2 if levels > 1 else None)
    limits = httpx.Limits(max_connections=1024, max_keepalive_connections=1024)
    async with httpx.AsyncClient(base_url=url, timeout=60, limits=limits) as client:
        warm: list = []
        await open_loop(client, high, args.trickle, 2, warm)  # warm-up, not counted
        if capacity is None:
            capacity = await closed_loop(client, low, 16, args.capacity_s)
            await asyncio.sleep(1)
        unloaded: list = []
        flood_low: list = []
        flood_high: list = []
        flood_wall = flood_cpu = 0.0
        for _ in range(args.rounds):  # interleaved, so that a drift of a shared machine hits both alike
            await open_loop(client, high, args.trickle, args.unloaded_s / args.rounds, unloaded)
            t0, cpu0 = time.perf_counter(), time.process_time()
            await asyncio.gather(
                open_loop(client, low, 2 * capacity, args.flood_s / args.rounds, flood_low),
                open_loop(client, high, args.trickle, args.flood_s / args.rounds, flood_high),
            )
            flood_wall += time.perf_counter() - t0
            flood_cpu += time.process_time() - cpu0
            await asyncio.sleep(3)  # the low queue drains before the next unloaded phase
        client_cpu = flood_cpu / flood_wall
    u, f, lo = summary(unloaded), summary(flood_high), summary(flood_low)
    return {
        "capacity_rps": capacity,
        "flood_rps": 2 * capacity,
        "unloaded": u,
        "flooded_high": f,
        "flooded_low": lo,
        "low_answered_rps": lo["ok"] / flood_wall,
        "p99_ratio": f["p99_ms"] / u["p99_ms"],
        "client_core_share": client_cpu,
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--seq-len", type=int, default=1024)
    ap.add_argument("--trickle", type=float, default=4.0, help="high-priority requests a second")
    ap.add_argument("--capacity-s", type=float, default=5.0)
    ap.add_argument("--unloaded-s", type=float, default=15.0)
    ap.add_argument("--flood-s", type=float, default=20.0)
    ap.add_argument("--rounds", type=int, default=2, help="unloaded and flood phases alternate this many times")
    ap.add_argument("--queue", type=int, default=32, help="MHA_MAX_QUEUE_REQUESTS (per level)")
    ap.add_argument("--out", type=Path, default=ROOT / "bench-results")
    args = ap.parse_args()
    with contextlib.suppress(OSError):
        os.sched_setaffinity(0, {CLIENT_CORE})
    configs = [
        ("priorities on, max_batch_size 1", 2, 1),
        ("priorities on, max_batch_size 8", 2, 8),
        ("one FIFO level (before), max_batch_size 1", 1, 1),
    ]
    rows = []
    capacity = None
    for name, levels, bs in configs:
        env = {
            "MHA_PRIORITY_LEVELS": str(levels),
            "MHA_MAX_BATCH_SIZE": str(bs),
            "MHA_DECODE_PROCESSES": "0",
            "MHA_MAX_REQUEST_BATCH": "1",
            # per level; with the admission bounds (before the body is read, so across levels) well above
            # levels x this, only the level's own queue refuses a low request
            "MHA_MAX_QUEUE_REQUESTS": str(args.queue),
        }
        server = Server(env, args.out / "logs" / f"priorities-{levels}-{bs}.log")
        try:
            pin_all_threads(server.proc.pid, SERVER_CORE)
            res = asyncio.run(run_config(server.url, levels, args, capacity))
        finally:
            server.stop()
        capacity = res["capacity_rps"]
        rows.append({"config": name, **res})
        print(f"done: {name}", file=sys.stderr)
    lines = [
        f"# Priorities under a low-priority flood (x = [1, {args.seq_len}, 512], v2 binary)",
        "",
        f"capacity {rows[0]['capacity_rps']:.1f} req/s (closed loop, 16 callers); flood {rows[0]['flood_rps']:.1f} "
        f"req/s open loop for {args.flood_s:g} s; high-priority trickle {args.trickle:g} req/s",
        "",
        "| configuration | high p50 unloaded | high p99 unloaded | high p50 flood | high p99 flood | p99 ratio "
        "| high failed | low 429 rate | low answered req/s | client core |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        u, f, lo = r["unloaded"], r["flooded_high"], r["flooded_low"]
        lines.append(
            f"| {r['config']} | {u['p50_ms']:.1f} ms | {u['p99_ms']:.1f} ms | {f['p50_ms']:.1f} ms | "
            f"{f['p99_ms']:.1f} ms | {r['p99_ratio']:.2f} | {f['failed']:.1%} | {lo['rate_429']:.1%} | "
            f"{r['low_answered_rps']:.1f} | {r['client_core_share']:.0%} |"
        )
    first = rows[0]
    overloaded = first["flooded_low"]["rate_429"] > 0.2  # the flood did overload the server
    ok = first["p99_ratio"] <= 2 and first["flooded_high"]["failed"] == 0
    verdict = "PASS" if ok and overloaded else "FAIL" if overloaded else "NO VERDICT (the flood was not an overload)"
    lines += ["", f"{verdict}: {first['config']}: high p99 under the flood <= 2 x unloaded p99, no high failures"]
    text = "\n".join(lines)
    print(text)
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "priorities.md").write_text(text + "\n")
    (args.out / "priorities.json").write_text(json.dumps({"args": vars(args) | {"out": str(args.out)}, "rows": rows}))


if __name__ == "__main__":
    main()

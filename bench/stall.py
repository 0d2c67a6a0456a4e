"""How long a ~50 MB JSON-lists request stalls the event loop: /healthz latency while it is served.

Two servers in one run, the same default model (E=512) and one torch thread each, one after the
other: decode processes off (MHA_DECODE_PROCESSES=0: parse and encode on the event loop, as
before) and on (the default). For each, a separate poller process GETs /healthz every 5 ms on a
keep-alive connection, first for 1 s idle, then while this script sends the large request (x
[5, 1000, 512] as lists, ~50 MB, answered as lists, ~30 MB) N times in a row. Printed: /healthz
latency p50/p99/max idle and during the large requests, and the large request's own time.

The machine may be shared and is small (2 cores): numbers are noisy, ratios in one run are the point.

Usage: .venv/bin/python bench/stall.py [--requests 3] [--out bench-results]
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

import httpx

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from bench.harness import Server
from bench.measure import lists_body, percentile

POLLER = r"""
import http.client, json, os, sys, time
port, stop = int(sys.argv[1]), sys.argv[2]
c = http.client.HTTPConnection("127.0.0.1", port)
out, nxt = [], time.monotonic()
while not os.path.exists(stop):
    t0 = time.monotonic()
    c.request("GET", "/healthz"); c.getresponse().read()
    out.append((t0, time.monotonic() - t0))
    nxt += 0.005
    time.sleep(max(0.0, nxt - time.monotonic()))
print(json.dumps(out))
"""


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--requests", type=int, default=3)
    ap.add_argument("--out", type=Path, default=Path(__file__).resolve().parents[1] / "bench-results")
    args = ap.parse_args()
    body = lists_body((5, 1000, 512))
    print(f"large request: x [5, 1000, 512] as lists, {len(body) / 1e6:.1f} MB; {args.requests} in a row per server")
    rows = []
    for name, env in (
        ("inline (MHA_DECODE_PROCESSES=0)", {"MHA_DECODE_PROCESSES": "0"}),
        ("decode processes (default)", {}),
    ):
        rows.append((name, run_one(env, body, args.requests, args.out / "logs" / f"stall-{len(rows)}.log")))
    print(f"\n{'/healthz latency (ms)':34} {'idle p50':>9} {'p50':>7} {'p99':>7} {'max':>7}   large request (s)")
    for name, r in rows:
        print(
            f"{name:34} {r['idle_p50']:9.2f} {r['p50']:7.2f} {r['p99']:7.2f} {r['max']:7.2f}   "
            + ", ".join(f"{d:.2f}" for d in r["durations"])
        )
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "stall.json").write_text(json.dumps({"rows": [{"server": n, **r} for n, r in rows]}))
    a, b = rows[0][1], rows[1][1]
    print(
        f"\nmax /healthz stall: {a['max']:.0f} ms inline -> {b['max']:.0f} ms with decode processes "
        f"({a['max'] / max(b['max'], 1e-9):.1f}x less); p99 {a['p99']:.0f} -> {b['p99']:.0f} ms"
    )


def run_one(env: dict[str, str], body: bytes, n: int, log: Path) -> dict:
    s = Server({**env, "MHA_MAX_BODY_BYTES": str(128 << 20), "MHA_MAX_INFLIGHT_BYTES": str(512 << 20)}, log)
    try:
        with httpx.Client(base_url=s.url, timeout=120) as c:
            small = c.post("/attend", json={"x": [[[0.1] * 512] * 4]})
            assert small.status_code == 200, small.text
            r = c.post("/attend", content=body, headers={"content-type": "application/json"})  # warm every path
            assert r.status_code == 200, r.text[:300]
            stop = log.with_suffix(".stop")
            stop.unlink(missing_ok=True)
            poller = subprocess.Popen(
                [sys.executable, "-c", POLLER, str(s.port), str(stop)], stdout=subprocess.PIPE, text=True
            )
            time.sleep(1.5)  # the poller's own start, then about 1 s idle
            spans = []
            for _ in range(n):
                t0 = time.monotonic()
                r = c.post("/attend", content=body, headers={"content-type": "application/json"})
                spans.append((t0, time.monotonic()))
                assert r.status_code == 200, r.text[:300]
            time.sleep(0.2)
            stop.touch()
            out, _ = poller.communicate(timeout=30)
            stop.unlink()
    finally:
        s.stop()
    samples = json.loads(out) if out.strip() else []
    busy = [lat * 1000 for t, lat in samples if any(a <= t <= b for a, b in spans)]
    idle = [lat * 1000 for t, lat in samples if t < spans[0][0] - 0.05]
    return {
        "idle_p50": percentile(idle, 50),
        "p50": percentile(busy, 50),
        "p99": percentile(busy, 99),
        "max": max(busy, default=float("nan")),
        "durations": [b - a for a, b in spans],
    }


if __name__ == "__main__":
    main()

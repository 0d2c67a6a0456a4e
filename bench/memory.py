"""Peak memory of the server while several ~50 MB JSON-lists requests arrive at once.

K clients (default 4) each send x [5, 1000, 512] as lists (~50 MB) at the same moment; a
client that gets 429 waits its Retry-After and sends again, as mha_client does. The server's
resident memory (its process plus its decode processes, from /proc) is sampled every 10 ms.
Servers, one after the other, the same default model, one torch thread:

  against    with ``--against REV``: the code of REV, exported to a temporary folder;
  inline     this code, decode processes off and admission not binding (MHA_MAX_INFLIGHT_BYTES 1 GiB);
  default    this code with its defaults (decode processes; admission at 256 MiB);
  admitted   this code with MHA_MAX_INFLIGHT_BYTES=128 MiB: two 50 MB bodies in flight at a time.

Printed: idle and peak RSS, the peak's growth over idle, statuses, 429s, time until all answered.
Numbers are noisy on a shared 2-core machine; the growth, side by side in one run, is the point.

Usage: .venv/bin/python bench/memory.py [--clients 4] [--against REV] [--out bench-results]
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import threading
import time
from pathlib import Path

import httpx

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from bench.harness import ROOT, Server, add_against, export_tree
from bench.measure import lists_body


def run(server: Server, body: bytes, clients: int) -> dict:
    statuses: list[int] = []
    retries = [0]
    lock = threading.Lock()
    go = threading.Event()

    def client() -> None:
        with httpx.Client(base_url=server.url, timeout=300) as c:
            go.wait()
            while True:
                r = c.post("/attend", content=body, headers={"content-type": "application/json"})
                if r.status_code != 429:
                    break
                with lock:
                    retries[0] += 1
                time.sleep(float(r.headers.get("retry-after", "1")))
            with lock:
                statuses.append(r.status_code)

    idle = sum(server.rss_split())
    threads = [threading.Thread(target=client) for _ in range(clients)]
    for t in threads:
        t.start()
    time.sleep(0.2)
    t0 = time.monotonic()
    go.set()
    peak, peak_main, peak_kids = idle, 0, 0
    while any(t.is_alive() for t in threads):
        main, kids = server.rss_split()
        peak, peak_main, peak_kids = max(peak, main + kids), max(peak_main, main), max(peak_kids, kids)
        time.sleep(0.01)
    return {
        "idle": idle,
        "peak": peak,
        "peak_main": peak_main,
        "peak_kids": peak_kids,
        "statuses": statuses,
        "retries": retries[0],
        "s": time.monotonic() - t0,
    }


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--clients", type=int, default=4)
    add_against(ap)
    ap.add_argument("--out", type=Path, default=ROOT / "bench-results")
    args = ap.parse_args()
    body = lists_body((5, 1000, 512))
    print(f"{args.clients} clients at once, each x [5, 1000, 512] as lists ({len(body) / 1e6:.1f} MB)")
    big = {"MHA_MAX_BODY_BYTES": str(64 << 20)}
    with tempfile.TemporaryDirectory() as tmp:
        configs = []
        if args.against:
            commit = export_tree(args.against, Path(tmp) / "against")
            configs.append((f"against ({commit})", big, Path(tmp) / "against"))
        configs += [
            (
                "inline, admission 1 GiB",
                {**big, "MHA_DECODE_PROCESSES": "0", "MHA_MAX_INFLIGHT_BYTES": str(1 << 30)},
                ROOT,
            ),
            ("default (256 MiB)", big, ROOT),
            ("admitted 128 MiB", {**big, "MHA_MAX_INFLIGHT_BYTES": str(128 << 20)}, ROOT),
        ]
        rows = []
        for i, (name, env, source) in enumerate(configs):
            s = Server(env, args.out / "logs" / f"memory-{i}.log", source=source)
            try:
                rows.append((name, run(s, body, args.clients)))
            finally:
                s.stop()
    args.out.mkdir(parents=True, exist_ok=True)
    doc = {"clients": args.clients, "rows": [{"server": n, **r} for n, r in rows]}
    (args.out / "memory.json").write_text(json.dumps(doc))
    mb = 1 << 20
    print(
        f"\n{'server':28} {'idle MiB':>9} {'peak MiB':>9} {'growth':>8} {'(main':>6} {'workers)':>8}   "
        "statuses  429s  all answered (s)"
    )
    for name, r in rows:
        print(
            f"{name:28} {r['idle'] / mb:9.0f} {r['peak'] / mb:9.0f} {(r['peak'] - r['idle']) / mb:8.0f} "
            f"{r['peak_main'] / mb:6.0f} {r['peak_kids'] / mb:8.0f}   "
            f"{sorted(r['statuses'])}  {r['retries']:4d}  {r['s']:.1f}"
        )


if __name__ == "__main__":
    main()

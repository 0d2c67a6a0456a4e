"""A small HTTP/1.1 load generator for hosts without wrk (bench/gpu.py falls back to it): one fixed POST
over keep-alive connections, raw asyncio streams, standard library only. Run several processes for
more load; they start together at --start-at (epoch seconds) and each prints one JSON line.

    python bench/loadgen.py --port P --path /v2/models/mha/infer --body FILE --header 'Name: value' \\
        --connections 32 --seconds 8 [--start-at EPOCH]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import re
import time

_LENGTH = re.compile(rb"(?i)\r\ncontent-length:\s*(\d+)")


async def _connection(port: int, request: bytes, stop: float, counts: dict) -> None:
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    try:
        while time.monotonic() < stop:
            t0 = time.monotonic()
            writer.write(request)
            head = await reader.readuntil(b"\r\n\r\n")
            m = _LENGTH.search(head)
            if m is None:
                raise RuntimeError(f"response without content-length: {head[:200]!r}")
            await reader.readexactly(int(m.group(1)))
            key = "ok" if head.startswith(b"HTTP/1.1 200") else "errors"
            counts[key] += 1
            counts["latency_s"] += time.monotonic() - t0
    finally:
        writer.close()


async def run(port: int, request: bytes, connections: int, seconds: float, start_at: float) -> dict:
    counts = {"ok": 0, "errors": 0, "latency_s": 0.0}
    await asyncio.sleep(max(0.0, start_at - time.time()))
    t0 = time.monotonic()
    results = await asyncio.gather(
        *(_connection(port, request, t0 + seconds, counts) for _ in range(connections)), return_exceptions=True
    )
    counts["elapsed_s"] = time.monotonic() - t0
    counts["failed_connections"] = sum(isinstance(r, BaseException) for r in results)
    return counts


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--port", type=int, required=True)
    ap.add_argument("--path", required=True)
    ap.add_argument("--body", required=True, help="file holding the request body")
    ap.add_argument("--header", action="append", default=[], help="'Name: value' (repeatable)")
    ap.add_argument("--connections", type=int, default=16)
    ap.add_argument("--seconds", type=float, default=8.0)
    ap.add_argument("--start-at", type=float, default=0.0)
    args = ap.parse_args()
    with open(args.body, "rb") as f:
        body = f.read()
    head = f"POST {args.path} HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Length: {len(body)}\r\n"
    head += "".join(f"{h}\r\n" for h in args.header) + "\r\n"
    counts = asyncio.run(run(args.port, head.encode() + body, args.connections, args.seconds, args.start_at))
    print(json.dumps(counts), flush=True)


if __name__ == "__main__":
    main()

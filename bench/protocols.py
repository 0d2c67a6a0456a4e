"""gRPC beside v2 HTTP binary and /attend base64, measured side by side in one run.

One mha-serve (the built-in model, [1, 128, 512] fp32 requests, one torch thread, batches of up
to 32) pinned to core 0; the load generators pinned to core 1: Triton's perf_analyzer for both v2
protocols (bench/perf_analyzer.sh; C++, it saturates a binary endpoint) and wrk for /attend base64
(bench/wrk/post_body.lua). perf_analyzer asks for every output of the model's metadata, so every
request here returns output and weights ([1, 8, 128, 128]); /attend asks for them too
(return_weights), so that the three carry the same work.

    .venv/bin/python bench/protocols.py [--concurrency 1,8,32,64] [--seconds 6] [--small]

--small: a front-bound model (E=64, 4 heads, T=16; compute negligible, the GPU-like case), where
the per-request cost of each front end is all there is.

Prints a table of requests/s and the ratios gRPC / v2 HTTP binary and gRPC / base64 per
concurrency. The target: gRPC >= 1.0x v2 HTTP binary at concurrency 32.
"""

from __future__ import annotations

import argparse
import base64
import json
import os
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx
import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "bench"))
from perf_input import input_data  # noqa: E402

LUA = ROOT / "bench" / "wrk" / "post_body.lua"
PERF = ROOT / "bench" / "perf_analyzer.sh"
SERVER_CORE, CLIENT_CORE = "0", "1"
SMALL = {"MHA_NUM_HEADS": "4", "MHA_EMB_SIZE": "64", "MHA_HEAD_SIZE": "16", "MHA_MAX_SEQ_LEN": "64"}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_server(port: int, grpc_port: int, log: Path, model: dict[str, str]) -> subprocess.Popen:
    env = {
        **os.environ,
        **model,
        "MHA_TORCH_THREADS": "1",
        "MHA_MAX_BATCH_SIZE": "32",
        "MHA_ACCESS_LOG": "false",
        "MHA_GRPC_PORT": str(grpc_port),
        "MHA_SHUTDOWN_GRACE_S": "1",
    }
    cmd = ["taskset", "-c", SERVER_CORE, sys.executable, "-m", "service.cli", "--port", str(port)]
    proc = subprocess.Popen(cmd, env=env, stdout=log.open("w"), stderr=subprocess.STDOUT, cwd=ROOT)
    deadline = time.monotonic() + 180
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise SystemExit(f"mha-serve exited:\n{log.read_text()[-3000:]}")
        try:
            if httpx.get(f"http://127.0.0.1:{port}/readyz", timeout=1).status_code == 200:
                return proc
        except httpx.HTTPError:
            pass
        time.sleep(0.2)
    proc.kill()
    raise SystemExit("mha-serve not ready after 180 s")


def perf_analyzer(protocol: str, url: str, data: Path, conc: int, seconds: float, out: Path) -> float:
    csv = out / f"{protocol}-{conc}.csv"
    cmd = ["taskset", "-c", CLIENT_CORE, "bash", str(PERF), "-m", "mha", "-i", protocol, "-u", url]
    cmd += ["--input-data", str(data), "--concurrency-range", str(conc), "--max-threads", str(max(16, conc))]
    cmd += ["--measurement-interval", str(int(seconds * 1000)), "--stability-percentage", "1000"]
    cmd += ["--max-trials", "3", "-f", str(csv)]
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=seconds * 10 + 120)
    if r.returncode != 0:
        raise SystemExit(f"perf_analyzer failed ({r.returncode}):\n{r.stdout[-3000:]}\n{r.stderr[-2000:]}")
    row = csv.read_text().splitlines()[1].split(",")
    return float(row[1])


def wrk(url: str, body: Path, conc: int, seconds: float) -> float:
    env = {**os.environ, "BODY_FILE": str(body), "CONTENT_TYPE": "application/json", "WRK_HEADERS": ""}
    cmd = ["taskset", "-c", CLIENT_CORE, "wrk", "-t1", f"-c{conc}", f"-d{seconds:g}s", "--timeout", "30s"]
    cmd += ["-s", str(LUA), url]
    r = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=seconds + 90)
    for line in r.stdout.splitlines():
        if line.startswith("WRK_JSON "):
            res = json.loads(line[len("WRK_JSON ") :])
            errors = sum(v for k, v in res.items() if k.startswith("err_"))
            if errors:
                raise SystemExit(f"wrk saw errors: {res}")
            return res["requests"] / (res["duration_us"] / 1e6)
    raise SystemExit(f"wrk gave no WRK_JSON line:\n{r.stdout}\n{r.stderr}")


def settle(base: str) -> None:
    """Wait until the queue is empty, so that one run's leftovers do not slow the next."""
    for _ in range(100):
        m = httpx.get(base + "/metrics", timeout=5).text
        if "mha_queue_depth_requests 0.0" in m:
            return
        time.sleep(0.1)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--concurrency", default="1,8,32,64")
    p.add_argument("--seconds", type=float, default=6.0, help="perf_analyzer window / wrk duration per cell")
    p.add_argument("--small", action="store_true", help="a front-bound model: E=64, 4 heads, T=16")
    p.add_argument("--json", type=Path, help="also write the rows (req/s per protocol and concurrency) here")
    a = p.parse_args()
    T, E = (16, 64) if a.small else (128, 512)
    concs = [int(c) for c in a.concurrency.split(",")]
    subprocess.run(["bash", str(PERF), "--install"], check=True, stdout=subprocess.DEVNULL)
    port, grpc_port = free_port(), free_port()
    base = f"http://127.0.0.1:{port}"
    with tempfile.TemporaryDirectory() as tmp_:
        tmp = Path(tmp_)
        server = start_server(port, grpc_port, tmp / "server.log", SMALL if a.small else {})
        try:
            cfg = httpx.get(base + "/v2/models/mha/config").json()
            data = tmp / "perf.json"
            data.write_text(json.dumps(input_data(cfg, T, 4, optional=False)))
            x = np.random.default_rng(0).standard_normal((1, T, E), dtype=np.float32)
            b64 = {"dtype": "float32", "shape": [1, T, E], "b64": base64.b64encode(x.tobytes()).decode()}
            body = tmp / "attend.json"
            body.write_text(json.dumps({"x": b64, "return_weights": True}))
            rows = []
            for c in concs:
                row = {"c": c}
                for name, run in (
                    ("grpc", lambda c=c: perf_analyzer("grpc", f"127.0.0.1:{grpc_port}", data, c, a.seconds, tmp)),
                    ("v2 http", lambda c=c: perf_analyzer("http", f"127.0.0.1:{port}", data, c, a.seconds, tmp)),
                    ("base64", lambda c=c: wrk(base + "/attend", body, c, a.seconds * 2)),
                ):
                    settle(base)
                    row[name] = run()
                    print(f"c={c:<3} {name:<8} {row[name]:8.1f} req/s", file=sys.stderr, flush=True)
                rows.append(row)
        finally:
            server.terminate()
            server.wait(30)
    heads = 4 if a.small else 8
    if a.json:
        a.json.write_text(json.dumps({"shape": [1, T, E], "heads": heads, "rows": rows}, indent=1))
    print(
        f"\n[1,{T},{E}] fp32, {heads} heads, output + weights; server on core {SERVER_CORE}, load on core {CLIENT_CORE}"
    )
    print("| c | gRPC req/s | v2 HTTP binary req/s | /attend base64 req/s | gRPC / v2 HTTP | gRPC / base64 |")
    print("|---:|---:|---:|---:|---:|---:|")
    for r in rows:
        g, h, b = r["grpc"], r["v2 http"], r["base64"]
        print(f"| {r['c']} | {g:.0f} | {h:.0f} | {b:.0f} | {g / h:.2f}x | {g / b:.2f}x |")


if __name__ == "__main__":
    main()

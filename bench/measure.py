"""The service benchmark's measurements: the forward floor t_row, one (variant, concurrency) cell under wrk
with the server's CPU and metrics around it, the one-request probes and response checks, and the floors
derived from the cells. What to run comes from bench/service.py; the processes and cores from
bench/harness.py; the tables from bench/report.py.
"""

from __future__ import annotations

import base64
import json
import os
import resource
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import orjson

from bench.harness import (
    ROOT,
    SERVER_CORE,
    Quiet,
    Server,
    busy_between,
    core_busy,
    http,
    main_thread_cpu_s,
    proc_cpu_s,
    run_wrk,
    scrape,
    wait_idle,
)

SHAPE = (1, 128, 512)
T_ROW_BATCH = 32
FOREIGN_RERUN = 0.10  # re-run a cell once if other processes took more than this of a core during it


@dataclass(frozen=True)
class Variant:
    name: str  # table label
    server: str  # the name of the server it runs against (bench/service.py's SERVERS)
    path: str
    body: str  # key into the bodies written by write_bodies
    content_type: str = "application/json"
    headers: tuple[tuple[str, str], ...] = ()
    probe: bool = False  # optional route: include only if one probe request answers 200
    family: str = ""  # lists | base64 | v2-binary | naive | echo (plot styling, targets)
    min_duration_s: float = 0.0  # a slow server answers C requests in waves: a run must hold a few waves


# -- bodies -------------------------------------------------------------------------------------------------


def write_bodies(dir_: Path) -> tuple[dict[str, Path], int, np.ndarray]:
    """Deterministic x and the request bodies of every variant, written once (wrk reads them)."""
    dir_.mkdir(parents=True, exist_ok=True)
    x = np.random.default_rng(0).standard_normal(SHAPE, dtype=np.float32)
    raw = x.astype("<f4").tobytes()
    b64 = orjson.dumps({"x": {"dtype": "float32", "shape": list(SHAPE), "b64": base64.b64encode(raw).decode()}})
    v2_header = orjson.dumps(
        {
            "inputs": [
                {"name": "x", "shape": list(SHAPE), "datatype": "FP32", "parameters": {"binary_data_size": len(raw)}}
            ],
            "outputs": [{"name": "output", "parameters": {"binary_data": True}}],
        }
    )
    bodies = {
        # float32 lists as a float32-aware client writes them (shortest repr), like the service's responses
        "lists": orjson.dumps({"x": x}, option=orjson.OPT_SERIALIZE_NUMPY),
        "base64": b64,
        "v2": v2_header + raw,
        "echo": b64,  # the echo floor moves the base64 body's bytes, raw
    }
    paths = {}
    for k, v in bodies.items():
        p = dir_ / f"{k}.body"
        p.write_bytes(v)
        paths[k] = p
    return paths, len(v2_header), x


# -- floors and cells --------------------------------------------------------------------------------------

T_ROW_SCRIPT = r"""
import json, statistics, sys, time
import torch
torch.set_num_threads(1)
from mha_core import MHAConfig, MultiHeadAttention
m = MultiHeadAttention.from_seed(MHAConfig(8, 512, 64, 1024), 0).eval()
reps = int(sys.argv[1])
g = torch.Generator().manual_seed(0)
res = {}
for B, n in ((BATCH, reps), (1, reps * 5)):
    x = torch.randn(B, 128, 512, generator=g)
    with torch.inference_mode():
        for _ in range(max(3, n // 5)):
            m(x)
        ts, cs = [], []
        for _ in range(n):
            c0 = time.thread_time(); t0 = time.perf_counter(); m(x)
            ts.append(time.perf_counter() - t0); cs.append(time.thread_time() - c0)
    res[f"b{B}"] = {"median_s": statistics.median(ts), "min_s": min(ts), "cpu_median_s": statistics.median(cs), "n": n}
print(json.dumps(res))
""".replace("BATCH", str(T_ROW_BATCH))


def measure_t_row(reps: int) -> dict:
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    r = subprocess.run(
        ["taskset", "-c", str(SERVER_CORE), sys.executable, "-c", T_ROW_SCRIPT, str(reps)],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
        check=True,
    )
    res = json.loads(r.stdout.strip().splitlines()[-1])
    b = res[f"b{T_ROW_BATCH}"]
    return {
        "t_row_s": b["median_s"] / T_ROW_BATCH,
        "t_batch32_s": b["median_s"],
        "t_batch1_s": res["b1"]["median_s"],
        "t_row_min_s": b["min_s"] / T_ROW_BATCH,
        "t_row_cpu_s": b["cpu_median_s"] / T_ROW_BATCH,
        "t_batch1_min_s": res["b1"]["min_s"],
        "reps": reps,
    }


@dataclass
class Cell:
    variant: str
    family: str
    server: str
    concurrency: int
    duration_s: float
    requests: int = 0
    rps: float = 0.0
    p50_ms: float = 0.0
    p90_ms: float = 0.0
    p99_ms: float = 0.0
    mean_ms: float = 0.0
    max_ms: float = 0.0
    non2xx: int = 0
    socket_errors: int = 0
    timeouts: int = 0
    server_cpu: float = 0.0  # server process CPU, fraction of one core, during the run
    cpu_ms_per_req: float = 0.0  # server CPU time per completed request (less sensitive to other load)
    loop_cpu_ms_per_req: float = 0.0  # of which the main thread (event loop: HTTP, codecs, batching); the rest
    # is other threads (mha-serve: the forward worker; naive: FastAPI's threadpool)
    core0_busy: float = 0.0  # whole core 0 busy fraction (server + anything else)
    core1_busy: float = 0.0
    foreign0: float = 0.0  # core 0 taken by other processes: core0 busy - server CPU
    foreign1: float = 0.0  # core 1 taken by other processes: core1 busy - wrk - this driver
    quiet_wait_s: float = 0.0
    busy_before: dict = field(default_factory=dict)  # per-core busy fraction just before the run
    attempts: int = 1
    mean_batch: float | None = None  # service: requests per forward pass
    mean_compute_ms: float | None = None  # service: forward time per batch
    mean_queue_ms: float | None = None  # service: time a request waited for its batch to start
    idle_wait_s: float = 0.0
    raw: dict = field(default_factory=dict)


def measure_cell(
    v: Variant,
    srv: Server,
    procs: list[subprocess.Popen],
    conc: int,
    duration: float,
    body: Path,
    quiet: Quiet | None = None,
) -> Cell:
    """One wrk run of ``v`` at ``conc`` connections against ``srv``, after every server in ``procs`` went idle
    (and, with ``quiet``, the cores did): wrk's figures, the server's CPU (all threads and the main thread), the
    cores' busy time taken by other processes, and the service's batch/compute/queue metrics over the run."""
    duration = max(duration, v.min_duration_s)
    cell = Cell(v.name, v.family, v.server, conc, duration)
    proc, base = srv.proc, srv.url
    cell.idle_wait_s = wait_idle(procs, base, srv.ready_path)
    service = v.server.startswith("mha-serve")
    m0 = scrape(base) if service else {}
    if quiet is not None:
        cell.quiet_wait_s, cell.busy_before = quiet.wait()
    ru0 = resource.getrusage(resource.RUSAGE_CHILDREN), resource.getrusage(resource.RUSAGE_SELF)
    all0, main0 = sum(proc_cpu_s(p.pid) for p in procs), main_thread_cpu_s(proc.pid)
    cpu0, cores0, t0 = proc_cpu_s(proc.pid), core_busy(), time.monotonic()
    raw = run_wrk(base + v.path, body, v.content_type, dict(v.headers), conc, duration)
    cpu1, cores1, t1 = proc_cpu_s(proc.pid), core_busy(), time.monotonic()
    all1, main1 = sum(proc_cpu_s(p.pid) for p in procs), main_thread_cpu_s(proc.pid)
    ru1 = resource.getrusage(resource.RUSAGE_CHILDREN), resource.getrusage(resource.RUSAGE_SELF)
    wall = t1 - t0
    m1 = scrape(base) if service else {}
    cell.raw = raw
    secs = raw["duration_us"] / 1e6
    cell.requests = raw["requests"]
    cell.rps = raw["requests"] / secs if secs > 0 else 0.0
    cell.p50_ms, cell.p90_ms, cell.p99_ms = raw["p50_us"] / 1e3, raw["p90_us"] / 1e3, raw["p99_us"] / 1e3
    cell.mean_ms, cell.max_ms = raw["lat_mean_us"] / 1e3, raw["lat_max_us"] / 1e3
    cell.non2xx = raw["err_status"]
    cell.socket_errors = raw["err_connect"] + raw["err_read"] + raw["err_write"]
    cell.timeouts = raw["err_timeout"]
    cell.server_cpu = (cpu1 - cpu0) / wall
    busy = busy_between(cores0, cores1)
    for core in (0, 1):
        setattr(cell, f"core{core}_busy", busy[core])
    client_cpu = sum((b.ru_utime + b.ru_stime) - (a.ru_utime + a.ru_stime) for a, b in zip(ru0, ru1, strict=True))
    cell.foreign0 = max(0.0, cell.core0_busy - (all1 - all0) / wall)
    cell.cpu_ms_per_req = 1e3 * (cpu1 - cpu0) / max(1, cell.requests)
    cell.loop_cpu_ms_per_req = 1e3 * (main1 - main0) / max(1, cell.requests)
    cell.foreign1 = max(0.0, cell.core1_busy - client_cpu / wall)

    def delta(name: str) -> float:
        return m1.get(name, 0.0) - m0.get(name, 0.0)

    if delta("mha_batch_size_requests_count") > 0:
        n = delta("mha_batch_size_requests_count")
        cell.mean_batch = delta("mha_batch_size_requests_sum") / n
        cell.mean_compute_ms = 1e3 * delta("mha_compute_seconds_sum") / max(1.0, delta("mha_compute_seconds_count"))
        cell.mean_queue_ms = 1e3 * delta("mha_queue_wait_seconds_sum") / max(1.0, delta("mha_queue_wait_seconds_count"))
    return cell


def probe(v: Variant, base: str, body: Path) -> tuple[bool, str]:
    headers = {"content-type": v.content_type, **dict(v.headers)}
    try:
        status, _, resp = http("POST", base + v.path, body.read_bytes(), headers, timeout=30)
    except OSError as e:
        return False, f"{v.path} probe failed: {e}"
    if status != 200:
        return False, f"{v.path} answered {status}: {resp[:200]!r}"
    return True, f"{v.path} answered 200 ({len(resp)} bytes)"


def check_response(v: Variant, base: str, body: Path, x: np.ndarray) -> str:
    """One request outside wrk: status 200 and an output of the right shape (catches a bench that times errors)."""
    headers = {"content-type": v.content_type, **dict(v.headers)}
    status, h, resp = http("POST", base + v.path, body.read_bytes(), headers, timeout=60)
    if status != 200:
        raise RuntimeError(f"{v.name}: POST {v.path} answered {status}: {resp[:300]!r}")
    if v.family == "echo":
        ok = resp == body.read_bytes()
    elif v.family == "v2-binary":
        n = int({k.lower(): val for k, val in h.items()}.get("inference-header-content-length", "0"))
        ok = n > 0 and len(resp) - n == x.nbytes
    else:
        out = orjson.loads(resp)["output"]
        shape = out["shape"] if isinstance(out, dict) else list(np.asarray(out).shape)
        ok = list(shape) == list(SHAPE)
    if not ok:
        raise RuntimeError(f"{v.name}: unexpected response ({len(resp)} bytes): {resp[:200]!r}")
    return "ok"


def find(cells: list[Cell], variant: str, conc: int) -> Cell | None:
    return next((c for c in cells if c.variant == variant and c.concurrency == conc), None)


def compute_floors(cells: list[Cell], t_row_start: dict, t_row_end: dict) -> dict:
    """t_row, t_echo and the serial limit 1 / (t_row + t_echo), in wall-clock and CPU time. t_row is the faster of
    its two measurements: the limit must not be flattered by a disturbed one. Needs the echo at C=1."""
    echo1 = find(cells, "echo", 1)
    echo_best = max((c for c in cells if c.variant == "echo"), key=lambda c: c.rps, default=None)
    if echo1 is None or echo_best is None:
        raise ValueError("the echo floor needs C=1 in --concurrency")
    t_row = min(t_row_start["t_row_s"], t_row_end["t_row_s"])
    t_row_cpu = min(t_row_start["t_row_cpu_s"], t_row_end["t_row_cpu_s"])
    t_echo = 1 / echo1.rps
    return {
        "t_row_s": t_row,
        "t_row_start_s": t_row_start["t_row_s"],
        "t_row_end_s": t_row_end["t_row_s"],
        "t_batch1_s": t_row_start["t_batch1_s"],
        "t_echo_s": t_echo,
        "t_echo_p50_s": echo1.p50_ms / 1e3,
        "serial_limit_rps": 1 / (t_row + t_echo),
        "t_echo_strict_s": 1 / echo_best.rps,
        "serial_limit_strict_rps": 1 / (t_row + 1 / echo_best.rps),
        # CPU-time versions (robust to other processes on the core): forward thread time, echo server CPU/request
        "t_row_cpu_s": t_row_cpu,
        "t_echo_cpu_s": echo1.cpu_ms_per_req / 1e3,
        "serial_limit_cpu_rps": 1 / (t_row_cpu + echo1.cpu_ms_per_req / 1e3),
    }


# -- for the edge benchmarks (stall, memory, priorities) ------------------------------------------------


def percentile(values: list[float], q: float) -> float:
    """The ``q``-th percentile (0-100) of ``values`` by nearest rank; nan for none."""
    if not values:
        return float("nan")
    s = sorted(values)
    return s[min(len(s) - 1, round(q / 100 * (len(s) - 1)))]


def lists_body(shape: tuple[int, int, int], seed: int = 0) -> bytes:
    """x as nested JSON lists of float64 reprs (~19 characters a number, as json.dumps writes them)."""
    x = np.random.default_rng(seed).standard_normal(shape)
    return orjson.dumps({"x": x.tolist()})

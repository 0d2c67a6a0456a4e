"""Service benchmark: a real uvicorn driven by wrk on loopback, against two floors measured in the same run.

Every server is pinned to core 0 (mha-serve with one torch thread, otherwise its defaults, JSON access log
included); wrk -t1 and this driver are pinned to core 1. Every request carries x = [1, 128, 512] float32
(deterministic, seed 0); the bodies are written once to OUT/bodies/ and bench/wrk/post_body.lua reads one per
variant (JSON in Lua would be slow). For each concurrency C and each variant, ``wrk -t1 -cC -dD --latency``
runs D seconds; the script's ``done()`` prints exact p50/p99 (microseconds) and the error counts (non-2xx
must be 0 and is reported).

All servers start at once (an idle one costs no CPU) and the runs go concurrency by concurrency, every
variant in turn, so that slow drifts of a shared machine hit all variants of one C alike. Before each run
the driver waits until every server has gone idle (its CPU time stops growing, then one GET answers): after
a run, uvicorn still works through the requests of clients that are gone. The machine may be shared: each
run records how much of core 0 / core 1 other processes took, waits (within a budget) for the cores to be
quiet before it starts, and is re-run once (same budget) if others took more than 10% of a core.

Variants (one list, ``build_variants``; a variant is a server, a path, a body and headers):
  lists        POST /attend, x as nested JSON lists              mha-serve, batching on (32) and off (1)
  base64       POST /attend, x as {"dtype","shape","b64"}        mha-serve, batching on (32) and off (1)
  v2-binary    POST /v2/models/mha/infer, KServe v2 binary tensor extension (JSON header + raw bytes,
               Inference-Header-Content-Length); included if the server answers it (probed once,
               skipped with a note otherwise)
  naive        bench/naive_app.py: pydantic list[list[list[float]]], the module run unbatched in FastAPI's
               threadpool, the output as lists
  echo         bench/echo_app.py: bare ASGI, raw bytes in -> the same bytes out (the base64 body's size)

Floors, measured in the same run:
  t_row    the module's forward per sequence at batch 32 ([32,128,512]) in a subprocess on core 0 with one
           torch thread: median of repeats / 32, before the servers start and after they stop (the smaller)
  t_echo   1 / (echo req/s at C=1): the HTTP floor for one request of that size
  serial limit = 1 / (t_row + t_echo): one core doing the HTTP work and the math in turn.

Targets (PASS/FAIL lines; the exit code is 0 either way, this is a report):
  1. base64, batching on, C=32: req/s >= 0.8 x serial limit, and p99 <= 2 x p50
  2. base64, batching on, C=1: p50 within 15% of t_row + t_echo
  3. lists, batching on: req/s >= 3 x naive's req/s at every concurrency

Besides wall-clock numbers, each run records the server's CPU time per answered request, split into its
main thread (event loop: HTTP, parsing, encoding, batching) and its other threads (the forward worker):
where the time goes, and a measure that other processes on the machine inflate much less.

Outputs: OUT/service.md (table, floors, targets, notes), OUT/service.json (everything), OUT/service.png
(throughput and p99 against concurrency, log-x), OUT/logs/*.log (server logs), OUT/bodies/* (request bodies).
With defaults the run takes about 7-8 minutes (32 runs of 10 s), with --quick about 3.

Usage:
  .venv/bin/python bench/service.py [--quick] [--concurrency 1,8,32,64] [--duration S] [--out bench/out]
                                    [--only base64,lists] [--quiet-budget S]
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import platform
import resource
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import orjson

ROOT = Path(__file__).resolve().parents[1]
VENV_BIN = Path(sys.executable).parent
LUA = ROOT / "bench" / "wrk" / "post_body.lua"
SERVER_CORE, CLIENT_CORE = 0, 1
SHAPE = (1, 128, 512)
T_ROW_BATCH = 32
FOREIGN_RERUN = 0.10  # re-run a cell once if other processes took more than this of a core during it
CLK_TCK = os.sysconf("SC_CLK_TCK")

# -- what runs --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Server:
    name: str
    kind: str  # "service" | "echo" | "naive"
    env: tuple[tuple[str, str], ...] = ()
    ready_path: str = "/readyz"


@dataclass(frozen=True)
class Variant:
    name: str  # table label
    server: str  # Server.name
    path: str
    body: str  # key into the bodies written by write_bodies
    content_type: str = "application/json"
    headers: tuple[tuple[str, str], ...] = ()
    probe: bool = False  # optional route: include only if one probe request answers 200
    family: str = ""  # lists | base64 | v2-binary | naive | echo (plot styling, targets)
    min_duration_s: float = 0.0  # a slow server answers C requests in waves: a run must hold a few waves


def _service_env(max_batch: int) -> tuple[tuple[str, str], ...]:
    return (
        ("MHA_TORCH_THREADS", "1"),
        ("MHA_MAX_BATCH_SIZE", str(max_batch)),
        ("MHA_SHUTDOWN_GRACE_S", "1"),
        ("MHA_GRPC_PORT", "0"),  # HTTP only here (two servers run at once); gRPC: bench/protocols.py
    )


SERVERS = [
    Server("mha-serve batch=32", "service", _service_env(32)),
    Server("mha-serve batch=1", "service", _service_env(1)),
    Server("naive", "naive", (("MHA_TORCH_THREADS", "1"),)),
    Server("echo", "echo", ready_path="/"),
]


def _v2_headers(header_len: int) -> tuple[tuple[str, str], ...]:
    return (("Inference-Header-Content-Length", str(header_len)),)


def build_variants(v2_header_len: int) -> list[Variant]:
    out = []
    for srv, tag in (("mha-serve batch=32", "batch=32"), ("mha-serve batch=1", "batch=1")):
        out += [
            Variant(f"lists {tag}", srv, "/attend", "lists", family="lists"),
            Variant(f"base64 {tag}", srv, "/attend", "base64", family="base64"),
            Variant(
                f"v2-binary {tag}",
                srv,
                "/v2/models/mha/infer",
                "v2",
                content_type="application/octet-stream",
                headers=_v2_headers(v2_header_len),
                probe=True,
                family="v2-binary",
            ),
        ]
    out.append(Variant("naive", "naive", "/attend", "lists", family="naive", min_duration_s=6.0))
    out.append(Variant("echo", "echo", "/echo", "echo", content_type="application/octet-stream", family="echo"))
    return out


# -- bodies -----------------------------------------------------------------------------------------------


def write_bodies(dir_: Path) -> tuple[dict[str, Path], int, np.ndarray]:
    """Deterministic x and the request bodies of every variant, written once (wrk reads them)."""
    dir_.mkdir(parents=True, exist_ok=True)
    x = np.random.default_rng(0).standard_normal(SHAPE, dtype=np.float32)
    raw = x.astype("<f4").tobytes()
    import base64

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


# -- processes --------------------------------------------------------------------------------------------

_PROCS: list[subprocess.Popen] = []


@dataclass
class Running:
    server: Server
    proc: subprocess.Popen
    base: str


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_server(srv: Server, port: int, log_path: Path) -> subprocess.Popen:
    env = {**os.environ, **dict(srv.env), "PYTHONUNBUFFERED": "1"}
    env["PYTHONPATH"] = str(ROOT) + os.pathsep + env.get("PYTHONPATH", "")
    if srv.kind == "service":
        argv = [str(VENV_BIN / "mha-serve"), "--host", "127.0.0.1", "--port", str(port)]
    else:
        app = {"echo": "bench.echo_app:app", "naive": "bench.naive_app:app"}[srv.kind]
        argv = [
            *(str(VENV_BIN / "python"), "-m", "uvicorn", app, "--host", "127.0.0.1", "--port", str(port)),
            *("--loop", "uvloop", "--http", "httptools", "--no-access-log", "--log-level", "warning"),
        ]
    log = open(log_path, "wb")  # noqa: SIM115 (closed with the process)
    proc = subprocess.Popen(
        ["taskset", "-c", str(SERVER_CORE), *argv],
        cwd=ROOT,
        env=env,
        stdout=log,
        stderr=subprocess.STDOUT,
        start_new_session=True,  # its own process group: stopped as a whole
    )
    proc._bench_log = log  # type: ignore[attr-defined]
    _PROCS.append(proc)
    return proc


def stop_process(proc: subprocess.Popen, grace_s: float = 10.0) -> None:
    if proc.poll() is None:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(grace_s)
        except subprocess.TimeoutExpired:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(5)
    log = getattr(proc, "_bench_log", None)
    if log is not None:
        log.close()
    if proc in _PROCS:
        _PROCS.remove(proc)


def stop_all() -> None:
    for proc in list(_PROCS):
        stop_process(proc, grace_s=3.0)


def http(method: str, url: str, body: bytes | None = None, headers: dict | None = None, timeout: float = 30.0):
    req = urllib.request.Request(url, data=body, method=method, headers=headers or {})
    try:
        with urllib.request.urlopen(req, timeout=timeout) as r:
            return r.status, dict(r.headers), r.read()
    except urllib.error.HTTPError as e:
        return e.code, dict(e.headers), e.read()


def wait_ready(proc: subprocess.Popen, base: str, path: str, timeout_s: float = 180.0) -> float:
    t0 = time.monotonic()
    while time.monotonic() - t0 < timeout_s:
        if proc.poll() is not None:
            raise RuntimeError(f"server exited with {proc.returncode} before it was ready (see its log)")
        with contextlib.suppress(OSError):
            if http("GET", base + path, timeout=2)[0] == 200:
                return time.monotonic() - t0
        time.sleep(0.2)
    raise RuntimeError(f"server not ready after {timeout_s:.0f} s")


def proc_cpu_s(pid: int) -> float:
    """utime + stime of the process (all its threads), seconds."""
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / CLK_TCK


def main_thread_cpu_s(pid: int) -> float:
    """utime + stime of the process's main thread (the event loop), seconds."""
    with open(f"/proc/{pid}/task/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / CLK_TCK


def core_busy() -> dict[int, tuple[float, float]]:
    """Per core: (busy, total) jiffies from /proc/stat."""
    out = {}
    with open("/proc/stat") as f:
        for line in f:
            if line.startswith("cpu") and line[3].isdigit():
                name, *vals = line.split()
                v = [int(x) for x in vals]
                idle = v[3] + v[4]
                out[int(name[3:])] = (sum(v[:8]) - idle, sum(v[:8]))
    return out


def wait_idle(procs: list[subprocess.Popen], base: str, path: str, timeout_s: float = 30.0) -> float:
    """Until the servers' CPU time stops growing (<3% of a core over 0.3 s), then one quick GET to ``base``.
    After a run, uvicorn keeps working through the requests of clients that are gone; that must not
    pollute the next run. Returns the seconds waited."""
    t0 = time.monotonic()
    prev = sum(proc_cpu_s(p.pid) for p in procs)
    while time.monotonic() - t0 < timeout_s:
        time.sleep(0.3)
        cur = sum(proc_cpu_s(p.pid) for p in procs)
        if cur - prev <= 0.3 * 0.03 + 1e-9:
            break
        prev = cur
    with contextlib.suppress(OSError):
        http("GET", base + path, timeout=10)
    return time.monotonic() - t0


class Quiet:
    """Other processes share this machine. Before a run, wait (within a budget for the whole benchmark) until
    both cores are nearly idle; after a run, if others took much of a core during it, run it again once
    (within the same budget) and keep the cleaner of the two."""

    def __init__(self, budget_s: float, threshold: float = 0.08, max_wait_s: float = 15.0) -> None:
        self.budget_s = budget_s
        self.threshold = threshold
        self.max_wait_s = max_wait_s
        self.spent_s = 0.0

    def wait(self) -> tuple[float, dict[int, float]]:
        t0 = time.monotonic()
        busy: dict[int, float] = {}
        while True:
            a = core_busy()
            time.sleep(0.5)
            b = core_busy()
            busy = {k: (b[k][0] - a[k][0]) / max(1, b[k][1] - a[k][1]) for k in (SERVER_CORE, CLIENT_CORE)}
            waited = time.monotonic() - t0
            if (
                max(busy.values()) <= self.threshold
                or waited >= self.max_wait_s
                or self.spent_s + waited >= self.budget_s
            ):
                break
        waited = time.monotonic() - t0
        self.spent_s += max(0.0, waited - 0.5)
        return waited, busy

    def may_rerun(self, seconds: float) -> bool:
        if self.spent_s + seconds > self.budget_s:
            return False
        self.spent_s += seconds
        return True


def scrape(base: str) -> dict[str, float]:
    """The few service metrics worth keeping per run (sums and counts; deltas are taken by the caller)."""
    keep = (
        "mha_batch_size_requests_sum",
        "mha_batch_size_requests_count",
        "mha_compute_seconds_sum",
        "mha_compute_seconds_count",
        "mha_queue_wait_seconds_sum",
        "mha_queue_wait_seconds_count",
    )
    out: dict[str, float] = {}
    with contextlib.suppress(OSError):
        status, _, text = http("GET", base + "/metrics", timeout=10)
        if status == 200:
            for line in text.decode().splitlines():
                name, _, value = line.partition(" ")
                if name in keep:
                    out[name] = float(value)
    return out


# -- measurements -----------------------------------------------------------------------------------------

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
        ["taskset", "-c", str(SERVER_CORE), str(VENV_BIN / "python"), "-c", T_ROW_SCRIPT, str(reps)],
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


def run_wrk(url: str, conc: int, duration: float, v: Variant, body: Path) -> dict:
    env = {
        **os.environ,
        "BODY_FILE": str(body),
        "CONTENT_TYPE": v.content_type,
        "WRK_HEADERS": "|".join(f"{k}: {val}" for k, val in v.headers),
    }
    argv = ["taskset", "-c", str(CLIENT_CORE), "wrk", "-t1", f"-c{conc}", f"-d{duration:g}s", "--timeout", "30s"]
    argv += ["--latency", "-s", str(LUA), url]
    r = subprocess.run(argv, env=env, capture_output=True, text=True, timeout=duration + 90)
    for line in r.stdout.splitlines():
        if line.startswith("WRK_JSON "):
            return json.loads(line[len("WRK_JSON ") :])
    raise RuntimeError(f"wrk gave no WRK_JSON line (rc {r.returncode}):\n{r.stdout}\n{r.stderr}")


def measure_cell(
    v: Variant,
    r: Running,
    procs: list[subprocess.Popen],
    conc: int,
    duration: float,
    body: Path,
    quiet: Quiet | None = None,
) -> Cell:
    duration = max(duration, v.min_duration_s)
    cell = Cell(v.name, v.family, v.server, conc, duration)
    proc, base = r.proc, r.base
    cell.idle_wait_s = wait_idle(procs, base, r.server.ready_path)
    service = v.server.startswith("mha-serve")
    m0 = scrape(base) if service else {}
    if quiet is not None:
        cell.quiet_wait_s, cell.busy_before = quiet.wait()
    ru0 = resource.getrusage(resource.RUSAGE_CHILDREN), resource.getrusage(resource.RUSAGE_SELF)
    all0, main0 = sum(proc_cpu_s(p.pid) for p in procs), main_thread_cpu_s(proc.pid)
    cpu0, cores0, t0 = proc_cpu_s(proc.pid), core_busy(), time.monotonic()
    raw = run_wrk(base + v.path, conc, duration, v, body)
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
    for core in (0, 1):
        busy = cores1[core][0] - cores0[core][0]
        total = cores1[core][1] - cores0[core][1]
        setattr(cell, f"core{core}_busy", busy / total if total else 0.0)
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


# -- report -----------------------------------------------------------------------------------------------


def fmt_table(cells: list[Cell]) -> str:
    lines = [
        "| variant | C | req/s | p50 ms | p99 ms | p99/p50 | non-2xx | sock err | batch | fwd ms | queue ms "
        "| server CPU | CPU ms/req (loop + threads) | others c0/c1 |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for c in cells:
        opt = (
            (f"{c.mean_batch:.1f}", f"{c.mean_compute_ms:.2f}", f"{c.mean_queue_ms:.2f}")
            if c.mean_batch is not None
            else ("", "", "")
        )
        lines.append(
            f"| {c.variant} | {c.concurrency} | {c.rps:,.1f} | {c.p50_ms:.2f} | {c.p99_ms:.2f} | "
            f"{c.p99_ms / c.p50_ms if c.p50_ms else 0:.2f} | {c.non2xx} | {c.socket_errors + c.timeouts} | "
            f"{opt[0]} | {opt[1]} | {opt[2]} | {c.server_cpu:.0%} | {c.cpu_ms_per_req:.2f} "
            f"({c.loop_cpu_ms_per_req:.2f} + {max(0.0, c.cpu_ms_per_req - c.loop_cpu_ms_per_req):.2f}) | "
            f"{c.foreign0:.0%}/{c.foreign1:.0%} |"
        )
    return "\n".join(lines)


def find(cells: list[Cell], variant: str, conc: int) -> Cell | None:
    return next((c for c in cells if c.variant == variant and c.concurrency == conc), None)


def targets(cells: list[Cell], floors: dict, concs: list[int]) -> list[dict]:
    """Judged on wall-clock numbers, as the targets say. Each also gets a CPU-time view (``cpu_view``): the same
    ratio from CPU time per request, which other processes on a shared machine inflate much less."""
    out = []
    limit, t_sum = floors["serial_limit_rps"], floors["t_row_s"] + floors["t_echo_s"]
    cpu_sum_ms = 1e3 * (floors["t_row_cpu_s"] + floors["t_echo_cpu_s"])

    def add(name: str, ok: bool | None, detail: str, cpu_view: str = "") -> None:
        out.append({"target": name, "pass": ok, "detail": detail, "cpu_view": cpu_view})

    c = find(cells, "base64 batch=32", 32)
    if c is None:
        add("1a base64 C=32 req/s >= 0.8 x serial limit", None, "not measured (C=32 not in --concurrency)")
        add("1b base64 C=32 p99 <= 2 x p50", None, "not measured")
    else:
        r = c.rps / limit
        add(
            "1a base64 C=32 req/s >= 0.8 x serial limit",
            r >= 0.8,
            f"{c.rps:.1f} req/s / serial limit {limit:.1f} = {r:.2f}x",
            f"(t_row + t_echo) {cpu_sum_ms:.2f} ms / {c.cpu_ms_per_req:.2f} ms per request = "
            f"{cpu_sum_ms / c.cpu_ms_per_req:.2f}x"
            if c.cpu_ms_per_req
            else "",
        )
        add(
            "1b base64 C=32 p99 <= 2 x p50",
            c.p99_ms <= 2 * c.p50_ms,
            f"p99 {c.p99_ms:.2f} ms / p50 {c.p50_ms:.2f} ms = {c.p99_ms / c.p50_ms:.2f}x",
        )
    c = find(cells, "base64 batch=32", 1)
    if c is None:
        add("2 base64 C=1 p50 within 15% of t_row + t_echo", None, "not measured (C=1 not in --concurrency)")
    else:
        r = c.p50_ms / (t_sum * 1e3)
        add(
            "2 base64 C=1 p50 within 15% of t_row + t_echo",
            abs(r - 1) <= 0.15,
            f"p50 {c.p50_ms:.2f} ms / (t_row + t_echo) {t_sum * 1e3:.2f} ms = {r:.2f}x",
            f"{c.cpu_ms_per_req:.2f} ms per request / (t_row + t_echo) {cpu_sum_ms:.2f} ms = "
            f"{c.cpu_ms_per_req / cpu_sum_ms:.2f}x",
        )
    parts, oks, cpu_parts = [], [], []
    for conc in concs:
        a, b = find(cells, "lists batch=32", conc), find(cells, "naive", conc)
        if a and b and b.rps > 0:
            parts.append(f"C={conc}: {a.rps:.1f}/{b.rps:.1f} = {a.rps / b.rps:.2f}x")
            oks.append(a.rps >= 3 * b.rps)
            if a.cpu_ms_per_req:
                cpu_parts.append(f"C={conc}: {b.cpu_ms_per_req / a.cpu_ms_per_req:.2f}x")
    add(
        "3 lists req/s >= 3 x naive (every C)",
        all(oks) if oks else None,
        "; ".join(parts) or "not measured",
        ("naive's CPU per request / lists' " + "; ".join(cpu_parts)) if cpu_parts else "",
    )
    return out


def info_lines(cells: list[Cell], floors: dict, concs: list[int]) -> list[str]:
    """The same ratios for the other variants, not judged."""
    lines = []
    limit, t_sum = floors["serial_limit_rps"], floors["t_row_s"] + floors["t_echo_s"]
    variants = sorted({c.variant for c in cells if c.family in ("base64", "v2-binary", "lists")})
    for name in variants:
        c1, c32 = find(cells, name, 1), find(cells, name, 32)
        best = max((c for c in cells if c.variant == name), key=lambda c: c.rps)
        s = f"- {name}:"
        if c32:
            strict = c32.rps / floors["serial_limit_strict_rps"]
            s += f" C=32 {c32.rps / limit:.2f}x serial limit ({strict:.2f}x the stricter one),"
            s += f" p99/p50 {c32.p99_ms / c32.p50_ms:.2f};"
            if c32.cpu_ms_per_req > 0:
                cpu_ratio = (1e3 / c32.cpu_ms_per_req) / floors["serial_limit_cpu_rps"]
                s += f" CPU {c32.cpu_ms_per_req:.2f} ms/request at C=32 = {cpu_ratio:.2f}x the CPU-time limit;"
        if c1:
            s += f" C=1 p50 {c1.p50_ms / (t_sum * 1e3):.2f}x (t_row + t_echo);"
        s += f" best {best.rps:.1f} req/s at C={best.concurrency}"
        lines.append(s)
    return lines


def plot(cells: list[Cell], floors: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(13, 5))
    colors = {"lists": "tab:blue", "base64": "tab:orange", "v2-binary": "tab:green", "naive": "tab:red", "echo": "gray"}
    for name in dict.fromkeys(c.variant for c in cells):
        cs = sorted((c for c in cells if c.variant == name), key=lambda c: c.concurrency)
        fam = cs[0].family
        style = "--" if name.endswith("batch=1") else "-"
        kw = {"color": colors.get(fam), "linestyle": style, "marker": "o", "label": name}
        ax1.plot([c.concurrency for c in cs], [c.rps for c in cs], **kw)
        ax2.plot([c.concurrency for c in cs], [c.p99_ms for c in cs], **kw)
    ax1.axhline(floors["serial_limit_rps"], color="black", linewidth=0.8, linestyle=":", label="serial limit")
    ax1.axhline(
        0.8 * floors["serial_limit_rps"], color="black", linewidth=0.5, linestyle="-.", label="0.8 x serial limit"
    )
    concs = sorted({c.concurrency for c in cells})
    for ax, title, ylabel in ((ax1, "throughput", "req/s"), (ax2, "p99 latency", "p99 (ms)")):
        ax.set_xscale("log", base=2)
        ax.set_xticks(concs, [str(c) for c in concs])
        ax.set_yscale("log")
        ax.set_xlabel("concurrency (connections)")
        ax.set_ylabel(ylabel)
        ax.set_title(title)
        ax.grid(True, which="both", alpha=0.3)
    ax1.legend(fontsize=7, loc="best")
    fig.suptitle(
        f"mha-serve on one core, [1,128,512] float32, wrk on the other core "
        f"(t_row {floors['t_row_s'] * 1e3:.2f} ms, t_echo {floors['t_echo_s'] * 1e3:.2f} ms)",
        fontsize=10,
    )
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def environment() -> dict:
    cpu = ""
    with contextlib.suppress(OSError), open("/proc/cpuinfo") as f:
        cpu = next((ln.split(":", 1)[1].strip() for ln in f if ln.startswith("model name")), "")
    wrk = subprocess.run(["wrk", "-v"], capture_output=True, text=True).stdout.splitlines()
    import importlib.metadata as md

    versions = {}
    for pkg in ("torch", "fastapi", "uvicorn", "uvloop", "httptools", "pydantic", "orjson", "numpy"):
        with contextlib.suppress(md.PackageNotFoundError):
            versions[pkg] = md.version(pkg)
    return {
        "cpu": cpu,
        "cores": os.cpu_count(),
        "python": platform.python_version(),
        "wrk": wrk[0] if wrk else "",
        "versions": versions,
        "loadavg_at_start": open("/proc/loadavg").read().split()[:3],
    }


# -- main -------------------------------------------------------------------------------------------------


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--quick", action="store_true", help="3 s runs, 1 s warm-ups (about 3 minutes in all)")
    ap.add_argument("--concurrency", default="1,8,32,64", help="comma-separated wrk connection counts")
    ap.add_argument("--duration", type=float, help="seconds per run (default 10, --quick 3)")
    ap.add_argument("--warmup", type=float, help="seconds of warm-up load per variant (default 2, --quick 1)")
    ap.add_argument("--only", help="comma-separated substrings: run only the variants whose name has one")
    ap.add_argument("--out", default=str(ROOT / "bench" / "out"))
    ap.add_argument(
        "--quiet-budget",
        type=float,
        help="seconds the whole run may spend waiting for other processes to leave the cores, and re-running "
        "runs they disturbed (default 60, --quick 20; 0 = never wait)",
    )
    args = ap.parse_args(argv)
    concs = sorted({int(c) for c in args.concurrency.split(",") if c.strip()})
    duration = args.duration or (3.0 if args.quick else 10.0)
    warmup = args.warmup if args.warmup is not None else (1.0 if args.quick else 2.0)
    out = Path(args.out)
    (out / "logs").mkdir(parents=True, exist_ok=True)
    if len(os.sched_getaffinity(0) | {SERVER_CORE, CLIENT_CORE}) < 2 or (os.cpu_count() or 1) < 2:
        print("needs two cores (0 and 1)", file=sys.stderr)
        return 2
    os.sched_setaffinity(0, {CLIENT_CORE})  # the driver stays off the server's core

    started = time.monotonic()
    bodies, v2_len, x = write_bodies(out / "bodies")
    variants = build_variants(v2_len)
    if args.only:
        keys = [k.strip() for k in args.only.split(",")]
        variants = [v for v in variants if any(k in v.name for k in keys) or v.family == "echo"]
    notes: list[str] = []
    env_info = environment()
    print(f"# {env_info['cpu']}, torch {env_info['versions'].get('torch')}, {env_info['wrk']}", flush=True)
    print(f"# runs of {duration:g} s at C = {concs}, warm-up {warmup:g} s per variant", flush=True)

    quiet_budget = args.quiet_budget if args.quiet_budget is not None else (20.0 if args.quick else 60.0)
    quiet = Quiet(quiet_budget)
    reps = 8 if args.quick else 20
    quiet.wait()
    t_row_start = measure_t_row(reps)
    print(
        f"# t_row {t_row_start['t_row_s'] * 1e3:.3f} ms/sequence at batch {T_ROW_BATCH} "
        f"(batch 1: {t_row_start['t_batch1_s'] * 1e3:.3f} ms)",
        flush=True,
    )

    cells: list[Cell] = []
    checks: dict[str, str] = {}
    running: dict[str, Running] = {}
    try:
        # All servers up at once (an idle one costs no CPU), so every concurrency level is measured for all
        # variants close together in time: slow drifts of the shared machine hit them alike.
        for srv in SERVERS:
            if any(v.server == srv.name for v in variants):
                port = free_port()
                log_path = out / "logs" / f"{srv.name.replace(' ', '_').replace('=', '')}.log"
                running[srv.name] = Running(srv, start_server(srv, port, log_path), f"http://127.0.0.1:{port}")
        for r in running.values():
            ready_s = wait_ready(r.proc, r.base, r.server.ready_path)
            print(f"## {r.server.name}: ready in {ready_s:.1f} s (pid {r.proc.pid})", flush=True)
        procs = [r.proc for r in running.values()]
        kept = []
        for v in variants:
            r, body = running[v.server], bodies[v.body]
            if v.probe:
                ok, why = probe(v, r.base, body)
                if not ok:
                    notes.append(f"{v.name} skipped: {why}")
                    print(f"   {v.name}: skipped ({why})", flush=True)
                    continue
            checks[v.name] = check_response(v, r.base, body, x)
            if warmup > 0:
                wait_idle(procs, r.base, r.server.ready_path)
                run_wrk(r.base + v.path, 8, warmup, v, body)
            kept.append(v)
        variants = kept
        for conc in concs:
            for v in variants:
                r, body = running[v.server], bodies[v.body]
                cell = measure_cell(v, r, procs, conc, duration, body, quiet)
                if max(cell.foreign0, cell.foreign1) > FOREIGN_RERUN and quiet.may_rerun(duration + 1):
                    again = measure_cell(v, r, procs, conc, duration, body, quiet)
                    print(
                        f"   {v.name:20s} C={conc:<3d} others took core 0 {cell.foreign0:.0%}, core 1 "
                        f"{cell.foreign1:.0%}: ran again ({again.foreign0:.0%}, {again.foreign1:.0%})",
                        flush=True,
                    )
                    cell = min((cell, again), key=lambda c: max(c.foreign0, c.foreign1))
                    cell.attempts = 2
                cells.append(cell)
                extra = f" batch {cell.mean_batch:.1f}" if cell.mean_batch is not None else ""
                print(
                    f"   {v.name:20s} C={conc:<3d} {cell.rps:9.1f} req/s  p50 {cell.p50_ms:8.2f} ms  "
                    f"p99 {cell.p99_ms:8.2f} ms  non-2xx {cell.non2xx}  sock {cell.socket_errors}"
                    f"  cpu {cell.server_cpu:.0%}  others {cell.foreign0:.0%}/{cell.foreign1:.0%}{extra}",
                    flush=True,
                )
        for r in running.values():
            stop_process(r.proc)
        quiet.wait()
        t_row_end = measure_t_row(reps)
    finally:
        stop_all()
    order = {v.name: i for i, v in enumerate(variants)}
    cells.sort(key=lambda c: (order[c.variant], c.concurrency))

    echo1 = find(cells, "echo", 1)
    echo_best = max((c for c in cells if c.variant == "echo"), key=lambda c: c.rps, default=None)
    if echo1 is None or echo_best is None:
        raise SystemExit("the echo floor needs C=1 in --concurrency")
    # The faster of the two measurements: the limit must not be flattered by a disturbed one.
    t_row = min(t_row_start["t_row_s"], t_row_end["t_row_s"])
    t_echo = 1 / echo1.rps
    floors = {
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
        "t_row_cpu_s": min(t_row_start["t_row_cpu_s"], t_row_end["t_row_cpu_s"]),
        "t_echo_cpu_s": echo1.cpu_ms_per_req / 1e3,
        "serial_limit_cpu_rps": 1
        / (min(t_row_start["t_row_cpu_s"], t_row_end["t_row_cpu_s"]) + echo1.cpu_ms_per_req / 1e3),
    }
    res_targets = targets(cells, floors, concs)
    bad = [c for c in cells if c.non2xx or c.socket_errors or c.timeouts]
    if bad:
        notes.append("runs with errors: " + ", ".join(f"{c.variant} C={c.concurrency}" for c in bad))
    foreign = [c for c in cells if max(c.foreign0, c.foreign1) > FOREIGN_RERUN]
    if foreign:
        notes.append(
            "other processes took more than 10% of a core during (core 0 / core 1): "
            + ", ".join(f"{c.variant} C={c.concurrency} ({c.foreign0:.0%} / {c.foreign1:.0%})" for c in foreign)
            + f"; {quiet.spent_s:.0f} s of the {quiet.budget_s:.0f} s quiet budget spent waiting and re-running"
        )
    drift = floors["t_row_end_s"] / floors["t_row_start_s"] - 1
    if abs(drift) > 0.05:
        notes.append(f"t_row drifted {drift:+.1%} between the start and the end of the run (the smaller is used)")

    table = fmt_table(cells)
    echo_bytes = len(bodies["echo"].read_bytes())
    floor_lines = [
        f"- t_row = {t_row * 1e3:.3f} ms per sequence (forward [32,128,512] / 32, median of {reps}, the smaller of"
        f" {floors['t_row_start_s'] * 1e3:.3f} ms before the servers and {floors['t_row_end_s'] * 1e3:.3f} ms after;"
        f" forward [1,128,512]: {floors['t_batch1_s'] * 1e3:.3f} ms)",
        f"- t_echo = {t_echo * 1e3:.3f} ms (1 / echo req/s at C=1, {echo_bytes:,}-byte body both ways;"
        f" echo p50 {echo1.p50_ms:.3f} ms)",
        f"- serial limit = 1 / (t_row + t_echo) = {floors['serial_limit_rps']:.1f} req/s",
        f"- stricter limit with the echo's best throughput ({echo_best.rps:,.0f} req/s at C={echo_best.concurrency}):"
        f" 1 / (t_row + {floors['t_echo_strict_s'] * 1e3:.3f} ms) = {floors['serial_limit_strict_rps']:.1f} req/s",
        f"- in CPU time (what other processes on the machine cannot inflate): forward {floors['t_row_cpu_s'] * 1e3:.3f}"
        f" ms per sequence, echo server {floors['t_echo_cpu_s'] * 1e3:.3f} ms per request; one core's limit"
        f" {floors['serial_limit_cpu_rps']:.1f} req/s",
    ]
    target_lines = [
        f"- {'PASS' if t['pass'] else ('FAIL' if t['pass'] is False else 'N/A ')} {t['target']}: {t['detail']}"
        + (f"\n  - CPU-time view: {t['cpu_view']}" if t["cpu_view"] else "")
        for t in res_targets
    ]
    elapsed = time.monotonic() - started
    md = "\n".join(
        [
            "# mha-serve service benchmark",
            "",
            f"{env_info['cpu']}; server pinned to core {SERVER_CORE} with 1 torch thread, wrk -t1 pinned to core "
            f"{CLIENT_CORE}; payload x = [1, 128, 512] float32; {duration:g} s per run, {warmup:g} s warm-up per "
            f"variant; torch {env_info['versions'].get('torch')}, uvicorn {env_info['versions'].get('uvicorn')}, "
            f"{env_info['wrk']}. Whole run {elapsed:.0f} s.",
            "",
            "batch / fwd ms / queue ms: the service's own metrics over the run (requests per forward pass, forward "
            "time per batch, queue wait per request). server CPU: the server process's CPU over the run (1 = one "
            "core). CPU ms/req: the server's CPU time per answered request, split into its main thread (the event "
            "loop: HTTP, parsing, encoding, batching) and its other threads (the forward worker; naive: FastAPI's "
            "threadpool). others c0/c1: share of core 0 / core 1 taken by processes other than the server, wrk and "
            "this driver (the machine is shared; a run disturbed by more than 10% is re-run once within a budget).",
            "",
            table,
            "",
            "## Floors",
            *floor_lines,
            "",
            "## Targets",
            *target_lines,
            "",
            "Not judged, same ratios for every variant:",
            *info_lines(cells, floors, concs),
            "",
            *(["## Notes", *[f"- {n}" for n in notes], ""] if notes else []),
        ]
    )
    (out / "service.md").write_text(md)
    (out / "service.json").write_text(
        json.dumps(
            {
                "environment": env_info,
                "config": {"duration_s": duration, "warmup_s": warmup, "concurrency": concs, "shape": list(SHAPE)},
                "floors": floors,
                "t_row_runs": {"start": t_row_start, "end": t_row_end},
                "targets": res_targets,
                "cells": [asdict(c) for c in cells],
                "checks": checks,
                "notes": notes,
                "elapsed_s": elapsed,
            },
            indent=2,
        )
    )
    plot(cells, floors, out / "service.png")
    print()
    print(md)
    print(f"\nwrote {out / 'service.md'}, {out / 'service.json'}, {out / 'service.png'}")
    return 0


def _sigterm(signum, frame) -> None:
    raise SystemExit(128 + signum)  # run the finally blocks: no server outlives the driver


if __name__ == "__main__":
    signal.signal(signal.SIGTERM, _sigterm)
    try:
        sys.exit(main())
    finally:
        stop_all()

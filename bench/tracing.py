"""What tracing costs, front-bound: the same service with tracing off, on, and on but sampling nothing.

Front-bound is where a per-request cost shows most: a small model (E=64, H=4, T=16, x = [1, 16, 64]
float32) makes compute negligible, so req/s measures the HTTP path, codecs, batching and, here,
tracing. Each server is a real uvicorn (``mha-serve``, one torch thread, JSON access log on, as
deployed) pinned to core 0; the load generator and this driver are pinned to core 1.

Servers, all started at once (an idle one costs no CPU):
  off        no OTEL_* variables: the default; the SDK is never imported
  baseline   the code before tracing (``--against REV``: none by default),
             extracted with ``git archive`` into a temporary folder and run from there; ``none`` skips it
  no-op      OTEL_TRACES_EXPORTER=otlp with OTEL_TRACES_SAMPLER=always_off: every hook runs and
             every span is created, none is recorded or exported (what 0 % sampling costs)
  on         OTEL_TRACES_EXPORTER=otlp, always_on: five spans a request, exported over OTLP/HTTP to a
             sink in this driver (it reads and drops the bodies), batch span processor queue 32768
Every request carries a sampled W3C ``traceparent``.

Variants: ``v2-binary`` (POST /v2/models/mha/infer, binary tensor extension) and ``base64``
(POST /attend). Rounds: every (server, variant) cell runs once per round for ``--duration`` seconds
at ``--concurrency`` connections, the order of servers rotating from round to round, after the
servers have gone idle; the report gives each cell's median req/s over the rounds and the server's
CPU time per request (which other processes on a shared machine inflate much less: on a busy host it
is the figure to read), and the ratios to ``off`` with their spread (min-max over the rounds, paired
within a round). A cell that completed almost nothing (its load generator starved) is measured again.

Besides, the steps this change added to the request path are timed one by one in-process with tracing
off (``off_path_us``): their sum against the off server's CPU per request is the cost of "off", in a
figure a shared machine's noise cannot swamp.

Load generator: ``wrk`` (apt ``wrk``) with bench/wrk/post_body.lua. Without it, a fallback in this
file: asyncio connections with keep-alive writing the same pre-built HTTP/1.1 request and reading
each response by its content-length. It saturates a front-bound server less well than wrk (Python
on one core), so its ratios are diluted; the report says which one ran.

Usage:
  .venv/bin/python bench/tracing.py [--rounds 3] [--duration 5] [--concurrency 64] [--baseline REF|none]
                                    [--out bench-results]
Outputs OUT/tracing.md and OUT/tracing.json. About 2 minutes with the defaults.
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import contextlib
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import asdict, dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from bench import harness  # noqa: E402
from bench.harness import (  # noqa: E402  (the benchmarks' process and measurement helpers)
    CLIENT_CORE,
    SERVER_CORE,
    Server,
    http,
    main_thread_cpu_s,
    proc_cpu_s,
    scrape,
    stop_process,
    wait_idle,
    wait_ready,
)

SHAPE = (1, 16, 64)
SMALL_MODEL = {
    "MHA_NUM_HEADS": "4",
    "MHA_EMB_SIZE": "64",
    "MHA_HEAD_SIZE": "16",
    "MHA_MAX_SEQ_LEN": "16",
    "MHA_TORCH_THREADS": "1",
    "MHA_SHUTDOWN_GRACE_S": "1",
}
TRACEPARENT = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01"


class Sink:
    """An OTLP/HTTP endpoint that reads and drops what the exporter sends (counts posts and bytes)."""

    def __init__(self) -> None:
        self.posts = 0
        self.bytes = 0
        sink = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:
                n = int(self.headers.get("content-length", 0))
                self.rfile.read(n)
                sink.posts += 1
                sink.bytes += n
                self.send_response(200)
                self.send_header("content-type", "application/x-protobuf")
                self.send_header("content-length", "0")
                self.end_headers()

            def log_message(self, *args) -> None:
                pass

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}/v1/traces"
        threading.Thread(target=self.httpd.serve_forever, daemon=True).start()

    def close(self) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()


@dataclass
class Srv:
    name: str
    env: dict
    src: Path  # the source tree it runs from
    proc: subprocess.Popen | None = None
    base: str = ""


@dataclass
class Variant:
    name: str
    path: str
    body: bytes
    headers: dict


@dataclass
class Cell:
    server: str
    variant: str
    round: int
    rps: float
    p50_ms: float
    p99_ms: float
    cpu_ms_per_req: float
    loop_cpu_ms_per_req: float
    errors: int
    requests: int
    mean_batch: float  # requests per forward pass: bigger batches spread the per-batch CPU thinner


@dataclass
class Report:
    load_generator: str
    baseline: str
    rounds: int
    duration_s: float
    concurrency: int
    cells: list[Cell] = field(default_factory=list)
    exported: dict = field(default_factory=dict)
    off_path_us: dict = field(default_factory=dict)


def variants() -> list[Variant]:
    x = np.random.default_rng(0).standard_normal(SHAPE, dtype=np.float32)
    raw = x.astype("<f4").tobytes()
    header = json.dumps(
        {
            "inputs": [
                {"name": "x", "shape": list(SHAPE), "datatype": "FP32", "parameters": {"binary_data_size": len(raw)}}
            ],
            "outputs": [{"name": "output", "parameters": {"binary_data": True}}],
        }
    ).encode()
    b64 = json.dumps({"x": {"dtype": "float32", "shape": list(SHAPE), "b64": base64.b64encode(raw).decode()}})
    tp = {"traceparent": TRACEPARENT}
    return [
        Variant(
            "v2-binary",
            "/v2/models/mha/infer",
            header + raw,
            {"Content-Type": "application/octet-stream", "Inference-Header-Content-Length": str(len(header)), **tp},
        ),
        Variant("base64", "/attend", b64.encode(), {"Content-Type": "application/json", **tp}),
    ]


def start(srv: Srv, logs: Path) -> None:
    """On core 0, configured by SMALL_MODEL and its own env alone (no MHA_/OTEL_ variable of the shell). HTTP
    only: the servers run side by side, and each would take the default gRPC port."""
    env = {**SMALL_MODEL, "MHA_GRPC_PORT": "0", **srv.env}
    drop = ("OTEL_", "MHA_")
    s = Server(env, logs / f"{srv.name}.log", srv.src, core=SERVER_CORE, defaults={}, drop_env=drop, wait=False)
    srv.proc, srv.base = s.proc, s.url


# -- load generators ------------------------------------------------------------------------------


def run_wrk(url: str, v: Variant, conc: int, duration: float, body_file: Path) -> dict:
    headers = {k: val for k, val in v.headers.items() if k != "Content-Type"}
    return harness.run_wrk(url, body_file, v.headers["Content-Type"], headers, conc, duration, timeout_extra_s=60)


def run_asyncio(url: str, v: Variant, conc: int, duration: float) -> dict:
    """The fallback: ``conc`` keep-alive connections, each sending the same request and reading the answer."""
    host, port = url.split("//", 1)[1].split("/", 1)[0].split(":")
    head = [f"POST {v.path} HTTP/1.1", f"Host: {host}:{port}", f"Content-Length: {len(v.body)}"]
    head += [f"{k}: {val}" for k, val in v.headers.items()]
    request = ("\r\n".join(head) + "\r\n\r\n").encode() + v.body
    lat: list[float] = []
    errors = 0

    async def one(stop_at: float) -> None:
        nonlocal errors
        reader, writer = await asyncio.open_connection(host, int(port))
        try:
            while time.perf_counter() < stop_at:
                t0 = time.perf_counter()
                writer.write(request)
                response_head = await reader.readuntil(b"\r\n\r\n")
                n = 0
                for line in response_head.split(b"\r\n"):
                    if line[:15].lower() == b"content-length:":
                        n = int(line[15:])
                await reader.readexactly(n)
                lat.append(time.perf_counter() - t0)
                if response_head[9:12] != b"200":
                    errors += 1
        finally:
            writer.close()

    async def main() -> float:
        t0 = time.perf_counter()
        await asyncio.gather(*(one(t0 + duration) for _ in range(conc)))
        return time.perf_counter() - t0

    wall = asyncio.run(main())
    lat.sort()
    pct = (lambda q: lat[min(len(lat) - 1, int(q * len(lat)))] * 1e6) if lat else (lambda q: 0.0)
    return {"requests": len(lat), "duration_us": wall * 1e6, "p50_us": pct(0.5), "p99_us": pct(0.99)} | {
        "err_status": errors,
        "err_connect": 0,
        "err_read": 0,
        "err_write": 0,
        "err_timeout": 0,
    }


# -- what tracing-off adds, timed in-process ----------------------------------------------------------


def off_path_us(n: int = 200_000) -> dict[str, float]:
    """Microseconds per request of every step this change added to the request path with tracing off
    (the new metrics included).

    Timed one by one in this process (timeit-style loops, best of 5), so the figure does not drown in a
    shared machine's noise the way a req/s difference does: the two stage() no-ops, the log formatter's
    trace-id lookup, the in-flight gauge, the batch hook (a batch of one: the worst case per request),
    and the ``is None`` tests in the middleware, httputil and the lifespan's observer choice.
    """
    import timeit

    from service import tracing
    from service.messages import BatcherObserver, BatchStats
    from service.metrics import Metrics

    m, obs, stats = Metrics(), BatcherObserver(), BatchStats(1, 16, 16, 0.001)

    class P:  # a queued request, as the batcher holds it
        input = None

    batch = [P()]
    none = None
    steps = {
        "2 x stage(None, ...)": lambda: [tracing.stage(none, "decode").__enter__(), tracing.NO_SPAN.__exit__()],
        "current_ids() in the log line": tracing.current_ids,
        "in-flight gauge inc + dec": lambda: (m.in_flight.inc(), m.in_flight.dec()),
        "batch_finished hook (batch of 1)": lambda: obs.batch_finished([p.input for p in batch], 0.0, stats),
        "4 x `tracing is None` tests": lambda: (none is None, none is None, none is None, none is None),
        "new metrics per batch (tokens, drain rate)": lambda: (
            m._real_tokens.inc(16),
            m._padded_tokens.inc(16),
            m.drain_rate.set(1000.0),
        ),
    }
    empty = min(timeit.repeat(lambda: None, number=n, repeat=5)) / n
    out = {}
    for name, fn in steps.items():
        per = min(timeit.repeat(fn, number=n, repeat=5)) / n - empty
        out[name] = max(0.0, per) * 1e6 * (2 if name.startswith("2 x") else 1)
    out["total"] = sum(out.values())
    return out


# -- the run ----------------------------------------------------------------------------------------


def measure(srv: Srv, v: Variant, rnd: int, args, body_file: Path, all_procs, use_wrk: bool) -> Cell:
    wait_idle(all_procs, srv.base, "/readyz")
    m0 = scrape(srv.base)
    cpu0, main0 = proc_cpu_s(srv.proc.pid), main_thread_cpu_s(srv.proc.pid)
    if use_wrk:
        raw = run_wrk(srv.base + v.path, v, args.concurrency, args.duration, body_file)
    else:
        raw = run_asyncio(srv.base + v.path, v, args.concurrency, args.duration)
    cpu1, main1 = proc_cpu_s(srv.proc.pid), main_thread_cpu_s(srv.proc.pid)
    m1 = scrape(srv.base)
    n = max(1, raw["requests"])
    batches = m1.get("mha_batch_size_requests_count", 0) - m0.get("mha_batch_size_requests_count", 0)
    batched = m1.get("mha_batch_size_requests_sum", 0) - m0.get("mha_batch_size_requests_sum", 0)
    errors = raw["err_status"] + raw["err_connect"] + raw["err_read"] + raw["err_write"] + raw["err_timeout"]
    return Cell(
        srv.name,
        v.name,
        rnd,
        raw["requests"] / (raw["duration_us"] / 1e6),
        raw["p50_us"] / 1e3,
        raw["p99_us"] / 1e3,
        1e3 * (cpu1 - cpu0) / n,
        1e3 * (main1 - main0) / n,
        errors,
        raw["requests"],
        batched / batches if batches else 0.0,
    )


def summarize(rep: Report, names: list[str]) -> str:
    lines = [
        f"# Tracing cost, front-bound (x = {list(SHAPE)} float32, E=64 H=4, c={rep.concurrency}, "
        f"{rep.rounds} rounds of {rep.duration_s:g} s, load: {rep.load_generator}, baseline {rep.baseline})",
        "",
        "| server | variant | req/s (median) | p50 ms | p99 ms | batch | server CPU ms/req | of which event loop "
        "| req/s vs off (min-max) | CPU/req vs off |",
        "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    vnames = list(dict.fromkeys(c.variant for c in rep.cells))
    for vn in vnames:
        off = {c.round: c for c in rep.cells if c.server == "off" and c.variant == vn}
        for sn in names:
            cs = [c for c in rep.cells if c.server == sn and c.variant == vn]
            if not cs:
                continue
            ratios = [c.rps / off[c.round].rps for c in cs if off.get(c.round) and off[c.round].rps]
            cpu_ratio = statistics.median(c.cpu_ms_per_req for c in cs) / statistics.median(
                c.cpu_ms_per_req for c in off.values()
            )
            lines.append(
                f"| {sn} | {vn} | {statistics.median(c.rps for c in cs):,.0f} | "
                f"{statistics.median(c.p50_ms for c in cs):.2f} | {statistics.median(c.p99_ms for c in cs):.2f} | "
                f"{statistics.median(c.mean_batch for c in cs):.1f} | "
                f"{statistics.median(c.cpu_ms_per_req for c in cs):.3f} | "
                f"{statistics.median(c.loop_cpu_ms_per_req for c in cs):.3f} | "
                f"{statistics.median(ratios):.3f} ({min(ratios):.3f}-{max(ratios):.3f}) | {cpu_ratio:.3f} |"
            )
    errors = sum(c.errors for c in rep.cells)
    lines += ["", f"errors (non-2xx, socket): {errors}", f"exported by `on`: {rep.exported}"]
    if rep.off_path_us:
        off_cpu = statistics.median(c.cpu_ms_per_req for c in rep.cells if c.server == "off") * 1e3
        total = rep.off_path_us["total"]
        lines += [
            "",
            "What tracing-off adds to a request, timed in-process (best of 5):",
            *(f"- {k}: {v:.3f} us" for k, v in rep.off_path_us.items() if k != "total"),
            f"- total: {total:.2f} us per request = {total / off_cpu:.2%} of the off server's "
            f"{off_cpu:.0f} us CPU per request (median over cells): ratio off-path / off = {1 + total / off_cpu:.4f}",
        ]
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--duration", type=float, default=5.0)
    ap.add_argument("--concurrency", type=int, default=64)
    harness.add_against(ap)
    ap.add_argument("--out", default=str(ROOT / "bench-results"))
    ap.add_argument("--load", choices=("auto", "wrk", "asyncio"), default="auto")
    args = ap.parse_args()
    out = Path(args.out)
    (out / "logs").mkdir(parents=True, exist_ok=True)
    use_wrk = args.load == "wrk" or (args.load == "auto" and shutil.which("wrk") is not None)
    os.sched_setaffinity(0, {CLIENT_CORE})

    sink = Sink()
    tmp = Path(tempfile.mkdtemp(prefix="mha-bench-tracing-"))
    otel = {"OTEL_TRACES_EXPORTER": "otlp", "OTEL_EXPORTER_OTLP_TRACES_ENDPOINT": sink.url}
    servers = [Srv("off", {}, ROOT)]
    baseline = "none"
    if args.against:
        baseline = harness.export_tree(args.against, tmp)
        servers.append(Srv("baseline", {}, tmp))
    servers += [
        Srv("no-op", {**otel, "OTEL_TRACES_SAMPLER": "always_off"}, ROOT),
        Srv("on", {**otel, "OTEL_TRACES_SAMPLER": "always_on", "OTEL_BSP_MAX_QUEUE_SIZE": "32768"}, ROOT),
    ]
    rep = Report("wrk" if use_wrk else "asyncio fallback", baseline, args.rounds, args.duration, args.concurrency)
    try:
        for s in servers:
            start(s, out / "logs")
        for s in servers:
            wait_ready(s.proc, s.base, "/readyz")
        vs = variants()
        bodies = {}
        for v in vs:
            bodies[v.name] = out / f"tracing-{v.name}.body"
            bodies[v.name].write_bytes(v.body)
            for s in servers:  # one request each outside the load generator: 200, or the bench is timing errors
                status, _, resp = http("POST", s.base + v.path, v.body, v.headers)
                if status != 200:
                    raise RuntimeError(f"{s.name} {v.path}: {status} {resp[:200]!r}")
        for s in servers:  # the baseline really is the old code: it predates mha_requests_in_flight
            metrics = http("GET", s.base + "/metrics")[2].decode()
            if (s.name == "baseline") == ("mha_requests_in_flight" in metrics):
                raise RuntimeError(f"{s.name} does not run the code it should (see {out / 'logs'})")
        procs = [s.proc for s in servers]
        for v in vs:  # warm-up
            for s in servers:
                measure(s, v, -1, argparse.Namespace(**{**vars(args), "duration": 1.0}), bodies[v.name], procs, use_wrk)
        for rnd in range(args.rounds):
            order = servers[rnd % len(servers) :] + servers[: rnd % len(servers)]
            for v in vs:
                for s in order:
                    c = measure(s, v, rnd, args, bodies[v.name], procs, use_wrk)
                    if c.requests < args.duration * 10:  # starved by other processes (seen on a shared host)
                        print(f"round {rnd} {v.name} {s.name}: only {c.requests} requests; measured again")
                        c = measure(s, v, rnd, args, bodies[v.name], procs, use_wrk)
                    rep.cells.append(c)
                    print(
                        f"round {rnd} {v.name:9s} {s.name:8s} {c.rps:8,.0f} req/s  p99 {c.p99_ms:6.2f} ms  "
                        f"batch {c.mean_batch:4.1f}  CPU {c.cpu_ms_per_req:.3f} ms/req  errors {c.errors}",
                        flush=True,
                    )
    finally:
        for s in servers:
            if s.proc is not None:
                stop_process(s.proc)
        shutil.rmtree(tmp, ignore_errors=True)
        sink.close()
    rep.exported = {"posts": sink.posts, "bytes": sink.bytes}
    rep.off_path_us = off_path_us()
    text = summarize(rep, [s.name for s in servers])
    print()
    print(text)
    (out / "tracing.md").write_text(text + "\n")
    (out / "tracing.json").write_text(json.dumps(asdict(rep), indent=1))
    with contextlib.suppress(Exception):
        print(f"\nwritten: {out / 'tracing.md'}, {out / 'tracing.json'}")


if __name__ == "__main__":
    main()

"""Front-bound: what one front-end process costs per request, against the framework floors, in one run.

A small model (E=64, H=4, T=16, x = [1, 16, 64] float32) makes compute negligible, so req/s measures
the HTTP path: routing, middlewares, checks, the batcher's futures, metrics, access log, codecs
(issue 11, "Front-bound, the GPU-like case"). Every server is a real uvicorn (uvloop, httptools)
pinned to core 0, one torch thread; ``wrk -t1`` and this driver are pinned to core 1.

Servers, all started at once (an idle one costs no CPU):
  asgi-echo      bench/echo_app.py:app, raw ASGI answering a POST with its body
  fastapi-echo   bench/echo_app.py:fastapi_app, one bare FastAPI route doing the same
  against, against-nolog  with ``--against REV``: mha-serve at REV, extracted with ``git archive`` into a
                          temporary folder (bench/harness.py); JSON access log on / off
  branch, branch-nolog    mha-serve from this checkout; access log on / off
  *-split, *-split-nolog  the same trees with ``MHA_ENGINE=process``: one front-end process on core 0, the
                          model process moved to the other core once ready (the issue's set-up: "one
                          front-end process pinned to one core, the model process and the load generator
                          on the other"); its CPU column is the front end's alone
Variants: ``v2-binary`` (POST /v2/models/mha/infer, Triton's binary tensor extension) and ``base64``
(POST /attend); the echo servers echo each variant's body. Each (server, variant) cell runs once per
round for ``--duration`` s at ``--concurrency`` connections, after the servers went idle, the order
of servers rotating between rounds; the table gives each cell's median over the rounds: req/s, server
CPU ms per request (utime + stime deltas from /proc/<pid>/stat; split mode: the front end's, and the
model process's in a column of its own), p50/p99, req/s over the fastapi-echo's
for the same body (issue 20's targets, ``TARGETS``: v2 binary >= 1.0x with the access log off and >= 0.95x
with it on, base64 >= 0.8x), and the fastapi-echo's CPU
per request over this server's: the same ratio for a saturated core, which other processes on a
shared machine disturb much less than req/s (read it when the servers' core was not theirs alone). The
last column says how busy each core was during the run; a cell whose wrk core was full (wrk and, split, the
model process) while the servers' core had room measured that core, and its verdict says so.

Needs ``wrk`` (Debian/Ubuntu: ``apt-get install wrk``) and ``taskset`` (util-linux).
The machine varies up to 1.5x from run to run: only ratios within one run count.

Usage:
  .venv/bin/python bench/front.py [--rounds 1] [--duration 5] [--concurrency 64] [--against REV]
                                  [--out bench-results]
Outputs OUT/front.md and OUT/front.json (the table, then PASS/FAIL lines for the issue's targets, for this
checkout's split front end; front.json carries them for bench/page.py). About 3 minutes a round.
"""

from __future__ import annotations

import argparse
import base64
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from bench.harness import (  # noqa: E402  (process and measurement helpers)
    CLIENT_CORE,
    SERVER_CORE,
    Server,
    add_against,
    busy_between,
    children,
    core_busy,
    export_tree,
    http,
    pin_all_threads,
    proc_cpu_s,
    stop_process,
    tree_cpu_s,
    wait_idle,
    wait_ready,
)
from bench.tracing import SHAPE, SMALL_MODEL, Variant, run_wrk  # noqa: E402


@dataclass
class Srv:
    name: str
    kind: str  # "echo" | "service"
    argv: list[str]
    env: dict
    src: Path
    proc: subprocess.Popen | None = None
    base: str = ""
    model_pid: int | None = None  # split mode: the model process, off the front end's core


@dataclass
class Cell:
    server: str
    variant: str
    rps: float
    cpu_ms_per_req: float
    p50_ms: float
    p99_ms: float
    errors: int
    model_cpu_ms_per_req: float = float("nan")  # split mode: the model process (off the servers' core)
    # how busy each core was during the run (0..1): the servers' (SERVER_CORE), and wrk's (CLIENT_CORE, where the
    # model process runs too in split mode). A cell whose wrk core was full measured that core, not the front end.
    server_core_busy: float = float("nan")
    client_core_busy: float = float("nan")


SATURATED = 0.97  # a core this busy during a run was the limit


def client_bound(c: Cell) -> bool:
    """Whether the run was limited by wrk's core (wrk and, split, the model process) while the servers' core had room:
    its req/s are that core's, and the front end's cost is read in its CPU a request."""
    return c.client_core_busy >= SATURATED and c.server_core_busy < SATURATED


def variants() -> list[Variant]:
    x = np.random.default_rng(0).standard_normal(SHAPE, dtype=np.float32)
    raw = x.astype("<f4").tobytes()
    inp = {"name": "x", "shape": list(SHAPE), "datatype": "FP32", "parameters": {"binary_data_size": len(raw)}}
    out = {"name": "output", "parameters": {"binary_data": True}}
    header = json.dumps({"inputs": [inp], "outputs": [out]}).encode()
    b64 = json.dumps({"x": {"dtype": "float32", "shape": list(SHAPE), "b64": base64.b64encode(raw).decode()}})
    v2_headers = {"Content-Type": "application/octet-stream", "Inference-Header-Content-Length": str(len(header))}
    return [
        Variant("v2-binary", "/v2/models/mha/infer", header + raw, v2_headers),
        Variant("base64", "/attend", b64.encode(), {"Content-Type": "application/json"}),
    ]


def servers(baseline: Path | None, modes: list[str]) -> list[Srv]:
    py = sys.executable
    uv = [py, "-m", "uvicorn", "--loop", "uvloop", "--http", "httptools", "--no-access-log", "--log-level", "warning"]
    out = [
        Srv("asgi-echo", "echo", [*uv, "bench.echo_app:app"], {}, ROOT),
        Srv("fastapi-echo", "echo", [*uv, "bench.echo_app:fastapi_app"], {}, ROOT),
    ]
    trees = ([("against", baseline)] if baseline else []) + [("branch", ROOT)]
    for name, src in trees:
        for mode in modes:
            for suffix, log in (("", "true"), ("-nolog", "false")):
                env = {**SMALL_MODEL, "MHA_ACCESS_LOG": log, "MHA_LOG_LEVEL": "info", "MHA_GRPC_PORT": "0"}  # HTTP only
                if mode == "split":
                    env["MHA_ENGINE"] = "process"
                label = name + ("-split" if mode == "split" else "") + suffix
                out.append(Srv(label, "service", [py, "-m", "service.cli"], env, src))
    return out


def pin_model_process(srv: Srv) -> None:
    """Split mode: move the model process (the one descendant that loaded torch), all its threads, to the
    load generator's core, leaving the front end alone on the servers' core."""
    for pid in children(srv.proc.pid):
        try:
            with open(f"/proc/{pid}/maps") as f:
                torch = "libtorch" in f.read()
        except OSError:
            continue
        if torch:
            srv.model_pid = pid
            pin_all_threads(pid, CLIENT_CORE)
            return
    raise RuntimeError(f"{srv.name}: no model process found under pid {srv.proc.pid}")


def front_cpu_s(srv: Srv) -> float:
    """CPU seconds of the server's processes on the servers' core: all of them, less the model process."""
    return tree_cpu_s(srv.proc.pid, srv.model_pid)


def start(srv: Srv, logs: Path) -> None:
    """Start ``srv`` on the servers' core, configured by its own env alone (the shell's MHA_/OTEL_ dropped);
    ``wait_ready`` each afterwards, so that they start side by side."""
    server = Server(
        srv.env,
        logs / f"{srv.name}.log",
        srv.src,
        argv=srv.argv,
        core=SERVER_CORE,
        ready_path="/readyz" if srv.kind == "service" else "/",
        defaults={},
        drop_env=("OTEL_", "MHA_"),
        wait=False,
    )
    srv.proc, srv.base = server.proc, server.url


def measure(srv: Srv, v: Variant, body_file: Path, args, procs: list) -> Cell:
    path = v.path if srv.kind == "service" else "/echo"
    status, _, _ = http("POST", srv.base + path, v.body, v.headers)
    if status != 200:
        raise RuntimeError(f"{srv.name} {v.name}: probe answered {status}")
    wait_idle(procs, srv.base, "/healthz" if srv.kind == "service" else "/")
    cpu0 = front_cpu_s(srv)
    model0 = proc_cpu_s(srv.model_pid) if srv.model_pid else 0.0
    busy0 = core_busy()
    r = run_wrk(srv.base + path, v, args.concurrency, args.duration, body_file)
    busy1 = core_busy()
    busy = busy_between(busy0, busy1)
    cpu = front_cpu_s(srv) - cpu0
    model = proc_cpu_s(srv.model_pid) - model0 if srv.model_pid else float("nan")
    n = max(1, r["requests"])
    errors = sum(r[k] for k in ("err_connect", "err_read", "err_write", "err_status", "err_timeout"))
    return Cell(srv.name, v.name, r["requests"] / (r["duration_us"] / 1e6), 1e3 * cpu / n, r["p50_us"] / 1e3,
                r["p99_us"] / 1e3, errors, 1e3 * model / n, busy[SERVER_CORE], busy[CLIENT_CORE])  # fmt: skip


def median_cells(cells: list[Cell]) -> list[Cell]:
    keys = list(dict.fromkeys((c.server, c.variant) for c in cells))
    out = []
    for s, v in keys:
        cs = [c for c in cells if (c.server, c.variant) == (s, v)]
        fields = ("rps", "cpu_ms_per_req", "p50_ms", "p99_ms", "model_cpu_ms_per_req", "server_core_busy",
                  "client_core_busy")  # fmt: skip
        med = {f: statistics.median([getattr(c, f) for c in cs]) for f in fields}
        out.append(Cell(s, v, errors=sum(c.errors for c in cs), **med))
    return out


def cpu_ratio(floor: Cell | None, c: Cell) -> float:
    """The floor's CPU a request over this cell's (NaN without a floor or a cost): above 1, this one costs less."""
    return floor.cpu_ms_per_req / c.cpu_ms_per_req if floor and c.cpu_ms_per_req > 0 else float("nan")


def busy(c: Cell) -> str:
    if c.server_core_busy != c.server_core_busy:  # NaN: not measured
        return ""
    return f"{c.server_core_busy:.0%} / {c.client_core_busy:.0%}" + (" (wrk's core full)" if client_bound(c) else "")


def table(cells: list[Cell]) -> str:
    floor = {c.variant: c for c in cells if c.server == "fastapi-echo"}
    rows = [
        "| server | variant | req/s | server CPU ms/req | p50 ms | p99 ms | req/s x fastapi-echo "
        "| CPU/req: fastapi-echo's / this | model process CPU ms/req | cores busy: servers / wrk | errors |",
        "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    nan = float("nan")
    for c in cells:
        f = floor.get(c.variant)
        ratio = c.rps / f.rps if f else nan
        per_core = cpu_ratio(f, c)
        model = "" if c.model_cpu_ms_per_req != c.model_cpu_ms_per_req else f"{c.model_cpu_ms_per_req:.3f}"  # NaN: none
        rows.append(
            f"| {c.server} | {c.variant} | {c.rps:,.0f} | {c.cpu_ms_per_req:.3f} | {c.p50_ms:.2f} | {c.p99_ms:.2f} "
            f"| {ratio:.2f}x | {per_core:.2f}x | {model} | {busy(c)} | {c.errors} |"
        )
    return "\n".join(rows)


# Issue 20's targets (issue 11 set v2 binary >= 1.0x with the access log on; issue 20 keeps that with it off and
# asks 0.95x with it on): one front-end process, req/s over the bare FastAPI echo's of the same body. Written into
# front.json, where bench/page.py reads them: one table for both.
TARGETS = {
    ("branch-split-nolog", "v2-binary"): 1.0,
    ("branch-split", "v2-binary"): 0.95,
    ("branch-split-nolog", "base64"): 0.8,
    ("branch-split", "base64"): 0.8,
}


def targets(cells: list[Cell]) -> str:
    """The issue's targets, for this checkout's split front end (access log on and off)."""
    floor = {c.variant: c for c in cells if c.server == "fastapi-echo"}
    lines = ["", "Targets (req/s of one front-end process, MHA_ENGINE=process, over the fastapi-echo's):"]
    for c in cells:
        want = TARGETS.get((c.server, c.variant))
        if want is not None and c.variant in floor:
            ratio = c.rps / floor[c.variant].rps
            verdict = "PASS" if ratio >= want else "FAIL"
            line = f"- {verdict} {c.server} {c.variant}: {ratio:.2f}x (target >= {want:.2f}x)"
            if client_bound(c):  # the verdict stands; the reader learns which core it measured
                per_core = cpu_ratio(floor[c.variant], c)
                line += (
                    f"; wrk's core (wrk and the model process) was full and the servers' was not: the front end's CPU a"
                    f" request was {per_core:.2f}x the echo's"
                )
            lines.append(line)
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--rounds", type=int, default=1)
    ap.add_argument("--duration", type=float, default=5.0)
    ap.add_argument("--concurrency", type=int, default=64)
    add_against(ap)
    ap.add_argument("--modes", default="single,split", help="mha-serve modes: single (one process), split")
    ap.add_argument("--out", type=Path, default=ROOT / "bench-results")
    args = ap.parse_args()
    for tool in ("wrk", "taskset"):
        if shutil.which(tool) is None:
            sys.exit(f"{tool} not found: apt-get install {'wrk' if tool == 'wrk' else 'util-linux'}")
    os.sched_setaffinity(0, {1})  # this driver beside wrk, off the servers' core
    args.out.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix="mha-front-"))
    baseline, commit = None, "none"
    if args.against:
        baseline = tmp / "baseline"
        commit = export_tree(args.against, baseline)
    vs = variants()
    bodies = {}
    for v in vs:
        bodies[v.name] = tmp / f"{v.name}.body"
        bodies[v.name].write_bytes(v.body)
    srvs = servers(baseline, args.modes.split(","))
    try:
        logs = args.out / "front-logs"
        logs.mkdir(exist_ok=True)
        for s in srvs:
            start(s, logs)
        for s in srvs:
            wait_ready(s.proc, s.base, "/readyz" if s.kind == "service" else "/")
            if s.env.get("MHA_ENGINE") == "process":
                pin_model_process(s)
        procs = [s.proc for s in srvs]
        cells: list[Cell] = []
        for rnd in range(args.rounds):
            order = srvs[rnd % len(srvs) :] + srvs[: rnd % len(srvs)]
            for s in order:
                for v in vs:
                    cells.append(measure(s, v, bodies[v.name], args, procs))
                    c = cells[-1]
                    print(f"round {rnd + 1} {s.name:14} {v.name:10} {c.rps:8,.0f} req/s {c.cpu_ms_per_req:.3f} ms/req",
                          flush=True)  # fmt: skip
    finally:
        for s in srvs:
            if s.proc is not None:
                stop_process(s.proc)
        shutil.rmtree(tmp, ignore_errors=True)
    order = {s.name: i for i, s in enumerate(srvs)}
    med = sorted(median_cells(cells), key=lambda c: (c.variant != "v2-binary", order[c.server]))
    head = (
        f"Front-bound, x {list(SHAPE)} float32, c={args.concurrency}, {args.duration:g} s x {args.rounds} round(s) "
        f"(median), servers on core {SERVER_CORE}, wrk on the other; against = {commit}; {time.strftime('%F %T')}"
    )
    report = head + "\n\n" + table(med) + "\n" + targets(med) + "\n"
    print("\n" + report)
    (args.out / "front.md").write_text(report)
    targets_json = [[server, variant, want] for (server, variant), want in TARGETS.items()]
    (args.out / "front.json").write_text(
        json.dumps({"baseline": commit, "cells": [asdict(c) for c in cells], "targets": targets_json})
    )


if __name__ == "__main__":
    main()

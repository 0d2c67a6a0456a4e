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

Code: this file says what runs (servers, variants) and runs it; bench/harness.py starts and stops the servers,
pins cores, counts CPU and runs wrk (for every benchmark); bench/measure.py measures t_row and each cell, checks
the responses and derives the floors; bench/report.py writes the table, targets, notes, plot and files.

Usage:
  .venv/bin/python bench/service.py [--quick] [--concurrency 1,8,32,64] [--duration S] [--out bench-results]
                                    [--only base64,lists] [--quiet-budget S]
"""

from __future__ import annotations

import argparse
import os
import signal
import sys
import time
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from bench import report  # noqa: E402  (bench/ is not installed: ROOT on the path first)
from bench.harness import CLIENT_CORE, SERVER_CORE, Quiet, Server, run_wrk, stop_all, wait_idle  # noqa: E402
from bench.measure import (  # noqa: E402
    FOREIGN_RERUN,
    SHAPE,
    T_ROW_BATCH,
    Cell,
    Variant,
    check_response,
    compute_floors,
    measure_cell,
    measure_t_row,
    probe,
    write_bodies,
)

# -- what runs --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class ServerSpec:
    name: str
    kind: str  # "service" | "echo" | "naive"
    env: tuple[tuple[str, str], ...] = ()
    ready_path: str = "/readyz"


def _service_env(max_batch: int) -> tuple[tuple[str, str], ...]:
    return (
        ("MHA_TORCH_THREADS", "1"),
        ("MHA_MAX_BATCH_SIZE", str(max_batch)),
        ("MHA_SHUTDOWN_GRACE_S", "1"),
        ("MHA_GRPC_PORT", "0"),  # HTTP only here (two servers run at once); gRPC: bench/protocols.py
    )


SERVERS = [
    ServerSpec("mha-serve batch=32", "service", _service_env(32)),
    ServerSpec("mha-serve batch=1", "service", _service_env(1)),
    ServerSpec("naive", "naive", (("MHA_TORCH_THREADS", "1"),)),
    ServerSpec("echo", "echo", ready_path="/"),
]


def start(spec: ServerSpec, log_path: Path) -> Server:
    """On core 0, not waiting for it to be ready: all servers start side by side."""
    argv = None  # mha-serve, with its defaults (JSON access log on, as deployed) under spec.env
    if spec.kind != "service":
        app = {"echo": "bench.echo_app:app", "naive": "bench.naive_app:app"}[spec.kind]
        argv = [sys.executable, "-m", "uvicorn", app, "--loop", "uvloop", "--http", "httptools"]
        argv += ["--no-access-log", "--log-level", "warning"]
    return Server(
        dict(spec.env), log_path, argv=argv, core=SERVER_CORE, ready_path=spec.ready_path, defaults={}, wait=False
    )


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


# -- main -------------------------------------------------------------------------------------------------


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--quick", action="store_true", help="3 s runs, 1 s warm-ups (about 3 minutes in all)")
    ap.add_argument("--concurrency", default="1,8,32,64", help="comma-separated wrk connection counts")
    ap.add_argument("--duration", type=float, help="seconds per run (default 10, --quick 3)")
    ap.add_argument("--warmup", type=float, help="seconds of warm-up load per variant (default 2, --quick 1)")
    ap.add_argument("--only", help="comma-separated substrings: run only the variants whose name has one")
    ap.add_argument("--out", default=str(ROOT / "bench-results"))
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
    env_info = report.environment()
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
    running: dict[str, Server] = {}
    try:
        # All servers up at once (an idle one costs no CPU), so every concurrency level is measured for all
        # variants close together in time: slow drifts of the shared machine hit them alike.
        for spec in SERVERS:
            if any(v.server == spec.name for v in variants):
                log_path = out / "logs" / f"{spec.name.replace(' ', '_').replace('=', '')}.log"
                running[spec.name] = start(spec, log_path)
        for name, srv in running.items():
            ready_s = srv.wait_ready()
            print(f"## {name}: ready in {ready_s:.1f} s (pid {srv.pid})", flush=True)
        procs = [srv.proc for srv in running.values()]
        kept = []
        for v in variants:
            srv, body = running[v.server], bodies[v.body]
            if v.probe:
                ok, why = probe(v, srv.url, body)
                if not ok:
                    notes.append(f"{v.name} skipped: {why}")
                    print(f"   {v.name}: skipped ({why})", flush=True)
                    continue
            checks[v.name] = check_response(v, srv.url, body, x)
            if warmup > 0:
                wait_idle(procs, srv.url, srv.ready_path)
                run_wrk(srv.url + v.path, body, v.content_type, dict(v.headers), 8, warmup)
            kept.append(v)
        variants = kept
        for conc in concs:
            for v in variants:
                srv, body = running[v.server], bodies[v.body]
                cell = measure_cell(v, srv, procs, conc, duration, body, quiet)
                if max(cell.foreign0, cell.foreign1) > FOREIGN_RERUN and quiet.may_rerun(duration + 1):
                    again = measure_cell(v, srv, procs, conc, duration, body, quiet)
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
        for srv in running.values():
            srv.stop(10)
        quiet.wait()
        t_row_end = measure_t_row(reps)
    finally:
        stop_all()
    order = {v.name: i for i, v in enumerate(variants)}
    cells.sort(key=lambda c: (order[c.variant], c.concurrency))

    try:
        floors = compute_floors(cells, t_row_start, t_row_end)
    except ValueError as e:
        raise SystemExit(str(e)) from None
    res_targets = report.targets(cells, floors, concs)
    notes += report.run_notes(cells, floors, quiet.spent_s, quiet.budget_s)
    elapsed = time.monotonic() - started
    md = report.markdown(
        cells,
        floors,
        res_targets,
        notes,
        env_info=env_info,
        concs=concs,
        duration=duration,
        warmup=warmup,
        reps=reps,
        echo_bytes=len(bodies["echo"].read_bytes()),
        elapsed=elapsed,
    )
    paths = report.write(
        out,
        md,
        cells,
        floors,
        env_info=env_info,
        config={"duration_s": duration, "warmup_s": warmup, "concurrency": concs, "shape": list(SHAPE)},
        t_row_runs={"start": t_row_start, "end": t_row_end},
        res_targets=res_targets,
        checks=checks,
        notes=notes,
        elapsed_s=elapsed,
    )
    print()
    print(md)
    print(f"\nwrote {', '.join(str(p) for p in paths)}")
    return 0


def _sigterm(signum, frame) -> None:
    raise SystemExit(128 + signum)  # run the finally blocks: no server outlives the driver


if __name__ == "__main__":
    signal.signal(signal.SIGTERM, _sigterm)
    try:
        sys.exit(main())
    finally:
        stop_all()

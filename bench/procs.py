"""MHA_WORKERS: front-end processes feeding one model process vs one process, side by side, with wrk.

CPU case (default): the real model (8 heads, E=512), /attend with x [1,128,512] float32 base64, wrk
at concurrency 32; the server and wrk share this machine's cores. Rows: single-process mode
(MHA_WORKERS=1, the in-process batcher), the default configuration, and 2..N front ends.

    .venv/bin/python bench/procs.py                       # CPU case, 10 s per row
    .venv/bin/python bench/procs.py --gpu                 # GPU case: bf16, v2 binary, workers 1..cores,
                                                          # plus the forward pass's own ceiling
    MHA_DEVICE=cpu .venv/bin/python bench/procs.py --gpu --seconds 3   # the GPU command, run on a CPU
    .venv/bin/python bench/procs.py --noop                # the GPU case on this CPU machine (issue 20)
    .venv/bin/python bench/procs.py --noop --rounds 6 --against HEAD~3   # and an earlier revision, same rounds
    .venv/bin/python bench/procs.py --noop --rows 8 --connections 256   # 1 MiB requests: CPU a row, not judged

Every row prints req/s, p50 and p99 (wrk's exact percentiles) and the ratio to single-process mode; the
floor is the forward pass alone, with the server's torch threads.

--noop: the GPU case measured on a CPU. A forward that returns its input (bench/noop_runner.py, named by
MHA_RUNNER) leaves only what the service spends around it: 2 front ends + the model process, on both cores,
serving [1,128,512] bfloat16 v2 binary, against its floor, a bare FastAPI echo of the same body under uvicorn
with 2 workers on the same cores (targets: >= 0.8x its req/s; the model process's CPU a request, from /proc,
<= 15 us). They take turns over --rounds rounds, in an order that rotates each round; the medians are judged.
It also prints where each request's CPU went (front ends, model process, wrk; the echo's workers, wrk), as all
of them share the two cores, and, where ``perf`` may sample the model process, its CPU split in place into the
answers' copy into their arenas (libc's memmove: what a GPU's DMA does instead) and the rest. Its last floor is
the model process's code over its socket fed by one front end with messages of the service's batches' size, back
to back, as often as the service's batches came, and half as often (bench/engine_cpu.py --every-ms): on this VM
the same code costs two to three times as much a request when the process idles a few ms between messages.
``--against REV`` runs REV's service (exported with git archive) in the same rounds and prints its figures
beside: a change's effect measured side by side, the echo in the same run.
"""

from __future__ import annotations

import argparse
import base64
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.harness import (
    COPY_SYMBOLS,
    ROOT,
    PerfShare,
    Server,
    add_against,
    children,
    export_tree,
    model_process,
    proc_cpu_s,
    run_wrk,
    scrape,
    tree_cpu_s,
    wait_idle,
    wrk_errors,
)
from mha_client._wire import f32_to_bf16
from service.settings import default_workers

SHAPE = (1, 128, 512)


def b64_body() -> tuple[bytes, str, dict[str, str]]:
    x = np.random.default_rng(0).standard_normal(SHAPE).astype(np.float32)
    body = {"x": {"dtype": "float32", "shape": list(SHAPE), "b64": base64.b64encode(x.tobytes()).decode()}}
    return json.dumps(body).encode(), "application/json", {}


def v2_binary_body(shape: tuple[int, ...] = SHAPE) -> tuple[bytes, str, dict[str, str]]:
    x = np.random.default_rng(0).standard_normal(shape).astype(np.float32)
    raw = f32_to_bf16(x).tobytes()
    header = json.dumps(
        {
            "inputs": [
                {"name": "x", "shape": list(shape), "datatype": "BF16", "parameters": {"binary_data_size": len(raw)}}
            ],
            "outputs": [{"name": "output", "parameters": {"binary_data": True}}],
        }
    ).encode()
    return header + raw, "application/octet-stream", {"Inference-Header-Content-Length": str(len(header))}


def wrk(url: str, body: tuple[bytes, str, dict[str, str]], connections: int, seconds: float, threads: int) -> dict:
    """harness.run_wrk, unpinned (server and wrk share the cores), on a temporary body file."""
    data, ctype, headers = body
    with tempfile.NamedTemporaryFile(suffix=".body", delete=False) as f:
        f.write(data)
    try:
        r = run_wrk(url, Path(f.name), ctype, headers, connections, max(1, round(seconds)), threads=threads, core=None)
    finally:
        os.unlink(f.name)
    return {
        "rps": r["requests"] / (r["duration_us"] / 1e6),
        "p50": r["p50_us"] / 1e3,
        "p99": r["p99_us"] / 1e3,
        "err": wrk_errors(r),
    }


NOOP_TARGETS = {"ratio": 0.8, "model_us": 15.0}  # issue 20: x the FastAPI echo; model process CPU a request


def answer_copy_us(passes: int = 5, in_flight: int = 64, shape: tuple[int, ...] = SHAPE) -> float:
    """The model-process floor of the no-op case: one answer's copy into its arena (service/shm.py's ``Arena.put``
    and its ``free``) and nothing else, in this process, with ``in_flight`` answers live, from a 16 MiB ring of
    request-sized inputs (so that the source is not all in the cache). A no-op forward's answer is its input, and
    on a CPU the model process copies its bytes; in the service the copy's source was written by a front end on the
    other core just before, so it costs more there than here: a lower bound. Median of ``passes`` us a copy."""
    import statistics
    from collections import deque

    from service.shm import Arena

    x = np.zeros(shape, np.uint16)  # [1,128,512] bfloat16 as its bits: 128 KiB
    ring = np.random.default_rng(0).integers(0, 1 << 16, (max(2, (16 << 20) // x.nbytes), *shape), dtype=np.uint16)
    arena = Arena(max(16 << 20, (in_flight + 1) * x.nbytes))
    try:
        per: list[float] = []
        for _ in range(passes):
            live: deque[int] = deque()
            n = 4 * len(ring)
            t0 = time.perf_counter()
            for i in range(n):
                live.append(arena.put(ring[i % len(ring)]))
                if len(live) > in_flight:
                    arena.free(live.popleft())
            per.append(1e6 * (time.perf_counter() - t0) / n)
            while live:
                arena.free(live.popleft())
        return statistics.median(per)
    finally:
        arena.close()


# Requests a message in the model-code floor: about what a message carries in the no-op case (14 a batch at c=64,
# 20-30 a message at c=256, mha_batch_size_requests and /proc's reads, docs/performance.md).
MODEL_CODE_AT_ONCE = 16


def model_code_us(at_once: int = MODEL_CODE_AT_ONCE, shape: tuple[int, ...] = SHAPE) -> dict | None:
    """The model process's other floor in the no-op case: its own code alone (bench/engine_cpu.py --in-process: the
    Engine fed messages of ``at_once`` requests in one process, no socket, no other process on the cores), with
    the answer's copy's share of it. In the service the same code shares two cores with the front ends and wrk.
    None if it could not be measured (its error is printed)."""
    argv = ["--in-process", "--shape", ",".join(map(str, shape)), "--dtype", "bfloat16", "--at-once", str(at_once)]
    return engine_cpu_json([*argv, "--requests", "20000"])


def engine_cpu_json(args: list[str]) -> dict | None:
    """bench/engine_cpu.py run with ``args`` (as a module: ROOT on its path), its figures as its --json wrote them;
    None if it failed (its error is printed)."""
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "engine_cpu.json"
        argv = [sys.executable, "-m", "bench.engine_cpu", *args, "--json", str(out)]
        done = subprocess.run(argv, cwd=ROOT, capture_output=True, text=True, timeout=300)
        if done.returncode != 0 or not out.exists():
            print(f"bench/engine_cpu.py {' '.join(args)} failed: {done.stderr.strip()[-500:]}", file=sys.stderr)
            return None
        return json.loads(out.read_text())


def model_code_paced_us(at_once: int, every_ms: float, shape: tuple[int, ...] = SHAPE) -> dict | None:
    """The model process's code over its socket, fed by one front end (bench/engine_cpu.py --merged) with messages of
    ``at_once`` requests: back to back, one every ``every_ms`` (the service's mean interval between batches) and one
    every twice that (each of its two front ends' interval), alternating; us a request for each. On this VM the same
    code and messages cost more the longer the process idles between them (what ran meanwhile left it cold), and
    the service's messages come at uneven intervals: its own figure is read against this range. None if it could
    not be measured (its error is printed)."""
    argv = ["--batcher", "real", "--shape", ",".join(map(str, shape)), "--dtype", "bfloat16", "--at-once", str(at_once)]
    paces = f"0,{every_ms:.3f},{2 * every_ms:.3f}"
    got = engine_cpu_json([*argv, "--merged", "--every-ms", paces, "--rounds", "3", "--requests", str(100 * at_once)])
    if got is None:
        return None
    return {"at_once": at_once, "every_ms": every_ms, "us": list(got["us"].values())}  # (in --every-ms's order)


def noop_case(seconds: float, rounds: int, conns: int, logs: Path, against: str | None = None, rows: int = 1) -> dict:
    """2 front ends with the no-op forward against the FastAPI echo (2 workers), both on both cores; with ``against``
    (a git revision), that revision's service too, in the same rounds. ``rows``: each request's x is [rows,128,512]
    (the targets are judged for 1; more rows is what a group of that many 1-row requests would be to the model
    process, and the floors are measured at that shape, about 16 rows a message)."""
    import statistics

    shape = (rows, *SHAPE[1:])
    body = v2_binary_body(shape)
    copy_us = answer_copy_us(shape=shape)  # (before any server starts: the machine is quiet)
    at_once = max(1, MODEL_CODE_AT_ONCE // rows)
    code = model_code_us(at_once, shape)
    env = {
        "MHA_WORKERS": "2",
        "MHA_ENGINE": "process",
        "MHA_RUNNER": "bench.noop_runner:runner",
        "MHA_DTYPE": "bfloat16",
        "MHA_GRPC_PORT": "0",
        "MHA_DECODE_PROCESSES": "0",
        "MHA_TORCH_THREADS": "1",
    }
    uv = [sys.executable, "-m", "uvicorn", "bench.echo_app:fastapi_app", "--workers", "2", "--loop", "uvloop"]
    uv += ["--http", "httptools", "--no-access-log", "--log-level", "warning"]
    echo = Server({}, logs / "noop-echo.log", argv=uv, ready_path="/", defaults={}, wait=False)
    servers = {"service": Server(env, logs / "noop-service.log", drop_env=("MHA_", "OTEL_"), wait=False)}
    commit = None
    if against:
        commit = export_tree(against, logs / "against")
        servers["against"] = Server(
            env, logs / "noop-against.log", drop_env=("MHA_", "OTEL_"), wait=False, source=logs / "against"
        )
    try:
        echo.wait_ready()
        for srv in servers.values():
            srv.wait_ready()
        models = {name: model_process(srv.pid) for name, srv in servers.items()}
        if None in models.values():
            raise RuntimeError("no model process under the service")
        runs: dict[str, list[dict]] = {"echo": [], **{name: [] for name in servers}}
        path = "/v2/models/mha/infer"
        targets = {"echo": (echo, "/echo"), **{name: (srv, path) for name, srv in servers.items()}}
        for srv, url_path in targets.values():
            wrk(srv.url + url_path, body, conns, 1, 2)  # warm-up
        everyone = [echo.proc, *(srv.proc for srv in servers.values())]
        order = list(targets)
        for i in range(rounds):
            # The order rotates between rounds, as bench/front.py's does: measured in a fixed order (echo, this
            # tree, --against's), whichever tree came last won 5 of 6 rounds, both ways round, by ~8% req/s.
            for name in order[i % len(order) :] + order[: i % len(order)]:
                srv, url_path = targets[name]
                wait_idle(everyone, srv.url, srv.ready_path)
                model = models.get(name)
                s0 = scrape(srv.url) if model else {}  # (before the CPU is read: the scrape costs the model a ping)
                m0 = proc_cpu_s(model) if model else 0.0
                f0, w0 = tree_cpu_s(srv.pid, model), os.times()
                with PerfShare(model) as perf:
                    r = wrk(srv.url + url_path, body, conns, seconds, 2)
                w1 = os.times()
                n = max(1.0, r["rps"] * round(seconds))
                model_s = proc_cpu_s(model) - m0 if model else 0.0
                r["model_us"] = 1e6 * model_s / n if model else None
                # what of it is the answers' copy into their arenas (a GPU's DMA does it there): libc's copy, in place
                copy = perf.share(COPY_SYMBOLS)
                r["model_copy_us"] = None if copy is None else copy * r["model_us"]
                if model:  # its batches: the model process's CPU splits into what a batch costs and what a request
                    s1 = scrape(srv.url)
                    batches = s1.get("mha_batch_size_requests_count", 0.0) - s0.get(
                        "mha_batch_size_requests_count", 0.0
                    )
                    batched = s1.get("mha_batch_size_requests_sum", 0.0) - s0.get("mha_batch_size_requests_sum", 0.0)
                    r["batch_requests"] = batched / batches if batches else None
                    r["batch_every_ms"] = 1e3 * max(1, round(seconds)) / batches if batches else None
                    r["model_us_a_batch"] = 1e6 * model_s / batches if batches else None
                # the rest of the server (the front ends; the echo's workers) and wrk: where the other cores went
                r["server_us"] = 1e6 * (tree_cpu_s(srv.pid, model) - f0) / n
                r["wrk_us"] = 1e6 * (w1.children_user + w1.children_system - w0.children_user - w0.children_system) / n
                runs[name].append(r)
    finally:
        echo.stop(10)
        for srv in servers.values():
            srv.stop(10)
    med = {k: statistics.median(r["rps"] for r in v) for k, v in runs.items()}
    model_us = statistics.median(r["model_us"] for r in runs["service"])

    def batches(name: str) -> dict:
        """The medians of a service's batches: requests a batch, the model process's CPU a batch."""
        out = {}
        for field, key in (("batch_requests", "requests_per_batch"), ("model_us_a_batch", "model_us_per_batch")):
            got = [r[field] for r in runs[name] if r.get(field) is not None]
            if got:
                out[key] = statistics.median(got)
        return out

    cpu = {k: {f: statistics.median(r[f] for r in v) for f in ("server_us", "wrk_us")} for k, v in runs.items()}
    # The floor at the service's pace: its code over a socket, a message of its batches' size as often as they came
    paced = None
    every = [r["batch_every_ms"] for r in runs["service"] if r.get("batch_every_ms")]
    sizes = [r["batch_requests"] for r in runs["service"] if r.get("batch_requests")]
    if every and sizes and rows == 1:
        paced = model_code_paced_us(max(1, round(statistics.median(sizes))), statistics.median(every), shape)
    copies = [r["model_copy_us"] for r in runs["service"] if r.get("model_copy_us") is not None]
    extra = {}
    if commit is not None:  # the same figures for REV, from the same rounds
        extra["against"] = {
            "commit": commit,
            "rps": med["against"],
            "ratio": med["against"] / med["echo"],
            "model_us_per_request": statistics.median(r["model_us"] for r in runs["against"]),
            "front_ends_us_per_request": cpu["against"]["server_us"],
            **batches("against"),
        }
    return {
        **extra,
        "connections": conns,
        "seconds": seconds,
        "runs": runs,
        "echo_rps": med["echo"],
        "service_rps": med["service"],
        "ratio": med["service"] / med["echo"],
        "model_us_per_request": model_us,
        **({"model_copy_us_per_request": statistics.median(copies)} if copies else {}),
        **batches("service"),
        "answer_copy_us": copy_us,
        **({} if code is None else {"model_code_us": code["us"], "model_code_copy_us": code["copy_us"]}),
        "model_code_at_once": at_once,
        **({} if paced is None else {"model_code_paced": paced}),
        "rows": rows,
        "front_ends_us_per_request": cpu["service"]["server_us"],
        "echo_us_per_request": cpu["echo"]["server_us"],
        "wrk_us_per_request": {k: v["wrk_us"] for k, v in cpu.items()},
        "targets": NOOP_TARGETS,
        "errors": sum(r["err"] for v in runs.values() for r in v),
    }


def print_noop(res: dict) -> None:
    t = res["targets"]
    ok_r, ok_m = res["ratio"] >= t["ratio"], res["model_us_per_request"] <= t["model_us"]
    rows = res.get("rows", 1)
    if rows != 1:  # (the targets are for requests of one row: shown, not judged)
        ok_r = ok_m = None
    print("| what | measured | target |\n|---|---:|---:|")
    print(f"| FastAPI echo, 2 workers | {res['echo_rps']:,.0f} req/s | |")
    print(f"| 2 front ends + model process, no-op forward | {res['service_rps']:,.0f} req/s | |")
    if "echo_us_per_request" in res:  # CPU a request, where it went (all processes share the two cores)
        wrk_us = res["wrk_us_per_request"]
        print(f"| CPU a request: echo workers / wrk | {res['echo_us_per_request']:.0f} / {wrk_us['echo']:.0f} us | |")
        print(
            f"| CPU a request: front ends / model process / wrk | {res['front_ends_us_per_request']:.0f} / "
            f"{res['model_us_per_request']:.0f} / {wrk_us['service']:.0f} us | |"
        )
    if "against" in res:  # the same service at an earlier revision, in the same rounds
        a = res["against"]
        batch = (
            f"; {a['model_us_per_batch']:,.0f} us a batch of {a['requests_per_batch']:.1f}"
            if "model_us_per_batch" in a
            else ""
        )
        print(
            f"| at {a['commit']}: req/s, x the echo; CPU a request: front ends / model process | {a['rps']:,.0f} "
            f"({a['ratio']:.2f}x); {a['front_ends_us_per_request']:.0f} / {a['model_us_per_request']:.1f} us{batch} | |"
        )
    print(f"| {_verdict(ok_r)}ratio | {res['ratio']:.2f}x | >= {t['ratio']}x |")
    if "answer_copy_us" in res:  # the model process's floor here: the no-op's answer copied into its arena
        copy = f"the answer's {128 * rows} KiB copy alone (Arena.put, one process)"
        print(f"| floor: {copy} | {res['answer_copy_us']:.1f} us | |")
    if "model_code_us" in res:  # and the model process's own code alone, copy included (bench/engine_cpu.py)
        print(
            f"| floor: the model process's code alone, {res['model_code_at_once']} a message (engine_cpu.py "
            f"--in-process) | {res['model_code_us']:.1f} us (the copy {res['model_code_copy_us']:.1f}) | |"
        )
    if "model_code_paced" in res:  # the same code over its socket, back to back and at the service's pace
        p = res["model_code_paced"]
        every, us = p["every_ms"], " / ".join(f"{v:.1f}" for v in p["us"])
        print(
            f"| floor: the same over its socket, {p['at_once']} a message (merged): back to back / one every "
            f"{every:.1f} ms (the service's batches) / every {2 * every:.1f} ms (engine_cpu.py --every-ms) "
            f"| {us} us | |"
        )
    print(f"| {_verdict(ok_m)}model process CPU a request | {res['model_us_per_request']:.1f} us "
          f"| <= {t['model_us']:g} us |")  # fmt: skip
    if "model_copy_us_per_request" in res:  # measured in place: the part a GPU's DMA takes over, and the rest
        copy = res["model_copy_us_per_request"]
        print(
            f"| of which the answers' copy (libc's memmove, perf) / the rest | {copy:.1f} / "
            f"{res['model_us_per_request'] - copy:.1f} us | |"
        )
    if rows != 1:
        print(f"| model process CPU a row ({rows} a request) | {res['model_us_per_request'] / rows:.1f} us | |")
    if "model_us_per_batch" in res:  # what a batch costs it, whatever its size, beside what each request adds
        print(
            f"| model process CPU a batch (requests a batch) | {res['model_us_per_batch']:,.0f} us "
            f"({res['requests_per_batch']:.1f}) | |"
        )
    print(f"errors: {res['errors']}")


def _verdict(ok: bool | None) -> str:
    """A row's verdict as the table leads it ("PASS ", "FAIL "), none for a figure shown but not judged."""
    return "" if ok is None else ("PASS " if ok else "FAIL ")


def forward_ceiling(env: dict[str, str], batch: int, seconds: float) -> float:
    """Requests/s of the forward pass alone: batches of ``batch`` x [1,128,512], back to back, in-process."""
    code = f"""
import time, numpy as np
from service.settings import Settings
from service.messages import AttendInput
from service.engine.runner import Runner
r = Runner.from_settings(Settings())
r.warmup()
x = np.random.default_rng(0).standard_normal({SHAPE}).astype(np.float32)
items = [AttendInput(x) for _ in range({batch})]
for _ in range(3): r.run(items)
n, t0 = 0, time.perf_counter()
while time.perf_counter() - t0 < {seconds}:
    r.run(items); n += 1
print({batch} * n / (time.perf_counter() - t0))
"""
    out = subprocess.run([sys.executable, "-c", code], env={**os.environ, **env}, capture_output=True, text=True)
    if out.returncode:
        raise RuntimeError(out.stderr[-2000:])
    return float(out.stdout.split()[-1])


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--gpu", action="store_true", help="the GPU case: bf16 v2 binary, workers 1..cores")
    p.add_argument("--seconds", type=float, default=10)
    p.add_argument("--connections", type=int, default=None, help="default 32 (CPU case), 256 (GPU case)")
    p.add_argument("--workers", default=None, help="comma-separated worker counts (default: see the cases)")
    p.add_argument("--torch-threads", type=int, default=os.cpu_count() or 1)
    p.add_argument("--noop", action="store_true", help="the GPU case on a CPU: a no-op forward against an echo")
    p.add_argument("--rounds", type=int, default=2, help="--noop: the echo and the service alternate this often")
    p.add_argument("--rows", type=int, default=1, help="--noop: rows of each request's x ([rows,128,512]; judged at 1)")
    p.add_argument("--json", type=Path, help="also write the results here")
    add_against(p)
    args = p.parse_args()
    if args.against and not args.noop:
        p.error("--against: only with --noop")
    if args.rows != 1 and not args.noop:
        p.error("--rows: only with --noop")
    if args.noop:
        logs = Path(tempfile.mkdtemp(prefix="bench-noop-"))
        res = noop_case(args.seconds, args.rounds, args.connections or 64, logs, args.against, args.rows)
        print_noop(res)
        if args.json:
            args.json.parent.mkdir(parents=True, exist_ok=True)
            args.json.write_text(json.dumps(res, indent=1))
        return
    cores = os.cpu_count() or 1
    device = os.environ.get("MHA_DEVICE", "auto")
    env = {"MHA_TORCH_THREADS": str(args.torch_threads), "MHA_GRPC_PORT": "0", "MHA_DECODE_PROCESSES": "0"}
    if args.gpu:
        env["MHA_DTYPE"] = "bfloat16"
        body, path, conns = v2_binary_body(), "/v2/models/mha/infer", args.connections or 256
        counts = [int(w) for w in args.workers.split(",")] if args.workers else list(range(1, cores + 1))
    else:
        body, path, conns = b64_body(), "/attend", args.connections or 32
        dflt = default_workers(device)
        counts = [int(w) for w in args.workers.split(",")] if args.workers else sorted({1, dflt, 2})
    print(
        f"{cores} cores, device {device}, {'v2 binary bf16' if args.gpu else 'base64 /attend float32'} {SHAPE}, "
        f"{conns} connections, {args.seconds:g} s per row, default MHA_WORKERS here: {default_workers(device)}"
    )
    # The forward pass's own ceiling, with the server's torch threads: what no front end can exceed.
    ceiling = forward_ceiling(env, 32, min(args.seconds, 5))
    print(f"forward pass alone, batches of 32, {args.torch_threads} torch thread(s): {ceiling:,.0f} req/s")
    rows = []
    log_dir = Path(tempfile.mkdtemp(prefix="bench-procs-"))
    # Row 1 is single-process mode; with one worker the split (one front end + the model process) runs too.
    configs = [(w, "inprocess" if w == 1 else "process") for w in counts]
    if 1 in counts and not args.gpu:
        configs.insert(configs.index((1, "inprocess")) + 1, (1, "process"))
    for w, engine in configs:
        server = Server({**env, "MHA_WORKERS": str(w), "MHA_ENGINE": engine}, log_dir / f"w{w}-{engine}.log")
        try:
            wrk(server.url + path, body, conns, min(2, args.seconds), 2)  # warm-up
            time.sleep(0.5)
            pids = [server.proc.pid, *children(server.proc.pid)]
            cpu0 = sum(proc_cpu_s(p) for p in pids)
            r = wrk(server.url + path, body, conns, args.seconds, 2)
            r["cpu_ms"] = 1e3 * (sum(proc_cpu_s(p) for p in pids) - cpu0) / max(1.0, r["rps"] * args.seconds)
            rows.append((w, engine, r))
        finally:
            server.stop()
    base = rows[0][2]["rps"]
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        doc = {"forward_ceiling_rps": ceiling, "connections": conns, "seconds": args.seconds, "gpu": args.gpu}
        doc["rows"] = [{"workers": w, "engine": e, **r} for w, e, r in rows]
        args.json.write_text(json.dumps(doc, indent=1))
    print("| MHA_WORKERS | mode | req/s | x single | x forward ceiling | server CPU ms/req | p50 ms | p99 ms "
          "| p99/p50 | errors |")  # fmt: skip
    print("|---:|---|---:|---:|---:|---:|---:|---:|---:|---:|")
    print(f"| | forward pass alone | {ceiling:,.0f} | {ceiling / base:.2f}x | 1.00x | | | | | |")
    for w, engine, r in rows:
        mode = "single process" if engine == "inprocess" else f"{w} front end(s) + model process"
        default = w == default_workers(device) and (engine == "inprocess") == (w == 1)  # 1: one process
        tag = " (default)" if default else ""
        print(
            f"| {w}{tag} | {mode} | {r['rps']:,.0f} | {r['rps'] / base:.2f}x | {r['rps'] / ceiling:.2f}x "
            f"| {r['cpu_ms']:.2f} | {r['p50']:.1f} | {r['p99']:.1f} | {r['p99'] / r['p50']:.2f} | {r['err']} |"
        )


if __name__ == "__main__":
    main()

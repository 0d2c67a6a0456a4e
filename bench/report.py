"""The service benchmark's report: the table, the floors, the PASS/FAIL targets and the ratios not judged,
the notes on a disturbed run, the plot, and OUT/service.md / service.json / service.png.

Pure functions of the cells and floors that bench/measure.py produced (tests/unit/test_bench_report.py feeds
them fixed cells), except ``environment`` (reads the machine) and ``write``.
"""

from __future__ import annotations

import contextlib
import json
import os
import platform
import subprocess
from dataclasses import asdict
from pathlib import Path

from bench.harness import CLIENT_CORE, SERVER_CORE
from bench.measure import FOREIGN_RERUN, Cell, find


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


def run_notes(cells: list[Cell], floors: dict, quiet_spent_s: float, quiet_budget_s: float) -> list[str]:
    """What a reader must know before trusting the table: runs with errors, runs other processes disturbed,
    t_row's drift over the run."""
    notes = []
    bad = [c for c in cells if c.non2xx or c.socket_errors or c.timeouts]
    if bad:
        notes.append("runs with errors: " + ", ".join(f"{c.variant} C={c.concurrency}" for c in bad))
    foreign = [c for c in cells if max(c.foreign0, c.foreign1) > FOREIGN_RERUN]
    if foreign:
        notes.append(
            "other processes took more than 10% of a core during (core 0 / core 1): "
            + ", ".join(f"{c.variant} C={c.concurrency} ({c.foreign0:.0%} / {c.foreign1:.0%})" for c in foreign)
            + f"; {quiet_spent_s:.0f} s of the {quiet_budget_s:.0f} s quiet budget spent waiting and re-running"
        )
    drift = floors["t_row_end_s"] / floors["t_row_start_s"] - 1
    if abs(drift) > 0.05:
        notes.append(f"t_row drifted {drift:+.1%} between the start and the end of the run (the smaller is used)")
    return notes


def floor_lines(cells: list[Cell], floors: dict, reps: int, echo_bytes: int) -> list[str]:
    echo1 = find(cells, "echo", 1)
    echo_best = max((c for c in cells if c.variant == "echo"), key=lambda c: c.rps)
    assert echo1 is not None  # floors() needed it
    t_row, t_echo = floors["t_row_s"], floors["t_echo_s"]
    return [
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


def target_lines(res_targets: list[dict]) -> list[str]:
    return [
        f"- {'PASS' if t['pass'] else ('FAIL' if t['pass'] is False else 'N/A ')} {t['target']}: {t['detail']}"
        + (f"\n  - CPU-time view: {t['cpu_view']}" if t["cpu_view"] else "")
        for t in res_targets
    ]


def markdown(
    cells: list[Cell],
    floors: dict,
    res_targets: list[dict],
    notes: list[str],
    *,
    env_info: dict,
    concs: list[int],
    duration: float,
    warmup: float,
    reps: int,
    echo_bytes: int,
    elapsed: float,
) -> str:
    """OUT/service.md: how it ran, the table, floors, targets, the ratios not judged, notes."""
    return "\n".join(
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
            fmt_table(cells),
            "",
            "## Floors",
            *floor_lines(cells, floors, reps, echo_bytes),
            "",
            "## Targets",
            *target_lines(res_targets),
            "",
            "Not judged, same ratios for every variant:",
            *info_lines(cells, floors, concs),
            "",
            *(["## Notes", *[f"- {n}" for n in notes], ""] if notes else []),
        ]
    )


def write(
    out: Path,
    md: str,
    cells: list[Cell],
    floors: dict,
    *,
    env_info: dict,
    config: dict,
    t_row_runs: dict,
    res_targets: list[dict],
    checks: dict,
    notes: list[str],
    elapsed_s: float,
) -> list[Path]:
    """OUT/service.md, OUT/service.json (everything) and OUT/service.png; the paths written."""
    paths = [out / "service.md", out / "service.json", out / "service.png"]
    paths[0].write_text(md)
    doc = {
        "environment": env_info,
        "config": config,
        "floors": floors,
        "t_row_runs": t_row_runs,
        "targets": res_targets,
        "cells": [asdict(c) for c in cells],
        "checks": checks,
        "notes": notes,
        "elapsed_s": elapsed_s,
    }
    paths[1].write_text(json.dumps(doc, indent=2))
    plot(cells, floors, paths[2])
    return paths

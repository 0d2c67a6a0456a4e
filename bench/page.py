"""The performance page from a results folder (``make bench-report``): bench/run.py's JSON into docs.

Writes the section of docs/performance.md between its two ``bench-report`` markers (the rest of the page is
prose kept by hand) and three plots under docs/images/: ``bench-latency.png``, p99 latency against throughput
per encoding, one point per concurrency; ``bench-protocols.png``, each protocol's (gRPC, v2 HTTP, /attend base64)
throughput at each concurrency; and ``bench-floors.png``, each result as a ratio of its floor with
its target. The section names the machine, the versions, the git revision and the command of the run.
Pure functions of the loaded results, except ``machine`` (reads this machine) and ``main``.

    .venv/bin/python bench/page.py [bench-results] [--page docs/performance.md] [--images docs/images]
"""

from __future__ import annotations

import argparse
import contextlib
import importlib.metadata as md
import json
import os
import platform
import statistics
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
START, END = "<!-- bench-report:start -->", "<!-- bench-report:end -->"


def machine() -> dict:
    cpu = ""
    with contextlib.suppress(OSError), open("/proc/cpuinfo") as f:
        cpu = next((ln.split(":", 1)[1].strip() for ln in f if ln.startswith("model name")), "")
    versions = {"python": platform.python_version()}
    for pkg in ("torch", "fastapi", "uvicorn", "numpy"):
        with contextlib.suppress(md.PackageNotFoundError):
            versions[pkg] = md.version(pkg)
    return {"cpu": cpu, "cores": os.cpu_count(), "versions": versions}


def load(folder: Path) -> dict[str, dict]:
    """Every NAME.json of the folder, by NAME (run.json as "run")."""
    out = {}
    for p in sorted(folder.glob("*.json")):
        with contextlib.suppress(ValueError):
            out[p.stem] = json.loads(p.read_text())
    return out


def ratios(res: dict[str, dict]) -> list[dict]:
    """Each judged result as (what, measured, floor, ratio, target, higher_is_better, pass)."""
    rows: list[dict] = []

    def add(what: str, ratio: float, target: float, higher: bool = True, measured: str = "", floor: str = "") -> None:
        ok = ratio >= target if higher else ratio <= target
        rows.append({"what": what, "measured": measured, "floor": floor, "ratio": ratio, "target": target,
                     "higher": higher, "pass": ok})  # fmt: skip

    noop = res.get("noop", {})
    if "ratio" in noop:
        add(
            "GPU case: 2 front ends, no-op forward, bf16 v2 binary",
            noop["ratio"],
            noop["targets"]["ratio"],
            measured=f"{noop['service_rps']:,.0f} req/s",
            floor=f"FastAPI echo {noop['echo_rps']:,.0f} req/s",
        )
        floors = []  # the model process's floors that this run measured
        if "answer_copy_us" in noop:
            floors.append(f"the answer's copy alone {noop['answer_copy_us']:.1f} us")
        if "model_code_us" in noop:
            floors.append(f"the model process's code alone {noop['model_code_us']:.1f} us")
        if "model_code_paced" in noop:  # the same over its socket, back to back and at the service's pace
            p = noop["model_code_paced"]
            us = " / ".join(f"{v:.1f}" for v in p["us"])
            floors.append(
                f"over its socket, back to back / every {p['every_ms']:.1f} / {2 * p['every_ms']:.1f} ms {us} us"
            )
        measured = f"{noop['model_us_per_request']:.1f} us"
        if "model_us_per_batch" in noop:  # (bench/procs.py since 7ef893a) and what a batch of them cost it
            measured += f" ({noop['model_us_per_batch']:,.0f} us a batch of {noop['requests_per_batch']:.1f})"
        add(
            "GPU case: the model process's CPU a request (us)",
            noop["model_us_per_request"],
            noop["targets"]["model_us"],
            higher=False,
            measured=measured,
            floor="; ".join(floors),
        )
    front = res.get("front", {})
    cells = front.get("cells", [])  # every round's cells: each (server, variant) is judged by its median, as front.py

    def median_rps(server: str, variant: str) -> float | None:
        got = [c["rps"] for c in cells if c["server"] == server and c["variant"] == variant]
        return statistics.median(got) if got else None

    for server, variant, target in front.get("targets", []):  # bench/front.py's TARGETS
        label = f"front-bound {variant.replace('-', ' ')}, access log {'off' if server.endswith('nolog') else 'on'}"
        rps, echo = median_rps(server, variant), median_rps("fastapi-echo", variant)
        if rps is not None and echo is not None:
            add(label, rps / echo, target, measured=f"{rps:,.0f} req/s", floor=f"FastAPI echo {echo:,.0f} req/s")
    svc = res.get("service", {})
    if "floors" in svc:
        limit = svc["floors"]["serial_limit_rps"]
        for variant, target in (("base64 batch=32", 0.8), ("v2-binary batch=32", 0.85)):
            c = next((c for c in svc["cells"] if c["variant"] == variant and c["concurrency"] == 32), None)
            if c:
                add(f"real model, one core, c=32, {variant.split()[0]}", c["rps"] / limit, target,
                    measured=f"{c['rps']:,.0f} req/s", floor=f"serial limit {limit:,.0f} req/s")  # fmt: skip
    for t in res.get("core", {}).get("targets", []):
        add(f"forward pass, time: {t['target']}", t["ratio"], t["limit"], higher=False)
    return rows


def targets_table(res: dict[str, dict]) -> str:
    rows = ratios(res)
    if not rows:
        return "No judged results in this folder."
    lines = ["| result | measured | floor | ratio | target | |", "|---|---:|---|---:|---:|---|"]
    for r in rows:
        sign = ">=" if r["higher"] else "<="
        unit = "" if "(us)" in r["what"] else "x"
        lines.append(f"| {r['what']} | {r['measured']} | {r['floor']} | {r['ratio']:.2f}{unit} "
                     f"| {sign} {r['target']:g}{unit} | {'PASS' if r['pass'] else 'FAIL'} |")  # fmt: skip
    return "\n".join(lines)


def latency_points(res: dict[str, dict]) -> dict[str, list[tuple[int, float, float]]]:
    """Per protocol (a variant of the service benchmark): (concurrency, req/s, p99 ms), by concurrency."""
    out: dict[str, list[tuple[int, float, float]]] = {}
    for c in res.get("service", {}).get("cells", []):
        out.setdefault(c["variant"], []).append((c["concurrency"], c["rps"], c["p99_ms"]))
    return {k: sorted(v) for k, v in out.items()}


def _save(fig, path: Path) -> Path:
    """Lay ``fig`` out, write it to ``path`` (80 dpi) and free it."""
    import matplotlib.pyplot as plt

    fig.tight_layout()
    fig.savefig(path, dpi=80)
    plt.close(fig)
    return path


def plot(res: dict[str, dict], images: Path) -> list[Path]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    images.mkdir(parents=True, exist_ok=True)
    paths = []
    pts = latency_points(res)
    if pts:
        fig, ax = plt.subplots(figsize=(7, 4.2))
        for name, p in pts.items():
            ax.plot([x[1] for x in p], [x[2] for x in p], marker="o", label=name)
            for conc, rps, p99 in p:
                ax.annotate(f"c={conc}", (rps, p99), fontsize=6, xytext=(3, 3), textcoords="offset points")
        limit = res["service"].get("floors", {}).get("serial_limit_rps")
        if limit:
            ax.axvline(limit, color="black", linestyle=":", linewidth=0.8, label="serial limit 1/(t_row + t_echo)")
        ax.set(xscale="log", yscale="log", xlabel="throughput (req/s)", ylabel="p99 latency (ms)")
        ax.set_title("Latency against throughput, [1,128,512] float32, one core", fontsize=9)
        ax.grid(True, which="both", alpha=0.3)
        ax.legend(fontsize=6)
        paths.append(_save(fig, images / "bench-latency.png"))
    proto = res.get("protocols", {}).get("rows", [])
    if proto:  # bench/protocols.py: each protocol's throughput at each concurrency (perf_analyzer, wrk)
        fig, ax = plt.subplots(figsize=(7, 3.6))
        names = [k for k in proto[0] if k != "c"]
        for name in names:
            ax.plot([r["c"] for r in proto], [r[name] for r in proto], marker="o", label=name)
        ax.set(xscale="log", xlabel="concurrency", ylabel="throughput (req/s)")
        ax.set_xticks([r["c"] for r in proto], [str(r["c"]) for r in proto])
        shape = res["protocols"].get("shape")
        ax.set_title(f"Protocols on the real model, x {shape} float32, one core", fontsize=9)
        ax.grid(True, which="both", alpha=0.3)
        ax.legend(fontsize=7)
        paths.append(_save(fig, images / "bench-protocols.png"))
    rows = [r for r in ratios(res) if "(us)" not in r["what"]]
    if rows:
        fig, ax = plt.subplots(figsize=(8, 0.35 * len(rows) + 1.2))
        y = range(len(rows))
        ax.barh(y, [r["ratio"] for r in rows], color=["tab:green" if r["pass"] else "tab:red" for r in rows])
        ax.scatter([r["target"] for r in rows], y, marker="|", s=200, color="black", label="target", zorder=3)
        ax.axvline(1.0, color="gray", linewidth=0.8)
        ax.set_yticks(list(y), [r["what"] for r in rows], fontsize=6)
        ax.invert_yaxis()
        ax.set_xlabel("x its floor (forward pass: time ratio, lower is better; the rest: req/s, higher is better)",
                      fontsize=7)  # fmt: skip
        ax.legend(fontsize=6)
        paths.append(_save(fig, images / "bench-floors.png"))
    return paths


def section(res: dict[str, dict], images: list[Path], page_dir: Path) -> str:
    run = res.get("run", {})
    m = run.get("machine", {})
    v = m.get("versions", {})
    lines = [
        START,
        "<!-- generated by make bench-report (bench/page.py) from a results folder: edit the script, not this -->",
        "",
        "## The last standard run",
        "",
        f"`{run.get('command', 'bench/run.py')}` at git revision `{run.get('git', '?')}`, "
        f"{run.get('started', '?')}, {run.get('seconds', 0):.0f} s in all.",
        f"Machine: {m.get('cpu', '?')}, {m.get('cores', '?')} cores (shared with other work: ratios measured "
        f"side by side in one run are what counts). Versions: " + ", ".join(f"{k} {val}" for k, val in v.items()) + ".",
        "",
        targets_table(res),
        "",
    ]
    for name, b in run.get("benchmarks", {}).items():
        if b.get("status") != "ok":
            lines.append(f"- `{name}`: {b.get('status')}{': ' + b['reason'] if 'reason' in b else ''}")
    lines.append("")
    for p in images:
        rel = os.path.relpath(p, page_dir)
        lines += [f"![{p.stem}]({rel})", ""]
    lines.append(END)
    return "\n".join(lines)


def write_page(page: Path, text: str) -> None:
    """Replace the generated section (or append it once, with its markers)."""
    old = page.read_text() if page.exists() else "# Performance\n"
    if START in old and END in old:
        head, rest = old.split(START, 1)
        new = head + text + rest.split(END, 1)[1]
    else:
        new = old.rstrip("\n") + "\n\n" + text + "\n"
    page.write_text(new)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("results", nargs="?", type=Path, default=ROOT / "bench-results")
    ap.add_argument("--page", type=Path, default=ROOT / "docs" / "performance.md")
    ap.add_argument("--images", type=Path, default=ROOT / "docs" / "images")
    args = ap.parse_args(argv)
    res = load(args.results)
    if "run" not in res:
        print(f"{args.results}: no run.json (make bench writes it)", file=sys.stderr)
        return 2
    images = plot(res, args.images)
    write_page(args.page, section(res, images, args.page.parent))
    print(f"wrote {args.page} and {', '.join(str(p) for p in images)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

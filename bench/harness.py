"""The benchmarks' harness: servers as subprocesses on 127.0.0.1, the cores they run on, the CPU they take, wrk.

One server starter for every benchmark (``Server``): mha-serve from this checkout or an exported older one, or
any ASGI app under uvicorn, on a free port, optionally pinned to a core, in its own process group, its output
in a log file. Every server started here is stopped when the driver exits (``stop_all``, also at exit), so
none outlives a benchmark that failed half-way.

Measuring on a shared machine: per-process CPU time from /proc (``proc_cpu_s``, ``main_thread_cpu_s``),
per-core busy time (``core_busy``), ``wait_idle`` (a server still working through the requests of clients
that are gone must not pollute the next run), and ``Quiet``, the gate that waits for other processes to leave
the cores. ``run_wrk`` drives one run of wrk with bench/wrk/post_body.lua, whose ``done()`` prints exact
percentiles and error counts as one JSON line.

The comparison with an earlier revision is one option, the same in every benchmark that starts mha-serve:
``--against REV`` (``add_against``) exports REV with ``git archive`` (``export_tree``) and runs it beside this
checkout, in the same run, with the same settings.
"""

from __future__ import annotations

import argparse
import atexit
import contextlib
import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
LUA = ROOT / "bench" / "wrk" / "post_body.lua"
SERVER_CORE, CLIENT_CORE = 0, 1  # servers on core 0; wrk and the driver on core 1
CLK_TCK = os.sysconf("SC_CLK_TCK")
# What the edge benchmarks (stall, memory, shutdown, priorities, procs) run mha-serve with unless told otherwise
QUIET_SERVICE = {"MHA_TORCH_THREADS": "1", "MHA_LOG_LEVEL": "warning", "MHA_ACCESS_LOG": "false"}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def http(method: str, url: str, body: bytes | None = None, headers: dict | None = None, timeout: float = 30.0):
    """One request with the standard library: (status, headers, body); an HTTP error status is an answer."""
    req = urllib.request.Request(url, data=body, method=method, headers=headers or {})
    try:
        with urllib.request.urlopen(req, timeout=timeout) as r:
            return r.status, dict(r.headers), r.read()
    except urllib.error.HTTPError as e:
        return e.code, dict(e.headers), e.read()


def add_against(ap: argparse.ArgumentParser) -> None:
    """The one way a benchmark compares with an earlier revision: ``--against REV`` (none by default)."""
    ap.add_argument(
        "--against",
        metavar="REV",
        help="also run mha-serve from this git revision (exported with git archive), beside this checkout; "
        "'merge-base' is the merge-base of HEAD and main",
    )


def export_tree(rev: str, into: Path) -> str:
    """REV's files (``git archive``) extracted into ``into``; its short commit. ``merge-base``: of HEAD and main."""
    if rev == "merge-base":
        rev = git("merge-base", "HEAD", "main")
    commit = git("rev-parse", "--short", rev)
    archive = subprocess.run(["git", "archive", commit], cwd=ROOT, capture_output=True, check=True).stdout
    into.mkdir(parents=True, exist_ok=True)
    subprocess.run(["tar", "-x", "-C", str(into)], input=archive, check=True)
    return commit


def git(*args: str) -> str:
    return subprocess.run(["git", *args], cwd=ROOT, capture_output=True, text=True, check=True).stdout.strip()


# -- processes --------------------------------------------------------------------------------------------

_PROCS: list[subprocess.Popen] = []


def stop_process(proc: subprocess.Popen, grace_s: float = 10.0) -> None:
    """SIGTERM to the process's group (it was started in its own session), SIGKILL after ``grace_s``."""
    if proc.poll() is None:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(grace_s)
        except subprocess.TimeoutExpired:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(5)
    if proc in _PROCS:
        _PROCS.remove(proc)


def stop_all() -> None:
    """Every server started here and still running: no server outlives the driver."""
    for proc in list(_PROCS):
        stop_process(proc, grace_s=3.0)


atexit.register(stop_all)


def wait_ready(proc: subprocess.Popen, base: str, path: str, timeout_s: float = 180.0) -> float:
    """Poll ``base + path`` until it answers 200; the seconds it took. Raises if the process exits first."""
    t0 = time.monotonic()
    while time.monotonic() - t0 < timeout_s:
        if proc.poll() is not None:
            raise RuntimeError(f"server exited with {proc.returncode} before it was ready (see its log)")
        with contextlib.suppress(OSError):
            if http("GET", base + path, timeout=2)[0] == 200:
                return time.monotonic() - t0
        time.sleep(0.2)
    raise RuntimeError(f"server not ready after {timeout_s:.0f} s")


class Server:
    """A server on 127.0.0.1 at a free port, in its own process group, its output in ``log``.

    By default mha-serve (``python -m service.cli``) run from ``source``: this checkout, or an older one
    exported with ``git archive`` (its own code, not this one's: PYTHONPATH is ``source`` alone), with
    ``defaults`` (one torch thread, warnings only, no access log) under ``env``. ``argv`` runs anything else
    that takes ``--host``/``--port`` (uvicorn with bench/echo_app.py, say). ``core`` pins it with taskset.
    ``drop_env``: prefixes of the driver's variables it does not inherit (``("MHA_", "OTEL_")``: only ``env``
    configures it, whatever the shell exported).
    The constructor waits for ``ready_path`` unless ``wait=False``: start several, then ``wait_ready`` each,
    so that they start side by side.
    """

    def __init__(
        self,
        env: Mapping[str, str],
        log: Path,
        source: Path = ROOT,
        *,
        argv: Sequence[str] | None = None,
        core: int | None = None,
        ready_path: str = "/readyz",
        defaults: Mapping[str, str] = QUIET_SERVICE,
        drop_env: tuple[str, ...] = (),
        wait: bool = True,
        ready_timeout_s: float = 180.0,
    ) -> None:
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.log = log
        self.ready_path = ready_path
        inherited = {k: v for k, v in os.environ.items() if not k.startswith(drop_env)} if drop_env else os.environ
        full = {**inherited, **defaults, **env, "PYTHONUNBUFFERED": "1", "PYTHONPATH": str(source)}
        cmd = [*(argv or (sys.executable, "-m", "service.cli")), "--host", "127.0.0.1", "--port", str(self.port)]
        if core is not None:
            cmd = ["taskset", "-c", str(core), *cmd]
        log.parent.mkdir(parents=True, exist_ok=True)
        with open(log, "wb") as f:  # the child keeps its own copy of the descriptor
            self.proc = subprocess.Popen(
                cmd, cwd=source, env=full, stdout=f, stderr=subprocess.STDOUT, start_new_session=True
            )
        _PROCS.append(self.proc)
        if wait:
            self.wait_ready(ready_timeout_s)

    @property
    def pid(self) -> int:
        return self.proc.pid

    def wait_ready(self, timeout_s: float = 180.0) -> float:
        """Seconds until ``ready_path`` answered 200. If it never does, stops the server and raises with the
        log's tail."""
        try:
            return wait_ready(self.proc, self.url, self.ready_path, timeout_s)
        except RuntimeError as e:
            self.stop(5)
            tail = self.log.read_text(errors="replace")[-2000:] if self.log.exists() else ""
            raise RuntimeError(f"{e}; {self.log}:\n{tail}") from None

    def stop(self, timeout: float = 60) -> int:
        """SIGTERM to the server alone (as an orchestrator sends it; a supervisor passes it on), then SIGKILL
        to its whole group after ``timeout``. Returns the exit code."""
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait(5)
        if self.proc in _PROCS:
            _PROCS.remove(self.proc)
        return self.proc.returncode

    def rss_bytes(self) -> int:
        """Resident memory of the server and its children (decode processes, front ends, the model process)."""
        return sum(self.rss_split())

    def rss_split(self) -> tuple[int, int]:
        """(the server process, its children together)."""
        return rss(self.proc.pid), sum(rss(pid) for pid in children(self.proc.pid))


def model_process(pid: int) -> int | None:
    """The one descendant of ``pid`` that loaded torch: the model process of ``MHA_ENGINE=process``."""
    for kid in children(pid):
        try:
            with open(f"/proc/{kid}/maps") as f:
                if "libtorch" in f.read():
                    return kid
        except OSError:
            continue
    return None


# -- CPU, memory, cores -----------------------------------------------------------------------------------


def stat_cpu(path: str) -> tuple[str, float, float]:
    """A /proc stat file's process or thread name, its user and its system CPU seconds."""
    with open(path) as f:
        head, tail = f.read().rsplit(")", 1)
    fields = tail.split()
    return head.split("(", 1)[1], int(fields[11]) / CLK_TCK, int(fields[12]) / CLK_TCK


def proc_cpu_s(pid: int) -> float:
    """utime + stime of the process (all its threads), seconds."""
    _, user, system = stat_cpu(f"/proc/{pid}/stat")
    return user + system


def run_time_s(pid: int) -> float:
    """The time the scheduler ran the process's live threads, seconds, to the nanosecond (each thread's
    /proc/.../schedstat), where ``proc_cpu_s`` counts in clock ticks (10 ms): for a short run, or one whose
    process runs in bursts of a few hundred us."""
    total = 0
    for tid in os.listdir(f"/proc/{pid}/task"):
        with contextlib.suppress(FileNotFoundError), open(f"/proc/{pid}/task/{tid}/schedstat") as f:  # (or ended)
            total += int(f.read().split()[0])
    return total / 1e9


def threads_cpu_s(pid: int) -> dict[str, tuple[float, float]]:
    """Each thread's (user, system) CPU seconds, by its OS name (threads of one name summed; the main thread as
    "main (event loop)"): the service's threads carry theirs (mha-forward-0, mha-watchdog...)."""
    out: dict[str, tuple[float, float]] = {}
    for tid in os.listdir(f"/proc/{pid}/task"):
        try:
            name, user, system = stat_cpu(f"/proc/{pid}/task/{tid}/stat")
        except FileNotFoundError:  # (a thread that ended)
            continue
        if tid == str(pid):
            name = "main (event loop)"
        u, s = out.get(name, (0.0, 0.0))
        out[name] = (u + user, s + system)
    return out


def tree_cpu_s(pid: int, leave_out: int | None = None) -> float:
    """CPU seconds of ``pid`` and its descendants, but ``leave_out`` (the model process, counted on its own)."""
    total = 0.0
    for p in [pid, *children(pid)]:
        if p != leave_out:
            with contextlib.suppress(OSError):  # (gone meanwhile)
                total += proc_cpu_s(p)
    return total


def main_thread_cpu_s(pid: int) -> float:
    """utime + stime of the process's main thread (the event loop), seconds."""
    _, user, system = stat_cpu(f"/proc/{pid}/task/{pid}/stat")
    return user + system


# libc's copy functions: in the model process with the no-op forward, nearly all of it is the answers' copy into
# their arenas (docs/performance.md, perf by symbol); on a GPU host the device's DMA writes them instead
COPY_SYMBOLS = ("__memmove", "__memcpy", "memcpy", "memmove")


class PerfShare:
    """The share of a process's CPU samples spent in some functions, from ``perf record`` over a stretch of time
    (``with PerfShare(pid) as p: ...`` then ``p.share(...)``): where a process's CPU went, measured in place (a
    profiler in the process would change what it measures). ``share`` is None where there is no process (``pid``
    None), perf is missing, or it may not read the process (perf_event_paranoid, a container without it): the
    caller then prints nothing of it."""

    def __init__(self, pid: int | None, hz: int = 499) -> None:
        self.pid, self.hz = pid, hz
        self._dir: Any = None
        self._proc: subprocess.Popen | None = None
        self._report: str | None = None  # perf report's text, read when the recording ends

    def __enter__(self) -> PerfShare:
        import shutil
        import tempfile

        if self.pid is None or shutil.which("perf") is None:
            return self
        self._dir = tempfile.TemporaryDirectory(prefix="bench-perf-")
        cmd = ["perf", "record", "-q", "-F", str(self.hz), "-p", str(self.pid), "-o", f"{self._dir.name}/perf.data"]
        self._proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        return self

    def __exit__(self, *exc: object) -> None:
        if self._proc is None:
            return
        self._proc.send_signal(signal.SIGINT)  # (perf writes its file and stops)
        try:
            self._proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            self._proc.kill()
            self._proc.wait()
        # (perf record writes its file at a SIGINT, then ends by that signal, as a shell expects of it)
        if self._proc.returncode in (0, -signal.SIGINT):
            self._report = subprocess.run(
                ["perf", "report", "-i", f"{self._dir.name}/perf.data", "--stdio", "--no-children", "--sort", "sym"],
                capture_output=True,
                text=True,
            ).stdout
        self._dir.cleanup()

    def share(self, symbols: Sequence[str]) -> float | None:
        """The fraction of the samples whose function's name starts with one of ``symbols``."""
        return None if self._report is None else report_share(self._report, symbols)


def report_share(report: str, symbols: Sequence[str]) -> float | None:
    """From ``perf report --stdio --no-children --sort sym``'s text: the fraction of the samples in functions whose
    name starts with one of ``symbols`` (None: no samples)."""
    total = mine = 0.0
    for line in report.splitlines():
        parts = line.split()  # "    35.61%  [.] __memmove_avx_unaligned_erms"
        if len(parts) < 3 or not parts[0].endswith("%") or parts[1] not in ("[.]", "[k]"):
            continue
        pct = float(parts[0][:-1])
        total += pct
        if parts[2].startswith(tuple(symbols)):
            mine += pct
    return mine / total if total > 0 else None


def rss(pid: int) -> int:
    """Resident memory of one process, bytes (0 once it is gone)."""
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    return 0


def children(pid: int) -> list[int]:
    """Every descendant of ``pid``, depth first."""
    out = []
    try:
        for tid in os.listdir(f"/proc/{pid}/task"):
            kids = Path(f"/proc/{pid}/task/{tid}/children").read_text().split()
            for k in kids:
                out += [int(k), *children(int(k))]
    except OSError:
        pass
    return out


def pin_all_threads(pid: int, core: int) -> None:
    """Pin every thread the process has now (taskset -a) to ``core``."""
    subprocess.run(["taskset", "-apc", str(core), str(pid)], check=True, capture_output=True)


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


def busy_between(before: dict[int, tuple[float, float]], after: dict[int, tuple[float, float]]) -> dict[int, float]:
    """Per core: the share of the time between two ``core_busy`` readings that it was busy (0..1)."""
    return {k: (after[k][0] - before[k][0]) / max(1, after[k][1] - before[k][1]) for k in after if k in before}


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
            share = busy_between(a, b)
            busy = {k: share[k] for k in (SERVER_CORE, CLIENT_CORE)}
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


# -- load -------------------------------------------------------------------------------------------------


def run_wrk(
    url: str,
    body_file: Path,
    content_type: str,
    headers: Mapping[str, str],
    conc: int,
    duration: float,
    *,
    threads: int = 1,
    core: int | None = CLIENT_CORE,
    timeout_extra_s: float = 90.0,
) -> dict:
    """One run of ``wrk -t<threads> -c<conc> -d<duration>`` POSTing the body in ``body_file``, pinned to ``core``
    (None: not pinned). Returns the JSON of post_body.lua's ``done()``: requests, duration_us, p50_us, p90_us,
    p99_us, lat_mean_us, lat_max_us and the error counts err_connect/read/write/status/timeout."""
    env = {
        **os.environ,
        "BODY_FILE": str(body_file),
        "CONTENT_TYPE": content_type,
        "WRK_HEADERS": "|".join(f"{k}: {val}" for k, val in headers.items()),
    }
    argv = ["wrk", f"-t{threads}", f"-c{conc}", f"-d{duration:g}s", "--timeout", "30s", "--latency", "-s", str(LUA)]
    if core is not None:
        argv = ["taskset", "-c", str(core), *argv]
    r = subprocess.run([*argv, url], env=env, capture_output=True, text=True, timeout=duration + timeout_extra_s)
    for line in r.stdout.splitlines():
        if line.startswith("WRK_JSON "):
            return json.loads(line[len("WRK_JSON ") :])
    raise RuntimeError(f"wrk gave no WRK_JSON line (rc {r.returncode}):\n{r.stdout}\n{r.stderr}")


def wrk_errors(raw: dict) -> int:
    """Every failed request of a wrk run: non-2xx answers and socket errors (connect, read, write, timeout)."""
    return sum(raw[k] for k in ("err_connect", "err_read", "err_write", "err_status", "err_timeout"))

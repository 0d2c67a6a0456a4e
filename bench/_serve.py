"""Helpers of the edge benchmarks (stall.py, memory.py, shutdown.py): start mha-serve, read its RSS."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx

ROOT = Path(__file__).resolve().parent.parent


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Server:
    """``python -m service.cli`` on 127.0.0.1 from ``source`` (this checkout, or an exported older one)."""

    def __init__(self, env: dict[str, str], log: Path, source: Path = ROOT) -> None:
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        full = {**os.environ, "MHA_TORCH_THREADS": "1", "MHA_LOG_LEVEL": "warning", "MHA_ACCESS_LOG": "false", **env}
        full["PYTHONPATH"] = str(source)
        log.parent.mkdir(parents=True, exist_ok=True)
        self.log = log
        with open(log, "w") as f:
            self.proc = subprocess.Popen(
                [sys.executable, "-m", "service.cli", "--host", "127.0.0.1", "--port", str(self.port)],
                cwd=source,
                env=full,
                stdout=f,
                stderr=subprocess.STDOUT,
            )
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"mha-serve exited {self.proc.returncode}: {log.read_text()[-2000:]}")
            try:
                if httpx.get(self.url + "/readyz", timeout=1).status_code == 200:
                    return
            except httpx.HTTPError:
                pass
            time.sleep(0.2)
        self.stop()
        raise RuntimeError("mha-serve not ready in 120 s")

    def stop(self, timeout: float = 60) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        return self.proc.returncode

    def rss_bytes(self) -> int:
        """Resident memory of the server and its children (the decode processes)."""
        return sum(self.rss_split())

    def rss_split(self) -> tuple[int, int]:
        """(the server process, its children together)."""
        return _rss(self.proc.pid), sum(_rss(pid) for pid in _children(self.proc.pid))


def _rss(pid: int) -> int:
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    return 0


def _children(pid: int) -> list[int]:
    out = []
    try:
        for tid in os.listdir(f"/proc/{pid}/task"):
            kids = Path(f"/proc/{pid}/task/{tid}/children").read_text().split()
            for k in kids:
                out += [int(k), *_children(int(k))]
    except OSError:
        pass
    return out


def percentile(values: list[float], q: float) -> float:
    if not values:
        return float("nan")
    s = sorted(values)
    return s[min(len(s) - 1, round(q / 100 * (len(s) - 1)))]


def lists_body(shape: tuple[int, int, int], seed: int = 0) -> bytes:
    """x as nested JSON lists of float64 reprs (~19 characters a number, as json.dumps writes them)."""
    import numpy as np
    import orjson

    x = np.random.default_rng(seed).standard_normal(shape)
    return orjson.dumps({"x": x.tolist()})

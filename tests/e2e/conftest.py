"""A real uvicorn (``mha-serve``) on 127.0.0.1, started as a subprocess and stopped by its PID."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass

import httpx
import pytest

from mha_core import MHAConfig, MultiHeadAttention

TINY_ENV = {"MHA_NUM_HEADS": "4", "MHA_EMB_SIZE": "32", "MHA_HEAD_SIZE": "8", "MHA_MAX_SEQ_LEN": "64"}


def builtin_model() -> MultiHeadAttention:
    """What ``start_server``'s server builds with no checkpoint (TINY_ENV, seed 0): the reference answers."""
    return MultiHeadAttention.from_seed(MHAConfig(4, 32, 8, 64), seed=0).eval()


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@dataclass
class Server:
    proc: subprocess.Popen
    url: str
    log_path: str
    grpc_port: int = 0

    @property
    def grpc_url(self) -> str:
        return f"127.0.0.1:{self.grpc_port}"

    def log(self) -> str:
        with open(self.log_path, errors="replace") as f:
            return f.read()

    def stop(self, sig: int = signal.SIGTERM, timeout: float = 30) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(sig)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        return self.proc.returncode


def start_server(tmp_path, env: dict[str, str] | None = None, ready_timeout: float = 60) -> Server:
    port = free_port()
    log_path = str(tmp_path / f"server-{port}.log")
    full_env = {
        **os.environ,
        **TINY_ENV,
        "MHA_WARMUP": "false",
        "MHA_TORCH_THREADS": "1",
        "MHA_GRPC_PORT": str(free_port()),
        **(env or {}),
    }
    with open(log_path, "w") as log:
        proc = subprocess.Popen(
            [sys.executable, "-m", "service.cli", "--host", "127.0.0.1", "--port", str(port)],
            env=full_env,
            stdout=log,
            stderr=subprocess.STDOUT,
        )
    server = Server(proc, f"http://127.0.0.1:{port}", log_path, int(full_env["MHA_GRPC_PORT"]))
    deadline = time.monotonic() + ready_timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"mha-serve exited with {proc.returncode}:\n{server.log()}")
        try:
            if httpx.get(server.url + "/readyz", timeout=1).status_code == 200:
                return server
        except httpx.HTTPError:
            pass
        time.sleep(0.1)
    server.stop(signal.SIGKILL)
    raise RuntimeError(f"mha-serve not ready after {ready_timeout} s:\n{server.log()}")


@pytest.fixture(params=["1", "2"], ids=["workers1", "workers2"])
def server(tmp_path, request) -> Iterator[Server]:
    """Each test twice: one process, and two front-end processes feeding a model process (service/engine/)."""
    s = start_server(tmp_path, {"MHA_WORKERS": request.param})
    try:
        yield s
    finally:
        s.stop()

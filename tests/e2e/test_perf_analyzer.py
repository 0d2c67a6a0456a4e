"""Triton's perf_analyzer against a real mha-serve: HTTP and gRPC, sync and async, concurrency 1 and 8.

perf_analyzer comes from bench/perf_analyzer.sh (`make perf-analyzer`). Without it these tests
skip, unless MHA_REQUIRE_PERF_ANALYZER=1 (CI sets it), where a missing perf_analyzer fails.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from .conftest import Server, start_server

ROOT = Path(__file__).resolve().parents[2]
PERF_ANALYZER = Path(os.environ.get("MHA_PERF_ANALYZER", ROOT / ".cache/perf_analyzer/perf_analyzer"))
sys.path.insert(0, str(ROOT / "bench"))
from perf_input import input_data  # noqa: E402


@pytest.fixture(scope="module")
def perf_analyzer() -> Path:
    if PERF_ANALYZER.is_file() and os.access(PERF_ANALYZER, os.X_OK):
        return PERF_ANALYZER
    message = f"perf_analyzer not found at {PERF_ANALYZER}: run `make perf-analyzer` (bench/perf_analyzer.sh)"
    if os.environ.get("MHA_REQUIRE_PERF_ANALYZER") == "1":
        pytest.fail(message + " (MHA_REQUIRE_PERF_ANALYZER=1)")
    pytest.skip(message)


@pytest.fixture(scope="module")
def server(tmp_path_factory) -> Iterator[Server]:
    s = start_server(tmp_path_factory.mktemp("perf"), {"MHA_ACCESS_LOG": "false"})
    yield s
    assert s.stop() == 0


@pytest.fixture(scope="module")
def data_file(server, tmp_path_factory) -> Path:
    cfg = httpx.get(server.url + "/v2/models/mha/config").json()
    path = tmp_path_factory.mktemp("perf-data") / "input.json"
    path.write_text(json.dumps(input_data(cfg, seq_len=16, count=3)))
    return path


def _stats(server: Server) -> dict:
    return httpx.get(server.url + "/v2/models/mha/stats").json()["model_stats"][0]["inference_stats"]


@pytest.mark.parametrize(
    ("protocol", "mode"), [("http", "sync"), ("http", "async"), ("grpc", "sync"), ("grpc", "async")]
)
def test_perf_analyzer_runs_without_errors(perf_analyzer, server, data_file, tmp_path, protocol, mode):
    before = _stats(server)
    url = server.url.removeprefix("http://") if protocol == "http" else server.grpc_url
    csv = tmp_path / "perf.csv"
    cmd = [
        str(perf_analyzer),
        *("-m", "mha", "-i", protocol, "-u", url, "--input-data", str(data_file)),
        *(["--async"] if mode == "async" else []),
        *("--concurrency-range", "1:8:7", "--measurement-interval", "1000"),
        *("--stability-percentage", "1000", "--max-trials", "3", "-f", str(csv)),
    ]
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=180)
    out = r.stdout + r.stderr
    assert r.returncode == 0, out
    assert "error" not in out.lower(), out
    assert "Concurrency: 1, throughput" in out and "Concurrency: 8, throughput" in out, out
    # its server-side figures come from the statistics route (queue, compute input/infer/output)
    assert "Server:" in out and "+ queue " in out and "+ compute infer " in out, out
    rows = csv.read_text().splitlines()
    assert len(rows) == 3 and float(rows[1].split(",")[1]) > 0 and float(rows[2].split(",")[1]) > 0, rows
    after = _stats(server)
    assert after["fail"]["count"] == before["fail"]["count"]  # zero errors on the server's side too
    assert after["success"]["count"] > before["success"]["count"]

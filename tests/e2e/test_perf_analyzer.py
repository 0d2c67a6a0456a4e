"""Triton's perf_analyzer against a real mha-serve: HTTP and gRPC, sync and async, concurrency 1 and 8;
and its sequence mode (`--sequence-length 32`) against `mha-seq` over both protocols.

perf_analyzer comes from bench/perf_analyzer.sh (`make perf-analyzer`). Without it these tests
skip, unless MHA_REQUIRE_PERF_ANALYZER=1 (CI sets it), where a missing perf_analyzer fails.
"""

from __future__ import annotations

import json
import os
import re
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


@pytest.fixture(scope="module")
def seq_data_file(server, tmp_path_factory) -> Path:
    # a step takes x alone (lengths and attn_mask are refused on a step): one row each, a decode step
    cfg = httpx.get(server.url + "/v2/models/mha-seq/config").json()
    path = tmp_path_factory.mktemp("perf-seq-data") / "input.json"
    path.write_text(json.dumps(input_data(cfg, seq_len=1, count=3, optional=False)))
    return path


def _stats(server: Server, model: str = "mha") -> dict:
    return httpx.get(f"{server.url}/v2/models/{model}/stats").json()["model_stats"][0]["inference_stats"]


def _metric(server: Server, name: str) -> float:
    text = httpx.get(server.url + "/metrics").text
    m = re.search(rf"^{re.escape(name)} (\S+)$", text, re.M)
    assert m, f"no {name} in /metrics"
    return float(m.group(1))


def _run(perf_analyzer, server, protocol: str, model: str, data_file, csv, *args: str) -> str:
    """perf_analyzer at concurrency 1 and 8 against ``model``: its output, once it ran without an error and wrote a
    throughput for both concurrencies in ``csv``."""
    url = server.url.removeprefix("http://") if protocol == "http" else server.grpc_url
    cmd = [
        str(perf_analyzer),
        *("-m", model, "-i", protocol, "-u", url, "--input-data", str(data_file), *args),
        *("--concurrency-range", "1:8:7", "--measurement-interval", "1000"),
        *("--stability-percentage", "1000", "--max-trials", "3", "-f", str(csv)),
    ]
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=180)
    out = r.stdout + r.stderr
    assert r.returncode == 0, out
    assert "error" not in out.lower(), out
    assert "Concurrency: 1, throughput" in out and "Concurrency: 8, throughput" in out, out
    rows = csv.read_text().splitlines()
    assert len(rows) == 3 and float(rows[1].split(",")[1]) > 0 and float(rows[2].split(",")[1]) > 0, rows
    return out


@pytest.mark.parametrize(
    ("protocol", "mode"), [("http", "sync"), ("http", "async"), ("grpc", "sync"), ("grpc", "async")]
)
def test_perf_analyzer_runs_without_errors(perf_analyzer, server, data_file, tmp_path, protocol, mode):
    before = _stats(server)
    out = _run(
        perf_analyzer,
        server,
        protocol,
        "mha",
        data_file,
        tmp_path / "perf.csv",
        *(["--async"] if mode == "async" else []),
    )
    # its server-side figures come from the statistics route (queue, compute input/infer/output)
    assert "Server:" in out and "+ queue " in out and "+ compute infer " in out, out
    after = _stats(server)
    assert after["fail"]["count"] == before["fail"]["count"]  # zero errors on the server's side too
    assert after["success"]["count"] > before["success"]["count"]


SEQUENCE_LENGTH = 32


@pytest.mark.parametrize("protocol", ["http", "grpc"])
def test_perf_analyzer_sequences_without_errors(perf_analyzer, server, seq_data_file, tmp_path, protocol):
    """perf_analyzer sees mha-seq's sequence_batching and drives sequences: every request carries
    sequence_id with start on the first step and end on the last, a step without start for an id the
    server does not hold would fail, so zero failures means the flags arrived in order."""
    before = _stats(server, "mha-seq")
    steps_before = _metric(server, "mha_sequence_steps_per_forward_sum")
    out = _run(
        perf_analyzer,
        server,
        protocol,
        "mha-seq",
        seq_data_file,
        tmp_path / "perf.csv",
        "--sequence-length",
        str(SEQUENCE_LENGTH),
    )
    # per window, requests over sequences: about the sequence length (perf_analyzer varies it by +/- 20%;
    # a window cuts sequences at both ends)
    windows = re.findall(r"Request count: (\d+)\s+Sequence count: (\d+)", out)
    assert len(windows) == 2, out
    for requests, sequences in windows:
        assert (
            int(sequences) > 0 and 0.6 * SEQUENCE_LENGTH <= int(requests) / int(sequences) <= 1.4 * SEQUENCE_LENGTH
        ), out
    after = _stats(server, "mha-seq")
    assert after["fail"]["count"] == before["fail"]["count"]  # zero errors on the server's side too
    served = after["success"]["count"] - before["success"]["count"]
    assert served > 0
    # every request was a step of a sequence the server held, and every sequence was ended (its cache freed)
    assert _metric(server, "mha_sequence_steps_per_forward_sum") - steps_before == served
    assert _metric(server, "mha_sequences_active") == 0

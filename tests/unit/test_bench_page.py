"""bench/run.py and bench/page.py on fixed results: the judged ratios follow from the numbers, the page's generated
section is replaced (not stacked) and says what made it, and the standard set's plan is what make bench runs."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import pytest

from bench import page, run
from bench.harness import add_against

# as bench/front.py writes its TARGETS into front.json
FRONT_TARGETS = [
    ["branch-split-nolog", "v2-binary", 1.0],
    ["branch-split", "v2-binary", 0.95],
    ["branch-split-nolog", "base64", 0.8],
    ["branch-split", "base64", 0.8],
]


def results() -> dict[str, dict]:
    cells = [
        {"server": "fastapi-echo", "variant": "v2-binary", "rps": 1000.0},
        {"server": "fastapi-echo", "variant": "base64", "rps": 800.0},
        {"server": "branch-split-nolog", "variant": "v2-binary", "rps": 1020.0},  # 1.02x: passes 1.0
        {"server": "branch-split", "variant": "v2-binary", "rps": 930.0},  # 0.93x: fails 0.95
        {"server": "branch-split-nolog", "variant": "base64", "rps": 800.0},
        {"server": "branch-split", "variant": "base64", "rps": 700.0},
    ]
    svc_cells = [
        {"variant": "base64 batch=32", "concurrency": 32, "rps": 360.0, "p99_ms": 90.0},
        {"variant": "base64 batch=32", "concurrency": 1, "rps": 300.0, "p99_ms": 4.0},
        {"variant": "v2-binary batch=32", "concurrency": 32, "rps": 400.0, "p99_ms": 80.0},
    ]
    return {
        "run": {"command": "bench/run.py --quick", "git": "abc1234", "started": "2026-12-07 10:00:00", "seconds": 99,
                "machine": {"cpu": "AMD EPYC", "cores": 2, "versions": {"python": "3.11", "torch": "2.13"}},
                "benchmarks": {"protocols": {"status": "skipped", "reason": "perf_analyzer not installed"}}},
        "noop": {"ratio": 0.5, "service_rps": 1000.0, "echo_rps": 2000.0, "model_us_per_request": 12.0,
                 "answer_copy_us": 7.5, "model_code_us": 11.5, "model_code_copy_us": 4.0,
                 "targets": {"ratio": 0.8, "model_us": 15.0}},
        "front": {"cells": cells, "targets": FRONT_TARGETS},
        "service": {"floors": {"serial_limit_rps": 500.0}, "cells": svc_cells},
        "core": {"targets": [{"target": "output path <= 0.9x nn.MHA at 1x128", "ratio": 0.8, "limit": 0.9}]},
    }  # fmt: skip


def test_each_result_is_judged_against_its_floor_and_target() -> None:
    got = {r["what"]: r for r in page.ratios(results())}
    noop = got["GPU case: 2 front ends, no-op forward, bf16 v2 binary"]
    assert noop["ratio"] == 0.5 and noop["pass"] is False
    model = got["GPU case: the model process's CPU a request (us)"]
    assert model["pass"] is True  # 12 <= 15, lower is better
    assert model["floor"] == "the answer's copy alone 7.5 us; the model process's code alone 11.5 us"
    assert model["measured"] == "12.0 us"  # (a run without the batch counts)
    res = results()
    res["noop"] |= {"model_us_per_batch": 1234.5, "requests_per_batch": 13.21}
    model = {r["what"]: r for r in page.ratios(res)}["GPU case: the model process's CPU a request (us)"]
    assert model["measured"] == "12.0 us (1,234 us a batch of 13.2)"
    res["noop"] |= {"model_code_paced": {"at_once": 13, "every_ms": 2.94, "us": [11.96, 18.2, 30.34]}}
    model = {r["what"]: r for r in page.ratios(res)}["GPU case: the model process's CPU a request (us)"]
    assert model["floor"].endswith("; over its socket, back to back / every 2.9 / 5.9 ms 12.0 / 18.2 / 30.3 us")
    assert got["front-bound v2 binary, access log off"]["ratio"] == pytest.approx(1.02)
    assert got["front-bound v2 binary, access log off"]["pass"] is True
    assert got["front-bound v2 binary, access log on"]["pass"] is False  # 0.93 < 0.95
    assert got["real model, one core, c=32, base64"]["ratio"] == pytest.approx(0.72)  # 360 / 500
    assert got["real model, one core, c=32, v2-binary"]["pass"] is False  # 0.80 < 0.85
    assert got["forward pass, time: output path <= 0.9x nn.MHA at 1x128"]["pass"] is True


def test_front_bound_rounds_are_judged_by_their_medians_as_front_py_judges_them() -> None:
    """front.json holds every round's cells: the service's and the echo's req/s are each their rounds' median (the
    upper of two rounds against the echo's last round read 0.97x where front.py printed 0.95x)."""
    res = results()
    res["front"]["cells"] = [
        {"server": "fastapi-echo", "variant": "v2-binary", "rps": 10_000.0},
        {"server": "branch-split-nolog", "variant": "v2-binary", "rps": 9_000.0},
        {"server": "branch-split-nolog", "variant": "v2-binary", "rps": 10_400.0},
        {"server": "fastapi-echo", "variant": "v2-binary", "rps": 10_800.0},
    ]
    got = {r["what"]: r for r in page.ratios(res)}["front-bound v2 binary, access log off"]
    assert got["ratio"] == pytest.approx(9_700 / 10_400)
    assert got["measured"] == "9,700 req/s" and got["floor"] == "FastAPI echo 10,400 req/s"
    assert got["pass"] is False


def test_the_table_prints_measured_floor_ratio_and_verdict() -> None:
    table = page.targets_table(results())
    row = "| front-bound v2 binary, access log on | 930 req/s | FastAPI echo 1,000 req/s | 0.93x | >= 0.95x | FAIL |"
    assert row in table
    floors = "the answer's copy alone 7.5 us; the model process's code alone 11.5 us"
    assert f"| 12.0 us | {floors} | 12.00 | <= 15 | PASS |" in table
    assert page.targets_table({}) == "No judged results in this folder."


def test_the_generated_section_replaces_the_old_one_and_keeps_the_prose(tmp_path: Path) -> None:
    md = tmp_path / "performance.md"
    md.write_text("# Performance\n\nProse kept by hand.\n\n" + page.START + "\nold figures\n" + page.END + "\nAfter.\n")
    images = [tmp_path / "images" / "bench-floors.png"]
    for _ in range(2):
        page.write_page(md, page.section(results(), images, tmp_path))
    text = md.read_text()
    assert text.count(page.START) == 1 and "old figures" not in text
    assert text.startswith("# Performance\n\nProse kept by hand.") and text.endswith("After.\n")
    assert "`bench/run.py --quick` at git revision `abc1234`" in text
    assert "AMD EPYC, 2 cores" in text and "torch 2.13" in text
    assert "- `protocols`: skipped: perf_analyzer not installed" in text
    assert "![bench-floors](images/bench-floors.png)" in text


def test_plots_are_written_from_the_results(tmp_path: Path) -> None:
    paths = page.plot(results(), tmp_path)
    assert [p.name for p in paths] == ["bench-latency.png", "bench-floors.png"]
    assert all(p.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and p.stat().st_size < 200_000 for p in paths)


def test_load_reads_every_json_file_by_name(tmp_path: Path) -> None:
    (tmp_path / "noop.json").write_text(json.dumps({"ratio": 0.9}))
    (tmp_path / "broken.json").write_text("{")
    assert page.load(tmp_path) == {"noop": {"ratio": 0.9}}


def test_the_standard_set_and_its_quick_form(tmp_path: Path) -> None:
    full, quick = run.plan(tmp_path, False, None), run.plan(tmp_path, True, "v1")
    assert list(full) == ["core", "front", "service", "protocols", "procs", "noop", "stall", "memory"]
    assert "--quick" in quick["core"][0] and "--quick" not in full["core"][0]
    assert full["service"][0][full["service"][0].index("--concurrency") + 1] == "1,8,32,64"
    assert quick["service"][0][quick["service"][0].index("--concurrency") + 1] == "1,32"
    assert quick["front"][0][-2:] == ["--against", "v1"] and "--against" not in full["front"][0]
    assert sum(limit for _, limit in quick.values()) < 40 * 60  # each bounded


def test_protocols_are_skipped_with_a_reason_without_perf_analyzer(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(run, "PERF_ANALYZER", Path("/nonexistent/perf_analyzer"))
    monkeypatch.setattr(run.shutil, "which", lambda tool: f"/usr/bin/{tool}")
    assert "perf_analyzer not installed" in run.skipped("protocols")
    assert run.skipped("front") is None
    monkeypatch.setattr(run.shutil, "which", lambda tool: None)
    assert "wrk not found" in run.skipped("front") and run.skipped("core") is None


def test_an_unknown_benchmark_is_refused_by_name(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    with pytest.raises(SystemExit):
        run.main(["--only", "core,nope", "--out", str(tmp_path)])
    assert "unknown benchmark(s) nope" in capsys.readouterr().err


def test_against_is_one_option() -> None:
    ap = argparse.ArgumentParser()
    add_against(ap)
    assert ap.parse_args([]).against is None and ap.parse_args(["--against", "main"]).against == "main"

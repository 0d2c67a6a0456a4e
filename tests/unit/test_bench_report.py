"""bench/service.py's floors, targets, table and notes on fixed cells: what a report says follows from the numbers."""

from __future__ import annotations

import pytest

from bench import report
from bench.measure import Cell, compute_floors

T_ROW = {"t_row_s": 0.003, "t_row_cpu_s": 0.0029, "t_batch1_s": 0.0035}


def cell(variant: str, family: str, conc: int, rps: float, p50: float, p99: float, **kw) -> Cell:
    return Cell(variant, family, "srv", conc, 2.0, requests=int(rps * 2), rps=rps, p50_ms=p50, p99_ms=p99, **kw)


def metrics(batch: float, fwd_ms: float, queue_ms: float) -> dict:
    """The service's own figures over a run (a cell of mha-serve has them; the echo and naive do not)."""
    return {"mean_batch": batch, "mean_compute_ms": fwd_ms, "mean_queue_ms": queue_ms}


def cells(b64_rps32: float = 270.0, b64_p99_32: float = 250.0, lists_rps: float = 130.0) -> list[Cell]:
    return [
        cell("base64 batch=32", "base64", 1, 300.0, 3.2, 4.0, cpu_ms_per_req=3.3, **metrics(1.0, 3.0, 0.05)),
        cell("base64 batch=32", "base64", 32, b64_rps32, 110.0, b64_p99_32, cpu_ms_per_req=3.2, **metrics(24, 80, 30)),
        cell("lists batch=32", "lists", 1, lists_rps, 7.5, 9.0, cpu_ms_per_req=7.0),
        cell("lists batch=32", "lists", 32, lists_rps, 240.0, 300.0, cpu_ms_per_req=7.2),
        cell("naive", "naive", 1, 40.0, 25.0, 30.0, cpu_ms_per_req=14.0),
        cell("naive", "naive", 32, 45.0, 700.0, 900.0, cpu_ms_per_req=15.0),
        cell("echo", "echo", 1, 5000.0, 0.18, 0.3, cpu_ms_per_req=0.1),
        cell("echo", "echo", 32, 8000.0, 4.0, 6.0, cpu_ms_per_req=0.1),
    ]


def test_floors_are_the_faster_t_row_and_the_echo_at_c1() -> None:
    f = compute_floors(cells(), T_ROW, {**T_ROW, "t_row_s": 0.004, "t_row_cpu_s": 0.0028})
    assert f["t_row_s"] == 0.003 and f["t_row_end_s"] == 0.004  # the smaller of start and end
    assert f["t_echo_s"] == pytest.approx(1 / 5000)
    assert f["serial_limit_rps"] == pytest.approx(1 / (0.003 + 0.0002))  # 312.5 req/s
    assert f["serial_limit_strict_rps"] == pytest.approx(1 / (0.003 + 1 / 8000))  # the echo's best throughput
    assert f["serial_limit_cpu_rps"] == pytest.approx(1 / (0.0028 + 0.0001))


def test_floors_need_the_echo_at_c1() -> None:
    with pytest.raises(ValueError, match="C=1"):
        compute_floors([c for c in cells() if c.concurrency != 1], T_ROW, T_ROW)


def test_targets_pass_and_fail_on_the_ratios() -> None:
    f = compute_floors(cells(), T_ROW, T_ROW)  # serial limit 312.5 req/s, t_row + t_echo 3.2 ms
    got = {t["target"][:2]: t for t in report.targets(cells(), f, [1, 32])}
    assert got["1a"]["pass"] is True and "= 0.86x" in got["1a"]["detail"]  # 270 / 312.5
    assert got["1b"]["pass"] is False and got["1b"]["detail"] == "p99 250.00 ms / p50 110.00 ms = 2.27x"
    assert got["2 "]["pass"] is True and "p50 3.20 ms / (t_row + t_echo) 3.20 ms = 1.00x" in got["2 "]["detail"]
    assert got["3 "]["pass"] is False  # 130 / 40 = 3.25x at C=1, but 130 / 45 = 2.89x at C=32
    assert got["3 "]["detail"] == "C=1: 130.0/40.0 = 3.25x; C=32: 130.0/45.0 = 2.89x"

    slow = report.targets(cells(b64_rps32=240.0, b64_p99_32=200.0, lists_rps=150.0), f, [1, 32])
    assert [t["pass"] for t in slow] == [False, True, True, True]  # 0.77x; p99 1.82x p50; lists 3.33x at least


def test_targets_not_measured_are_neither_pass_nor_fail() -> None:
    f = compute_floors(cells(), T_ROW, T_ROW)
    only_c1 = [c for c in cells() if c.concurrency == 1]
    res = report.targets(only_c1, f, [1])
    assert [t["pass"] for t in res] == [None, None, True, True]
    assert report.target_lines(res)[0].startswith("- N/A  1a base64 C=32")


def test_table_has_one_row_per_cell_with_its_numbers() -> None:
    lines = report.fmt_table(cells()).splitlines()
    assert len(lines) == 2 + len(cells())
    assert lines[0].count("|") == lines[1].count("|") == lines[2].count("|") == 15
    b64_32 = lines[3].split(" | ")
    assert b64_32[:6] == ["| base64 batch=32", "32", "270.0", "110.00", "250.00", "2.27"]
    assert b64_32[8:11] == ["24.0", "80.00", "30.00"]  # the service's batch, forward and queue metrics
    naive = lines[6].split(" | ")
    assert naive[8:11] == ["", "", ""]  # not a service: no metrics
    assert lines[8].startswith("| echo | 1 | 5,000.0 |")


def test_notes_name_errors_disturbed_runs_and_drift() -> None:
    cs = cells()
    cs[2].non2xx = 3
    cs[4].foreign0 = 0.4
    f = compute_floors(cs, T_ROW, {**T_ROW, "t_row_s": 0.0033})  # +10% drift
    notes = report.run_notes(cs, f, quiet_spent_s=12.0, quiet_budget_s=20.0)
    assert notes[0] == "runs with errors: lists batch=32 C=1"
    assert "naive C=1 (40% / 0%)" in notes[1] and "12 s of the 20 s quiet budget" in notes[1]
    assert notes[2].startswith("t_row drifted +10.0%")
    assert report.run_notes(cells(), compute_floors(cells(), T_ROW, T_ROW), 0.0, 20.0) == []


def test_markdown_has_the_table_floors_targets_and_notes_in_order() -> None:
    cs = cells()
    f = compute_floors(cs, T_ROW, T_ROW)
    env = {"cpu": "a CPU", "versions": {"torch": "2.x", "uvicorn": "0.x"}, "wrk": "wrk 4"}
    md = report.markdown(
        cs, f, report.targets(cs, f, [1, 32]), ["a note"], env_info=env, concs=[1, 32], duration=2, warmup=1,
        reps=8, echo_bytes=349_582, elapsed=90.0,
    )  # fmt: skip
    heads = [ln.split(" | ")[0] for ln in md.splitlines() if ln.startswith(("#", "Not judged", "| variant"))]
    assert heads == [
        "# mha-serve service benchmark",
        "| variant",
        "## Floors",
        "## Targets",
        "Not judged, same ratios for every variant:",
        "## Notes",
    ]
    assert report.fmt_table(cs) in md
    assert "- serial limit = 1 / (t_row + t_echo) = 312.5 req/s" in md
    assert "349,582-byte body both ways" in md and md.endswith("- a note\n")

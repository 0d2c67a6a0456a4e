"""bench/front.py's reading of a cell: which core limited it, and its verdict against the issue's targets."""

from __future__ import annotations

import pytest

from bench.front import Cell, client_bound, table, targets

pytestmark = pytest.mark.timeout(30)


def cells(wrk_core: float) -> list[Cell]:
    return [
        Cell("fastapi-echo", "v2-binary", 10_000.0, 0.100, 6.0, 12.0, 0, server_core_busy=0.99, client_core_busy=0.7),
        Cell("branch-split-nolog", "v2-binary", 7_500.0, 0.095, 8.0, 18.0, 0, 0.05, 0.80, wrk_core),
    ]


def test_a_run_limited_by_wrks_core_is_named_and_its_verdict_stands():
    got = cells(wrk_core=0.99)
    assert client_bound(got[1]) and not client_bound(got[0])
    lines = targets(got).splitlines()
    assert lines[-1].startswith("- FAIL branch-split-nolog v2-binary: 0.75x (target >= 1.00x); wrk's core")
    assert "the front end's CPU a request was 1.05x the echo's" in lines[-1]  # 0.100 / 0.095
    assert "| 80% / 99% (wrk's core full) | 0 |" in table(got)
    assert "| 99% / 70% | 0 |" in table(got)


def test_a_run_with_room_on_wrks_core_is_judged_plainly():
    got = cells(wrk_core=0.90)
    assert not client_bound(got[1])
    assert targets(got).splitlines()[-1] == "- FAIL branch-split-nolog v2-binary: 0.75x (target >= 1.00x)"
    assert "wrk's core full" not in table(got)


def test_busy_between_is_each_cores_busy_share_of_the_time_between_two_readings():
    from bench.harness import busy_between

    before = {0: (10, 100), 1: (50, 100)}
    after = {0: (60, 200), 1: (50, 100)}  # core 0 busy half the 100 jiffies; core 1: no time passed
    assert busy_between(before, after) == {0: 0.5, 1: 0.0}

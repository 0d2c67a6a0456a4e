"""bench/procs.py --noop's table: the targets judged for requests of one row; with --rows N the figures are shown,
a row's CPU beside the request's, and nothing is judged."""

from __future__ import annotations

import json

import numpy as np
import pytest

from bench import procs

pytestmark = pytest.mark.unit


def result(rows: int) -> dict:
    return {
        "rows": rows,
        "echo_rps": 1000.0,
        "service_rps": 900.0,
        "ratio": 0.9,
        "model_us_per_request": 12.0 * rows,
        "answer_copy_us": 4.0 * rows,
        "targets": procs.NOOP_TARGETS,
        "errors": 0,
    }


def test_one_row_requests_are_judged(capsys) -> None:
    procs.print_noop(result(1))
    out = capsys.readouterr().out
    assert "| PASS ratio | 0.90x | >= 0.8x |" in out
    assert "| PASS model process CPU a request | 12.0 us | <= 15 us |" in out
    assert "a row" not in out and "128 KiB copy" in out


def test_larger_requests_show_a_rows_cpu_and_are_not_judged(capsys) -> None:
    procs.print_noop(result(8))
    out = capsys.readouterr().out
    assert "PASS" not in out and "FAIL" not in out
    assert "| model process CPU a request | 96.0 us | <= 15 us |" in out
    assert "| model process CPU a row (8 a request) | 12.0 us | |" in out
    assert "1024 KiB copy" in out


def test_a_batchs_cpu_is_shown_with_its_size_when_the_metrics_gave_it(capsys) -> None:
    procs.print_noop(result(1))
    assert "a batch" not in capsys.readouterr().out  # (no batches counted: no row)
    res = {**result(1), "model_us_per_batch": 531.4, "requests_per_batch": 23.26}
    res["against"] = {
        "commit": "abc1234",
        "rps": 800.0,
        "ratio": 0.8,
        "model_us_per_request": 20.0,
        "front_ends_us_per_request": 100.0,
        "model_us_per_batch": 410.0,
        "requests_per_batch": 20.5,
    }
    procs.print_noop(res)
    out = capsys.readouterr().out
    assert "| model process CPU a batch (requests a batch) | 531 us (23.3) | |" in out
    assert "100 / 20.0 us; 410 us a batch of 20.5 | |" in out


def test_the_body_carries_x_of_the_shape_asked_for() -> None:
    data, ctype, headers = procs.v2_binary_body((3, 128, 512))
    n = int(headers["Inference-Header-Content-Length"])
    (inp,) = json.loads(data[:n])["inputs"]
    assert inp["shape"] == [3, 128, 512] and inp["datatype"] == "BF16"
    assert len(data) - n == inp["parameters"]["binary_data_size"] == 3 * 128 * 512 * 2
    assert ctype == "application/octet-stream"
    assert np.frombuffer(data[n:], np.uint16).any()


def test_the_copys_share_comes_from_perfs_report_by_symbol() -> None:
    from bench.harness import COPY_SYMBOLS, report_share

    report = """# Samples: 865  of event 'cpu-clock:ppp'
#
# Overhead  Symbol
# ........  ......
#
    35.61%  [.] __memmove_avx_unaligned_erms
    15.72%  [.] _PyEval_EvalFrameDefault
     6.47%  [k] finish_task_switch.isra.0
     2.20%  [.] __memcpy_avx_unaligned
    40.00%  [.] PyObject_GetAttr
"""
    assert report_share(report, COPY_SYMBOLS) == pytest.approx((35.61 + 2.20) / 100)
    assert report_share(report, ("finish_task_switch",)) == pytest.approx(0.0647)
    assert report_share("# no samples\n", COPY_SYMBOLS) is None


def test_the_copy_measured_in_place_is_shown_beside_the_rest(capsys) -> None:
    procs.print_noop(result(1))
    assert "memmove" not in capsys.readouterr().out  # (no perf: no row)
    procs.print_noop({**result(1), "model_copy_us_per_request": 4.5})
    out = capsys.readouterr().out
    assert "| of which the answers' copy (libc's memmove, perf) / the rest | 4.5 / 7.5 us | |" in out


def test_the_paced_floor_is_shown_when_it_was_measured(capsys) -> None:
    procs.print_noop(result(1))
    assert "--every-ms" not in capsys.readouterr().out  # (not measured: no row)
    procs.print_noop({**result(1), "model_code_paced": {"at_once": 13, "every_ms": 2.94, "us": [11.96, 18.2, 30.34]}})
    out = capsys.readouterr().out
    assert (
        "| floor: the same over its socket, 13 a message (merged): back to back / one every 2.9 ms (the service's "
        "batches) / every 5.9 ms (engine_cpu.py --every-ms) | 12.0 / 18.2 / 30.3 us | |"
    ) in out

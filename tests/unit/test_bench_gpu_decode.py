"""bench/gpu.py's decode section (issue 21's GPU case) runs where no GPU is: `--device cpu --quick` prints its
table and writes rows whose figures hold together, so the CUDA run is not its first run."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
COLUMNS = "| section | case | ours | reference | ratio | target | verdict |"
TIMES = ("step_ms", "gather_ms", "attention_ms", "floor_ms")
SHARES = ("step_share", "gather_share", "attention_share", "floor_share")


@pytest.fixture(scope="module")
def quick_run(tmp_path_factory: pytest.TempPathFactory) -> tuple[str, list[dict]]:
    out = tmp_path_factory.mktemp("bench") / "decode.json"
    argv = [sys.executable, str(ROOT / "bench" / "gpu.py"), "--device", "cpu", "--quick", "--json", str(out)]
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    r = subprocess.run(argv, cwd=ROOT, env=env, capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr[-2000:]
    return r.stdout, json.loads(out.read_text())


def test_the_table_is_printed_with_its_columns_and_one_row_per_line(quick_run) -> None:
    stdout, rows = quick_run
    lines = stdout.splitlines()
    assert COLUMNS in lines
    table = lines[lines.index(COLUMNS) + 2 :]
    assert len(table) == len(rows) == 5  # the bandwidth, then two rows for each of the batches 1 and 4
    for line in table:
        assert line.count("|") == COLUMNS.count("|"), line  # no stray '|' in a cell breaks the markdown table


def test_the_bandwidth_is_measured_and_positive(quick_run) -> None:
    _, rows = quick_run
    bw = rows[0]
    assert bw["section"] == "decode" and bw["case"].startswith("device bandwidth")
    assert bw["data"]["copy_bytes"] == 16 << 20
    assert math.isfinite(bw["data"]["bandwidth_gbs"]) and bw["data"]["bandwidth_gbs"] > 0


def test_each_batch_has_its_step_and_its_breakdown_with_figures_that_agree(quick_run) -> None:
    _, rows = quick_run
    bw = rows[0]["data"]["bandwidth_gbs"]
    steps = [r for r in rows if "StepRunner over KVCache" in r["case"]]
    splits = [r for r in rows if "where the step's time goes" in r["case"]]
    assert [r["data"]["batch"] for r in steps] == [1, 4]
    assert [r["data"]["batch"] for r in splits] == [1, 4]
    for row, split in zip(steps, splits, strict=True):
        d = row["data"]
        assert d["tokens"] == 64
        assert d["groups"] == {1: 2, 4: 1}[d["batch"]]  # --quick's 64 KiB "L2": 128 KiB of cache twice in turn
        assert ("2 such in turn" in row["case"]) == (d["groups"] == 2)
        assert d["cache_bytes"] == d["batch"] * 64 * 2 * 8 * 64 * 2  # keys and values, 8 heads of 64, bf16
        for k in TIMES + SHARES:
            assert math.isfinite(d[k]) and d[k] > 0, (k, d[k])
        for t, s in zip(TIMES, SHARES, strict=True):  # bytes of cache / time, over the measured bandwidth
            assert d[s] == pytest.approx(d["cache_bytes"] / (d[t] / 1000) / (bw * 1e9), rel=1e-9)
        assert d["max_abs_diff"] < 5e-3  # the service's step and the floor attend to the same keys
        assert row["target"] == ">= 50% of bandwidth"
        assert row["verdict"] == ("PASS" if d["step_share"] >= 0.5 else "FAIL")
        assert row["ratio"] == f"{d['step_share']:.0%} of bandwidth"
        rest = split["data"]["rest_ms"]
        assert rest == pytest.approx(d["step_ms"] - d["gather_ms"] - d["attention_ms"])
        stages = {"gather": d["gather_ms"], "attention": d["attention_ms"], "rest": rest}
        assert split["data"]["culprit"] == max(stages, key=stages.get)
        assert split["verdict"] in ("", f"{split['data']['culprit']}-bound")
        assert (split["verdict"] == "") == (row["verdict"] == "PASS")

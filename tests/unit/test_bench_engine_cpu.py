"""bench/engine_cpu.py --in-process: the model process's Engine fed in one process answers every request with its x
(the no-op runner) through the answer arena, and its split of the CPU a request is measured, not made up."""

from __future__ import annotations

import pytest

from bench import engine_cpu
from bench.noop_runner import NoopRunner
from service.messages import AttendOutput

SHAPE = (1, 128, 512)  # 128 KiB in bfloat16: the answer goes through the answer arena


@pytest.fixture(autouse=True)
def _model_env(monkeypatch: pytest.MonkeyPatch) -> None:
    for name, value in engine_cpu._model_env(SHAPE).items():  # set here, so that each is restored after
        monkeypatch.setenv(name, value)


def _run(n: int = 64, at_once: int = 8, merged: bool = True) -> tuple[float, float]:
    from service.engine import process

    return process._run(engine_cpu.in_process(n, SHAPE, "bfloat16", at_once, warm=2, merged=merged))


@pytest.mark.timeout(120)
@pytest.mark.parametrize("merged", [True, False], ids=["merged", "one-by-one"])
def test_in_process_answers_every_request_and_splits_its_cpu(merged: bool) -> None:
    used, copy = _run(merged=merged)
    assert used > 0  # (process_time: the harness's own work between messages is not in it)
    assert 0 < copy < used  # the answers went through the arena, and the copy was not all of it


@pytest.mark.timeout(120)
def test_in_process_fails_when_an_answer_is_not_the_request_x(monkeypatch: pytest.MonkeyPatch) -> None:
    noop = NoopRunner.run

    def negated(self, items):  # a runner whose answers differ from their inputs: caught, not timed
        outs, stats = noop(self, items)
        return [AttendOutput(o.output ^ 0x8000, None) for o in outs], stats  # bfloat16 bits: the sign flipped

    monkeypatch.setattr(NoopRunner, "run", negated)
    with pytest.raises(RuntimeError, match="not its request's x"):
        _run()


def test_pace_spaces_messages_from_the_first_and_never_sends_a_late_ones_successors_back_to_back() -> None:
    assert engine_cpu.pace(10.0, 9.0, 0.5) == (1.0, 10.5)  # early: wait until it is due; the next one is due after
    assert engine_cpu.pace(10.0, 10.0, 0.5) == (0.0, 10.5)  # due now: at once
    assert engine_cpu.pace(10.0, 12.0, 0.5) == (0.0, 12.5)  # late: at once, and the schedule starts again from it
    assert engine_cpu.pace(10.0, 12.0, 0.0) == (0.0, 12.0)  # back to back: never a wait


@pytest.mark.timeout(180)
def test_over_the_socket_each_pace_gets_its_own_figure(tmp_path) -> None:
    import json
    import subprocess
    import sys
    from pathlib import Path

    out = tmp_path / "paced.json"
    argv = [sys.executable, "-m", "bench.engine_cpu", "--batcher", "real", "--shape", "1,128,512", "--dtype"]
    argv += ["bfloat16", "--at-once", "4", "--merged", "--every-ms", "0,2", "--requests", "400", "--json", str(out)]
    root = Path(engine_cpu.__file__).resolve().parents[1]
    done = subprocess.run(argv, cwd=root, capture_output=True, text=True, timeout=170)
    assert done.returncode == 0, done.stderr[-2000:]
    got = json.loads(out.read_text())
    assert got["at_once"] == 4 and list(got["us"]) == ["0.0", "2.0"]  # one figure a pace, in the order asked
    assert all(0 < us < 100_000 for us in got["us"].values())  # CPU a request the model process spent: measured
    assert "a message every 2 ms" in done.stdout and "back to back" in done.stdout

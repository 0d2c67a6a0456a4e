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

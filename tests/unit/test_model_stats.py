"""Triton's per-request statistics (service.stats.ModelStats): a turn's answers are added together at its
end, or when read, with the figures a request-by-request sum gives."""

from __future__ import annotations

import asyncio
import time

from service.messages import AttendOutput, Result
from service.stats import ModelStats

NS = 1_000_000_000


def answers(now: float) -> list[dict]:
    """(started, decoded, answered) before ``now``, the engine's queue and compute seconds, and sequences."""
    out = []
    for i in range(5):
        started = now - 0.010 - i * 0.003
        res = Result(AttendOutput(None, None), 0.0005 * (i + 1), 0.002 + 0.0001 * i, 4, 4 + i)
        out.append(
            {"sequences": i + 1, "started": started, "decoded": started + 0.001, "answered": now - 0.0002, "res": res}
        )
    return out


def test_a_turns_answers_are_added_at_its_end_as_one_by_one() -> None:
    stats = ModelStats()

    async def turn() -> tuple[dict, float, float]:
        before = time.monotonic()
        for a in answers(before):
            stats.request_done(**a)
        kept = stats.phases["success"].count  # not yet: the end of the turn adds them
        await asyncio.sleep(0)
        return kept, before, time.monotonic()

    wall_before = time.time()
    kept, before, after = asyncio.run(turn())
    assert kept == 0
    p = stats.phases
    assert {
        k: p[k].count for k in ("success", "queue", "compute_input", "compute_infer", "compute_output")
    } == dict.fromkeys(("success", "queue", "compute_input", "compute_infer", "compute_output"), 5)
    a = answers(before)
    # the reference: each request on its own (its end is between ``before`` and ``after``)
    assert p["queue"].ns == sum(int(x["res"].queue_s * NS) for x in a)
    assert p["compute_infer"].ns == sum(int(x["res"].compute_s * NS) for x in a)
    assert p["compute_input"].ns == sum(int((x["decoded"] - x["started"]) * NS) for x in a)
    low = sum(int((before - x["started"]) * NS) for x in a)
    high = sum(int((after - x["started"]) * NS) for x in a)
    assert low <= p["success"].ns <= high + 5
    assert sum(int((before - x["answered"]) * NS) for x in a) <= p["compute_output"].ns
    assert stats.inference_count == 15 and p["fail"].count == 0
    assert wall_before * 1000 - 5 <= stats.last_inference_ms <= time.time() * 1000 + 5


def test_answers_are_added_when_read_and_at_once_without_a_loop() -> None:
    stats = ModelStats()
    now = time.monotonic()
    a = answers(now)
    stats.request_done(**a[0])  # no event loop: added at once
    assert stats.phases["success"].count == 1 and stats.inference_count == 1

    async def read_in_the_same_turn() -> dict:
        for x in a[1:]:
            stats.request_done(**x)
        return stats.model_stats("mha", "1")

    got = asyncio.run(read_in_the_same_turn())
    assert got["inference_stats"]["success"]["count"] == 5 and got["inference_count"] == 15
    assert got["inference_stats"]["queue"]["ns"] == sum(int(x["res"].queue_s * NS) for x in a)

"""The runner checks each batch's results for NaN/Inf once, and fails only the requests whose own values overflowed.

A float16 model on the CPU: x = 60000 fits float16, but q/k/v = x W + b sums 32 such products, which
overflow (tests/integration/test_numeric_overflow.py makes the same overflow end to end).
"""

from __future__ import annotations

import asyncio
import time

import numpy as np
import pytest
import torch

from mha_core import MHAConfig, MultiHeadAttention
from service.engine.batcher import Batcher, BatchLimits
from service.engine.runner import Runner, device_finite
from service.messages import AttendInput, AttendOutput, BatcherObserver, NumericOverflow

CFG = MHAConfig(num_heads=4, emb_size=32, head_size=8, max_seq_len=64)
ADVICE = "send smaller values, or serve a float32 model (MHA_DTYPE=float32)"
rng = np.random.default_rng()


@pytest.fixture(params=[False, True], ids=["checked on the host", "checked on the device"])
def runner(request) -> Runner:
    """The CPU runner, its batches' results checked on the host copy (as on a CPU) or on the device before the
    download (as on a GPU: ``device_finite``), to the same answers."""
    r = Runner(MultiHeadAttention.from_seed(CFG, 0), device=torch.device("cpu"), dtype=torch.float16, checksum="t")
    r.finite_on_device = request.param
    return r


def test_the_device_check_counts_real_positions_and_zeroes_a_graphs_padding_first():
    """A CUDA graph computes a shorter row's padding unmasked: whatever it holds there is no one's result."""
    lengths = np.array([4, 2, 4])
    y = torch.ones(3, 4, 8, dtype=torch.bfloat16)
    y[1, 2:] = float("inf")  # row 1's padding
    y[1, 3, 0] = float("nan")
    assert bool(device_finite(y.clone(), lengths, np.array([1])))
    assert not bool(device_finite(y.clone(), lengths))  # (not named as padding: counted)
    y[2, 3, 7] = float("-inf")  # a real position
    assert not bool(device_finite(y.clone(), lengths, np.array([1])))
    got = y.clone()
    device_finite(got, lengths, np.array([1]))
    assert bool((got[1, 2:] == 0).all()) and bool((got[1, :2] == 1).all())  # zeroed as the host copy's padding is


def nonfinite(runner: Runner, x: np.ndarray, **kw) -> tuple[int, int]:
    """(non-finite values, size) of the output of ``x`` alone, straight from the module."""
    with torch.inference_mode():
        out = runner.module(torch.from_numpy(x).half(), **kw).output
    return int((~torch.isfinite(out)).sum()), out.numel()


def message(tensor: str, bad: int, size: int, largest: str) -> str:
    return (
        f"the model's float16 computation overflowed: {tensor} has {bad} non-finite value(s) of {size}. "
        f"The largest |x| in this request is {largest}; the projections and attention scores grow with it "
        f"past float16's range (largest finite 65504). {ADVICE}"
    )


def normal(b: int, t: int) -> np.ndarray:
    return rng.standard_normal((b, t, CFG.emb_size)).astype(np.float32)


def test_only_the_overflowing_request_of_a_padded_batch_fails_with_the_exact_message(runner):
    big = np.full((1, 4, CFG.emb_size), 60000.0, np.float32)  # the shortest: padded to T=12 in the batch
    big[0, 1, 3] = -60001.0
    bad, size = nonfinite(runner, big)
    assert 0 < bad <= size == 128  # the premise: float16 overflows on this input alone
    items = [
        AttendInput(normal(2, 9), lengths=np.array([9, 5])),
        AttendInput(big),
        AttendInput(normal(1, 12)),
        AttendInput(normal(3, 1)),
    ]
    alone = [runner.run([it])[0][0] for it in items]
    results, stats = runner.run(items)
    assert stats.sequences == 7 and stats.padded_tokens == 7 * 12  # one forward for all four
    assert isinstance(alone[1], NumericOverflow)
    assert isinstance(results[1], NumericOverflow)
    assert str(results[1]) == str(alone[1]) == message("output", bad, size, "60001")
    for i in (0, 2, 3):
        assert isinstance(results[i], AttendOutput), results[i]
        assert np.isfinite(results[i].output).all()
        np.testing.assert_allclose(results[i].output, alone[i].output, atol=2e-3, rtol=1e-2)
        assert results[i].output.shape == items[i].x.shape
    assert np.all(results[0].output[1, 5:] == 0)  # its own padding, zero as ever


def test_a_non_finite_value_in_the_padding_of_a_shorter_sequence_fails_nobody(runner, monkeypatch):
    """Only each request's own rows and positions count: the batch's padding is no one's result."""
    items = [AttendInput(normal(1, 4)), AttendInput(normal(2, 10))]
    alone = [runner.run([it])[0][0] for it in items]
    download = runner.staging.download

    def poisoned(slot, tensors):
        arrays = download(slot, tensors)
        arrays[0][0, 4:] = np.inf  # the first request's padding, positions 4..9
        arrays[0][0, 4, 0] = np.nan
        return arrays

    monkeypatch.setattr(runner.staging, "download", poisoned)
    results, _ = runner.run(items)
    for res, one in zip(results, alone, strict=True):
        assert isinstance(res, AttendOutput), res
        np.testing.assert_allclose(res.output, one.output, atol=2e-3, rtol=1e-2)


def test_a_weights_request_that_overflows_fails_alone_and_names_its_tensor(runner):
    big = np.full((1, 3, CFG.emb_size), 60000.0, np.float32)
    bad, size = nonfinite(runner, big)
    items = [
        AttendInput(normal(1, 5), need_weights=True, heads=(2,)),
        AttendInput(big, need_weights=True),
        AttendInput(normal(2, 3), need_weights=True),
    ]
    results, _ = runner.run(items)
    assert [type(r) for r in results] == [AttendOutput, NumericOverflow, AttendOutput]
    assert str(results[1]) == message("output", bad, size, "60000")
    for i in (0, 2):
        one = runner.run([items[i]])[0][0]
        np.testing.assert_array_equal(results[i].output, one.output)  # weights requests run one forward each
        np.testing.assert_array_equal(results[i].weights, one.weights)
        assert np.isfinite(results[i].weights).all()


def test_the_overflow_message_names_the_weights_when_only_they_are_not_finite(runner, monkeypatch):
    x = normal(1, 3)
    download = runner.staging.download

    def poisoned(slot, tensors):
        out, weights = download(slot, tensors)
        weights[0, 1, 2, :2] = np.inf
        return [out, weights]

    monkeypatch.setattr(runner.staging, "download", poisoned)
    (res,), _ = runner.run([AttendInput(x, need_weights=True)])
    largest = f"{float(np.max(np.abs(x))):g}"
    assert isinstance(res, NumericOverflow) and str(res) == message("weights", 2, 4 * 3 * 3, largest)


class Counting(BatcherObserver):
    def __init__(self) -> None:
        self.failed = 0
        self.batches: list[int] = []

    def batch_failed(self, requests: int) -> None:
        self.failed += 1

    def batch_done(self, requests, stats, queue_waits_s) -> None:
        self.batches.append(requests)


async def test_the_batcher_fails_the_overflowing_request_alone_without_rerunning_the_batch(runner):
    obs = Counting()
    calls: list[int] = []

    def run(items):
        calls.append(len(items))
        if len(calls) == 1:
            time.sleep(0.2)  # the first batch holds the model while the others queue up together
        return runner.run(items)

    batcher = Batcher(run, BatchLimits(max_batch_size=16, max_wait_ms=0), observer=obs)
    await batcher.start()
    try:
        big = np.full((1, 4, CFG.emb_size), 60000.0, np.float32)
        xs = [normal(1, 6), normal(1, 7), big, normal(2, 5)]
        first = asyncio.ensure_future(batcher.infer(AttendInput(normal(1, 2)), deadline=time.monotonic() + 30))
        await asyncio.sleep(0.05)
        outs = await asyncio.gather(
            *(batcher.infer(AttendInput(x), deadline=time.monotonic() + 30) for x in xs), return_exceptions=True
        )
        await first
    finally:
        await batcher.stop()
    assert calls == [1, 4] and obs.batches == [1, 4] and obs.failed == 0  # one forward, no retry one by one
    assert isinstance(outs[2], NumericOverflow)
    assert str(outs[2]).startswith("the model's float16 computation overflowed: output has ")
    for i in (0, 1, 3):
        assert outs[i].batch_requests == 4
        np.testing.assert_allclose(outs[i].output.output, runner.run([AttendInput(xs[i])])[0][0].output, atol=2e-3)

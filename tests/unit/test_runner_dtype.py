"""The runner takes x in its wire dtype and answers in the request's out_dtype (issue 20): a half crosses and is
staged at half the bytes, is cast once on the device, and comes back already rounded to the response's dtype, with
an overflow still judged in the precision it happened in."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from mha_core import MHAConfig, MultiHeadAttention
from service.engine.runner import Runner
from service.messages import WIRE_NUMPY, AttendInput, AttendOutput, NumericOverflow, as_float32

CFG = MHAConfig(num_heads=4, emb_size=32, head_size=8, max_seq_len=64)
TORCH = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}
rng = np.random.default_rng()


def wire(x32: np.ndarray, dtype: str) -> np.ndarray:
    """float32 values in a wire dtype's numpy form (bfloat16: its bits)."""
    t = torch.from_numpy(x32).to(TORCH[dtype])
    return (t.view(torch.uint16) if dtype == "bfloat16" else t).numpy()


def half_input(b: int, t: int, dtype: str, out: str | None = None, **kw) -> AttendInput:
    x = wire(rng.standard_normal((b, t, CFG.emb_size)).astype(np.float32), dtype)
    return AttendInput(x, wire_dtype=dtype, out_dtype=out or dtype, **kw)


def expected(module: MultiHeadAttention, it: AttendInput, **kw) -> np.ndarray:
    """The float32 model on x's exact values, then rounded to out_dtype by torch (as the device rounds)."""
    lengths = None if it.lengths is None else torch.from_numpy(it.lengths)
    with torch.inference_mode():
        y = module(torch.from_numpy(as_float32(it.x, it.wire_dtype)), lengths=lengths, **kw).output
    return wire(y.numpy(), it.out_dtype)


@pytest.fixture(scope="module")
def runner() -> Runner:
    return Runner(MultiHeadAttention.from_seed(CFG, 0), device=torch.device("cpu"), dtype=torch.float32, checksum="t")


@pytest.mark.parametrize("dtype", ["float16", "bfloat16"])
def test_a_half_request_is_staged_in_its_dtype_and_answered_in_it_bit_for_bit(runner, dtype):
    it = half_input(2, 9, dtype)
    (res,), _ = runner.run([it])
    assert res.output.dtype == WIRE_NUMPY[dtype]  # answered in the response's dtype: no float32 copy to narrow
    np.testing.assert_array_equal(res.output, expected(runner.module, it))
    (slot,) = runner.staging._slots
    assert slot.x.data.numel() == it.x.nbytes  # staged at the half's own size, not widened to float32


def test_a_batch_that_mixes_dtypes_answers_each_in_its_own(runner):
    items = [
        half_input(1, 5, "bfloat16"),
        half_input(2, 7, "float16"),
        half_input(1, 7, "float32"),
        half_input(1, 3, "bfloat16", out="float32"),  # a bfloat16 x with a float32 answer (lists)
    ]
    results, stats = runner.run(items)
    assert stats.sequences == 5  # one forward for all
    for it, res in zip(items, results, strict=True):
        assert isinstance(res, AttendOutput) and res.output.dtype == WIRE_NUMPY[it.out_dtype]
        alone = runner.run([it])[0][0].output
        assert alone.dtype == res.output.dtype
        # padded into a batch or alone, the same float32 computation and the same rounding
        np.testing.assert_allclose(as_float32(res.output, it.out_dtype), as_float32(alone, it.out_dtype), atol=1e-5)


def test_a_weights_request_answers_both_tensors_in_its_dtype(runner):
    it = half_input(1, 6, "bfloat16", need_weights=True, heads=(1, 3))
    (res,), stats = runner.run([it])
    assert res.output.dtype == res.weights.dtype == np.uint16 and res.weights.shape == (1, 2, 6, 6)
    with torch.inference_mode():
        want = runner.module(torch.from_numpy(as_float32(it.x, "bfloat16")), need_weights=True, heads=[1, 3])
    np.testing.assert_array_equal(res.output, wire(want.output.numpy(), "bfloat16"))
    np.testing.assert_array_equal(res.weights, wire(want.weights.numpy(), "bfloat16"))
    assert stats.weights_elements == 2 * 36


@pytest.mark.parametrize("weights", [False, True])
def test_a_finite_float32_result_beyond_the_half_response_is_a_narrowing_overflow_of_that_request_alone(weights):
    """The runner narrows now, so it words what the front end worded: the same 422 message, never an Inf."""
    mha = MultiHeadAttention.from_seed(CFG, seed=0)
    with torch.no_grad():
        mha.proj.weight.mul_(100)  # a model whose outputs are large
    runner = Runner(mha, device=torch.device("cpu"), dtype=torch.float32, checksum="t")
    big = AttendInput(np.full((1, 3, 32), 5000.0, np.float16), wire_dtype="float16", out_dtype="float16")
    same_as_f32 = AttendInput(np.full((1, 3, 32), 5000.0, np.float16), wire_dtype="float16", out_dtype="float32")
    small = half_input(1, 3, "float16")
    items = [small, big, same_as_f32]
    if weights:
        items = [AttendInput(**{**it.__dict__, "need_weights": True}) for it in items]
    results, _ = runner.run(items)
    want = expected(runner.module, same_as_f32)
    assert np.isfinite(want).all() and np.abs(want).max() > 65504  # the premise: float32 holds it, float16 not
    assert isinstance(results[1], NumericOverflow)
    assert str(results[1]) == (
        f"output has values beyond float16's range (largest |value| {float(np.abs(want).max()):g}, float16 holds "
        "up to 65504); responses come in the dtype of x: send x as float32, or send smaller values"
    )
    assert isinstance(results[0], AttendOutput) and np.isfinite(results[0].output).all()
    np.testing.assert_allclose(results[2].output, want, rtol=1e-5)  # a float32 answer of the same x holds it

"""The runner's memory: each request computes only its own heads' weights; its result is never a view into a
reused buffer, holds no padding, and costs no copy when the batch's output holds it as it is."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from mha_core import MHAConfig, MultiHeadAttention
from service.engine.runner import Runner
from service.messages import AttendInput

CFG = MHAConfig(num_heads=8, emb_size=32, head_size=4, max_seq_len=64, causal=True)


class Recording:
    """Wraps the module; records the shape of every weights tensor it computes."""

    def __init__(self, module):
        self.module = module
        self.weights_shapes: list[tuple[int, ...]] = []

    def __call__(self, *args, **kw):
        res = self.module(*args, **kw)
        if res.weights is not None:
            self.weights_shapes.append(tuple(res.weights.shape))
        return res


@pytest.fixture
def runner() -> Runner:
    module = MultiHeadAttention.from_seed(CFG, 3)
    return Runner(module, device=torch.device("cpu"), dtype=torch.float32, checksum="test")


def test_eight_one_head_requests_compute_eight_one_head_weights(runner, rng_seed):
    rng = np.random.default_rng(rng_seed)
    items = [
        AttendInput(rng.standard_normal((1, T, 32)).astype(np.float32), need_weights=True, heads=(h,))
        for h, T in enumerate((5, 9, 16, 3, 12, 7, 16, 1))
    ]
    alone = [runner.run([it])[0][0] for it in items]
    rec = Recording(runner.module)
    runner.module = rec
    results, stats = runner.run(items)
    assert rec.weights_shapes == [(1, 1, it.seq_len, it.seq_len) for it in items]
    assert stats.weights_elements == sum(it.seq_len**2 for it in items)  # 8 x 1 head, not 8 x 8 heads at T=16
    for it, res, one in zip(items, results, alone, strict=True):
        assert res.weights.shape == (1, 1, it.seq_len, it.seq_len)
        np.testing.assert_allclose(res.weights, one.weights, atol=1e-6)
        np.testing.assert_allclose(res.output, one.output, atol=1e-6)
        full = rec.module(torch.from_numpy(it.x), need_weights=True)  # all heads, then pick its own
        np.testing.assert_allclose(res.weights[0, 0], full.weights[0, it.heads[0]].numpy(), atol=1e-6)
        np.testing.assert_allclose(res.output, full.output.numpy(), atol=1e-5)


def test_each_result_owns_its_arrays(runner, rng_seed):
    rng = np.random.default_rng(rng_seed)
    items = [AttendInput(rng.standard_normal((2, T, 32)).astype(np.float32)) for T in (4, 8)]
    (a, b), stats = runner.run(items)
    assert a.output.shape == (2, 4, 32) and b.output.shape == (2, 8, 32)
    assert not np.shares_memory(a.output, b.output)  # no view into one batch-sized buffer
    assert a.output.flags.c_contiguous
    assert stats.sequences == 4 and stats.padded_tokens == 4 * 8 and stats.real_tokens == 2 * 4 + 2 * 8


def test_weights_elements_counts_the_heads_asked_for(runner):
    x = np.zeros((2, 10, 32), np.float32)
    assert runner.weights_elements(AttendInput(x)) == 0
    assert runner.weights_elements(AttendInput(x, need_weights=True)) == 2 * 8 * 100
    assert runner.weights_elements(AttendInput(x, need_weights=True, heads=(1, 5))) == 2 * 2 * 100


def test_full_length_results_are_rows_of_the_batch_output_not_copies(runner, rng_seed):
    """A uniform batch (every request of the batch's length): each answer is its rows of the forward's output,
    with no copy per request, never the staging buffer, and unchanged by the batches after it."""
    rng = np.random.default_rng(rng_seed)
    items = [AttendInput(rng.standard_normal((1, 8, 32)).astype(np.float32)) for _ in range(3)]
    results, _ = runner.run(items)
    kept = [r.output.copy() for r in results]
    bases = {id(r.output.base) for r in results}
    assert all(r.output.base is not None for r in results) and len(bases) == 1  # views of one array: no copies
    staged = runner.staging._slots[0].x.data.numpy()
    assert not any(np.shares_memory(r.output, staged) for r in results)
    assert all(r.output.flags.c_contiguous for r in results)  # sent as they are
    for _ in range(2):
        runner.run([AttendInput(rng.standard_normal((3, 8, 32)).astype(np.float32))])
    for r, k in zip(results, kept, strict=True):
        np.testing.assert_array_equal(r.output, k)
    with torch.inference_mode():
        ref = runner.module(torch.from_numpy(np.concatenate([it.x for it in items]))).output.numpy()
    np.testing.assert_allclose(np.concatenate(kept), ref, rtol=1e-5, atol=1e-6)


def test_a_module_answering_in_its_input_memory_gets_a_copy(runner, monkeypatch, rng_seed):
    """On the CPU the upload is the staging buffer itself: an answer in its memory would be overwritten by the
    next batch."""

    class Identity(torch.nn.Module):
        def forward(self, x, **kw):
            return type("R", (), {"output": x, "weights": None})()

    monkeypatch.setattr(runner, "module", Identity())
    rng = np.random.default_rng(rng_seed)
    xs = [rng.standard_normal((1, 8, 32)).astype(np.float32) for _ in range(2)]
    results, _ = runner.run([AttendInput(x) for x in xs])
    runner.run([AttendInput(np.zeros((2, 8, 32), np.float32))])
    for r, x in zip(results, xs, strict=True):
        np.testing.assert_array_equal(r.output, x)

"""The runner on the test's device and dtype (tests/devices.py) against mha_core on the CPU in float32;
its staging buffers, and its CUDA graphs where there is a GPU."""

from __future__ import annotations

import threading
import time

import numpy as np
import pytest
import torch

from mha_core import MHAConfig, MultiHeadAttention
from service.engine.liveness import FORWARDS
from service.engine.runner import Runner, resolve_dtype
from service.engine.staging import pick_bucket
from service.messages import AttendInput
from service.settings import Settings, parse_buckets
from tests.devices import SKIP_REASON, test_device, tol

CFG = MHAConfig(num_heads=4, emb_size=32, head_size=8, max_seq_len=64)
rng = np.random.default_rng()


def make_runner(device_dtype, **kw) -> tuple[Runner, MultiHeadAttention]:
    device, dtype = device_dtype
    ref = MultiHeadAttention.from_seed(CFG, seed=3).eval()  # the CPU float32 reference
    runner = Runner(MultiHeadAttention.from_seed(CFG, seed=3), device=device, dtype=dtype, checksum="t", **kw)
    return runner, ref


def expected(ref, it: AttendInput, dtype) -> tuple[np.ndarray, np.ndarray | None]:
    x = torch.from_numpy(it.x).to(dtype).float()  # what the device saw
    res = ref(
        x,
        lengths=None if it.lengths is None else torch.from_numpy(it.lengths),
        attn_mask=None if it.mask is None else torch.from_numpy(it.mask),
        causal=it.causal,
        need_weights=it.need_weights,
        heads=it.heads,
    )
    return res.output.numpy(), None if res.weights is None else res.weights.numpy()


def batch_of(key: str) -> list[AttendInput]:
    """Requests of one batch key, with mixed B, T, lengths (and masks or heads where the key has them)."""
    items = []
    if key == "uniform":  # one T, no lengths or mask: packed in one copy, run without lengths; float16 x cast too
        return [
            AttendInput(rng.standard_normal((b, 12, CFG.emb_size)).astype(np.float16 if b == 2 else np.float32))
            for b in (1, 2, 1, 3)
        ]
    for b, t in ((1, 9), (2, 30), (1, 64), (3, 1)):
        x = rng.standard_normal((b, t, CFG.emb_size)).astype(np.float32)
        lengths = rng.integers(1, t + 1, size=b) if t > 1 and b > 1 else None
        if key == "mask":
            mask = rng.random((b, t, t)) > 0.3
            mask[:, :, 0] = True
            items.append(AttendInput(x, lengths=lengths, mask=mask, causal=False))
        elif key == "weights":
            items.append(AttendInput(x, lengths=lengths, need_weights=True, heads=(3, 1) if b == 2 else None))
        else:
            items.append(AttendInput(x, lengths=lengths))
    return items


@pytest.mark.parametrize("key", ["plain", "weights", "mask", "uniform"])
def test_batch_equals_reference_each_alone(device_dtype, key, rng_seed):
    runner, ref = make_runner(device_dtype)
    dtype = device_dtype[1]
    items = batch_of(key)
    for _ in range(2):  # the second pass reuses the staging buffers
        outs, stats = runner.run(items)
        assert stats.sequences == sum(it.batch for it in items)
        assert stats.real_tokens == sum(
            it.batch * it.seq_len if it.lengths is None else it.lengths.sum() for it in items
        )
        for it, out in zip(items, outs, strict=True):
            want, want_w = expected(ref, it, dtype)
            assert out.output.dtype == np.float32 and out.output.shape == want.shape
            np.testing.assert_allclose(out.output, want, **tol(dtype))
            if want_w is not None:
                np.testing.assert_allclose(out.weights, want_w, **tol(dtype, 0.25))
            if it.lengths is not None:
                for b, n in enumerate(it.lengths):
                    assert np.all(out.output[b, n:] == 0)


def test_staging_buffers_grow_to_the_largest_batch_then_are_reused_and_answers_are_owned(device_dtype):
    runner, ref = make_runner(device_dtype)
    dtype = device_dtype[1]
    big = [AttendInput(rng.standard_normal((4, 64, CFG.emb_size)).astype(np.float32))]
    small = [AttendInput(rng.standard_normal((1, 8, CFG.emb_size)).astype(np.float32))]
    (first,), _ = runner.run(big)
    kept = first.output.copy()
    for _ in range(runner.depth - 1):  # each slot (2 on a GPU: two batches in flight) grows once
        runner.run(big)
    allocs = runner.staging.stats().host_allocations
    for _ in range(3):
        runner.run(small)
        runner.run(big)
    assert runner.staging.stats().host_allocations == allocs  # no buffer grew again
    np.testing.assert_array_equal(first.output, kept)  # later batches did not write into an earlier answer
    np.testing.assert_allclose(first.output, expected(ref, big[0], dtype)[0], **tol(dtype))


def test_dtype_auto_is_bfloat16_on_a_gpu_float32_on_the_cpu():
    assert resolve_dtype("auto", torch.device("cpu")) == torch.float32
    assert resolve_dtype("auto", torch.device("cuda")) == torch.bfloat16
    assert resolve_dtype("float16", torch.device("cuda")) == torch.float16
    assert resolve_dtype("float32", torch.device("cuda")) == torch.float32
    assert Settings().dtype == "auto"


def test_cuda_graph_buckets_parse_and_pick():
    assert parse_buckets("32x128, 1x128,128X128,32x128") == [(1, 128), (32, 128), (128, 128)]
    assert parse_buckets("") == []
    with pytest.raises(ValueError, match="BATCHxLENGTH"):
        parse_buckets("32by128")
    with pytest.raises(ValueError, match="BATCHxLENGTH"):
        Settings(cuda_graphs="0x128")
    buckets = [(1, 128), (32, 128), (8, 1024)]
    assert pick_bucket(buckets, 1, 100) == (1, 128)
    assert pick_bucket(buckets, 2, 128) == (32, 128)
    assert pick_bucket(buckets, 2, 129) == (8, 1024)
    assert pick_bucket(buckets, 33, 16) is None


def test_cuda_graphs_without_warmup_are_refused_at_start_up():
    # the graphs are captured during warm-up: MHA_WARMUP=false used to capture none, silently
    with pytest.raises(ValueError, match=r"cuda_graphs \('32x128'\) needs warmup.*MHA_WARMUP=true"):
        Settings(cuda_graphs="32x128", warmup=False)
    assert Settings(cuda_graphs="32x128").warmup and Settings(warmup=False).cuda_graphs == ""


def test_each_forward_is_timed_for_the_hang_watch():
    runner, _ = make_runner((torch.device("cpu"), torch.float32))
    seen = []

    def watch():
        while t.is_alive():
            seen.append(FORWARDS.since())
            time.sleep(0.01)

    t = threading.Thread(
        target=runner.run, args=([AttendInput(rng.standard_normal((1, 4, 32)).astype(np.float32), fault="stall:300")],)
    )
    before = time.monotonic()
    t.start()
    watch()
    stamps = {s for s in seen if s is not None}
    assert len(stamps) == 1 and before <= stamps.pop() <= before + 0.3  # the forward's start, while it ran
    assert FORWARDS.since() is None  # and nothing once it returned


@pytest.mark.device
@pytest.mark.skipif(test_device() is None, reason=SKIP_REASON)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_cuda_graphs_replay_and_equal_the_eager_forward(dtype, rng_seed):
    device = torch.device(test_device())
    graphed, _ = make_runner((device, dtype), graph_buckets=[(4, 32), (8, 64)])
    eager, _ = make_runner((device, dtype))
    graphed.warmup()
    assert graphed.graphs.captured == [(4, 32), (8, 64)]
    items = [
        AttendInput(rng.standard_normal((2, 20, CFG.emb_size)).astype(np.float32), lengths=np.array([20, 7])),
        AttendInput(rng.standard_normal((1, 31, CFG.emb_size)).astype(np.float32)),
    ]
    before = graphed.graphs.replays
    for _ in range(3):
        got, _ = graphed.run(items)
        want, _ = eager.run(items)
        for g, w in zip(got, want, strict=True):
            np.testing.assert_allclose(g.output, w.output, **tol(dtype))
        assert np.all(got[0].output[1, 7:] == 0)
    assert graphed.graphs.replays == before + 3
    # a batch no bucket holds, and one that wants weights, run eagerly
    long = [AttendInput(rng.standard_normal((1, 64, CFG.emb_size)).astype(np.float32), need_weights=True)]
    graphed.run(long)
    assert graphed.graphs.replays == before + 3


def test_a_huge_batch_gets_a_one_off_unpinned_buffer_not_a_pinned_one_kept_forever():
    from service.engine.staging import MAX_PINNED_BYTES, _Buffer

    buf = _Buffer(pinned=True)
    big = buf.view((MAX_PINNED_BYTES // 4 + 1,), torch.float32)
    assert not big.is_pinned() and buf.data is None and buf.allocations == 0
    half = buf.view((MAX_PINNED_BYTES // 2 + 1,), torch.bfloat16)  # the limit counts bytes, whatever the dtype
    assert half.dtype == torch.bfloat16 and not half.is_pinned() and buf.data is None


def test_staging_never_hands_out_more_slots_than_its_depth():
    """A third batch waits until one of two in flight gives its slot (and buffers) back."""
    import threading

    from service.engine.staging import Staging

    st = Staging(torch.device("cpu"), depth=2)
    got = []
    with st.slot() as a, st.slot() as b:
        assert a is not b
        t = threading.Thread(target=lambda: got.append(st.slot().__enter__()))
        t.start()
        t.join(0.2)
        assert t.is_alive() and not got  # blocked: both slots are in flight
    t.join(2)
    assert got and got[0] in (a, b)


@pytest.mark.device
@pytest.mark.skipif(test_device() is None, reason=SKIP_REASON)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_answers_download_into_a_page_locked_arena_and_equal_the_usual_download(dtype, rng_seed):
    """On the device: an answer arena page-locked as the model process makes it (cudaHostRegister of its shared
    memory), the runner's answers downloaded into its lent slots (issue 20: no host copy), equal to the batch's
    usual download; a segment the arena grows by is page-locked too, and every one is undone at close."""
    from dataclasses import replace

    from service import shm
    from service.engine.staging import page_lock

    device = torch.device(test_device())
    runner, _ = make_runner((device, dtype))
    undone: list[int] = []

    def locked(buf):
        undo = page_lock(buf)
        return None if undo is None else (lambda: undone.append(undo()))

    arena = shm.Arena(256 << 10, max_size=4 << 20, on_segment=locked, threaded=True)
    try:
        assert arena.page_locked, "cudaHostRegister refused the arena's shared memory"
        name = str(dtype).removeprefix("torch.")
        items = [  # answers of 64-256 KiB (bf16: half that), more than the first 256 KiB segment holds: it grows
            AttendInput(rng.standard_normal((b, 64, CFG.emb_size)).astype(np.float32), out_dtype=name)
            for b in (16, 32, 24)
        ]
        want, _ = runner.run(items)
        got, _ = runner.run([replace(it, answer_to=arena) for it in items])
        assert arena.used == sum(g.output.nbytes for g in got) and arena.segments > 1 and arena.page_locked
        for g, w in zip(got, want, strict=True):
            np.testing.assert_array_equal(g.output, w.output)
        del got, g  # (the lent slots go back: nothing writes them any more, so close undoes every page-locking)
    finally:
        arena.close()
    assert len(undone) == arena.segments >= 1


@pytest.mark.device
@pytest.mark.skipif(test_device() is None, reason=SKIP_REASON)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_xs_upload_from_a_page_locked_mapping_and_equal_the_usual_upload(dtype, rng_seed):
    """On the device: a front end's arena as the model process maps it, page-locked read-only (cudaHostRegister
    with cudaHostRegisterReadOnly), its x's uploaded from where they lie (issue 20: no host copy), equal to the
    staged upload; the page-locking is undone at close."""
    from service import shm
    from service.engine.staging import page_lock

    device = torch.device(test_device())
    runner, _ = make_runner((device, dtype))
    front = shm.Arena(1 << 20)  # the front end's
    undone: list[int] = []

    def locked(buf):
        undo = page_lock(buf, read_only=True)
        return None if undo is None else (lambda: undone.append(undo()))

    mapped = shm.Mapped(front.name, locked)
    try:
        assert mapped.page_locked, "cudaHostRegister refused a read-only mapping (cudaHostRegisterReadOnly)"
        xs = [rng.standard_normal((b, 16, CFG.emb_size)).astype(np.float32) for b in (2, 3, 1)]
        views = []
        for x in xs:
            offset = front.put(x)
            views.append(np.ndarray(x.shape, x.dtype, mapped.tail[-1], offset))  # (all in the first segment)
        want, _ = runner.run([AttendInput(x) for x in xs])
        got, _ = runner.run([AttendInput(v, x_page_locked=True) for v in views])
        for g, w in zip(got, want, strict=True):
            np.testing.assert_array_equal(g.output, w.output)
        del views
    finally:
        mapped.close()
        front.close()
    assert len(undone) == 1

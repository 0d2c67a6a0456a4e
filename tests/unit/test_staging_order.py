"""The GPU host code of service/engine/staging.py and the runner's graph path on the CPU, with stub streams,
events and graphs (tests/cuda_stubs.py): the ORDER of copies, waits, forwards and replays. The same code on a
real device: tests/unit/test_runner.py's device cases."""

from __future__ import annotations

import contextlib
import dataclasses
import gc
from collections.abc import Iterator

import numpy as np
import pytest
import torch

from mha_core import MHAConfig, MultiHeadAttention
from service import shm
from service.engine.runner import Runner
from service.engine.staging import CudaGraphs
from service.messages import AttendInput, NumericOverflow
from tests.cuda_stubs import FakeCuda, RecordingModule, happens_before, host_saw

CFG = MHAConfig(num_heads=4, emb_size=32, head_size=8, max_seq_len=64)
BUCKETS = [(2, 8), (4, 16)]
CUDA = torch.device("cuda")
rng = np.random.default_rng()


@pytest.fixture
def cuda(monkeypatch):
    with FakeCuda().installed(monkeypatch) as c:
        yield c


def gpu_runner(cuda: FakeCuda, *, pipeline: bool = True, buckets=(), fail: bool = False) -> Runner:
    with cuda.quiet():  # building the model is not what is tested
        module = RecordingModule(MultiHeadAttention.from_seed(CFG, seed=3), cuda, fail=fail)
    return Runner(
        module, device=CUDA, dtype=torch.float32, checksum="t", pipeline=pipeline, graph_buckets=list(buckets)
    )


def reference(cuda: FakeCuda, it: AttendInput) -> np.ndarray:
    """The module on the CPU, its ops unrecorded."""
    lengths = None if it.lengths is None else torch.from_numpy(it.lengths)
    with cuda.quiet(), torch.inference_mode():
        ref = MultiHeadAttention.from_seed(CFG, seed=3).eval()
        return ref(torch.from_numpy(it.x.copy()), lengths=lengths, causal=it.causal).output.numpy()


def item(n: int, t: int, causal: bool = True) -> AttendInput:
    return AttendInput(rng.standard_normal((n, t, CFG.emb_size)).astype(np.float32), causal=causal)


def kinds(ops, kind):
    return [o for o in ops if o.kind == kind]


def last_read_of(cuda: FakeCuda, op) -> dict:
    """The host's clock when it last read the buffer ``op`` wrote."""
    return [h for ptr, h in cuda.host_reads if ptr == op.info["dst"]][-1]


def test_the_forward_waits_for_its_upload_and_the_download_for_the_forward(cuda):
    runner = gpu_runner(cuda)
    assert runner.depth == 2 and cuda.pinned_requests == 0  # buffers are pinned when first used, not before
    it = item(2, 5)
    (res,), _ = runner.run([it])
    np.testing.assert_allclose(res.output, reference(cuda, it), atol=1e-6)

    (up,) = kinds(cuda.ops, "h2d")
    (fwd,) = kinds(cuda.ops, "forward")
    (down,) = kinds(cuda.ops, "copy_")
    assert up.stream != "compute" and fwd.stream == "compute" and down.stream not in ("compute", up.stream)
    assert fwd.info["reads"] == up.info["dst"]  # the forward reads what the upload wrote...
    assert happens_before(up, fwd)  # ...after the compute stream waited for the upload stream's event
    assert happens_before(fwd, down)  # the download stream waited for the forward
    assert host_saw(down, last_read_of(cuda, down))  # the host read the copy only after it was done
    assert cuda.pinned_requests >= 2  # the input and output staging buffers are page-locked
    # each tensor is kept from reuse by the streams that use it besides the one it was allocated on
    assert (up.info["dst"], "compute") in cuda.record_streams
    assert (down.info["src"], down.stream) in cuda.record_streams


def test_without_side_streams_everything_is_ordered_on_the_compute_stream(cuda):
    runner = gpu_runner(cuda, pipeline=False)
    assert runner.depth == 1
    it = item(1, 7)
    (res,), _ = runner.run([it])
    np.testing.assert_allclose(res.output, reference(cuda, it), atol=1e-6)
    (up,), (fwd,), (down,) = kinds(cuda.ops, "h2d"), kinds(cuda.ops, "forward"), kinds(cuda.ops, "copy_")
    assert {up.stream, fwd.stream, down.stream} == {"compute"}
    assert happens_before(up, fwd) and happens_before(fwd, down)
    assert host_saw(down, last_read_of(cuda, down))


def test_a_second_batch_reuses_the_slot_only_after_the_first_batchs_copies(cuda):
    runner = gpu_runner(cuda)
    for _ in range(3):  # depth 2: the third batch is in the first one's slot
        runner.run([item(1, 4)])
    ups = kinds(cuda.ops, "h2d")
    downs = kinds(cuda.ops, "copy_")
    assert len(ups) == len(downs) == 3
    # the host had seen the first batch's upload and download done before it packed the third one
    third = [h for ptr, h in cuda.host_reads if ptr == ups[2].info["src"]][-1]  # the host writing its input
    assert host_saw(ups[0], third) and host_saw(downs[0], third)


def test_a_failed_forward_still_waits_for_its_upload_before_the_slot_is_free(cuda):
    runner = gpu_runner(cuda, fail=True)
    with pytest.raises(RuntimeError, match="injected forward failure"):
        runner.run([item(1, 4)])
    (up,) = kinds(cuda.ops, "h2d")
    assert host_saw(up, cuda.host)  # the next batch may overwrite the host buffer the copy read


def test_graphs_are_captured_per_bucket_after_a_warm_up_on_a_side_stream(cuda):
    runner = gpu_runner(cuda, buckets=BUCKETS)
    runner.graphs.capture()
    assert runner.graphs.captured == BUCKETS
    fwds = kinds(cuda.ops, "forward")
    for n, t in BUCKETS:
        mine = [o for o in fwds if o.info["shape"] == (n, t, CFG.emb_size)]
        *warm, capture = mine
        assert len(warm) == 2 and not any(o.info["capture"] for o in warm) and capture.info["capture"]
        assert {o.stream for o in warm} != {"compute"}  # warmed up on a side stream...
        assert all(happens_before(o, capture) for o in warm)  # ...that the capture waited for


def test_a_graph_is_replayed_for_a_shape_its_bucket_holds_and_not_for_another(cuda):
    runner = gpu_runner(cuda, buckets=BUCKETS)
    runner.graphs.capture()
    captured = len(cuda.ops)

    a, b = item(1, 5), AttendInput(rng.standard_normal((1, 3, 32)).astype(np.float32))
    results, _ = runner.run([a, b])  # N=2, T=5 with a shorter row: bucket (2, 8)
    for it, res in zip((a, b), results, strict=True):
        np.testing.assert_allclose(res.output, reference(cuda, it), atol=1e-5)
    ops = cuda.ops[captured:]
    (up,), (replay,) = kinds(ops, "h2d"), kinds(ops, "replay")
    assert replay.info["shape"] == (2, 8) and not kinds(ops, "forward")  # one replay, no eager forward
    into_static, *_, down = kinds(ops, "copy_")
    assert happens_before(up, into_static) and happens_before(into_static, replay) and happens_before(replay, down)
    assert host_saw(down, last_read_of(cuda, down))
    assert runner.graphs.replays == 1

    for it in (item(5, 5), item(1, 17), item(1, 5, causal=False)):  # more rows, longer, not causal: no bucket
        before = len(cuda.ops)
        (res,), _ = runner.run([it])
        np.testing.assert_allclose(res.output, reference(cuda, it), atol=1e-5)
        assert not kinds(cuda.ops[before:], "replay") and len(kinds(cuda.ops[before:], "forward")) == 1
    assert runner.graphs.replays == 1

    runner.run([item(4, 16)])  # the larger bucket, exactly
    assert [o.info["shape"] for o in kinds(cuda.ops, "replay")] == [(2, 8), (4, 16)]


def test_a_bucket_longer_than_the_model_is_refused_at_capture(cuda):
    graphs = CudaGraphs(MultiHeadAttention.from_seed(CFG, seed=0), [(1, 65)], device=CUDA, dtype=torch.float32)
    with pytest.raises(ValueError, match="CUDA graph bucket 1x65 is longer than max_seq_len 64"):
        graphs.capture()


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_a_half_input_is_uploaded_in_its_dtype_cast_on_the_device_and_downloaded_in_it(cuda, dtype):
    """Issue 20: the copies move the half's bytes both ways; the cast to the model's float32 runs on the device,
    after the upload, and the cast back before the download, in the same order as a float32 batch."""
    runner = gpu_runner(cuda)
    x32 = rng.standard_normal((2, 5, CFG.emb_size)).astype(np.float32)
    half = torch.from_numpy(x32).to(dtype)
    name = str(dtype).removeprefix("torch.")
    x = (half.view(torch.uint16) if dtype == torch.bfloat16 else half).numpy()
    (res,), _ = runner.run([AttendInput(x, wire_dtype=name, out_dtype=name)])
    want = torch.from_numpy(reference(cuda, AttendInput(half.float().numpy()))).to(dtype)
    np.testing.assert_array_equal(res.output, (want.view(torch.uint16) if dtype == torch.bfloat16 else want).numpy())

    (up,), (fwd,), (down,) = kinds(cuda.ops, "h2d"), kinds(cuda.ops, "forward"), kinds(cuda.ops, "copy_")
    assert happens_before(up, fwd) and happens_before(fwd, down)
    assert host_saw(down, last_read_of(cuda, down))
    slot = runner.staging._slots[0]
    assert slot.x.data.numel() == x.nbytes == x32.nbytes // 2  # staged at the half's size, not widened
    assert slot.out.data.numel() == x.nbytes  # and downloaded in it


@contextlib.contextmanager
def lending_arena(page_locked: bool) -> Iterator[shm.Arena]:
    """An answer arena as the model process makes it on a GPU: page-locked (the stand-in's setup says it did), or
    one the driver refused to page-lock; closed after."""
    locked = (lambda buf: lambda: None) if page_locked else (lambda buf: None)
    arena = shm.Arena(1 << 22, on_segment=locked, threaded=True)
    try:
        yield arena
    finally:
        arena.close()


@pytest.mark.parametrize("page_locked", [True, False], ids=["page-locked", "refused"])
def test_each_answer_is_downloaded_into_the_slot_its_answer_arena_lends(cuda, page_locked):
    """In the model process on a GPU: each request's rows of the batch's output go straight into a slot of the arena
    its answer crosses in, after the forward and before the runner returns; the arena then sends that slot as it
    is. Page-locked, the device writes the slots itself (no host copy); refused, through the slot's pinned buffer."""
    runner = gpu_runner(cuda)
    with lending_arena(page_locked) as arena:
        items = [item(8, 64), item(9, 64)]  # 64 and 72 KiB answers: what crosses through the arena
        lent = [dataclasses.replace(it, answer_to=arena) for it in items]
        results, _ = runner.run(lent)
        for it, res in zip(items, results, strict=True):
            np.testing.assert_allclose(res.output, reference(cuda, it), atol=1e-6)
        used = arena.used
        assert used == sum(r.output.nbytes for r in results)  # both in lent slots...
        offsets = [arena.put(r.output) for r in results]
        assert arena.used == used and None not in offsets  # ...which are sent where they lie

        (fwd,) = kinds(cuda.ops, "forward")
        downs = kinds(cuda.ops, "copy_")
        dests = {r.output.ctypes.data for r in results}
        if page_locked:  # the device wrote the slots, one after the other in the arena: in one copy
            assert [d.info["dst"] for d in downs] == [results[0].output.ctypes.data]
            assert results[1].output.ctypes.data == results[0].output.ctypes.data + results[0].output.nbytes
        else:
            (down,) = downs
            assert down.info["dst"] not in dests  # the pinned buffer, copied from on the host
        for down in downs:
            assert down.stream != "compute" and happens_before(fwd, down)
            assert host_saw(down, cuda.host)  # waited for before the answers were handed on


def test_a_lent_answer_that_overflowed_gives_its_slot_back_and_a_request_without_an_arena_downloads_as_before(cuda):
    runner = gpu_runner(cuda)
    with lending_arena(True) as arena:
        bad, good = item(8, 64), item(8, 64)
        bad.x[0, 0, 0] = np.inf
        results, _ = runner.run([dataclasses.replace(bad, answer_to=arena), dataclasses.replace(good, answer_to=arena)])
        assert isinstance(results[0], NumericOverflow)
        np.testing.assert_allclose(results[1].output, reference(cuda, good), atol=1e-6)
        gc.collect()
        arena.free(-1)  # (a dropped slot comes back with the next free or take)
        assert arena.used == results[1].output.nbytes  # the overflowed one's slot came back

        cuda.ops.clear()
        mixed = [dataclasses.replace(good, answer_to=arena), good]  # one without an arena: the batch as before
        results, _ = runner.run(mixed)
        assert all(np.allclose(r.output, reference(cuda, good), atol=1e-6) for r in results)
        assert not any(np.shares_memory(r.output, np.frombuffer(arena._bufs[0], np.uint8)) for r in results)
        assert len(kinds(cuda.ops, "copy_")) == 1  # the whole batch's one download, into the pinned buffer


def test_answers_whose_slots_do_not_follow_each_other_are_downloaded_one_copy_each(cuda):
    runner = gpu_runner(cuda)
    with lending_arena(True) as arena:
        first = arena.put(np.zeros(1 << 16, np.uint8))
        arena.put(np.zeros(1 << 16, np.uint8))  # the slot after it stays taken...
        arena.free(first)  # ...so the first answer (64 KiB) fits where the first was, the second only after
        items = [item(8, 64), item(9, 64)]
        results, _ = runner.run([dataclasses.replace(it, answer_to=arena) for it in items])
        for it, res in zip(items, results, strict=True):
            np.testing.assert_allclose(res.output, reference(cuda, it), atol=1e-6)
        downs = kinds(cuda.ops, "copy_")
        assert [d.info["dst"] for d in downs] == [r.output.ctypes.data for r in results]
        assert results[0].output.ctypes.data + results[0].output.nbytes != results[1].output.ctypes.data


@pytest.mark.parametrize("page_locked", [True, False], ids=["page-locked", "refused"])
def test_a_shorter_request_gets_only_its_own_rows_in_its_lent_slot(cuda, page_locked):
    runner = gpu_runner(cuda)
    with lending_arena(page_locked) as arena:
        items = [item(8, 64), item(14, 40)]  # padded to 64 in the batch; its answer is its 40 rows
        results, _ = runner.run([dataclasses.replace(it, answer_to=arena) for it in items])
        assert results[1].output.shape == (14, 40, CFG.emb_size)
        for it, res in zip(items, results, strict=True):
            np.testing.assert_allclose(res.output, reference(cuda, it), atol=1e-6)
        assert arena.used == sum(r.output.nbytes for r in results)
        if page_locked:  # not one run: the shorter one's rows skip the padding
            assert [d.info["dst"] for d in kinds(cuda.ops, "copy_")] == [r.output.ctypes.data for r in results]


def in_one_buffer(*shapes: tuple[int, int]) -> list[np.ndarray]:
    """Requests' x one after the other in one read-only buffer, as a front end puts them in its arena and the model
    process maps it."""
    sizes = [n * t * CFG.emb_size for n, t in shapes]
    buf = rng.standard_normal(sum(sizes)).astype(np.float32)
    buf.flags.writeable = False
    out, at = [], 0
    for (n, t), size in zip(shapes, sizes, strict=True):
        out.append(buf[at : at + size].reshape(n, t, CFG.emb_size))
        at += size
    return out


def test_a_batch_of_page_locked_xs_is_uploaded_from_where_they_lie_in_one_copy_a_run(cuda):
    """In the model process on a GPU, x's in their front end's page-locked arena: no copy into the pinned buffer,
    one device copy for x's that follow each other in memory, and the forward waits for the copies."""
    runner = gpu_runner(cuda)
    a, b = in_one_buffer((2, 16), (3, 16))
    (c,) = in_one_buffer((1, 16))  # elsewhere
    items = [AttendInput(x, x_page_locked=True) for x in (a, b, c)]
    results, _ = runner.run(items)
    for it, res in zip(items, results, strict=True):
        np.testing.assert_allclose(res.output, reference(cuda, it), atol=1e-6)
    assert not kinds(cuda.ops, "h2d") and runner.staging._slots[0].x.data is None  # nothing staged on the host
    (fwd,) = kinds(cuda.ops, "forward")
    ups = [o for o in kinds(cuda.ops, "copy_") if o.info["src"] in (a.ctypes.data, c.ctypes.data)]
    assert [u.info["src"] for u in ups] == [a.ctypes.data, c.ctypes.data]  # a and b in one copy, c in its own
    assert all(u.stream != "compute" and happens_before(u, fwd) for u in ups)


def test_xs_not_all_page_locked_or_not_of_one_length_are_staged_as_before(cuda):
    runner = gpu_runner(cuda)
    a, b = in_one_buffer((2, 16), (3, 16))
    (short,) = in_one_buffer((1, 9))
    for items in (
        [AttendInput(a, x_page_locked=True), AttendInput(b)],  # one not in page-locked memory
        [AttendInput(a, x_page_locked=True), AttendInput(short, x_page_locked=True)],  # padded: staged
    ):
        cuda.ops.clear()
        results, _ = runner.run(items)
        for it, res in zip(items, results, strict=True):
            np.testing.assert_allclose(res.output, reference(cuda, it), atol=1e-6)
        (up,) = kinds(cuda.ops, "h2d")  # a pinned buffer's one upload
        assert up.info["src"] in {s.x.data.data_ptr() for s in runner.staging._slots if s.x.data is not None}


def test_quiesced_runs_only_once_no_batch_holds_a_slot():
    import threading

    from service.engine.staging import Staging

    st = Staging(torch.device("cpu"), depth=2)
    ran, holding, release = [], threading.Event(), threading.Event()

    def batch() -> None:
        with st.slot():
            holding.set()
            release.wait(5)
            ran.append("batch done")

    t = threading.Thread(target=batch)
    t.start()
    holding.wait(5)
    q = threading.Thread(target=st.quiesced, args=(lambda: ran.append("quiesced"),))
    q.start()
    q.join(0.2)
    assert ran == [] and q.is_alive()  # waits for the batch in flight
    release.set()
    t.join(5)
    q.join(5)
    assert ran == ["batch done", "quiesced"]
    with st.slot(), st.slot():  # and gives every slot back
        pass

"""Large arrays cross through shared memory (service/shm.py): the same answers as through frames, a full arena
falls back to frames, and every slot comes back, whatever ends a request's wait."""

from __future__ import annotations

import asyncio
import contextlib
import gc
import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from service import messages, shm
from service.engine import client as client_mod
from service.engine.client import MPClient
from service.engine.process import Engine
from service.messages import (
    ARENA,
    AttendInput,
    AttendOutput,
    ClientGone,
    DeadlineExceeded,
    EngineError,
    Outcome,
    Result,
    decode,
    decode_outcomes,
    decode_requests,
    encode_outcomes,
    encode_requests,
)
from service.settings import Settings
from tests.fakes import StubBatcher, serving_engine
from tests.waiting import until

ROOT = Path(__file__).resolve().parents[2]
DTYPES = ["float32", "float16", "bfloat16"]


def wire(rng, shape, dtype: str) -> np.ndarray:
    """Random values in ``dtype``'s wire form (bfloat16: its bits as uint16)."""
    v = rng.standard_normal(shape).astype(np.float32)
    if dtype == "bfloat16":
        return (v.view(np.uint32) >> 16).astype(np.uint16)
    return v.astype(dtype)


def on_dev_shm(name: str) -> bool:
    return os.path.exists(f"/dev/shm/{name}")


def test_the_allocator_reuses_and_merges_freed_slots_and_says_when_full():
    arena = shm.Arena(4096)
    try:
        a = np.arange(250, dtype=np.float32)  # 1000 bytes: a 1024-byte slot
        offsets = [arena.put(a) for _ in range(4)]
        assert offsets == [0, 1024, 2048, 3072]
        assert arena.put(a) is None  # full: the caller sends it as a frame
        arena.free(1024)
        arena.free(2048)  # merged with the one before it: one extent of 2048
        big = np.arange(512, dtype=np.float32)  # 2048 bytes
        assert arena.put(big) == 1024
        view = np.ndarray((512,), np.float32, shm.Mapped(arena.name).buf, 1024)
        assert np.array_equal(view, big)
        for offset in (0, 1024, 3072, 3072):  # (a second free of one slot is ignored)
            arena.free(offset)
        assert arena.used == 0
        assert arena.put(np.zeros(1024, np.float32)) == 0  # the whole arena is one extent again
    finally:
        arena.close()
    assert not on_dev_shm(arena.name)


def test_a_full_arena_grows_by_a_segment_up_to_its_cap_and_slots_never_span_two():
    size = 4096
    arena = shm.Arena(size, max_size=3 * size)
    try:
        a = np.arange(250, dtype=np.float32)  # a 1024-byte slot
        offsets = [arena.put(a * i) for i in range(12)]  # 3 segments of 4
        assert offsets == [1024 * i for i in range(12)] and arena.segments == 3
        assert all(on_dev_shm(f"{arena.name}.{k}") for k in (1, 2))
        assert arena.put(a) is None and arena.misses == 1  # at the cap: it goes as a frame
        mapped = shm.Mapped(arena.name)
        mapped.grow(3)  # as a message from a sender with 3 segments makes the receiver do
        assert len(mapped.tail) == 3
        for i, offset in enumerate(offsets):
            segment, at = divmod(offset, size)
            assert np.array_equal(np.ndarray((250,), np.float32, mapped.tail[-1 - segment], at), a * i)
        arena.free(3 * 1024)  # the last slot of segment 0 and the first of segment 1: not merged across the end
        arena.free(4 * 1024)
        assert arena.put(np.zeros(512, np.float32)) is None  # 2048 bytes: no room in one segment
        for offset in offsets:
            arena.free(offset)
        assert arena.used == 0
        assert list(zip(arena._starts, arena._lengths, strict=True)) == [(0, size), (size, size), (2 * size, size)]
        assert arena.put(np.zeros(2 * size, np.uint8)) is None  # larger than a segment: never fits
        mapped.close()
    finally:
        arena.close()
    assert not any(on_dev_shm(n) for n in (arena.name, f"{arena.name}.1", f"{arena.name}.2"))


def test_a_grown_segment_empty_for_trim_after_s_goes_back_and_a_receiver_maps_its_successor():
    """Segments past the first that held no slot at every trim for TRIM_AFTER_S are unlinked; a slot taken in the
    last one meanwhile starts the wait again. Made again under the same name, a segment is another file: a receiver
    told of the trim (``shrinks``) maps it anew and reads the new bytes, not the old mapping's."""
    size, wait = 4096, shm.TRIM_AFTER_S
    arena = shm.Arena(size, max_size=3 * size)
    mapped = shm.Mapped(arena.name)
    try:
        a = np.arange(250, dtype=np.float32)  # a 1024-byte slot: 4 a segment
        offsets = [arena.put(a) for _ in range(12)]
        mapped.grow(arena.segments, arena.shrinks)
        assert arena.segments == 3 and len(mapped.tail) == 3
        old = np.ndarray((250,), np.float32, mapped.tail[-2], 0)  # segment 1's first slot, as the receiver read it
        assert arena.trim(now=0.0) == 0  # slots in it: kept
        for offset in offsets:
            arena.free(offset)
        assert arena.trim(now=100.0) == 0 and arena.trim(now=100.0 + wait / 2) == 0  # empty, not for long enough
        busy = [arena.put(a) for _ in range(9)]  # the ninth in the last segment, between two trims
        assert busy[-1] == 2 * size
        for offset in busy:
            arena.free(offset)
        assert arena.trim(now=100.0 + wait) == 0  # so it was not empty all along: the wait starts again
        assert arena.trim(now=101.0 + wait) == 0
        assert arena.trim(now=100.0 + 2 * wait) == 2  # both empty segments past the first go
        assert arena.segments == 1 and arena.shrinks == 1 and arena.used == 0
        assert not any(on_dev_shm(f"{arena.name}.{k}") for k in (1, 2)) and on_dev_shm(arena.name)
        assert list(zip(arena._starts, arena._lengths, strict=True)) == [(0, size)]
        offsets = [arena.put(a * 3) for _ in range(5)]  # grows again: a new segment 1
        assert offsets[-1] == size and arena.segments == 2 and on_dev_shm(f"{arena.name}.1")
        mapped.grow(arena.segments, arena.shrinks)
        assert len(mapped.tail) == 2
        assert np.array_equal(np.ndarray((250,), np.float32, mapped.tail[-2], 0), a * 3)  # the new file's bytes
        assert np.array_equal(old, a)  # (an array read before the trim still holds the old mapping's)
        del old
    finally:
        mapped.close()
        arena.close()
    assert not any(on_dev_shm(n) for n in (arena.name, f"{arena.name}.1"))


@pytest.mark.skipif(not os.path.isdir("/dev/shm"), reason="no /dev/shm here")
def test_a_request_read_from_a_mapping_outlives_its_close():
    """A request's x is an array over the receiver's mapping of its front end's arena (messages._array). When the
    front end goes away, its mapping is closed (and its arena unlinked) while such a request may still be computing:
    the array must still read its values, not fault the model process. In a child process, which a fault ends."""
    code = """
import gc
import numpy as np
from service import shm
from service.messages import Arr, _array
arena = shm.Arena(1 << 16)
x = np.arange(4096, dtype=np.float32)
offset = arena.put(x)
mapped = shm.Mapped(arena.name)
mapped.grow(1)
got = _array([*mapped.tail], Arr((4096,), "<f4", -1, offset))
mapped.close()
arena.close()
gc.collect()
print(float(got.sum()), bool(np.array_equal(got, x)))
"""
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, cwd=ROOT)
    assert done.returncode == 0, (done.returncode, done.stderr[-2000:])
    assert done.stdout.split() == [str(float(np.arange(4096, dtype=np.float32).sum())), "True"]


def test_an_arena_that_cannot_get_a_segment_stops_growing_and_sends_frames(monkeypatch):
    """/dev/shm full (the reservation of a new segment fails): the array crosses as a frame, counted, and the arena
    does not try again at every put."""
    arena = shm.Arena(4096, max_size=4 * 4096)
    tries = []

    def full(name: str, size: int) -> None:
        tries.append(name)
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(shm, "_reserve", full)
    try:
        a = np.zeros(1024, np.float32)  # a whole segment
        assert arena.put(a) == 0
        assert arena.put(a) is None and arena.put(a) is None
        assert arena.misses == 2 and arena.segments == 1 and tries == [f"{arena.name}.1"]
        assert not on_dev_shm(f"{arena.name}.1")  # (the segment it could not reserve is gone)
    finally:
        arena.close()


@pytest.mark.skipif(not os.path.isdir("/dev/shm"), reason="no /dev/shm here")
def test_an_arenas_pages_are_reserved_when_it_is_made():
    """Reserved, not sparse: a /dev/shm without room for it fails at its making (OSError, frames then), not with a
    SIGBUS at a later write."""
    size = 1 << 20
    arena = shm.Arena(size)
    try:
        st = os.stat(f"/dev/shm/{arena.name}")
        assert st.st_size == size
        assert st.st_blocks * 512 >= size  # (SharedMemory alone leaves it sparse: 0 blocks)
    finally:
        arena.close()


@pytest.mark.parametrize("dtype", DTYPES)
def test_requests_and_answers_through_the_arena_equal_those_through_frames(dtype):
    rng = np.random.default_rng(3)
    x = wire(rng, (2, 128, 512), dtype)  # 128 KiB or more: through the arena
    small = wire(rng, (1, 4, 8), dtype)  # packed in a frame either way
    weights = wire(rng, (2, 2, 128, 128), dtype)
    items = [
        (1, AttendInput(x, wire_dtype=dtype, out_dtype=dtype), 9.0, "r1", 0),
        (2, AttendInput(small), 9.0, None, 1),
    ]
    outcomes = [Outcome(1, AttendOutput(x, weights), 0.1, 0.2, 2, 3), Outcome(2, AttendOutput(small, None))]
    arena = shm.Arena(8 << 20)
    mapped = shm.Mapped(arena.name)
    try:
        slots: list[list[int]] = []
        frames = encode_requests(items, arena, slots, freed=(5, 6))
        msg = decode(frames[0])
        assert msg.items[0].x.frame == ARENA and msg.items[1].x.frame == 0 and msg.freed == (5, 6)
        assert len(frames) == 2 and slots == [[msg.items[0].x.offset], []]  # the large array left no frame
        via_arena = decode_requests(msg, frames[1:], mapped.tail)
        plain = encode_requests(items)
        via_frames = decode_requests(decode(plain[0]), plain[1:])
        for (ra, ia, *rest_a), (rf, i_f, *rest_f) in zip(via_arena, via_frames, strict=True):
            assert (ra, rest_a) == (rf, rest_f)
            assert ia.x.dtype == i_f.x.dtype and np.array_equal(ia.x, i_f.x)
            assert ia.wire_dtype == i_f.wire_dtype
        assert not via_arena[0][1].x.flags.writeable  # the model process cannot write into a front end's slot
        for offset in slots[0]:
            arena.free(offset)

        frames = encode_outcomes(outcomes, arena)
        msg = decode(frames[0])
        assert msg.items[0].output.frame == ARENA and msg.items[0].weights.frame == ARENA
        freed: list[int] = []
        got = decode_outcomes(msg, frames[1:], mapped.tail, freed)
        assert freed == []  # lent, not copied: the slots stay the front end's while anything holds the answers
        assert not got[0].output.output.flags.writeable
        plain = encode_outcomes(outcomes)
        want = decode_outcomes(decode(plain[0]), plain[1:])
        for g, w in zip(got, want, strict=True):
            assert (g.id, g.queue_s, g.compute_s, g.batch_requests) == (w.id, w.queue_s, w.compute_s, w.batch_requests)
            assert g.output.output.dtype == w.output.output.dtype
            assert np.array_equal(g.output.output, w.output.output)
            assert (g.output.weights is None) == (w.output.weights is None)
        assert np.array_equal(got[0].output.weights, weights) and np.array_equal(got[0].output.output, x)
        body = memoryview(got[0].output.output.reshape(-1)).cast("B")  # as a response body is sent
        row = got[0].output.weights[0]
        del got, g, w
        assert freed == []  # the body's memoryview holds the output's slot, a row of the weights theirs
        assert bytes(body) == x.reshape(-1).view(np.uint8).tobytes()
        del body
        assert freed == [msg.items[0].output.offset]
        del row
        assert sorted(freed) == sorted([msg.items[0].output.offset, msg.items[0].weights.offset])
        for offset in freed:
            arena.free(offset)
        assert arena.used == 0
    finally:
        mapped.close()
        arena.close()


def test_a_full_arena_sends_the_array_as_a_frame_with_the_same_values():
    rng = np.random.default_rng(4)
    x = wire(rng, (1, 128, 512), "float32")  # 256 KiB
    arena = shm.Arena(300 << 10)  # room for one
    try:
        frames = encode_outcomes([Outcome(1, AttendOutput(x, None)), Outcome(2, AttendOutput(x * 2, None))], arena)
        msg = decode(frames[0])
        assert msg.items[0].output.frame == ARENA and msg.items[1].output.frame == 1
        freed: list[int] = []
        one, two = decode_outcomes(msg, frames[1:], shm.Mapped(arena.name).tail, freed)
        assert np.array_equal(one.output.output, x) and np.array_equal(two.output.output, x * 2)
        del one, two
        assert freed == [0]  # only the arena's slot goes back
        assert arena.take_misses() == 1 and arena.take_misses() == 0  # counted for mha_shm_fallbacks, once
    finally:
        arena.close()


# -- a real model process's socket loop and a real front end, in one event loop --


class Echo(StubBatcher):
    """A batcher that answers x * 2 (weights: x's first row) on the next turn, or never for fault "hold"."""

    def submit(self, inp, *, deadline, done, priority=0):
        if inp.fault == "hold":
            return object()
        # the answer is computed before the outcome goes: the input's slot is read before the front end frees it
        out = AttendOutput((inp.x.astype(np.float32) * 2).astype(inp.x.dtype), inp.x[:1].copy())
        asyncio.get_running_loop().call_soon(done, Result(out, 0.0, 0.0, 1, 1))
        return object()


def echo_engine(tmp_path, monkeypatch, arena_bytes: int, arena_max_bytes: int | None = None):
    """A model process's Engine serving the Echo batcher at its address, arenas of ``arena_bytes`` that grow to
    ``arena_max_bytes`` (by default they do not)."""
    return serving_engine(tmp_path, monkeypatch, Echo(), arena_bytes, arena_max_bytes)


@pytest.fixture
async def served(tmp_path, monkeypatch):
    async with echo_engine(tmp_path, monkeypatch, 4 << 20) as engine:
        client = MPClient(engine.address)
        await client.start(timeout_s=10)
        try:
            yield engine, client
        finally:
            await client.stop()


def answers_arena(engine: Engine) -> shm.Arena:
    (arena,) = engine._answers.values()
    return arena


async def test_a_burst_through_the_arenas_answers_every_request_and_frees_every_slot(served, monkeypatch):
    engine, client = served
    monkeypatch.setattr(client_mod, "HEARTBEAT_S", 0.05)
    assert client._inputs is not None and client._answers is not None  # both arenas in use
    rng = np.random.default_rng(5)
    xs = [wire(rng, (1, 16, 64 + 8 * (i % 3)), DTYPES[i % 3]) for i in range(120)]  # 4-6 KiB each

    async def burst() -> None:
        results = await asyncio.gather(
            *(
                client.infer(AttendInput(x, wire_dtype=DTYPES[i % 3]), deadline=time.monotonic() + 10)
                for i, x in enumerate(xs)
            )
        )
        for x, r in zip(xs, results, strict=True):
            assert r.output.output.dtype == x.dtype
            assert np.array_equal(r.output.output, (x.astype(np.float32) * 2).astype(x.dtype))
            assert np.array_equal(r.output.weights, x[:1])
        assert client._inputs.used == 0
        assert answers_arena(engine).used > 0
        assert not client._freed  # the answers are lent (not copied) while they are held

    await burst()
    client._heartbeat_task.cancel()  # (the ping is sent by hand below, so that the test need not wait for one)
    await asyncio.sleep(0)  # (the step that resumed after gather holds its finished future, and with it the results)
    gc.collect()  # (which holds them in a cycle)
    assert client._freed  # dropped: their slots go back with the next message, a ping at the latest
    client._send(messages.encode(messages.Ping(client._take_freed())))
    await until(lambda: answers_arena(engine).used == 0)


async def test_a_burst_larger_than_the_arena_falls_back_to_frames_and_answers_all_and_counts_them(served):
    engine, client = served
    rng = np.random.default_rng(6)
    xs = [wire(rng, (1, 128, 512), "float32") for _ in range(24)]  # 6 MiB: the 4 MiB arena takes some
    sent_as_frames: list[int] = []
    client._on_shm_fallback = sent_as_frames.append  # (app.py: mha_shm_fallbacks{sender="front_end"}.inc)

    class Counted:
        n = 0

        def inc(self, n: int) -> None:
            self.n += n

    answered_as_frames = engine._fallback = Counted()  # (process.py: mha_shm_fallbacks{sender="model"})
    results = await asyncio.gather(*(client.infer(AttendInput(x), deadline=time.monotonic() + 10) for x in xs))
    for x, r in zip(xs, results, strict=True):
        assert np.array_equal(r.output.output, x * 2)
    assert client._inputs.used == 0
    # 256 KiB each, 16 fit in 4 MiB: the others were counted, on each side (an answer: output and weights, 48 arrays)
    assert 24 - 16 <= sum(sent_as_frames) < 24
    assert 48 - 16 <= answered_as_frames.n < 48


async def test_a_burst_larger_than_the_first_segment_grows_both_arenas_and_nothing_crosses_as_frames(
    tmp_path, monkeypatch
):
    """1 MiB segments up to 8 MiB: 24 requests of 128 KiB at once (3 MiB; their answers, output and weights, 6 MiB)
    fit once the arenas grow; every answer is right, none crossed the socket, and every slot comes back."""
    async with echo_engine(tmp_path, monkeypatch, 1 << 20, 8 << 20) as engine:
        client = MPClient(engine.address)
        await client.start(timeout_s=10)
        sent_as_frames: list[int] = []
        client._on_shm_fallback = sent_as_frames.append
        try:
            rng = np.random.default_rng(7)
            xs = [wire(rng, (1, 64, 512), "float32") for _ in range(24)]  # 128 KiB each
            results = await asyncio.gather(*(client.infer(AttendInput(x), deadline=time.monotonic() + 10) for x in xs))
            for x, r in zip(xs, results, strict=True):
                assert np.array_equal(r.output.output, x * 2)
                assert np.array_equal(r.output.weights, x[:1])
            assert client._inputs.segments > 1 and answers_arena(engine).segments > 1
            assert len(engine._inputs[0].tail) == client._inputs.segments  # the model process mapped each one
            assert not sent_as_frames and answers_arena(engine).misses == 0
            assert client._inputs.used == 0
            del results, r
            gc.collect()
            client._send(messages.encode(messages.Ping(client._take_freed())))
            await until(lambda: answers_arena(engine).used == 0)
        finally:
            await client.stop()


async def test_both_arenas_give_back_what_a_burst_grew_them_by_and_serve_on(tmp_path, monkeypatch):
    """After a burst that grew both arenas, the front end (at its heartbeats) and the model process (at its pings)
    give the grown segments back once they are empty (TRIM_AFTER_S 0 here); a second burst grows them again, each
    side maps the new segments under the old names, and every answer is right."""
    monkeypatch.setattr(client_mod, "HEARTBEAT_S", 0.02)
    async with echo_engine(tmp_path, monkeypatch, 1 << 20, 8 << 20) as engine:
        client = MPClient(engine.address)
        await client.start(timeout_s=10)
        try:
            rng = np.random.default_rng(8)
            for burst in range(2):
                # no trim during the burst: a heartbeat between its last answer and the look below would give the
                # grown segments back before they are seen (it did, once, on a loaded 2-vCPU machine)
                monkeypatch.setattr(shm, "TRIM_AFTER_S", 3600.0)
                xs = [wire(rng, (1, 64, 512), "float32") for _ in range(24)]  # 128 KiB each: 3 MiB, answers 6
                results = await asyncio.gather(
                    *(client.infer(AttendInput(x), deadline=time.monotonic() + 10) for x in xs)
                )
                for x, r in zip(xs, results, strict=True):
                    assert np.array_equal(r.output.output, x * 2)
                    assert np.array_equal(r.output.weights, x[:1])
                assert client._inputs.segments > 1 and answers_arena(engine).segments > 1
                monkeypatch.setattr(shm, "TRIM_AFTER_S", 0.0)  # (from now on, an empty grown segment goes back)
                del results, r
                gc.collect()  # the answers' slots go back with the next ping, and the segments then
                await until(lambda: client._inputs.segments == 1 and answers_arena(engine).segments == 1)
                assert client._inputs.shrinks == burst + 1 and answers_arena(engine).shrinks >= burst + 1
                assert not on_dev_shm(f"{client._inputs.name}.1") and not on_dev_shm(f"{answers_arena(engine).name}.1")
        finally:
            await client.stop()


class _OneMore(shm.Arena):
    """An arena whose messages claim a segment it never made: its receiver cannot map it."""

    @property
    def segments(self) -> int:
        return len(self._segments) + 1


async def test_a_request_whose_arena_cannot_be_mapped_fails_at_once_and_the_next_is_served(served):
    """The model process cannot map a segment a message names: each request in it is answered with an error now, not
    left to its deadline, and the next message is read as ever."""
    _, client = served
    x = wire(np.random.default_rng(9), (1, 128, 512), "float32")  # 256 KiB: through the arena
    client._inputs.__class__ = _OneMore
    t0 = time.monotonic()
    with pytest.raises(EngineError, match=r"arrays could not be read.*FileNotFoundError"):
        await client.infer(AttendInput(x), deadline=t0 + 30)
    assert time.monotonic() - t0 < 5  # not at its deadline
    client._inputs.__class__ = shm.Arena
    r = await client.infer(AttendInput(x), deadline=time.monotonic() + 30)
    assert np.array_equal(r.output.output, x * 2)
    assert client._inputs.used == 0


async def test_an_answer_whose_arena_cannot_be_mapped_fails_at_once_and_gives_its_slots_back(served):
    """The front end cannot map a segment the model process's answer names: the request fails now with an error,
    the answer's slots go back to the model process with the next message, and the next answer is read as ever."""
    engine, client = served
    x = wire(np.random.default_rng(10), (1, 128, 512), "float32")
    answers = answers_arena(engine)
    answers.__class__ = _OneMore
    t0 = time.monotonic()
    with pytest.raises(EngineError, match=r"answer could not be read.*FileNotFoundError"):
        await client.infer(AttendInput(x), deadline=t0 + 30)
    assert time.monotonic() - t0 < 5
    assert answers.used > 0 and client._freed  # its slots: held there, to go back with the next message
    answers.__class__ = shm.Arena
    r = await client.infer(AttendInput(x), deadline=time.monotonic() + 30)
    assert np.array_equal(r.output.output, x * 2)
    del r
    gc.collect()
    client._send(messages.encode(messages.Ping(client._take_freed())))
    await until(lambda: answers.used == 0)


async def test_slots_of_cancelled_and_expired_requests_come_back(served, monkeypatch):
    engine, client = served
    x = np.ones((1, 16, 64), np.float32)
    held = [
        asyncio.create_task(client.infer(AttendInput(x, fault="hold"), deadline=time.monotonic() + 30))
        for _ in range(5)
    ]
    await until(lambda: len(engine._pending) == 5)
    assert client._inputs.used == 5 * 4096
    for t in held[:3]:
        t.cancel()
    await asyncio.gather(*held[:3], return_exceptions=True)
    assert client._inputs.used == 2 * 4096
    await until(lambda: engine.batcher.cancelled == 3)
    monkeypatch.setattr(client_mod, "ANSWER_SLACK_S", 0.0)
    late = [client.infer(AttendInput(x, fault="hold"), deadline=time.monotonic() + 0.1) for _ in range(2)]
    outcomes = await asyncio.gather(*late, return_exceptions=True)
    assert all(isinstance(o, DeadlineExceeded) for o in outcomes), outcomes
    assert client._inputs.used == 2 * 4096  # those two gone; the first two still wait
    gone = asyncio.get_running_loop().create_future()
    gone.set_result(None)
    with pytest.raises(ClientGone):
        await client.infer(AttendInput(x, fault="hold"), deadline=time.monotonic() + 30, abandoned=gone)
    assert client._inputs.used == 2 * 4096


async def test_a_front_end_that_goes_away_frees_all_it_held_in_the_model_process(served):
    engine, client = served
    x = np.ones((1, 16, 64), np.float32)
    held = [
        asyncio.create_task(client.infer(AttendInput(x, fault="hold"), deadline=time.monotonic() + 30))
        for _ in range(3)
    ]
    await client.infer(AttendInput(x), deadline=time.monotonic() + 10)  # an answer's slot, not yet freed
    await until(lambda: len(engine._pending) == 3)
    mine, theirs = client._arena.name, answers_arena(engine).name
    assert on_dev_shm(mine) and on_dev_shm(theirs)
    await client.stop()
    await asyncio.gather(*held, return_exceptions=True)
    await until(lambda: not engine._answers and not engine._inputs)  # its Bye
    assert engine.batcher.cancelled == 3 and not engine._pending
    assert not on_dev_shm(mine) and not on_dev_shm(theirs)


async def test_a_front_end_that_died_is_freed_at_once_without_a_bye(served):
    """A front end that dies sends no Bye: the kernel closes its socket, and the model process learns it from its
    connection's end (no polling of its pid), and frees what it held for it."""
    engine, client = served
    (peer,) = engine._peers
    name = answers_arena(engine).name
    assert on_dev_shm(name)
    client._conn.transport.abort()  # its socket closes with nothing more sent, as when its process is killed
    await until(lambda: not engine._answers and not engine._inputs)
    assert peer not in engine._peers and not on_dev_shm(name)


async def test_front_ends_that_come_and_go_leave_nothing_behind_in_the_model_process(tmp_path, monkeypatch):
    """uvicorn replaces a front end that dies: over many comings and goings (half with a Bye, half killed: their
    sockets close with nothing sent), the model process answers each one right and keeps nothing of those gone:
    no connection, no arena mapped or made (none left in /dev/shm), no pending request."""
    made: list[str] = []
    async with echo_engine(tmp_path, monkeypatch, 1 << 20) as engine:
        for i in range(12):
            client = MPClient(engine.address)
            await client.start(timeout_s=10)
            made += [client._arena.name, answers_arena(engine).name] if len(engine._answers) == 1 else []
            x = np.full((1, 16, 64), float(i), np.float32)  # 4 KiB: through the arenas
            res = await client.infer(AttendInput(x), deadline=time.monotonic() + 10)
            np.testing.assert_array_equal(res.output.output, 2 * x)
            del res
            if i % 2:
                await client.stop()  # a Bye
            else:
                client._conn.transport.abort()  # killed: its socket closes, nothing sent
                await client.stop()
            await until(lambda: not engine._peers)
        assert len(made) == 24
        assert not engine._answers and not engine._inputs and not engine._pending
        assert not [name for name in made if on_dev_shm(name)]


def test_unlink_run_removes_only_that_runs_arenas(tmp_path, monkeypatch):
    """What the supervisor does as it exits: the run's leftover arenas go, another run's stay."""
    run = tmp_path / "mha-serve-abcd1234"
    run.mkdir()
    monkeypatch.setenv(shm.PREFIX_ENV, str(run))
    mine = shm.Arena(1 << 16, max_size=2 << 16)
    for _ in range(2):  # a segment each: it grew to two, both named after the run
        assert mine.put(np.zeros(1 << 14, np.float32)) is not None
    monkeypatch.setenv(shm.PREFIX_ENV, str(tmp_path / "mha-serve-other999"))
    other = shm.Arena(1 << 16)
    try:
        names = set(os.listdir(shm.SHM_DIR))
        assert {mine.name, f"{mine.name}.1", other.name} <= names
        assert shm.unlink_run(str(run)) == 2
        names = set(os.listdir(shm.SHM_DIR))
        assert not {mine.name, f"{mine.name}.1"} & names and other.name in names
    finally:
        other.close()
        with contextlib.suppress(Exception):
            mine.close()


async def test_answers_sent_over_http_are_read_from_the_arena_and_give_their_slots_back(served):
    """Through the front end's app (v2 binary, whose answer is sent from the lent view), each answer equals the
    batcher's, and when the responses are gone every answer slot is back in the model process's arena: nothing on
    the answer's way out keeps a lent view (a slot kept would be an arena that fills, and frames after it)."""
    import json

    import httpx
    from asgi_lifespan import LifespanManager

    from service.app import create_app

    engine, _ = served
    address = engine.address
    engine.info = {**engine.info, "model_info": {"dtype": "float32", "device": "cpu", "checksum": "echo"}}
    rng = np.random.default_rng(8)
    settings = Settings(num_heads=2, emb_size=64, head_size=32, max_seq_len=64, warmup=False, decode_processes=0)
    app = create_app(settings=settings, engine_address=address)
    async with (
        LifespanManager(app),
        httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://test") as http,
    ):
        front = app.state.mha.engine  # this app's MPClient
        for round_ in range(3):  # 3 x 12 answers of 16 KiB through a 4 MiB arena, and 12 held at once
            xs = [rng.standard_normal((1, 64, 64)).astype(np.float32) for _ in range(12)]
            bodies = []
            for x in xs:
                head = {
                    "inputs": [{"name": "x", "shape": [1, 64, 64], "datatype": "FP32",
                                "parameters": {"binary_data_size": x.nbytes}}],
                    "outputs": [{"name": "output", "parameters": {"binary_data": True}}],
                }  # fmt: skip
                h = json.dumps(head).encode()
                bodies.append((h + x.tobytes(), len(h)))
            responses = await asyncio.gather(
                *(
                    http.post(
                        "/v2/models/mha/infer",
                        content=b,
                        headers={
                            "Inference-Header-Content-Length": str(hl),
                            "Content-Type": "application/octet-stream",
                        },
                    )
                    for b, hl in bodies
                )
            )
            for x, r in zip(xs, responses, strict=True):
                assert r.status_code == 200, r.text
                n = int(r.headers["Inference-Header-Content-Length"])
                assert np.array_equal(np.frombuffer(r.content[n:], np.float32).reshape(x.shape), x * 2)
            del responses, r
            await asyncio.sleep(0)
            gc.collect()
            assert front._freed, f"round {round_}: no answer slot was given back"
            front._send(messages.encode(messages.Ping(front._take_freed())))
            await until(lambda: all(a.used == 0 for a in engine._answers.values()))  # (one a front end)

"""A slot lent before it is sent (service/shm.py's ``Arena.lend``): what a GPU runner downloads an answer into, so
that the model process copies nothing. ``put`` sends it where it lies; one dropped unsent comes back; lending from
another thread while the owner frees loses no slot; a segment's setup (page-locking on a GPU) is undone when it goes,
and not under a download still writing a lent slot."""

from __future__ import annotations

import asyncio
import gc
import sys
import threading
import time

import numpy as np
import pytest

from service import shm
from service.engine.client import MPClient
from service.messages import (
    ARENA,
    AttendInput,
    AttendOutput,
    EngineError,
    OutcomesWriter,
    Result,
    decode,
    decode_outcomes,
)
from tests.fakes import StubBatcher, serving_engine
from tests.waiting import until

SIZE = 1 << 20
SHAPE = (1, 128, 512)  # a [1,128,512] bfloat16 answer: 128 KiB


def test_a_lent_slot_is_sent_where_it_lies_and_one_dropped_unsent_comes_back():
    arena = shm.Arena(SIZE)
    try:
        a = arena.lend(SHAPE, np.uint16)
        assert a.shape == SHAPE and a.dtype == np.uint16 and a.flags.writeable
        a[...] = np.arange(a.size, dtype=np.uint16).reshape(SHAPE)
        offset = arena.put(a)
        assert arena.used == a.nbytes  # no second slot: it was sent where it lies
        a[0, 0, 0] = 7  # (the slot is the lent array's memory, not a copy of it)
        got = np.frombuffer(arena.view(offset, a.nbytes), np.uint16).reshape(SHAPE)
        assert got[0, 0, 0] == 7 and np.array_equal(got[0, 1], np.arange(512, 1024, dtype=np.uint16))

        b = arena.lend(SHAPE, np.float32)  # 256 KiB, never sent
        assert arena.used == a.nbytes + b.nbytes
        del b
        gc.collect()
        arena.free(offset)  # (a dropped slot comes back with the next free or take)
        assert arena.used == 0
        assert list(zip(arena._starts, arena._lengths, strict=True)) == [(0, SIZE)]
        assert arena.lend((1, 16, 64), np.float32) is None  # 4 KiB: crosses packed in its message, not lent
        assert arena.put(np.ones(SHAPE, np.uint16)) is not None  # an array it did not lend is copied, as always
    finally:
        arena.close()


def test_an_answer_in_a_lent_slot_reaches_the_front_end_with_its_values():
    arena = shm.Arena(SIZE)
    mapped = shm.Mapped(arena.name)
    try:
        a = arena.lend(SHAPE, np.float32)
        want = np.random.default_rng(1).standard_normal(SHAPE).astype(np.float32)
        a[...] = want
        writer = OutcomesWriter(arena)
        writer.answer(5, AttendOutput(a, None), 0.0, 0.001, 1, 1)
        frames = writer.frames()
        msg = decode(frames[0])
        assert msg.items[0].output.frame == ARENA and arena.used == a.nbytes  # its place, no copy
        del a
        gc.collect()
        assert arena.used == want.nbytes  # sent: dropping the model process's array does not free it
        freed: list[int] = []
        (o,) = decode_outcomes(msg, frames[1:], mapped.tail, freed)
        assert o.id == 5 and np.array_equal(o.output.output, want)
        del o
        gc.collect()
        for offset in freed:  # as the front end's next message gives it back
            arena.free(offset)
        assert arena.used == 0
    finally:
        mapped.close()
        arena.close()


def test_lending_in_one_thread_while_another_puts_and_frees_loses_no_slot():
    """The runner lends in its forward thread while the event loop puts answers and frees what front ends gave
    back: the free list stays whole."""
    arena = shm.Arena(SIZE, max_size=4 * SIZE, threaded=True)
    lent: list[np.ndarray] = []
    ready = threading.Condition()
    done = threading.Event()

    def forward_thread() -> None:
        for i in range(3000):
            a = arena.lend(SHAPE, np.uint16)
            while a is None:  # (full of answers the loop has not sent yet: wait for it, as a burst would)
                with ready:
                    ready.notify()
                done.wait(0.001)
                a = arena.lend(SHAPE, np.uint16)
            a[0, 0, 0] = i
            if i % 3:  # a third dropped unsent (a failed batch's, a cancelled request's)
                with ready:
                    lent.append(a)
                    ready.notify()
        done.set()
        with ready:
            ready.notify()

    t = threading.Thread(target=forward_thread)
    switch = sys.getswitchinterval()
    sys.setswitchinterval(1e-6)  # (the threads change hands inside the allocator's steps, as they may on a GPU host)
    t.start()
    sent = 0
    try:
        while not (done.is_set() and not lent):
            with ready:
                if not lent:
                    ready.wait(0.1)
                batch, lent[:] = list(lent), []
            for a in batch:
                offset = arena.put(a)
                assert offset is not None
                arena.free(offset)
                sent += 1
        t.join(10)
        assert not t.is_alive() and sent == 2000
        gc.collect()
        arena.free(-1)  # (takes the dropped ones back)
        assert arena.used == 0 and not arena._lent
        assert [length for length in arena._lengths] == [SIZE] * arena.segments
    finally:
        sys.setswitchinterval(switch)
        arena.close()


def test_a_segments_setup_is_undone_when_it_goes_and_not_under_a_lent_slot():
    made: list[int] = []
    undone: list[int] = []

    def on_segment(buf: memoryview):
        made.append(len(buf))
        k = len(made)
        return lambda: undone.append(k)

    arena = shm.Arena(SIZE, max_size=2 * SIZE, on_segment=on_segment)
    assert made == [SIZE] and arena.page_locked
    big = arena.lend((1, 1024, 512), np.float32)  # 2 MiB: the whole first segment...
    assert big is None and arena.segments == 1  # (larger than a segment: never lent)
    first = arena.lend((1, 512, 512), np.float32)  # 1 MiB: the first segment
    second = arena.lend((1, 512, 512), np.float32)  # and a new one, set up as it is made
    assert made == [SIZE, SIZE] and arena.segments == 2
    del second
    gc.collect()
    arena.free(-1)
    assert arena.trim(now=0.0) == 0 and arena.trim(now=shm.TRIM_AFTER_S) == 1
    assert undone == [2]  # the trimmed segment's setup was undone as it went
    arena.close()  # while ``first`` is lent (a download may be writing it): not yet undone
    assert undone == [2]
    del first
    gc.collect()
    assert undone == [2, 1]

    undone.clear()
    again = shm.Arena(SIZE, on_segment=lambda buf: lambda: undone.append("sent"))
    lent = again.lend((1, 512, 512), np.float32)
    again.close()
    assert undone == []
    again.put(lent)  # (sent after all: no download writes it any more)
    assert undone == ["sent"]
    del lent

    refused = shm.Arena(SIZE, on_segment=lambda buf: None)  # (the driver refused to page-lock it)
    try:
        assert not refused.page_locked
    finally:
        refused.close()


class _LendingBatcher(StubBatcher):
    """A GPU runner's part, as the model process feeds it: each answer (x * 2) written into a slot lent by the
    arena its request names (``answer_to``), which the engine then sends where it lies."""

    def __init__(self) -> None:
        super().__init__()
        self.arenas: list = []
        self.locked_x: list[bool] = []

    def submit(self, inp, *, deadline, priority=0, done):
        self.arenas.append(inp.answer_to)
        self.locked_x.append(inp.x_page_locked)
        out = np.multiply(inp.x, 2, out=inp.answer_to.lend(inp.x.shape, inp.x.dtype))  # (none lent: a new one)
        asyncio.get_running_loop().call_soon(done, Result(AttendOutput(out, None), 0.0, 0.0, 1, 1))
        return object()


async def test_on_a_gpu_the_model_process_page_locks_both_arenas_and_sends_lent_answers_uncopied(tmp_path, monkeypatch):
    """Its answer arena page-locked as it is made, the front end's arena as it is mapped (read-only); each
    request's x says it lies in page-locked memory (the runner uploads from it) and names the answer arena (the
    runner downloads into a slot it lends); both are undone as the front end goes."""
    from service.engine import staging

    locked: list[tuple[int, bool]] = []
    undone: list[bool] = []

    def page_lock(buf, read_only):
        locked.append((len(buf), read_only))
        return lambda: undone.append(read_only)

    monkeypatch.setattr(staging, "page_lock", page_lock)
    batcher = _LendingBatcher()
    async with serving_engine(tmp_path, monkeypatch, batcher, 4 << 20) as engine:
        engine._gpu = True  # (as load sets it for a model on a CUDA device)
        client = MPClient(engine.address)
        await client.start(timeout_s=10)
        try:
            (arena,) = engine._answers.values()
            (mapped,) = engine._inputs.values()
            assert arena.page_locked and mapped.page_locked
            assert sorted(locked) == [(4 << 20, False), (4 << 20, True)]
            x = np.random.default_rng(3).standard_normal((1, 128, 128)).astype(np.float32)  # 64 KiB
            small = np.ones((1, 4, 128), np.float32)  # 2 KiB: crosses in its message's frame, not the arena
            r = await client.infer(AttendInput(x), deadline=time.monotonic() + 10)
            assert np.array_equal(r.output.output, x * 2)
            r = await client.infer(AttendInput(small), deadline=time.monotonic() + 10)
            assert np.array_equal(r.output.output, small * 2)
            assert batcher.arenas == [arena] * 2 and batcher.locked_x == [True, False]
            assert arena.used == x.nbytes  # one slot: the lent one, sent as it was, never copied into another
        finally:
            await client.stop()
        await until(lambda: len(undone) == 2)  # (the front end's mapping's, once no batch could be reading it)
    assert sorted(undone) == [False, True]


async def test_on_a_cpu_requests_name_no_answer_arena(tmp_path, monkeypatch):
    batcher = _LendingBatcher()
    batcher.submit = lambda inp, **kw: batcher.arenas.append(inp.answer_to) or kw["done"](EngineError("stop here"))
    async with serving_engine(tmp_path, monkeypatch, batcher, 4 << 20) as engine:
        client = MPClient(engine.address)
        await client.start(timeout_s=10)
        try:
            x = np.ones((1, 128, 128), np.float32)
            with pytest.raises(EngineError):
                await client.infer(AttendInput(x), deadline=time.monotonic() + 10)
            assert batcher.arenas == [None] and not next(iter(engine._answers.values())).page_locked
        finally:
            await client.stop()


def test_a_mapped_arenas_segments_are_set_up_as_mapped_and_retired_with_their_mappings_when_let_go():
    """The model process page-locks each segment of a front end's arena as it maps it; one it lets go (after the
    front end trimmed it, or at close) is handed to ``retire`` with its mapping, to undo once no upload reads it."""
    size = 1 << 16
    arena = shm.Arena(size, max_size=3 * size)
    set_up: list[int] = []
    retired: list[tuple[list, int]] = []
    n = iter(range(100))

    def on_segment(buf):
        k = next(n)
        set_up.append(k)
        return lambda: undone.append(k)

    def retire(undo, maps):  # (what undoes them, run here at once)
        undone.clear()
        undo()
        retired.append((list(undone), len(maps)))

    undone: list[int] = []
    mapped = shm.Mapped(arena.name, on_segment, retire)
    try:
        assert set_up == [0] and mapped.page_locked
        offsets = [arena.put(np.ones(size, np.uint8)) for _ in range(3)]  # one a segment: it grows to 3
        mapped.grow(arena.segments, arena.shrinks)
        assert set_up == [0, 1, 2] and mapped.page_locked
        for offset in offsets:
            arena.free(offset)
        arena.trim(now=0.0)
        assert arena.trim(now=shm.TRIM_AFTER_S) == 2
        arena.put(np.ones(size, np.uint8))
        arena.put(np.ones(size, np.uint8))  # grown again: segment 1 is another file
        mapped.grow(arena.segments, arena.shrinks)
        assert retired == [([1, 2], 2)]  # the two it let go, with their mappings
        assert set_up == [0, 1, 2, 3] and mapped.page_locked
        mapped.close()
        assert retired[-1] == ([0, 3], 2)
    finally:
        arena.close()

    refused = shm.Arena(size)
    try:
        undone: list[int] = []
        m = shm.Mapped(refused.name, lambda buf: None)
        assert not m.page_locked  # (the driver refused: its x's are copied into the staging buffer)
        m.close()
        plain = shm.Mapped(refused.name, lambda buf: lambda: undone.append(1))  # no retire: undone at once
        plain.close()
        assert undone == [1]
    finally:
        refused.close()

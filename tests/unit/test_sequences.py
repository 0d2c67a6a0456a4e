"""Sequence steps through InprocClient (batcher, step runner, cache) against the float64 reference, which
recomputes the whole sequence and takes the step's rows."""

from __future__ import annotations

import asyncio
import time

import numpy as np
import pytest
import torch

from service.engine.inproc import InprocClient
from service.engine.sequences import CacheFull, SequenceStartRequired, StepInvalid
from service.engine_api import SequenceFlags
from service.errors import ERROR_STATUS
from service.messages import AttendInput, ClientGone, DeadlineExceeded, ErrorKind
from service.settings import Settings
from tests.reference import naive_attention, seed_checkpoint

E, H, D, MAX = 32, 4, 8, 48
TOKEN_BYTES = 2 * H * D * 4


@pytest.fixture
def seed_model(tmp_path):
    return seed_checkpoint(tmp_path / "seed.pt", H, E, D, MAX), tmp_path / "seed.pt"


@pytest.fixture
async def engine(seed_model):
    clients = []

    async def make(**kw):
        kw = {"kv_cache_bytes": 64 * TOKEN_BYTES * 4, "kv_block_size": 4, **kw}
        s = Settings(checkpoint=str(seed_model[1]), warmup=False, device="cpu", dtype="float32", **kw)
        c = InprocClient(s)
        await c.start()
        clients.append(c)
        return c

    yield make
    for c in clients:
        await c.stop()


def far() -> float:
    return time.monotonic() + 30


def seq_step(inp: AttendInput, seq_id, start: bool = False, end: bool = False) -> tuple[AttendInput, SequenceFlags]:
    """The arguments of InprocClient.step: the input and its sequence flags."""
    return inp, SequenceFlags(seq_id, start, end)


def step(seq_id, x, **kw) -> tuple[AttendInput, SequenceFlags]:
    return seq_step(AttendInput(np.ascontiguousarray(x, dtype=np.float32)), seq_id, **kw)


def check(seed, full: np.ndarray, start: int, got: np.ndarray) -> None:
    ref, _ = naive_attention(seed, torch.from_numpy(full[:, : start + got.shape[1]]))
    np.testing.assert_allclose(got, ref[:, start:].detach().numpy(), atol=1e-5, rtol=1e-4)


async def test_prompt_then_tokens_equal_the_reference(seed_model, engine):
    seed, _ = seed_model
    c = await engine()
    x = np.random.default_rng().standard_normal((1, 12, E)).astype(np.float32)
    pos = 0
    for i, t in enumerate([5, 1, 1, 3, 2]):
        res = await c.step(*step("s", x[:, pos : pos + t], start=i == 0), deadline=far())
        check(seed, x, pos, res.output.output)
        pos += t
    assert c.sequences.length("s") == 12


async def test_interleaved_sequences_share_forwards_and_stay_exact(seed_model, engine):
    seed, _ = seed_model
    c = await engine(max_batch_size=16)
    rng = np.random.default_rng()
    xs = {i: rng.standard_normal((1, 10, E)).astype(np.float32) for i in range(6)}
    splits = {i: [1 + i % 3] + [1] * (9 - i % 3) for i in range(6)}  # prompts of 1..3 tokens, then tokens
    forwards = []
    orig = c.batcher._run_fn
    c.batcher._run_fn = lambda items: (forwards.append(len(items)), orig(items))[1]

    async def run(i):
        pos = 0
        for n, t in enumerate(splits[i]):
            res = await c.step(
                *step(i, xs[i][:, pos : pos + t], start=n == 0, end=n == len(splits[i]) - 1), deadline=far()
            )
            check(seed, xs[i], pos, res.output.output)
            pos += t

    await asyncio.gather(*(run(i) for i in range(6)))
    assert max(forwards) > 1  # steps of different sequences did share a forward
    assert c.sequences.active == 0 and c.sequences.cache.usage == 0.0  # every one ended


async def test_steps_sent_before_the_previous_answer_run_in_order(seed_model, engine):
    seed, _ = seed_model
    c = await engine()
    x = np.random.default_rng().standard_normal((1, 8, E)).astype(np.float32)
    steps = [step(7, x[:, :2], start=True)] + [step(7, x[:, p : p + 1]) for p in range(2, 8)]
    results = await asyncio.gather(*(c.step(*s, deadline=far()) for s in steps))  # all submitted at once
    check(seed, x, 0, np.concatenate([r.output.output for r in results], axis=1))


async def test_weights_of_a_step(seed_model, engine):
    seed, _ = seed_model
    c = await engine()
    x = np.random.default_rng().standard_normal((1, 6, E)).astype(np.float32)
    await c.step(*step("w", x[:, :4], start=True), deadline=far())
    res = await c.step(*seq_step(AttendInput(x[:, 4:], need_weights=True, heads=(1, 3)), "w"), deadline=far())
    ref_out, ref_w = naive_attention(seed, torch.from_numpy(x))
    np.testing.assert_allclose(res.output.output, ref_out[:, 4:].detach().numpy(), atol=1e-5, rtol=1e-4)
    np.testing.assert_allclose(res.output.weights, ref_w[:, [1, 3], 4:6, :6].detach().numpy(), atol=1e-5, rtol=1e-4)


async def test_unknown_ended_and_reaped_ids_need_start(seed_model, engine):
    c = await engine(sequence_idle_s=0.2)
    x = np.ones((1, 1, E), np.float32)
    with pytest.raises(SequenceStartRequired, match="must specify the START flag") as e:
        await c.step(*step(1, x), deadline=far())
    assert e.value.kind is ErrorKind.SEQUENCE_START_REQUIRED and ERROR_STATUS[e.value.kind.value] == 400
    await c.step(*step(1, x, start=True, end=True), deadline=far())
    with pytest.raises(SequenceStartRequired):
        await c.step(*step(1, x), deadline=far())
    await c.step(*step(2, x, start=True), deadline=far())
    await asyncio.sleep(0.3)
    c.sequences.reap()  # (the engine's periodic reaper may have been first)
    assert c.sequences.evicted["idle"] == 1 and c.sequences.active == 0
    with pytest.raises(SequenceStartRequired):
        await c.step(*step(2, x), deadline=far())


async def test_start_on_a_live_id_starts_afresh(seed_model, engine, caplog):
    seed, _ = seed_model
    c = await engine()
    x = np.random.default_rng().standard_normal((1, 4, E)).astype(np.float32)
    await c.step(*step("r", np.ones((1, 3, E), np.float32), start=True), deadline=far())
    res = await c.step(*step("r", x[:, :2], start=True), deadline=far())
    check(seed, x, 0, res.output.output)
    assert c.sequences.length("r") == 2
    assert "started again while live" in caplog.text


async def test_invalid_steps_are_422_naming_what_is_wrong(engine):
    c = await engine()
    with pytest.raises(StepInvalid, match="B = 1"):
        await c.step(*step(1, np.ones((2, 1, E)), start=True), deadline=far())
    with pytest.raises(StepInvalid, match="lengths"):
        inp = AttendInput(np.ones((1, 2, E), np.float32), lengths=np.array([1]))
        await c.step(*seq_step(inp, 1, True), deadline=far())
    with pytest.raises(StepInvalid, match="causal"):
        await c.step(*seq_step(AttendInput(np.ones((1, 2, E), np.float32), causal=False), 1, True), deadline=far())
    await c.step(*step(1, np.ones((1, MAX - 2, E)), start=True), deadline=far())
    with pytest.raises(StepInvalid, match=rf"{MAX + 1} tokens long \({MAX - 2} cached \+ 3 in this step\)"):
        await c.step(*step(1, np.ones((1, 3, E))), deadline=far())
    await c.step(*step(1, np.ones((1, 2, E))), deadline=far())  # still usable
    assert c.sequences.length(1) == MAX


async def test_a_cancelled_step_leaves_the_cache_as_before(seed_model, engine):
    seed, _ = seed_model
    c = await engine(fault_injection=True)
    x = np.random.default_rng().standard_normal((1, 5, E)).astype(np.float32)
    await c.step(*step("c", x[:, :3], start=True), deadline=far())
    usage = c.sequences.cache.usage
    slow = seq_step(AttendInput(np.full((1, 4, E), 9.0, np.float32), fault="stall:300"), "c")
    task = asyncio.create_task(c.step(*slow, deadline=far()))
    await asyncio.sleep(0.1)  # computing now
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    with pytest.raises(DeadlineExceeded):  # and one past its deadline
        await c.step(*step("c", np.full((1, 2, E), 9.0)), deadline=time.monotonic() - 1)
    gone = asyncio.get_running_loop().create_future()
    gone.set_result(None)
    with pytest.raises(ClientGone):  # and one whose caller left
        await c.step(*step("c", np.full((1, 2, E), 9.0)), deadline=far(), abandoned=gone)
    assert c.sequences.length("c") == 3 and c.sequences.cache.usage == usage
    res = await c.step(*step("c", x[:, 3:]), deadline=far())
    check(seed, x, 3, res.output.output)


async def test_full_cache_evicts_the_least_recently_used_idle_sequence(engine):
    c = await engine(kv_cache_bytes=16 * TOKEN_BYTES, kv_block_size=4)  # 4 blocks
    x = np.ones((1, 8, E), np.float32)
    await c.step(*step("old", x, start=True), deadline=far())  # 2 blocks
    await c.step(*step("new", x, start=True), deadline=far())  # 2 blocks: full
    await c.step(*step("old", np.ones((1, 1, E))), deadline=far())  # touch: "new" is now the LRU... but old grows
    # "old" needed a 3rd block: "new" (least recently used, idle) was evicted for it
    assert c.sequences.evicted["memory"] == 1
    with pytest.raises(SequenceStartRequired):
        await c.step(*step("new", np.ones((1, 1, E))), deadline=far())
    assert c.sequences.length("old") == 9


async def test_full_cache_with_every_sequence_stepping_is_429(engine):
    c = await engine(kv_cache_bytes=8 * TOKEN_BYTES, kv_block_size=4, fault_injection=True)  # 2 blocks
    busy = seq_step(AttendInput(np.ones((1, 8, E), np.float32), fault="stall:300"), "busy", start=True)
    task = asyncio.create_task(c.step(*busy, deadline=far()))
    await asyncio.sleep(0.05)
    with pytest.raises(CacheFull, match="KV cache is full") as e:
        await c.step(*step("other", np.ones((1, 1, E)), start=True), deadline=far())
    assert e.value.retry_after_s >= 1
    await task
    assert c.sequences.length("other") is None and c.sequences.length("busy") == 8


async def test_unwritten_cache_slots_never_reach_an_answer(seed_model, engine):
    """The pool is reserved, not written (torch.empty): whatever an unwritten slot holds, NaN included, must not
    reach a step of sequences of different lengths padded together (only slot 0, zeroed, pads a gather)."""
    seed, _ = seed_model
    c = await engine(max_batch_size=16)
    cache = c.sequences.cache
    with torch.inference_mode():
        cache.keys[1:] = float("nan")
        cache.values[1:] = float("nan")
    rng = np.random.default_rng()
    xs = [rng.standard_normal((1, n, E)).astype(np.float32) for n in (7, 2, 4)]
    firsts = await asyncio.gather(*(c.step(*step(i, x[:, :-1], start=True), deadline=far()) for i, x in enumerate(xs)))
    for x, res in zip(xs, firsts, strict=True):
        check(seed, x, 0, res.output.output)
    lasts = await asyncio.gather(*(c.step(*step(i, x[:, -1:], end=True), deadline=far()) for i, x in enumerate(xs)))
    for x, res in zip(xs, lasts, strict=True):
        check(seed, x, x.shape[1] - 1, res.output.output)
        assert np.isfinite(res.output.output).all()


async def test_an_end_only_step_ends_the_sequence_and_computes_nothing(engine):
    c = await engine()
    x = np.random.default_rng(5).standard_normal((1, 3, E)).astype(np.float32)
    await c.step(*step("e", x, start=True), deadline=far())
    assert c.sequences.length("e") == 3
    res = await c.step(*step("e", np.zeros((1, 0, E)), end=True), deadline=far())
    assert res.output.output.shape == (1, 0, E) and res.batch_requests == 0
    assert c.sequences.length("e") is None and c.sequences.active == 0
    assert c.sequences.cache.free_blocks == c.sequences.cache.num_blocks
    with pytest.raises(SequenceStartRequired):
        await c.step(*step("e", x[:, :1]), deadline=far())
    with pytest.raises(StepInvalid, match="only ends its sequence"):  # no rows, but no end
        await c.step(*step("e", np.zeros((1, 0, E)), start=True), deadline=far())


async def test_a_step_whose_forward_fails_fails_alone_and_leaves_its_sequence_as_before(seed_model, engine):
    """Fault isolation holds for steps: a batch with a failing step is retried one by one, so only that step
    fails (its sequence unchanged, still usable) and the others are answered exactly."""
    seed, _ = seed_model
    c = await engine(fault_injection=True, max_batch_size=8)
    rng = np.random.default_rng(3)
    xs = {k: rng.standard_normal((1, 4, E)).astype(np.float32) for k in ("ok", "bad")}
    for k, x in xs.items():
        await c.step(*step(k, x[:, :2], start=True), deadline=far())
    hold = asyncio.create_task(c.step(*seq_step(AttendInput(xs["ok"][:, :0 + 1] * 0, fault="stall:200"), "h",
                                                start=True), deadline=far()))  # fmt: skip
    await asyncio.sleep(0.05)  # the next two queue behind it and share one forward
    good = asyncio.create_task(c.step(*step("ok", xs["ok"][:, 2:3]), deadline=far()))
    bad = asyncio.create_task(c.step(*seq_step(AttendInput(xs["bad"][:, 2:3], fault="raise"), "bad"), deadline=far()))
    await hold
    res = await good
    check(seed, xs["ok"], 2, res.output.output)
    with pytest.raises(Exception, match="injected fault"):
        await bad
    assert c.sequences.length("bad") == 2  # as before the failed step
    res = await c.step(*step("bad", xs["bad"][:, 2:4]), deadline=far())
    check(seed, xs["bad"], 2, res.output.output)


async def test_a_high_priority_step_overtakes_queued_low_ones(seed_model, engine):
    """Priorities hold for steps of different sequences: with one step a forward, a level-1 step queued after
    level-3 ones is computed first once the model is free."""
    c = await engine(fault_injection=True, max_batch_size=1, priority_levels=3, priority_oldest_every=100)
    x = np.ones((1, 1, E), np.float32)
    done: list[str] = []

    async def run(key, inp, priority):
        await c.step(*seq_step(inp, key, start=True), deadline=far(), priority=priority)
        done.append(key)

    tasks = [asyncio.create_task(run("stall", AttendInput(x, fault="stall:300"), 2))]
    await asyncio.sleep(0.1)
    for i in range(3):
        tasks.append(asyncio.create_task(run(f"low{i}", AttendInput(x), 3)))
        await asyncio.sleep(0.01)
    tasks.append(asyncio.create_task(run("high", AttendInput(x), 1)))
    await asyncio.gather(*tasks)
    assert done[:2] == ["stall", "high"], done


async def test_stop_drains_the_steps_in_flight_then_drops_every_sequence(seed_model, engine):
    """SIGTERM's drain for steps: ``stop`` answers the steps already accepted within its grace, then every live
    sequence is dropped (counted as ``restart``) and a later step is refused as shutting down."""
    c = await engine(fault_injection=True, max_batch_size=1)
    x = np.ones((1, 2, E), np.float32)
    await c.step(*step("idle", x, start=True), deadline=far())
    busy = asyncio.create_task(c.step(*seq_step(AttendInput(x, fault="stall:300"), "busy", start=True), deadline=far()))
    queued = asyncio.create_task(c.step(*step("queued", x, start=True), deadline=far()))
    await asyncio.sleep(0.05)
    await c.stop(grace_s=5.0)
    seed, _ = seed_model
    check(seed, x, 0, (await busy).output.output)  # both answered, exactly, within the grace
    check(seed, x, 0, (await queued).output.output)
    assert c.sequences.active == 0 and c.sequences.evicted["restart"] == 3
    with pytest.raises(Exception) as e:
        await c.step(*step("idle", x), deadline=far())
    assert getattr(e.value, "kind", None) is ErrorKind.UNAVAILABLE, e.value


async def test_a_lone_step_over_one_run_of_the_pool_reads_it_in_place_and_stays_exact(seed_model, engine):
    """A sequence that grew alone holds blocks in order: its steps attend over views of the pool (no gather),
    with the same answers as the gather; a sequence whose blocks interleave with another's is gathered."""
    seed, _ = seed_model
    c = await engine(max_batch_size=1)
    gathers = []
    real = c.sequences.cache.gather
    c.sequences.cache.gather = lambda index: (gathers.append(index.shape), real(index))[1]
    x = np.random.default_rng(9).standard_normal((1, 12, E)).astype(np.float32)
    pos = 0
    for i, t in enumerate([5, 1, 4, 2]):  # crosses block boundaries (blocks of 4)
        res = await c.step(*step("alone", x[:, pos : pos + t], start=i == 0), deadline=far())
        check(seed, x, pos, res.output.output)
        pos += t
    assert gathers == []  # every step read the pool in place
    y = np.random.default_rng(10).standard_normal((1, 8, E)).astype(np.float32)
    await c.step(*step("a", y[:, :4], start=True), deadline=far())
    await c.step(*step("b", y[:, :4], start=True), deadline=far())  # takes the next block
    res = await c.step(*step("a", y[:, 4:8]), deadline=far())  # its blocks are no longer one run
    check(seed, y, 4, res.output.output)
    assert len(gathers) == 1

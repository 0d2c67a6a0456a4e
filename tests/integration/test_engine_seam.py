"""The engine client interface's contract, the same for both implementations.

One set of checks over ``service.engine_api.EngineClient``, run against ``InprocClient`` (the runner and
batcher in this process) and ``MPClient`` (a real model process, spawned as the supervisor spawns it, over
a Unix socket): the answers equal the naive float64 reference on a seed checkpoint, and every failure arrives as the
same class with the same ``ErrorKind``. The code above the seam may not care which one it talks to.
"""

from __future__ import annotations

import asyncio
import multiprocessing
import os
import time

import numpy as np
import pytest
import torch

from service.engine.inproc import InprocClient
from service.engine_api import EngineClient, SequenceFlags, SequenceStartRequired
from service.messages import (
    AttendInput,
    ClientGone,
    DeadlineExceeded,
    ErrorKind,
    Overloaded,
    RequestTooLarge,
    ShuttingDown,
)
from service.settings import Settings
from tests import reference
from tests.reference import naive_attention

pytestmark = pytest.mark.timeout(120)

H, E, D, T = 2, 16, 8, 12
LIMITS = {"max_queue_requests": 3, "max_batch_tokens": 64, "max_batch_size": 4, "fault_injection": True}


def seed_checkpoint(path) -> reference.SeedMHA:
    torch.manual_seed(7)
    return reference.seed_checkpoint(path, H, E, D, T)


@pytest.fixture(params=["inproc", "mp"])
async def engine(request, tmp_path, monkeypatch):
    seed = seed_checkpoint(tmp_path / "seed.pt")
    env = {
        "MHA_CHECKPOINT": str(tmp_path / "seed.pt"),
        "MHA_WARMUP": "false",
        "MHA_DECODE_PROCESSES": "0",
        "MHA_GRPC_PORT": "0",
        **{f"MHA_{k.upper()}": str(v).lower() if isinstance(v, bool) else str(v) for k, v in LIMITS.items()},
    }
    for k, v in env.items():
        monkeypatch.setenv(k, v)
    if request.param == "inproc":
        from service.engine.inproc import InprocClient

        client: EngineClient = InprocClient(Settings())
        await client.start()
        yield client, seed
        await client.stop()
        return
    from service.engine import process
    from service.engine.client import MPClient

    metrics = tmp_path / "metrics"
    metrics.mkdir()
    monkeypatch.setenv("PROMETHEUS_MULTIPROC_DIR", str(metrics))
    ctx = multiprocessing.get_context("spawn")
    ready, stop = ctx.Event(), ctx.Event()
    beat = ctx.Value("d", 0.0, lock=False)
    address = f"ipc://{tmp_path}/engine.sock"
    proc = ctx.Process(target=process.main, args=(address, ready, stop, beat), daemon=True)
    proc.start()
    try:
        assert await asyncio.to_thread(ready.wait, 60), "the model process did not start"
        client = MPClient(address)
        await client.start()
        yield client, seed
        await client.stop()
    finally:
        stop.set()
        await asyncio.to_thread(proc.join, 10)
        if proc.is_alive():
            proc.kill()
    assert proc.exitcode == 0


def x_of(rng, B=1, T_=T) -> np.ndarray:
    return rng.standard_normal((B, T_, E)).astype(np.float32)


def later(s: float) -> float:
    return time.monotonic() + s


async def test_start_describes_the_model_and_is_ready(engine):
    client, _ = engine
    assert isinstance(client, EngineClient)
    members = {m for m in vars(EngineClient) if not m.startswith("_")} | set(EngineClient.__annotations__)
    assert sorted(m for m in members if not hasattr(client, m)) == []
    m = client.model
    assert (m.config.num_heads, m.config.emb_size, m.config.head_size, m.config.max_seq_len) == (H, E, D, T)
    assert m.device == "cpu" and m.dtype == "float32"
    assert client.ready


async def test_answers_equal_the_naive_reference(engine):
    client, seed = engine
    rng = np.random.default_rng(1)
    xs = [x_of(rng, B=b) for b in (1, 2, 1)]
    results = await asyncio.gather(*(client.infer(AttendInput(x, need_weights=True), deadline=later(30)) for x in xs))
    for x, res in zip(xs, results, strict=True):
        with torch.no_grad():
            out, w = naive_attention(seed, torch.from_numpy(x))
        np.testing.assert_allclose(res.output.output, out.numpy(), rtol=1e-4, atol=1e-5)
        np.testing.assert_allclose(res.output.weights, w.numpy(), rtol=1e-4, atol=1e-5)
        assert res.batch_requests >= 1 and res.compute_s > 0


async def test_sequence_steps_equal_the_reference_and_need_start(engine):
    """Steps of two interleaved sequences (a prompt, then one token at a time) equal the causal forward's rows over
    the whole sequence; a step of an id the engine does not hold is refused with the start-required kind."""
    client, seed = engine
    rng = np.random.default_rng(5)
    xs = {"a": x_of(rng, T_=7), 7: x_of(rng, T_=5)}
    with torch.no_grad():
        want = {k: naive_attention(seed, torch.from_numpy(x))[0].numpy() for k, x in xs.items()}

    async def run(key, prompt):
        x, pos = xs[key], 0
        for t in [prompt] + [1] * (x.shape[1] - prompt):
            seq = SequenceFlags(key, start=pos == 0, end=pos + t == x.shape[1])
            res = await client.step(AttendInput(x[:, pos : pos + t]), seq, deadline=later(30))
            np.testing.assert_allclose(res.output.output, want[key][:, pos : pos + t], rtol=1e-4, atol=1e-5)
            pos += t

    await asyncio.gather(run("a", 3), run(7, 2))
    with pytest.raises(SequenceStartRequired) as e:  # "a" ended with its last step
        await client.step(AttendInput(x_of(rng, T_=1)), SequenceFlags("a"), deadline=later(30))
    assert e.value.kind is ErrorKind.SEQUENCE_START_REQUIRED and "start" in str(e.value)


async def test_every_failure_has_the_same_class_and_kind(engine):
    client, seed = engine
    rng = np.random.default_rng(2)
    with pytest.raises(DeadlineExceeded) as e:
        await client.infer(AttendInput(x_of(rng)), deadline=time.monotonic() - 1)
    assert e.value.kind is ErrorKind.DEADLINE

    with pytest.raises(RequestTooLarge) as e:  # 8 x 12 tokens > max_batch_tokens 64: no batch could hold it
        await client.infer(AttendInput(x_of(rng, B=8)), deadline=later(30))
    assert e.value.kind is ErrorKind.VALIDATION and "max_batch_tokens" in str(e.value)

    # One computing (stalled), three queued fill max_queue_requests: the next is refused with a retry-after.
    xs = [x_of(rng) for _ in range(4)]
    stall = asyncio.ensure_future(client.infer(AttendInput(xs[0], fault="stall:800"), deadline=later(30)))
    await asyncio.sleep(0.3)
    queued = [asyncio.ensure_future(client.infer(AttendInput(x), deadline=later(30))) for x in xs[1:]]
    await asyncio.sleep(0.2)
    with pytest.raises(Overloaded) as e:
        await client.infer(AttendInput(x_of(rng)), deadline=later(30))
    assert e.value.kind is ErrorKind.OVERLOADED and e.value.retry_after_s >= 1
    assert "queue is full" in str(e.value)
    for x, r in zip(xs, await asyncio.gather(stall, *queued), strict=True):  # the accepted ones are answered
        with torch.no_grad():
            want = naive_attention(seed, torch.from_numpy(x))[0].numpy()
        np.testing.assert_allclose(r.output.output, want, rtol=1e-4, atol=1e-5)


async def test_a_caller_that_leaves_gets_client_gone_and_its_request_is_dropped(engine):
    client, _ = engine
    rng = np.random.default_rng(3)
    stall = asyncio.ensure_future(client.infer(AttendInput(x_of(rng), fault="stall:500"), deadline=later(30)))
    await asyncio.sleep(0.2)
    gone = asyncio.get_running_loop().create_future()
    waiting = asyncio.ensure_future(client.infer(AttendInput(x_of(rng)), deadline=later(30), abandoned=gone))
    await asyncio.sleep(0.05)
    gone.set_result(None)
    with pytest.raises(ClientGone) as e:
        await waiting
    assert e.value.kind is ErrorKind.CLIENT_GONE
    await stall
    deadline = later(5)  # the queue is empty again: the dropped request left it
    while client.queue_depth() != (0, 0) and time.monotonic() < deadline:
        await asyncio.sleep(0.05)
    assert client.queue_depth() == (0, 0)


async def test_after_stop_it_is_not_ready_and_refuses_with_unavailable(engine):
    client, _ = engine
    rng = np.random.default_rng(4)
    await client.stop(grace_s=1.0)
    assert not client.ready
    with pytest.raises(ShuttingDown) as e:
        await client.infer(AttendInput(x_of(rng)), deadline=later(5))
    assert e.value.kind is ErrorKind.UNAVAILABLE


def test_both_clients_are_the_interface():
    from service.engine.client import MPClient

    wanted = {"start", "infer", "ready", "queue_depth", "stop_accepting", "stop"}  # (and their attributes)
    for cls in (InprocClient, MPClient):
        assert wanted <= set(dir(cls)), (cls, wanted - set(dir(cls)))
    assert os.environ.get("MHA_ENGINE_ADDRESS") is None  # nothing here points a front end elsewhere

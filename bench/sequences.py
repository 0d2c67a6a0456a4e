"""Generation on the CPU: one token with the KV cache against resending and recomputing the prefix, and 64
sequences stepping at once with continuous batching against MHA_MAX_BATCH_SIZE=1 (issue 21).

    PYTHONPATH=. python -m bench.sequences [--reps 20] [--threads 2]

(a) per generated token at contexts 128 and 1,024, side by side: mha_core alone (the floor) and through
InprocClient (batcher, step runner, cache), each with the cache and by recomputing the whole prefix;
the service's compute span (Result.compute_s) of a one-token step beside the bare forward.
(b) 64 sequences (a 32-token prompt, then one-token steps): tokens per second, max_batch_size 64 against 1.
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import time

import numpy as np
import torch

from mha_core import MHAConfig, MultiHeadAttention, step
from service.engine.inproc import InprocClient
from service.engine_api import SequenceFlags
from service.messages import AttendInput
from service.settings import Settings


def far() -> float:
    return time.monotonic() + 600


def median_ms(fn, reps: int) -> float:
    fn()
    times = []
    for _ in range(reps):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times) * 1e3


def core_costs(module: MultiHeadAttention, ctx: int, reps: int) -> tuple[float, float]:
    E = module.config.emb_size
    x = torch.randn(1, ctx, E)
    first = step(module, x[:, : ctx - 1])
    cached = median_ms(lambda: step(module, x[:, ctx - 1 :], first.k, first.v), reps)
    recompute = median_ms(lambda: module(x), reps)
    return cached, recompute


async def service_costs(client: InprocClient, ctx: int, reps: int) -> tuple[float, float, float]:
    E = client.runner.config.emb_size
    rng = np.random.default_rng(0)
    prompt = rng.standard_normal((1, ctx - reps - 1, E)).astype(np.float32)
    await client.step(AttendInput(prompt), SequenceFlags(f"bench{ctx}", start=True), deadline=far())
    times, spans = [], []
    for _ in range(reps + 1):
        tok = rng.standard_normal((1, 1, E)).astype(np.float32)
        t0 = time.perf_counter()
        res = await client.step(AttendInput(tok), SequenceFlags(f"bench{ctx}"), deadline=far())
        times.append(time.perf_counter() - t0)
        spans.append(res.compute_s)
    full = rng.standard_normal((1, ctx, E)).astype(np.float32)
    recompute = []
    for _ in range(reps + 1):
        t0 = time.perf_counter()
        await client.infer(AttendInput(full), deadline=far())
        recompute.append(time.perf_counter() - t0)
    ms = lambda v: statistics.median(v[1:]) * 1e3  # noqa: E731 (the first is a warm-up)
    return ms(times), ms(recompute), ms(spans)


async def many(settings: Settings, n: int, prompt: int, steps: int) -> float:
    client = InprocClient(settings)
    await client.start()
    E = client.runner.config.emb_size
    rng = np.random.default_rng(1)

    async def one(i: int) -> None:
        await client.step(
            AttendInput(rng.standard_normal((1, prompt, E)).astype(np.float32)),
            SequenceFlags(i, start=True),
            deadline=far(),
        )
        for k in range(steps):
            tok = rng.standard_normal((1, 1, E)).astype(np.float32)
            await client.step(AttendInput(tok), SequenceFlags(i, end=k == steps - 1), deadline=far())

    t0 = time.perf_counter()
    await asyncio.gather(*(one(i) for i in range(n)))
    elapsed = time.perf_counter() - t0
    await client.stop()
    return n * steps / elapsed


async def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--reps", type=int, default=20)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--sequences", type=int, default=64)
    ap.add_argument("--steps", type=int, default=16)
    a = ap.parse_args()
    torch.set_num_threads(a.threads)
    base = {"device": "cpu", "dtype": "float32", "warmup": True, "torch_threads": a.threads, "max_batch_size": 64}
    module = MultiHeadAttention.from_seed(MHAConfig(8, 512, 64, 1024), seed=0).eval()
    client = InprocClient(Settings(**base))
    await client.start()
    print("(a) one generated token, default model (H=8, E=512), CPU, median ms")
    print(
        f"{'context':>8} {'core cached':>12} {'core recompute':>15} {'floor x':>8} "
        f"{'svc cached':>11} {'svc recompute':>14} {'svc x':>7} {'svc span':>9}"
    )
    for ctx in (128, 1024):
        cc, cr = core_costs(module, ctx, a.reps)
        sc, sr, span = await service_costs(client, ctx, a.reps)
        print(f"{ctx:>8} {cc:>12.3f} {cr:>15.3f} {cr / cc:>8.1f} {sc:>11.3f} {sr:>14.3f} {sr / sc:>7.1f} {span:>9.3f}")
    await client.stop()
    print(f"(b) {a.sequences} sequences, 32-token prompt then {a.steps} one-token steps each, tokens/s")
    batched = await many(Settings(**base), a.sequences, 32, a.steps)
    single = await many(Settings(**{**base, "max_batch_size": 1}), a.sequences, 32, a.steps)
    print(f"continuous batching {batched:,.0f}  max_batch_size=1 {single:,.0f}  ratio {batched / single:.1f}x")


if __name__ == "__main__":
    asyncio.run(main())

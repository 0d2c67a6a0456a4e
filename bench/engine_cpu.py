"""The model process's CPU per request: a real Engine socket loop (service/engine/process.py) fed by one real
MPClient front end in this process, ``--at-once`` requests in flight (16 by default); no forward pass.

- ``--batcher next-turn`` (the default): a stand-in batcher that answers each request with its input on the next
  turn of the loop: the crossing alone. Its floor is zero: everything measured is the crossing's.
- ``--batcher real``: the model process as it serves (InprocClient: the batcher, its sweep and its forward
  thread) with the no-op runner of bench/noop_runner.py: everything the model process does per request but the
  forward. Issue 20's target for [1,128,512] bfloat16 is <= 15 us.

    PYTHONPATH=. python -m bench.engine_cpu [--requests 4000] [--shape 1,128,512 --dtype bfloat16 --batcher real]

Arrays of 64 KiB or more cross through shared memory (service/shm.py); ``MHA_SHM_ARENA_MIB=0`` in the environment
sends them as frames on the connection instead, to compare the two in one tree.

Prints the model process's CPU time (user + system, from /proc) per request, the front end's (this process:
its MPClient and the gather that drives it), and each thread's share of the model process's (the
event loop's; the forward thread, the watchdog and the log flusher, by their titles); ``--profile``
also prints where the model process spent it (cProfile, the top functions by their own time). With 1 request in
flight every request is its own message and batch; with 64, 64 share a message and 32 a batch: the spread between
them is the per-message and per-batch cost.

``--every-ms 0,3`` sends a message every 3 ms instead of back to back (0), alternating the two ``--rounds`` times,
and prints a figure for each: the model process's CPU a request when it idles between messages as it does in the
service (bench/procs.py --noop measures that interval and runs this with it). ``--merged`` sends a turn's requests
as one, as a front end groups them (``MPClient._grouped``; ``--in-process`` merges unless ``--unmerged``).

    PYTHONPATH=. python -m bench.engine_cpu --batcher real --shape 1,128,512 --dtype bfloat16 --at-once 13 \
        --merged --every-ms 0,3 --rounds 3

``--in-process`` (the real batcher) measures the same code with nothing else in the way: the model process's
``Engine`` is fed its messages directly in this one process (``Engine._handle``, as its connection calls it), each
message of ``--at-once`` requests built here beforehand, its answers read and their slots given back after, with no
socket, no second process and no other core. It prints the model side's CPU a request, and how much of it was the
answer's copy into the answer arena (``Arena.put``, timed) beside the Python around it: the split that the
two-process run blurs with the crossing, the scheduler and the other core's caches.

    PYTHONPATH=. python -m bench.engine_cpu --in-process --shape 1,128,512 --dtype bfloat16 --at-once 32
"""

from __future__ import annotations

import argparse
import asyncio
import json
import math
import multiprocessing
import os
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # (run as a script: the checkout's bench and service)

from bench.harness import run_time_s, threads_cpu_s


def serve(address: str, ready, batcher: str, shape: tuple, profile: bool) -> None:
    import cProfile
    import pstats
    import signal

    from service.engine import process
    from service.messages import Result
    from service.settings import Settings

    class NextTurn:
        running = True

        def submit(self, inp, *, deadline, done, priority=0):
            asyncio.get_running_loop().call_soon(done, Result(_out(inp), 0.0, 0.0, 1, 1))
            return None

        def cancel(self, handle, reason="disconnect"):
            pass

        def queue_depth(self):
            return (0, 0)

    def _out(inp):
        from service.messages import AttendOutput

        return AttendOutput(inp.x, None)

    async def main() -> None:
        _B, T, E = shape
        if batcher == "real":
            os.environ.update(_model_env(shape))
            engine = process.Engine(Settings(), address)
            await engine.load()
        else:
            engine = process.Engine(Settings(), address)
            engine.batcher = NextTurn()
            cfg = {"num_heads": 4, "emb_size": E, "head_size": E // 4, "max_seq_len": T}
            engine.info = {"model_info": {}, "config": cfg}
            engine.bind()
        ready.set()
        await engine.serve()

    prof = cProfile.Profile() if profile else None

    def dump(*_):
        if prof is not None:
            prof.disable()
            pstats.Stats(prof).sort_stats("tottime").print_stats(25)
        os._exit(0)

    signal.signal(signal.SIGTERM, dump)
    if prof is not None:
        prof.enable()
    process._run(main())


def pace(next_at: float, now: float, every: float) -> tuple[float, float]:
    """``--every-ms``: how long the feeder waits before its next message, and when the one after is due. Messages
    are due every ``every`` seconds from the first; one that is late (a turn took longer) goes at once, and the
    schedule starts again from it, so that a slow turn never makes the next ones come back to back."""
    if next_at <= now:
        return 0.0, now + every
    return next_at - now, next_at + every


async def feed(
    address: str,
    n: int,
    pid: int,
    shape: tuple,
    dtype: str,
    at_once: int,
    merged: bool = False,
    every: tuple[float, ...] = (0.0,),
    rounds: int = 1,
) -> dict[float, float]:
    """The model process's CPU seconds a request for each of ``every`` (seconds from one message to the next; 0:
    back to back), measured in ``rounds`` alternating runs of ``n`` requests each (their sum). ``merged``: a turn's
    requests cross as one, as a front end groups them (``MPClient._grouped``, the service's batch limits)."""
    from service.engine.client import MPClient
    from service.settings import Settings

    settings = Settings()
    client = MPClient(address, group_limits=(settings.max_batch_size, settings.max_batch_tokens) if merged else None)
    await client.start(timeout_s=10)
    x = _input(shape, dtype)

    async def one_turn() -> None:
        await asyncio.gather(*(client.infer(x, deadline=time.monotonic() + 30) for _ in range(at_once)))

    for _ in range(50):  # warm up
        await one_turn()
    turns = max(1, n // at_once)
    used = dict.fromkeys(every, 0.0)
    threads: dict[str, list[float]] = {}
    front = 0.0
    for _ in range(rounds):
        for gap in every:
            c0, t0, f0 = run_time_s(pid), threads_cpu_s(pid), time.process_time()
            next_at = time.monotonic()
            for _ in range(turns):
                wait, next_at = pace(next_at, time.monotonic(), gap)
                if wait > 0:  # the model process idles meanwhile, as it does between a front end's messages
                    await asyncio.sleep(wait)
                await one_turn()
            used[gap] += run_time_s(pid) - c0
            front += time.process_time() - f0
            for name, (user, system) in threads_cpu_s(pid).items():
                u0, s0 = t0.get(name, (0.0, 0.0))
                split = threads.setdefault(name, [0.0, 0.0])
                split[0] += user - u0
                split[1] += system - s0
    await client.stop()
    done = turns * at_once * rounds
    each = done * len(every)  # (the threads' and the front end's figures: over every pace together)
    for name, (user, system) in sorted(threads.items()):
        print(f"  {name:<20} user {user / each * 1e6:6.1f} us  system {system / each * 1e6:6.1f} us")
    print(f"  the front end (this process: MPClient, the crossing's other side) {front / each * 1e6:.1f} us")
    return {gap: u / done for gap, u in used.items()}


class _Unsent:
    """The model process's connection to its front end in ``--in-process``: keeps what it sends, to be read here."""

    def __init__(self) -> None:
        self.sent: list[list] = []

    def send(self, frames: list) -> None:
        self.sent.append(frames)

    def close(self) -> None:
        pass

    def buffered(self) -> int:
        return 0


def _model_env(shape: tuple) -> dict[str, str]:
    """The no-op runner (bench/noop_runner.py) for a model of x's T and E: the batcher as it serves, no forward."""
    _B, T, E = shape
    return {
        "MHA_RUNNER": "bench.noop_runner:runner",
        "MHA_EMB_SIZE": str(E),
        "MHA_NUM_HEADS": "8",
        "MHA_HEAD_SIZE": str(E // 8),
        "MHA_MAX_SEQ_LEN": str(max(T, 16)),
        "MHA_WARMUP": "false",
        "MHA_DEVICE": "cpu",
    }


def _input(shape: tuple, dtype: str):
    """A request's x of ``shape``, random, in ``dtype`` as a front end sends it (bfloat16: its bits, rounded as the
    client rounds them)."""
    from mha_client._wire import f32_to_bf16
    from service.messages import AttendInput

    x = np.random.default_rng(0).standard_normal(shape, dtype=np.float32)
    wire = f32_to_bf16(x) if dtype == "bfloat16" else x.astype(dtype)
    return AttendInput(wire, wire_dtype=dtype, out_dtype=dtype)


async def in_process(
    n: int, shape: tuple, dtype: str, at_once: int, warm: int = 50, merged: bool = True
) -> tuple[float, float]:
    """``--in-process``: the Engine's message path, one message of ``at_once`` requests at a time, timed alone.
    ``merged``: the message's requests merged as a front end merges them (``MPClient._grouped``: one request for
    up to max_batch_size of them); else each crosses on its own. Returns the CPU seconds a request, and the
    answer's copy's share of them."""
    from service import shm
    from service.engine import process
    from service.engine.client import MPClient
    from service.messages import ARENA, Arr, Rows, decode, encode_requests, slot_of
    from service.settings import Settings

    os.environ.update(_model_env(shape))
    settings = Settings()
    engine = process.Engine(settings, f"ipc://{tempfile.mkdtemp()}/engine.sock")
    grouper = MPClient("unused", group_limits=(settings.max_batch_size, settings.max_batch_tokens)) if merged else None
    if grouper is not None:
        grouper._next_id = 1 << 30  # (its merged requests' ids, apart from their members')
    await engine.load()
    conn = _Unsent()
    front = shm.Arena()  # the front end's arena for its requests' x, as MPClient's
    engine._peers[0] = conn
    engine._inputs[0] = shm.Mapped(front.name)
    answers = engine._answers[0] = shm.Arena()
    copy_s = 0.0
    put = answers.put

    def timed_put(a: np.ndarray) -> int | None:  # the answer's copy into the answer arena
        nonlocal copy_s
        t = time.perf_counter()
        try:
            return put(a)
        finally:
            copy_s += time.perf_counter() - t

    answers.put = timed_put
    x = _input(shape, dtype)

    def is_x(a: Arr, want: np.ndarray) -> bool:
        dt = np.dtype(a.dtype)
        view = answers.view(slot_of(a, answers.size), dt.itemsize * math.prod(a.shape))
        return np.array_equal(np.ndarray(tuple(a.shape), dt, view), want)

    freed: tuple[int, ...] = ()
    used = 0.0
    rounds = max(1, n // at_once)
    try:
        for i in range(warm + rounds):
            if i == warm:
                used = copy_s = 0.0
            slots: list[list[int]] = []
            items = [(rid, x, time.monotonic() + 30, None, 0) for rid in range(at_once)]
            if grouper is not None:  # (untimed: the front end's work)
                items = grouper._grouped(items, set())
                grouper._groups.clear()
                grouper._group_of.clear()
            frames = encode_requests(items, front, slots, freed)
            frames = [f if isinstance(f, np.ndarray) else memoryview(f) for f in frames]  # as read: memoryviews
            t0 = time.process_time()
            engine._handle(0, frames)  # as the connection hands it a message it read
            # the batcher's dispatch, its batches (max_batch_size a batch) and the answers' flush, in the next turns
            while engine._pending or engine._flush_scheduled:
                await asyncio.sleep(0)
            used += time.process_time() - t0
            answered = [a for frames in conn.sent for a in decode(frames[0]).items]
            conn.sent.clear()
            if sorted(a.id for a in answered) != sorted(it[0] for it in items):
                raise RuntimeError(f"expected an answer to each of {len(items)} requests, got {answered[:3]}")
            last = answered[-1]
            sent = {it[0]: it[1].x for it in items}[last.id]
            want = np.concatenate(sent) if type(sent) is Rows else sent
            if last.output.frame <= ARENA and not is_x(last.output, want):  # the no-op's answer is its x: untimed
                raise RuntimeError("an answer is not its request's x")
            freed = tuple(a.output.offset for a in answered)  # given back with the next message, as a front end does
            for taken in slots:
                for offset in taken:
                    front.free(offset)
    finally:
        await engine.shutdown(0.0)
        engine.close()  # (its arenas and its mapping of the front end's)
        front.close()
    done = rounds * at_once
    print(
        f"model side CPU per request, in one process: {used / done * 1e6:.1f} us, of which the answer's copy "
        f"{copy_s / done * 1e6:.1f} us, the rest {(used - copy_s) / done * 1e6:.1f} us ({done} requests of "
        f"{list(shape)} {dtype}, {at_once} a message{', merged' if merged else ''}, batcher real)"
    )
    return used / done, copy_s / done


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--requests", type=int, default=4000)
    ap.add_argument("--shape", default="1,16,64", help="x's B,T,E")
    ap.add_argument("--dtype", default="float32", choices=["float32", "float16", "bfloat16"])
    ap.add_argument("--batcher", default="next-turn", choices=["next-turn", "real"])
    ap.add_argument("--at-once", type=int, default=16, help="requests in flight")
    ap.add_argument("--profile", action="store_true")
    ap.add_argument("--in-process", action="store_true", help="the Engine fed in this process (the real batcher)")
    ap.add_argument("--json", type=Path, help="also write the figures here (us a request)")
    ap.add_argument("--merged", action="store_true", help="a turn's requests cross as one, as a front end groups them")
    ap.add_argument(
        "--every-ms", default="0", help="comma-separated: a message every this many ms (0: back to back), alternated"
    )
    ap.add_argument("--rounds", type=int, default=1, help="--every-ms: runs of --requests each per figure")
    ap.add_argument("--unmerged", action="store_true", help="--in-process: each request on its own, not merged")
    args = ap.parse_args()
    shape = tuple(int(v) for v in args.shape.split(","))
    if args.in_process:
        from service.engine import process

        used, copy = process._run(in_process(args.requests, shape, args.dtype, args.at_once, merged=not args.unmerged))
        if args.json:
            args.json.write_text(json.dumps({"us": used * 1e6, "copy_us": copy * 1e6, "at_once": args.at_once}))
        return
    every = tuple(float(v) / 1000 for v in args.every_ms.split(","))
    address = f"ipc://{tempfile.mkdtemp()}/engine.sock"
    ctx = multiprocessing.get_context("spawn")
    ready = ctx.Event()
    p = ctx.Process(target=serve, args=(address, ready, args.batcher, shape, args.profile), daemon=True)
    p.start()
    ready.wait(60)
    try:
        per = asyncio.run(
            feed(address, args.requests, p.pid, shape, args.dtype, args.at_once, args.merged, every, args.rounds)
        )
        how = f"{list(shape)} {args.dtype}, {args.at_once} at once{', merged' if args.merged else ''}"
        for gap, used in per.items():
            when = f"a message every {gap * 1000:g} ms" if gap else "back to back"
            print(f"model process CPU per request: {used * 1e6:.1f} us ({how}, {when}, batcher {args.batcher})")
        if args.json:
            args.json.write_text(
                json.dumps({"at_once": args.at_once, "us": {str(g * 1000): u * 1e6 for g, u in per.items()}})
            )
    finally:
        p.terminate()
        p.join(10)


if __name__ == "__main__":
    main()

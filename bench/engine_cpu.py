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
"""

from __future__ import annotations

import argparse
import asyncio
import multiprocessing
import os
import tempfile
import time

import numpy as np

from bench.harness import proc_cpu_s, threads_cpu_s


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
            os.environ.update(
                MHA_RUNNER="bench.noop_runner:runner",
                MHA_EMB_SIZE=str(E),
                MHA_NUM_HEADS="8",
                MHA_HEAD_SIZE=str(E // 8),
                MHA_MAX_SEQ_LEN=str(max(T, 16)),
                MHA_WARMUP="false",
                MHA_DEVICE="cpu",
            )
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


async def feed(address: str, n: int, pid: int, shape: tuple, dtype: str, at_once: int) -> float:
    from service.engine.client import MPClient
    from service.messages import AttendInput

    client = MPClient(address)
    await client.start(timeout_s=10)
    if dtype == "bfloat16":  # its bits, as the front end sends it
        x = AttendInput(np.ones(shape, np.float32).view(np.uint16)[..., 1::2].copy(), wire_dtype=dtype, out_dtype=dtype)
    else:
        x = AttendInput(np.ones(shape, dtype), wire_dtype=dtype, out_dtype=dtype)

    async def one_turn() -> None:
        await asyncio.gather(*(client.infer(x, deadline=time.monotonic() + 30) for _ in range(at_once)))

    for _ in range(50):  # warm up
        await one_turn()
    c0, t0, f0 = proc_cpu_s(pid), threads_cpu_s(pid), time.process_time()
    for _ in range(n // at_once):
        await one_turn()
    used, t1, front = proc_cpu_s(pid) - c0, threads_cpu_s(pid), time.process_time() - f0
    await client.stop()
    done = n // at_once * at_once
    for name, (user, system) in sorted(t1.items()):
        u0, s0 = t0.get(name, (0.0, 0.0))
        print(f"  {name:<20} user {(user - u0) / done * 1e6:6.1f} us  system {(system - s0) / done * 1e6:6.1f} us")
    print(f"  the front end (this process: MPClient, the crossing's other side) {front / done * 1e6:.1f} us")
    return used / done


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--requests", type=int, default=4000)
    ap.add_argument("--shape", default="1,16,64", help="x's B,T,E")
    ap.add_argument("--dtype", default="float32", choices=["float32", "float16", "bfloat16"])
    ap.add_argument("--batcher", default="next-turn", choices=["next-turn", "real"])
    ap.add_argument("--at-once", type=int, default=16, help="requests in flight")
    ap.add_argument("--profile", action="store_true")
    args = ap.parse_args()
    shape = tuple(int(v) for v in args.shape.split(","))
    address = f"ipc://{tempfile.mkdtemp()}/engine.sock"
    ctx = multiprocessing.get_context("spawn")
    ready = ctx.Event()
    p = ctx.Process(target=serve, args=(address, ready, args.batcher, shape, args.profile), daemon=True)
    p.start()
    ready.wait(60)
    try:
        per = asyncio.run(feed(address, args.requests, p.pid, shape, args.dtype, args.at_once))
        print(
            f"model process CPU per request: {per * 1e6:.1f} us ({args.requests} requests of {list(shape)} "
            f"{args.dtype}, {args.at_once} at once, batcher {args.batcher})"
        )
    finally:
        p.terminate()
        p.join(10)


if __name__ == "__main__":
    main()

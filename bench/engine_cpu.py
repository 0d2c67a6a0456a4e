"""The model process's CPU per request at the crossing: a real Engine socket loop (service/engine/process.py) with
a batcher that answers each request with its input on the next turn of the loop (no forward), fed by one real
MPClient front end in this process with tiny [1,16,64] float32 requests, AT_ONCE in flight.

    PYTHONPATH=. python -m bench.engine_cpu [--requests 4000]

Prints the model process's CPU time (user + system, from /proc) per request.
"""

from __future__ import annotations

import argparse
import asyncio
import multiprocessing
import os
import tempfile
import time

import numpy as np

AT_ONCE = 16


def cpu_s(pid: int) -> float:
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def serve(address: str, ready) -> None:
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
        engine = process.Engine(Settings(), address)
        engine.batcher = NextTurn()
        engine.info = {"model_info": {}, "config": {"num_heads": 4, "emb_size": 64, "head_size": 16, "max_seq_len": 16}}
        import zmq

        engine._sock = engine._ctx.socket(zmq.ROUTER)
        if hasattr(process, "_configure"):
            process._configure(engine._sock)
        engine._sock.bind(address)
        ready.set()
        await engine.serve()

    process._run(main())


async def feed(address: str, n: int, pid: int) -> float:
    from service.engine.client import MPClient
    from service.messages import AttendInput

    client = MPClient(address)
    await client.start(timeout_s=10)
    x = AttendInput(np.ones((1, 16, 64), np.float32))

    async def one_turn() -> None:
        await asyncio.gather(*(client.infer(x, deadline=time.monotonic() + 30) for _ in range(AT_ONCE)))

    for _ in range(50):  # warm up
        await one_turn()
    c0 = cpu_s(pid)
    for _ in range(n // AT_ONCE):
        await one_turn()
    used = cpu_s(pid) - c0
    await client.stop()
    return used / (n // AT_ONCE * AT_ONCE)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--requests", type=int, default=4000)
    args = ap.parse_args()
    address = f"ipc://{tempfile.mkdtemp()}/engine.sock"
    ctx = multiprocessing.get_context("spawn")
    ready = ctx.Event()
    p = ctx.Process(target=serve, args=(address, ready), daemon=True)
    p.start()
    ready.wait(30)
    try:
        per = asyncio.run(feed(address, args.requests, p.pid))
        print(f"model process CPU per request: {per * 1e6:.1f} us ({args.requests} requests, {AT_ONCE} at once)")
    finally:
        p.kill()


if __name__ == "__main__":
    main()

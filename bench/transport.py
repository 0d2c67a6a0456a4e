"""What crossing between two processes costs, per message: zmq against the Unix stream the service uses.

The model process and its front ends talked over zmq (a DEALER per front end, one ROUTER; plain sockets read
when their FD says so), and now talk over ``service.channel`` (a Unix stream on the event loop, uvloop's
transport, its frames behind a length prefix). zmq moves every message through its own I/O thread: a send hands
the message to that thread (an eventfd write, a wake) and an arrival reaches the socket through it (another
wake), on both sides. The stream writes from the caller's thread and is read where epoll says so: no thread
between.

Both run here side by side, the same echo: a client process keeps N messages in flight (sent in one turn of its
loop), a server process answers each on arrival, one send or write a message on both sides (what the stream's
kernel buffer coalesces, zmq's I/O thread batches too), both on uvloop; the CPU time of each process (all its
threads, /proc) per message, at 1, 4, 16 and 64 in flight, medians over ``--rounds`` alternating rounds. Each
reply is checked equal to its message. It measures the transport alone; what the service does with a message is
not in it.

    .venv/bin/python bench/transport.py [--messages 20000] [--rounds 2] [--size 256]
"""

from __future__ import annotations

import argparse
import asyncio
import multiprocessing
import os
import statistics
import sys
import tempfile
from pathlib import Path

import uvloop
import zmq

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.harness import proc_cpu_s
from service import channel

IN_FLIGHT = (1, 4, 16, 64)


# -- the servers: each answers every message with itself --


def zmq_server(address: str, ready) -> None:
    async def main() -> None:
        ctx = zmq.Context()
        sock = ctx.socket(zmq.ROUTER)
        sock.setsockopt(zmq.ROUTER_MANDATORY, 1)
        sock.setsockopt(zmq.LINGER, 0)
        sock.bind(address)

        def drain() -> None:  # the FD is edge-triggered: read until EAGAIN
            while True:
                try:
                    peer, msg = sock.recv_multipart(zmq.NOBLOCK, copy=False)
                except zmq.Again:
                    return
                sock.send_multipart([peer, msg], zmq.NOBLOCK)

        asyncio.get_running_loop().add_reader(sock.getsockopt(zmq.FD), drain)
        ready.set()
        drain()
        await asyncio.Event().wait()

    uvloop.run(main())


def stream_server(address: str, ready) -> None:
    async def main() -> None:
        def echo() -> channel.Connection:  # one send a message, as zmq sends one message a call
            conn = channel.Connection(lambda frames: conn.send(frames), lambda exc: None)
            return conn

        await asyncio.get_running_loop().create_unix_server(echo, sock=channel.listen(address))
        ready.set()
        await asyncio.Event().wait()

    uvloop.run(main())


# -- the clients: N in flight, sent in one turn; returns the server's and its own CPU a message --


class _Turns:
    """Counts the replies of a turn, checks each, and wakes the turn when the last one came."""

    def __init__(self, payload: bytes) -> None:
        self.payload, self.left, self.done = payload, 0, None

    def start(self, n: int) -> asyncio.Future:
        self.left, self.done = n, asyncio.get_running_loop().create_future()
        return self.done

    def reply(self, msg: bytes | memoryview) -> None:
        if msg != self.payload:
            raise AssertionError("a reply differs from its message")
        self.left -= 1
        if not self.left and not self.done.done():
            self.done.set_result(None)


async def _measure(send_turn, turns: _Turns, n_msgs: int, k: int, server_pid: int) -> tuple[float, float]:
    async def turn() -> None:
        done = turns.start(k)
        send_turn(k)
        await asyncio.wait_for(done, 30)

    for _ in range(100):  # warm up
        await turn()
    n = max(1, n_msgs // k)
    s0, c0 = proc_cpu_s(server_pid), proc_cpu_s(os.getpid())
    for _ in range(n):
        await turn()
    s1, c1 = proc_cpu_s(server_pid), proc_cpu_s(os.getpid())
    return (s1 - s0) / (n * k), (c1 - c0) / (n * k)


async def zmq_client(address: str, payload: bytes, n_msgs: int, k: int, server_pid: int) -> tuple[float, float]:
    ctx = zmq.Context()
    sock = ctx.socket(zmq.DEALER)
    sock.setsockopt(zmq.LINGER, 0)
    sock.connect(address)
    turns = _Turns(payload)

    def drain() -> None:
        while True:
            try:
                msg = sock.recv(zmq.NOBLOCK, copy=False)
            except zmq.Again:
                return
            turns.reply(msg.bytes)

    def send_turn(k: int) -> None:
        for _ in range(k):
            sock.send(payload, zmq.NOBLOCK)
        drain()  # a send may take the FD's edge: look once

    fd = sock.getsockopt(zmq.FD)
    asyncio.get_running_loop().add_reader(fd, drain)
    try:
        return await _measure(send_turn, turns, n_msgs, k, server_pid)
    finally:
        asyncio.get_running_loop().remove_reader(fd)
        sock.close()
        ctx.term()


async def stream_client(address: str, payload: bytes, n_msgs: int, k: int, server_pid: int) -> tuple[float, float]:
    turns = _Turns(payload)
    conn = await channel.connect(address, lambda frames: turns.reply(*frames), lambda exc: None, 10)
    try:

        def send_turn(k: int) -> None:
            for _ in range(k):  # one send a message, as zmq sends one message a call
                conn.send([payload])

        return await _measure(send_turn, turns, n_msgs, k, server_pid)
    finally:
        conn.close()


def run(messages: int, rounds: int, size: int) -> dict:
    """{in flight: {"zmq": (server, client) us a message, "stream": (...)}}: medians over ``rounds``."""
    payload = bytes(range(256)) * (size // 256) + bytes(size % 256)
    tmp = tempfile.mkdtemp(prefix="mha-transport-")
    ctx = multiprocessing.get_context("spawn")
    seen: dict[int, dict[str, list[tuple[float, float]]]] = {k: {"zmq": [], "stream": []} for k in IN_FLIGHT}
    kinds = {"zmq": (zmq_server, zmq_client, f"ipc://{tmp}/zmq"), "stream": (stream_server, stream_client, "")}
    for r in range(rounds):
        for name, (server, client, address) in kinds.items():
            address = address or f"ipc://{tmp}/stream-{r}"
            ready = ctx.Event()
            proc = ctx.Process(target=server, args=(address, ready), daemon=True)
            proc.start()
            try:
                if not ready.wait(30):
                    raise RuntimeError(f"the {name} server did not start")
                for k in IN_FLIGHT:
                    seen[k][name].append(uvloop.run(client(address, payload, messages, k, proc.pid)))
            finally:
                proc.terminate()
                proc.join(10)
    return {
        k: {name: tuple(1e6 * statistics.median(v[i] for v in runs) for i in (0, 1)) for name, runs in by.items()}
        for k, by in seen.items()
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--messages", type=int, default=20000, help="messages a measurement (per in-flight level)")
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--size", type=int, default=256, help="bytes a message")
    args = ap.parse_args()
    res = run(args.messages, args.rounds, args.size)
    print(f"CPU a message ({args.size} B, {args.messages} messages a row, median of {args.rounds} rounds)")
    print("| in flight | zmq server | stream server | x | zmq client | stream client | x |")
    print("|---:|---:|---:|---:|---:|---:|---:|")
    for k, r in res.items():
        (zs, zc), (ss, sc) = r["zmq"], r["stream"]
        print(
            f"| {k} | {zs:.1f} us | {ss:.1f} us | {zs / max(ss, 1e-3):.1f}x "
            f"| {zc:.1f} us | {sc:.1f} us | {zc / max(sc, 1e-3):.1f}x |"
        )


if __name__ == "__main__":
    main()

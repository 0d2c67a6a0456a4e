"""The connection between a front end and the model process: messages of frames over a Unix stream socket, read
and written on the event loop (asyncio's, uvloop's where installed).

Why not zmq, which carried these messages before: zmq moves every message through its own I/O thread, so a send
wakes that thread and an arrival wakes the reader through it, on both sides. ``bench/transport.py`` measured it
here (2026-12-06, 2 vCPU, the same echo side by side, one send a message): zmq cost the server 43.8, 18.2, 10.5
and 8.8 us of CPU a message with 1, 4, 16 and 64 in flight, and this module 22.8, 7.7, 4.0 and 3.3 us (the client
1.1-1.8x as much with zmq). What zmq gave on top, a stream gives too: a connection per front end (the
ROUTER's identities), order, nothing dropped (a stream buffers what its peer has not read yet, where a ROUTER
dropped or refused it at its high-water mark), and the peer's end at once (``connection_lost``, where zmq needed
a monitor socket).

A message is a list of frames (the msgspec header of service/messages.py, then its arrays' bytes), framed by a
prefix: the number of frames (u32) and each one's length (u64), little-endian, as msgspec's own asyncio example
frames its messages with their length. Frames arrive as memoryviews of the bytes read (read-only), or of the buffer
a message that spanned reads was gathered in (copied once, there).
"""

from __future__ import annotations

import asyncio
import logging
import os
import socket
import struct
from collections.abc import Callable
from typing import Any

log = logging.getLogger("mha_serve.engine")

_COUNT = struct.Struct("<I")
_LENGTHS: dict[int, struct.Struct] = {}  # n -> the struct of n frame lengths
MAX_FRAMES = 4096  # a prefix that says more is not ours: the connection is closed
JOIN_BELOW = 64 << 10  # a message smaller than this is joined into one write; a larger one is written frame by frame
SCHEME = "ipc://"


def path_of(address: str) -> str:
    """``ipc:///run/x/engine.sock`` -> ``/run/x/engine.sock`` (the address the supervisor hands the front ends)."""
    if not address.startswith(SCHEME) or len(address) == len(SCHEME):
        raise ValueError(f"the engine address must be {SCHEME}<path of a Unix socket>, got {address!r}")
    return address[len(SCHEME) :]


def listen(address: str, backlog: int = 128) -> socket.socket:
    """A Unix socket bound at ``address``'s path and listening (a stale file there is replaced), for
    ``loop.create_unix_server(sock=...)``: bound before the loop serves it, so that front ends can connect as soon
    as the model process says it is ready."""
    path = path_of(address)
    if os.path.exists(path):
        os.unlink(path)
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        sock.bind(path)
        sock.listen(backlog)
        sock.setblocking(False)
    except BaseException:
        sock.close()
        raise
    return sock


def _lengths(n: int) -> struct.Struct:
    s = _LENGTHS.get(n)
    if s is None:
        s = _LENGTHS[n] = struct.Struct(f"<{n}Q")
    return s


def prefix(frames: list) -> tuple[bytes, int]:
    """A message's prefix and its frames' total size."""
    sizes = [f.nbytes if hasattr(f, "nbytes") else len(f) for f in frames]  # (numpy arrays and memoryviews: nbytes)
    return _COUNT.pack(len(sizes)) + _lengths(len(sizes)).pack(*sizes), sum(sizes)


class Connection(asyncio.Protocol):
    """One end of a connection: ``send`` a message (a list of frames); each message read is handed to
    ``on_message`` (its frames, as memoryviews), in order; ``on_lost`` is called once when the connection ends
    (its peer closed it or died, or it broke), not after ``close``."""

    def __init__(self, on_message: Callable[[list], Any], on_lost: Callable[[BaseException | None], Any]) -> None:
        self._on_message = on_message
        self._on_lost = on_lost
        self.transport: asyncio.Transport | None = None
        self._buf = bytearray()  # the part of a message that came so far (only when one spans reads)
        self._need = 0  # the bytes the message in _buf needs, once its prefix is whole (0: not known yet)
        self._closed = False

    # -- asyncio.Protocol --

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]

    def connection_lost(self, exc: BaseException | None) -> None:
        self.transport = None
        if not self._closed:
            self._closed = True
            self._on_lost(exc)

    def data_received(self, data: bytes) -> None:
        buf = self._buf
        if buf:
            buf += data
            if len(buf) < self._need:  # a large message, still coming: wait for the rest without looking again
                return
            data = buf  # read from here on (its frames are views of it, never resized again); a new one takes the rest
            self._buf = buf = bytearray()
            self._need = 0
        view, at, end = memoryview(data), 0, len(data)
        handle = self._on_message
        while end - at >= 4:
            (n,) = _COUNT.unpack_from(data, at)
            if n > MAX_FRAMES:
                log.error("a message of %d frames on the engine's connection: not ours, closing it", n)
                self.transport.abort()
                return
            head = 4 + 8 * n
            if end - at < head:
                break
            sizes = _lengths(n).unpack_from(data, at + 4)
            total = head + sum(sizes)
            if end - at < total:
                self._need = total
                break
            frames, p = [], at + head
            for size in sizes:
                frames.append(view[p : p + size])
                p += size
            at += total
            try:
                handle(frames)
            except Exception:  # one bad message must not stop the reading
                log.exception("a message on the engine's connection could not be handled")
            if self.transport is None or self._closed:  # (closed by the handler)
                return
        if at < end:
            buf += view[at:]

    # -- this end --

    def send(self, frames: list) -> bool:
        """Write one message, never blocking: what the socket does not take now is buffered by the transport, in
        order, and written as the peer reads. False when the connection is closed (nothing is written)."""
        t = self.transport
        if t is None or t.is_closing():
            return False
        head, size = prefix(frames)
        if size < JOIN_BELOW:
            t.write(b"".join([head, *frames]))
        else:
            t.writelines([head, *frames])
        return True

    def buffered(self) -> int:
        """Bytes written and not yet taken by the socket (the peer has not read them)."""
        t = self.transport
        return 0 if t is None else t.get_write_buffer_size()

    def close(self) -> None:
        """Close this end once what is buffered is written; ``on_lost`` is not called for it."""
        self._closed = True
        if self.transport is not None:
            self.transport.close()


async def connect(address: str, on_message: Callable[[list], Any], on_lost: Callable, timeout_s: float) -> Connection:
    """Connect to the model process at ``address``, trying again while nothing listens there yet (it may still be
    binding), for up to ``timeout_s``; TimeoutError after that."""
    path = path_of(address)
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout_s
    while True:
        try:
            _, conn = await asyncio.wait_for(
                loop.create_unix_connection(lambda: Connection(on_message, on_lost), path),
                max(0.001, deadline - loop.time()),
            )
            return conn
        except (FileNotFoundError, ConnectionRefusedError) as e:
            if loop.time() >= deadline:
                raise TimeoutError(f"nothing listens at {address} ({e})") from None
            await asyncio.sleep(min(0.05, max(0.0, deadline - loop.time())))

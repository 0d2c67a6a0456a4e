"""service/channel.py: messages of frames over a Unix stream. Whole messages come out, in order, however the
kernel splits or joins the bytes; a message spanning many reads is reassembled once; a connection's end is told
to the other side (and not to the side that closed it); a prefix that is not ours closes the connection."""

from __future__ import annotations

import asyncio
import os

import numpy as np
import pytest

from service import channel


class Collect:
    def __init__(self) -> None:
        self.messages: list[list[bytes]] = []
        self.lost: list[BaseException | None] = []

    def conn(self) -> channel.Connection:
        return channel.Connection(lambda frames: self.messages.append([bytes(f) for f in frames]), self.lost.append)


class FakeTransport:
    """Enough of a transport for data_received (closing is recorded)."""

    def __init__(self) -> None:
        self.aborted = False

    def abort(self) -> None:
        self.aborted = True

    def is_closing(self) -> bool:
        return self.aborted


def wire(frames: list) -> bytes:
    head, _ = channel.prefix(frames)
    return head + b"".join(bytes(memoryview(f).cast("B")) for f in frames)


MESSAGES = [
    [b"header"],
    [b"h", b"", b"x" * 100],
    [b"big", bytes(range(256)) * 1024],  # 256 KiB: spans reads
    [b"arr", np.arange(7, dtype=np.float32)],
]


@pytest.mark.parametrize("chunk", [1, 3, 4, 11, 4096, 1 << 20])
def test_whole_messages_come_out_in_order_however_the_reads_split_the_bytes(chunk):
    sink = Collect()
    conn = sink.conn()
    conn.connection_made(FakeTransport())
    stream = b"".join(wire(m) for m in MESSAGES)
    for at in range(0, len(stream), chunk):
        conn.data_received(stream[at : at + chunk])
    want = [[bytes(memoryview(f).cast("B")) for f in m] for m in MESSAGES]
    assert sink.messages == want
    assert not conn._buf and conn._need == 0  # nothing left over


def test_a_message_spanning_many_reads_is_not_looked_at_again_until_it_is_whole(monkeypatch):
    sink = Collect()
    conn = sink.conn()
    conn.connection_made(FakeTransport())
    big = wire([b"h", bytes(1 << 20)])
    parsed = []
    real = channel._lengths
    monkeypatch.setattr(channel, "_lengths", lambda n: parsed.append(n) or real(n))
    for at in range(0, len(big), 1 << 12):  # 256 reads
        conn.data_received(big[at : at + (1 << 12)])
    assert sink.messages == [[b"h", bytes(1 << 20)]]
    assert len(parsed) == 2  # the prefix read once when it came, once when the message was whole


def test_a_prefix_with_more_frames_than_any_message_of_ours_closes_the_connection():
    sink = Collect()
    conn = sink.conn()
    transport = FakeTransport()
    conn.connection_made(transport)
    conn.data_received((channel.MAX_FRAMES + 1).to_bytes(4, "little") + bytes(64))
    assert transport.aborted and sink.messages == []


def test_a_message_a_handler_fails_on_is_logged_and_the_next_ones_are_read(caplog):
    got = []

    def handle(frames):
        if bytes(frames[0]) == b"bad":
            raise ValueError("no")
        got.append(bytes(frames[0]))

    conn = channel.Connection(handle, lambda exc: None)
    conn.connection_made(FakeTransport())
    conn.data_received(wire([b"one"]) + wire([b"bad"]) + wire([b"two"]))
    assert got == [b"one", b"two"]
    assert "could not be handled" in caplog.text


@pytest.mark.parametrize("address", ["tcp://127.0.0.1:5555", "ipc://", "/tmp/x.sock"])
def test_an_address_that_is_not_ipc_and_a_path_is_refused_saying_what_it_must_be(address):
    with pytest.raises(ValueError, match="ipc://<path"):
        channel.path_of(address)


async def test_over_a_real_socket_both_ways_and_the_end_is_told_to_the_other_side_only(tmp_path):
    address = f"ipc://{tmp_path}/s.sock"
    server_side, client_side = Collect(), Collect()
    accepted: list[channel.Connection] = []

    def factory() -> channel.Connection:
        accepted.append(server_side.conn())
        return accepted[-1]

    listener = channel.listen(address)
    server = await asyncio.get_running_loop().create_unix_server(factory, sock=listener)
    try:
        client = await channel.connect(
            address, lambda f: client_side.messages.append([bytes(x) for x in f]), client_side.lost.append, 5
        )
        big = np.arange(1 << 18, dtype=np.float32)  # 1 MiB: written frame by frame
        assert client.send([b"small", b"abc"]) and client.send([b"big", big])
        for _ in range(500):
            if len(server_side.messages) == 2:
                break
            await asyncio.sleep(0.01)
        assert server_side.messages == [[b"small", b"abc"], [b"big", big.tobytes()]]
        assert accepted[0].send([b"back"])
        for _ in range(500):
            if client_side.messages:
                break
            await asyncio.sleep(0.01)
        assert client_side.messages == [[b"back"]]
        accepted[0].close()  # this side closes: its own on_lost is not called, the other side's is
        for _ in range(500):
            if client_side.lost:
                break
            await asyncio.sleep(0.01)
        assert client_side.lost == [None] and server_side.lost == []
        assert not client.send([b"late"])  # closed: nothing written, and it says so
    finally:
        server.close()
        listener.close()


async def test_listen_replaces_a_stale_socket_file_and_connect_gives_up_after_its_timeout(tmp_path):
    path = tmp_path / "s.sock"
    path.write_bytes(b"")  # a leftover of a run that died
    listener = channel.listen(f"ipc://{path}")
    listener.close()
    os.unlink(path)
    with pytest.raises(TimeoutError, match="nothing listens"):
        await channel.connect(f"ipc://{path}", lambda f: None, lambda e: None, 0.2)

"""bench/transport.py: its stream's length-prefix framing takes whole messages off a byte stream however the reads
split it, and its two echoes (zmq, a Unix stream) answer every message with itself."""

from __future__ import annotations

import asyncio

import pytest

from bench import transport


def test_frames_come_off_the_stream_whole_however_the_reads_split_them():
    messages = [b"", b"a", bytes(range(256)) * 5, b"xyz" * 100]
    stream = b"".join(transport.framed(m) for m in messages)
    for cut in (1, 3, 4, 5, 7, 64, len(stream)):  # reads of every size, split inside prefixes and payloads
        buf, got = bytearray(), []
        for at in range(0, len(stream), cut):
            buf += stream[at : at + cut]
            got += transport.frames_of(buf)
        assert got == messages, cut
        assert not buf, cut  # nothing left over


def test_a_partial_frame_waits_for_the_rest():
    buf = bytearray(transport.framed(b"hello")[:-2])
    assert transport.frames_of(buf) == []
    assert len(buf) == 4 + 3  # kept, untouched
    buf += b"lo"
    assert transport.frames_of(buf) == [b"hello"]


@pytest.mark.timeout(120)
def test_both_echoes_answer_every_message_with_itself_at_every_depth():
    # A reply that differs raises in the client (_Turns.reply); a lost one times its turn out. Figures from so
    # short a run are noise (CPU is counted in 10 ms ticks): only that each was measured is checked.
    res = transport.run(messages=256, rounds=1, size=300)
    assert set(res) == set(transport.IN_FLIGHT)
    for by in res.values():
        assert set(by) == {"zmq", "stream"}
        for server_us, client_us in by.values():
            assert server_us >= 0 and client_us >= 0


def test_a_reply_that_differs_from_its_message_fails_the_turn():
    turns = transport._Turns(b"abc")

    async def go() -> None:
        turns.start(2)
        turns.reply(b"abc")
        with pytest.raises(AssertionError, match="differs"):
            turns.reply(b"abd")

    asyncio.run(go())

"""bench/transport.py: its two echoes (zmq, the service's Unix stream, service/channel.py, whose framing
tests/unit/test_channel.py tests) answer every message with itself."""

from __future__ import annotations

import asyncio

import pytest

from bench import transport


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

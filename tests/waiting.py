"""Waiting in a test for something that happens on the event loop, within a bound."""

from __future__ import annotations

import asyncio
import time


async def until(cond, timeout_s: float = 5.0) -> None:
    """Poll ``cond`` every 5 ms until it is true; fail the test if it is not within ``timeout_s``."""
    give_up = time.monotonic() + timeout_s
    while not cond():
        assert time.monotonic() < give_up, f"not within {timeout_s:g} s"
        await asyncio.sleep(0.005)

"""The garbage collector of a serving process (a front end, the model process, or the single process).

Once started: the start-up objects (modules, the model, the app) are collected and frozen, out of the
collector's view, so that its full passes do not walk them (those made the latency tails). Then the
youngest generation is collected every GEN0 allocations instead of CPython's default 700: a request
allocates a few hundred objects, nearly all freed by reference counting when it ends, and with 64
requests in flight the default collected the young generation every few requests, walking every live
request's objects each time. At GEN0 = 10,000 a small request's front-end CPU fell measurably (bench/front.py's
set-up; the figures are in the commit that set it); the young generation holds about a megabyte more at most.
"""

from __future__ import annotations

import gc

GEN0 = 10_000


def settle() -> None:
    """Collect and freeze what start-up made, and collect the young generation every GEN0 allocations."""
    gc.collect()
    gc.freeze()
    _, gen1, gen2 = gc.get_threshold()
    gc.set_threshold(GEN0, gen1, gen2)

"""What every process of the service does about itself: its title, its threads' names, its allocator, and dying
with its parent.

Shared by both sides (the model process, the front ends, their decode processes, the supervisor), so that
``ps`` and ``top`` say which process (and ``top -H`` which thread) is which (setproctitle), and no process outlives
the one that started it.
"""

from __future__ import annotations

import ctypes
import os
import signal
import sys

_watched = False  # the kernel signals this process when its parent dies (die_with_parent succeeded)


def set_title(title: str) -> None:
    """``mha-serve: model``, ``mha-serve: front 1``...: the title ``ps`` and ``top`` show."""
    import setproctitle

    setproctitle.setproctitle(title)


def title_thread() -> None:
    """The calling thread's OS name is its Python name (``mha-forward-0``, ``mha-watchdog``...), so that ``top -H``,
    ``ps -L`` and /proc/PID/task/*/comm tell the service's threads apart (Python 3.11 does not name OS threads;
    otherwise each shows its process's title). Called first thing by each thread the service starts."""
    import threading

    import setproctitle

    setproctitle.setthreadtitle(threading.current_thread().name)


# glibc's mallopt parameters
_M_TRIM_THRESHOLD = -1
_M_MMAP_THRESHOLD = -3
MALLOC_MIB_DEFAULT = 4  # MHA_MALLOC_MMAP_THRESHOLD_MIB (service/settings.py)
MALLOC_MIB_MAX = 32  # glibc's ceiling for the threshold on 64 bits (HEAP_MAX_SIZE / 2)
_GLIBC_ENV = ("MALLOC_MMAP_THRESHOLD_", "MALLOC_TRIM_THRESHOLD_", "GLIBC_TUNABLES")


def tune_malloc(mib: int) -> bool:
    """glibc: blocks under ``mib`` MiB come from the heap, which keeps up to twice that free at its top instead of
    giving it back to the kernel at once. Returns whether it was set. The front ends and the model process call it
    first thing, with MHA_MALLOC_MMAP_THRESHOLD_MIB (4 by default).

    A request's body and its arrays are such blocks (a [1,128,512] bfloat16 v2 body is 128 KiB). Left to itself,
    glibc maps a block of 128 KiB or more afresh and unmaps it when it is freed; it moves its threshold up only
    once it has freed a mapped block, and gives the heap's top back whenever more than twice the threshold lies
    free there. A process serving bodies of that size then faults the pages of body after body in again:
    ``tests/unit/test_malloc.py``'s loop (read a 128 KiB body into a buffer, split it, join it) took 81 page
    faults an iteration, none tuned; the front ends of a split server took 4.1 a request of 128 KiB, none tuned
    (``tests/e2e/test_procs_e2e.py``), and in the no-op GPU case (``bench/procs.py --noop --against`` the commit
    before, 4 runs of 6 rounds on a 2-vCPU VM) they spent 0-13% less CPU a request (264-342 against 304-360 us),
    for 1-14% more requests a second. Not 32 MiB, glibc's ceiling: with 50 MB JSON bodies decoded 4 at once
    (``bench/memory.py``) their 10 MB arrays then stayed in the heap, and the peak grew by 20 MiB; at 4 MiB it
    did not move. The decode processes keep glibc's defaults: they parse bodies of tens of MB, whose pages a
    fault more or less does not weigh on.

    0 leaves glibc's defaults, and so does any MALLOC_*_ or GLIBC_TUNABLES variable in the environment (an
    operator's own choice). Elsewhere than glibc (musl, macOS) nothing is done.
    """
    if mib <= 0 or not sys.platform.startswith("linux") or any(k in os.environ for k in _GLIBC_ENV):
        return False
    try:
        libc = ctypes.CDLL(None)
        libc.gnu_get_libc_version  # noqa: B018 (glibc's own: musl has a mallopt that does nothing)
        mallopt = libc.mallopt
    except (OSError, AttributeError):
        return False
    threshold = min(mib, MALLOC_MIB_MAX) << 20
    return mallopt(_M_MMAP_THRESHOLD, threshold) == 1 and mallopt(_M_TRIM_THRESHOLD, 2 * threshold) == 1


def die_with_parent(sig: int = signal.SIGKILL) -> bool:
    """Linux: the kernel sends ``sig`` to this process when its parent dies (even by kill -9), the one way to
    know at once without polling. False where it cannot be set: the caller then watches ``os.getppid()``."""
    global _watched
    if not sys.platform.startswith("linux"):
        return False
    try:
        _watched = ctypes.CDLL(None, use_errno=True).prctl(1, int(sig)) == 0  # PR_SET_PDEATHSIG
    except (OSError, AttributeError):
        return False
    return _watched


def parent_watched_by_kernel() -> bool:
    """Whether :func:`die_with_parent` took effect in this process (no polling of the parent needed)."""
    return _watched

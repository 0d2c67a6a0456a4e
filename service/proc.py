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
MALLOC_MIB_MAX = 32  # glibc's ceiling for the threshold on 64 bits (HEAP_MAX_SIZE / 2)
MALLOC_MIB_DEFAULT = MALLOC_MIB_MAX  # MHA_MALLOC_MMAP_THRESHOLD_MIB (service/settings.py)
_GLIBC_ENV = ("MALLOC_MMAP_THRESHOLD_", "MALLOC_TRIM_THRESHOLD_", "GLIBC_TUNABLES")


def tune_malloc(mib: int) -> bool:
    """glibc: blocks under ``mib`` MiB come from the heap, which keeps up to twice that free at its top instead of
    giving it back to the kernel at once. Returns whether it was set. The front ends and the model process (or the
    one process) call it first thing, with MHA_MALLOC_MMAP_THRESHOLD_MIB (32 by default).

    A request's body and its arrays are such blocks (a [1,128,512] bfloat16 v2 body is 128 KiB). Left to itself,
    glibc maps a block of 128 KiB or more afresh and unmaps it when it is freed; it moves its threshold up (to 32
    MiB at most) only as it frees mapped blocks, and gives the heap's top back whenever more than twice the
    threshold lies free there. A process serving bodies of that size then faults the pages of body after body in
    again: ``tests/unit/test_malloc.py``'s loop (read a 128 KiB body into a buffer, split it, join it) took 81 page
    faults an iteration, none tuned; the front ends of a split server took 2-10 a 128 KiB request, none tuned
    (``tests/e2e/test_procs_e2e.py``). This is the state glibc's own rule reaches at its ceiling, set from the
    start, so that a process's costs do not depend on which sizes it happened to free first.

    Not lower: at 4 MiB a batch of 32 [128,512] rows faulted 10,243 pages in a forward pass (its 8 and 16 MiB
    tensors mapped afresh each time, where glibc's own rule had moved its threshold above them), and the forward
    took 16-26% more CPU. The cost: a process may keep up to 64 MiB free on its heap after a burst; with four 50 MB
    JSON bodies decoded at once (``bench/memory.py``) the one process's peak grew by up to 27 MiB (4%). The decode
    processes keep glibc's defaults: they parse bodies of tens of MB, on which a fault more or less does not weigh,
    and tuned, their peak grew by 48 MiB.

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

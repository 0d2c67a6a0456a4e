"""What every process of the service does about itself: its title, its threads' names, and dying with its parent.

Shared by both sides (the model process, the front ends, their decode processes, the supervisor), so that
``ps`` and ``top`` say which process (and ``top -H`` which thread) is which (setproctitle), and no process outlives
the one that started it.
"""

from __future__ import annotations

import ctypes
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

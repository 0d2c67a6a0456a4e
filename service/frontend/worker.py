"""A front-end worker process: the app, with the model process as its batcher. Imports no torch.

uvicorn's multi-worker supervisor (``uvicorn.supervisors.Multiprocess``) spawns these and
restarts one that dies; they share the listening socket the parent bound. Settings come from the
environment (the parent wrote --host/--port into it), the model process's address from
MHA_ENGINE_ADDRESS.
"""

from __future__ import annotations

import fcntl
import itertools
import os
import signal

from fastapi import FastAPI

from service.messages import ADDRESS_ENV
from service.proc import die_with_parent, set_title, tune_malloc
from service.settings import RUN_DIR_ENV


def create_front_app() -> FastAPI:
    from service.app import create_app
    from service.logs import configure_logging
    from service.settings import Settings

    settings = Settings()
    configure_logging(settings.log_level, settings.log_format)
    _set_title()
    tune_malloc(settings.malloc_mmap_threshold_mib)
    die_with_parent(signal.SIGTERM)  # the supervisor gone (kill -9): drain and leave, as on its own SIGTERM
    app = create_app(settings=settings, engine_address=os.environ[ADDRESS_ENV])
    _drain_on_signal(app)
    return app


def _set_title() -> None:
    """``mha-serve: front N``, N the lowest number no live front end holds (a replacement takes its
    predecessor's): held by a lock in the supervisor's directory, which the kernel lets go when this process
    dies, however it dies."""
    folder = os.environ.get(RUN_DIR_ENV)
    number = _claim_number(folder) if folder else os.getpid()
    set_title(f"mha-serve: front {number}")


_held: list = []  # the open lock file: held for the process's life


def _claim_number(folder: str) -> int:
    for n in itertools.count(1):
        f = open(os.path.join(folder, f"front-{n}.lock"), "w")  # noqa: SIM115 (held open: the lock is the claim)
        try:
            fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            f.close()
            continue
        _held.append(f)
        return n


def _drain_on_signal(app: FastAPI) -> None:
    """Make SIGTERM/SIGINT begin the one-grace drain (as service.cli's _Server) before uvicorn's handler runs.

    uvicorn's server installs its handler (``signal.signal``) before the lifespan starts; this installs one
    at lifespan start-up that begins the drain, then calls the handler it found. Only public calls: whatever
    handler uvicorn installs, it still runs. (uvicorn raises a SIGTERM it handled again once the server is
    done, so a front end that drained ends by SIGTERM; the supervisor counts that as a clean stop.)
    """
    state = app.state.mha
    router = app.router
    inner = router.lifespan_context

    def lifespan(a):
        for sig in (signal.SIGTERM, signal.SIGINT):
            handler = signal.getsignal(sig)
            if not callable(handler):  # SIG_DFL or SIG_IGN: not under a server that stops on signals
                continue

            def on_signal(s, frame, handler=handler):
                state.begin_shutdown()
                handler(s, frame)

            signal.signal(sig, on_signal)
        return inner(a)

    router.lifespan_context = lifespan

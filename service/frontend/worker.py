"""A front-end worker process: the app, with the model process as its batcher. Imports no torch.

uvicorn's multi-worker supervisor (``uvicorn.supervisors.Multiprocess``) spawns these and
restarts one that dies; they share the listening socket the parent bound. Settings come from the
environment (the parent wrote --host/--port into it), the model process's address from
MHA_ENGINE_ADDRESS.
"""

from __future__ import annotations

import os
import signal

from fastapi import FastAPI

from service.messages import ADDRESS_ENV


def create_front_app() -> FastAPI:
    from service.app import create_app
    from service.logs import configure_logging
    from service.settings import Settings

    settings = Settings()
    configure_logging(settings.log_level, settings.log_format)
    app = create_app(settings=settings, engine_address=os.environ[ADDRESS_ENV])
    _drain_on_signal(app)
    return app


def _drain_on_signal(app: FastAPI) -> None:
    """Make uvicorn's SIGTERM/SIGINT handler begin the one-grace drain first (as service.cli's _Server).

    uvicorn installs its handler before the lifespan starts; this wraps it at lifespan start-up. A
    SIGTERM that drained is a success: the worker exits 0 rather than re-raising the signal.
    """
    state = app.state.mha
    router = app.router
    inner = router.lifespan_context

    def lifespan(a):
        for sig in (signal.SIGTERM, signal.SIGINT):
            handler = signal.getsignal(sig)
            server = getattr(handler, "__self__", None)
            if server is None or not hasattr(server, "_captured_signals"):
                continue

            def on_signal(s, frame, handler=handler, server=server):
                state.begin_shutdown()
                deadline = state.shutdown_deadline
                if deadline is not None:  # uvicorn's wait for connections ends at the same deadline
                    import time

                    server.config.timeout_graceful_shutdown = max(0.05, deadline - time.monotonic() - 0.1)
                handler(s, frame)
                if s == signal.SIGTERM and s in server._captured_signals:
                    server._captured_signals.remove(s)

            signal.signal(sig, on_signal)
        return inner(a)

    router.lifespan_context = lifespan

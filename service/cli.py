"""``mha-serve``: start uvicorn on the app, with settings from MHA_* and --host/--port."""

from __future__ import annotations

import argparse
import contextlib
import logging
import os
import signal
import sys
import threading
import time
from collections.abc import Iterator

import uvicorn
from pydantic import ValidationError

from service.settings import Settings


class _Server(uvicorn.Server):
    """On SIGTERM/SIGINT, turn not-ready, refuse new work and start draining at once.

    The whole shutdown, from the signal to the exit, fits in one MHA_SHUTDOWN_GRACE_S: the
    batcher drains until shortly before the deadline and then answers what is left with 503;
    uvicorn's wait for open connections ends at the same deadline (not a grace of its own
    before the batcher's), and the lifespan shutdown finds the batcher already stopped.

    Through uvicorn's public methods only (``capture_signals``, ``handle_exit``, ``shutdown``), so that an
    upgrade cannot turn the drain off unseen (tests/unit/test_drain_signals.py runs it on the real server).
    """

    def __init__(self, config: uvicorn.Config, app) -> None:
        super().__init__(config)
        self._mha_state = app.state.mha
        self._interrupted = False

    @contextlib.contextmanager
    def capture_signals(self) -> Iterator[None]:
        """uvicorn's, but a SIGTERM that drained is a success: it is not raised again at the end (the process
        exits 0, not -15). A SIGINT is, so that a Ctrl-C still ends as one."""
        if threading.current_thread() is not threading.main_thread():  # signals reach the main thread only
            yield
            return
        original = {sig: signal.signal(sig, self.handle_exit) for sig in (signal.SIGINT, signal.SIGTERM)}
        try:
            yield
        finally:
            for sig, handler in original.items():
                signal.signal(sig, handler)
        if self._interrupted:
            signal.raise_signal(signal.SIGINT)

    def handle_exit(self, sig, frame) -> None:
        self._mha_state.begin_shutdown()
        self._interrupted = self._interrupted or sig == signal.SIGINT
        super().handle_exit(sig, frame)

    async def shutdown(self, sockets=None) -> None:
        deadline = self._mha_state.shutdown_deadline
        if deadline is not None:  # what is left of the one grace period (uvicorn sleeps 0.1 s first)
            self.config.timeout_graceful_shutdown = max(0.05, deadline - time.monotonic() - 0.1)
        await super().shutdown(sockets)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="mha-serve", description="Serve multi-head attention over HTTP.")
    parser.add_argument("--host", help="address to bind (MHA_HOST, default 127.0.0.1)")
    parser.add_argument("--port", type=int, help="port to bind (MHA_PORT, default 8000)")
    args = parser.parse_args(argv)
    overrides = {k: v for k, v in (("host", args.host), ("port", args.port)) if v is not None}
    try:
        settings = Settings(**overrides)
    except ValidationError as e:
        lines = [
            f"  {'MHA_' + '_'.join(str(p) for p in err['loc']).upper() if err['loc'] else 'settings'}: {err['msg']}"
            for err in e.errors()
        ]
        print("mha-serve: invalid settings:\n" + "\n".join(lines), file=sys.stderr)
        return 2
    from service.logs import configure_logging
    from service.settings import default_workers

    if settings.engine == "inprocess" and (settings.workers or 1) > 1:
        print(
            "mha-serve: invalid settings:\n  MHA_ENGINE: inprocess runs one process; MHA_WORKERS must be 1",
            file=sys.stderr,
        )
        return 2
    workers = 1 if settings.engine == "inprocess" else settings.workers or default_workers(settings.device)
    if workers > 1 or settings.engine == "process":
        from service.engine import supervise

        configure_logging(settings.log_level, settings.log_format)
        return supervise.serve(settings, workers)
    # Imported here, not at the top: the decode processes (spawned) import this module as their
    # __main__, and must not import torch with it.
    from service.app import create_app

    configure_logging(settings.log_level, settings.log_format)
    from service.proc import set_title, tune_malloc

    set_title("mha-serve")  # the one-process server (its decode processes: mha-serve: decode)
    tune_malloc(settings.malloc_mmap_threshold_mib)
    app = create_app(settings=settings)
    config = uvicorn.Config(
        app,
        host=settings.host,
        port=settings.port,
        log_level=settings.log_level,
        log_config=None,  # keep our JSON handler
        timeout_graceful_shutdown=max(0.05, settings.shutdown_grace_s),  # counted from the signal (_Server)
        access_log=False,
    )
    server = _Server(config, app)
    server.run()
    code = 0 if server.started else 1
    engine = app.state.mha.engine
    if engine is not None and engine.forward_running:
        # A forward ran past the grace (its requests were answered 503). It cannot be interrupted,
        # and finalising the interpreter under a running torch op can abort the process: leave now.
        logging.getLogger("mha_serve").warning("a forward pass was still running at exit; not waiting for it")
        logging.shutdown()
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(code)
    return code


if __name__ == "__main__":
    sys.exit(main())

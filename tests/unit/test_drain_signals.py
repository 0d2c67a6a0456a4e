"""The drain is wired to uvicorn's signal handling, on the uvicorn installed: a SIGTERM to a running server
begins it (service/cli.py's _Server, and service/frontend/worker.py's hook under uvicorn's own Server, as a
front end runs). Fails if an upgrade stops calling the hooks (pyproject.toml bounds uvicorn to what this
passed on)."""

from __future__ import annotations

import os
import signal
import threading
import time

import pytest
import uvicorn
from starlette.applications import Starlette

from service.cli import _Server
from service.frontend.worker import _drain_on_signal


class State:
    """What the hooks call on the app's state."""

    def __init__(self) -> None:
        self.began: list[float] = []
        self.shutdown_deadline: float | None = None

    def begin_shutdown(self) -> None:
        self.began.append(time.monotonic())
        self.shutdown_deadline = time.monotonic() + 2.0


@pytest.fixture
def raised_again():
    """The SIGTERM handler in place before the server: uvicorn calls it again once the server is done."""
    got: list[int] = []
    before = {s: signal.signal(s, lambda sig, frame: got.append(sig)) for s in (signal.SIGTERM,)}
    try:
        yield got
    finally:
        for s, h in before.items():
            signal.signal(s, h)


def app_with_state() -> tuple[Starlette, State]:
    app = Starlette()
    app.state.mha = State()
    return app, app.state.mha


def run_and_signal(server: uvicorn.Server, sig: int) -> float:
    """Run ``server`` here (the main thread, where signals land) and send ``sig`` once it serves; the time it
    took to stop after the signal."""
    sent: list[float] = []

    def send() -> None:
        deadline = time.monotonic() + 10
        while not server.started and time.monotonic() < deadline:
            time.sleep(0.02)
        if not server.started:
            server.should_exit = True
            return
        sent.append(time.monotonic())
        os.kill(os.getpid(), sig)

    t = threading.Thread(target=send, daemon=True)
    t.start()
    server.run()
    t.join(5)
    assert sent, "the server did not start"
    return time.monotonic() - sent[0]


def config(app) -> uvicorn.Config:
    return uvicorn.Config(app, host="127.0.0.1", port=0, log_config=None, lifespan="on", timeout_graceful_shutdown=2)


def test_the_one_process_server_drains_on_sigterm_and_exits_0(raised_again):
    app, state = app_with_state()
    took = run_and_signal(_Server(config(app), app), signal.SIGTERM)
    assert len(state.began) == 1  # the drain began from the signal
    assert raised_again == []  # not raised again: a drained SIGTERM exits 0, not -15
    assert took < 5.0, took


def test_a_front_end_drains_on_sigterm_under_uvicorns_own_server(raised_again):
    app, state = app_with_state()
    _drain_on_signal(app)
    took = run_and_signal(uvicorn.Server(config(app)), signal.SIGTERM)
    assert len(state.began) == 1  # the drain began from the signal, and uvicorn's handler still ran:
    assert took < 5.0, took  # the server stopped
    assert raised_again == [signal.SIGTERM]  # (uvicorn's re-raise: how a front end ends; supervise counts it clean)

"""service/engine/supervise.py without processes: a SIGTERM in the window between "model ready" and uvicorn's
supervisor taking the signals stops the service (it used to be swallowed, and the service ran on)."""

from __future__ import annotations

import signal
import socket
import sys
import threading
from typing import ClassVar

import pytest

from service.engine import supervise
from service.settings import Settings


class FakeEngine:
    def __init__(self, target, args, name) -> None:
        self.ready, self.stop = args[1], args[2]
        self.alive = False
        self.exitcode = None
        self.pid = 4242

    def start(self) -> None:
        self.alive = True
        self.ready.set()  # loaded at once

    def is_alive(self) -> bool:
        if self.alive and self.stop.is_set():
            self.alive, self.exitcode = False, 0
        return self.alive

    def join(self, timeout=None) -> None:
        self.is_alive()

    def kill(self) -> None:
        self.alive, self.exitcode = False, -9


class FakeContext:
    Event = threading.Event

    def __init__(self) -> None:
        self.engines: list[FakeEngine] = []

    def Value(self, typecode, value, lock=False):  # noqa: N802 (multiprocessing's name)
        return type("V", (), {"value": value})()

    def Process(self, target, args, name):  # noqa: N802
        self.engines.append(FakeEngine(target, args, name))
        return self.engines[-1]


class FakeSupervisor:
    """uvicorn's Multiprocess as far as the window goes: it takes SIGTERM/SIGINT into its queue when built."""

    runs: ClassVar[list[int]] = []

    def __init__(self, config, sockets) -> None:
        self.signal_queue: list[int] = []
        self.processes: list = []
        self.should_exit = threading.Event()
        for sig in (signal.SIGTERM, signal.SIGINT):
            signal.signal(sig, lambda s, f: self.signal_queue.append(s))

    def run(self) -> None:
        FakeSupervisor.runs.append(len(self.signal_queue))


@pytest.fixture
def restore_signals():
    before = {s: signal.getsignal(s) for s in (signal.SIGTERM, signal.SIGINT)}
    yield
    for s, h in before.items():
        signal.signal(s, h)


def test_a_sigterm_after_the_model_is_ready_and_before_the_supervisor_stops_the_service(monkeypatch, restore_signals):
    ctx = FakeContext()
    monkeypatch.setattr(supervise.multiprocessing, "get_context", lambda method: ctx)
    monkeypatch.setattr(supervise, "Multiprocess", FakeSupervisor)
    FakeSupervisor.runs = []
    bound = []

    def bind_socket(self):  # the window: the model is ready, uvicorn's supervisor is not built yet
        signal.raise_signal(signal.SIGTERM)
        s = socket.socket()
        bound.append(s)
        return s

    monkeypatch.setattr(supervise.uvicorn.Config, "bind_socket", bind_socket)
    code = supervise._run(Settings(), 2, "ipc:///nonexistent")
    assert FakeSupervisor.runs == []  # the front ends were never started...
    assert code == 0 and ctx.engines[0].stop.is_set()  # ...and the model process was told to stop: exit 0
    assert bound[0].fileno() == -1  # the port closed


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads the thread's name from /proc")
def test_a_thread_that_titles_itself_shows_its_python_name_to_the_os():
    from service.proc import title_thread

    seen: dict[str, str] = {}

    def body() -> None:
        def comm() -> str:
            with open(f"/proc/self/task/{threading.get_native_id()}/comm") as f:
                return f.read().strip()

        seen["before"] = comm()
        title_thread()
        seen["after"] = comm()

    t = threading.Thread(target=body, name="mha-test-name")
    t.start()
    t.join(5)
    assert seen["after"] == "mha-test-name", seen
    assert seen["before"] != "mha-test-name", seen  # (Python did not name it: the call did)

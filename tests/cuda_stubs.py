"""A CPU stand-in for the CUDA calls of service/engine/staging.py and the runner's graph path, which record
the order of copies, waits, forwards and graph replays, so that the GPU host code is tested without a GPU.

Tensors stay on the CPU: a TorchFunctionMode rewrites the device "cuda" to the CPU and asks for no pinned
memory, and records each host-to-device copy (``Tensor.to`` a CUDA device), each ``copy_`` and each
``record_stream`` on the current fake stream. Streams and events carry vector clocks, so that "A is ordered
before B" is the question a GPU answers: the same stream earlier, or through an event one stream waited on
(``happens_before``), and the host's own clock moves only when it synchronizes (``host_saw``).
"""

from __future__ import annotations

import contextlib
import threading
from dataclasses import dataclass, field

import torch
from torch.overrides import TorchFunctionMode
from torch.utils._pytree import tree_map

Clock = dict[str, int]


def _merge(into: Clock, other: Clock) -> None:
    for k, v in other.items():
        into[k] = max(into.get(k, 0), v)


@dataclass
class Op:
    kind: str  # h2d, copy_, forward, replay
    stream: str
    clock: Clock
    info: dict = field(default_factory=dict)


class FakeStream(torch.Stream):  # a torch.Stream, so that Tensor.record_stream's argument parser takes it
    def __new__(cls, cuda: FakeCuda, name: str):
        return super().__new__(cls, device="cpu")

    def __init__(self, cuda: FakeCuda, name: str) -> None:
        self.cuda, self.name, self.clock = cuda, name, {}

    def wait_event(self, event: FakeEvent) -> None:
        _merge(self.clock, event.clock)

    def wait_stream(self, other: FakeStream) -> None:
        _merge(self.clock, other.clock)

    def __repr__(self) -> str:
        return f"<stream {self.name}>"


class FakeEvent:
    def __init__(self, cuda: FakeCuda) -> None:
        self.cuda, self.clock = cuda, {}

    def record(self, stream: FakeStream | None = None) -> None:
        self.clock = dict((stream or self.cuda.current()).clock)

    def synchronize(self) -> None:
        _merge(self.cuda.host, self.clock)


class FakeGraph:
    """Capture keeps the forward that ran inside ``torch.cuda.graph``; replay runs it again on the static
    input and writes its static output in place, as a real replay's kernels do."""

    def __init__(self, cuda: FakeCuda) -> None:
        self.cuda = cuda
        self.forward = None
        self.shape: tuple[int, ...] | None = None

    def replay(self) -> None:
        fn, x, kwargs, y = self.forward
        self.cuda.op("replay", shape=self.shape)
        with self.cuda.quiet(), torch.inference_mode():
            y.copy_(fn(x, **kwargs).output)


class FakeCuda(TorchFunctionMode):
    """Use ``with cuda.installed(monkeypatch):``; ``ops`` is what the streams ran, in the host's order."""

    def __init__(self) -> None:
        super().__init__()
        self.ops: list[Op] = []
        self.host: Clock = {}
        self.compute = FakeStream(self, "compute")
        self.streams = [self.compute]
        self.record_streams: list[tuple[int, str]] = []  # (data_ptr, stream) of Tensor.record_stream
        self.host_reads: list[tuple[int, Clock]] = []  # (data_ptr, host clock) of each Tensor.numpy
        self.pinned_requests = 0
        self.capturing: FakeGraph | None = None
        self._local = threading.local()
        self._quiet = 0

    # -- torch.cuda ------------------------------------------------------------------------
    def current(self) -> FakeStream:
        return getattr(self._local, "stream", self.compute)

    def new_stream(self, device=None) -> FakeStream:
        s = FakeStream(self, f"side{len(self.streams)}")
        self.streams.append(s)
        return s

    @contextlib.contextmanager
    def stream(self, s: FakeStream):
        before = self.current()
        self._local.stream = s
        try:
            yield
        finally:
            self._local.stream = before

    @contextlib.contextmanager
    def graph(self, g: FakeGraph):
        self.capturing = g
        try:
            yield
        finally:
            self.capturing = None

    def synchronize(self, device=None) -> None:
        for s in self.streams:
            _merge(self.host, s.clock)

    @contextlib.contextmanager
    def installed(self, monkeypatch):
        monkeypatch.setattr(torch.cuda, "Stream", self.new_stream)
        monkeypatch.setattr(torch.cuda, "Event", lambda *a, **k: FakeEvent(self))
        monkeypatch.setattr(torch.cuda, "current_stream", lambda device=None: self.current())
        monkeypatch.setattr(torch.cuda, "stream", self.stream)
        monkeypatch.setattr(torch.cuda, "CUDAGraph", lambda *a, **k: FakeGraph(self))
        monkeypatch.setattr(torch.cuda, "graph", self.graph)
        monkeypatch.setattr(torch.cuda, "synchronize", self.synchronize)
        with self:
            yield self

    # -- what the streams run -------------------------------------------------------------
    def op(self, kind: str, **info) -> Op:
        s = self.current()
        s.clock[s.name] = s.clock.get(s.name, 0) + 1
        o = Op(kind, s.name, dict(s.clock), info)
        self.ops.append(o)
        return o

    @contextlib.contextmanager
    def quiet(self):
        self._quiet += 1
        try:
            yield
        finally:
            self._quiet -= 1

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = dict(kwargs or {})
        if func is torch.Tensor.record_stream:
            self.record_streams.append((args[0].data_ptr(), args[1].name))
            return None
        if kwargs.pop("pin_memory", False):
            self.pinned_requests += 1
        to_cuda = func is torch.Tensor.to and any(_is_cuda(a) for a in (*args[1:], *kwargs.values()))
        args, kwargs = tree_map(_on_cpu, (args, kwargs))
        if to_cuda:
            kwargs["copy"] = True  # a device copy of its own, as on a GPU, not the host tensor itself
        if self._quiet:
            return func(*args, **kwargs)
        if func is torch.Tensor.numpy:
            self.host_reads.append((args[0].data_ptr(), dict(self.host)))
        out = func(*args, **kwargs)
        if to_cuda:
            self.op("h2d", src=args[0].data_ptr(), dst=out.data_ptr())
        elif func is torch.Tensor.copy_:
            self.op("copy_", src=args[1].data_ptr(), dst=args[0].data_ptr())
        return out


def _is_cuda(a) -> bool:
    return (isinstance(a, torch.device) and a.type == "cuda") or (isinstance(a, str) and a.startswith("cuda"))


def _on_cpu(a):
    return torch.device("cpu") if _is_cuda(a) else a


class RecordingModule(torch.nn.Module):
    """The attention module, with each forward an op on the current stream (and kept by a graph in capture)."""

    def __init__(self, inner: torch.nn.Module, cuda: FakeCuda, fail: bool = False) -> None:
        super().__init__()
        self.inner, self.cuda, self.fail = inner, cuda, fail
        self.config = inner.config

    def forward(self, x, **kwargs):
        self.cuda.op("forward", reads=x.data_ptr(), shape=tuple(x.shape), capture=self.cuda.capturing is not None)
        if self.fail:
            raise RuntimeError("injected forward failure")
        with self.cuda.quiet():  # its own kernels are the one forward op
            res = self.inner(x, **kwargs)
        if self.cuda.capturing is not None:
            self.cuda.capturing.forward = (self.inner, x, kwargs, res.output)
            self.cuda.capturing.shape = tuple(x.shape[:2])
        return res


def happens_before(a: Op, b: Op) -> bool:
    """A device would finish ``a`` before it starts ``b``."""
    return a is not b and a.clock[a.stream] <= b.clock.get(a.stream, 0)


def host_saw(op: Op, host: Clock) -> bool:
    """The host had waited for ``op`` when its clock was ``host``."""
    return op.clock[op.stream] <= host.get(op.stream, 0)

"""The engine client interface, shared by both sides: the one seam between the front end and the model.

Every route, gRPC, the heatmap, health and statistics depend on :class:`EngineClient` only. Two
implementations (vLLM v1's ``EngineCoreClient`` with ``InprocClient`` and ``AsyncMPClient`` is the model):

- :class:`service.engine.inproc.InprocClient`: the runner and the batcher in this process (one process);
- :class:`service.engine.client.MPClient`: the model process over zmq (front-end processes).

Both raise the same typed failures (``service.messages.EngineFailure`` and its subclasses, each with
its ``ErrorKind``), which each edge (HTTP, gRPC) maps once to its status. Imports no torch.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any, Protocol, runtime_checkable

from mha_core import MHAConfig
from service.messages import AttendInput, Result

Abandoned = Awaitable[Any] | Callable[[], Awaitable[Any]] | None


@dataclass(frozen=True)
class EngineModel:
    """What the front end knows of the model the engine serves: its config and its description."""

    config: MHAConfig
    info: dict[str, Any]  # name, config fields, dtype (MHA_DTYPE resolved by the device), device, checksum

    @property
    def device(self) -> str:
        return self.info["device"]

    @property
    def dtype(self) -> str:
        return self.info["dtype"]


class Statistics(Protocol):
    """Triton's per-model statistics (service/frontend/stats.py): what the routes add and the stats route reads."""

    def request_done(self, *, sequences: int, started: float, decoded: float, answered: float, res: Result) -> None: ...
    def request_failed(self, total_s: float) -> None: ...
    def model_stats(self, name: str, version: str) -> dict[str, Any]: ...


@runtime_checkable
class EngineClient(Protocol):
    """Submit, cancel, readiness, statistics and stop: all the front end may ask of the engine.

    - ``start`` loads (in process) or connects to (over zmq) the model, and returns its description;
    - ``infer`` submits one request and waits for its :class:`Result` or its typed failure; the request
      is cancelled (dropped before compute) when ``abandoned`` completes (the caller left: ClientGone) or
      when the awaiting task is cancelled;
    - ``ready`` is whether a request submitted now can be computed; ``on_ready`` (given at
      construction) hears every change of it;
    - ``stats`` is the model's statistics, the same whichever process answers;
    - ``stop`` finishes what is pending within ``grace_s`` and fails the rest (``ShuttingDown``).
    """

    model: EngineModel | None
    stats: Statistics

    async def start(self) -> EngineModel: ...

    async def infer(
        self, inp: AttendInput, *, deadline: float, abandoned: Abandoned = None, priority: int = 0
    ) -> Result: ...

    @property
    def ready(self) -> bool: ...

    @property
    def forward_running(self) -> bool:
        """A forward pass runs in this process now (the exit must not wait for it)."""
        ...

    def queue_depth(self) -> tuple[int, int]: ...

    def stop_accepting(self) -> None: ...

    async def stop(self, grace_s: float = 0.0) -> None: ...

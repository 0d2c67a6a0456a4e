"""The engine client interface, shared by both sides: the one seam between the front end and the model.

Every route, gRPC, the heatmap, health and statistics depend on :class:`EngineClient` only. Two
implementations (vLLM v1's ``EngineCoreClient`` with ``InprocClient`` and ``AsyncMPClient`` is the model):

- :class:`service.engine.inproc.InprocClient`: the runner and the batcher in this process (one process);
- :class:`service.engine.client.MPClient`: the model process over a Unix socket (front-end processes).

Both raise the same typed failures (``service.messages.EngineFailure`` and its subclasses, each with
its ``ErrorKind``), which each edge (HTTP, gRPC) maps once to its status. Imports no torch.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any, Protocol, runtime_checkable

from mha_core import MHAConfig
from service.messages import AttendInput, Result, SequenceStartRequired, StepInvalid  # noqa: F401 (re-exported)

Abandoned = Awaitable[Any] | Callable[[], Awaitable[Any]] | None
SequenceId = int | str
UINT64_MAX = 2**64 - 1


@dataclass(frozen=True, slots=True)
class SequenceFlags:
    """Which sequence a step belongs to, as the front end decodes it (Triton's sequence_id, sequence_start,
    sequence_end). Torch-free and plain, so that it can cross to the model process as it is; the engine wraps
    it with the step's input into its own ``Step`` (service/engine/sequences.py)."""

    id: SequenceId
    start: bool = False
    end: bool = False


def check_step(inp: AttendInput, seq: SequenceFlags) -> None:
    """The 422 of a step that cannot be a sequence step, naming what is wrong. The front end runs it before
    queueing (so a wrong step costs no round trip), the engine again (its own contract)."""
    shape = list(inp.x.shape)
    if len(shape) != 3 or shape[0] != 1:
        raise StepInvalid(f"a sequence step must have x of shape [1, t, E] (B = 1), got {shape}")
    if inp.lengths is not None:
        raise StepInvalid("a sequence step takes no lengths: its x holds exactly its new tokens")
    if inp.mask is not None:
        raise StepInvalid("a sequence step takes no attn_mask: a sequence is causal")
    if not inp.causal:
        raise StepInvalid("a sequence step must be causal (causal: false was given)")
    if shape[1] == 0:
        if not seq.end or seq.start:
            raise StepInvalid(
                "a sequence step with no rows (x of shape [1, 0, E]) only ends its sequence: it needs end and no start"
            )
        if inp.need_weights:
            raise StepInvalid("a sequence step with no rows only ends its sequence: it has no weights to return")


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

    - ``start`` loads (in process) or connects to (over a Unix socket) the model, and returns its description;
    - ``infer`` submits one request and waits for its :class:`Result` or its typed failure; the request
      is cancelled (dropped before compute) when ``abandoned`` completes (the caller left: ClientGone) or
      when the awaiting task is cancelled;
    - ``step`` is ``infer`` for one step of a sequence (``seq``): queued with the other requests, in its
      sequence's turn, its keys and values kept by the engine for the next step (service/engine/sequences.py);
      a step with no rows and ``end`` only ends the sequence. Its own failures: ``StepInvalid`` (422) and
      ``SequenceStartRequired`` (400);
    - ``ready`` is whether a request submitted now can be computed; ``on_ready`` (given at
      construction) hears every change of it;
    - ``stats`` is the model's statistics, the same whichever process answers, up to date after
      ``flush_statistics`` (as the metrics are);
    - ``stop`` finishes what is pending within ``grace_s`` and fails the rest (``ShuttingDown``).
    """

    model: EngineModel | None
    stats: Statistics

    async def start(self) -> EngineModel: ...

    async def infer(
        self, inp: AttendInput, *, deadline: float, abandoned: Abandoned = None, priority: int = 0
    ) -> Result: ...

    async def step(
        self,
        inp: AttendInput,
        seq: SequenceFlags,
        *,
        deadline: float,
        abandoned: Abandoned = None,
        priority: int = 0,
    ) -> Result: ...

    @property
    def ready(self) -> bool: ...

    @property
    def forward_running(self) -> bool:
        """A forward pass runs in this process now (the exit must not wait for it)."""
        ...

    def queue_depth(self) -> tuple[int, int]: ...

    async def flush_statistics(self) -> None:
        """Return once ``stats`` and the metrics hold every batch answered before the call (a model process writes
        its own at each ping: the client pings and waits for its heartbeat, briefly)."""
        ...

    def stop_accepting(self) -> None: ...

    async def stop(self, grace_s: float = 0.0) -> None: ...

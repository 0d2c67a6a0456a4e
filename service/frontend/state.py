"""The front end's state: what its routes, gRPC, health and the drain share, built by ``service.app.create_app``.

Here, not in ``service.app``, so that a route module can name its type without importing the wiring that imports
it (tests/unit/test_layout.py). The engine is known by its interface only (``service.engine_api``).
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from service.engine_api import EngineClient, Statistics
    from service.frontend.admission import Admission
    from service.frontend.decode import Limits
    from service.frontend.grpc_server import GrpcServer
    from service.frontend.offload import Offload
    from service.metrics import Metrics
    from service.settings import Settings
    from service.tracing import Tracing


@dataclass
class AppState:
    settings: Settings
    metrics: Metrics
    engine: EngineClient | None = None  # the model, whatever the mode: set by the lifespan
    ready: bool = False
    draining: bool = False
    model_info: dict | None = None
    limits: Limits | None = None
    loop: asyncio.AbstractEventLoop | None = None
    shutdown_deadline: float | None = None  # monotonic: the signal's time + shutdown_grace_s
    drain: asyncio.Future | None = None
    offload: Offload | None = None
    grpc: GrpcServer | None = None
    shares_port: bool = False  # one of several front-end processes that serve the same ports
    tracing: Tracing | None = None  # None unless OTEL_TRACES_EXPORTER turns tracing on (service/tracing.py)
    admission: Admission | None = None  # the inference requests in flight, HTTP's and gRPC's counted together
    readiness_listeners: list[Callable[[], None]] = field(default_factory=list)  # called when ready or draining change

    def __setattr__(self, name: str, value: Any) -> None:
        """Tell the listeners (the gRPC health service) of each change of ``ready`` or ``draining``, wherever it is
        made. They may be called from a signal handler (begin_shutdown): they only schedule work on the loop."""
        changed = name in ("ready", "draining") and getattr(self, name, value) != value
        super().__setattr__(name, value)
        if changed:
            for listener in getattr(self, "readiness_listeners", ()):
                listener()

    @property
    def stats(self) -> Statistics:
        return self.engine.stats

    def begin_shutdown(self) -> None:
        """Refuse new work now, and drain accepted work by one deadline measured from this call.

        Called from the SIGTERM handler (service.cli), so that uvicorn's wait for open
        connections, the gRPC server's and the batcher's drain share one grace period instead of
        running one after the other; safe in a signal handler (it only schedules the drain on the loop).
        """
        self.draining = True
        self.ready = False
        if self.shutdown_deadline is None:
            self.shutdown_deadline = time.monotonic() + self.settings.shutdown_grace_s
        if self.loop is not None and not self.loop.is_closed():
            self.loop.call_soon_threadsafe(self._start_drain)

    def _start_drain(self) -> None:
        if self.drain is not None or self.engine is None:
            return
        grace = self.settings.shutdown_grace_s
        # Fail what is left a little before the deadline, so that its 503s are written, and the
        # process has exited, by the deadline (uvicorn's own, at the same time, would cancel the
        # handlers, whose clients would then get no answer at all).
        reserve = min(1.5, 0.25 * grace)
        left = max(0.0, self.shutdown_deadline - time.monotonic() - reserve)
        grpc_stop = self.grpc.stop(left) if self.grpc is not None else asyncio.sleep(0)
        self.drain = asyncio.gather(grpc_stop, self.engine.stop(grace_s=left))

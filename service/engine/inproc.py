"""InprocClient: the engine client of the one-process mode, over the batcher's callback path.

It loads the runner (torch) and starts the batcher in this process; ``infer`` is the batcher's own
(``Batcher.infer``: ``submit`` with a future as its ``done``). What the routes see of it is the
``service.engine_api.EngineClient`` interface, the same as the model process's client.
"""

from __future__ import annotations

import asyncio
import logging
import pkgutil
from collections.abc import Callable
from functools import partial
from typing import TYPE_CHECKING, Any

from mha_core import MHAConfig
from service.engine_api import Abandoned, EngineModel, SequenceFlags
from service.messages import AttendInput, BatcherObserver, Result, ShuttingDown
from service.stats import ModelStats

if TYPE_CHECKING:
    from service.engine.batcher import Batcher
    from service.engine.runner import Runner
    from service.engine.sequences import Sequences
    from service.settings import Settings

log = logging.getLogger("mha_serve")


class _Observers(BatcherObserver):
    """The batcher's one observer, fanned out (the Prometheus metrics, Triton's statistics).

    Every hook of BatcherObserver is forwarded (set below), so a new hook cannot be forgotten here.
    """

    def __init__(self, *observers: BatcherObserver) -> None:
        self._observers = observers


def _fan_out(name: str) -> Any:
    def hook(self: _Observers, *args: Any) -> None:
        for o in self._observers:
            getattr(o, name)(*args)

    hook.__name__ = name
    return hook


for _hook in [n for n in vars(BatcherObserver) if not n.startswith("_")]:
    setattr(_Observers, _hook, _fan_out(_hook))


class InprocClient:
    """The runner and the batcher in this process, behind the engine client interface."""

    def __init__(
        self,
        settings: Settings,
        *,
        metrics: BatcherObserver | None = None,
        tracing: Any = None,
        on_ready: Callable[[bool], None] | None = None,
        beat: Any = None,
        exit_after_s: float = 1.0,
        stats: bool = True,
    ) -> None:
        self.settings = settings
        self.model: EngineModel | None = None
        # Triton's statistics of this process's requests and batches, read by its routes; the model process's are
        # its front ends' (service.stats.SharedModelStats, fed by its metrics), so it keeps none (``stats`` False).
        self.stats = ModelStats() if stats else None
        self.runner: Runner | None = None
        self.batcher: Batcher | None = None
        self.sequences: Sequences | None = None
        self._reaper: asyncio.Task | None = None
        self._metrics = metrics
        self._tracing = tracing
        self._on_ready = on_ready or (lambda ready: None)
        # The forward runs in this process: a hung one (or a hung loop) turns it not-ready at once, then ends the
        # process after ``exit_after_s`` (service/engine/liveness.py); ``beat`` is the supervisor's watch.
        self._beat, self._exit_after_s = beat, exit_after_s
        self._watchdog: Any = None
        self._hung = False

    async def start(self) -> EngineModel:
        from service.engine.runner import Runner, batcher_for, model_description  # torch: never in a front end

        s = self.settings
        # MHA_RUNNER (benchmarks): another factory in place of the model's; resolved once, never per request
        factory = pkgutil.resolve_name(s.runner) if s.runner else Runner.from_settings
        runner = await asyncio.to_thread(factory, s)
        if s.warmup:
            await asyncio.to_thread(runner.warmup)
        cfg = runner.config
        if s.max_request_batch * cfg.max_seq_len > s.max_batch_tokens:
            log.warning(
                "max_request_batch x the model's max_seq_len (%d x %d) is over max_batch_tokens (%d): requests "
                "over max_batch_tokens get 422",
                s.max_request_batch,
                cfg.max_seq_len,
                s.max_batch_tokens,
            )
        observer: BatcherObserver = _Observers(*(o for o in (self._metrics, self.stats) if o is not None))
        if self._tracing is not None:  # plus the forward span of each batch
            observer = self._tracing.observe_batches(observer)
        self.runner = runner
        self.sequences, steps = self._sequences(runner)
        self.batcher = batcher_for(runner, s, observer, steps)
        self._reaper = asyncio.create_task(self._reap(), name="mha-sequence-reaper")
        await self.batcher.start()
        self.infer = self.batcher.infer  # the same call: no coroutine of ours around each request
        self.model = EngineModel(MHAConfig(**cfg.to_dict()), model_description(s, runner))
        from service.engine.liveness import Watchdog

        self._watchdog = Watchdog(
            forward_hang_s=s.forward_hang_s,
            loop_hang_s=s.engine_hang_s,
            on_hang=self._hang,
            beat=self._beat,
            exit_after_s=self._exit_after_s,
        )
        self._watchdog.start(asyncio.get_running_loop())
        self._on_ready(True)
        return self.model

    def _hang(self) -> None:  # (the watchdog's thread)
        self._hung = True
        self._on_ready(False)

    @property
    def ready(self) -> bool:
        return not self._hung and self.batcher is not None and self.batcher.running

    @property
    def forward_running(self) -> bool:
        return self.batcher is not None and self.batcher.forward_running

    async def infer(
        self, inp: AttendInput, *, deadline: float, abandoned: Abandoned = None, priority: int = 0
    ) -> Result:
        return await self.batcher.infer(inp, deadline=deadline, abandoned=abandoned, priority=priority)

    async def step(
        self,
        inp: AttendInput,
        seq: SequenceFlags,
        *,
        deadline: float,
        abandoned: Abandoned = None,
        priority: int = 0,
    ) -> Result:
        """One step of a sequence (service/engine/sequences.py): queued through the same batcher as ``infer``,
        in its sequence's turn, its k/v kept when it is answered. A method of its own, not a parameter of
        ``infer``: ``infer`` is the batcher's own call, with nothing of ours around each plain request."""
        from service.engine.sequences import Step

        if not self.batcher.running:  # draining or stopped: as for ``infer``, before the sequence's own rules
            raise ShuttingDown("the batcher is not running")
        return await self.sequences.run(
            Step(inp, seq.id, seq.start, seq.end),
            partial(self.batcher.infer, deadline=deadline, abandoned=abandoned, priority=priority),
        )

    def _sequences(self, runner: Runner) -> tuple[Sequences, Any]:
        from service.engine.kvcache import KVCache, default_cache_bytes
        from service.engine.sequences import Sequences
        from service.engine.steprunner import StepRunner

        s, cfg = self.settings, runner.config
        cache = KVCache(
            num_heads=cfg.num_heads,
            head_size=cfg.head_size,
            dtype=runner.dtype,
            device=runner.device,
            max_bytes=s.kv_cache_bytes or default_cache_bytes(runner.device),
            block_size=s.kv_block_size,
        )
        log.info(
            "KV cache: %d blocks of %d tokens (%d tokens, %.0f MiB)",
            cache.num_blocks,
            cache.block_size,
            cache.capacity_tokens,
            cache.num_blocks * cache.block_bytes / 2**20,
        )
        metrics = self._metrics if hasattr(self._metrics, "sequences_changed") else None
        sequences = Sequences(
            cache, max_seq_len=cfg.max_seq_len, idle_s=s.sequence_idle_s, model_name=s.model_name, observer=metrics
        )
        steps = StepRunner(runner, cache, on_forward=metrics.steps_forward if metrics is not None else None)
        return sequences, steps

    async def _reap(self) -> None:
        """Idle sequences are reaped at each step too; this catches those of a server with no steps coming."""
        while True:
            await asyncio.sleep(min(self.settings.sequence_idle_s / 2, 5.0))
            self.sequences.reap()

    def queue_depth(self) -> tuple[int, int]:
        return self.batcher.queue_depth() if self.batcher is not None else (0, 0)

    async def flush_statistics(self) -> None:
        """Nothing to wait for: in this process the batcher's observers write as it observes."""

    def stop_accepting(self) -> None:
        if self.batcher is not None:
            self.batcher.stop_accepting()
            self._on_ready(False)

    async def stop(self, grace_s: float = 0.0) -> None:
        if self.batcher is not None:
            self._on_ready(False)
            await self.batcher.stop(grace_s=grace_s)
        if self._reaper is not None:
            self._reaper.cancel()
            self._reaper = None
        if self.sequences is not None:
            self.sequences.clear()
        if self._watchdog is not None:
            self._watchdog.stop()

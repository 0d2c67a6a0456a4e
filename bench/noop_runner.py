"""A runner that answers every request with its input: the service measured without its forward pass.

For benchmarks only, named by ``MHA_RUNNER=bench.noop_runner:runner`` (read once at start-up by
``service/engine/inproc.py``). On a GPU host the device is rarely the limit; what caps a replica is what the
front ends and the model process spend per request. With this runner a CPU machine measures exactly that:
everything the service does around a forward, and no forward.

The real runner is built and kept (its config, device, dtype and checksum describe the model; warm-up runs
through ``run`` here), so the service starts and answers as it would with the model, shapes and dtypes
included.
"""

from __future__ import annotations

from service.engine.runner import Runner
from service.messages import AttendInput, AttendOutput, BatchStats
from service.settings import Settings


class NoopRunner(Runner):
    def run(self, items: list[AttendInput]) -> tuple[list[AttendOutput], BatchStats]:
        # the input is the answer (same shape and dtype as the model's output for x); weights are not made
        sequences = sum(it.batch for it in items)
        tokens = sum(it.batch * it.seq_len for it in items)
        return [AttendOutput(it.x, None) for it in items], BatchStats(sequences, tokens, tokens)


def runner(settings: Settings) -> NoopRunner:
    """The ``MHA_RUNNER`` factory: the model's runner, with ``run`` replaced."""
    real = Runner.from_settings(settings)
    real.__class__ = NoopRunner
    return real

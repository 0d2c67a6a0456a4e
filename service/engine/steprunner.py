"""The forward of sequence steps (continuous batching): the steps of several sequences in one pass.

The batcher hands it steps (service/engine/sequences.py) as it hands the Runner requests; :meth:`StepRunner.run`
projects all their new rows with one matmul, gathers each step's cached keys/values from the pool right-padded
to the longest sequence, puts the step's own new keys after them, and runs one SDPA under a mask
(mha_core.incremental.attend_padded). It never writes the cache: each step's new k/v go back on the step,
and the bookkeeping writes them when the step is answered, so a cancelled step leaves the cache as it was.

It is kept lean on purpose: a decode step is a forward of one row, so everything around it (staging buffers,
per-item tensor wrappers, checks repeated per request) would cost more than the forward itself. x is taken
from numpy without a copy on a CPU, and the output goes back as one numpy array split into views.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import TYPE_CHECKING

import numpy as np
import torch
from torch import Tensor

from mha_core.incremental import attend_padded, project, step
from service.engine.liveness import FORWARDS
from service.engine.runner import TORCH_DTYPES, answer, common_dtype
from service.engine.sequences import Step
from service.engine.staging import host_array
from service.messages import AttendInput, AttendOutput, BatchStats, NumericOverflow, as_float32, finite_as

if TYPE_CHECKING:
    from service.engine.kvcache import KVCache
    from service.engine.runner import Runner


class StepRunner:
    def __init__(self, runner: Runner, cache: KVCache, on_forward: Callable[[int], None] | None = None) -> None:
        self.runner = runner
        self.module = runner.module
        self.device = runner.device
        self.dtype = runner.dtype
        self.cache = cache
        self._on_forward = on_forward or (lambda steps: None)

    def dispatch(self, items: list) -> tuple[list, BatchStats]:
        """The batcher's run function: steps here, plain requests to the Runner (their keys never mix)."""
        if isinstance(items[0], Step):
            return self.run(items)
        return self.runner.run(items)

    def weights_of(self, inp: AttendInput | Step) -> int:
        """Attention-weight elements a request computes; a step's keys are bounded by max_seq_len."""
        if not isinstance(inp, Step):
            return self.runner.weights_elements(inp)
        if not inp.need_weights:
            return 0
        heads = len(inp.heads) if inp.heads is not None else self.module.config.num_heads
        return heads * inp.seq_len * self.module.config.max_seq_len

    def run(self, items: list[Step]) -> tuple[list[AttendOutput | NumericOverflow], BatchStats]:
        from service.engine.runner import _inject_faults

        with FORWARDS.timing(), torch.inference_mode():
            t0 = time.perf_counter()
            _inject_faults(items)
            if items[0].need_weights:
                results = [self._run_with_weights(it) for it in items]
            else:
                results = self._run_batched(items)
            self._on_forward(len(items))
            real = sum(it.seq_len for it in items)
            stats = BatchStats(len(items), len(items) * max(it.seq_len for it in items), real)
            stats.compute_s = time.perf_counter() - t0
            return results, stats

    def _input(self, rows: np.ndarray, wire: str) -> torch.Tensor:
        """Rows in their wire dtype, cast once on the device (bfloat16's uint16 bits viewed as it)."""
        if not rows.flags.writeable:  # a view of a received frame: torch wants a buffer it may write (a step's
            rows = rows.copy()  # rows are few; a prompt's, once)
        t = torch.from_numpy(rows)
        if wire == "bfloat16":
            t = t.view(torch.bfloat16)
        return t.to(self.device, self.dtype, non_blocking=False)

    def _contiguous(self, it: Step, k: Tensor, v: Tensor) -> tuple[Tensor, Tensor] | None:
        """A lone step whose positions lie in one run of the pool (a sequence that grew while no other did: its
        blocks were taken in order): its keys and values as views of the pool, its own rows written into its
        reserved slots first, so that the step reads the cache where it lies instead of gathering a copy of it
        (at 1,024 cached tokens the gather was most of what a step cost beyond its attention). The reserved
        slots are its own until it is answered or given back, and nothing reads them before its answer commits
        them (it writes the same values again then), so writing them now changes nothing another step sees."""
        span = it.span
        if span is None:  # (a step built without the sequences' admission: bench/gpu.py's)
            return None
        n = span.shape[0]
        first = int(span[0])
        if int(span[-1]) != first + n - 1 or not torch.equal(span, self._arange(first, n)):
            return None
        c = self.cache
        c.keys[first + it.past : first + n] = k
        c.values[first + it.past : first + n] = v
        return c.keys[first : first + n][None], c.values[first : first + n][None]

    def _arange(self, first: int, n: int) -> Tensor:
        return torch.arange(first, first + n, device=self.device)

    def _run_batched(self, items: list[Step]) -> list[AttendOutput | NumericOverflow]:
        S = len(items)
        new = [it.seq_len for it in items]
        past = [it.past for it in items]
        total = [p + t for p, t in zip(past, new, strict=True)]
        wire = common_dtype(it.wire_dtype for it in items)
        rows = items[0].x[0] if S == 1 else np.concatenate([_rows(it, wire) for it in items])
        q, k, v = project(self.module, self._input(rows, wire))  # (N, H, D) each
        P = max(total)
        if S == 1 and not past[0]:  # a first step: its own keys are all there is
            keys, values = k[None], v[None]
        elif S == 1 and (run := self._contiguous(items[0], k, v)) is not None:  # its slots are one run of the pool
            keys, values = run
        else:
            index = torch.zeros(S, P, dtype=torch.int64, device=self.device)  # padding gathers slot 0: never seen
            for i, it in enumerate(items):
                if it.past:
                    index[i, : it.past] = it.slots
            keys, values = self.cache.gather(index)  # (S, P, H, D)
            if S == 1:
                keys[0, past[0] :], values[0, past[0] :] = k, v
            else:
                step_of_row = torch.repeat_interleave(torch.arange(S), torch.tensor(new))
                pos = torch.tensor([p + r for p, t in zip(past, new, strict=True) for r in range(t)])
                keys[step_of_row, pos], values[step_of_row, pos] = k, v
        out = attend_padded(self.module, q, keys, values, new, total)  # (N, E)
        dtype = common_dtype(it.out_dtype for it in items)
        host = host_array(out.to(TORCH_DTYPES[dtype]).cpu(), copy=False)  # cast on the device, then moved
        results: list[AttendOutput | NumericOverflow] = []
        row = 0
        judge = not finite_as(host, dtype) or any(it.out_dtype != dtype for it in items)
        for it, t in zip(items, new, strict=True):
            it.new_k, it.new_v = k[row : row + t], v[row : row + t]
            result = AttendOutput(host[None, row : row + t], None)
            if judge:
                wide = lambda a=row, b=row + t: AttendOutput(out[None, a:b].float().cpu().numpy(), None)  # noqa: E731
                result = answer(it, result, dtype, wide, self.runner.dtype_name)
            results.append(result)
            row += t
        return results

    def _run_with_weights(self, it: Step) -> AttendOutput | NumericOverflow:
        past_k = past_v = None
        if it.past:
            past_k, past_v = self.cache.gather(it.slots)
        res = step(self.module, self._input(it.x, it.wire_dtype), past_k, past_v, need_weights=True, heads=it.heads)
        it.new_k, it.new_v = res.k, res.v
        dtype = TORCH_DTYPES[it.out_dtype]
        out = AttendOutput(*(host_array(t.to(dtype).cpu(), copy=False) for t in (res.output, res.weights)))
        if finite_as(out.output, it.out_dtype) and finite_as(out.weights, it.out_dtype):
            return out

        def wide() -> AttendOutput:
            return AttendOutput(res.output.float().cpu().numpy(), res.weights.float().cpu().numpy())

        return answer(it, out, it.out_dtype, wide, self.runner.dtype_name)


def _rows(it: Step, wire: str) -> np.ndarray:
    """A step's rows in the batch's wire dtype (float32 when the steps' dtypes differ)."""
    return it.x[0] if it.wire_dtype == wire else as_float32(it.x[0], it.wire_dtype)

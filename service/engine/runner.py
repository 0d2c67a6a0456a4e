"""Holds the module on its device; pads a batch of requests, runs it, unpads. Knows no asyncio."""

from __future__ import annotations

import logging
import time
from typing import Any

import numpy as np
import torch

from mha_core import MHAConfig, MultiHeadAttention, read_checkpoint
from service.engine.batcher import Batcher, BatchLimits
from service.engine.liveness import FORWARDS
from service.engine.staging import CudaGraphs, Slot, Staging
from service.messages import (
    AttendInput,
    AttendOutput,
    BatcherObserver,
    BatchStats,
    NumericOverflow,
    all_finite,
    overflow_of,
)
from service.settings import Settings, parse_buckets

log = logging.getLogger("mha_serve.runner")

TORCH_DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


def is_out_of_memory(exc: BaseException) -> bool:
    """A CUDA (or other accelerator) out-of-memory error, after which smaller batches may fit."""
    return isinstance(exc, torch.OutOfMemoryError) or "out of memory" in str(exc).lower()


def resolve_dtype(name: str, device: torch.device) -> torch.dtype:
    """``auto``: bfloat16 on a GPU (its tensor cores' fast type, with float32's range), float32 elsewhere."""
    if name == "auto":
        return torch.bfloat16 if device.type == "cuda" else torch.float32
    return TORCH_DTYPES[name]


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dev = torch.device(name)
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise RuntimeError(f"device {name!r} was asked for, but torch sees no CUDA device")
    if dev.type == "cuda" and dev.index is not None and dev.index >= torch.cuda.device_count():
        raise RuntimeError(f"device {name!r} was asked for, but torch sees {torch.cuda.device_count()} CUDA device(s)")
    return dev


def batcher_for(runner: Runner, settings: Settings, observer: BatcherObserver, steps: Any = None) -> Batcher:
    """The batcher in front of ``runner`` (its forward, out-of-memory test, weights size and batches in
    flight) with the settings' limits: one wiring for the single-process app and the model process.
    ``steps`` (a service.engine.steprunner.StepRunner) also takes sequence steps through the same batcher."""
    return Batcher(
        runner.run if steps is None else steps.dispatch,
        BatchLimits.from_settings(settings),
        observer=observer,
        is_oom=is_out_of_memory,
        weights_of=runner.weights_elements if steps is None else steps.weights_of,
        depth=runner.depth,
    )


def model_description(settings: Settings, runner: Runner) -> dict[str, Any]:
    """What /v1/model and the engine's hello report about the loaded model."""
    return {
        "name": settings.model_name,
        **runner.config.to_dict(),
        "dtype": str(runner.dtype).removeprefix("torch."),
        "device": str(runner.device),
        "checksum": runner.checksum,
    }


class Runner:
    """The model on its device. ``run`` is called from one worker thread at a time."""

    def __init__(
        self,
        module: MultiHeadAttention,
        *,
        device: torch.device,
        dtype: torch.dtype,
        checksum: str,
        pinned: bool = True,
        pipeline: bool = True,
        graph_buckets: list[tuple[int, int]] | None = None,
    ) -> None:
        self.device = device
        self.dtype = dtype
        self.dtype_name = str(dtype).removeprefix("torch.")  # as the overflow message names it
        self.module = module.to(device=device, dtype=dtype).eval()
        bad = [n for n, p in self.module.named_parameters() if not bool(torch.isfinite(p).all())]
        if bad:  # else every answer would overflow, and be blamed on the input
            raise ValueError(f"the model's {', '.join(bad)} hold values that {dtype} cannot represent; use float32")
        self.config: MHAConfig = module.config
        self.checksum = checksum
        # Host <-> device copies and CUDA graphs (service/engine/staging.py). depth: batches in flight at
        # once; the batcher runs that many worker threads, so the next batch uploads under this one.
        cuda = device.type == "cuda"
        self.depth = 2 if cuda and pipeline else 1
        self.staging = Staging(device, pinned=pinned, streams=pipeline, depth=self.depth)
        self.graphs = CudaGraphs(self.module, graph_buckets or [], device=device, dtype=dtype) if cuda else None

    @classmethod
    def from_settings(cls, settings: Settings) -> Runner:
        if settings.torch_threads:
            torch.set_num_threads(settings.torch_threads)
        device = resolve_device(settings.device)
        dtype = resolve_dtype(settings.dtype, device)
        if settings.checkpoint is not None:
            given = settings.model_overrides()
            loaded = read_checkpoint(
                settings.checkpoint,
                layer=settings.checkpoint_layer,
                num_heads=given.get("num_heads"),
                max_seq_len=given.get("max_seq_len"),
                causal=given.get("causal"),
            )
            cfg = loaded.module.config.to_dict()
            for k in ("emb_size", "head_size"):
                if k in given and given[k] != cfg[k]:
                    raise ValueError(f"MHA_{k.upper()}={given[k]} disagrees with the checkpoint, which has {cfg[k]}")
            module, checksum = loaded.module, loaded.checksum
            log.info("loaded %s checkpoint %s (%s)", loaded.format, settings.checkpoint, checksum)
        else:
            from mha_core import checksum as content_checksum

            module = MultiHeadAttention.from_seed(
                MHAConfig(**settings.model_overrides(with_defaults=True)), settings.seed
            )
            checksum = content_checksum(module)
            log.info("built-in model from seed %d (%s)", settings.seed, checksum)
        return cls(
            module,
            device=device,
            dtype=dtype,
            checksum=checksum,
            pinned=settings.pinned_staging,
            pipeline=settings.copy_pipeline,
            graph_buckets=parse_buckets(settings.cuda_graphs),
        )

    def warmup(self) -> None:
        """A few forwards at the shapes traffic will bring, so the first request is not slow; CUDA graph capture."""
        cfg = self.config
        if self.graphs is not None:
            self.graphs.capture()
        for T in sorted({1, min(128, cfg.max_seq_len), cfg.max_seq_len}):
            x = np.zeros((1, T, cfg.emb_size), np.float32)
            self.run([AttendInput(x, causal=cfg.causal)])
        self.run(
            [
                AttendInput(
                    np.zeros((2, 4 if cfg.max_seq_len >= 4 else 1, cfg.emb_size), np.float32),
                    lengths=np.array([1, 1]),
                    need_weights=True,
                )
            ]
        )
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)

    def weights_elements(self, inp: AttendInput) -> int:
        """Attention-weight elements ``inp`` makes the forward compute: B x its heads x T x T."""
        if not inp.need_weights:
            return 0
        heads = len(inp.heads) if inp.heads is not None else self.config.num_heads
        return inp.batch * heads * inp.seq_len * inp.seq_len

    def run(self, items: list[AttendInput]) -> tuple[list[AttendOutput | NumericOverflow], BatchStats]:
        """One forward pass for requests of the same key: right-pad to the longest T, run, unpad.

        Each result owns its arrays (no view into a batch-sized buffer), so a response that is
        still being encoded keeps only its own request's memory alive. Up to ``depth`` calls may
        run at once (each in its own staging slot).

        A request whose own output (or weights) holds NaN or Inf gets a ``NumericOverflow`` in its
        place, which the batcher fails that request with, alone. The batch's results are checked
        once; only when they hold a non-finite value is each request's own part looked at, so the
        padding of a shorter sequence never counts.
        """
        with self.staging.slot() as slot, FORWARDS.timing():  # the hang watch (service/engine/liveness.py)
            t0 = time.perf_counter()
            _inject_faults(items)
            if items[0].need_weights:
                results, stats = self._run_with_weights(items, slot)
            else:
                results, stats = self._run_padded(items, slot)
            if len(results) != len(items):
                raise RuntimeError(f"runner produced {len(results)} results for {len(items)} requests")
            stats.compute_s = time.perf_counter() - t0
            return results, stats

    def _run_padded(
        self, items: list[AttendInput], slot: Slot
    ) -> tuple[list[AttendOutput | NumericOverflow], BatchStats]:
        first = items[0]
        E = self.config.emb_size
        T = max(it.seq_len for it in items)
        N = sum(it.batch for it in items)
        x = self.staging.host_input(slot, (N, T, E))  # reused (pinned on a GPU); all of it is written below
        lengths = np.empty(N, dtype=np.int64)
        mask = np.ones((N, T, T), dtype=np.bool_) if first.mask is not None else None
        xn = x.numpy()  # fill through numpy views: no per-item tensor wrappers
        row = 0
        uniform = mask is None and all(it.seq_len == T and it.lengths is None for it in items)
        if uniform:  # the common batch (one T, no lengths or mask): one copy for all, not three slice writes each
            np.concatenate([it.x for it in items], out=xn)
            lengths[:] = T
        for it in () if uniform else items:
            b, t = it.batch, it.seq_len
            xn[row : row + b, :t] = it.x
            xn[row : row + b, t:] = 0.0
            lengths[row : row + b] = it.lengths if it.lengths is not None else t
            if mask is not None:
                mask[row : row + b, :t, :t] = it.mask
            row += b
        real = int(lengths.sum())
        x = self.staging.upload(slot, x, self.dtype)
        y = None
        if self.graphs is not None and first.causal and mask is None:
            y = self.graphs.run(x)  # None when no captured bucket holds (N, T)
        if y is not None:
            (out,) = self.staging.download(slot, [y])
            for r in np.flatnonzero(lengths < T):  # the graph ran unmasked: zero padding rows as the module does
                out[r, lengths[r] :] = 0.0
        else:
            res = self.module(
                x,
                lengths=None if uniform else torch.from_numpy(lengths),  # no padding: skip the module's lengths checks
                attn_mask=None if mask is None else torch.from_numpy(mask),
                causal=first.causal,
            )
            (out,) = self.staging.download(slot, [res.output])
            del res
        del x, y
        finite = all_finite(out)  # once per batch, on the host copy (numpy: measured 10x cheaper than torch on a CPU)
        if len(items) == 1:
            results = [AttendOutput(out[:, : first.seq_len], None)]
        else:
            results = []
            row = 0
            for it in items:
                b, t = it.batch, it.seq_len
                results.append(AttendOutput(out[row : row + b, :t].copy(), None))  # its own array
                row += b
        if not finite:
            return self._overflows(items, results), BatchStats(N, N * T, real)
        return results, BatchStats(N, N * T, real)

    def _run_with_weights(
        self, items: list[AttendInput], slot: Slot
    ) -> tuple[list[AttendOutput | NumericOverflow], BatchStats]:
        """Weights requests run one forward each, unpadded, for their own heads only.

        Padding them into one batch would compute the union of the heads asked for on every
        row (eight one-head requests would compute 64 heads' weights) and T_max x T_max weights
        for short rows; the weights, not the projections, are what costs here.
        """
        results = []
        stats = BatchStats()
        for it in items:
            x = self.staging.host_input(slot, it.x.shape)
            x.numpy()[...] = it.x
            res = self.module(
                self.staging.upload(slot, x, self.dtype),
                lengths=None if it.lengths is None else torch.tensor(it.lengths, dtype=torch.int64),
                attn_mask=None if it.mask is None else torch.from_numpy(np.ascontiguousarray(it.mask)),
                causal=it.causal,
                need_weights=True,
                heads=list(it.heads) if it.heads is not None else None,
            )
            out, weights = self.staging.download(slot, [res.output, res.weights])
            del res
            result = AttendOutput(out, weights)
            finite = all_finite(out) and (weights is None or all_finite(weights))
            results.append(result if finite else self._overflows([it], [result])[0])
            b, t = it.batch, it.seq_len
            stats.sequences += b
            stats.padded_tokens += b * t
            stats.real_tokens += int(it.lengths.sum()) if it.lengths is not None else b * t
            stats.weights_elements += weights.size
        return results, stats

    def _overflows(self, items: list[AttendInput], results: list[AttendOutput]) -> list[AttendOutput | NumericOverflow]:
        """The batch held a non-finite value: each request's result, or its overflow if its own values hold it."""
        return [
            overflow_of({"output": r.output, "weights": r.weights}, it.x, self.dtype_name) or r
            for it, r in zip(items, results, strict=True)
        ]


class InjectedFault(RuntimeError):
    pass


def _inject_faults(items: list[AttendInput]) -> None:
    for it in items:
        if it.fault is None:
            continue
        if it.fault == "raise":
            raise InjectedFault("injected fault")
        if it.fault.startswith("stall:"):
            time.sleep(float(it.fault.split(":", 1)[1]) / 1000)

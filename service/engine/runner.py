"""Holds the module on its device; pads a batch of requests, runs it, unpads. Knows no asyncio."""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from typing import Any

import numpy as np
import torch

from mha_core import MHAConfig, MultiHeadAttention, read_checkpoint
from service.engine.batcher import Batcher, BatchLimits
from service.engine.liveness import FORWARDS
from service.engine.staging import CudaGraphs, Slot, Staging, host_array
from service.messages import (
    WIRE_NUMPY,
    AttendInput,
    AttendOutput,
    BatcherObserver,
    BatchStats,
    NumericOverflow,
    as_float32,
    finite_as,
    narrowing_overflow,
    overflow_of,
)
from service.settings import Settings, parse_buckets

log = logging.getLogger("mha_serve.runner")

TORCH_DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


def common_dtype(names: Any) -> str:
    """The one dtype of a batch's members, or float32 (which holds every half exactly) when they differ."""
    first, *rest = names
    return first if all(n == first for n in rest) else "float32"


def narrow(arr: np.ndarray | None, dtype: str) -> np.ndarray | None:
    """A float32 host array in ``dtype``'s wire form, rounded as the device rounds (a batch that mixed dtypes)."""
    if arr is None or dtype == "float32":
        return arr
    return host_array(torch.from_numpy(np.ascontiguousarray(arr)).to(TORCH_DTYPES[dtype]), copy=False)


def answer(
    it: AttendInput, r: AttendOutput, dtype: str, wide: Callable[[], AttendOutput], model_dtype: str
) -> AttendOutput | NumericOverflow:
    """One request's result, computed in a batch whose results are in ``dtype``, as its own out_dtype, or the
    overflow to answer instead. An overflow is judged in the precision it happened in: ``wide()`` gives the
    request's own result in float32 (a download more, on this rare path only) to tell the model's computation
    overflowing (its message names the model's dtype) from a finite result the response's half cannot hold."""
    want = it.out_dtype
    w = None
    if want != dtype:  # a float32 batch of mixed dtypes: this request's own rounding
        w, r = r, AttendOutput(narrow(r.output, want), narrow(r.weights, want))
    if finite_as(r.output, want) and (r.weights is None or finite_as(r.weights, want)):
        return r
    if w is None:
        w = r if want == "float32" else wide()
    tensors = {"output": w.output, "weights": w.weights}
    found = overflow_of(tensors, as_float32(it.x, it.wire_dtype), model_dtype)
    if found is not None:
        return found
    name = "output" if not finite_as(r.output, want) else "weights"
    return narrowing_overflow(name, tensors[name], want)


def device_finite(y: torch.Tensor, lengths: np.ndarray, padded: np.ndarray | tuple = ()) -> torch.Tensor:
    """Whether every real element of a batch's result ``y`` (N, T, E) is finite, as a one-element bool tensor on its
    device (read after the download, which waits for it). ``padded``: the rows whose positions from ``lengths[r]`` on
    are padding a CUDA graph computed unmasked; they are zeroed first, as the host copy's are."""
    for r in padded:
        y[r, int(lengths[r]) :] = 0
    return torch.isfinite(y).all()


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
        inline_below_s=settings.forward_inline_us / 1e6,
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
        # Where a batch's results are checked for overflow: on a GPU, on the device before the download (a reduction
        # and one flag back), so that the model process reads no result's bytes; on a CPU with numpy on the host copy
        # (measured 10x cheaper than torch there). The host pass costs 4.9 us a row of [128,512] bfloat16 in cache
        # (largest_bits over a batch of 32: 156 us, this VM), the model process's CPU that a GPU host spares.
        self.finite_on_device = cuda

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

        No result is a view into a staging buffer (a later batch overwrites those). A request of the
        batch's full length gets a view of its rows of the batch's output, a fresh array whose every byte
        is some request's answer: copying it out would cost a fresh allocation and a copy per request, for
        memory that its neighbours' answers free a moment later. A shorter request gets a copy of its
        own rows, so that no answer keeps padding alive. Up to ``depth`` calls may run at once (each in
        its own staging slot).

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
        wire = common_dtype(it.wire_dtype for it in items)  # staged as it crossed: a half moves half the bytes
        lengths = np.empty(N, dtype=np.int64)
        mask = np.ones((N, T, T), dtype=np.bool_) if first.mask is not None else None
        uniform = mask is None and all(it.seq_len == T and it.lengths is None for it in items)
        xn = None
        if uniform and self.device.type == "cuda" and all(it.x_page_locked and it.wire_dtype == wire for it in items):
            # On a GPU in the model process, each x where its front end put it (page-locked): no copy on the host
            parts, row = [], 0
            for it in items:
                parts.append((it.x, row))
                row += it.batch
            lengths[:] = T
            x = self.staging.upload_from(slot, parts, (N, T, E), TORCH_DTYPES[wire], self.dtype)
        else:
            x = self.staging.host_input(slot, (N, T, E), TORCH_DTYPES[wire])  # reused (pinned on a GPU); all written
            xn = host_array(x, copy=False)  # fill through numpy views: no per-item tensor wrappers
            xs = [it.x if it.wire_dtype == wire else as_float32(it.x, it.wire_dtype) for it in items]
            row = 0
            # The one copy of x the engine must make on a CPU: the requests' arrays (views of their decoded bytes)
            # into one batch; the upload is then a no-op (same device and dtype) and the output comes back as the
            # forward's.
            if uniform:  # the common batch (one T, no lengths or mask): one copy for all, not three slice writes each
                np.concatenate(xs, out=xn)
                lengths[:] = T
            for it, xi in () if uniform else zip(items, xs, strict=True):
                b, t = it.batch, it.seq_len
                xn[row : row + b, :t] = xi
                xn[row : row + b, t:] = 0  # zero bits are 0.0 in every float dtype
                lengths[row : row + b] = it.lengths if it.lengths is not None else t
                if mask is not None:
                    mask[row : row + b, :t, :t] = it.mask
                row += b
            x = self.staging.upload(slot, x, self.dtype)
        real = int(lengths.sum())
        y = None
        graph = self.graphs is not None and first.causal and mask is None
        if graph:
            y = self.graphs.run(x)  # None when no captured bucket holds (N, T)
        graph = y is not None
        if y is None:
            y = self.module(
                x,
                lengths=None if uniform else torch.from_numpy(lengths),  # no padding: skip the module's lengths checks
                attn_mask=None if mask is None else torch.from_numpy(mask),
                causal=first.causal,
            ).output
        del x
        dtype = common_dtype(it.out_dtype for it in items)
        sent = y.to(TORCH_DTYPES[dtype])  # cast on the device: half the bytes back (y stays: ``wide`` reads it)
        padded = np.flatnonzero(lengths < T) if graph else ()  # the graph ran unmasked: zero its padding rows
        # Once per batch, in the response's dtype: a half cast from a non-finite value is non-finite (and a finite
        # float32 too large for it is Inf), so this sees every overflow.
        flag = device_finite(sent, lengths, padded) if self.finite_on_device else None
        if not len(padded):
            lent = self._download_lent(items, slot, sent)
            if lent is not None:  # each answer downloaded into its arena slot
                results = [AttendOutput(a, None) for a in lent]
                stats = BatchStats(N, N * T, real)
                finite = bool(flag)  # (lent only on a GPU, which checks on the device)
                if finite and all(it.out_dtype == dtype for it in items):
                    return results, stats
                return self._judged(items, results, y, dtype, lengths, padded), stats
        (out,) = self.staging.download(slot, [sent])
        del sent
        for r in padded:
            out[r, lengths[r] :] = 0
        # (on the host copy: numpy, a half by its bits)
        finite = finite_as(out, dtype) if flag is None else bool(flag)
        if xn is not None and np.may_share_memory(out, xn):  # a module that answered in its input's memory: reused
            out = out.copy()
        if len(items) == 1:
            results = [AttendOutput(out[:, : first.seq_len], None)]
        else:
            # Rows of the full length are a contiguous view of the batch's output, which the encoders send as
            # it is; a shorter request's rows skip padding, so they are copied (to_wire would copy them anyway).
            results = []
            row = 0
            for it in items:
                b, t = it.batch, it.seq_len
                mine = out[row : row + b, :t]
                results.append(AttendOutput(mine if t == T else mine.copy(), None))
                row += b
        stats = BatchStats(N, N * T, real)
        if finite and all(it.out_dtype == dtype for it in items):
            return results, stats
        return self._judged(items, results, y, dtype, lengths, padded), stats

    def _download_lent(self, items: list[AttendInput], slot: Slot, sent: torch.Tensor) -> list[np.ndarray] | None:
        """On a GPU in the model process: each request's rows of ``sent`` downloaded into a slot lent by the arena
        its answer goes back through (``AttendInput.answer_to``), which then sends it where it lies: no copy on the
        host when the arena is page-locked, one instead of two when not. None (nothing downloaded) where a request
        has no such arena, or one has no room: the batch then downloads as usual."""
        arenas = [it.answer_to for it in items]
        if self.device.type != "cuda" or None in arenas:
            return None
        dtype = WIRE_NUMPY[str(sent.dtype).removeprefix("torch.")]
        E = sent.shape[2]
        lent, parts, row = [], [], 0
        for it, arena in zip(items, arenas, strict=True):
            a = arena.lend((it.batch, it.seq_len, E), dtype)
            if a is None:
                return None  # (the ones lent so far go back as they are dropped)
            lent.append(a)
            parts.append((a, row))
            row += it.batch
        self.staging.download_into(slot, sent, parts, direct=all(a.page_locked for a in set(arenas)))
        return lent

    def _judged(
        self,
        items: list[AttendInput],
        results: list[AttendOutput],
        y: torch.Tensor,
        dtype: str,
        lengths: np.ndarray,
        padded: Any,
    ) -> list[AttendOutput | NumericOverflow]:
        """A batch whose results hold a non-finite value, or some of whose requests want another dtype: each
        request's own result judged (``answer``), widened from the forward's output ``y`` where it needs to be."""
        full: list[np.ndarray] = []

        def wide(i: int) -> AttendOutput:
            if not full:
                w = y.float().cpu().numpy()
                for r in padded:
                    w[r, lengths[r] :] = 0
                full.append(w)
            start = sum(it.batch for it in items[:i])
            return AttendOutput(full[0][start : start + items[i].batch, : items[i].seq_len], None)

        return [
            answer(it, r, dtype, lambda i=i: wide(i), self.dtype_name)
            for i, (it, r) in enumerate(zip(items, results, strict=True))
        ]

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
            x = self.staging.host_input(slot, it.x.shape, TORCH_DTYPES[it.wire_dtype])
            host_array(x, copy=False)[...] = it.x
            res = self.module(
                self.staging.upload(slot, x, self.dtype),
                lengths=None if it.lengths is None else torch.tensor(it.lengths, dtype=torch.int64),
                attn_mask=None if it.mask is None else torch.from_numpy(np.ascontiguousarray(it.mask)),
                causal=it.causal,
                need_weights=True,
                heads=list(it.heads) if it.heads is not None else None,
            )
            dtype = TORCH_DTYPES[it.out_dtype]
            out, weights = self.staging.download(slot, [res.output.to(dtype), res.weights.to(dtype)])
            result = answer(
                it,
                AttendOutput(out, weights),
                it.out_dtype,
                lambda res=res: AttendOutput(res.output.float().cpu().numpy(), res.weights.float().cpu().numpy()),
                self.dtype_name,
            )
            del res
            results.append(result)
            b, t = it.batch, it.seq_len
            stats.sequences += b
            stats.padded_tokens += b * t
            stats.real_tokens += int(it.lengths.sum()) if it.lengths is not None else b * t
            stats.weights_elements += weights.size
        return results, stats


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

"""Host <-> device transfers for the runner, and CUDA graphs for its common shapes. Knows no asyncio.

On a GPU a batch's upload and download cost as much as its forward pass at serving sizes (a pageable
copy takes several times a pinned one; the figures are in shared/PERF_NOTES.md and `make bench-gpu`).
Three things cut that:

- **Pinned, reused staging buffers.** Each slot holds page-locked host buffers for the input, the
  output and the weights, grown to the largest batch seen and reused after that, so a batch costs
  no cudaHostAlloc and its copies are real asynchronous DMA.
- **Copies on side streams, two batches in flight.** A slot's upload runs on an upload stream and
  its download on a download stream; the forward runs on the compute stream, ordered by events.
  With ``depth`` = 2 the runner takes a second batch while the first computes (the batcher keeps
  up to ``depth`` batches in flight, each in its own worker thread), so the next batch's host
  packing and upload run under the current forward, and the current download under the next one.
- **CUDA graphs** for a few (batch, length) buckets of plain causal attention, captured at
  start-up: one replay instead of a few dozen kernel launches.

On the CPU none of this applies: a slot is a reused ordinary buffer and the copies are no-ops.
"""

from __future__ import annotations

import ctypes
import logging
import queue
import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from functools import partial

import numpy as np
import torch
from torch import Tensor

log = logging.getLogger("mha_serve.engine")


def pick_bucket(buckets: list[tuple[int, int]], n: int, t: int) -> tuple[int, int] | None:
    """The smallest bucket (fewest padded tokens) that holds n sequences of length t, or None."""
    fits = [b for b in buckets if b[0] >= n and b[1] >= t]
    return min(fits, key=lambda b: (b[0] * b[1], b)) if fits else None


def host_array(t: Tensor, *, copy: bool) -> np.ndarray:
    """A host tensor as numpy (a copy the caller owns when ``copy``): bfloat16, which numpy lacks, as its bits."""
    if t.dtype == torch.bfloat16:
        t = t.view(torch.uint16)
    a = t.numpy()
    return a.copy() if copy else a


def _runs(parts: list[tuple[np.ndarray, int]], T: int) -> list[tuple[np.ndarray, int, int, int]]:
    """A batch's host arrays (``parts``: an array of (rows, length, E) and its first row in the batch) as runs, one
    copy each: arrays of the batch's full length ``T`` that follow each other in the batch and in memory (an arena
    lends one batch's slots one after the other; a front end puts its requests' x one after the other) are one
    copy, not one a request: issuing a copy costs the host torch's dispatch (a slice and a ``copy_`` of one element:
    2.7 us on a 2-vCPU EPYC) before the driver's own call.

    Each run: (its host memory as a flat array of the parts' dtype, its first row, its rows, its length). The flat
    array is made over the memory's address, writable whatever the parts are (a request's x is a read-only view of
    its front end's arena, which torch would warn about and never writes in a copy from it): the parts, alive
    through the copy, hold that memory mapped."""
    runs: list[list] = []
    for a, row in parts:
        rows, length = a.shape[0], a.shape[1]
        if runs:
            last = runs[-1]
            if length == T and last[3] == T and last[1] + last[2] == row and last[0] + last[4] == a.ctypes.data:
                last[2] += rows
                last[4] += a.nbytes
                continue
        runs.append([a.ctypes.data, row, rows, length, a.nbytes, a.dtype])
    return [
        (np.ctypeslib.as_array((ctypes.c_uint8 * nbytes).from_address(addr)).view(dtype), row, rows, length)
        for addr, row, rows, length, nbytes, dtype in runs
    ]


def _as_tensor(host: np.ndarray, dtype: torch.dtype, shape: tuple[int, int, int]) -> Tensor:
    """A run's host memory (``_runs``) as a tensor of ``dtype`` and ``shape`` over it (bfloat16 from its bits)."""
    h = torch.from_numpy(host)
    return (h if h.dtype == dtype else h.view(dtype)).view(shape)


def page_lock(buf: memoryview, *, read_only: bool = False) -> Callable[[], object] | None:
    """Page-lock a host buffer for the CUDA devices (cudaHostRegister, portable, as torch's own shared-memory pinning
    does), so that a copy between it and a device is the device's DMA: in the model process on a GPU, the answer
    arenas it makes (service/shm.py's ``Arena``, ``on_segment``), into which the runner downloads each answer, and
    its read-only mappings of the front ends' arenas (``read_only``, ``Mapped``), from which it uploads each x.
    Returns what undoes it, or None where the driver refused (read-only registration needs a device that supports
    it): the buffer stays ordinary memory, and the runner copies through its pinned staging buffers instead."""
    a = np.frombuffer(buf, np.uint8)
    ptr, n = a.ctypes.data, a.nbytes
    del a  # (no export of the buffer left behind: its owner unmaps it at trim and stop)
    cudart = torch.cuda.cudart()
    flags = 1 | (8 if read_only else 0)  # cudaHostRegisterPortable, cudaHostRegisterReadOnly
    err = int(cudart.cudaHostRegister(ptr, n, flags))
    if err != 0:
        log.warning(
            "page-locking a %d MiB %sarena segment failed (cudaError %d): its arrays are copied through staging",
            n >> 20,
            "mapped " if read_only else "",
            err,
        )
        return None
    return partial(cudart.cudaHostUnregister, ptr)


# Largest buffer kept pinned: page-locked memory is slow to allocate and taken from the host for good,
# so a rare huge batch (long sequences with their weights) gets a one-off ordinary buffer instead.
MAX_PINNED_BYTES = 256 * 1024 * 1024


@dataclass
class _Buffer:
    """A flat host buffer that grows to the largest request and is reused after that, in any dtype: a batch
    is staged in the dtype it crossed in (half precision at half the bytes), and one role's buffer serves them all."""

    pinned: bool
    data: Tensor | None = None  # bytes (uint8)
    allocations: int = 0

    def view(self, shape: tuple[int, ...], dtype: torch.dtype = torch.float32) -> Tensor:
        n = int(np.prod(shape)) * dtype.itemsize
        if self.pinned and n > MAX_PINNED_BYTES:
            return torch.empty(shape, dtype=dtype)  # too big to keep pinned: this batch only
        if self.data is None or self.data.numel() < n:
            # grow by at least 1.5x, so that a slowly rising batch size does not reallocate each time
            size = max(n, int(1.5 * self.data.numel())) if self.data is not None else n
            self.data = torch.empty(size, dtype=torch.uint8, pin_memory=self.pinned)
            self.allocations += 1
        return self.data[:n].view(dtype).view(shape)


@dataclass
class Slot:
    """One batch's transfer state: host buffers and the events that order its copies."""

    index: int
    x: _Buffer
    out: _Buffer
    weights: _Buffer
    uploaded: torch.cuda.Event | None = None
    computed: torch.cuda.Event | None = None
    downloaded: torch.cuda.Event | None = None

    @property
    def allocations(self) -> int:
        return self.x.allocations + self.out.allocations + self.weights.allocations


@dataclass
class StagingStats:
    slots: int
    pinned: bool
    streams: bool
    host_allocations: int
    host_bytes: int
    extra: dict = field(default_factory=dict)


class Staging:
    """Reusable host buffers and side streams for ``depth`` batches in flight.

    Use: ``with staging.slot() as s: x = staging.host_input(s, shape); ...; xd = staging.upload(s, x, dtype);
    y = forward(xd); out = staging.download(s, [y])``. ``slot()`` blocks while ``depth`` batches are in
    flight, so the caller can never overwrite a buffer that a copy still reads.
    """

    def __init__(self, device: torch.device, *, pinned: bool = True, streams: bool = True, depth: int = 1) -> None:
        if depth < 1:
            raise ValueError(f"staging depth must be >= 1, got {depth}")
        cuda = device.type == "cuda"
        self.device = device
        self.pinned = pinned and cuda
        self.streams = streams and cuda
        self.depth = depth
        self._up = torch.cuda.Stream(device) if self.streams else None
        self._down = torch.cuda.Stream(device) if self.streams else None
        self._slots = [Slot(i, _Buffer(self.pinned), _Buffer(self.pinned), _Buffer(self.pinned)) for i in range(depth)]
        self._free: queue.SimpleQueue[Slot] = queue.SimpleQueue()
        for s in self._slots:
            self._free.put(s)
        self._lock = threading.Lock()

    @contextmanager
    def slot(self) -> Iterator[Slot]:
        s = self._free.get()
        s.uploaded = s.computed = s.downloaded = None
        try:
            yield s
        finally:
            # (also after an error: no copy may still read or write this slot's buffers when it is reused)
            for ev in (s.uploaded, s.downloaded):
                if ev is not None:
                    ev.synchronize()
            self._free.put(s)

    def host_input(self, s: Slot, shape: tuple[int, int, int], dtype: torch.dtype = torch.float32) -> Tensor:
        """A host tensor of ``shape`` to pack the batch into, in the dtype it crossed in (not zeroed: the caller
        writes all of it)."""
        return s.x.view(shape, dtype)

    def upload(self, s: Slot, x: Tensor, dtype: torch.dtype) -> Tensor:
        """``x`` on the device in ``dtype``, ready for use on the current (compute) stream: the copy moves x's
        own (wire) dtype, and the cast to the model's runs on the device."""
        if self.device.type != "cuda":
            return x.to(self.device, dtype)
        compute = torch.cuda.current_stream(self.device)
        if self._up is None:
            return x.to(self.device, non_blocking=self.pinned).to(dtype)
        with torch.cuda.stream(self._up):
            # allocated on the upload stream, so the allocator orders its reuse after this copy
            xd = x.to(self.device, non_blocking=self.pinned)
            s.uploaded = torch.cuda.Event()
            s.uploaded.record(self._up)
        compute.wait_event(s.uploaded)
        xd.record_stream(compute)  # freed by the compute stream's work, not the upload stream's
        return xd.to(dtype)

    def upload_from(
        self, s: Slot, parts: list[tuple[np.ndarray, int]], shape: tuple[int, int, int], wire: torch.dtype, dtype
    ) -> Tensor:
        """A batch of one length (``shape``: N, T, E) on the device in ``dtype``, uploaded straight from its requests'
        x where they lie (``parts``: each x, in ``wire`` dtype, bfloat16 as its bits, and its first row), page-locked
        memory (``page_lock``: the model process's mapping of its front end's arena): no host copy into the pinned
        buffer. x's that follow each other in memory are one copy. Ready for use on the current (compute) stream."""
        compute = torch.cuda.current_stream(self.device)

        def copy_all() -> Tensor:
            xd = torch.empty(shape, dtype=wire, device=self.device)
            for host, row, rows, length in _runs(parts, shape[1]):
                xd[row : row + rows].copy_(_as_tensor(host, wire, (rows, length, shape[2])), non_blocking=True)
            return xd

        if self._up is None:
            return copy_all().to(dtype)
        with torch.cuda.stream(self._up):
            xd = copy_all()  # (allocated on the upload stream, so the allocator orders its reuse after these copies)
            s.uploaded = torch.cuda.Event()
            s.uploaded.record(self._up)
        compute.wait_event(s.uploaded)
        xd.record_stream(compute)
        return xd.to(dtype)

    def quiesced(self, fn: Callable[[], object]) -> None:
        """Run ``fn`` while no batch is in flight: it takes every slot (waiting for the batches that hold them, whose
        copies are done when they give them back) and gives them back after. For what must not happen under a copy,
        such as undoing the page-locking of memory a batch may be uploading from. Blocks: call it from a thread."""
        taken = [self._free.get() for _ in range(self.depth)]
        try:
            fn()
        finally:
            for slot in taken:
                self._free.put(slot)

    def download(self, s: Slot, tensors: list[Tensor | None]) -> list[np.ndarray | None]:
        """The device tensors as numpy arrays the caller owns, in their own dtype (bfloat16 as its uint16 bits;
        the runner casts them to the response's dtype on the device first: a half moves half the bytes).
        Waits for the copies."""
        if self.device.type != "cuda":
            return [None if t is None else host_array(t, copy=False) for t in tensors]
        hosts = self._copies(
            s,
            [
                (t, None if t is None else buf.view(tuple(t.shape), t.dtype))
                for t, buf in zip(tensors, (s.out, s.weights), strict=False)
            ],
        )
        # Copies the caller owns: the slot's buffers are overwritten by a later batch.
        return [None if h is None else host_array(h, copy=True) for h in hosts]

    def download_into(self, s: Slot, t: Tensor, parts: list[tuple[np.ndarray, int]], *, direct: bool) -> None:
        """Rows of the device tensor ``t`` (N, T, E) into host arrays the caller gives (``parts``: an array of
        (rows, length, E) in ``t``'s dtype, bfloat16 as its bits, and its first row; it takes ``t[row:row+rows,
        :length]``), such as answers lent by their arena (service/shm.py's ``Arena.lend``). Waits for the copies.

        ``direct``: the arrays are page-locked (``page_lock``), so the device writes them itself and the host copies
        nothing; else the rows come through the slot's pinned buffer and are copied from it here, once (``download``
        and the arena's put would copy each answer twice)."""
        if self.device.type != "cuda":
            whole = host_array(t, copy=False)
        elif not direct:
            (h,) = self._copies(s, [(t, s.out.view(tuple(t.shape), t.dtype))])
            whole = host_array(h, copy=False)
        else:
            pairs = [
                (t[row : row + rows, :length], _as_tensor(host, t.dtype, (rows, length, t.shape[2])))
                for host, row, rows, length in _runs(parts, t.shape[1])
            ]
            self._copies(s, pairs)
            return
        for dest, row in parts:
            np.copyto(dest, whole[row : row + dest.shape[0], : dest.shape[1]])

    def _copies(self, s: Slot, pairs: list[tuple[Tensor | None, Tensor | None]]) -> list[Tensor | None]:
        """Copy each device tensor into its host tensor after the batch's forward (on the download stream, with
        side streams), and wait for them; the host tensors, None where there was none."""
        compute = torch.cuda.current_stream(self.device)
        hosts: list[Tensor | None] = []

        def copy_all() -> None:
            for t, h in pairs:
                if t is None:
                    hosts.append(None)
                    continue
                if self._down is not None:
                    t.record_stream(self._down)  # not reused by the compute stream before this copy is done
                h.copy_(t, non_blocking=self.pinned)
                hosts.append(h)

        if self._down is None:
            copy_all()
            s.downloaded = torch.cuda.Event()
            s.downloaded.record(compute)
        else:
            s.computed = torch.cuda.Event()
            s.computed.record(compute)
            with torch.cuda.stream(self._down):
                self._down.wait_event(s.computed)
                copy_all()
                s.downloaded = torch.cuda.Event()
                s.downloaded.record(self._down)
        s.downloaded.synchronize()
        return hosts

    def stats(self) -> StagingStats:
        with self._lock:
            allocs = sum(s.allocations for s in self._slots)
            nbytes = sum(
                b.data.numel() * b.data.element_size()
                for s in self._slots
                for b in (s.x, s.out, s.weights)
                if b.data is not None
            )
        return StagingStats(self.depth, self.pinned, self.streams, allocs, nbytes)


class CudaGraphs:
    """Plain causal forwards captured as CUDA graphs, one per (batch, length) bucket.

    Only plain causal attention without weights is captured: with right padding and a causal mask,
    the first t outputs of a row never look at positions >= t, so a batch of n sequences of length
    <= t gets the same answer in any bucket (N >= n, T >= t), up to the kernels' rounding; its
    padding rows are computed and dropped. ``run`` returns None for a batch no bucket holds (it then runs
    eagerly). Capture happens in ``capture()``, at start-up, so no request pays for it.
    """

    def __init__(self, module: torch.nn.Module, buckets: list[tuple[int, int]], *, device: torch.device, dtype) -> None:
        self.module = module
        self.buckets = buckets
        self.device = device
        self.dtype = dtype
        self._graphs: dict[tuple[int, int], tuple[torch.cuda.CUDAGraph, Tensor, Tensor]] = {}
        self._lock = threading.Lock()
        self.replays = 0

    def capture(self) -> None:
        if self.device.type != "cuda" or not self.buckets:
            return
        E = self.module.config.emb_size
        max_len = self.module.config.max_seq_len
        side = torch.cuda.Stream(self.device)
        # Each graph has its own memory pool: they are replayed in any order, which a shared pool does
        # not allow. The buckets are few and small ([256, 128, 512] bf16 is 32 MiB).
        for n, t in self.buckets:
            if t > max_len:
                raise ValueError(f"CUDA graph bucket {n}x{t} is longer than max_seq_len {max_len}")
            static_x = torch.zeros(n, t, E, device=self.device, dtype=self.dtype)
            side.wait_stream(torch.cuda.current_stream(self.device))
            with torch.cuda.stream(side), torch.inference_mode():
                for _ in range(2):  # warm-up on a side stream, as torch.cuda.graphs recommends
                    self.module(static_x, causal=True)
            torch.cuda.current_stream(self.device).wait_stream(side)
            graph = torch.cuda.CUDAGraph()
            with torch.inference_mode(), torch.cuda.graph(graph):
                static_y = self.module(static_x, causal=True).output
            self._graphs[(n, t)] = (graph, static_x, static_y)
        torch.cuda.synchronize(self.device)

    @property
    def captured(self) -> list[tuple[int, int]]:
        return sorted(self._graphs)

    def run(self, x: Tensor) -> Tensor | None:
        """The causal output of x (n, t, E) through the smallest bucket that holds it, as a new tensor in the
        model's dtype (the runner casts it to the response's and judges overflow in it), or None when no bucket
        holds it."""
        if not self._graphs:
            return None
        n, t, _ = x.shape
        key = pick_bucket(self.captured, n, t)
        if key is None:
            return None
        graph, static_x, static_y = self._graphs[key]
        # Up to `depth` runner threads share the static buffers: the input copy, the replay and the
        # copy out are enqueued on the one compute stream under the lock, so they never interleave.
        with self._lock:
            static_x[:n, :t].copy_(x)
            static_x[:n, t:].zero_()  # rows < n never look there (causal), but keep it finite
            # rows >= n hold an earlier batch: they only feed outputs that are dropped
            graph.replay()
            self.replays += 1
            return static_y[:n, :t].clone()

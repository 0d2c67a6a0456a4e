"""Holds the module on its device; pads a batch of requests, runs it, unpads. Knows no asyncio."""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field

import numpy as np
import torch

from mha_core import MHAConfig, MultiHeadAttention, read_checkpoint
from service.settings import Settings

log = logging.getLogger("mha_serve.runner")

TORCH_DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


@dataclass(frozen=True)
class AttendInput:
    """One request, decoded and validated against the model."""

    x: np.ndarray  # (B, T, E) float32 or float16
    lengths: np.ndarray | None = None  # (B,) int64 in 1..T
    mask: np.ndarray | None = None  # (T, T) or (B, T, T) bool, True = may attend
    causal: bool = True
    need_weights: bool = False
    heads: tuple[int, ...] | None = None  # weights of these heads (all when None)
    fault: str | None = None  # tests only (settings.fault_injection): "raise" or "stall:<ms>"
    trace: object | None = None  # the request span's context when tracing is on (service/tracing.py); not in key

    @property
    def batch(self) -> int:
        return self.x.shape[0]

    @property
    def seq_len(self) -> int:
        return self.x.shape[1]

    @property
    def key(self) -> tuple:
        """Requests with the same key can share a forward pass."""
        return (self.causal, self.need_weights, self.mask is not None)


@dataclass
class AttendOutput:
    output: np.ndarray  # (B, T, E) float32
    weights: np.ndarray | None  # (B, len(heads), T, T) float32


@dataclass
class BatchStats:
    sequences: int = 0
    padded_tokens: int = 0
    real_tokens: int = 0
    compute_s: float = 0.0
    extra: dict = field(default_factory=dict)


def is_out_of_memory(exc: BaseException) -> bool:
    """A CUDA (or other accelerator) out-of-memory error, after which smaller batches may fit."""
    return isinstance(exc, torch.OutOfMemoryError) or "out of memory" in str(exc).lower()


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dev = torch.device(name)
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise RuntimeError(f"device {name!r} was asked for, but torch sees no CUDA device")
    if dev.type == "cuda" and dev.index is not None and dev.index >= torch.cuda.device_count():
        raise RuntimeError(f"device {name!r} was asked for, but torch sees {torch.cuda.device_count()} CUDA device(s)")
    return dev


class Runner:
    """The model on its device. ``run`` is called from one worker thread at a time."""

    def __init__(self, module: MultiHeadAttention, *, device: torch.device, dtype: torch.dtype, checksum: str) -> None:
        self.device = device
        self.dtype = dtype
        self.module = module.to(device=device, dtype=dtype).eval()
        self.config: MHAConfig = module.config
        self.checksum = checksum
        self._pin = device.type == "cuda"

    @classmethod
    def from_settings(cls, settings: Settings) -> Runner:
        if settings.torch_threads:
            torch.set_num_threads(settings.torch_threads)
        device = resolve_device(settings.device)
        dtype = TORCH_DTYPES[settings.dtype]
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
        return cls(module, device=device, dtype=dtype, checksum=checksum)

    def warmup(self) -> None:
        """A few forwards at the shapes traffic will bring, so the first request is not slow."""
        cfg = self.config
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

    def run(self, items: list[AttendInput]) -> tuple[list[AttendOutput], BatchStats]:
        """One forward pass for requests of the same key: right-pad to the longest T, run, unpad."""
        t0 = time.perf_counter()
        _inject_faults(items)
        first = items[0]
        E = self.config.emb_size
        T = max(it.seq_len for it in items)
        N = sum(it.batch for it in items)
        x = torch.zeros((N, T, E), dtype=torch.float32, pin_memory=self._pin)
        lengths = np.empty(N, dtype=np.int64)
        mask = np.ones((N, T, T), dtype=np.bool_) if first.mask is not None else None
        xn = x.numpy()  # fill through numpy views: no per-item tensor wrappers
        row = 0
        for it in items:
            b, t = it.batch, it.seq_len
            xn[row : row + b, :t] = it.x
            lengths[row : row + b] = it.lengths if it.lengths is not None else t
            if mask is not None:
                mask[row : row + b, :t, :t] = it.mask
            row += b
        real = int(lengths.sum())
        heads = None
        if first.need_weights:
            H = self.config.num_heads
            wanted = set()
            for it in items:
                wanted.update(it.heads if it.heads is not None else range(H))
            heads = sorted(wanted)
        x = x.to(self.device, self.dtype, non_blocking=True)
        res = self.module(
            x,
            lengths=torch.from_numpy(lengths),
            attn_mask=None if mask is None else torch.from_numpy(mask),
            causal=first.causal,
            need_weights=first.need_weights,
            heads=heads,
        )
        out = res.output.float().cpu().numpy()
        weights = res.weights.float().cpu().numpy() if res.weights is not None else None
        results = []
        row = 0
        for it in items:
            b, t = it.batch, it.seq_len
            w = None
            if weights is not None:
                w = weights[row : row + b, :, :t, :t]
                if it.heads is not None and list(it.heads) != heads:
                    w = w[:, [heads.index(h) for h in it.heads]]
            results.append(AttendOutput(out[row : row + b, :t], w))
            row += b
        if len(results) != len(items):
            raise RuntimeError(f"runner produced {len(results)} results for {len(items)} requests")
        stats = BatchStats(N, N * T, real, time.perf_counter() - t0)
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

"""Attention core benchmark: mha_core.MultiHeadAttention vs a seed-style per-head loop vs torch.nn.MultiheadAttention.

Times the output path (need_weights=False) and the weights path (per-head weights returned) for a set of [B, T]
sizes at E=512, H=8, head_size=64, float32, on CPU, under torch.inference_mode(). All implementations of one size
are measured round-robin (interleaved) so that machine noise hits them alike; each cell is the median of repeated
timings after warm-up.

Implementations:
  ours         mha_core.MultiHeadAttention (fused qkv Linear + SDPA; explicit softmax when weights are asked for)
  seed-loop    the original simple-llm computation: H separate nn.Linear(E, D) each for q, k, v, per-head
               scores = q @ k^T / sqrt(d), masked_fill(tril == 0, -inf), softmax, @ v, concat, output Linear
  nn.MHA       torch.nn.MultiheadAttention(E, H, batch_first=True) with a causal mask, in two configurations:
                 fastpath   eval-mode native fast path, explicit bool mask (True = masked out)
                 is_causal  fast path disabled, attn_mask=nn.Transformer.generate_square_subsequent_mask(T),
                            is_causal=True (so the output path runs on SDPA's causal kernel)
               the faster of the two per size and path is the comparator for the ratio columns and targets.

FLOP count per call (multiply-adds counted as 2 FLOPs; softmax, masking, bias adds not counted):
  projections  2*B*T*E*3*H*D   (q, k, v)
             + 2*B*T*H*D*E     (output projection)
  attention    2*2*B*H*T*T*D   (q @ k^T and weights @ v)
The attention term counts the causal T x T product as FULL (no halving for the masked upper triangle), for every
implementation alike, so GFLOP/s are comparable across implementations but not a hardware-efficiency figure.

Ratios (ours/seed-loop, ours/nn.MHA) are time ratios, lower is better, taken as the median over rounds of the ratio of
two cells timed back to back in the same round, which cancels load that drifts slower than a round.

Targets (PASS/FAIL lines; the exit code is 0 either way, this is a report):
  1. output path <= 0.6x the seed loop's time at T=1024 (1x1024 and 4x1024)
  2. output path <= 0.9x nn.MultiheadAttention's (fastest config) at every size
  3. weights path <= 1.0x nn.MHA need_weights=True, average_attn_weights=False (fastest config) at every size
Correctness (outputs and per-head weights within 1e-4 of each other) is checked before timing; a mismatch exits 1.

Usage:
  python bench/core.py [--threads N] [--quick] [--timer wall|cpu] [--json PATH]

On a machine shared with other work, elapsed times are inflated and noisy (worst with several threads, which wait
on each other when one is preempted); --timer cpu --threads 1 measures the CPU time spent instead, which is steadier.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import statistics
import sys
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor, nn

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from mha_core import MHAConfig, MultiHeadAttention

E, H, D, MAX_T = 512, 8, 64, 1024
SIZES = [(1, 128), (8, 128), (32, 128), (1, 1024), (4, 1024)]
TOL = 1e-4
PATHS = ("output", "weights")
MHA_CONFIGS = ("nn.MHA fastpath", "nn.MHA is_causal")


# --------------------------------------------------------------------------------------------- seed-style loop
class SeedHead(nn.Module):
    """One head as simple-llm computes it: its own small q, k, v Linears and a tril mask."""

    def __init__(self, emb_size: int, head_size: int, max_seq_len: int) -> None:
        super().__init__()
        self.query = nn.Linear(emb_size, head_size)
        self.key = nn.Linear(emb_size, head_size)
        self.value = nn.Linear(emb_size, head_size)
        self.register_buffer("tril", torch.tril(torch.ones(max_seq_len, max_seq_len)))

    def forward(self, x: Tensor) -> tuple[Tensor, Tensor]:
        T = x.shape[1]
        q, k, v = self.query(x), self.key(x), self.value(x)
        scores = q @ k.transpose(-2, -1) / math.sqrt(k.shape[-1])  # (B, T, T)
        scores = scores.masked_fill(self.tril[:T, :T] == 0, float("-inf"))
        weights = F.softmax(scores, dim=-1)
        return weights @ v, weights


class SeedLoopMHA(nn.Module):
    """The seed's per-head loop: H heads, concat, output Linear. Returns (output, stacked weights or None)."""

    def __init__(self, num_heads: int, emb_size: int, head_size: int, max_seq_len: int) -> None:
        super().__init__()
        self.heads = nn.ModuleList(SeedHead(emb_size, head_size, max_seq_len) for _ in range(num_heads))
        self.proj = nn.Linear(num_heads * head_size, emb_size)

    def forward(self, x: Tensor, need_weights: bool = False) -> tuple[Tensor, Tensor | None]:
        results = [head(x) for head in self.heads]
        out = self.proj(torch.cat([y for y, _ in results], dim=-1))
        weights = torch.stack([w for _, w in results], dim=1) if need_weights else None  # (B, H, T, T)
        return out, weights


# --------------------------------------------------------------------------------------------- building
def build() -> tuple[MultiHeadAttention, SeedLoopMHA, nn.MultiheadAttention]:
    """Our module from a fixed seed, and a seed loop and an nn.MHA carrying exactly its weights."""
    ours = MultiHeadAttention.from_seed(MHAConfig(H, E, D, MAX_T), seed=0).eval()
    seed = SeedLoopMHA(H, E, D, MAX_T).eval()
    mha = nn.MultiheadAttention(E, H, batch_first=True).eval()
    HD = H * D
    assert HD == E, "nn.MHA's packed in_proj layout matches ours only when H*D == E"
    with torch.no_grad():
        w, b = ours.qkv.weight, ours.qkv.bias  # rows: [q heads 0..H-1 | k heads | v heads], head-major
        for i, head in enumerate(seed.heads):
            for j, lin in enumerate((head.query, head.key, head.value)):
                rows = slice(j * HD + i * D, j * HD + (i + 1) * D)
                lin.weight.copy_(w[rows])
                lin.bias.copy_(b[rows])
        seed.proj.load_state_dict(ours.proj.state_dict())
        mha.in_proj_weight.copy_(w)
        mha.in_proj_bias.copy_(b)
        mha.out_proj.load_state_dict(ours.proj.state_dict())
    return ours, seed, mha


Fn = Callable[[], tuple[Tensor, Tensor | None]]


def implementations(
    ours: MultiHeadAttention, seed: SeedLoopMHA, mha: nn.MultiheadAttention, x: Tensor, need_weights: bool
) -> dict[str, Fn]:
    """Zero-argument callables for one input, each returning (output, per-head weights or None)."""
    T = x.shape[1]
    bool_mask = torch.ones(T, T, dtype=torch.bool).triu(1)  # nn.MHA convention: True = may NOT attend
    float_mask = nn.Transformer.generate_square_subsequent_mask(T)  # 0 / -inf, the hint is_causal asks for
    kw = {"need_weights": need_weights, "average_attn_weights": False}

    def run_ours() -> tuple[Tensor, Tensor | None]:
        return tuple(ours(x, need_weights=need_weights))

    def run_seed() -> tuple[Tensor, Tensor | None]:
        return seed(x, need_weights=need_weights)

    def run_mha_fastpath() -> tuple[Tensor, Tensor | None]:
        torch.backends.mha.set_fastpath_enabled(True)
        return mha(x, x, x, attn_mask=bool_mask, **kw)

    def run_mha_is_causal() -> tuple[Tensor, Tensor | None]:
        torch.backends.mha.set_fastpath_enabled(False)
        try:
            return mha(x, x, x, attn_mask=float_mask, is_causal=True, **kw)
        finally:
            torch.backends.mha.set_fastpath_enabled(True)

    return {
        "ours": run_ours,
        "seed-loop": run_seed,
        MHA_CONFIGS[0]: run_mha_fastpath,
        MHA_CONFIGS[1]: run_mha_is_causal,
    }


def flops(B: int, T: int) -> int:
    """FLOPs of one call (see the module docstring): projections + attention, causal counted as full."""
    projections = 2 * B * T * E * 3 * H * D + 2 * B * T * H * D * E
    attention = 2 * 2 * B * H * T * T * D
    return projections + attention


# --------------------------------------------------------------------------------------------- correctness
def check_correctness(ours: MultiHeadAttention, seed: SeedLoopMHA, mha: nn.MultiheadAttention) -> float:
    """Every implementation against the seed loop, output and weights, at every size. Exits 1 on a mismatch."""
    gen = torch.Generator().manual_seed(1234)
    worst = 0.0
    failures = []
    for B, T in SIZES:
        x = torch.randn(B, T, E, generator=gen)
        ref_out, ref_w = implementations(ours, seed, mha, x, need_weights=True)["seed-loop"]()
        for need_weights in (False, True):
            for name, fn in implementations(ours, seed, mha, x, need_weights).items():
                out, w = fn()
                diffs = {"output": (out - ref_out).abs().max().item()}
                if need_weights:
                    diffs["weights"] = (w - ref_w).abs().max().item() if w is not None else math.inf
                for what, diff in diffs.items():
                    worst = max(worst, diff)
                    if not diff <= TOL:
                        failures.append(f"{B}x{T} {name} need_weights={need_weights} {what}: max|diff| = {diff:.3g}")
    if failures:
        print(f"CORRECTNESS FAIL (tolerance {TOL:g} vs the seed loop):", *failures, sep="\n  ")
        sys.exit(1)
    return worst


# --------------------------------------------------------------------------------------------- timing
@dataclass
class Cell:
    size: str
    path: str
    impl: str
    ms: float  # median ms per call over the rounds
    gflops: float
    calls_per_sample: int
    samples_ms: list[float]  # ms per call in each round; round r of every cell of a size ran back to back


TIMERS = {"wall": time.perf_counter, "cpu": time.process_time}


def time_size(fns: dict[tuple[str, str], Fn], budget_s: float, warmup: int, clock=time.perf_counter) -> tuple:
    """Time each callable round-robin: every round runs each one `inner` times, in turn.

    The number of rounds is shared by all callables of a size (so round r of one can be paired with round r of
    another); `inner` is chosen per callable so that each one gets about `budget_s` in all.
    Returns ({key: [ms per call, one per round]}, {key: inner}).
    """
    for fn in fns.values():
        for _ in range(warmup):
            fn()
    per_call = {}
    for key, fn in fns.items():  # calibrate: a rough time per call
        t0, n = time.perf_counter(), 0
        while n < 3 or time.perf_counter() - t0 < 0.02:
            fn()
            n += 1
        per_call[key] = (time.perf_counter() - t0) / n
    rounds = min(25, max(5, round(budget_s / max(per_call.values()))))
    inner = {key: max(1, round(budget_s / rounds / t)) for key, t in per_call.items()}
    times: dict[tuple[str, str], list[float]] = {key: [] for key in fns}
    for _ in range(rounds):
        for key, fn in fns.items():
            t0 = clock()
            for _ in range(inner[key]):
                fn()
            times[key].append((clock() - t0) / inner[key] * 1e3)
    return times, inner


def run_bench(args: argparse.Namespace, ours, seed, mha) -> list[Cell]:
    budget_s, warmup = (0.05, 2) if args.quick else (0.6, 5)
    gen = torch.Generator().manual_seed(0)
    cells = []
    for B, T in SIZES:
        x = torch.randn(B, T, E, generator=gen)
        fns = {}
        for path in PATHS:
            for impl, fn in implementations(ours, seed, mha, x, need_weights=path == "weights").items():
                fns[(path, impl)] = fn
        t0 = time.perf_counter()
        times, inner = time_size(fns, budget_s, warmup, TIMERS[args.timer])
        size = f"{B}x{T}"
        print(f"  measured {size} in {time.perf_counter() - t0:.1f} s", file=sys.stderr, flush=True)
        for (path, impl), samples in times.items():
            ms = statistics.median(samples)
            cells.append(Cell(size, path, impl, ms, flops(B, T) / (ms * 1e-3) / 1e9, inner[(path, impl)], samples))
    return cells


# --------------------------------------------------------------------------------------------- reporting
def paired_ratio(mine: Cell, other: Cell) -> float:
    """Median over rounds of mine/other, each round's pair measured back to back: robust to slow load drifts."""
    return statistics.median(a / b for a, b in zip(mine.samples_ms, other.samples_ms, strict=True))


def summarize(cells: list[Cell]) -> tuple[list[dict], list[dict]]:
    """Per (size, path): our ratios against the seed loop and the fastest nn.MHA; then the target verdicts."""
    by = {(c.size, c.path, c.impl): c for c in cells}
    ratios = []
    for B, T in SIZES:
        size = f"{B}x{T}"
        for path in PATHS:
            mine = by[(size, path, "ours")]
            best = min((by[(size, path, m)] for m in MHA_CONFIGS), key=lambda c: c.ms)
            ratios.append(
                {
                    "size": size,
                    "T": T,
                    "path": path,
                    "vs_seed": paired_ratio(mine, by[(size, path, "seed-loop")]),
                    "vs_mha": paired_ratio(mine, best),
                    "mha_impl": best.impl,
                }
            )
    targets = []
    for r in ratios:
        if r["path"] == "output" and r["T"] == 1024:
            targets.append(_target(f"output path <= 0.6x seed loop at {r['size']}", r["vs_seed"], 0.6))
    for r in ratios:
        if r["path"] == "output":
            targets.append(_target(f"output path <= 0.9x {r['mha_impl']} at {r['size']}", r["vs_mha"], 0.9))
    for r in ratios:
        if r["path"] == "weights":
            targets.append(_target(f"weights path <= 1.0x {r['mha_impl']} at {r['size']}", r["vs_mha"], 1.0))
    return ratios, targets


def _target(name: str, ratio: float, limit: float) -> dict:
    return {"target": name, "ratio": ratio, "limit": limit, "pass": ratio <= limit}


def print_report(cells: list[Cell], ratios: list[dict], targets: list[dict], meta: dict) -> None:
    print(
        f"\nmha_core attention benchmark: E={E} H={H} head_size={D} float32, torch {torch.__version__}, "
        f"{meta['threads']} thread(s), {platform.machine()} with {os.cpu_count()} CPUs; "
        f"correctness max|diff| vs seed loop = {meta['max_abs_diff']:.2g}"
    )
    load = meta["loadavg"]
    print(f"1-min load average before/after timing: {load[0]:.2f}/{load[1]:.2f} (other work skews times)")
    if max(load) > (os.cpu_count() or 1) * 0.75:
        print("WARNING: the machine was busy with other work while timing; absolute times are inflated and noisy.")
    if meta["timer"] == "cpu":
        print("TIMER cpu: ms/call is process CPU time per call summed over threads, not elapsed time.")
    print("GFLOP/s count causal attention as full T x T; ratios are time ratios (lower is better);")
    print("ratio columns are on the `ours` row: median over rounds of ours/other, each pair timed back to back;")
    print("`*` marks the faster nn.MHA config (by median ms), the comparator for ours/nn.MHA.\n")
    ratio_of = {(r["size"], r["path"]): r for r in ratios}
    print("| size | path | impl | ms/call | GFLOP/s | ours/seed-loop | ours/nn.MHA |")
    print("|---|---|---|---:|---:|---:|---:|")
    for c in cells_sorted(cells):
        r = ratio_of[(c.size, c.path)]
        impl = f"{c.impl} *" if c.impl == r["mha_impl"] else c.impl
        vs_seed = f"{r['vs_seed']:.2f}x" if c.impl == "ours" else ""
        vs_mha = f"{r['vs_mha']:.2f}x" if c.impl == "ours" else ""
        print(f"| {c.size} | {c.path} | {impl} | {c.ms:.3f} | {c.gflops:.1f} | {vs_seed} | {vs_mha} |")
    print()
    for t in targets:
        verdict = "PASS" if t["pass"] else "FAIL"
        print(f"{verdict}: {t['target']}: {t['ratio']:.3f}x (limit {t['limit']:.1f}x)")
    failed = sum(not t["pass"] for t in targets)
    print(f"\n{len(targets) - failed}/{len(targets)} targets passed" + (f", {failed} FAILED" if failed else ""))


def cells_sorted(cells: list[Cell]) -> list[Cell]:
    order = {name: i for i, name in enumerate(["ours", "seed-loop", *MHA_CONFIGS])}
    sizes = {f"{B}x{T}": i for i, (B, T) in enumerate(SIZES)}
    return sorted(cells, key=lambda c: (sizes[c.size], PATHS.index(c.path), order[c.impl]))


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, default=2, help="torch.set_num_threads (default 2)")
    parser.add_argument("--quick", action="store_true", help="short warm-up and ~0.05 s per cell: a smoke run")
    parser.add_argument(
        "--timer",
        choices=sorted(TIMERS),
        default="wall",
        help="wall: elapsed time (default); cpu: process CPU time, all threads summed (steadier on a shared machine)",
    )
    parser.add_argument("--json", type=Path, metavar="PATH", help="also write the results to PATH as JSON")
    args = parser.parse_args()

    torch.set_num_threads(args.threads)
    ours, seed, mha = build()
    with torch.inference_mode():
        worst = check_correctness(ours, seed, mha)
        load_before = os.getloadavg()[0]
        cells = run_bench(args, ours, seed, mha)
        load_after = os.getloadavg()[0]
    ratios, targets = summarize(cells)
    meta = {"threads": args.threads, "timer": args.timer, "max_abs_diff": worst, "loadavg": [load_before, load_after]}
    print_report(cells, ratios, targets, meta)

    if args.json:
        result = {
            "config": {"E": E, "H": H, "head_size": D, "dtype": "float32", "threads": args.threads},
            "torch": torch.__version__,
            "quick": args.quick,
            "timer": args.timer,
            "flops_formula": "2*B*T*E*3*H*D + 2*B*T*H*D*E + 2*2*B*H*T*T*D (causal counted as full)",
            "correctness_max_abs_diff": worst,
            "loadavg_1min_before_after": [load_before, load_after],
            "cells": [asdict(c) for c in cells_sorted(cells)],
            "ratios": ratios,
            "targets": targets,
        }
        args.json.write_text(json.dumps(result, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())

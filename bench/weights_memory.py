"""What the weights path allocates, counted by torch.profiler (tracemalloc cannot see torch's buffers).

For each case: how many allocations of at least one (B, H, T, T) weights tensor's size, and all the
bytes allocated during one forward, in units of that final weights tensor. "Writes B*H*T*T once"
means one such allocation and a total near 1 (plus the float32 blocks, bounded by 256 query rows).
Runs on the CPU; with --device cuda it counts the CUDA caching allocator's events instead.

    .venv/bin/python bench/weights_memory.py [--device cpu|cuda]
"""

from __future__ import annotations

import argparse

import torch
from torch.profiler import ProfilerActivity, profile

from mha_core import MHAConfig, MultiHeadAttention

CASES = [  # (dtype, B, T, padded)
    (torch.float32, 2, 1024, False),
    (torch.float32, 2, 1024, True),
    (torch.float32, 1, 4096, False),
    (torch.bfloat16, 2, 1024, False),
    (torch.bfloat16, 2, 1024, True),
    (torch.bfloat16, 1, 4096, False),
]


def measure(dtype: torch.dtype, B: int, T: int, padded: bool, device: str) -> tuple[int, float, float]:
    """(allocations >= one weights tensor, bytes allocated / weights bytes, peak in use / weights bytes)."""
    m = MultiHeadAttention.from_seed(MHAConfig(8, 512, 64, T), 0).eval().to(device, dtype)
    x = torch.randn(B, T, 512, device=device).to(dtype)
    lengths = [T] + [T // 2] * (B - 1) if padded else None
    m(x, need_weights=True, lengths=lengths)  # warm-up (the cached causal bias, the allocator)
    unit = B * 8 * T * T * torch.empty((), dtype=dtype).element_size()
    acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device == "cuda" else [])
    with profile(activities=acts, profile_memory=True) as prof:
        m(x, need_weights=True, lengths=lengths)
    key = "self_cpu_memory_usage"
    if device == "cuda":  # (torch < 2.4 called it self_cuda_memory_usage)
        key = (
            "self_device_memory_usage"
            if hasattr(prof.events()[0], "self_device_memory_usage")
            else "self_cuda_memory_usage"
        )
    # self memory: an op's allocations are also reported by every op that called it
    events = sorted(prof.events(), key=lambda e: e.time_range.start)
    sizes = [getattr(e, key) for e in events if getattr(e, key) > 0]
    in_use = peak = 0
    for e in events:  # frees are the negative ([memory]) events: the running sum is what is held
        in_use += getattr(e, key)
        peak = max(peak, in_use)
    return sum(1 for s in sizes if s >= unit), sum(sizes) / unit, peak / unit


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--device", default="cpu")
    args = ap.parse_args()
    print("| dtype | B | T | padded | allocations >= weights | bytes allocated / weights | peak held / weights |")
    print("|---|---:|---:|---|---:|---:|---:|")
    for dtype, B, T, padded in CASES:
        n, total, largest = measure(dtype, B, T, padded, args.device)
        name = str(dtype).removeprefix("torch.")
        print(f"| {name} | {B} | {T} | {'yes' if padded else 'no'} | {n} | {total:.2f} | {largest:.2f} |")


if __name__ == "__main__":
    main()

"""The longest legitimate forward pass, to choose MHA_FORWARD_HANG_S: Runner.run on the largest batch.

The default model (or the MHA_* model settings), on the CPU, one torch thread (the slowest a replica
runs): MHA_MAX_BATCH_TOKENS tokens at max_seq_len, once without weights and once with every head's
weights for every sequence (beyond the default weights limits: the bound for a deployment that raises
them). Prints each one's time; MHA_FORWARD_HANG_S should stay well above the larger.

Usage: .venv/bin/python bench/forward_time.py [--threads 1] [--repeat 2]
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from service.engine.runner import Runner
from service.messages import AttendInput
from service.settings import Settings


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--repeat", type=int, default=2)
    args = parser.parse_args()
    s = Settings(torch_threads=args.threads, warmup=False, device="cpu", cuda_graphs="")
    runner = Runner.from_settings(s)
    cfg = runner.config
    T = cfg.max_seq_len
    n = s.max_batch_tokens // T
    rng = np.random.default_rng(0)
    x = rng.standard_normal((n, T, cfg.emb_size)).astype(np.float32)
    per = max(1, min(n, s.max_request_batch))
    batches = {
        f"{n} x {T} tokens": [AttendInput(x)],
        f"{n} x {T} tokens with weights": [AttendInput(x[i : i + per], need_weights=True) for i in range(0, n, per)],
    }
    for name, items in batches.items():
        for _ in range(args.repeat):
            t0 = time.perf_counter()
            runner.run(items)
            print(f"{name}, {args.threads} thread(s): {time.perf_counter() - t0:.2f} s", flush=True)


if __name__ == "__main__":
    main()

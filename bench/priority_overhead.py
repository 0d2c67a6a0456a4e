"""The batcher's own cost per request with one priority level: this checkout's batcher vs a baseline's.

Both batchers run in this process, in turn (7 rounds, alternating), with a runner that does no math
(it returns its input), 3000 requests at concurrency 32 each round: what is measured is
queueing, grouping, dispatch, the worker-thread round trip and the futures. Prints the median
microseconds per request of each and their ratio (target: 1.0 within noise: MHA_PRIORITY_LEVELS=1 costs
what the batcher cost before priorities).

Usage: .venv/bin/python bench/priority_overhead.py [--baseline main]
"""

from __future__ import annotations

import argparse
import asyncio
import importlib.util
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from service.engine import batcher as here  # noqa: E402
from service.messages import AttendInput, AttendOutput, BatchStats  # noqa: E402

X = np.zeros((1, 4, 2), np.float32)


def run(items: list[AttendInput]):
    n = len(items)
    return [AttendOutput(it.x, None) for it in items], BatchStats(n, 4 * n, 4 * n, 1e-4)


def load_baseline(rev: str):
    show = ["git", "show", f"{rev}:service/engine/batcher.py"]
    src = subprocess.run(show, cwd=ROOT, capture_output=True)
    if src.returncode != 0:  # a revision before the engine/frontend layout: the batcher lived at service/batcher.py
        show[-1] = f"{rev}:service/batcher.py"
        src = subprocess.run(show, cwd=ROOT, check=True, capture_output=True)
    path = Path(tempfile.mkdtemp()) / "batcher_baseline.py"
    path.write_bytes(src.stdout)
    spec = importlib.util.spec_from_file_location("batcher_baseline", path)
    mod = importlib.util.module_from_spec(spec)
    sys.modules["batcher_baseline"] = mod
    spec.loader.exec_module(mod)
    return mod


async def once(mod, n: int = 3000, conc: int = 32) -> float:
    b = mod.Batcher(run, mod.BatchLimits())
    await b.start()
    far = time.monotonic() + 600
    sem = asyncio.Semaphore(conc)

    async def one() -> None:
        async with sem:
            await b.infer(AttendInput(X), deadline=far)

    t0 = time.perf_counter()
    await asyncio.gather(*(one() for _ in range(n)))
    dt = time.perf_counter() - t0
    await b.stop()
    return dt / n * 1e6


async def amain(baseline) -> None:
    res: dict[str, list[float]] = {"baseline": [], "this": []}
    for _ in range(7):
        for name, mod in (("baseline", baseline), ("this", here)):
            res[name].append(await once(mod))
    for k, v in res.items():
        print(f"{k:8s}: median {statistics.median(v):.1f} us/request (rounds: {', '.join(f'{x:.1f}' for x in v)})")
    print(f"ratio this/baseline: {statistics.median(res['this']) / statistics.median(res['baseline']):.3f}")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--baseline", default="main", help="git revision whose service/engine/batcher.py to compare with")
    args = ap.parse_args()
    asyncio.run(amain(load_baseline(args.baseline)))


if __name__ == "__main__":
    main()

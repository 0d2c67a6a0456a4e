"""Write a valid ``--input-data`` file for perf_analyzer from the server's model config.

perf_analyzer sends data for every input, optional ones included, and its own generators
cannot make valid data here: "random" gives NaNs and bool bytes other than 0/1, "zero" gives
lengths of 0. This file holds N finite x [T, E] tensors, lengths = T, and an all-true
attn_mask [T, T] (the model's causal default still applies), per sequence (the config's dims
leave the batch dimension out; perf_analyzer adds it, -b). perf_analyzer asks for every output
in the metadata, so the weights [H, T, T] are computed and sent too.

    python bench/perf_input.py --url http://127.0.0.1:8000 --seq-len 128 -o bench/out/perf_input.json

For perf_analyzer's sequence mode, the steps of a sequence on ``mha-seq`` take x alone (a step refuses
lengths and attn_mask), each a few rows, so that --sequence-length steps fit max_seq_len:

    python bench/perf_input.py --model mha-seq --seq-len 1 --x-only -o bench/out/perf_seq.json
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import httpx
import numpy as np


def input_data(config: dict, seq_len: int, count: int, seed: int = 0, optional: bool = True) -> dict:
    """``optional=False``: x alone (perf_analyzer then leaves the optional inputs out of its requests)."""
    dims = {t["name"]: t["dims"] for t in config["input"]}
    E = int(dims["x"][-1])
    rng = np.random.default_rng(seed)
    rows = []
    for _ in range(count):
        x = rng.standard_normal((seq_len, E), dtype=np.float32)
        row: dict = {"x": {"content": [round(float(v), 5) for v in x.reshape(-1)], "shape": [seq_len, E]}}
        if optional:
            row["lengths"] = [seq_len]  # dims [1]: one per sequence
            row["attn_mask"] = {"content": [True] * (seq_len * seq_len), "shape": [seq_len, seq_len]}
        rows.append(row)
    return {"data": rows}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--url", default="http://127.0.0.1:8000", help="mha-serve's HTTP address")
    p.add_argument("--model", default="mha")
    p.add_argument("--seq-len", type=int, default=128, help="T of every request")
    p.add_argument("--count", type=int, default=4, help="distinct requests perf_analyzer cycles through")
    p.add_argument("--x-only", action="store_true", help="leave the optional inputs (lengths, attn_mask) out")
    p.add_argument("-o", "--output", type=Path, default=Path("bench/out/perf_input.json"))
    a = p.parse_args()
    r = httpx.get(f"{a.url}/v2/models/{a.model}/config", timeout=10)
    r.raise_for_status()
    a.output.parent.mkdir(parents=True, exist_ok=True)
    a.output.write_text(json.dumps(input_data(r.json(), a.seq_len, a.count, optional=not a.x_only)))
    print(a.output)


if __name__ == "__main__":
    main()

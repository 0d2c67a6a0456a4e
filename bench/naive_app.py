"""The naive baseline for bench/service.py: what a first FastAPI attempt looks like.

A pydantic model validates ``x: list[list[list[float]]]`` number by number, a plain ``def``
endpoint (so FastAPI runs it in its threadpool) runs the module unbatched, and the output goes
back as nested lists through FastAPI's default JSON response. Same model as the service
(8 heads, emb 512, head 64, max_seq_len 1024, seed 0); torch threads from MHA_TORCH_THREADS.

    MHA_TORCH_THREADS=1 taskset -c 0 .venv/bin/python -m uvicorn bench.naive_app:app --port P \
        --loop uvloop --http httptools --no-access-log
"""

from __future__ import annotations

import os

import torch
from fastapi import FastAPI
from pydantic import BaseModel

from mha_core import MHAConfig, MultiHeadAttention

if os.environ.get("MHA_TORCH_THREADS"):
    torch.set_num_threads(int(os.environ["MHA_TORCH_THREADS"]))

model = MultiHeadAttention.from_seed(MHAConfig(8, 512, 64, 1024), 0).eval()
app = FastAPI(title="naive attention")


class AttendIn(BaseModel):
    x: list[list[list[float]]]


class AttendOut(BaseModel):
    output: list[list[list[float]]]


@app.get("/readyz")
def readyz() -> dict[str, str]:
    return {"status": "ready"}


@app.post("/attend", response_model=AttendOut)
def attend(req: AttendIn) -> dict:
    with torch.inference_mode():
        y = model(torch.tensor(req.x, dtype=torch.float32)).output
    return {"output": y.tolist()}

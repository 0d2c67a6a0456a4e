"""Where the correctness tests run: the CPU always, and a CUDA device in float32, bfloat16 and float16
when one is present (MHA_TEST_DEVICE, default: cuda when torch sees one). Without one the CUDA cases
are skipped with the reason, which `pytest -ra` lists. Cases on an accelerator carry the `device`
marker: `pytest -m device` (bench/gpu.py) runs just them."""

from __future__ import annotations

import os

import pytest
import torch


def test_device() -> str | None:
    """The accelerator the device cases run on, or None."""
    name = os.environ.get("MHA_TEST_DEVICE") or ("cuda" if torch.cuda.is_available() else "cpu")
    if not name.startswith("cuda"):
        return None
    if not torch.cuda.is_available():
        return None
    return name


test_device.__test__ = False  # (not a test: pytest collects test_* functions)

ACCEL = test_device()
SKIP_REASON = (
    "no CUDA device (torch sees none, or MHA_TEST_DEVICE says cpu); on a GPU host these run in fp32, bf16 and fp16"
)

# Tolerances against a float64 reference for values of magnitude O(1): the dtype's unit roundoff
# (2^-24, 2^-11, 2^-8) times the few roundings of a projection, a softmax and a second projection,
# with room for the reductions' length (E, T <= 64 here). bf16 keeps 8 mantissa bits: ~4e-3 per
# rounding, so 6e-2 over a dozen roundings of values up to ~4; fp16 keeps 11: 8x tighter.
TOLERANCES = {
    torch.float32: {"atol": 2e-5, "rtol": 1e-4},
    torch.bfloat16: {"atol": 6e-2, "rtol": 5e-2},
    torch.float16: {"atol": 8e-3, "rtol": 5e-2},
}


def tol(dtype: torch.dtype, scale: float = 1.0) -> dict:
    t = TOLERANCES[dtype]
    return {"atol": t["atol"] * scale, "rtol": t["rtol"]}


def _accel(dtype: torch.dtype, name: str):
    marks = [pytest.mark.device]
    if ACCEL is None:
        marks.append(pytest.mark.skip(reason=SKIP_REASON))
    return pytest.param((ACCEL or "cuda", dtype), id=name, marks=marks)


# (device, dtype) cases: the CPU in float32 (the reference platform), the accelerator in all three.
DEVICE_CASES = [
    pytest.param(("cpu", torch.float32), id="cpu-fp32"),
    _accel(torch.float32, "cuda-fp32"),
    _accel(torch.bfloat16, "cuda-bf16"),
    _accel(torch.float16, "cuda-fp16"),
]

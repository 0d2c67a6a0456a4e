"""Shared fixtures; each test gets the marker of its folder (unit, integration, e2e)."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

from tests.devices import DEVICE_CASES

torch.set_num_threads(min(2, os.cpu_count() or 1))


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    for item in items:
        folder = Path(str(item.fspath)).parent.name
        if folder in ("unit", "integration", "e2e"):
            item.add_marker(getattr(pytest.mark, folder))


@pytest.fixture(params=DEVICE_CASES)
def device_dtype(request) -> tuple[torch.device, torch.dtype]:
    """(device, dtype) of a correctness test: cpu-fp32 always, CUDA in fp32/bf16/fp16 when present."""
    name, dtype = request.param
    return torch.device(name), dtype


@pytest.fixture
def rng_seed() -> int:
    """A fresh seed per test, printed so that a failure can be replayed."""
    seed = int.from_bytes(os.urandom(4), "little")
    torch.manual_seed(seed)
    print(f"torch seed: {seed}")
    return seed

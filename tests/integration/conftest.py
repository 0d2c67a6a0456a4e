"""The app in-process: httpx.AsyncClient over ASGITransport, inside the app's lifespan."""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator

import httpx
import pytest
from asgi_lifespan import LifespanManager

from service.app import create_app
from service.settings import Settings

TINY = {
    "num_heads": 4,
    "emb_size": 32,
    "head_size": 8,
    "max_seq_len": 64,
    "warmup": False,
    "replica_id": "test-replica",
    "decode_processes": 0,  # no process pool per in-process app; tests/integration/test_offload.py turns it on
    "grpc_port": 0,  # the in-process app serves no gRPC; tests/e2e and test_grpc.py start it on a free port
    "kv_cache_bytes": 1 << 20,  # each app's cache is frozen with it (service/heap.py): keep it small
}


@pytest.fixture
def settings_kw() -> dict:
    return {}


@pytest.fixture
async def app(settings_kw):
    app = create_app(settings=Settings(**{**TINY, **settings_kw}))
    async with LifespanManager(app):
        yield app


@pytest.fixture
async def client(app):
    async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://test") as c:
        yield c


@contextlib.asynccontextmanager
async def serving(app) -> AsyncIterator[httpx.AsyncClient]:
    """``app`` inside its lifespan, and a client over it: for a test that makes apps of its own."""
    async with (
        LifespanManager(app),
        httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://test") as c,
    ):
        yield c

"""Per-request limits agree with the batch limits: a request no batch could hold is a 422 naming the limit."""

from __future__ import annotations

import httpx
import numpy as np
import pytest
from asgi_lifespan import LifespanManager

from mha_core import MHAConfig, MultiHeadAttention, save_checkpoint
from service.app import create_app
from service.settings import Settings

from .conftest import TINY


@pytest.fixture
async def client(tmp_path):
    path = tmp_path / "tiny.safetensors"
    save_checkpoint(MultiHeadAttention.from_seed(MHAConfig(4, 32, 8, 64, True), 1), path)
    # With a checkpoint, max_seq_len is only known once it is read: start-up cannot refuse these settings.
    settings = Settings(**{**TINY, "checkpoint": str(path), "max_batch_tokens": 128, "max_request_batch": 4})
    app = create_app(settings=settings)
    transport = httpx.ASGITransport(app=app)
    async with LifespanManager(app), httpx.AsyncClient(transport=transport, base_url="http://test") as c:
        yield c


async def test_a_request_over_max_batch_tokens_is_422_naming_the_limit(client):
    x = np.random.default_rng(0).standard_normal((4, 64, 32)).round(3).tolist()
    r = await client.post("/attend", json={"x": x})
    assert r.status_code == 422, r.text
    assert r.json()["error"]["type"] == "validation_error"
    assert "B=4 x T=64 = 256 tokens, more than max_batch_tokens 128" in r.json()["error"]["message"]
    ok = await client.post("/attend", json={"x": x[:2]})  # 2 x 64 = 128 fits
    assert ok.status_code == 200, ok.text
    assert np.asarray(ok.json()["output"]).shape == (2, 64, 32)

"""mha_client against a real mha-serve (uvicorn on 127.0.0.1), checked against the module run directly."""

from __future__ import annotations

import asyncio
from collections.abc import Iterator

import numpy as np
import pytest
import torch

from mha_client import AsyncClient, Client, MhaClientError
from mha_core import MHAConfig, MultiHeadAttention
from tests.e2e.conftest import start_server

CONFIG = MHAConfig(4, 32, 8, 64)  # the conftest's TINY_ENV, built-in model from seed 0


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    s = start_server(tmp_path_factory.mktemp("server"), env={"MHA_SEED": "0", "MHA_REPLICA_ID": "e2e"})
    try:
        yield s.url
    finally:
        s.stop()


@pytest.fixture(scope="module")
def reference() -> MultiHeadAttention:
    return MultiHeadAttention.from_seed(CONFIG, seed=0).eval()


def expected(mha: MultiHeadAttention, x: np.ndarray, **kwargs) -> tuple[np.ndarray, np.ndarray]:
    res = mha(torch.from_numpy(x), need_weights=True, **kwargs)
    return res.output.numpy(), res.weights.numpy()


@pytest.mark.parametrize("encoding", ["base64", "lists"])
def test_attend_matches_the_module(server: str, reference: MultiHeadAttention, encoding: str) -> None:
    x = np.random.default_rng(0).standard_normal((3, 10, 32)).astype(np.float32)
    lengths = [10, 7, 3]
    with Client(server) as mha:
        res = mha.attend(x, lengths=lengths, return_weights=True, encoding=encoding)
    out, weights = expected(reference, x, lengths=torch.tensor(lengths))
    np.testing.assert_allclose(res.output, out, atol=1e-5, rtol=0)
    np.testing.assert_allclose(res.weights, weights, atol=1e-5, rtol=0)
    assert res.model["num_heads"] == 4 and res.model["emb_size"] == 32
    assert res.served_by == "e2e" and res.batch_size >= 1
    assert res.queue_ms >= 0 and res.compute_ms > 0


def test_options_torch_input_and_a_mask(server: str, reference: MultiHeadAttention) -> None:
    x = torch.randn(2, 12, 32)
    mask = torch.rand(12, 12) > 0.3
    mask.fill_diagonal_(True)  # every query may attend somewhere
    with Client(server) as mha:
        res = mha.attend(x, causal=False, heads=[2, 0])
        masked = mha.attend(x, attn_mask=mask, causal=False, return_weights=True)
    out, weights = expected(reference, x.numpy(), causal=False, heads=[2, 0])
    np.testing.assert_allclose(res.output, out, atol=1e-5, rtol=0)
    np.testing.assert_allclose(res.weights, weights, atol=1e-5, rtol=0)
    out, weights = expected(reference, x.numpy(), causal=False, attn_mask=mask)
    np.testing.assert_allclose(masked.output, out, atol=1e-5, rtol=0)
    np.testing.assert_allclose(masked.weights, weights, atol=1e-5, rtol=0)
    assert (masked.weights[:, :, ~mask.numpy()] == 0).all()


@pytest.mark.parametrize("dtype", ["float16", "bfloat16"])
def test_half_precision_on_the_wire(server: str, reference: MultiHeadAttention, dtype: str) -> None:
    x = np.random.default_rng(2).standard_normal((1, 9, 32)).astype(np.float32)
    with Client(server) as mha:
        res = mha.attend(x, dtype=dtype)
    out, _ = expected(reference, x)
    np.testing.assert_allclose(res.output, out, atol=0.05 if dtype == "bfloat16" else 5e-3, rtol=0)


def test_the_servers_message_reaches_the_caller(server: str) -> None:
    with Client(server) as mha, pytest.raises(MhaClientError) as info:
        mha.attend(np.zeros((1, 4, 31), np.float32))
    assert info.value.status == 422 and info.value.type == "validation_error"
    assert "the model expects 32" in info.value.message


def test_model_ready_and_heatmap(server: str) -> None:
    with Client(server) as mha:
        assert mha.ready()
        model = mha.model()
        png = mha.heatmap(np.random.default_rng(3).standard_normal((1, 6, 32)), heads=[1, 2])
    assert (model["num_heads"], model["emb_size"], model["head_size"], model["max_seq_len"]) == (4, 32, 8, 64)
    assert png.startswith(b"\x89PNG\r\n\x1a\n")


def test_async_client_concurrently(server: str, reference: MultiHeadAttention) -> None:
    xs = [np.random.default_rng(10 + i).standard_normal((1, 5 + i, 32)).astype(np.float32) for i in range(8)]

    async def main():
        async with AsyncClient(server) as mha:
            return await asyncio.gather(*(mha.attend(x, return_weights=True) for x in xs))

    for x, res in zip(xs, asyncio.run(main()), strict=True):
        out, weights = expected(reference, x)
        np.testing.assert_allclose(res.output, out, atol=1e-5, rtol=0)
        np.testing.assert_allclose(res.weights, weights, atol=1e-5, rtol=0)

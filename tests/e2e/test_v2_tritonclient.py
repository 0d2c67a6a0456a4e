"""The v2 routes of a real ``mha-serve`` (uvicorn on 127.0.0.1), driven by NVIDIA's tritonclient[http]."""

from __future__ import annotations

from collections.abc import Iterator

import ml_dtypes
import numpy as np
import pytest
import torch
import tritonclient.http as triton
from tritonclient.utils import InferenceServerException

from mha_core import MultiHeadAttention

from .conftest import Server, builtin_model, start_server

rng = np.random.default_rng()


@pytest.fixture(scope="module")
def server(tmp_path_factory) -> Iterator[Server]:
    s = start_server(tmp_path_factory.mktemp("v2"))
    yield s
    assert s.stop() == 0


@pytest.fixture(scope="module")
def client(server) -> Iterator[triton.InferenceServerClient]:
    c = triton.InferenceServerClient(server.url.removeprefix("http://"), concurrency=4, network_timeout=30)
    try:
        yield c
    finally:
        c.close()


@pytest.fixture(scope="module")
def mha() -> MultiHeadAttention:
    return builtin_model()


NP = {"FP32": np.float32, "FP16": np.float16, "BF16": ml_dtypes.bfloat16}


def test_health_and_metadata(client):
    assert client.is_server_live() and client.is_server_ready()
    assert client.is_model_ready("mha") and client.is_model_ready("mha", "1")
    assert not client.is_model_ready("nope")
    assert "binary_tensor_data" in client.get_server_metadata()["extensions"]
    meta = client.get_model_metadata("mha")
    assert [t["name"] for t in meta["inputs"]] == ["x", "lengths", "attn_mask"]
    assert meta["inputs"][0]["shape"] == [-1, -1, 32]
    assert [t["name"] for t in meta["outputs"]] == ["output", "weights"]
    with pytest.raises(InferenceServerException) as e:
        client.get_model_metadata("nope")
    assert e.value.status() == "404" and "unknown model 'nope'" in e.value.message()


@pytest.mark.parametrize(
    ("datatype", "binary_in", "binary_out", "atol"),
    [
        ("FP32", True, True, 1e-5),
        ("FP32", False, False, 1e-5),
        ("FP32", True, False, 1e-5),
        ("FP16", False, True, 3e-3),
        ("BF16", True, True, 3e-2),
    ],
)
def test_infer_equals_module(client, mha, datatype, binary_in, binary_out, atol):
    x = rng.standard_normal((2, 11, 32)).astype(NP[datatype])
    lengths = np.array([11, 4], np.int32)
    xi = triton.InferInput("x", list(x.shape), datatype).set_data_from_numpy(x, binary_data=binary_in)
    li = triton.InferInput("lengths", [2], "INT32").set_data_from_numpy(lengths, binary_data=binary_in)
    outs = [triton.InferRequestedOutput(n, binary_data=binary_out) for n in ("output", "weights")]
    res = client.infer("mha", [xi, li], outputs=outs, request_id="r1", parameters={"heads": "3,0"})
    assert res.get_response()["id"] == "r1"
    out, w = res.as_numpy("output"), res.as_numpy("weights")
    assert out.dtype == NP[datatype] and out.shape == (2, 11, 32) and w.shape == (2, 2, 11, 11)
    want = mha(torch.from_numpy(x.astype(np.float32)), lengths=[11, 4], need_weights=True, heads=[3, 0])
    np.testing.assert_allclose(out.astype(np.float32), want.output.numpy(), atol=atol, rtol=1e-2)
    np.testing.assert_allclose(w.astype(np.float32), want.weights.numpy(), atol=atol, rtol=1e-2)


def test_async_infer_default_outputs_and_gzip(client, mha):
    xs = [rng.standard_normal((1, T, 32)).astype(np.float32) for T in (3, 17, 64, 40)]
    pending = []
    for i, x in enumerate(xs):
        xi = triton.InferInput("x", list(x.shape), "FP32").set_data_from_numpy(x)
        kw = {"request_compression_algorithm": "gzip"} if i == 0 else {}
        pending.append(client.async_infer("mha", [xi], parameters={"causal": False}, **kw))
    for x, p in zip(xs, pending, strict=True):
        res = p.get_result(timeout=30)
        assert [o["name"] for o in res.get_response()["outputs"]] == ["output"]  # weights only when asked
        want = mha(torch.from_numpy(x), causal=False).output.numpy()
        np.testing.assert_allclose(res.as_numpy("output"), want, atol=1e-5)


def test_errors_reach_the_client_as_messages(client):
    xi = triton.InferInput("x", [1, 2, 32], "INT8").set_data_from_numpy(np.zeros((1, 2, 32), np.int8))
    with pytest.raises(InferenceServerException) as e:
        client.infer("mha", [xi])
    assert e.value.status() == "422" and "expected one of FP32, FP16, BF16" in e.value.message()
    xi = triton.InferInput("x", [1, 2, 32], "FP32").set_data_from_numpy(np.zeros((1, 2, 32), np.float32))
    with pytest.raises(InferenceServerException) as e:
        client.infer("mha", [xi], outputs=[triton.InferRequestedOutput("logits")])
    assert e.value.status() == "422" and "unknown output 'logits'" in e.value.message()
    with pytest.raises(InferenceServerException) as e:
        client.infer("mha", [xi], model_version="2")
    assert e.value.status() == "404"

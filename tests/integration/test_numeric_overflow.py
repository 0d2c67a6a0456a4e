"""Half precision never returns silent garbage: range checks before the cast, finiteness before encoding.

On the code before these tests, a float16 model answered 200 with every output null for inputs of
magnitude 1e5 (beyond float16) and for inputs of 2e4 (within float16, but the projections overflow).
"""

from __future__ import annotations

import base64

import httpx
import numpy as np
import orjson
import pytest
import torch
from asgi_lifespan import LifespanManager

from mha_core import MHAConfig, MultiHeadAttention, save_checkpoint
from service.app import create_app
from service.engine.runner import Runner
from service.errors import ServiceError
from service.frontend import codecs
from service.settings import Settings

from .conftest import TINY

INFER = "/v2/models/mha/infer"
ADVICE = "send smaller values, or serve a float32 model (MHA_DTYPE=float32)"
rng = np.random.default_rng()


def b64(x: np.ndarray, dtype: str = "float32") -> dict:
    raw = codecs.f32_to_bf16(x).tobytes() if dtype == "bfloat16" else x.astype(dtype).tobytes()
    return {"dtype": dtype, "shape": list(x.shape), "b64": base64.b64encode(raw).decode()}


def v2(x: np.ndarray, datatype: str = "FP32", *, binary: bool, weights: bool = False) -> tuple[bytes, dict]:
    spec = {"name": "x", "datatype": datatype, "shape": list(x.shape)}
    wire = np.ascontiguousarray(x, dtype=np.float16 if datatype == "FP16" else np.float32)
    outputs = [{"name": "output", "parameters": {"binary_data": binary}}]
    if weights:
        outputs.append({"name": "weights", "parameters": {"binary_data": binary}})
    if binary:
        spec["parameters"] = {"binary_data_size": wire.nbytes}
        header = orjson.dumps({"inputs": [spec], "outputs": outputs})
        return header + wire.tobytes(), {"inference-header-content-length": str(len(header))}
    spec["data"] = wire.reshape(-1).tolist()
    return orjson.dumps({"inputs": [spec], "outputs": outputs}), {"content-type": "application/json"}


async def every_route(client: httpx.AsyncClient, x: np.ndarray, *, v2_datatype: str = "FP32", b64_dtype="float32"):
    """(route, status, error type or None, message) for x sent through every encoding of both protocols."""
    out = []
    for name, body in (("lists", {"x": x.tolist()}), ("base64", {"x": b64(x, b64_dtype)})):
        for weights in (False, True):
            r = await client.post("/attend", json={**body, "return_weights": weights})
            err = r.json().get("error") if r.status_code != 200 else None
            out.append(
                (f"/attend {name} weights={weights}", r.status_code, err and err["type"], err and err["message"])
            )
    for binary in (False, True):
        for weights in (False, True):
            content, headers = v2(x, v2_datatype, binary=binary, weights=weights)
            r = await client.post(INFER, content=content, headers=headers)
            err = r.json()["error"] if r.status_code != 200 else None
            out.append((f"/v2 binary={binary} weights={weights}", r.status_code, None, err))
    return out


@pytest.fixture
async def half_client(request):
    app = create_app(settings=Settings(**{**TINY, "dtype": request.param}))
    transport = httpx.ASGITransport(app=app)
    async with LifespanManager(app), httpx.AsyncClient(transport=transport, base_url="http://test") as c:
        yield app, c


@pytest.mark.parametrize("half_client", ["float16"], indirect=True)
async def test_float16_input_beyond_its_range_is_a_422_before_the_cast(half_client):
    _, client = half_client
    x = rng.standard_normal((1, 4, 32)).astype(np.float32)
    x[0, 2, 7] = 1e5
    for route, status, kind, message in await every_route(client, x):
        assert status == 422, (route, status, message)
        assert kind in (None, "validation_error"), route
        assert "x holds 1 value(s) beyond the range of the model's dtype float16 (|x| <= 65504)" in message, route
        assert "the first 100000 at [0, 2, 7]" in message and message.endswith(ADVICE), route


@pytest.mark.parametrize("half_client", ["float16"], indirect=True)
async def test_the_largest_float16_is_in_range_and_the_next_float32_is_not(half_client):
    """The range check's edge is float16's largest value itself: 65504 is computed (and, on this input, the
    model's float16 forward stays finite, so the answer is a 200 equal to it), one float32 step above is refused."""
    app, client = half_client
    x = np.random.default_rng(7).standard_normal((1, 4, 32)).astype(np.float32)
    x[0, 2, 7] = 65504.0
    with torch.inference_mode():
        want = app.state.mha.engine.runner.module(torch.from_numpy(x).half()).output.float().numpy()
    assert np.isfinite(want).all()  # the premise: no overflow inside the model, so no 422 of either kind
    for route, status, _, message in await every_route(client, x):
        assert status == 200, (route, status, message)
    r = await client.post("/attend", json={"x": x.tolist()})
    np.testing.assert_allclose(np.array(r.json()["output"], dtype=np.float32), want, rtol=1e-3, atol=1e-3)
    x[0, 2, 7] = np.nextafter(np.float32(65504.0), np.float32(np.inf))  # 65504.004: rounds to 65504 in float16
    for route, status, kind, message in await every_route(client, x):
        assert status == 422 and kind in (None, "validation_error"), (route, status, message)
        assert "x holds 1 value(s) beyond the range of the model's dtype float16 (|x| <= 65504)" in message, route


@pytest.mark.parametrize("half_client", ["float16"], indirect=True)
async def test_float16_overflow_inside_the_model_is_a_clear_422_in_every_encoding(half_client):
    """x = 60000 fits float16, but q/k/v = x W + b sums 32 products: the projections overflow."""
    app, client = half_client
    x = np.full((1, 4, 32), 60000.0, dtype=np.float32)
    with torch.inference_mode():
        res = app.state.mha.engine.runner.module(torch.from_numpy(x).half())
    assert not torch.isfinite(res.output).all()  # the premise: float16 overflows on this input
    for route, status, kind, message in await every_route(client, x):
        assert status == 422, (route, status, message)
        assert kind in (None, "numeric_overflow"), route
        assert message.startswith("the model's float16 computation overflowed: output has "), (route, message)
        assert "non-finite value(s) of 128" in message and "The largest |x| in this request is " in message
        assert message.endswith(ADVICE), route
    # the same request in float32 is fine: the advice is true
    app32 = create_app(settings=Settings(**TINY))
    transport = httpx.ASGITransport(app=app32)
    async with LifespanManager(app32), httpx.AsyncClient(transport=transport, base_url="http://t") as c32:
        r = await c32.post("/attend", json={"x": x.tolist()})
    assert r.status_code == 200 and np.isfinite(np.array(r.json()["output"], dtype=np.float64)).all()


@pytest.mark.parametrize("half_client", ["float16"], indirect=True)
async def test_heatmap_refuses_an_overflow_too(half_client):
    _, client = half_client
    x = np.full((1, 4, 32), 60000.0, dtype=np.float32)
    r = await client.post("/attend/heatmap", json={"x": x.tolist()})
    assert r.status_code == 422 and r.json()["error"]["type"] == "numeric_overflow"


@pytest.mark.parametrize("half_client", ["bfloat16"], indirect=True)
async def test_bfloat16_has_float32s_range(half_client):
    _, client = half_client
    x = np.full((1, 4, 32), 60000.0, dtype=np.float32)  # overflows float16, not bfloat16
    for route, status, _, message in await every_route(client, x):
        assert status == 200, (route, status, message)
    x[0, 0, 0] = 3.4e38  # a float32, beyond bfloat16's largest 3.3895e38
    r = await client.post("/attend", json={"x": b64(x)})
    assert r.status_code == 422
    assert "beyond the range of the model's dtype bfloat16 (|x| <= 3.38953e+38)" in r.json()["error"]["message"]


async def test_a_float16_response_of_a_float32_model_that_does_not_fit_is_a_422(tmp_path):
    """x sent as float16 answers in float16; a float32 result beyond 65504 must not become Inf."""
    mha = MultiHeadAttention.from_seed(MHAConfig(4, 32, 8, 64), seed=0)
    with torch.no_grad():
        mha.proj.weight.mul_(100)  # a model whose outputs are large
    save_checkpoint(mha, tmp_path / "big.safetensors")
    app = create_app(settings=Settings(**TINY, checkpoint=tmp_path / "big.safetensors"))
    x = np.full((1, 3, 32), 5000.0, dtype=np.float32)
    want = mha.eval()(torch.from_numpy(x)).output.numpy()
    assert np.isfinite(want).all() and np.abs(want).max() > 65504  # the premise
    transport = httpx.ASGITransport(app=app)
    async with LifespanManager(app), httpx.AsyncClient(transport=transport, base_url="http://t") as client:
        r = await client.post("/attend", json={"x": b64(x, "float16")})
        assert r.status_code == 422 and r.json()["error"]["type"] == "numeric_overflow"
        message = r.json()["error"]["message"]
        assert message.startswith("output has values beyond float16's range (largest |value| ")
        assert message.endswith("responses come in the dtype of x: send x as float32, or send smaller values")
        for binary in (False, True):
            content, headers = v2(x, "FP16", binary=binary)
            r = await client.post(INFER, content=content, headers=headers)
            assert r.status_code == 422 and "output has values beyond float16's range" in r.json()["error"]
        r = await client.post("/attend", json={"x": b64(x, "float16"), "response_encoding": "lists"})
        assert r.status_code == 200  # lists answer float32 numbers, which hold it
        np.testing.assert_allclose(np.array(r.json()["output"]), want, rtol=1e-5)


async def test_a_fully_masked_query_row_returns_the_projection_bias(app, client):
    """The attention result of a row that may attend to nothing is zero, so its output is proj.bias."""
    x = rng.standard_normal((1, 4, 32)).astype(np.float32)
    mask = np.tril(np.ones((4, 4), dtype=bool))
    mask[2] = False
    r = await client.post("/attend", json={"x": x.tolist(), "attn_mask": mask.tolist(), "return_weights": True})
    assert r.status_code == 200, r.text
    out, weights = np.array(r.json()["output"]), np.array(r.json()["weights"])
    bias = app.state.mha.engine.runner.module.proj.bias.detach().numpy()
    np.testing.assert_array_equal(out[0, 2].astype(np.float32), bias)  # exactly: JSON carries float32 exactly
    assert np.all(weights[0, :, 2] == 0) and not np.allclose(out[0, 1], bias)


def test_codecs_finiteness_and_narrowing():
    a = np.array([1.0, 2.0, 3.0e38, 3.0e38], dtype=np.float32)  # its float32 sum overflows: no false alarm
    assert codecs.all_finite(a) and codecs.all_finite(np.zeros(0, np.float32))
    assert not codecs.all_finite(np.array([1.0, np.nan], np.float32))
    assert not codecs.all_finite(np.array([np.inf, -np.inf], np.float32))
    with pytest.raises(ServiceError) as e:
        codecs.to_wire(np.array([1.0, 7e4], np.float32), "float16", "weights")
    assert e.value.type == "numeric_overflow" and e.value.message.startswith("weights has values beyond float16's")
    with pytest.raises(ServiceError) as e:
        codecs.to_wire(np.array([3.4e38], np.float32), "bfloat16", "output")
    assert "beyond bfloat16's range" in e.value.message
    assert codecs.to_wire(np.array([65504.0], np.float32), "float16", "x")[0] == 65504
    with pytest.raises(ServiceError) as e:
        codecs.encode(np.array([[np.nan]], np.float32), "lists", "float32", "output")
    assert e.value.status == 422 and e.value.message == "output has 1 non-finite value(s); send smaller values"


def test_a_model_whose_weights_do_not_fit_the_dtype_does_not_start():
    mha = MultiHeadAttention.from_seed(MHAConfig(2, 8, 4, 8), seed=0)
    with torch.no_grad():
        mha.proj.weight[0, 0] = 1e6
    Runner(mha, device=torch.device("cpu"), dtype=torch.float32, checksum="x")  # fine in float32
    with pytest.raises(ValueError, match=r"the model's proj\.weight hold values that torch\.float16 cannot represent"):
        Runner(mha, device=torch.device("cpu"), dtype=torch.float16, checksum="x")


async def test_v2_fp16_json_data_beyond_its_range_says_so(client):
    data = [1.0] * 31 + [1e5]
    body = {"inputs": [{"name": "x", "datatype": "FP16", "shape": [1, 1, 32], "data": data}]}
    r = await client.post(INFER, json=body)
    assert r.status_code == 422
    assert r.json()["error"] == "input 'x' is FP16, but holds 100000, beyond FP16's 65504; send it as FP32"

"""Sequences over every transport (/attend, v2 HTTP JSON and binary, gRPC), in-process, against the float64
reference that recomputes the whole sequence and takes the step's rows; each protocol error with its status."""

from __future__ import annotations

import base64
import itertools
import socket
from contextlib import asynccontextmanager

import grpc
import httpx
import numpy as np
import pytest
import torch
from asgi_lifespan import LifespanManager

from mha_client import AsyncClient, MhaSequenceLost
from service.app import create_app
from service.frontend.triton_proto import grpc_service_pb2 as pb
from service.frontend.triton_proto import grpc_service_pb2_grpc as pb_grpc
from service.settings import Settings
from tests.reference import naive_attention, seed_checkpoint

H, E, D, MAX = 4, 32, 8, 48
SEQ_INFER = "/v2/models/mha-seq/infer"


@pytest.fixture
def seed_model(tmp_path):
    return seed_checkpoint(tmp_path / "seed.pt", H, E, D, MAX), tmp_path / "seed.pt"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@asynccontextmanager
async def served(checkpoint, **kw):
    port = _free_port()
    settings = Settings(
        checkpoint=str(checkpoint),
        warmup=False,
        device="cpu",
        dtype="float32",
        decode_processes=0,
        host="127.0.0.1",
        grpc_port=port,
        **kw,
    )
    app = create_app(settings=settings)
    async with (
        LifespanManager(app),
        httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://test") as http,
        grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel,
    ):
        yield app, http, pb_grpc.GRPCInferenceServiceStub(channel)


@pytest.fixture
async def server(seed_model):
    async with served(seed_model[1]) as s:
        yield s


def check(seed, full: np.ndarray, start: int, got: np.ndarray) -> None:
    ref, _ = naive_attention(seed, torch.from_numpy(full[:, : start + got.shape[1]]))
    np.testing.assert_allclose(got, ref[:, start:].detach().numpy(), atol=1e-5, rtol=1e-4)


def b64(x: np.ndarray) -> dict:
    return {"dtype": "float32", "shape": list(x.shape), "b64": base64.b64encode(x.tobytes()).decode()}


async def attend_step(http, x, sid, start=False, end=False, **extra):
    return await http.post("/attend", json={"x": b64(x), "sequence": {"id": sid, "start": start, "end": end}, **extra})


def attend_output(r: httpx.Response, t: int) -> np.ndarray:
    assert r.status_code == 200, r.text
    return np.frombuffer(base64.b64decode(r.json()["output"]["b64"]), np.float32).reshape(1, t, E)


async def v2_step(http, x, params, binary: bool, model="mha-seq"):
    spec = {"name": "x", "datatype": "FP32", "shape": list(x.shape)}
    if binary:
        spec["parameters"] = {"binary_data_size": x.nbytes}
        head = httpx.Request("POST", "/", json={"inputs": [spec], "parameters": params}).content
        return await http.post(
            f"/v2/models/{model}/infer",
            content=head + x.tobytes(),
            headers={"inference-header-content-length": str(len(head))},
        )
    spec["data"] = x.reshape(-1).tolist()
    return await http.post(f"/v2/models/{model}/infer", json={"inputs": [spec], "parameters": params})


def grpc_step(x, sid, start=False, end=False, model="mha-seq") -> pb.ModelInferRequest:
    req = pb.ModelInferRequest(model_name=model)
    req.inputs.add(name="x", datatype="FP32", shape=list(x.shape))
    req.raw_input_contents.append(x.tobytes())
    if isinstance(sid, str):
        req.parameters["sequence_id"].string_param = sid
    else:
        req.parameters["sequence_id"].uint64_param = sid
    req.parameters["sequence_start"].bool_param = start
    req.parameters["sequence_end"].bool_param = end
    return req


async def test_steps_over_every_transport_equal_the_whole_sequence_recomputed(seed_model, server, rng_seed):
    """Four sequences interleaved, one per transport, prompts of several tokens then single tokens; each
    step's rows equal the reference's rows of the whole sequence so far."""
    seed, _ = seed_model
    _, http, stub = server
    rng = np.random.default_rng(rng_seed)
    xs = {k: rng.standard_normal((1, 12, E)).astype(np.float32) for k in ("attend", "json", "binary", "grpc")}
    cuts = [0, 5, 6, 7, 10, 12]  # a prompt of 5, single tokens, a step of 3, a last of 2
    ids = {"attend": 2**64 - 1, "json": "json-1", "binary": 7, "grpc": 2**63 + 5}
    for i, (a, b) in enumerate(itertools.pairwise(cuts)):
        start, end = i == 0, b == cuts[-1]
        r = await attend_step(http, xs["attend"][:, a:b], ids["attend"], start, end)
        check(seed, xs["attend"], a, attend_output(r, b - a))
        assert r.headers["x-mha-sequence-id"] == str(ids["attend"])
        for kind in ("json", "binary"):
            params = {"sequence_id": ids[kind], "sequence_start": start, "sequence_end": end}
            if kind == "binary":
                params["binary_data_output"] = True
            r = await v2_step(http, xs[kind][:, a:b], params, binary=kind == "binary")
            assert r.status_code == 200, r.text
            if kind == "binary":
                hl = int(r.headers["inference-header-content-length"])
                head, got = httpx.Response(200, content=r.content[:hl]).json(), r.content[hl:]
                out = np.frombuffer(got, np.float32).reshape(1, b - a, E)
            else:
                head = r.json()
                out = np.asarray(head["outputs"][0]["data"], np.float32).reshape(1, b - a, E)
            assert head["parameters"] == {"sequence_id": ids[kind]} and head["model_name"] == "mha-seq"
            check(seed, xs[kind], a, out)
        resp = await stub.ModelInfer(grpc_step(xs["grpc"][:, a:b], ids["grpc"], start, end), timeout=10)
        assert resp.parameters["sequence_id"].uint64_param == ids["grpc"] and resp.model_name == "mha-seq"
        check(seed, xs["grpc"], a, np.frombuffer(resp.raw_output_contents[0], "<f4").reshape(1, b - a, E))
    # every sequence ended with its last step: the next step without start is the start-required error
    r = await attend_step(http, xs["attend"][:, :1], ids["attend"])
    assert r.status_code == 400 and r.json()["error"]["type"] == "sequence_start_required"


async def test_a_step_of_an_unknown_id_without_start_is_400_on_every_transport(server):
    _, http, stub = server
    x = np.ones((1, 1, E), np.float32)
    r = await attend_step(http, x, 41)
    assert r.status_code == 400, r.text
    assert r.json()["error"]["type"] == "sequence_start_required"
    assert "must specify the START flag on the first request of the sequence" in r.json()["error"]["message"]
    r = await v2_step(http, x, {"sequence_id": "nobody"}, binary=False)
    assert r.status_code == 400 and "START flag" in r.json()["error"], r.text
    with pytest.raises(grpc.aio.AioRpcError) as e:
        await stub.ModelInfer(grpc_step(x, 43), timeout=10)
    assert e.value.code() == grpc.StatusCode.INVALID_ARGUMENT and "START flag" in e.value.details()


@pytest.mark.parametrize(
    ("extra", "x_shape", "names"),
    [
        ({}, (2, 1, E), "B = 1"),
        ({"lengths": [1]}, (1, 2, E), "lengths"),
        ({"attn_mask": [[True, False], [True, True]]}, (1, 2, E), "attn_mask"),
        ({"causal": False}, (1, 2, E), "causal"),
    ],
)
async def test_a_step_that_cannot_be_a_sequence_step_is_422_naming_it(server, extra, x_shape, names):
    _, http, _ = server
    r = await attend_step(http, np.ones(x_shape, np.float32), 1, start=True, **extra)
    assert r.status_code == 422, r.text
    assert names in r.json()["error"]["message"]


async def test_a_sequence_past_max_seq_len_is_422_naming_both_lengths_and_stays_usable(seed_model, server, rng_seed):
    seed, _ = seed_model
    _, http, _ = server
    x = np.random.default_rng(rng_seed).standard_normal((1, MAX, E)).astype(np.float32)
    attend_output(await attend_step(http, x[:, : MAX - 2], "long", start=True), MAX - 2)
    r = await attend_step(http, x[:, :3], "long")
    assert r.status_code == 422, r.text
    msg = r.json()["error"]["message"]
    assert f"{MAX + 1} tokens long" in msg and f"max_seq_len {MAX}" in msg
    check(seed, x, MAX - 2, attend_output(await attend_step(http, x[:, MAX - 2 :], "long"), 2))


@pytest.mark.parametrize(
    ("sequence", "names"),
    [
        ({"id": 0}, "0 is no sequence"),
        ({"id": 2**64}, "sequence.id"),
        ({"id": ""}, "non-empty string"),
        ({"id": 1.5}, "sequence.id"),
        ({"id": True}, "sequence.id"),
        ({"start": True}, "sequence.id is required"),
        ({"id": 1, "start": "yes"}, "sequence.start"),
        ({"id": 1, "stop": True}, "unknown field 'sequence.stop'"),
    ],
)
async def test_malformed_sequence_fields_are_422_naming_them(server, sequence, names):
    _, http, _ = server
    r = await http.post("/attend", json={"x": b64(np.ones((1, 1, E), np.float32)), "sequence": sequence})
    assert r.status_code == 422, r.text
    assert names in r.json()["error"]["message"]
    assert (await attend_step(http, np.ones((1, 1, E), np.float32), 5, start=True)).status_code == 200  # serving


@pytest.mark.parametrize(
    ("params", "names"),
    [
        ({}, "must specify a non-zero or non-empty parameters.sequence_id"),
        ({"sequence_id": 0}, "0 is no sequence"),
        ({"sequence_id": -3}, "integer 1.."),
        ({"sequence_id": [1]}, "parameters.sequence_id"),
        ({"sequence_id": 1, "sequence_start": 1}, "parameters.sequence_start must be a boolean"),
    ],
)
async def test_malformed_v2_sequence_parameters_are_422_naming_them(server, params, names):
    _, http, _ = server
    r = await v2_step(http, np.ones((1, 1, E), np.float32), params, binary=False)
    assert r.status_code == 422, r.text
    assert names in r.json()["error"]


async def test_the_plain_model_refuses_flags_without_an_id_and_serves_steps_with_one(server):
    _, http, _ = server
    x = np.ones((1, 2, E), np.float32)
    r = await v2_step(http, x, {"sequence_start": True}, binary=False, model="mha")
    assert r.status_code == 422 and "need parameters.sequence_id" in r.json()["error"]
    r = await v2_step(http, x, {"sequence_id": 9, "sequence_start": True}, binary=True, model="mha")
    assert r.status_code == 200, r.text


async def test_an_end_only_step_ends_the_sequence(server):
    """How a client ends a sequence without new rows: x of shape [1, 0, E] with end (mha_client does)."""
    app, http, _ = server
    x = np.ones((1, 2, E), np.float32)
    attend_output(await attend_step(http, x, "e", start=True), 2)
    r = await attend_step(http, np.zeros((1, 0, E), np.float32), "e", end=True)
    assert r.status_code == 200, r.text
    assert r.json()["output"]["shape"] == [1, 0, E]
    assert app.state.mha.engine.sequences.active == 0
    assert (await attend_step(http, x, "e")).status_code == 400
    r = await attend_step(http, np.zeros((1, 0, E), np.float32), "e", start=True, end=True)
    assert r.status_code == 422 and "only ends its sequence" in r.json()["error"]["message"]
    r = await http.post("/attend", json={"x": b64(np.zeros((1, 0, E), np.float32))})
    assert r.status_code == 422 and "T >= 1" in r.json()["error"]["message"]  # not a step: rows required


async def test_the_routing_header_must_name_the_bodys_sequence(server):
    _, http, _ = server
    body = {"x": b64(np.ones((1, 1, E), np.float32)), "sequence": {"id": 12, "start": True}}
    r = await http.post("/attend", json=body, headers={"x-mha-sequence-id": "13"})
    assert r.status_code == 422 and "differs from the body's sequence.id 12" in r.json()["error"]["message"]
    r = await http.post("/attend", json=body, headers={"x-mha-sequence-id": "12"})
    assert r.status_code == 200 and r.headers["x-mha-sequence-id"] == "12"


async def test_the_sequence_model_is_listed_with_sequence_batching_and_the_extensions(server):
    _, http, stub = server
    index = (await http.post("/v2/repository/index")).json()
    assert [m["name"] for m in index] == ["mha", "mha-seq"] and {m["state"] for m in index} == {"READY"}
    seq = (await http.get("/v2/models/mha-seq/config")).json()
    plain = (await http.get("/v2/models/mha/config")).json()
    assert "dynamic_batching" not in seq and "sequence_batching" not in plain and "dynamic_batching" in plain
    idle_us = int(Settings().sequence_idle_s * 1_000_000)
    assert seq["sequence_batching"]["max_sequence_idle_microseconds"] == idle_us
    assert "oldest" in seq["sequence_batching"] and seq["name"] == "mha-seq"
    cfg = await stub.ModelConfig(pb.ModelConfigRequest(name="mha-seq"), timeout=10)
    assert cfg.config.WhichOneof("scheduling_choice") == "sequence_batching"
    assert cfg.config.sequence_batching.max_sequence_idle_microseconds == idle_us
    assert (await stub.ModelReady(pb.ModelReadyRequest(name="mha-seq"), timeout=10)).ready
    ext = (await http.get("/v2")).json()["extensions"]
    assert "sequence" in ext and "sequence(string_id)" in ext
    assert (await http.get("/v2/models/mha-seq")).json()["name"] == "mha-seq"
    assert (await http.get("/v2/models/mha-seq2")).status_code == 404


async def test_the_async_client_generates_against_the_reference_and_replays_a_lost_prefix(seed_model, rng_seed):
    seed, ckpt = seed_model
    x = np.random.default_rng(rng_seed).standard_normal((1, 10, E)).astype(np.float32)
    async with served(ckpt) as (app, _, _):
        engine = app.state.mha.engine
        transport = httpx.ASGITransport(app=app)
        async with AsyncClient("http://test", transport=transport) as mha:
            async with mha.sequence() as s:
                check(seed, x, 0, (await s.step(x[:, :4])).output)  # the prompt
                for t in range(4, 7):
                    check(seed, x, t, (await s.step(x[:, t : t + 1])).output)
                assert engine.sequences.length(s.id) == 7
                engine.sequences.clear()  # as a restarted replica would have lost it
                with pytest.raises(MhaSequenceLost):
                    await s.step(x[:, 7:8])
                check(seed, x, 0, (await s.step(x[:, :8])).output)  # the prefix replayed, started again
                check(seed, x, 8, (await s.step(x[:, 8:10])).output)
            assert engine.sequences.active == 0  # leaving the block ended it

"""mha_client against an httpx.MockTransport: wire encodings, retries, errors. No server, no sleeping."""

from __future__ import annotations

import json
import subprocess
import sys

import httpx
import numpy as np
import pytest
import torch

from mha_client import (
    AsyncClient,
    Client,
    MhaClientError,
    MhaConnectionError,
    MhaError,
    MhaOverloaded,
    MhaSequenceLost,
    MhaServerError,
    RetryPolicy,
)
from mha_client._wire import decode_tensor, encode_tensor
from mha_client.client import build_attend_body, parse_retry_after
from service.frontend import codecs

MODEL = {"name": "mha", "num_heads": 2, "emb_size": 4, "head_size": 2, "max_seq_len": 8, "causal": True}


def echo_server(requests: list[dict]):
    """A fake /attend: output = the decoded x doubled, weights = ones; answers in the request's encoding."""

    def handler(request: httpx.Request) -> httpx.Response:
        body = json.loads(request.content)
        requests.append(body)
        x = decode_tensor(body["x"], "x")
        enc = body.get("response_encoding", "lists")
        dtype = body["x"]["dtype"] if isinstance(body["x"], dict) else "float32"
        B, T, _ = x.shape
        weights = None
        if body.get("return_weights"):
            weights = np.ones((B, len(body.get("heads") or [0, 1]), T, T), np.float32)
        out = {
            "output": encode_tensor(x * 2, enc, dtype),
            "weights": None if weights is None else encode_tensor(weights, enc, dtype),
            "model": MODEL,
        }
        headers = {"x-queue-time-ms": "1.500", "x-compute-time-ms": "2.250", "x-batch-size": "3", "x-served-by": "r1"}
        return httpx.Response(200, json=out, headers=headers)

    return handler


def scripted(responses: list[httpx.Response | Exception], seen: list[httpx.Request]):
    """Answers from a list, in order; the last one repeats."""

    def handler(request: httpx.Request) -> httpx.Response:
        seen.append(request)
        r = responses[min(len(seen) - 1, len(responses) - 1)]
        if isinstance(r, Exception):
            raise r
        return r

    return handler


def overloaded(retry_after: str | None = "2") -> httpx.Response:
    headers = {"retry-after": retry_after} if retry_after is not None else {}
    body = {"error": {"type": "overloaded", "message": "queue is full (256 requests)"}}
    return httpx.Response(429, json=body, headers=headers)


def ok() -> httpx.Response:
    return httpx.Response(200, json={"output": [[[1.0]]], "weights": None, "model": MODEL})


@pytest.fixture
def x() -> np.ndarray:
    return np.random.default_rng(0).standard_normal((2, 3, 4)).astype(np.float32)


# -- wire ------------------------------------------------------------------------------------


@pytest.mark.parametrize("encoding", ["base64", "lists"])
def test_attend_round_trip(encoding: str, x: np.ndarray) -> None:
    seen: list[dict] = []
    with Client("http://mha", transport=httpx.MockTransport(echo_server(seen))) as mha:
        res = mha.attend(x, encoding=encoding, return_weights=True)
    np.testing.assert_array_equal(res.output, x * 2)
    assert res.output.dtype == np.float32
    assert res.weights.shape == (2, 2, 3, 3)
    assert (res.queue_ms, res.compute_ms, res.batch_size, res.served_by) == (1.5, 2.25, 3, "r1")
    assert res.model == MODEL
    assert isinstance(seen[0]["x"], dict if encoding == "base64" else list)
    assert seen[0]["response_encoding"] == encoding


@pytest.mark.parametrize("dtype", ["float16", "bfloat16"])
def test_half_precision_round_trip(dtype: str, x: np.ndarray) -> None:
    seen: list[dict] = []
    with Client("http://mha", transport=httpx.MockTransport(echo_server(seen))) as mha:
        res = mha.attend(x, dtype=dtype)
    assert seen[0]["x"]["dtype"] == dtype
    # Both ways rounded to the half type: x*2 is exact in it, so only the first rounding shows.
    rel = 2**-10 if dtype == "float16" else 2**-7
    np.testing.assert_allclose(res.output, x * 2, rtol=rel, atol=0)
    assert not np.array_equal(res.output, x * 2)  # something was rounded: the dtype really travelled


@pytest.mark.parametrize("dtype", ["float32", "float16", "bfloat16"])
def test_wire_agrees_with_the_service_codecs(dtype: str) -> None:
    arr = np.random.default_rng(1).standard_normal((2, 5, 3)).astype(np.float32) * 100
    ours = encode_tensor(arr, "base64", dtype)
    assert ours == codecs.encode_b64(arr, dtype)
    back, wire = codecs.decode_b64(ours, "x", (3,))
    assert wire == dtype
    np.testing.assert_array_equal(decode_tensor(ours, "x"), codecs.as_float32(back, wire))


def test_bool_mask_is_sent_as_one_byte_per_element() -> None:
    mask = np.tril(np.ones((3, 3), bool))
    body = build_attend_body(np.zeros((1, 3, 4), np.float32), attn_mask=mask)
    assert body["attn_mask"]["dtype"] == "bool"
    np.testing.assert_array_equal(codecs.decode_b64(body["attn_mask"], "m", (2,), boolean=True)[0], mask)
    assert build_attend_body(np.zeros((1, 3, 4)), attn_mask=mask, encoding="lists")["attn_mask"] == mask.tolist()
    with pytest.raises(ValueError, match="boolean"):
        build_attend_body(np.zeros((1, 3, 4)), attn_mask=mask.astype(np.float32))


def test_torch_tensors_are_accepted(x: np.ndarray) -> None:
    seen: list[dict] = []
    t = torch.from_numpy(x).requires_grad_(True)
    with Client("http://mha", transport=httpx.MockTransport(echo_server(seen))) as mha:
        res = mha.attend(t, lengths=torch.tensor([3, 2]), heads=torch.tensor([1]))
        res_bf16 = mha.attend(t.to(torch.bfloat16), encoding="lists")
    np.testing.assert_array_equal(res.output, x * 2)
    assert seen[0]["lengths"] == [3, 2]
    assert seen[0]["heads"] == [1] and seen[0]["return_weights"] is True  # heads implies weights
    np.testing.assert_array_equal(res_bf16.output, t.detach().to(torch.bfloat16).float().numpy() * 2)


def test_body_options_and_local_checks() -> None:
    body = build_attend_body(np.zeros((1, 2, 4)), causal=False, timeout_ms=250, encoding="lists")
    assert body["causal"] is False and body["timeout_ms"] == 250.0 and "return_weights" not in body
    with pytest.raises(ValueError, match=r"shape \[B, T, E\], got \[2, 4\]"):
        build_attend_body(np.zeros((2, 4)))
    with pytest.raises(ValueError, match="encoding"):
        build_attend_body(np.zeros((1, 2, 4)), encoding="binary")
    with pytest.raises(ValueError, match="needs encoding='base64'"):
        build_attend_body(np.zeros((1, 2, 4)), encoding="lists", dtype="float16")


# -- errors and retries ----------------------------------------------------------------------


def test_4xx_raises_with_the_servers_message_and_is_not_retried() -> None:
    seen: list[httpx.Request] = []
    body = {"error": {"type": "validation_error", "message": "x has emb_size 3, but the model expects 4"}}
    sleeps: list[float] = []
    with (
        Client(
            "http://mha",
            transport=httpx.MockTransport(scripted([httpx.Response(422, json=body)], seen)),
            sleep=sleeps.append,
        ) as mha,
        pytest.raises(MhaClientError) as info,
    ):
        mha.attend(np.zeros((1, 2, 3)))
    e = info.value
    assert (e.status, e.type, e.message) == (422, "validation_error", "x has emb_size 3, but the model expects 4")
    assert "the model expects 4" in str(e)
    assert len(seen) == 1 and sleeps == []


def test_retries_honour_retry_after() -> None:
    seen: list[httpx.Request] = []
    sleeps: list[float] = []
    transport = httpx.MockTransport(scripted([overloaded("2"), overloaded("1"), ok()], seen))
    with Client("http://mha", transport=transport, sleep=sleeps.append, backoff_s=0.25, jitter=0.1) as mha:
        res = mha.attend(np.zeros((1, 1, 1)))
    assert res.output.shape == (1, 1, 1)
    assert len(seen) == 3 and len(sleeps) == 2
    assert 2.0 <= sleeps[0] <= 2.2  # Retry-After 2, plus at most 10 % jitter
    assert 1.0 <= sleeps[1] <= 1.1


def test_retries_are_bounded_and_end_in_overloaded() -> None:
    seen: list[httpx.Request] = []
    sleeps: list[float] = []
    transport = httpx.MockTransport(scripted([overloaded(None)], seen))
    with (
        Client("http://mha", transport=transport, sleep=sleeps.append, max_retries=3, jitter=0) as mha,
        pytest.raises(MhaOverloaded) as info,
    ):
        mha.attend(np.zeros((1, 1, 1)))
    assert len(seen) == 4 and info.value.attempts == 4
    assert sleeps == [0.25, 0.5, 1.0]  # no Retry-After: exponential backoff
    assert info.value.status == 429 and "queue is full" in str(info.value)


def test_retry_after_is_capped_and_503_is_retried() -> None:
    seen: list[httpx.Request] = []
    sleeps: list[float] = []
    starting = httpx.Response(503, json={"error": {"type": "unavailable", "message": "the model is not ready yet"}})
    transport = httpx.MockTransport(scripted([overloaded("3600"), starting, ok()], seen))
    with Client("http://mha", transport=transport, sleep=sleeps.append, max_wait_s=30, jitter=0) as mha:
        mha.attend(np.zeros((1, 1, 1)))
    assert sleeps == [30.0, 0.5]


def test_no_retries_when_max_retries_is_zero() -> None:
    seen: list[httpx.Request] = []
    with (
        Client("http://mha", transport=httpx.MockTransport(scripted([overloaded()], seen)), max_retries=0) as mha,
        pytest.raises(MhaOverloaded),
    ):
        mha.attend(np.zeros((1, 1, 1)))
    assert len(seen) == 1


def test_connection_errors_are_retried_then_raised() -> None:
    seen: list[httpx.Request] = []
    sleeps: list[float] = []
    down = httpx.ConnectError("connection refused")
    with Client("http://mha", transport=httpx.MockTransport(scripted([down, ok()], seen)), sleep=sleeps.append) as mha:
        mha.attend(np.zeros((1, 1, 1)))
    assert len(seen) == 2
    seen.clear()
    with (
        Client("http://mha", transport=httpx.MockTransport(scripted([down], seen)), sleep=sleeps.append) as mha,
        pytest.raises(MhaConnectionError, match="after 4 attempt"),
    ):
        mha.attend(np.zeros((1, 1, 1)))
    seen.clear()
    with (
        Client("http://mha", transport=httpx.MockTransport(scripted([httpx.ReadTimeout("slow")], seen))) as mha,
        pytest.raises(MhaConnectionError, match="in time"),
    ):
        mha.attend(np.zeros((1, 1, 1)))
    assert len(seen) == 1  # a timeout is not retried


def test_500_is_a_server_error_with_its_id() -> None:
    body = {"error": {"type": "internal_error", "message": "internal error (id abc123); see the server log"}}
    transport = httpx.MockTransport(scripted([httpx.Response(500, json=body)], []))
    with Client("http://mha", transport=transport) as mha, pytest.raises(MhaServerError, match="abc123"):
        mha.attend(np.zeros((1, 1, 1)))


def test_a_non_json_error_body_still_raises_clearly() -> None:
    transport = httpx.MockTransport(scripted([httpx.Response(502, text="Bad Gateway from the proxy")], []))
    with Client("http://mha", transport=transport) as mha, pytest.raises(MhaServerError, match="Bad Gateway"):
        mha.model()


def test_parse_retry_after() -> None:
    assert parse_retry_after("3") == 3.0
    assert parse_retry_after(None) is None and parse_retry_after("soon") is None
    assert 0 <= parse_retry_after("Wed, 21 Oct 2015 07:28:00 GMT") <= 0  # in the past: 0
    with pytest.raises(ValueError):
        RetryPolicy(max_retries=-1)


def test_model_ready_and_api_key() -> None:
    seen: list[httpx.Request] = []

    def handler(request: httpx.Request) -> httpx.Response:
        seen.append(request)
        if request.url.path == "/readyz":
            return httpx.Response(503, json={"error": {"type": "unavailable", "message": "loading"}})
        return httpx.Response(200, json=MODEL)

    with Client("http://mha/", api_key="s3cret", transport=httpx.MockTransport(handler)) as mha:
        assert mha.model() == MODEL
        assert mha.ready() is False
    assert seen[0].headers["authorization"] == "Bearer s3cret"
    assert seen[0].url == "http://mha/v1/model"
    assert seen[0].headers["user-agent"].startswith("mha-client/")


# -- async -----------------------------------------------------------------------------------


async def test_async_client_retries_and_round_trips(x: np.ndarray) -> None:
    seen: list[httpx.Request] = []
    sleeps: list[float] = []
    echo = echo_server([])
    calls = iter([overloaded("1")])

    def handler(request: httpx.Request) -> httpx.Response:
        seen.append(request)
        return next(calls, None) or echo(request)

    async def fake_sleep(s: float) -> None:
        sleeps.append(s)

    async with AsyncClient("http://mha", transport=httpx.MockTransport(handler), sleep=fake_sleep, jitter=0) as mha:
        res = await mha.attend(x, heads=[0])
    np.testing.assert_array_equal(res.output, x * 2)
    assert res.weights.shape == (2, 1, 3, 3)
    assert len(seen) == 2 and sleeps == [1.0]


async def test_async_client_raises_4xx() -> None:
    body = {"error": {"type": "validation_error", "message": "head index 9 is out of range 0..1"}}
    transport = httpx.MockTransport(scripted([httpx.Response(422, json=body)], []))
    async with AsyncClient("http://mha", transport=transport) as mha:
        with pytest.raises(MhaClientError, match=r"out of range 0\.\.1"):
            await mha.attend(np.zeros((1, 1, 4)), heads=[9])


def test_the_client_imports_without_torch_fastapi_or_matplotlib() -> None:
    code = (
        "import sys\n"
        "for name in ('torch', 'fastapi', 'matplotlib', 'service', 'mha_core'):\n"
        "    sys.modules[name] = None\n"
        "import mha_client\n"
        "assert mha_client.Client and mha_client.plot_weights\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True, timeout=60)


# -- sequences -------------------------------------------------------------------------------


def step_answer(t: int = 1) -> httpx.Response:
    out = {"output": encode_tensor(np.ones((1, t, 4), np.float32), "base64", "float32"), "weights": None}
    return httpx.Response(200, json={**out, "model": MODEL})


def test_a_sequence_starts_once_sends_its_id_in_a_header_and_ends_on_leaving() -> None:
    seen: list[httpx.Request] = []
    transport = httpx.MockTransport(scripted([step_answer()], seen))
    with Client("http://mha", transport=transport) as mha, mha.sequence(id=77) as s:
        s.step(np.ones((1, 3, 4)))
        s.step(np.ones((1, 1, 4)))
    bodies = [json.loads(r.content) for r in seen]
    assert [b["sequence"] for b in bodies] == [
        {"id": 77, "start": True, "end": False},
        {"id": 77, "start": False, "end": False},
        {"id": 77, "start": False, "end": True},  # leaving the block: the end-only request
    ]
    assert [r.headers["x-mha-sequence-id"] for r in seen] == ["77", "77", "77"]
    assert bodies[2]["x"]["shape"] == [1, 0, 4] and bodies[2]["x"]["b64"] == ""


def test_a_sequence_whose_last_step_ended_it_sends_nothing_more_and_ids_are_generated() -> None:
    seen: list[httpx.Request] = []
    with Client("http://mha", transport=httpx.MockTransport(scripted([step_answer()], seen))) as mha:
        with mha.sequence() as s:
            s.step(np.ones((1, 1, 4)), end=True)
            with pytest.raises(MhaError, match="has ended"):
                s.step(np.ones((1, 1, 4)))
        with mha.sequence():
            pass  # no step: nothing to end
    assert len(seen) == 1
    sid = json.loads(seen[0].content)["sequence"]["id"]
    assert isinstance(sid, int) and 1 <= sid < 2**64


def test_a_step_is_retried_on_429_only() -> None:
    seen: list[httpx.Request] = []
    sleeps: list[float] = []
    starting = httpx.Response(503, json={"error": {"type": "unavailable", "message": "starting"}})
    transport = httpx.MockTransport(scripted([overloaded("1"), starting, step_answer()], seen))
    with Client("http://mha", transport=transport, sleep=sleeps.append, jitter=0) as mha:
        s = mha.sequence(id="a")
        with pytest.raises(MhaOverloaded) as e:  # the 503 may have come after the step ran: not retried
            s.step(np.ones((1, 2, 4)))
    assert e.value.status == 503 and len(seen) == 2 and sleeps == [1.0]
    assert not s.started  # the next step starts it again


def test_a_step_is_not_retried_when_the_connection_drops_mid_request() -> None:
    seen: list[httpx.Request] = []
    transport = httpx.MockTransport(scripted([httpx.ReadError("reset"), step_answer()], seen))
    with Client("http://mha", transport=transport, sleep=lambda s: None) as mha, pytest.raises(MhaConnectionError):
        mha.sequence(id=3).step(np.ones((1, 1, 4)))
    assert len(seen) == 1


def test_a_lost_sequence_raises_a_typed_error_and_the_next_step_starts_it_again() -> None:
    seen: list[httpx.Request] = []
    lost = httpx.Response(
        400, json={"error": {"type": "sequence_start_required", "message": "must specify the START flag"}}
    )
    transport = httpx.MockTransport(scripted([step_answer(), lost, step_answer(3)], seen))
    with Client("http://mha", transport=transport) as mha:
        s = mha.sequence(id=9)
        s.step(np.ones((1, 2, 4)))
        with pytest.raises(MhaSequenceLost) as e:
            s.step(np.ones((1, 1, 4)))
        assert e.value.sequence_id == 9 and e.value.status == 400 and isinstance(e.value, MhaClientError)
        s.step(np.ones((1, 3, 4)))  # the replayed prefix
    assert [json.loads(r.content)["sequence"]["start"] for r in seen[:3]] == [True, False, True]

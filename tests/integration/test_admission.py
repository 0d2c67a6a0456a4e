"""Admission before parsing: requests and body bytes in flight are bounded before a body is read."""

from __future__ import annotations

import asyncio
import time

import httpx
import orjson
import pytest

from service.frontend.admission import Admission, AdmissionMiddleware

BODY = orjson.dumps({"x": [[[0.5] * 32] * 4]})  # about 600 bytes
STALL = {"x-mha-fault": "stall:400"}


def _admission(app) -> Admission:
    """The app's one Admission (handed to its middleware in create_app)."""
    (admission,) = [m.kwargs["admission"] for m in app.user_middleware if m.cls is AdmissionMiddleware]
    return admission


async def _hold(client, path="/attend"):
    """A request that stays in flight for 0.4 s."""
    task = asyncio.create_task(client.post(path, content=BODY, headers={**STALL, "content-type": "application/json"}))
    await asyncio.sleep(0.1)
    assert not task.done()
    return task


@pytest.mark.parametrize("settings_kw", [{"fault_injection": True, "max_inflight_requests": 1}])
async def test_past_max_inflight_requests_is_429_before_the_body_is_read(app, client):
    held = await _hold(client)
    r = await client.post("/attend", content=BODY, headers={"content-type": "application/json"})
    assert r.status_code == 429
    assert r.headers["retry-after"] == "1"
    assert r.json()["error"]["type"] == "overloaded"
    assert "too many requests in flight (1; limit max_inflight_requests 1)" in r.json()["error"]["message"]
    v2 = await client.post("/v2/models/mha/infer", content=b"{}")  # the protocol's error shape on /v2
    assert v2.status_code == 429 and v2.json()["error"].startswith("too many requests in flight")
    assert (await client.get("/healthz")).status_code == 200  # other routes are not counted
    assert (await held).status_code == 200
    ok = await client.post("/attend", content=BODY, headers={"content-type": "application/json"})
    assert ok.status_code == 200  # the slot came back when the answer was sent


@pytest.mark.parametrize("settings_kw", [{"fault_injection": True, "max_inflight_bytes": 1024, "max_body_bytes": 1024}])
async def test_past_max_inflight_bytes_is_429_declared_or_streamed(app, client):
    held = await _hold(client)
    r = await client.post("/attend/heatmap", content=BODY, headers={"content-type": "application/json"})
    assert r.status_code == 429 and r.headers["retry-after"] == "1"
    assert f"too many body bytes in flight ({len(BODY)} + this request's {len(BODY)}" in r.text

    async def chunks():  # no Content-Length: counted while it streams
        for i in range(0, len(BODY), 100):
            yield BODY[i : i + 100]

    r = await client.post("/attend", content=chunks(), headers={"content-type": "application/json"})
    assert r.status_code == 429, r.text
    assert "and growing; limit max_inflight_bytes 1024" in r.json()["error"]["message"]
    admission = _admission(app)
    assert (admission.requests, admission.bytes) == (1, len(BODY))  # the refused ones gave back what they held
    assert (await held).status_code == 200
    assert (await client.post("/attend", content=chunks())).status_code == 200
    assert (admission.requests, admission.bytes) == (0, 0)  # and so did the answered ones, streamed or declared


def test_admission_counts_back_to_zero():
    a = Admission(2, 100)
    a.admit(60)
    with pytest.raises(Exception, match="max_inflight_bytes 100"):
        a.admit(50)
    a.admit(0)
    a.grow(0, 40)
    with pytest.raises(Exception, match="max_inflight_requests 2"):
        a.admit(0)
    a.release(60)
    a.release(40)
    assert (a.requests, a.bytes) == (0, 0)


async def test_a_declared_body_over_max_body_bytes_is_still_413(client):
    r = await client.post("/attend", content=b"x" * 10, headers={"content-length": str(1 << 40)})
    assert r.status_code == 413
    assert httpx.codes(r.status_code) == httpx.codes.REQUEST_ENTITY_TOO_LARGE


async def test_a_body_read_past_its_deadline_is_408_and_other_reads_and_cancels_are_untouched():
    """The body-read deadline is swept (no timer per read): an overdue read gets the 408 within the
    deadline plus one sweep; a read still in time goes on; a cancel from elsewhere stays a cancel."""
    from service.errors import ServiceError
    from service.frontend.admission import Admission, AdmissionMiddleware, _Reads

    seen: dict[str, object] = {}

    async def app(scope, receive, send):
        try:
            seen[scope["path"]] = await receive()
        except ServiceError as e:
            seen[scope["path"]] = e
            raise

    mw = AdmissionMiddleware(app, admission=Admission(10, 1 << 20), max_body_bytes=1 << 20, body_read_timeout_s=0.2)
    never = asyncio.Event()

    async def trickle():  # a body that never arrives
        await never.wait()
        return {}

    async def late_body():  # a body that arrives in time
        await asyncio.sleep(0.1)
        return {"type": "http.request", "body": b"{}", "more_body": False}

    def scope(path):
        return {"type": "http", "method": "POST", "path": path, "headers": [(b"content-length", b"2")]}

    t0 = time.monotonic()
    stuck = asyncio.create_task(mw(scope("/attend"), trickle, None))
    fine = asyncio.create_task(mw(scope("/v2/models/mha/infer"), late_body, None))
    other = asyncio.create_task(mw(scope("/attend/heatmap"), trickle, None))
    await asyncio.sleep(0.05)
    other.cancel()  # someone else's cancel: not a timeout
    with pytest.raises(asyncio.CancelledError):
        await other
    with pytest.raises(ServiceError) as e:
        await stuck
    waited = time.monotonic() - t0
    assert e.value.status == 408 and e.value.headers.get("connection") == "close"
    assert 0.2 <= waited <= 0.2 + _Reads.SWEEP_S + 0.2, waited
    await fine
    assert seen["/v2/models/mha/infer"] == {"type": "http.request", "body": b"{}", "more_body": False}
    assert not isinstance(seen.get("/attend/heatmap"), ServiceError)
    assert mw.admission.requests == 0 and mw.admission.bytes == 0  # every slot given back
    assert mw.reads.deadlines == {} and mw.reads.overdue == set()

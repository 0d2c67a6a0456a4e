"""service.errors.InternalErrors: an exception escaping a route becomes the one opaque 500, logged once."""

from __future__ import annotations

import asyncio
import logging

import orjson
from starlette.requests import ClientDisconnect

from service.errors import InternalErrors


def call(app, path: str) -> list[dict]:
    sent: list[dict] = []

    async def receive():
        return {"type": "http.request", "body": b""}

    async def send(message):  # as an ASGI server does (uvicorn, h11): a second start is refused
        if message["type"] == "http.response.start" and any(m["type"] == message["type"] for m in sent):
            raise RuntimeError("Expected ASGI message 'http.response.body', but got 'http.response.start'.")
        sent.append(message)

    asyncio.run(InternalErrors(app)({"type": "http", "method": "POST", "path": path}, receive, send))
    return sent


def test_an_escaped_exception_is_one_opaque_500_in_the_route_shape(caplog):
    async def broken(scope, receive, send):
        raise RuntimeError("secret /etc/shadow")

    for path, shape in (("/attend", dict), ("/v2/models/mha/infer", str)):
        caplog.clear()
        sent = call(broken, path)
        assert [m["type"] for m in sent] == ["http.response.start", "http.response.body"]
        assert sent[0]["status"] == 500
        error = orjson.loads(sent[1]["body"])["error"]
        message = error["message"] if shape is dict else error
        assert isinstance(error, shape) and message.startswith("internal error (id ") and "secret" not in message
        error_id = message.split("(id ")[1].split(")")[0]
        records = [r for r in caplog.records if r.levelno == logging.ERROR]
        assert len(records) == 1 and records[0].error_id == error_id and "secret /etc/shadow" in records[0].exc_text


def test_after_the_response_started_nothing_more_is_sent(caplog):
    """No send wrapper watches for the start: the 500's start is refused by the server and nothing more
    goes out; the error is logged once."""

    async def half(scope, receive, send):
        await send({"type": "http.response.start", "status": 200, "headers": []})
        raise ValueError("late")

    sent = call(half, "/attend")
    assert [m["type"] for m in sent] == ["http.response.start"]
    assert len([r for r in caplog.records if r.levelno == logging.ERROR]) == 1


def test_a_client_that_left_is_not_an_error(caplog):
    async def gone(scope, receive, send):
        raise ClientDisconnect()

    assert call(gone, "/attend") == []
    assert not [r for r in caplog.records if r.levelno == logging.ERROR]

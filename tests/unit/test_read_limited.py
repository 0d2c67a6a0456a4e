"""service.frontend.httputil.read_limited: a body as the ASGI server delivers it, in one message or many."""

from __future__ import annotations

import asyncio

import pytest
from starlette.requests import ClientDisconnect, Request

from service.errors import ServiceError
from service.frontend.httputil import read_body, read_limited


def read(chunks: list[bytes], *, content_length: int | None, limit: int = 1 << 20, gone: bool = False):
    messages = [{"type": "http.request", "body": c, "more_body": i < len(chunks) - 1} for i, c in enumerate(chunks)]
    if gone:  # the client leaves before the last piece
        messages[-1] = {"type": "http.disconnect"}
    it = iter(messages)

    async def receive():
        return next(it)

    headers = [] if content_length is None else [(b"content-length", str(content_length).encode())]
    request = Request({"type": "http", "method": "POST", "path": "/attend", "headers": headers}, receive)
    return asyncio.run(read_limited(request, limit))


def test_one_message_is_the_body_itself():
    body = b"x" * 100_000
    assert read([body], content_length=len(body)) is body


def test_a_declared_large_body_in_pieces_lands_in_one_buffer_of_its_size():
    pieces = [bytes([i]) * 40_000 for i in range(3)]
    got = read(pieces, content_length=120_000)
    assert isinstance(got, bytearray) and bytes(got) == b"".join(pieces)


def test_a_chunked_body_in_pieces_is_joined():
    pieces = [b"ab", b"cd", b"ef"]
    assert read(pieces, content_length=None) == b"abcdef"


def test_pieces_longer_than_the_content_length_are_refused():
    with pytest.raises(ServiceError) as e:
        read([b"x" * 70_000, b"y" * 10], content_length=70_000)
    assert e.value.status == 400 and "longer than its Content-Length 70000" in e.value.message


def test_a_chunked_body_past_the_limit_is_413_and_a_declared_one_before_any_read():
    with pytest.raises(ServiceError) as e:
        read([b"x" * 60, b"x" * 60], content_length=None, limit=100)
    assert e.value.status == 413 and "exceeds max_body_bytes 100" in e.value.message
    with pytest.raises(ServiceError) as e:
        read([], content_length=101, limit=100)  # no message is read: the iterator is empty
    assert e.value.status == 413 and "the body is 101 bytes, more than max_body_bytes 100" in e.value.message


def test_a_client_gone_mid_body_is_a_disconnect():
    with pytest.raises(ClientDisconnect):
        read([b"x" * 70_000, b"y"], content_length=70_001, gone=True)
    with pytest.raises(ClientDisconnect):
        read([b"a", b"b"], content_length=None, gone=True)


@pytest.mark.parametrize(
    "headers",
    [
        [],
        [(b"content-type", b"application/json")],
        [(b"content-type", b"Application/JSON; charset=utf-8")],
        [(b"content-type", b"")],
        [(b"content-type", b"application/json"), (b"content-type", b"text/plain")],  # the first one counts
    ],
)
def test_read_body_takes_json_and_no_content_type(headers):
    async def receive():
        return {"type": "http.request", "body": b"{}", "more_body": False}

    request = Request({"type": "http", "method": "POST", "path": "/attend", "headers": headers}, receive)
    assert asyncio.run(read_body(request, 100)) == b"{}"


@pytest.mark.parametrize("ctype", [b"text/plain", b"application/x-www-form-urlencoded; charset=utf-8"])
def test_read_body_refuses_other_content_types(ctype):
    async def receive():
        raise AssertionError("the body is not read")

    headers = [(b"content-type", ctype)]
    request = Request({"type": "http", "method": "POST", "path": "/attend", "headers": headers}, receive)
    with pytest.raises(ServiceError) as e:
        asyncio.run(read_body(request, 100))
    want = ctype.decode().split(";")[0]
    assert e.value.status == 415
    assert e.value.body()["error"]["message"] == f"content-type must be application/json, got {want!r}"

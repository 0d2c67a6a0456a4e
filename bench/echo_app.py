"""The HTTP floors of bench/service.py and bench/front.py: ``app``, a bare ASGI app that answers a POST
with its own body, and ``fastapi_app``, the same as one bare FastAPI route.

No framework, no codec, no copies beyond joining the received chunks: what is left is uvicorn,
uvloop, httptools and the socket. Any GET answers 200 ``ok`` (readiness).

    taskset -c 0 .venv/bin/python -m uvicorn bench.echo_app:app --port P \
        --loop uvloop --http httptools --no-access-log
"""

from __future__ import annotations

from fastapi import FastAPI, Request, Response  # fastapi_app's (annotations are resolved at module level)


async def app(scope, receive, send) -> None:
    if scope["type"] == "lifespan":
        while True:
            message = await receive()
            if message["type"] == "lifespan.startup":
                await send({"type": "lifespan.startup.complete"})
            elif message["type"] == "lifespan.shutdown":
                await send({"type": "lifespan.shutdown.complete"})
                return
    if scope["type"] != "http":
        return
    chunks = []
    more = True
    while more:
        message = await receive()
        if message["type"] == "http.disconnect":
            return
        chunks.append(message.get("body", b""))
        more = message.get("more_body", False)
    body = b"".join(chunks) if scope["method"] == "POST" else b"ok"
    await send(
        {
            "type": "http.response.start",
            "status": 200,
            "headers": [(b"content-type", b"application/octet-stream"), (b"content-length", str(len(body)).encode())],
        }
    )
    await send({"type": "http.response.body", "body": body})


def _fastapi_app():
    """The framework floor for bench/front.py: one bare FastAPI route that answers a POST with its own body.

    ``uvicorn bench.echo_app:fastapi_app``: the cost of FastAPI's request/response machinery, with no
    middleware, model, codec or check.
    """
    fa = FastAPI()

    @fa.post("/echo")
    async def echo(request: Request) -> Response:
        return Response(await request.body(), media_type="application/octet-stream")

    @fa.get("/")
    async def ok() -> Response:
        return Response(b"ok")

    return fa


fastapi_app = _fastapi_app()

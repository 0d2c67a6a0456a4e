"""The hot inference routes, dispatched as plain ASGI: the framework's per-request cost left out.

Front-bound (a small model, or a GPU), a request's CPU was mostly FastAPI's and Starlette's:
error, telemetry, body-limit, exception and exit-stack middlewares, the router's match over every
route (v2's included router matches each of its routes), dependency solving and the endpoint
wrapper, about four times a bare FastAPI route. ``install(app, routes)`` makes the app's middleware
stack a dispatcher: a POST whose path matches a hot route goes through the app's own middlewares
(request ids, metrics, access log, CORS, 500s, admission: the same classes and arguments, so the
same state) straight to that route's handler; everything else (other methods, other paths) goes to
the stack FastAPI builds, unchanged, so HEAD/GET answer 405 and /docs, OpenAPI and the other routes
do not change. The hot routes stay declared on the FastAPI app: the OpenAPI schema documents them,
and ``scope["route"]`` is their declared route, as the router would set it.

FastAPI's outermost ServerErrorMiddleware is not on this path: an exception that escapes the app's own
middlewares (InternalErrors catches those raised inside it) is answered by ``errors.answer_escaped``,
the same JSON 500 with the request id, logged once, instead of uvicorn's plain-text 500.

A handler takes the Starlette ``Request`` and the path's parameters, and returns a ``Response``;
it maps its own errors to responses (the route's error shape), as its FastAPI declaration does.
"""

from __future__ import annotations

import re
from collections.abc import Awaitable, Callable
from typing import Any

from fastapi import FastAPI
from starlette.requests import Request
from starlette.responses import Response

from service.errors import answer_escaped
from service.frontend.admission import HOT_MATCH
from service.frontend.httputil import Answer

Handler = Callable[..., Awaitable[Response]]


_MATCH = HOT_MATCH  # scope key: the matched (handler, parameters), from the dispatcher to the endpoint


def install(app: Any, routes: list[tuple[str, Handler, Any]]) -> None:
    """Dispatch ``routes`` (path regex with named groups, handler, declared route) through ``app``'s own
    middlewares only. ``routes`` is read when the stack is built (the first request or the lifespan)."""
    build_standard = app.build_middleware_stack

    def build() -> Any:
        hot: Any = _Endpoint()
        for cls, args, kwargs in reversed(app.user_middleware):
            hot = cls(hot, *args, **kwargs)
        return FastRoutes(build_standard(), hot, routes)

    app.build_middleware_stack = build


class App(FastAPI):
    """FastAPI, whose hot POSTs skip ``FastAPI.__call__`` and ``Starlette.__call__`` too (FastAPI's native
    telemetry check, the root path, the lazy stack): ``scope["app"]`` is set, as Starlette sets it, and the
    request goes straight to the dispatcher's hot stack. Everything else is FastAPI's, unchanged."""

    async def __call__(self, scope, receive, send) -> None:
        stack = self.middleware_stack
        if type(stack) is FastRoutes and not self.root_path and stack.match(scope):
            scope["app"] = self
            return await stack.call_hot(scope, receive, send)
        await super().__call__(scope, receive, send)


class FastRoutes:
    """The dispatcher: hot POSTs to ``hot`` (the user middlewares over the handler), the rest to ``standard``."""

    def __init__(self, standard: Any, hot: Any, routes: list[tuple[str, Handler, Any]]) -> None:
        self.standard = standard
        self.hot = hot
        self.routes = [(re.compile(pattern), handler, route) for pattern, handler, route in routes]

    def match(self, scope) -> bool:
        """True, with the route's handler and parameters in ``scope``, when a hot route takes this request (an
        HTTP POST to one of their paths)."""
        if scope["type"] != "http" or scope["method"] != "POST":
            return False
        path = scope["path"]
        for pattern, handler, route in self.routes:
            m = pattern.fullmatch(path)
            if m is not None:
                params = m.groupdict()
                scope["route"] = route
                scope["path_params"] = {k: v for k, v in params.items() if v is not None}
                scope[_MATCH] = handler, params
                return True
        return False

    async def call_hot(self, scope, receive, send) -> None:
        """A matched POST through the hot stack."""
        try:
            return await self.hot(scope, receive, send)
        except Exception as exc:  # from a middleware outside InternalErrors: still the JSON 500
            return await answer_escaped(scope, send, exc)

    async def __call__(self, scope, receive, send) -> None:
        if self.match(scope):
            return await self.call_hot(scope, receive, send)
        await self.standard(scope, receive, send)


class _Endpoint:
    async def __call__(self, scope, receive, send) -> None:
        handler, params = scope[_MATCH]
        response = await handler(Request(scope, receive, send), **params)
        if type(response) is Answer:  # a 200 of the inference routes: what Response.__call__ sends, inline
            await send({"type": "http.response.start", "status": response.status_code, "headers": response.raw_headers})
            await send({"type": "http.response.body", "body": response.body})
            return
        await response(scope, receive, send)

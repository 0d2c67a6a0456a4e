"""The served ASGI app: the hot inference POSTs dispatched beside FastAPI, everything else to FastAPI.

Front-bound (a small model, or a GPU), a request's CPU was mostly FastAPI's and Starlette's:
error, telemetry, body-limit, exception and exit-stack middlewares, the router's match over every
route (v2's included router matches each of its routes), dependency solving and the endpoint
wrapper, about four times a bare FastAPI route. ``HotRoutes(api, routes, middleware)`` is a small
ASGI app composed beside the FastAPI app ``api``: a POST whose path matches a hot route goes through
``middleware`` (request ids, metrics, access log, CORS, 500s, admission: the list the FastAPI app is
built with, so the same classes, arguments and shared state) straight to that route's handler;
everything else (other methods, other paths, the lifespan) goes to ``api``, which is plain FastAPI,
so HEAD/GET answer 405 and /docs, OpenAPI and the other routes do not change. The hot routes stay
declared on ``api``: the OpenAPI schema documents them, and ``scope["route"]`` is their declared
route, as the router would set it.

FastAPI's outermost ServerErrorMiddleware is not on the hot path: an exception that escapes
``middleware`` (InternalErrors catches those raised inside it) is answered by ``errors.answer_escaped``,
the same JSON 500 with the request id, logged once, instead of uvicorn's plain-text 500.

A handler takes the Starlette ``Request`` and the path's parameters, and returns a ``Response``;
it maps its own errors to responses (the route's error shape), as its FastAPI declaration does.
"""

from __future__ import annotations

import re
from collections.abc import Awaitable, Callable, Sequence
from typing import Any

from fastapi import FastAPI
from starlette.middleware import Middleware
from starlette.requests import Request
from starlette.responses import Response

from service.errors import answer_escaped
from service.frontend.admission import HOT_MATCH
from service.frontend.httputil import Answer

Handler = Callable[..., Awaitable[Response]]


_MATCH = HOT_MATCH  # scope key: the matched (handler, parameters), from the dispatcher to the endpoint


class HotRoutes:
    """The app uvicorn serves: ``routes`` (path regex with named groups, handler, declared route) through
    ``middleware``, the rest to ``api``.

    Whoever holds the served app reads it as the FastAPI app it composes (``state``, ``router``, ``routes``,
    ``user_middleware``...): attributes not its own are ``api``'s."""

    def __init__(self, api: FastAPI, routes: Sequence[tuple[str, Handler, Any]], middleware: Sequence[Middleware]):
        self.api = api
        self.routes = [(re.compile(pattern), handler, route) for pattern, handler, route in routes]
        hot: Any = _Endpoint()
        for cls, args, kwargs in reversed(middleware):
            hot = cls(hot, *args, **kwargs)
        self.hot = hot

    @property
    def state(self) -> Any:
        return self.api.state

    def __getattr__(self, name: str) -> Any:  # only for names not found on the instance or the class
        if name == "api":  # not set yet (a half-built instance): no recursion
            raise AttributeError(name)
        return getattr(self.api, name)

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

    async def __call__(self, scope, receive, send) -> None:
        if not self.match(scope):
            return await self.api(scope, receive, send)
        scope["app"] = self.api  # as Starlette sets it for its routes
        try:
            return await self.hot(scope, receive, send)
        except Exception as exc:  # from a middleware outside InternalErrors: still the JSON 500
            return await answer_escaped(scope, send, exc)


class _Endpoint:
    async def __call__(self, scope, receive, send) -> None:
        handler, params = scope[_MATCH]
        response = await handler(Request(scope, receive, send), **params)
        if type(response) is Answer:  # a 200 of the inference routes: what Response.__call__ sends, inline
            await send({"type": "http.response.start", "status": response.status_code, "headers": response.raw_headers})
            await send({"type": "http.response.body", "body": response.body})
            return
        await response(scope, receive, send)

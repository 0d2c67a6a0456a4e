"""The hot inference routes, dispatched as plain ASGI: the framework's per-request cost left out.

Front-bound (a small model, or a GPU), a request's CPU was mostly FastAPI's and Starlette's:
exception and exit-stack middlewares, the router's match over every route (v2's included router
matches each of its routes), dependency solving and the endpoint wrapper, about four times a
bare FastAPI route. ``FastRoutes`` is the innermost middleware: a POST whose path matches a hot
route goes straight to that route's handler; everything else (other methods, other paths) goes
on to FastAPI as before, so HEAD/GET answer 405, and /docs, OpenAPI and the other routes do not
change. The hot routes stay declared on the FastAPI app for the OpenAPI schema (and as the
fallback), and the middlewares outside this one (request ids, metrics, access log, CORS, 500s,
admission) still wrap them.

A handler takes the Starlette ``Request`` and the path's parameters, and returns a ``Response``;
it maps its own errors to responses (the route's error shape), as its FastAPI declaration does.
"""

from __future__ import annotations

import re
from collections.abc import Awaitable, Callable
from typing import Any

from starlette.requests import Request
from starlette.responses import Response

Handler = Callable[..., Awaitable[Response]]


class FastRoutes:
    def __init__(self, app: Any, routes: list[tuple[str, Handler, Any]]) -> None:
        """``routes``: (a path regex with named groups for the parameters, its handler, the declared route),
        tried in order. The declared route goes into ``scope["route"]`` as the router would put it there
        (tracing names the request's span after its path template)."""
        self.app = app
        self.routes = [(re.compile(pattern), handler, route) for pattern, handler, route in routes]

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] == "http" and scope["method"] == "POST":
            path = scope["path"]
            for pattern, handler, route in self.routes:
                m = pattern.fullmatch(path)
                if m is not None:
                    params = m.groupdict()
                    scope["route"] = route
                    scope["path_params"] = {k: v for k, v in params.items() if v is not None}
                    response = await handler(Request(scope, receive, send), **params)
                    await response(scope, receive, send)
                    return
        await self.app(scope, receive, send)

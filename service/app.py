"""create_app(settings=...): wires Settings -> an engine client -> routes.

The one module that imports both sides (service/frontend/ and service/engine/): it picks the engine
client (in process, or the model process's over a Unix socket) and hands it to the routes, which know it only
by its interface (``service.engine_api.EngineClient``). No torch math here.
"""

from __future__ import annotations

import asyncio
import logging
import time
from contextlib import asynccontextmanager
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.middleware.cors import CORSMiddleware
from fastapi.responses import JSONResponse, Response
from fastapi.routing import APIRoute
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.middleware import Middleware

from service import __version__, heap, tracing
from service.engine.batcher import BatchLimits
from service.errors import INFERENCE_ERRORS, InternalErrors, ServiceError
from service.frontend import fastroute, grpc_server, heatmap, v2
from service.frontend.admission import Admission, AdmissionMiddleware
from service.frontend.decode import Limits
from service.frontend.httputil import Answer, check_sequence_header, infer, internal_error, read_body, require_ready
from service.frontend.observability import ApiKeys, ObserveMiddleware
from service.frontend.offload import Offload
from service.frontend.schemas import AttendRequest, AttendResponse, ModelDescription, error_responses
from service.frontend.state import AppState
from service.metrics import Metrics, exposition
from service.settings import Settings
from service.tracing import stage

log = logging.getLogger("mha_serve")


def create_app(*, settings: Settings, engine_address: str | None = None) -> fastroute.HotRoutes:
    """The ASGI app to serve: the FastAPI app, the hot routes beside it. With ``engine_address``, a front-end
    process whose batcher is the model process there."""
    state = AppState(settings=settings, metrics=Metrics(), shares_port=engine_address is not None)
    state.tracing = tracing.from_env(service_version=__version__, replica_id=settings.replica_id)

    def engine_ready(ready: bool) -> None:  # (during start-up: the lifespan sets it when it is done)
        if state.model_info is not None:
            state.ready = ready and not state.draining

    async def start_engine() -> None:
        if engine_address is not None:
            from service.engine.client import MPClient

            fallbacks = state.metrics.shm_fallbacks.labels("front_end")
            # a turn's plain requests cross as one, as large as one forward pass may be (MPClient._grouped)
            group = (settings.max_batch_size, settings.max_batch_tokens)
            state.engine = MPClient(
                engine_address, on_ready=engine_ready, on_shm_fallback=fallbacks.inc, group_limits=group
            )
        else:
            from service.engine.inproc import InprocClient

            state.engine = InprocClient(settings, metrics=state.metrics, tracing=state.tracing, on_ready=engine_ready)
        model = await state.engine.start()
        state.model_info = model.info
        state.limits = Limits(
            settings.max_request_batch,
            settings.max_weights_elements,
            settings.default_timeout_ms,
            settings.max_timeout_ms,
            dtype=model.dtype,  # the dtype in use (MHA_DTYPE=auto resolved by the device)
            priority_levels=settings.priority_levels,
        )

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        await start_engine()
        _warn_shared_admission(settings)
        state.offload = Offload(settings.decode_processes, settings.offload_min_bytes)
        await state.offload.start()
        state.loop = asyncio.get_running_loop()
        if settings.grpc_port:
            try:
                state.grpc = await grpc_server.start(state)
            except Exception:
                await state.engine.stop()
                state.offload.close()
                raise
        heap.settle()  # start-up objects leave the collector's view; the young generation is collected less often
        state.ready = state.engine.ready
        info = state.model_info
        log.info("ready: %s on %s (%s)", settings.model_name, info["device"], info["checksum"])
        try:
            yield
        finally:
            state.begin_shutdown()  # no-op if the signal already began it: one grace, from the signal
            state._start_drain()
            await state.drain
            state.offload.close()
            if state.tracing is not None:
                await asyncio.to_thread(state.tracing.shutdown)  # exports the spans still buffered
            log.info("stopped")

    state.admission = Admission(settings.max_inflight_requests, settings.max_inflight_bytes)
    middleware = _middleware(settings, state)
    app = FastAPI(
        title="mha-serve",
        version=__version__,
        summary="Multi-head attention over HTTP, with dynamic batching.",
        lifespan=lifespan,
        middleware=middleware,
    )
    app.state.mha = state
    _install_error_handlers(app, state)
    v2_router = v2.build_router(state)
    hot_routes: list = []  # (path regex, handler, declared route): filled below, for fastroute.HotRoutes

    @app.get("/healthz", tags=["health"], summary="Liveness: the process answers (HEAD too)")
    async def healthz() -> dict[str, str]:
        return {"status": "alive"}

    @app.get(
        "/readyz",
        tags=["health"],
        summary="Readiness: model loaded, warmed up, batcher running (HEAD too)",
        responses=error_responses("unavailable"),
    )
    async def readyz() -> dict[str, str]:
        require_ready(state)
        return {"status": "ready"}

    for path, probe in (("/healthz", healthz), ("/readyz", readyz)):  # HEAD: probes that send no GET
        app.add_api_route(path, probe, methods=["HEAD"], include_in_schema=False)

    @app.get("/v1/model", tags=["model"], response_model=ModelDescription, responses=error_responses("unavailable"))
    async def model() -> dict[str, Any]:
        if state.model_info is None:
            raise ServiceError("unavailable", "the model is still loading")
        s = settings
        return {
            **state.model_info,
            "replica_id": s.replica_id,
            "batching": BatchLimits.from_settings(s).__dict__,
            "limits": {
                "max_body_bytes": s.max_body_bytes,
                "max_request_batch": s.max_request_batch,
                "max_weights_elements": s.max_weights_elements,
                "default_timeout_ms": s.default_timeout_ms,
                "max_timeout_ms": s.max_timeout_ms,
                "max_inflight_requests": s.max_inflight_requests,
                "max_inflight_bytes": s.max_inflight_bytes,
                "body_read_timeout_s": s.body_read_timeout_s,
            },
        }

    @app.get("/metrics", tags=["health"], summary="Prometheus metrics", response_class=Response)
    async def metrics() -> Response:
        if state.engine is not None:
            await state.engine.flush_statistics()  # the model process's latest batches too
        body, media_type = exposition(state.metrics.registry)
        return Response(body, media_type=media_type)

    @app.post(
        "/attend",
        tags=["attention"],
        summary="Multi-head attention over a batch of sequences",
        response_class=Response,
        responses={
            200: {
                "model": AttendResponse,
                "description": "output [B, T, E] (and weights [B, H, T, T]) in the request's encoding; headers "
                "x-queue-time-ms, x-compute-time-ms, x-batch-size",
            },
            **error_responses(*INFERENCE_ERRORS),
        },
        openapi_extra={
            "requestBody": {
                "required": True,
                "content": {"application/json": {"schema": {"$ref": "#/components/schemas/AttendRequest"}}},
            }
        },
    )
    async def attend(request: Request) -> Response:
        started = time.monotonic()
        require_ready(state)
        body = await read_body(request, settings.max_body_bytes)
        offload = state.offload
        try:
            with stage(state.tracing, "decode"):  # inline when it can be: no coroutine for work that never awaits
                dec = offload.decode_now(body, state.engine.model.config, state.limits)
                if dec is None:
                    dec = await offload.decode_attend(body, state.engine.model.config, state.limits)
            del body
            decoded = time.monotonic()
            res = await infer(
                state,
                dec.input,
                started=started,
                timeout_s=dec.timeout_s,
                request=request,
                priority=dec.priority,
                sequence=check_sequence_header(dec.sequence, request),
            )
            if res is None:
                return Response(status_code=499)
            answered = time.monotonic()
            out = res.output
            with stage(state.tracing, "encode"):
                payload = offload.encode_now(out.output, out.weights, dec, state.model_info)
                if payload is None:
                    payload = await offload.encode_attend(out.output, out.weights, dec, state.model_info)
        except ServiceError:
            state.stats.request_failed(time.monotonic() - started)
            raise
        state.stats.request_done(
            sequences=dec.input.batch, started=started, decoded=decoded, answered=answered, res=res
        )
        if dec.sequence is not None:
            return Answer(payload, b"application/json", res, ((b"x-mha-sequence-id", str(dec.sequence.id).encode()),))
        return Answer(payload, b"application/json", res)

    async def attend_fast(request: Request) -> Response:
        """POST /attend through fastroute.HotRoutes: errors answer as the ServiceError handler does."""
        try:
            return await attend(request)
        except ServiceError as e:
            return _error_response(e)

    hot_routes.append((r"/attend", attend_fast, "/attend"))

    def openapi() -> dict[str, Any]:
        if app.openapi_schema:
            return app.openapi_schema
        from fastapi.openapi.utils import get_openapi

        schema = get_openapi(title=app.title, version=app.version, summary=app.summary, routes=app.routes)
        comps = schema.setdefault("components", {}).setdefault("schemas", {})
        for model in (AttendRequest,):
            s = model.model_json_schema(ref_template="#/components/schemas/{model}")
            comps.update(s.pop("$defs", {}))
            comps[model.__name__] = s
        app.openapi_schema = schema
        return schema

    app.openapi = openapi
    app.include_router(heatmap.build_router(state))
    app.include_router(v2_router)  # last: it answers every other /v2 path
    routes = [*app.routes, *v2_router.routes]  # FastAPI wraps an included router: its routes are its own
    declared = {r.path: r for r in routes if isinstance(r, APIRoute) and "POST" in r.methods}
    hot_routes.extend(v2_router.hot_routes)
    hot_routes[:] = [(pattern, handler, declared[template]) for pattern, handler, template in hot_routes]
    return fastroute.HotRoutes(app, hot_routes, middleware)  # the hot POSTs skip FastAPI's own layers, not ours


def _middleware(settings: Settings, state: AppState) -> list[Middleware]:
    """Every request's middlewares, outermost first: the FastAPI app's, and the hot routes' (fastroute.HotRoutes)."""
    observe = Middleware(
        ObserveMiddleware,
        metrics=state.metrics,
        replica_id=settings.replica_id,
        api_keys=ApiKeys(settings.api_key_list),
        protect_metrics=settings.protect_metrics,
        access_log_enabled=settings.access_log,
        tracing=state.tracing,
    )
    cors = Middleware(
        CORSMiddleware,
        allow_origins=settings.cors_origin_list,
        allow_methods=["GET", "POST"],
        allow_headers=["authorization", "content-type", "x-request-id", "inference-header-content-length"],
        expose_headers=[
            "x-request-id",
            "x-served-by",
            "x-queue-time-ms",
            "x-compute-time-ms",
            "x-batch-size",
            "x-render-time-ms",
        ],
    )
    admission = Middleware(
        AdmissionMiddleware,
        admission=state.admission,
        max_body_bytes=settings.max_body_bytes,
        body_read_timeout_s=settings.body_read_timeout_s,
    )
    return [
        observe,  # outermost: request ids, metrics, access log and API keys for every answer, 500s and 429s too
        *([cors] if settings.cors_origins else []),
        Middleware(InternalErrors),  # inside the request-id middleware: a 500 carries the id too
        admission,  # innermost: its 429/408 get CORS headers, request ids, metrics and access logs
    ]


def _warn_shared_admission(s: Settings) -> None:
    """Admission runs before the body (and so the priority) is read: all levels share it."""
    need = s.priority_levels * s.max_queue_requests + s.max_batch_size
    if s.priority_levels > 1 and s.max_inflight_requests < need:
        log.warning(
            "max_inflight_requests (%d) < priority_levels x max_queue_requests + max_batch_size (%d): a flood at "
            "one priority level can fill admission and refuse the others; raise MHA_MAX_INFLIGHT_REQUESTS",
            s.max_inflight_requests,
            need,
        )


def _error_response(err: ServiceError) -> JSONResponse:
    return JSONResponse(err.body(), status_code=err.status, headers=err.headers)


def _install_error_handlers(app: FastAPI, state: AppState) -> None:
    @app.exception_handler(ServiceError)
    async def service_error(request: Request, exc: ServiceError) -> JSONResponse:
        return _error_response(exc)

    @app.exception_handler(StarletteHTTPException)
    async def http_error(request: Request, exc: StarletteHTTPException) -> JSONResponse:
        kind = {404: "not_found", 405: "method_not_allowed", 413: "payload_too_large"}.get(exc.status_code)
        if kind is None:
            kind = "validation_error" if 400 <= exc.status_code < 500 else "internal_error"
        message = str(exc.detail)
        if exc.status_code == 404:
            message = f"no route {request.method} {request.url.path}"
        elif exc.status_code == 405:
            message = f"{request.url.path} does not accept {request.method}"
        return _error_response(ServiceError(kind, message, headers=dict(exc.headers or {})))

    @app.exception_handler(RequestValidationError)
    async def request_validation(request: Request, exc: RequestValidationError) -> JSONResponse:
        parts = [f"{'.'.join(str(p) for p in e['loc'])}: {e['msg']}" for e in exc.errors()]
        return _error_response(ServiceError("validation_error", "; ".join(parts)))

    @app.exception_handler(Exception)
    async def unexpected(request: Request, exc: Exception) -> JSONResponse:
        return _error_response(internal_error(exc, request))

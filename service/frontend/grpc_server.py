"""The v2 protocol over gRPC: Triton's ``inference.GRPCInferenceService`` on grpcio's asyncio server.

It runs on the app's event loop, started and stopped by the app's lifespan (``start`` /
``GrpcServer.stop``), and feeds the same batcher as HTTP: requests from both share batches,
the queue bound and the deadlines. Requests are checked by service/frontend/oip.py, as /v2 HTTP's are,
so the messages are the same; errors map from the one error table (``GRPC_STATUS``, keyed by
service.errors' types).

- The RPC's deadline is the request's deadline (capped as HTTP's timeouts are).
- A cancelled RPC is dropped before compute: the batcher's ``abandoned`` completes with the RPC.
- API keys (MHA_API_KEYS) come in ``authorization: Bearer <key>`` metadata; ServerLive,
  ServerReady and grpc.health.v1 are open, as HTTP's health routes are. A call without a good
  key is refused before its message is read.
- ModelInfer calls are admitted with HTTP's inference requests, by the same ``Admission``
  (MHA_MAX_INFLIGHT_REQUESTS before the message is read, MHA_MAX_INFLIGHT_BYTES once its size
  is known, before it is deserialized): past either, RESOURCE_EXHAUSTED naming the bound.
- grpc.health.v1 follows readiness as it changes (AppState's readiness listeners), so Watch
  streams see each change.
- RESOURCE_EXHAUSTED for an overloaded queue carries ``retry-after`` (seconds) in the trailers.
- INTERNAL says only "internal error (id ...)"; the log line with that id has the traceback.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import functools
import logging
import time
from collections.abc import Awaitable, Callable
from typing import Any

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_health.v1.health import aio as health_aio

from service.engine_api import SequenceFlags
from service.errors import ERROR_STATUS, ServiceError, log_internal_error
from service.frontend import grpc_wire, oip
from service.frontend.admission import Admission
from service.frontend.decode import check_priority
from service.frontend.httputil import require_ready, run_batcher
from service.frontend.observability import ApiKeys
from service.frontend.triton_proto import grpc_service_pb2 as pb
from service.frontend.triton_proto import grpc_service_pb2_grpc as pb_grpc
from service.messages import AttendInput, Result
from service.tracing import stage

log = logging.getLogger("mha_serve.grpc")

S = grpc.StatusCode
# service.errors' type -> gRPC status. payload_too_large is RESOURCE_EXHAUSTED as gRPC's own
# message-size limit answers; only "overloaded" carries retry-after.
GRPC_STATUS: dict[str, grpc.StatusCode] = {
    "malformed_json": S.INVALID_ARGUMENT,
    "sequence_start_required": S.INVALID_ARGUMENT,  # Triton's INVALID_ARG, as its sequence batcher answers
    "unauthorized": S.UNAUTHENTICATED,
    "not_found": S.NOT_FOUND,
    "method_not_allowed": S.UNIMPLEMENTED,
    "payload_too_large": S.RESOURCE_EXHAUSTED,
    "unsupported_media_type": S.INVALID_ARGUMENT,
    "validation_error": S.INVALID_ARGUMENT,
    "numeric_overflow": S.INVALID_ARGUMENT,  # 422 as on HTTP: the same request gets the same answer
    "request_timeout": S.DEADLINE_EXCEEDED,  # HTTP's body read timeout; gRPC's own transport bounds reads
    "overloaded": S.RESOURCE_EXHAUSTED,
    "internal_error": S.INTERNAL,
    "unavailable": S.UNAVAILABLE,
    "deadline_exceeded": S.DEADLINE_EXCEEDED,
}
assert set(GRPC_STATUS) == set(ERROR_STATUS), "every error type needs a gRPC status"

_SERVICE = "/inference.GRPCInferenceService/"
INFER_METHOD = _SERVICE + "ModelInfer"
OPEN_METHODS = frozenset(
    {_SERVICE + "ServerLive", _SERVICE + "ServerReady", "/grpc.health.v1.Health/Check", "/grpc.health.v1.Health/Watch"}
)


def _rpc(fn: Callable[..., Awaitable[Any]]) -> Callable[..., Awaitable[Any]]:
    """ServiceError -> its gRPC status and message; anything else -> INTERNAL with a logged error id."""

    @functools.wraps(fn)
    async def handler(self: Servicer, request: Any, context: grpc.aio.ServicerContext) -> Any:
        try:
            return await fn(self, request, context)
        except ServiceError as e:
            err = e
        except Exception as e:
            err = log_internal_error(e, "gRPC", fn.__name__, log)
        trailers = tuple((k, v) for k, v in err.headers.items() if k == "retry-after")
        await context.abort(GRPC_STATUS[err.type], err.message, trailing_metadata=trailers)

    return handler


class Servicer(pb_grpc.GRPCInferenceServiceServicer):
    """The protocol's methods over ``state`` (service.app.AppState). Unlisted ones are UNIMPLEMENTED."""

    def __init__(self, state: Any) -> None:
        self.state = state
        self.name = state.settings.model_name

    def _ready(self) -> bool:
        s = self.state
        return s.ready and not s.draining and s.engine is not None

    @_rpc
    async def ServerLive(self, request: pb.ServerLiveRequest, context: Any) -> pb.ServerLiveResponse:
        return pb.ServerLiveResponse(live=True)

    @_rpc
    async def ServerReady(self, request: pb.ServerReadyRequest, context: Any) -> pb.ServerReadyResponse:
        return pb.ServerReadyResponse(ready=self._ready())

    @_rpc
    async def ModelReady(self, request: pb.ModelReadyRequest, context: Any) -> pb.ModelReadyResponse:
        known = request.name in (self.name, oip.sequence_model(self.name)) and request.version in ("", oip.VERSION)
        return pb.ModelReadyResponse(ready=known and self._ready())

    @_rpc
    async def ServerMetadata(self, request: pb.ServerMetadataRequest, context: Any) -> pb.ServerMetadataResponse:
        return pb.ServerMetadataResponse(**oip.server_metadata())

    @_rpc
    async def ModelMetadata(self, request: pb.ModelMetadataRequest, context: Any) -> pb.ModelMetadataResponse:
        oip.check_model(request.name, request.version, self.name)
        model = self._model()
        return grpc_wire.model_metadata(oip.model_metadata(request.name, model.config))

    @_rpc
    async def ModelConfig(self, request: pb.ModelConfigRequest, context: Any) -> pb.ModelConfigResponse:
        seq = oip.check_model(request.name, request.version, self.name)
        model = self._model()
        cfg = oip.model_config(request.name, model.config, self.state.settings, model.device, sequence=seq)
        return grpc_wire.model_config(cfg)

    @_rpc
    async def ModelStatistics(self, request: pb.ModelStatisticsRequest, context: Any) -> pb.ModelStatisticsResponse:
        if request.name:  # Triton: no name = every model
            oip.check_model(request.name, request.version, self.name)
        if self.state.engine is not None:
            await self.state.engine.flush_statistics()  # the model process's latest batches too
        return grpc_wire.model_statistics(self.state.stats.model_stats(request.name or self.name, oip.VERSION))

    @_rpc
    async def RepositoryIndex(self, request: pb.RepositoryIndexRequest, context: Any) -> pb.RepositoryIndexResponse:
        models = oip.repository_index(self.name, self._ready())
        if request.ready:
            models = [m for m in models if m["state"] == "READY"]
        return pb.RepositoryIndexResponse(models=[pb.RepositoryIndexResponse.ModelIndex(**m) for m in models])

    @_rpc
    async def ModelInfer(self, request: pb.ModelInferRequest, context: grpc.aio.ServicerContext) -> Any:
        tracing = self.state.tracing
        if tracing is None:
            return await self._model_infer(request, context)
        # the server span, child of the caller's W3C traceparent in the call's metadata (as HTTP's headers)
        carrier = {k.lower(): v for k, v in (context.invocation_metadata() or ()) if isinstance(v, str)}
        attrs = {
            "rpc.system": "grpc",
            "rpc.service": "inference.GRPCInferenceService",
            "rpc.method": "ModelInfer",
            "rpc.request.size": request.ByteSize(),
        }
        span = tracing.start_server_span("inference.GRPCInferenceService/ModelInfer", carrier, attrs)
        code = grpc.StatusCode.OK
        try:
            resp = await self._model_infer(request, context)
            if span.recording:
                span.span.set_attribute("rpc.response.size", resp.ByteSize())
            return resp
        except ServiceError as e:
            code = GRPC_STATUS[e.type]
            raise
        except BaseException:
            code = grpc.StatusCode.CANCELLED if context.cancelled() else grpc.StatusCode.INTERNAL
            raise
        finally:
            if span.recording:
                span.span.set_attribute("rpc.grpc.status_code", code.value[0])
            # server errors only, as for HTTP's 5xx: the caller's mistakes are not the server's
            span.finish(error=code in (grpc.StatusCode.INTERNAL, grpc.StatusCode.UNAVAILABLE))

    async def _model_infer(self, request: pb.ModelInferRequest, context: grpc.aio.ServicerContext) -> Any:
        started = time.monotonic()
        state = self.state
        seq_model = oip.check_model(request.model_name, request.model_version, self.name)
        try:
            require_ready(self.state)
            left = context.time_remaining()
            with stage(state.tracing, "decode"):
                plan = grpc_wire.decode_infer(request, None if left is None else left * 1000, sequence_model=seq_model)
                inp, timeout_s = plan.check(config=state.engine.model.config, limits=state.limits)
                priority = check_priority(plan.priority, state.limits)
            decoded = time.monotonic()
            res = await self._infer(
                inp,
                deadline=started + timeout_s,
                timeout_s=timeout_s,
                context=context,
                priority=priority,
                sequence=plan.sequence,
            )
            answered = time.monotonic()
            tensors = {"output": res.output.output, "weights": res.output.weights}
            with stage(state.tracing, "encode"):
                resp = grpc_wire.encode_infer(plan, request.model_name, tensors)
        except ServiceError:
            state.stats.request_failed(time.monotonic() - started)
            raise
        state.stats.request_done(sequences=inp.batch, started=started, decoded=decoded, answered=answered, res=res)
        return resp

    async def _infer(
        self,
        inp: AttendInput,
        *,
        deadline: float,
        timeout_s: float,
        context: grpc.aio.ServicerContext,
        priority: int = 0,
        sequence: SequenceFlags | None = None,
    ) -> Result:
        """The batcher's infer, with the RPC's end as ``abandoned`` and errors mapped as HTTP maps them."""
        state = self.state
        if state.settings.fault_injection:
            fault = dict(context.invocation_metadata() or ()).get("x-mha-fault")
            if fault:
                inp = dataclasses.replace(inp, fault=fault)
        gone = asyncio.get_running_loop().create_future()

        def rpc_ended(_: Any = None) -> None:
            if not gone.done():
                gone.set_result(None)

        context.add_done_callback(rpc_ended)
        task = asyncio.ensure_future(
            run_batcher(
                state,
                inp,
                deadline=deadline,
                timeout_s=timeout_s,
                abandoned=gone,
                priority=priority,
                sequence=sequence,
            )
        )
        try:
            res = await asyncio.shield(task)
        except asyncio.CancelledError:  # the RPC was cancelled: let the batcher drop it and count why
            rpc_ended()
            with contextlib.suppress(BaseException):
                await task
            raise
        if res is None:
            raise asyncio.CancelledError  # nobody is listening; counted by the batcher
        return res

    def _model(self) -> Any:
        if self.state.engine is None or self.state.engine.model is None:
            raise ServiceError("unavailable", "the model is still loading")
        return self.state.engine.model


class _Health(health_aio.HealthServicer):  # (grpc_health's public name for its asyncio servicer)
    """grpc.health.v1: "" and "inference.GRPCInferenceService" follow the app's readiness (as /readyz);
    "live" is SERVING while the gRPC server runs (as /healthz), for a liveness probe."""

    def __init__(self, state: Any) -> None:
        super().__init__()
        self._state = state
        self._loop = asyncio.get_running_loop()
        self._refreshing: set[asyncio.Task] = set()  # held until done: the loop keeps only weak references
        state.readiness_listeners.append(self._changed)

    def _changed(self) -> None:
        """AppState's readiness listener: may run in a signal handler, so it only schedules the refresh."""
        if not self._loop.is_closed():
            self._loop.call_soon_threadsafe(self._schedule_refresh)

    def _schedule_refresh(self) -> None:
        task = self._loop.create_task(self.refresh())
        self._refreshing.add(task)
        task.add_done_callback(self._refreshing.discard)

    async def refresh(self) -> None:
        """Set the statuses from the app's readiness now (watchers are told of each change)."""
        ok = self._state.ready and not self._state.draining
        status = health_pb2.HealthCheckResponse.SERVING if ok else health_pb2.HealthCheckResponse.NOT_SERVING
        for name in ("", "inference.GRPCInferenceService"):
            await self.set(name, status)
        await self.set("live", health_pb2.HealthCheckResponse.SERVING)

    def detach(self) -> None:
        with contextlib.suppress(ValueError):
            self._state.readiness_listeners.remove(self._changed)


def _refusal(code: grpc.StatusCode, message: str, trailers: tuple = ()) -> grpc.RpcMethodHandler:
    """A handler that answers ``code`` without reading the call's message: a request-streaming handler is called
    before any message arrives, and a unary one only after the whole message is read."""

    async def refuse(requests: Any, context: grpc.aio.ServicerContext) -> None:
        await context.abort(code, message, trailing_metadata=trailers)

    return grpc.stream_unary_rpc_method_handler(refuse)


def _retry_after(err: ServiceError) -> tuple:
    return tuple((k, v) for k, v in err.headers.items() if k == "retry-after")


class _Gate(grpc.aio.ServerInterceptor):
    """What runs before a call's message is read (interceptors run before the request is deserialized):

    - UNAUTHENTICATED without a good ``authorization: Bearer <key>``, except on the open methods;
    - for ModelInfer, admission with HTTP's inference requests: a slot before the message is read, its
      bytes once read and before it is deserialized; RESOURCE_EXHAUSTED (with retry-after) past either bound.
    """

    def __init__(self, keys: ApiKeys, admission: Admission | None) -> None:
        self._keys = keys
        self._admission = admission
        self._deny = _refusal(S.UNAUTHENTICATED, "missing or wrong API key: send authorization: Bearer <key>")

    async def intercept_service(self, continuation: Any, details: grpc.HandlerCallDetails) -> Any:
        if details.method in OPEN_METHODS:
            return await continuation(details)
        if self._keys:
            auth = next((v for k, v in details.invocation_metadata or () if k == "authorization"), None)
            if not self._keys.check(auth.encode() if isinstance(auth, str) else auth):
                return self._deny
        handler = await continuation(details)
        if details.method != INFER_METHOD or self._admission is None or handler is None:
            return handler
        return self._admitted(handler)

    def _admitted(self, handler: grpc.RpcMethodHandler) -> grpc.RpcMethodHandler:
        """ModelInfer as a request-streaming handler, called before its message is read: it takes a slot, reads the
        message, takes its bytes, deserializes it and answers, and gives both back whatever happens."""
        admission = self._admission
        infer, parse = handler.unary_unary, handler.request_deserializer

        async def admitted(requests: Any, context: grpc.aio.ServicerContext) -> Any:
            try:
                admission.admit(0)  # its bytes once the message is read: a gRPC call declares no size
            except ServiceError as e:
                await context.abort(S.RESOURCE_EXHAUSTED, e.message, trailing_metadata=_retry_after(e))
            held = 0
            try:
                raw = await context.read()
                if raw is grpc.aio.EOF:
                    await context.abort(S.INVALID_ARGUMENT, "the call ended before its request message")
                try:
                    admission.take(len(raw))
                except ServiceError as e:
                    await context.abort(S.RESOURCE_EXHAUSTED, e.message, trailing_metadata=_retry_after(e))
                held = len(raw)
                try:
                    request = parse(raw)
                except Exception:
                    await context.abort(S.INVALID_ARGUMENT, "the message is not a ModelInferRequest")
                del raw
                return await infer(request, context)
            finally:
                admission.release(held)

        return grpc.stream_unary_rpc_method_handler(admitted, response_serializer=handler.response_serializer)


@dataclasses.dataclass
class GrpcServer:
    server: grpc.aio.Server
    port: int
    health: _Health

    async def stop(self, grace_s: float) -> None:
        """Refuse new RPCs, let those in flight finish within ``grace_s``, then cancel the rest."""
        self.health.detach()
        await self.health.enter_graceful_shutdown()
        await self.server.stop(grace_s)


async def start(state: Any) -> GrpcServer:
    """Bind settings.host:settings.grpc_port and serve; the lifespan stops it before the batcher."""
    s = state.settings
    keys = ApiKeys(s.api_key_list)
    server = grpc.aio.server(
        interceptors=[_Gate(keys, state.admission)],
        options=[
            ("grpc.max_receive_message_length", s.max_body_bytes),
            ("grpc.max_send_message_length", -1),
            ("grpc.so_reuseport", 1 if state.shares_port else 0),  # front-end processes share the port
        ],
    )
    pb_grpc.add_GRPCInferenceServiceServicer_to_server(Servicer(state), server)
    health = _Health(state)
    await health.refresh()
    health_pb2_grpc.add_HealthServicer_to_server(health, server)
    address = f"[{s.host}]:{s.grpc_port}" if ":" in s.host else f"{s.host}:{s.grpc_port}"
    try:
        port = server.add_insecure_port(address)
    except RuntimeError as e:
        health.detach()
        raise RuntimeError(f"cannot serve gRPC on {address} (MHA_GRPC_PORT): {e}") from e
    if not port:
        health.detach()
        raise RuntimeError(f"cannot serve gRPC on {address} (MHA_GRPC_PORT): the port is taken")
    await server.start()
    log.info("gRPC on %s", address)
    return GrpcServer(server, port, health)

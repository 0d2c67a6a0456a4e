"""Client and AsyncClient for mha-serve: numpy (or torch) in, numpy out, retries on overload.

Retrying is safe because attention is a pure function of the request: sending the same body
twice gives the same answer and changes nothing on the server. So 429 (queue full) and 503
(starting or draining), and connection failures, are retried up to ``max_retries`` times,
waiting at least the server's ``Retry-After`` (capped at ``max_wait_s``), else an exponential
backoff, plus a little jitter so that many clients do not come back at the same instant.
Timeouts are not retried: the server may still be working, and the caller's budget is spent.

A sequence's step (``Client.sequence``) is not a pure function: the server appends its keys and values to
the sequence's cache. So a step is retried only when it surely changed nothing: a 429 (refused before it
ran; a full KV cache answers it too) or a connection that never opened. Never a 503, a timeout or a
connection lost mid-request: the step may have run.
"""

from __future__ import annotations

import asyncio
import contextlib
import email.utils
import json
import random
import secrets
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any

import httpx
import numpy as np

from mha_client import __version__
from mha_client._wire import ENCODINGS, FLOAT_DTYPES, decode_tensor, encode_tensor, to_numpy

RETRY_STATUSES = frozenset({429, 503})
STEP_RETRY_STATUSES = frozenset({429})  # a step refused before it ran; see the module's docstring
SEQUENCE_HEADER = "x-mha-sequence-id"  # what load balancers hash on, so that a sequence's steps reach one replica


class MhaError(Exception):
    """Base class of every error this client raises."""


class MhaConnectionError(MhaError):
    """The server could not be reached (after retries), or did not answer in time."""


class MhaHTTPError(MhaError):
    """The server answered with an error: ``status``, and its ``type`` and ``message``."""

    def __init__(self, status: int, type: str, message: str, *, retry_after: float | None = None) -> None:
        super().__init__(f"{status} {type}: {message}")
        self.status = status
        self.type = type
        self.message = message
        self.retry_after = retry_after


class MhaClientError(MhaHTTPError):
    """4xx: the request breaks the contract; the message says how. Retrying will not help."""


class MhaServerError(MhaHTTPError):
    """5xx other than 503: an internal error (its message carries an id for the logs) or a deadline."""


class MhaOverloaded(MhaHTTPError):
    """429 or 503 still, after ``attempts`` tries: the server is full, starting or shutting down."""

    def __init__(self, status: int, type: str, message: str, *, retry_after: float | None, attempts: int) -> None:
        super().__init__(status, type, message, retry_after=retry_after)
        self.attempts = attempts
        self.args = (f"{status} {type} after {attempts} attempt(s): {message}",)


class MhaSequenceLost(MhaClientError):
    """The server does not hold this sequence (400 ``sequence_start_required``): it was never started, was
    reaped idle, evicted from a full cache, or lost with its replica. Replay its prefix: the sequence's next
    ``step`` carries the start flag again, so ``s.step(all_rows_so_far)`` rebuilds it in one request."""

    def __init__(self, status: int, type: str, message: str, *, sequence_id: int | str) -> None:
        super().__init__(status, type, message)
        self.sequence_id = sequence_id


@dataclass(frozen=True)
class AttendResult:
    output: np.ndarray  # (B, T, E) float32
    weights: np.ndarray | None  # (B, H', T, T) float32 when asked for, else None
    queue_ms: float | None  # time in the server's queue (x-queue-time-ms)
    compute_ms: float | None  # forward pass of the batch it rode in (x-compute-time-ms)
    batch_size: int | None  # requests in that batch (x-batch-size)
    served_by: str | None  # replica id (x-served-by)
    model: dict  # name, num_heads, emb_size, head_size, max_seq_len, causal, dtype, device, checksum


@dataclass(frozen=True)
class RetryPolicy:
    max_retries: int = 3  # retries after the first try; 0 = never retry
    backoff_s: float = 0.25  # first wait when the server gives no Retry-After; doubles each retry
    max_wait_s: float = 30.0  # cap on one wait, Retry-After included
    jitter: float = 0.1  # up to this fraction is added at random to each wait

    def __post_init__(self) -> None:
        if self.max_retries < 0:
            raise ValueError(f"max_retries must be >= 0, got {self.max_retries}")
        if self.backoff_s < 0 or self.max_wait_s < 0 or self.jitter < 0:
            raise ValueError("backoff_s, max_wait_s and jitter must be >= 0")

    def wait_s(self, retry: int, retry_after: float | None) -> float:
        """Seconds to wait before retry number ``retry`` (0-based)."""
        wait = self.backoff_s * 2**retry
        if retry_after is not None:
            wait = max(wait, retry_after)
        wait *= 1 + self.jitter * random.random()
        return min(wait, self.max_wait_s)


def parse_retry_after(value: str | None) -> float | None:
    """``Retry-After`` as seconds: a number, or an HTTP date."""
    if not value:
        return None
    try:
        return max(0.0, float(value))
    except ValueError:
        pass
    try:
        when = email.utils.parsedate_to_datetime(value)
    except (TypeError, ValueError):
        return None
    return max(0.0, when.timestamp() - time.time())


def build_attend_body(
    x: Any,
    *,
    lengths: Any = None,
    causal: bool | None = None,
    attn_mask: Any = None,
    return_weights: bool = False,
    heads: Any = None,
    encoding: str = "base64",
    dtype: str = "float32",
    timeout_ms: float | None = None,
    sequence: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """The JSON body of POST /attend. ``heads`` implies ``return_weights``; ``sequence``: {id, start, end}."""
    if encoding not in ENCODINGS:
        raise ValueError(f"encoding must be one of {list(ENCODINGS)}, got {encoding!r}")
    if dtype not in FLOAT_DTYPES:
        raise ValueError(f"dtype must be one of {list(FLOAT_DTYPES)}, got {dtype!r}")
    if encoding == "lists" and dtype != "float32":
        raise ValueError(f"dtype {dtype!r} needs encoding='base64': lists carry float32 numbers")
    arr = to_numpy(x, "x")
    if arr.ndim != 3:
        raise ValueError(f"x must have shape [B, T, E], got {list(arr.shape)}")
    if arr.dtype == np.bool_ or not np.issubdtype(arr.dtype, np.number):
        raise ValueError(f"x must hold numbers, got dtype {arr.dtype}")
    body: dict[str, Any] = {"x": encode_tensor(arr.astype(np.float32, copy=False), encoding, dtype)}
    if lengths is not None:
        body["lengths"] = [int(n) for n in to_numpy(lengths, "lengths").reshape(-1)]
    if causal is not None:
        body["causal"] = bool(causal)
    if attn_mask is not None:
        mask = to_numpy(attn_mask, "attn_mask")
        if mask.dtype != np.bool_:
            raise ValueError(f"attn_mask must be boolean (True = may attend), got dtype {mask.dtype}")
        body["attn_mask"] = encode_tensor(mask, encoding, "bool")
    if heads is not None:
        body["heads"] = [int(h) for h in to_numpy(heads, "heads").reshape(-1)]
        return_weights = True
    if return_weights:
        body["return_weights"] = True
    if timeout_ms is not None:
        body["timeout_ms"] = float(timeout_ms)
    if sequence is not None:
        body["sequence"] = sequence
    body["response_encoding"] = encoding
    return body


def parse_attend(resp: httpx.Response) -> AttendResult:
    obj = resp.json()
    h = resp.headers
    weights = obj.get("weights")
    return AttendResult(
        output=decode_tensor(obj["output"], "output"),
        weights=None if weights is None else decode_tensor(weights, "weights"),
        queue_ms=_number(h.get("x-queue-time-ms"), float),
        compute_ms=_number(h.get("x-compute-time-ms"), float),
        batch_size=_number(h.get("x-batch-size"), int),
        served_by=h.get("x-served-by"),
        model=obj.get("model") or {},
    )


def error_for(resp: httpx.Response, attempts: int) -> MhaHTTPError:
    """The exception for an error answer, with the server's ``{"error": {"type","message"}}``."""
    status = resp.status_code
    kind, message = "http_error", (resp.text[:500] or resp.reason_phrase)
    try:
        err = resp.json()["error"]
        kind, message = str(err["type"]), str(err["message"])
    except (ValueError, KeyError, TypeError):
        pass
    retry_after = parse_retry_after(resp.headers.get("retry-after"))
    if status in RETRY_STATUSES:
        return MhaOverloaded(status, kind, message, retry_after=retry_after, attempts=attempts)
    cls = MhaClientError if 400 <= status < 500 else MhaServerError
    return cls(status, kind, message, retry_after=retry_after)


def _number(value: str | None, kind: type) -> Any:
    try:
        return None if value is None else kind(value)
    except ValueError:
        return None


class _Base:
    def __init__(
        self,
        base_url: str,
        api_key: str | None,
        max_retries: int,
        backoff_s: float,
        max_wait_s: float,
        jitter: float,
        headers: dict[str, str] | None,
    ) -> None:
        self.base_url = base_url.rstrip("/")
        self.retry = RetryPolicy(max_retries, backoff_s, max_wait_s, jitter)
        self._headers = {"user-agent": f"mha-client/{__version__}", **(headers or {})}
        if api_key:
            self._headers["authorization"] = f"Bearer {api_key}"

    @staticmethod
    def _json(body: dict[str, Any]) -> bytes:
        return json.dumps(body, separators=(",", ":")).encode()

    def _unreachable(self, e: httpx.TransportError, attempts: int) -> MhaConnectionError:
        if isinstance(e, httpx.TimeoutException):
            return MhaConnectionError(f"no answer from {self.base_url} in time ({type(e).__name__}): {e}")
        return MhaConnectionError(f"cannot reach {self.base_url} after {attempts} attempt(s): {e}")


class Client(_Base):
    """A blocking client with one pooled connection set; use it as a context manager.

    Example::

        with Client("http://127.0.0.1:8000") as mha:
            res = mha.attend(np.random.randn(2, 16, 512).astype(np.float32), return_weights=True)
            res.output.shape, res.weights.shape  # (2, 16, 512), (2, 8, 16, 16)
    """

    def __init__(
        self,
        base_url: str = "http://127.0.0.1:8000",
        api_key: str | None = None,
        timeout: float | httpx.Timeout = 60.0,
        *,
        max_retries: int = 3,
        backoff_s: float = 0.25,
        max_wait_s: float = 30.0,
        jitter: float = 0.1,
        headers: dict[str, str] | None = None,
        transport: httpx.BaseTransport | None = None,
        sleep: Callable[[float], None] = time.sleep,
    ) -> None:
        super().__init__(base_url, api_key, max_retries, backoff_s, max_wait_s, jitter, headers)
        self._sleep = sleep
        self._http = httpx.Client(base_url=self.base_url, timeout=timeout, headers=self._headers, transport=transport)

    def __enter__(self) -> Client:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        self._http.close()

    def attend(
        self,
        x: Any,
        lengths: Any = None,
        causal: bool | None = None,
        attn_mask: Any = None,
        return_weights: bool = False,
        heads: Any = None,
        encoding: str = "base64",
        *,
        dtype: str = "float32",
        timeout_ms: float | None = None,
    ) -> AttendResult:
        """POST /attend. ``x`` is [B, T, E] (numpy, torch or nested lists); arrays come back as numpy."""
        body = build_attend_body(
            x,
            lengths=lengths,
            causal=causal,
            attn_mask=attn_mask,
            return_weights=return_weights,
            heads=heads,
            encoding=encoding,
            dtype=dtype,
            timeout_ms=timeout_ms,
        )
        return parse_attend(self._request("POST", "/attend", self._json(body)))

    def heatmap(
        self, x: Any, lengths: Any = None, causal: bool | None = None, attn_mask: Any = None, heads: Any = None
    ) -> bytes:
        """POST /attend/heatmap: a PNG of each head's weights for one sequence, x [1, T, E]."""
        body = build_attend_body(x, lengths=lengths, causal=causal, attn_mask=attn_mask, heads=heads)
        return self._request("POST", "/attend/heatmap", self._json(body)).content

    def sequence(self, id: int | str | None = None) -> Sequence:
        """A sequence of steps over the server's KV cache (:class:`Sequence`); ``id``: generated (a random
        uint64) unless given. ``with mha.sequence() as s: y = s.step(x_t).output``."""
        return Sequence(self, id)

    def model(self) -> dict[str, Any]:
        """GET /v1/model: the served model's shape, checksum, batching and limits."""
        return self._request("GET", "/v1/model").json()

    def ready(self) -> bool:
        """GET /readyz once, no retries: True when the server takes work."""
        try:
            resp = self._http.get("/readyz")
        except httpx.TransportError:
            return False
        return resp.status_code == 200

    def wait_ready(self, timeout_s: float = 30.0, poll_s: float = 0.1) -> None:
        deadline = time.monotonic() + timeout_s
        while not self.ready():
            if time.monotonic() > deadline:
                raise MhaConnectionError(f"{self.base_url} was not ready within {timeout_s:g} s")
            self._sleep(poll_s)

    def _request(
        self, method: str, path: str, content: bytes | None = None, *, step_of: int | str | None = None
    ) -> httpx.Response:
        """``step_of``: the request is a step of that sequence: its header, and the retries of a step."""
        headers = {"content-type": "application/json"} if content is not None else None
        statuses = RETRY_STATUSES
        if step_of is not None:
            headers = {**(headers or {}), SEQUENCE_HEADER: str(step_of)}
            statuses = STEP_RETRY_STATUSES
        for attempt in range(self.retry.max_retries + 1):
            last = attempt == self.retry.max_retries
            try:
                resp = self._http.request(method, path, content=content, headers=headers)
            except httpx.TimeoutException as e:
                raise self._unreachable(e, attempt + 1) from e
            except httpx.TransportError as e:
                if last or (step_of is not None and not isinstance(e, httpx.ConnectError)):
                    raise self._unreachable(e, attempt + 1) from e
                self._sleep(self.retry.wait_s(attempt, None))
                continue
            if resp.status_code in statuses and not last:
                self._sleep(self.retry.wait_s(attempt, parse_retry_after(resp.headers.get("retry-after"))))
                continue
            if resp.status_code >= 400:
                err = error_for(resp, attempt + 1)
                if step_of is not None and err.type == "sequence_start_required":
                    raise MhaSequenceLost(err.status, err.type, err.message, sequence_id=step_of)
                raise err
            return resp
        raise AssertionError("unreachable")


class AsyncClient(_Base):
    """The asyncio twin of :class:`Client`: the same methods, awaited; ``async with`` it."""

    def __init__(
        self,
        base_url: str = "http://127.0.0.1:8000",
        api_key: str | None = None,
        timeout: float | httpx.Timeout = 60.0,
        *,
        max_retries: int = 3,
        backoff_s: float = 0.25,
        max_wait_s: float = 30.0,
        jitter: float = 0.1,
        headers: dict[str, str] | None = None,
        transport: httpx.AsyncBaseTransport | None = None,
        sleep: Callable[[float], Awaitable[None]] = asyncio.sleep,
    ) -> None:
        super().__init__(base_url, api_key, max_retries, backoff_s, max_wait_s, jitter, headers)
        self._sleep = sleep
        self._http = httpx.AsyncClient(
            base_url=self.base_url, timeout=timeout, headers=self._headers, transport=transport
        )

    async def __aenter__(self) -> AsyncClient:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.aclose()

    async def aclose(self) -> None:
        await self._http.aclose()

    async def attend(
        self,
        x: Any,
        lengths: Any = None,
        causal: bool | None = None,
        attn_mask: Any = None,
        return_weights: bool = False,
        heads: Any = None,
        encoding: str = "base64",
        *,
        dtype: str = "float32",
        timeout_ms: float | None = None,
    ) -> AttendResult:
        body = build_attend_body(
            x,
            lengths=lengths,
            causal=causal,
            attn_mask=attn_mask,
            return_weights=return_weights,
            heads=heads,
            encoding=encoding,
            dtype=dtype,
            timeout_ms=timeout_ms,
        )
        return parse_attend(await self._request("POST", "/attend", self._json(body)))

    async def heatmap(
        self, x: Any, lengths: Any = None, causal: bool | None = None, attn_mask: Any = None, heads: Any = None
    ) -> bytes:
        body = build_attend_body(x, lengths=lengths, causal=causal, attn_mask=attn_mask, heads=heads)
        return (await self._request("POST", "/attend/heatmap", self._json(body))).content

    def sequence(self, id: int | str | None = None) -> AsyncSequence:
        """A sequence of steps (:class:`AsyncSequence`): ``async with mha.sequence() as s: await s.step(x_t)``."""
        return AsyncSequence(self, id)

    async def model(self) -> dict[str, Any]:
        return (await self._request("GET", "/v1/model")).json()

    async def ready(self) -> bool:
        try:
            resp = await self._http.get("/readyz")
        except httpx.TransportError:
            return False
        return resp.status_code == 200

    async def wait_ready(self, timeout_s: float = 30.0, poll_s: float = 0.1) -> None:
        deadline = time.monotonic() + timeout_s
        while not await self.ready():
            if time.monotonic() > deadline:
                raise MhaConnectionError(f"{self.base_url} was not ready within {timeout_s:g} s")
            await self._sleep(poll_s)

    async def _request(
        self, method: str, path: str, content: bytes | None = None, *, step_of: int | str | None = None
    ) -> httpx.Response:
        """``step_of``: the request is a step of that sequence: its header, and the retries of a step."""
        headers = {"content-type": "application/json"} if content is not None else None
        statuses = RETRY_STATUSES
        if step_of is not None:
            headers = {**(headers or {}), SEQUENCE_HEADER: str(step_of)}
            statuses = STEP_RETRY_STATUSES
        for attempt in range(self.retry.max_retries + 1):
            last = attempt == self.retry.max_retries
            try:
                resp = await self._http.request(method, path, content=content, headers=headers)
            except httpx.TimeoutException as e:
                raise self._unreachable(e, attempt + 1) from e
            except httpx.TransportError as e:
                if last or (step_of is not None and not isinstance(e, httpx.ConnectError)):
                    raise self._unreachable(e, attempt + 1) from e
                await self._sleep(self.retry.wait_s(attempt, None))
                continue
            if resp.status_code in statuses and not last:
                await self._sleep(self.retry.wait_s(attempt, parse_retry_after(resp.headers.get("retry-after"))))
                continue
            if resp.status_code >= 400:
                err = error_for(resp, attempt + 1)
                if step_of is not None and err.type == "sequence_start_required":
                    raise MhaSequenceLost(err.status, err.type, err.message, sequence_id=step_of)
                raise err
            return resp
        raise AssertionError("unreachable")


class _SequenceBase:
    """What a sequence knows: its id, whether the server holds it (the next step starts it, or not), and the
    width of its rows (for the end-only request)."""

    def __init__(self, id: int | str | None) -> None:
        if id is None:
            id = secrets.randbits(64) or 1  # Triton's uint64 ids; 0 is no sequence
        if isinstance(id, bool) or not isinstance(id, (int, str)) or id == "" or id == 0:
            raise ValueError(f"a sequence id is an integer 1..2**64-1 or a non-empty string, got {id!r}")
        self.id = id
        self.started = False  # the server holds it: the next step does not carry start
        self.ended = False
        self._width: int | None = None

    def _body(self, x: Any, end: bool, kw: dict[str, Any]) -> bytes:
        if self.ended:
            raise MhaError(f"sequence {self.id!r} has ended: open a new one")
        body = build_attend_body(x, **kw, sequence={"id": self.id, "start": not self.started, "end": end})
        self._width = body["x"]["shape"][-1] if isinstance(body["x"], dict) else len(body["x"][0][0])
        return _Base._json(body)

    def _end_body(self) -> bytes | None:
        """The end-only request: x of shape [1, 0, E] with end, which the server answers by forgetting the
        sequence. None when there is nothing to end (no step answered, or the last one carried end)."""
        if not self.started or self.ended or self._width is None:
            self.ended = True
            return None
        self.ended = True
        x = np.zeros((1, 0, self._width), np.float32)
        return _Base._json(build_attend_body(x, sequence={"id": self.id, "start": False, "end": True}))

    def _answered(self, resp: httpx.Response, end: bool) -> AttendResult:
        self.started = True
        self.ended = end
        return parse_attend(resp)


class Sequence(_SequenceBase):
    """One sequence of steps over the server's KV cache (``Client.sequence``): each step sends only its new
    rows x [1, t, E] and gets back the causal forward's rows for them over the whole sequence so far.

    The first step carries the start flag; leaving the ``with`` block sends the end flag (an end-only
    request, x of shape [1, 0, E], unless the last step said ``end=True``). A sequence the server lost
    raises :class:`MhaSequenceLost`, and the next step starts it again: replay the prefix.
    """

    def __init__(self, client: Client, id: int | str | None = None) -> None:
        super().__init__(id)
        self._client = client

    def __enter__(self) -> Sequence:
        return self

    def __exit__(self, exc_type: object, *exc: object) -> None:
        try:
            self.end()
        except MhaError:
            if exc_type is None:  # an error while leaving on an error: the first one is the one to see
                raise

    def step(self, x: Any, *, end: bool = False, **kw: Any) -> AttendResult:
        """POST /attend with this sequence's flags. ``kw``: ``attend``'s return_weights, heads, encoding,
        dtype, timeout_ms (a step takes no lengths, attn_mask or causal)."""
        body = self._body(x, end, kw)
        try:
            resp = self._client._request("POST", "/attend", body, step_of=self.id)
        except MhaSequenceLost:
            self.started = False
            raise
        return self._answered(resp, end)

    def end(self) -> None:
        """Tell the server the sequence is over, so its cache is freed now rather than when reaped idle."""
        body = self._end_body()
        if body is not None:
            with contextlib.suppress(MhaSequenceLost):  # already gone: nothing to free
                self._client._request("POST", "/attend", body, step_of=self.id)


class AsyncSequence(_SequenceBase):
    """The asyncio twin of :class:`Sequence` (``AsyncClient.sequence``): ``async with``, steps awaited."""

    def __init__(self, client: AsyncClient, id: int | str | None = None) -> None:
        super().__init__(id)
        self._client = client

    async def __aenter__(self) -> AsyncSequence:
        return self

    async def __aexit__(self, exc_type: object, *exc: object) -> None:
        try:
            await self.end()
        except MhaError:
            if exc_type is None:
                raise

    async def step(self, x: Any, *, end: bool = False, **kw: Any) -> AttendResult:
        body = self._body(x, end, kw)
        try:
            resp = await self._client._request("POST", "/attend", body, step_of=self.id)
        except MhaSequenceLost:
            self.started = False
            raise
        return self._answered(resp, end)

    async def end(self) -> None:
        body = self._end_body()
        if body is not None:
            with contextlib.suppress(MhaSequenceLost):
                await self._client._request("POST", "/attend", body, step_of=self.id)

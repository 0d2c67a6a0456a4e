"""The small typed messages between the front end and the engine (no torch here).

``AttendInput``/``AttendOutput``/``BatchStats`` are what the batcher and the runner exchange in one
process; ``Result``, the typed refusals (``Overloaded``, ``DeadlineExceeded``...) and the
``BatcherObserver`` hooks are what a front end gets from, or gives to, either batcher (the in-process
one or the engine client). Between processes every message is one of the msgspec Structs below (``Message``, a
tagged union), declared once here and decoded by one typed Decoder (``decode``): a msgpack header in array form,
then the arrays' buffers as extra frames (sent with ``copy=False``, received as zero-copy views), never pickled,
as vLLM's ``v1/serial_utils.py`` does. Several requests or results travel in one message when several are ready.
"""

from __future__ import annotations

import math
import threading
import weakref
from dataclasses import dataclass, field
from enum import Enum
from functools import partial
from typing import Any, ClassVar

import msgspec
import numpy as np

from service.shm import SHM_MIN, Arena


@dataclass(frozen=True)
class AttendInput:
    """One request, decoded and validated against the model."""

    x: np.ndarray  # (B, T, E) in wire_dtype: float32, float16, or bfloat16 as its bits (uint16)
    lengths: np.ndarray | None = None  # (B,) int64 in 1..T
    mask: np.ndarray | None = None  # (T, T) or (B, T, T) bool, True = may attend
    causal: bool = True
    need_weights: bool = False
    heads: tuple[int, ...] | None = None  # weights of these heads (all when None)
    fault: str | None = None  # tests only (settings.fault_injection): "raise" or "stall:<ms>"
    trace: object | None = None  # the request span's context when tracing is on (service/tracing.py); not in key
    # (decoded in the model process: its W3C carrier, which the model process turns back into a context)
    # x crosses to the engine as it arrived, and is cast once, on the model's device; numpy has no bfloat16,
    # so its bits travel as uint16 and this tag says what they are. Not in key: a batch may mix them.
    wire_dtype: str = "float32"
    out_dtype: str = "float32"  # what the answer's arrays hold (the response's dtype; bfloat16: its bits)
    sequence: tuple | None = None  # a step's (id, start, end) as it crosses to the model process; not in key
    # how many requests this one is: a front end's merged requests (service/engine/client.py) are computed and
    # answered as one, and counted as their number (batch sizes, queue waits); not in key
    requests: int = 1
    # in the model process on a GPU: the arena its answer goes back through (service/shm.py's Arena), where the
    # runner downloads it in place (``Arena.lend``) instead of the host copying it there; not in key
    answer_to: Any = None
    # in the model process on a GPU: x lies in page-locked memory (its front end's arena, mapped and page-locked),
    # which the runner uploads from where it lies instead of copying it into its staging buffer; not in key
    x_page_locked: bool = False

    @property
    def batch(self) -> int:
        return self.x.shape[0]

    @property
    def seq_len(self) -> int:
        return self.x.shape[1]

    @property
    def key(self) -> tuple:
        """Requests with the same key can share a forward pass."""
        return (self.causal, self.need_weights, self.mask is not None)


@dataclass
class AttendOutput:
    output: np.ndarray  # (B, T, E) in the request's out_dtype (bfloat16: its bits as uint16)
    weights: np.ndarray | None  # (B, len(heads), T, T), the same dtype


@dataclass
class BatchStats:
    sequences: int = 0
    padded_tokens: int = 0
    real_tokens: int = 0
    compute_s: float = 0.0
    weights_elements: int = 0  # attention-weight elements computed (each request's own heads only)
    extra: dict = field(default_factory=dict)


# -- the batcher's outcomes and hooks (the in-process batcher and the engine client raise the same) --


class ErrorKind(str, Enum):
    """Why the engine did not answer a request with a result: the one enum of the engine's failures.

    Its values are error types of ``service.errors.ERROR_STATUS`` (CLIENT_GONE aside: nobody waits for
    that answer), so each edge (HTTP, gRPC) maps a failure to its status once, by its kind; it crosses
    the process boundary as its value.
    """

    OVERLOADED = "overloaded"
    VALIDATION = "validation_error"  # the request alone is over a per-batch limit
    DEADLINE = "deadline_exceeded"
    UNAVAILABLE = "unavailable"  # shutting down, or the model process is gone
    NUMERIC_OVERFLOW = "numeric_overflow"
    INTERNAL = "internal_error"  # the forward failed for this request
    CLIENT_GONE = "client_gone"  # the caller went away: nobody is answered
    SEQUENCE_START_REQUIRED = "sequence_start_required"  # a step of a sequence the engine does not hold


class EngineFailure(Exception):
    """A request the engine answers with a failure of ``kind`` instead of a result."""

    kind: ClassVar[ErrorKind] = ErrorKind.INTERNAL
    retry_after_s: float = 0.0


class Overloaded(EngineFailure):
    kind = ErrorKind.OVERLOADED

    def __init__(self, message: str, retry_after_s: float) -> None:
        super().__init__(message)
        self.retry_after_s = retry_after_s


class DeadlineExceeded(EngineFailure):
    kind = ErrorKind.DEADLINE


class ShuttingDown(EngineFailure):
    kind = ErrorKind.UNAVAILABLE


class ClientGone(EngineFailure):
    kind = ErrorKind.CLIENT_GONE


class RequestTooLarge(EngineFailure):
    """The request alone is over a per-batch limit: no batch could ever run it."""

    kind = ErrorKind.VALIDATION


class NumericOverflow(EngineFailure):
    """This request's result holds NaN or Inf: its computation overflowed the model's dtype (a 422, not a fault).

    The runner checks each batch's results once and fails only the requests whose own values are
    non-finite; every transport answers it as ``numeric_overflow`` with this message.
    """

    kind = ErrorKind.NUMERIC_OVERFLOW


class EngineError(EngineFailure):
    """The forward failed for this request in the model process (answered as a 500 with an error id)."""

    kind = ErrorKind.INTERNAL


class SequenceStartRequired(EngineFailure):
    """A step of an id the engine does not hold, without ``start``: Triton's INVALID_ARG (HTTP 400)."""

    kind = ErrorKind.SEQUENCE_START_REQUIRED


class StepInvalid(EngineFailure):
    """A step that breaks the sequence contract (B != 1, lengths, attn_mask, causal false, too long): 422."""

    kind = ErrorKind.VALIDATION


_FAILURE_OF_KIND: dict[str, type[EngineFailure]] = {
    c.kind.value: c
    for c in (
        Overloaded,
        DeadlineExceeded,
        ShuttingDown,
        ClientGone,
        RequestTooLarge,
        NumericOverflow,
        EngineError,
        SequenceStartRequired,
    )
}


def failure_of(kind: str, message: str, retry_after_s: float = 0.0) -> EngineFailure:
    """A failure that crossed the process boundary as its kind's value, raised again as its class."""
    cls = _FAILURE_OF_KIND.get(kind, EngineError)
    return Overloaded(message, retry_after_s) if cls is Overloaded else cls(message)


def kind_of(exc: BaseException) -> ErrorKind:
    """The kind a failure crosses the process boundary as: INTERNAL for anything not an EngineFailure."""
    return exc.kind if isinstance(exc, EngineFailure) else ErrorKind.INTERNAL


# largest finite value of each float dtype (bfloat16: float32's exponent, 8 bits of mantissa)
DTYPE_MAX = {"float32": float(np.finfo(np.float32).max), "float16": 65504.0, "bfloat16": 3.3895313892515355e38}


# each wire dtype's numpy form; bfloat16 has none, so its bits are carried as uint16
WIRE_NUMPY = {"float32": np.dtype("<f4"), "float16": np.dtype("<f2"), "bfloat16": np.dtype("<u2")}
HALF_INF = {"float16": 0x7C00, "bfloat16": 0x7F80}  # a half's exponent bits all set: Inf or NaN


_SCRATCH = threading.local()  # per thread: a uint16 buffer that largest_bits reuses
_SCRATCH_MAX = 1 << 22  # elements (8 MiB): the most it keeps


def largest_bits(arr: np.ndarray) -> int:
    """The largest magnitude of a half-precision array (float16, or bfloat16's uint16 bits), as its bits without
    the sign: for finite values magnitude grows with them, and Inf/NaN lie above. One integer pass, much faster
    than np.isfinite over float16, which numpy computes element by element in float32. The masked bits go to a
    buffer the thread keeps (a fresh one a request was fresh pages of a large request's size to fault in)."""
    n = arr.size
    if not n:
        return 0
    buf = getattr(_SCRATCH, "buf", None)
    if buf is None or buf.size < n:
        buf = np.empty(max(n, 1 << 16), np.uint16)
        if n <= _SCRATCH_MAX:  # (a larger one is not kept)
            _SCRATCH.buf = buf
    bits = buf[:n]
    np.bitwise_and(arr.reshape(-1).view("<u2"), 0x7FFF, out=bits)
    return int(np.maximum.reduce(bits))


def finite_as(arr: np.ndarray, dtype: str) -> bool:
    """Whether every element of ``arr``, in ``dtype``'s wire form (WIRE_NUMPY), is finite."""
    if dtype == "float32":
        return all_finite(arr)
    return largest_bits(arr) < HALF_INF[dtype]


def bits_value(bits: int, dtype: str) -> float:
    """A half's magnitude bits (largest_bits) as the number they stand for."""
    if dtype == "float16":
        return float(np.array(bits, np.uint16).view(np.float16))
    return float(np.array(bits << 16, np.uint32).view(np.float32))


def wire_dtype_of(arr: np.ndarray) -> str:
    """The wire dtype of a decoded float array (float32, float16, or bfloat16's bits as uint16)."""
    return {"f4": "float32", "f2": "float16", "u2": "bfloat16"}[arr.dtype.str[1:]]


def as_float32(x: np.ndarray, wire_dtype: str) -> np.ndarray:
    """A wire array's values as float32 (exact: float16 and bfloat16 are subsets of it)."""
    if wire_dtype == "bfloat16":
        return (x.astype(np.uint32) << 16).view(np.float32)
    return x if x.dtype == np.float32 else x.astype(np.float32)


def narrowing_overflow(name: str, wide: np.ndarray, dtype: str) -> NumericOverflow:
    """A finite result that the response's half precision cannot hold (answered, never sent as Inf)."""
    largest = float(np.max(np.abs(wide))) if wide.size else 0.0
    return NumericOverflow(
        f"{name} has values beyond {dtype}'s range (largest |value| {largest:g}, {dtype} holds up to "
        f"{DTYPE_MAX[dtype]:g}); responses come in the dtype of x: send x as float32, or send smaller values"
    )


def all_finite(arr: np.ndarray) -> bool:
    """Whether every element is finite: one ufunc and one reduce over its bools, no slower than a float64 sum
    and faster on large arrays, silent (a sum of +Inf and -Inf warns), and cheaper than torch.isfinite on a
    CPU. The front end's input checks and the runner's once-per-batch result check both use it."""
    return bool(np.isfinite(arr).all()) if arr.size else True


def overflow_of(tensors: dict[str, np.ndarray | None], x: np.ndarray, model_dtype: str) -> NumericOverflow | None:
    """One request's computed tensors (float32, on the host) and its x (any float dtype; bfloat16 widened): the
    overflow to answer, or None if all are finite.

    Every input is finite and within the model dtype's range (checked at decode), and the weights are
    finite (checked at start-up), so a non-finite result means that the computation overflowed: the
    q/k/v and output projections and the attention scores multiply the input's magnitudes, and can
    leave a half-precision range that the input itself fits in.
    """
    for name, arr in tensors.items():
        if arr is None or not arr.size:
            continue
        bad = int(arr.size - np.count_nonzero(np.isfinite(arr)))
        if not bad:
            continue
        largest = float(np.max(np.abs(x))) if x.size else 0.0
        advice = "send smaller values"
        if model_dtype != "float32":
            advice += ", or serve a float32 model (MHA_DTYPE=float32)"
        return NumericOverflow(
            f"the model's {model_dtype} computation overflowed: {name} has {bad} non-finite value(s) of "
            f"{arr.size}. The largest |x| in this request is {largest:g}; the projections and attention scores "
            f"grow with it past {model_dtype}'s range (largest finite {DTYPE_MAX[model_dtype]:g}). {advice}"
        )
    return None


class BatcherObserver:
    """Hooks for metrics; the default does nothing."""

    def queue_changed(self, requests: int, tokens: int) -> None: ...
    def level_queue_changed(self, level: int, requests: int, tokens: int) -> None: ...  # priority_levels > 1
    def batch_done(self, requests: int, stats: BatchStats, queue_waits_s: list[float]) -> None: ...
    def dropped(self, reason: str) -> None: ...
    def batch_failed(self, requests: int) -> None: ...
    def limits_scaled(self, scale: float) -> None: ...
    def batch_finished(self, inputs: list[AttendInput], started_monotonic: float, stats: BatchStats) -> None:
        """After batch_done, with the members' inputs: tracing draws the batch's forward span here."""


@dataclass(slots=True)
class Result:
    output: AttendOutput
    queue_s: float
    compute_s: float
    batch_requests: int
    batch_sequences: int


# -- across the process boundary -------------------------------------------------------------

# A request still waiting this long starts watching its caller (``abandoned`` given as a function): a client
# that leaves is noticed from then on, and a quick answer never pays for a watcher task.
WATCH_AFTER_S = 0.05
ADDRESS_ENV = "MHA_ENGINE_ADDRESS"  # the model process's address (ipc://<socket path>), handed to the front ends


PACK_BELOW = 1 << 16  # arrays under 64 KiB cross packed together in one frame a message; larger ones in their own
_PAD = bytes(16)


class Rows(tuple):
    """The x of requests merged into one (``service.engine.client``): its members' arrays, same shape but the first
    axis and same dtype, which cross as their concatenation along it without being concatenated first."""


class _Packer:
    """A message's arrays -> frames. A frame costs a little beyond its bytes (its length, its slice), so the
    small arrays of a message (a batch of small requests: one or two each) are copied into one frame, each at
    a 16-byte aligned offset; an array of PACK_BELOW bytes or more is a frame of its own, sent without a copy,
    unless the sender's ``arena`` (service/shm.py) takes it: then only its place crosses, and ``slots`` lists
    the arena's offsets it took. Each array's place is an ``Arr``, its frame counted after the message's header
    (ARENA: the sender's arena)."""

    __slots__ = ("arena", "big", "size", "slots", "small")

    def __init__(self, arena: Arena | None = None) -> None:
        self.small: list = []
        self.size = 0
        self.big: list = []
        self.arena = arena
        self.slots: list[int] = []

    def add(self, a: np.ndarray) -> Arr:
        if not a.flags.c_contiguous:
            a = np.ascontiguousarray(a)
        n = a.nbytes
        if n >= PACK_BELOW:
            arena = self.arena
            if arena is not None and n >= SHM_MIN:
                offset = arena.put(a)
                if offset is not None:  # (None: the arena is full; this one goes as a frame)
                    return self._placed(offset, a.shape, a.dtype.str)
            self.big.append(a)
            return Arr(a.shape, a.dtype.str, len(self.big), 0)
        offset = self.size
        self.small.append(a)
        pad = -n % 16
        if pad:
            self.small.append(_PAD[:pad])
        self.size += n + pad
        return Arr(a.shape, a.dtype.str, 0, offset)

    def add_rows(self, rows: Rows) -> Arr:
        """A merged request's x: its members' arrays one after the other along the first axis, copied once each
        into one arena slot (``Arena.put_rows``), or concatenated into one frame where the arena has no room."""
        first = rows[0]
        arena = self.arena
        if arena is not None and sum(a.nbytes for a in rows) >= SHM_MIN and all(a.flags.c_contiguous for a in rows):
            offset = arena.put_rows(rows)
            if offset is not None:
                return self._placed(offset, (sum(a.shape[0] for a in rows), *first.shape[1:]), first.dtype.str)
        return self.add(np.concatenate(rows))

    def _placed(self, offset: int, shape: tuple, dtype: str) -> Arr:
        """An array the arena took at ``offset`` (as ``Arena.put`` returns it): its place, in its segment's frame."""
        self.slots.append(offset)
        segment, at = divmod(offset, self.arena.size)
        return Arr(shape, dtype, ARENA - segment, at)

    def frames(self) -> list:
        return [b"".join(self.small), *self.big]

    @property
    def segments(self) -> int:
        """The sender's arena's segments, as its message says (1 without one)."""
        return 1 if self.arena is None else self.arena.segments

    @property
    def shrinks(self) -> int:
        """How many times the sender's arena gave segments back, as its message says."""
        return 0 if self.arena is None else self.arena.shrinks


ARENA = -1  # an Arr's frame when its bytes are in the sender's arena (ARENA - k: its segment k, service/shm.py): the
# receiver puts the arena's segments last, the first last of all
_NO_ARENA = b""  # in their place when none is mapped: an Arr that names one fails to decode, never reads a frame


_DTYPES: dict[str, np.dtype] = {}  # an array meta's dtype string -> its numpy dtype (a lookup, not a parse)


def _buffers(frames: list, arena: list | None, segments: int) -> list:
    """A message's array frames as buffers (memoryviews of what was read, or bytes/arrays as they are); then the
    sender's arena's ``segments`` (``shm.Mapped.tail``, grown to the message's count: an Arr's frame ARENA - k is
    its segment k), or as many empty placeholders when none is mapped."""
    bufs = list(frames)
    if arena is None or len(arena) < segments:
        bufs.extend([_NO_ARENA] * segments)
    else:
        bufs.extend(arena)
    return bufs


_new = object.__new__


def _input(
    x,
    lengths,
    mask,
    causal,
    need_weights,
    heads,
    fault,
    trace,
    wire_dtype,
    out_dtype,
    sequence=None,
    requests=1,
    answer_to=None,
    x_page_locked=False,
) -> AttendInput:
    """An AttendInput without the frozen dataclass's ``__init__`` (one ``object.__setattr__`` per field): the same
    fields and object, built in half the time; the model process builds one per request."""
    inp = _new(AttendInput)
    inp.__dict__.update(
        x=x,
        lengths=lengths,
        mask=mask,
        causal=causal,
        need_weights=need_weights,
        heads=heads,
        fault=fault,
        trace=trace,
        wire_dtype=wire_dtype,
        out_dtype=out_dtype,
        sequence=sequence,
        requests=requests,
        answer_to=answer_to,
        x_page_locked=x_page_locked,
    )
    return inp


# -- the messages: msgspec Structs in array form (positional: no key string per field on either side). Both sides
# ship together: no versioning. Against the orjson headers of positional lists they replace (bench/wire_codec.py:
# encode + decode of a message of 1, 16 or 64 [1,16,64] float32 requests, or of their results) they cost
# 0.72-1.02x the time. The small arrays of a message still share one packed frame: a frame costs ~4 us. gc=False:
# they hold no cycles, so the collector need not track the two or three Structs made per request. --


class Arr(msgspec.Struct, array_like=True, gc=False):
    """An array's place in its message: its bytes are in frame ``frame`` (counted after the header) at ``offset``."""

    shape: tuple[int, ...]
    dtype: str
    frame: int
    offset: int


class Request(msgspec.Struct, array_like=True, gc=False):
    id: int
    x: Arr
    lengths: Arr | None
    mask: Arr | None
    causal: bool
    need_weights: bool
    heads: tuple[int, ...] | None
    fault: str | None
    deadline: float  # time.monotonic(): CLOCK_MONOTONIC is one clock for the whole host
    request_id: str | None
    priority: int
    x_dtype: str  # x's wire dtype: its frame holds bfloat16 as uint16 bits
    out_dtype: str  # the dtype the answer's arrays come back in
    trace: dict[str, str] | None = None  # the request span's W3C traceparent/tracestate
    sequence: tuple[int | str, bool, bool] | None = None  # a sequence step's id, start and end
    requests: int = 1  # merged requests: how many (AttendInput.requests)


class Answer(msgspec.Struct, array_like=True, gc=False, tag=0):
    id: int
    output: Arr
    weights: Arr | None
    queue_s: float
    compute_s: float
    batch_requests: int
    batch_sequences: int


class Failure(msgspec.Struct, array_like=True, gc=False, tag=1):
    id: int
    kind: str  # an ErrorKind's value
    message: str
    retry_after_s: float


class Requests(msgspec.Struct, array_like=True, gc=False, tag="req"):
    items: list[Request]
    freed: tuple[int, ...] = ()  # the answer slots (offsets in the model process's arena) this front end is done with
    segments: int = 1  # how many segments the front end's arena has now (service/shm.py): the receiver maps the rest
    shrinks: int = 0  # how many times it gave segments back (``Arena.trim``): on a change, the receiver maps anew


class Outcomes(msgspec.Struct, array_like=True, gc=False, tag="res"):
    items: list[Answer | Failure]
    segments: int = 1  # as Requests': the model process's arena for this front end
    shrinks: int = 0


class Cancel(msgspec.Struct, array_like=True, gc=False, tag="cancel"):
    ids: list[int]
    freed: tuple[int, ...] = ()  # as Requests'


class Ping(msgspec.Struct, array_like=True, gc=False, tag="ping"):
    freed: tuple[int, ...] = ()  # as Requests'


class Heartbeat(msgspec.Struct, array_like=True, gc=False, tag="hb"):
    ready: bool
    queue: tuple[int, int]  # the model process's queue: requests, tokens


class Hello(msgspec.Struct, array_like=True, gc=False, tag="hello"):
    pid: int
    arena: str | None = None  # the shared memory this front end's requests' large arrays are in (service/shm.py)


class Info(msgspec.Struct, array_like=True, gc=False, tag="info"):
    ready: bool
    queue: tuple[int, int]
    config: dict[str, Any]  # MHAConfig.to_dict()
    model_info: dict[str, Any]
    arena: str | None = None  # the shared memory the answers' large arrays to this front end are in
    mapped: bool = False  # whether the model process mapped the front end's arena: until it did, none is used


class Bye(msgspec.Struct, array_like=True, gc=False, tag="bye"):
    """A front end that stops: the model process frees what it holds for it (its arena, its requests)."""


Message = Requests | Outcomes | Cancel | Ping | Heartbeat | Hello | Info | Bye
_encode = msgspec.msgpack.Encoder().encode
decode = msgspec.msgpack.Decoder(Message).decode  # a message's header (its first frame) -> its Struct


def encode(msg: Message) -> list:
    """A message without arrays (hello, info, ping, heartbeat, cancel) -> its frames."""
    return [_encode(msg)]


def encode_requests(
    items: list[tuple[int, AttendInput, float, str | None, int]],
    arena: Arena | None = None,
    slots: list[list[int]] | None = None,
    freed: tuple[int, ...] = (),
) -> list:
    """[(id, input, deadline, request id, priority)] -> [header, packed small arrays, large array, ...].

    ``priority`` is the batcher's level (0: the default); a traced request adds its span's context. With an
    ``arena``, the large arrays that fit go in it, and ``slots`` gets each item's offsets there (to free when its
    wait ends); ``freed`` carries the answer slots the front end is done with."""
    reqs, pack = [], _Packer(arena)
    add = pack.add
    taken = pack.slots
    for rid, inp, deadline, request_id, priority in items:
        first = len(taken)
        lengths, mask, h = inp.lengths, inp.mask, inp.heads
        x = inp.x
        reqs.append(
            Request(
                rid,
                add(x) if type(x) is not Rows else pack.add_rows(x),
                None if lengths is None else add(lengths),
                None if mask is None else add(mask),
                inp.causal,
                inp.need_weights,
                h,
                inp.fault,
                deadline,
                request_id,
                priority,
                inp.wire_dtype,
                inp.out_dtype,
                None if inp.trace is None else _trace_carrier(inp.trace),
                inp.sequence,
                inp.requests,
            )
        )
        if slots is not None:
            slots.append(taken[first:])
    return [_encode(Requests(reqs, freed, pack.segments, pack.shrinks)), *pack.frames()]


def _trace_carrier(span_context: Any) -> dict[str, str]:
    from service.tracing import carrier_of  # tracing is on: OpenTelemetry is loaded already

    return carrier_of(span_context)


def _array(bufs: list, a: Arr) -> np.ndarray:
    """A view of the array in its frame: ``np.ndarray`` over the buffer in one call, a quarter of the time of
    ``np.frombuffer(...).reshape(shape)``, the same view (read-only over bytes)."""
    dt = _DTYPES.get(a.dtype)
    if dt is None:
        dt = _DTYPES[a.dtype] = np.dtype(a.dtype)
    return np.ndarray(a.shape, dt, bufs[a.frame], a.offset)


def decode_requests(
    msg: Requests, frames: list, arena: list | None = None, answer_to: Any = None, page_locked: bool = False
) -> list[tuple[int, AttendInput, float, str | None, int]]:
    """A decoded ``Requests`` and the frames after its header -> [(id, input, deadline, request id, priority)].

    The arrays in the front end's ``arena`` are read-only views of their slots, valid until the front end stops
    waiting for the request: read them before answering, never after. ``arena``: the front end's (``shm.Mapped``'s
    ``tail``), grown to ``msg.segments``. ``answer_to``: each input's (``AttendInput.answer_to``); ``page_locked``:
    the arena is, so that an x read from it is (``AttendInput.x_page_locked``)."""
    out, bufs = [], _buffers(frames, arena, msg.segments)
    for r in msg.items:
        lengths, mask = r.lengths, r.mask
        inp = _input(
            _array(bufs, r.x),
            None if lengths is None else _array(bufs, lengths),
            None if mask is None else _array(bufs, mask),
            r.causal,
            r.need_weights,
            r.heads,
            r.fault,
            r.trace,
            r.x_dtype,
            r.out_dtype,
            r.sequence,
            r.requests,
            answer_to,
            page_locked and r.x.frame <= ARENA,
        )
        out.append((r.id, inp, r.deadline, r.request_id, r.priority))
    return out


# The weak references that give lent answer slots back, kept alive here until they fire; by id, not in a set: a
# weak reference hashes and compares as its referent, and a read-only memoryview hashes and compares its bytes.
_LENT: dict[int, weakref.ref] = {}


def _lent(freed: list[int], bufs: list, a: Arr) -> np.ndarray:
    """An answer's array in the model process's arena, lent without a copy: a read-only view of its slot. Its
    offset joins ``freed``, to go back with the front end's next message, when the last reference to it goes (the
    response was written): the weak reference is to the memoryview ``np.frombuffer`` makes, which the array and
    every view of it, a response body's memoryview or a tensor hold. A v2 binary answer is written to its socket
    straight from the arena: the copy out of it cost a front end 10-12% of its CPU a [1,128,512] request (py-spy,
    2 front ends, no-op forward)."""
    frame = a.frame
    if frame >= 0:
        return _array(bufs, a)
    dt = _DTYPES.get(a.dtype)
    if dt is None:
        dt = _DTYPES[a.dtype] = np.dtype(a.dtype)
    flat = np.frombuffer(bufs[frame], dt, math.prod(a.shape), a.offset)
    offset = slot_of(a, len(bufs[-1]))

    def back(ref: weakref.ref) -> None:
        del _LENT[id(ref)]
        freed.append(offset)

    ref = weakref.ref(flat.base, back)
    _LENT[id(ref)] = ref
    return flat.reshape(a.shape)


def slot_of(a: Arr, segment_size: int) -> int:
    """The arena slot of an array that crossed in the sender's arena (frame ARENA - k: its segment k), as
    ``Arena.put`` returned it: the segment's number times its size, plus its place there."""
    return (ARENA - a.frame) * segment_size + a.offset


def slots_of(msg: Outcomes, segment_size: int) -> list[int]:
    """The arena slots of a message's answers, for a receiver that gives them back without reading them."""
    return [
        slot_of(a, segment_size)
        for item in msg.items
        if type(item) is Answer
        for a in (item.output, item.weights)
        if a is not None and a.frame <= ARENA
    ]


@dataclass(slots=True)
class Outcome:
    """One request's answer from the engine: an output with its timings, or a typed error."""

    id: int
    output: AttendOutput | None = None
    queue_s: float = 0.0
    compute_s: float = 0.0
    batch_requests: int = 0
    batch_sequences: int = 0
    error: str | None = None  # an ErrorKind's value
    message: str = ""
    retry_after_s: float = 0.0


class OutcomesWriter:
    """One message of outcomes, built as they come: each answer's large arrays go into the ``arena`` (the model
    process's for this front end) as it is added, and ``frames`` encodes the message. The model process adds each
    answer straight from the batcher's Result, with no Outcome between them."""

    __slots__ = ("_add", "items", "pack")

    def __init__(self, arena: Arena | None = None) -> None:
        self.items: list[Answer | Failure] = []
        self.pack = _Packer(arena)
        self._add = self.pack.add

    def answer(
        self, rid: int, out: AttendOutput, queue_s: float, compute_s: float, batch_requests: int, batch_sequences: int
    ) -> None:
        w = out.weights
        add = self._add
        output = add(out.output)  # (the output's place first, then the weights', as they were always packed)
        weights = None if w is None else add(w)
        self.items.append(Answer(rid, output, weights, queue_s, compute_s, batch_requests, batch_sequences))

    def failure(self, rid: int, kind: str, message: str, retry_after_s: float) -> None:
        self.items.append(Failure(rid, kind, message, retry_after_s))

    def frames(self) -> list:
        pack = self.pack
        return [_encode(Outcomes(self.items, pack.segments, pack.shrinks)), *pack.frames()]


def encode_outcomes(items: list[Outcome], arena: Arena | None = None) -> list:
    """[Outcome] -> [header, packed small arrays, large array, ...]; with an ``arena`` (the model process's for this
    front end), the large arrays that fit are copied into it, to be freed when the front end says so."""
    writer = OutcomesWriter(arena)
    for o in items:
        if o.output is None:
            writer.failure(o.id, o.error, o.message, o.retry_after_s)
        else:
            writer.answer(o.id, o.output, o.queue_s, o.compute_s, o.batch_requests, o.batch_sequences)
    return writer.frames()


def decode_outcomes(
    msg: Outcomes, frames: list, arena: list | None = None, freed: list[int] | None = None
) -> list[Outcome]:
    """A decoded ``Outcomes`` and the frames after its header -> its Outcomes.

    An array in the model process's ``arena`` (``shm.Mapped``'s ``tail``, grown to ``msg.segments``) is lent
    (``_lent``): its offset joins ``freed`` (to send back) when the last reference to it goes, so a response may keep
    its arrays as long as it likes, and nothing is copied."""
    out, bufs = [], _buffers(frames, arena, msg.segments)
    array = _array if arena is None else partial(_lent, [] if freed is None else freed)
    for a in msg.items:
        if type(a) is Failure:
            out.append(Outcome(a.id, error=a.kind, message=a.message, retry_after_s=a.retry_after_s))
            continue
        w = a.weights
        out.append(
            Outcome(
                a.id,
                AttendOutput(array(bufs, a.output), None if w is None else array(bufs, w)),
                a.queue_s,
                a.compute_s,
                a.batch_requests,
                a.batch_sequences,
            )
        )
    return out

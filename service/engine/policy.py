"""The batcher's policy: which request anchors the next batch, which queued requests join it, how long to hold it
to grow, how out-of-memory errors scale the limits, and the retry-after of a refusal.

Pure functions of plain request records and of the time passed in: no queue, clock, task or thread of their
own, so a test calls them with a handful of records and checks the exact selection (LitServe keeps its
``loops/`` apart from its server the same way). :class:`service.engine.batcher.Batcher` keeps the mechanics:
the queues' bookkeeping, the sweep, the worker threads and the answers; its module docstring is the contract
these functions implement.

``queues`` is always one FIFO per priority level, the highest level first, each in arrival order. The batcher
calls these once per batch, not per request, but on a GPU host that is still thousands of times a second:
they walk the queues once and build nothing they do not return.
"""

from __future__ import annotations

import math
from collections.abc import Hashable, Sequence
from itertools import chain
from typing import NamedTuple, Protocol, TypeVar

MIN_SCALE = 1 / 1024  # out-of-memory halvings stop here: a batch of one sequence still runs
DRAIN_ALPHA = 0.2  # weight of the newest batch in the drain rate's moving average


class Queued(Protocol):
    """What the policy reads of a queued request (the batcher's ``_Pending`` has it as plain attributes)."""

    arrived: float  # monotonic seconds
    key: Hashable  # requests with the same key can share a forward pass
    seqs: int  # sequences (B)
    seq_len: int  # tokens per sequence (T)
    tokens: int  # seqs * seq_len
    weights: int  # attention-weight elements it computes
    queued_behind_batch: bool  # it arrived while a batch was computing


Q = TypeVar("Q", bound=Queued)


class Selection(NamedTuple):
    requests: list  # the anchor first, then the others in the order they were taken
    tokens: int  # their real (unpadded) tokens: what leaves the queue's token count


def _arrived(p: Queued) -> float:
    return p.arrived


def oldest_head(queues: Sequence[Sequence[Q]]) -> Q:
    """The oldest queued request of any level (each level's oldest is its head)."""
    return min((q[0] for q in queues if q), key=_arrived)


def anchor(queues: Sequence[Sequence[Q]], since_oldest: int, oldest_every: int) -> Q:
    """The next batch's first request: the oldest of the highest non-empty level, except that once
    ``oldest_every - 1`` batches in a row have not taken the oldest request of any level, this one does.

    That turn is what bounds starvation: a request never waits more than ``oldest_every`` batches once it is
    the oldest, whatever keeps arriving above it. ``since_oldest`` is :func:`since_oldest_after`'s count.
    At least one queue must be non-empty.
    """
    if len(queues) == 1:
        return queues[0][0]
    if since_oldest >= oldest_every - 1:
        return oldest_head(queues)
    for q in queues:
        if q:
            return q[0]
    raise ValueError("anchor of empty queues")


def since_oldest_after(since_oldest: int, oldest: Queued, batch: Sequence[Queued]) -> int:
    """The count :func:`anchor` reads, after ``batch``: 0 when it took ``oldest`` (the oldest request queued
    before it, :func:`oldest_head`), else one more. Taken by joining counts too, not only by anchoring."""
    for p in batch:
        if p is oldest:
            return 0
    return since_oldest + 1


def join(
    first: Q,
    queues: Sequence[Sequence[Q]],
    *,
    max_size: int,
    max_tokens: int,
    max_padding_ratio: float,
    max_weights: int,
) -> Selection:
    """``first`` and the queued requests that can share its forward pass, taken level by level from the
    highest, in arrival order, while the batch stays within ``max_size`` sequences, ``max_tokens`` padded
    tokens (sequences x the longest T), ``max_padding_ratio`` padded/real tokens and ``max_weights``
    attention-weight elements. A request that does not fit is passed over, not waited for: a later, smaller
    one may still fit. ``first`` always goes, whatever its size (submit refuses what no batch could hold).
    """
    key = first.key
    chosen = [first]
    seqs, T, real, weights = first.seqs, first.seq_len, first.tokens, first.weights
    for p in queues[0] if len(queues) == 1 else chain.from_iterable(queues):
        if seqs >= max_size:
            break
        if p is first or p.key != key or seqs + p.seqs > max_size:
            continue
        T2 = T if T >= p.seq_len else p.seq_len
        padded = (seqs + p.seqs) * T2
        if padded > max_tokens or padded > max_padding_ratio * (real + p.tokens):
            continue
        if weights + p.weights > max_weights:
            continue
        chosen.append(p)
        seqs, T, real, weights = seqs + p.seqs, T2, real + p.tokens, weights + p.weights
    return Selection(chosen, real)


def hold_s(first: Queued, queues: Sequence[Sequence[Queued]], now: float, *, max_wait_s: float, max_size: int) -> float:
    """How long to hold the batch ``first`` anchors so that it can grow (0 = dispatch now).

    Only a request that queued behind a running batch is held (one that found the model idle starts at once),
    until it has waited ``max_wait_s`` or its key's queued requests already fill ``max_size`` sequences.
    """
    if max_wait_s <= 0 or not first.queued_behind_batch:
        return 0.0
    key = first.key
    if sum(p.seqs for q in queues for p in q if p.key == key) >= max_size:
        return 0.0
    left = first.arrived + max_wait_s - now
    return left if left > 0 else 0.0


def scale_after_oom(scale: float) -> float:
    """The limits' scale after an out-of-memory error: halved, down to MIN_SCALE."""
    return max(scale / 2, MIN_SCALE)


def scale_at(scale: float, until: float, now: float) -> float:
    """The scale in force at ``now``: full again once the cool-down (``until``) is over."""
    return 1.0 if scale < 1 and now >= until else scale


def scaled_limits(max_size: int, max_tokens: int, scale: float) -> tuple[int, int]:
    """(max_batch_size, max_batch_tokens) at ``scale``, never below one."""
    return max(1, int(max_size * scale)), max(1, int(max_tokens * scale))


def drain_rate(previous: float, real_tokens: int, compute_s: float) -> float:
    """Tokens per second the model drains, a moving average over batches (``previous`` 0: none yet)."""
    if compute_s <= 0:
        return previous
    rate = real_tokens / compute_s
    return rate if previous == 0 else DRAIN_ALPHA * rate + (1 - DRAIN_ALPHA) * previous


def seconds_per_token(previous: float, tokens: int, took_s: float) -> float:
    """The forwards' wall time per token, a moving average over batches (``previous`` 0: none yet), from which the
    batcher expects how long the next one takes. An average of times, not of rates (``drain_rate``): one slow
    forward raises it at once, so a misjudged batch sends the next back to the forward thread."""
    if tokens <= 0:
        return previous
    per_token = took_s / tokens
    return per_token if previous == 0 else DRAIN_ALPHA * per_token + (1 - DRAIN_ALPHA) * previous


def retry_after_s(level_tokens: Sequence[int], level: int, drain_tokens_per_s: float) -> float:
    """Whole seconds (at least 1) to drain the tokens queued at ``level`` and above: what runs before a new
    request there. 1 while the drain rate is unknown."""
    if drain_tokens_per_s <= 0:
        return 1.0
    ahead = level_tokens[0] if level == 0 else sum(level_tokens[: level + 1])
    return max(1.0, math.ceil(ahead / drain_tokens_per_s))

"""The batcher's policy as pure functions: exact selections from plain request records, no queue, clock or thread."""

from __future__ import annotations

from dataclasses import dataclass, field

import pytest

from service.engine import policy


@dataclass(eq=False)  # identity, as the batcher's records: two equal-looking requests are still two
class Req:
    arrived: float
    seqs: int = 1
    seq_len: int = 4
    key: str = "k"
    weights: int = 0
    queued_behind_batch: bool = False
    tokens: int = field(init=False)

    def __post_init__(self) -> None:
        self.tokens = self.seqs * self.seq_len


def join(first, queues, *, max_size=32, max_tokens=1 << 20, max_padding_ratio=2.0, max_weights=1 << 30):
    return policy.join(
        first,
        queues,
        max_size=max_size,
        max_tokens=max_tokens,
        max_padding_ratio=max_padding_ratio,
        max_weights=max_weights,
    )


def arrivals(batch) -> list[float]:
    return [p.arrived for p in batch]


# -- the anchor, and the starvation bound ---------------------------------------------------------


def test_one_level_anchors_on_the_oldest_whatever_the_count():
    q = [Req(1), Req(2)]
    assert policy.anchor([q], since_oldest=10**6, oldest_every=2) is q[0]


def test_the_highest_non_empty_level_anchors_until_the_kth_batch_takes_the_oldest():
    high, low = [Req(5), Req(6)], [Req(1)]
    queues = [[], high, low]
    assert policy.anchor(queues, since_oldest=0, oldest_every=4) is high[0]
    assert policy.anchor(queues, since_oldest=2, oldest_every=4) is high[0]
    assert policy.anchor(queues, since_oldest=3, oldest_every=4) is low[0]  # the K-th batch without it
    assert policy.anchor(queues, since_oldest=0, oldest_every=1) is low[0]  # K = 1: FIFO across levels
    assert policy.oldest_head(queues) is low[0]


def test_the_count_restarts_when_a_batch_takes_the_oldest_even_by_joining():
    oldest, other = Req(1), Req(2)
    assert policy.since_oldest_after(3, oldest, [other]) == 4
    assert policy.since_oldest_after(3, oldest, [other, oldest]) == 0
    assert policy.since_oldest_after(3, oldest, [Req(1)]) == 4  # an equal-looking request is not the oldest


def _simulate(queues, *, k: int, batches: int, flood_level: int, flood_per_batch: int, max_size: int = 1):
    """Run the policy as the batcher does, with ``flood_per_batch`` new requests at ``flood_level`` before each
    batch; returns the batches (each a list of records)."""
    since, clock, out = 0, 100.0, []
    for _ in range(batches):
        for _ in range(flood_per_batch):
            clock += 1
            queues[flood_level].append(Req(clock))
        first = policy.anchor(queues, since, k)
        oldest = policy.oldest_head(queues)
        chosen, _ = join(first, queues, max_size=max_size)
        since = policy.since_oldest_after(since, oldest, chosen)
        for q in queues:
            q[:] = [p for p in q if all(p is not c for c in chosen)]
        out.append(chosen)
    return out


def test_a_flood_at_a_higher_level_delays_a_low_request_at_most_n_plus_one_times_k_batches():
    # two high requests queued before the low one (n = 2), then a flood of high requests, two per batch,
    # more than the model takes: strict priority would never serve the low one
    k, n = 4, 2
    low = Req(3)
    queues = [[Req(1), Req(2)], [low]]
    batches = _simulate(queues, k=k, batches=40, flood_level=0, flood_per_batch=2)
    at = next(i for i, b in enumerate(batches, 1) if low in b)
    # batches 1-2 take the two high ones before it (each the oldest then: the count restarts), then the low one
    # is the oldest and waits K - 1 batches of high work: the 6th batch takes it, within (n + 1) x K
    assert at == n + k == 6
    assert at <= (n + 1) * k
    assert arrivals(batches[at - 1]) == [3]
    assert all(len(b) == 1 for b in batches)


def test_under_floods_at_both_levels_the_lower_gets_exactly_one_batch_in_k():
    k = 4
    queues = [[], [Req(float(i)) for i in range(40)]]  # the low level: older than every high request
    batches = _simulate(queues, k=k, batches=40, flood_level=0, flood_per_batch=2)
    low_batches = [i for i, b in enumerate(batches, 1) if b[0].arrived < 100]
    assert low_batches == list(range(k, 41, k))  # the higher level keeps (K - 1)/K of the batches


def test_with_k_out_of_reach_the_flood_starves_the_low_level():
    low = Req(1)
    batches = _simulate([[], [low]], k=10**6, batches=50, flood_level=0, flood_per_batch=2)
    assert all(low not in b for b in batches)


# -- who joins the anchor -------------------------------------------------------------------------


def test_a_batch_fills_from_the_highest_level_in_arrival_order():
    high = [Req(5), Req(6)]
    low = [Req(1), Req(2), Req(3)]
    first = policy.anchor([high, low], 0, 8)
    chosen, tokens = join(first, [high, low], max_size=4)
    assert arrivals(chosen) == [5, 6, 1, 2]
    assert tokens == 16


def test_the_anchor_goes_first_and_once_even_from_a_lower_level():
    high, low = [Req(5)], [Req(1), Req(2)]
    chosen, _ = join(low[0], [high, low], max_size=8)
    assert arrivals(chosen) == [1, 5, 2]


def test_other_keys_and_requests_that_overflow_max_size_are_passed_over_not_waited_for():
    q = [Req(1, seqs=2), Req(2, key="other"), Req(3, seqs=3), Req(4, seqs=1), Req(5, seqs=1)]
    chosen, tokens = join(q[0], [q], max_size=4)
    # 2 + 3 would be 5 > 4: passed over; the two of one sequence fill the batch to exactly 4
    assert arrivals(chosen) == [1, 4, 5]
    assert tokens == 16


def test_a_full_batch_stops_the_walk():
    q = [Req(float(i)) for i in range(10)]
    chosen, _ = join(q[0], [q], max_size=3)
    assert arrivals(chosen) == [0, 1, 2]


def test_padded_tokens_stay_within_max_batch_tokens():
    # padded = sequences x the longest T: 16 + 16 = 32 fits 40; a third of T=16 would pad to 48
    q = [Req(1, seq_len=16), Req(2, seq_len=16), Req(3, seq_len=16), Req(4, seq_len=8)]
    chosen, tokens = join(q[0], [q], max_tokens=40)
    assert arrivals(chosen) == [1, 2]
    assert tokens == 32
    # a short one still fits where a long one did not: 2 x 12 = 24 padded, where 2 x 20 = 40 was over
    q = [Req(1, seq_len=12), Req(2, seq_len=20), Req(3, seq_len=4)]
    chosen, tokens = join(q[0], [q], max_tokens=36)
    assert arrivals(chosen) == [1, 3] and tokens == 16


def test_the_padding_ratio_keeps_a_long_request_out_of_a_short_batch():
    q = [Req(1, seq_len=16), Req(2, seq_len=1024), Req(3, seq_len=12), Req(4, seq_len=16)]
    chosen, tokens = join(q[0], [q], max_padding_ratio=1.5)
    assert arrivals(chosen) == [1, 3, 4]  # 3 x 16 = 48 padded for 44 real
    assert tokens == 44
    # at ratio 1.0 only equal lengths share a batch
    chosen, _ = join(q[0], [q], max_padding_ratio=1.0)
    assert arrivals(chosen) == [1, 4]


def test_the_weights_budget_splits_a_batch():
    q = [Req(float(i), weights=10) for i in range(5)]
    chosen, _ = join(q[0], [q], max_weights=25)
    assert arrivals(chosen) == [0, 1]
    # a lighter one later in the queue still fits the budget left
    q = [Req(1, weights=10), Req(2, weights=20), Req(3, weights=5)]
    chosen, _ = join(q[0], [q], max_weights=25)
    assert arrivals(chosen) == [1, 3]


def test_the_anchor_goes_even_over_the_limits():
    big = Req(1, seqs=8, seq_len=64, weights=100)
    chosen, tokens = join(big, [[big, Req(2)]], max_size=4, max_tokens=16, max_weights=10)
    assert chosen == [big] and tokens == 512


# -- holding a batch to grow ----------------------------------------------------------------------


def test_a_request_that_found_the_model_idle_is_not_held():
    first = Req(10.0, queued_behind_batch=False)
    assert policy.hold_s(first, [[first]], 10.0, max_wait_s=0.05, max_size=32) == 0.0


def test_a_batch_behind_a_running_one_is_held_until_its_anchor_has_waited_max_wait():
    first = Req(10.0, queued_behind_batch=True)
    q = [first, Req(10.01, queued_behind_batch=True)]
    assert policy.hold_s(first, [q], 10.02, max_wait_s=0.05, max_size=32) == pytest.approx(0.03)
    assert policy.hold_s(first, [q], 10.07, max_wait_s=0.05, max_size=32) == 0.0  # waited long enough
    assert policy.hold_s(first, [q], 10.02, max_wait_s=0.0, max_size=32) == 0.0  # max_wait_ms 0: never held


def test_a_batch_that_is_already_full_is_not_held():
    first = Req(10.0, seqs=2, queued_behind_batch=True)
    others = [Req(10.01, key="other", seqs=8), Req(10.02, seqs=2)]
    queues = [[first, *others]]
    assert policy.hold_s(first, queues, 10.02, max_wait_s=0.05, max_size=4) == 0.0  # 2 + 2 of its key fill 4
    assert policy.hold_s(first, queues, 10.02, max_wait_s=0.05, max_size=5) == pytest.approx(0.03)  # other key


# -- out of memory, retry-after -------------------------------------------------------------------


def test_out_of_memory_halves_the_limits_down_to_a_floor_and_the_cool_down_restores_them():
    scale = 1.0
    scales = []
    for _ in range(12):
        scale = policy.scale_after_oom(scale)
        scales.append(scale)
    assert scales[:3] == [0.5, 0.25, 0.125] and scales[-1] == policy.MIN_SCALE == 1 / 1024
    assert policy.scaled_limits(32, 32768, 0.5) == (16, 16384)
    assert policy.scaled_limits(32, 32768, policy.MIN_SCALE) == (1, 32)  # never below one
    assert policy.scale_at(0.5, until=100.0, now=99.9) == 0.5
    assert policy.scale_at(0.5, until=100.0, now=100.0) == 1.0
    assert policy.scale_at(1.0, until=0.0, now=100.0) == 1.0


def test_retry_after_counts_the_tokens_at_its_level_and_above():
    level_tokens = [8, 8, 100]
    assert policy.retry_after_s(level_tokens, 0, 4.0) == 2
    assert policy.retry_after_s(level_tokens, 1, 4.0) == 4
    assert policy.retry_after_s(level_tokens, 2, 4.0) == 29  # ceil(116 / 4)
    assert policy.retry_after_s(level_tokens, 2, 1000.0) == 1  # at least a second
    assert policy.retry_after_s(level_tokens, 2, 0.0) == 1  # drain rate unknown yet


def test_the_forwards_seconds_per_token_average_their_times_and_a_slow_one_raises_it_at_once():
    assert policy.seconds_per_token(0.0, 1000, 0.002) == pytest.approx(2e-6)  # the first forward sets it
    assert policy.seconds_per_token(2e-6, 1000, 0.001) == pytest.approx(0.2 * 1e-6 + 0.8 * 2e-6)
    assert policy.seconds_per_token(2e-6, 0, 0.5) == 2e-6  # no tokens: nothing learnt
    # a forward 1,000 times slower moves it 200-fold (an average of rates would barely move: 1.25x)
    assert policy.seconds_per_token(2e-6, 1000, 2.0) == pytest.approx(0.2 * 2e-3 + 0.8 * 2e-6)


def test_the_drain_rate_is_a_moving_average_of_the_batches():
    assert policy.drain_rate(0.0, 1000, 0.5) == 2000.0  # the first batch sets it
    assert policy.drain_rate(2000.0, 1000, 1.0) == pytest.approx(0.2 * 1000 + 0.8 * 2000)
    assert policy.drain_rate(2000.0, 1000, 0.0) == 2000.0  # a batch that measured no time changes nothing

"""The tables behind both plan caches (service.frontend.plans): the bound, the eviction order, the second-sighting
rule, and that a look-up is not a use."""

from __future__ import annotations

import pytest

from service.frontend.plans import Recent, Sightings


def test_recent_keeps_at_most_capacity_and_the_least_recently_used_goes():
    table: Recent[str, int] = Recent(3)
    for i, key in enumerate("abc"):
        table.put(key, i)
    assert table.keys() == ["a", "b", "c"] and len(table) == 3
    table.use("a")  # a served: b is now the least recently used
    table.put("d", 3)
    assert table.keys() == ["c", "a", "d"] and "b" not in table and table.get("b") is None
    table.put("c", 30)  # replaced: now the most recently used, with its new value, and nothing goes
    assert table.keys() == ["a", "d", "c"] and table.get("c") == 30
    for i in range(10):
        table.put(f"k{i}", i)
        assert len(table) == 3
    assert table.keys() == ["k7", "k8", "k9"]


def test_a_look_up_is_not_a_use():
    """The caches look a plan up, check that it fits, and only then count it used: a stale one keeps its place."""
    table: Recent[str, int] = Recent(2)
    table.put("a", 1)
    table.put("b", 2)
    assert table.get("a") == 1 and table.keys() == ["a", "b"]
    table.put("c", 3)
    assert table.keys() == ["b", "c"]


def test_pop_forgets_a_key_and_ignores_an_absent_one():
    table: Recent[str, int] = Recent(2)
    table.put("a", 1)
    table.pop("a")
    table.pop("never there")
    assert len(table) == 0 and "a" not in table


@pytest.mark.parametrize("capacity", [0, -1])
def test_a_table_of_no_capacity_holds_nothing(capacity):
    table: Recent[str, int] = Recent(capacity)
    table.put("a", 1)
    assert len(table) == 0
    seen: Sightings[str] = Sightings(capacity)
    assert [seen.second("a"), seen.second("a")] == [False, False]


def test_a_key_earns_its_plan_the_second_time_it_passes():
    seen: Sightings[bytes] = Sightings(4)
    assert seen.second(b"h1") is False and b"h1" in seen  # recorded
    assert seen.second(b"h1") is True and b"h1" not in seen  # the second time: the plan takes over
    assert seen.second(b"h1") is False  # (were the plan to go) recorded afresh, and earned again
    assert seen.second(b"h1") is True


def test_sightings_keep_the_latest_capacity_keys_the_oldest_goes_first():
    seen: Sightings[str] = Sightings(3)
    for key in ("a", "b", "c"):
        assert seen.second(key) is False
    assert seen.second("d") is False  # a goes: the oldest record
    assert seen.keys() == ["b", "c", "d"]
    assert seen.second("a") is False  # a passed once long ago: it starts again (and b goes)
    assert seen.keys() == ["c", "d", "a"]
    assert seen.second("c") is True and seen.keys() == ["d", "a"]
    for i in range(20):  # a client with a new request id each time: the record stays bounded
        assert seen.second(f"id-{i}") is False
        assert len(seen) <= 3
    assert seen.keys() == ["id-17", "id-18", "id-19"]

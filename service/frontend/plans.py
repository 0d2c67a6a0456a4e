"""The bounded tables behind the plans of repeated requests (decode.BodyPlans, v2.HeaderPlans).

Both remember what a request decided apart from its tensors, keyed by the bytes that decided it, under the
same rules: a key earns a plan the second time a request with it passes every check (``Sightings``), so a
bad request is refused with its own message every time, and a client that changes the key on every request
(a new request id each time) costs one insertion, not a plan per request; every table holds at most
``capacity`` keys, and past it the least recently used goes (``Recent``). Used from the event loop's thread
only.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Callable, Hashable
from typing import Generic, TypeVar

K = TypeVar("K", bound=Hashable)
V = TypeVar("V")


class Recent(Generic[K, V]):
    """At most ``capacity`` entries; past it the least recently used goes.

    ``get`` is not a use: the caller says ``use(key)`` once the entry has served, so that one found stale
    (made for another model, or failing a check) keeps its place. ``get`` and ``use`` are the OrderedDict's
    own methods, bound once, so that a hit costs no Python call of ours.
    """

    def __init__(self, capacity: int) -> None:
        self.capacity = capacity
        self._entries: OrderedDict[K, V] = OrderedDict()
        self.get: Callable[[K], V | None] = self._entries.get
        self.use: Callable[[K], None] = self._entries.move_to_end

    def __len__(self) -> int:
        return len(self._entries)

    def __contains__(self, key: K) -> bool:
        return key in self._entries

    def keys(self) -> list[K]:
        """The keys, the least recently used first."""
        return list(self._entries)

    def put(self, key: K, value: V) -> None:
        """``key`` -> ``value`` (added or replaced), now the most recently used; past ``capacity`` the least
        recently used goes."""
        entries = self._entries
        entries[key] = value
        entries.move_to_end(key)
        if len(entries) > self.capacity:
            entries.popitem(last=False)

    def pop(self, key: K) -> None:
        """Forget ``key``, if held."""
        self._entries.pop(key, None)


class Sightings(Recent[K, None]):
    """The keys of requests that passed once, the latest ``capacity``: ``second(key)`` says when one has
    earned its plan."""

    def second(self, key: K) -> bool:
        """Record that a request with ``key`` passed every check: True the second time (the key then leaves
        the record: its plan takes over), False the first (the key joins the record, and past ``capacity`` the
        oldest record goes)."""
        entries = self._entries
        if key in entries:
            del entries[key]
            return True
        self.put(key, None)
        return False

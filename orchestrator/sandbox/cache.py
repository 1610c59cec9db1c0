"""A small thread-safe LRU cache bounded by the total weight of its values."""

from __future__ import annotations

import threading
from collections import OrderedDict
from collections.abc import Callable, Hashable
from typing import Generic, TypeVar

V = TypeVar("V")


class Lru(Generic[V]):
    """Keep the most recently used values whose weights sum to at most `capacity`.

    A value heavier than the whole capacity is not kept at all.
    """

    def __init__(self, capacity: int, weigh: Callable[[V], int]) -> None:
        self._capacity = capacity
        self._weigh = weigh
        self._entries: OrderedDict[Hashable, tuple[V, int]] = OrderedDict()
        self._weight = 0
        self._lock = threading.Lock()

    def __len__(self) -> int:
        return len(self._entries)

    @property
    def weight(self) -> int:
        """The summed weight of the cached values."""
        return self._weight

    def get(self, key: Hashable) -> V | None:
        """Return the cached value for `key` and mark it recently used."""
        with self._lock:
            entry = self._entries.get(key)
            if entry is None:
                return None

            self._entries.move_to_end(key)
            return entry[0]

    def put(self, key: Hashable, value: V) -> None:
        """Cache `value`, dropping the least recently used values to make room."""
        weight = self._weigh(value)
        if weight > self._capacity:
            return

        with self._lock:
            old = self._entries.pop(key, None)
            if old is not None:
                self._weight -= old[1]

            self._entries[key] = (value, weight)
            self._weight += weight
            while self._weight > self._capacity:
                _, (_, dropped) = self._entries.popitem(last=False)
                self._weight -= dropped

    def clear(self) -> None:
        """Forget every cached value."""
        with self._lock:
            self._entries.clear()
            self._weight = 0

"""One small thread-safe LRU, bounded by item count and by a total weight: every in-memory cache uses it.

A cache belongs to the object whose data it caches (the store's manifests and loads, the operations' diffs), so
two stores in one process never share entries and a test's store starts cold.
"""

from __future__ import annotations

import threading
from collections import OrderedDict
from collections.abc import Callable, Hashable
from typing import Generic, TypeVar

K = TypeVar("K", bound=Hashable)
V = TypeVar("V")


class LRUCache(Generic[K, V]):
    """Least recently used entries go first once there are more than `max_items` or they weigh more than
    `max_weight` in total (the weight of a value is `weigh(value)`, 1 by default). The most recent entry is
    always kept, however heavy. Safe to share between threads."""

    def __init__(
        self,
        *,
        max_items: int | None = None,
        max_weight: int | None = None,
        weigh: Callable[[V], int] | None = None,
    ) -> None:
        """Create an empty cache.

        Args:
            max_items: At most this many entries; None: no bound on the count.
            max_weight: At most this total weight; None: no bound on the weight.
            weigh: The weight of a value (e.g. its tensor count or byte size); None: each weighs 1.
        """
        self.max_items = max_items
        self.max_weight = max_weight
        self._weigh: Callable[[V], int] = weigh if weigh is not None else (lambda _v: 1)
        self._items: OrderedDict[K, tuple[V, int]] = OrderedDict()
        self._weight = 0
        self._lock = threading.Lock()

    def get(self, key: K) -> V | None:
        """The cached value (now the most recent), or None."""
        with self._lock:
            hit = self._items.get(key)
            if hit is None:
                return None
            self._items.move_to_end(key)
            return hit[0]

    def put(self, key: K, value: V) -> None:
        """Cache a value, evicting the least recently used entries past the bounds."""
        weight = self._weigh(value)
        with self._lock:
            old = self._items.pop(key, None)
            if old is not None:
                self._weight -= old[1]
            self._items[key] = (value, weight)
            self._weight += weight
            while len(self._items) > 1 and self._over():
                _, (_, dropped) = self._items.popitem(last=False)
                self._weight -= dropped

    def discard(self, key: K) -> None:
        """Drop one entry if cached."""
        with self._lock:
            old = self._items.pop(key, None)
            if old is not None:
                self._weight -= old[1]

    def discard_where(self, predicate: Callable[[K], bool]) -> None:
        """Drop every entry whose key matches."""
        with self._lock:
            for key in [k for k in self._items if predicate(k)]:
                self._weight -= self._items.pop(key)[1]

    def clear(self) -> None:
        """Drop everything."""
        with self._lock:
            self._items.clear()
            self._weight = 0

    def __len__(self) -> int:
        return len(self._items)

    @property
    def weight(self) -> int:
        """The total weight of the cached values."""
        return self._weight

    def _over(self) -> bool:
        return (self.max_items is not None and len(self._items) > self.max_items) or (
            self.max_weight is not None and self._weight > self.max_weight
        )

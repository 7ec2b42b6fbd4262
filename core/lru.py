"""The pack's one LRU: bounded in bytes (by a ``sizeof`` of each value) and/or in entries, thread-safe.

Four caches use it: the digest memo and the memory tier of the embedding cache, the prefix-KV cache and the
server backend's memo of encoded uploads. Ours rather than ``cachetools.LRUCache`` (which takes a ``getsizeof``
too): every one of these is read and written from several threads (ComfyUI's worker, the server backend's
request threads), which cachetools leaves to the caller, and each wants the same three things cachetools has no
place for: refuse a value larger than the whole budget instead of raising, count evictions, and report bytes.
"""

from __future__ import annotations

import threading
from collections import OrderedDict
from collections.abc import Callable, Hashable
from typing import Generic, TypeVar

V = TypeVar("V")


class LRU(Generic[V]):
    """Least recently used first out, when the values' ``sizeof`` sum passes ``max_bytes`` or their count passes
    ``max_entries`` (None: that bound is off)."""

    def __init__(self, max_bytes: int | None = None, max_entries: int | None = None,
                 sizeof: Callable[[V], int] | None = None) -> None:
        if max_bytes is not None and sizeof is None:
            raise ValueError("an LRU bounded in bytes needs sizeof")
        self.max_bytes = None if max_bytes is None else int(max_bytes)
        self.max_entries = None if max_entries is None else max(1, int(max_entries))
        self._sizeof = sizeof
        self._items: OrderedDict[Hashable, V] = OrderedDict()
        self._sizes: dict[Hashable, int] = {}
        self.nbytes = 0
        self.evictions = 0
        self._lock = threading.Lock()

    def get(self, key: Hashable) -> V | None:
        with self._lock:
            value = self._items.get(key)
            if value is not None:
                self._items.move_to_end(key)
            return value

    def put(self, key: Hashable, value: V) -> bool:
        """Keep ``value`` as the most recent; False (nothing kept, nothing evicted) if it alone is over the budget."""
        size = self._sizeof(value) if self._sizeof is not None else 0
        if self.max_bytes is not None and size > self.max_bytes:
            return False
        with self._lock:
            self._drop(key)
            self._items[key] = value
            self._sizes[key] = size
            self.nbytes += size
            while self._items and self._over():
                oldest = next(iter(self._items))
                self._drop(oldest)
                self.evictions += 1
            return True

    def pop(self, key: Hashable) -> V | None:
        with self._lock:
            return self._drop(key)

    def clear(self) -> None:
        with self._lock:
            self._items.clear()
            self._sizes.clear()
            self.nbytes = 0

    def __len__(self) -> int:
        return len(self._items)

    def __contains__(self, key: Hashable) -> bool:
        return key in self._items

    def _drop(self, key: Hashable) -> V | None:
        value = self._items.pop(key, None)
        if value is not None:
            self.nbytes -= self._sizes.pop(key)
        return value

    def _over(self) -> bool:
        return ((self.max_bytes is not None and self.nbytes > self.max_bytes)
                or (self.max_entries is not None and len(self._items) > self.max_entries))


class ByteBudgetCache(Generic[V]):
    """A cache over one byte-bounded LRU: what the embedding cache's memory tier and the prefix-KV cache share
    (the budget, which a caller may change between runs, the bytes held, evictions, size, clear)."""

    def __init__(self, max_bytes: int, sizeof: Callable[[V], int]) -> None:
        self._lru: LRU[V] = LRU(max_bytes=int(max_bytes), sizeof=sizeof)

    @property
    def max_bytes(self) -> int:
        return int(self._lru.max_bytes or 0)

    @max_bytes.setter
    def max_bytes(self, value: int) -> None:  # a new budget binds from the next put on
        self._lru.max_bytes = int(value)

    @property
    def nbytes(self) -> int:
        return self._lru.nbytes

    @property
    def evictions(self) -> int:
        return self._lru.evictions

    def clear(self) -> None:
        self._lru.clear()

    def __len__(self) -> int:
        return len(self._lru)

    def __contains__(self, key: Hashable) -> bool:
        return key in self._lru

"""In-memory LRU tier within a byte budget."""

from __future__ import annotations

import threading
from collections import OrderedDict
from collections.abc import Iterator

from cacheblend.store.base import ChunkKV, KVStore, StoreStats


class MemoryStore(KVStore):
    """LRU map of ``ChunkKV`` within ``max_bytes``; an entry larger than the budget is not kept."""

    name = "memory"

    def __init__(self, max_bytes: int = 4 << 30) -> None:
        self.max_bytes = max_bytes
        self._entries: OrderedDict[str, ChunkKV] = OrderedDict()
        self._bytes = 0
        self._stats = StoreStats(self.name)
        self._lock = threading.Lock()

    def get(self, key: str) -> ChunkKV | None:
        with self._lock:
            kv = self._entries.get(key)
            if kv is None:
                self._stats.misses += 1
                return None
            self._entries.move_to_end(key)
            self._stats.hits += 1
            return kv

    def put(self, key: str, kv: ChunkKV) -> None:
        if kv.nbytes > self.max_bytes:
            return
        with self._lock:
            old = self._entries.pop(key, None)
            if old is not None:
                self._bytes -= old.nbytes
            while self._entries and self._bytes + kv.nbytes > self.max_bytes:
                _, evicted = self._entries.popitem(last=False)
                self._bytes -= evicted.nbytes
            self._entries[key] = kv
            self._bytes += kv.nbytes

    def delete(self, key: str) -> bool:
        with self._lock:
            kv = self._entries.pop(key, None)
            if kv is not None:
                self._bytes -= kv.nbytes
            return kv is not None

    def keys(self) -> Iterator[str]:
        with self._lock:
            return iter(list(self._entries))

    def stats(self) -> StoreStats:
        with self._lock:
            self._stats.entries = len(self._entries)
            self._stats.bytes = self._bytes
            return StoreStats(**vars(self._stats))

"""Tiers stacked fastest first: lookup top-down, promote a hit upwards, write through to all."""

from __future__ import annotations

import threading
from collections.abc import Iterator, Sequence

from cacheblend.store.base import ChunkKV, KVStore, StoreStats
from cacheblend.store.blob import BlobStore
from cacheblend.store.codec import encode


class TieredStore(KVStore):
    """``tiers[0]`` is asked first (e.g. memory, then disk, then Redis). A hit in tier i is
    copied into tiers 0..i-1; ``put`` writes to every tier. Tiers that hold encoded bytes with
    the same codec share one encoding (promotions from such a tier reuse its verified bytes).
    """

    name = "tiered"

    def __init__(self, tiers: Sequence[KVStore]) -> None:
        if not tiers:
            raise ValueError("TieredStore needs at least one tier")
        self.tiers = list(tiers)
        self._stats = StoreStats(self.name)
        self._lock = threading.Lock()

    def get(self, key: str) -> ChunkKV | None:
        for depth, tier in enumerate(self.tiers):
            if isinstance(tier, BlobStore):
                found = tier.lookup(key)
                kv, blob = found if found is not None else (None, None)
            else:
                kv, blob = tier.get(key), None
            if kv is None:
                continue
            encoded = {tier.codec: blob} if isinstance(tier, BlobStore) else {}
            self._write(self.tiers[:depth], key, kv, encoded)
            with self._lock:
                self._stats.hits += 1
            return kv
        with self._lock:
            self._stats.misses += 1
        return None

    def put(self, key: str, kv: ChunkKV) -> None:
        self._write(self.tiers, key, kv, {})

    @staticmethod
    def _write(tiers: list[KVStore], key: str, kv: ChunkKV, encoded: dict[str, bytes]) -> None:
        """Put ``kv`` into ``tiers``, encoding at most once per codec."""
        for tier in tiers:
            if isinstance(tier, BlobStore):
                if tier.codec not in encoded:
                    encoded[tier.codec] = encode(kv, tier.codec)
                tier.put_blob(key, encoded[tier.codec])
            else:
                tier.put(key, kv)

    def delete(self, key: str) -> bool:
        deleted = [tier.delete(key) for tier in self.tiers]  # every tier, no short circuit
        return any(deleted)

    def keys(self) -> Iterator[str]:
        """Keys in any tier, each once, upper tiers first."""
        seen: dict[str, None] = {}
        for tier in self.tiers:
            seen.update(dict.fromkeys(tier.keys()))
        return iter(list(seen))

    def clear(self) -> None:
        for tier in self.tiers:
            tier.clear()

    def tier_stats(self) -> list[StoreStats]:
        """Each tier's own counters, top first."""
        return [tier.stats() for tier in self.tiers]

    def stats(self) -> StoreStats:
        """Hits/misses of the stack as a whole; entries/bytes of the largest tier (tiers hold
        copies); errors summed over tiers."""
        per_tier = self.tier_stats()
        with self._lock:
            stats = StoreStats(**vars(self._stats))
        stats.entries = max(s.entries for s in per_tier)
        stats.bytes = max(s.bytes for s in per_tier)
        stats.errors = sum(s.errors for s in per_tier)
        return stats

    def close(self) -> None:
        for tier in self.tiers:
            tier.close()

"""What ``cacheblend store stats|clear|verify --store URL`` does, as plain functions."""

from __future__ import annotations

import logging

from cacheblend.store.base import KVStore, StoreStats
from cacheblend.store.blob import BlobStore
from cacheblend.store.codec import CorruptEntryError, EncodedChunkKV
from cacheblend.store.tiered import TieredStore

log = logging.getLogger(__name__)


def _tiers(store: KVStore) -> list[KVStore]:
    return list(store.tiers) if isinstance(store, TieredStore) else [store]


def _stats_dict(stats: StoreStats) -> dict:
    return {
        "name": stats.name,
        "entries": stats.entries,
        "bytes": stats.bytes,
        "hits": stats.hits,
        "misses": stats.misses,
        "hit_rate": round(stats.hit_rate, 4),
        "errors": stats.errors,
    }


def store_stats(store: KVStore) -> dict:
    """{"store": totals, "tiers": [per tier]}: entries, bytes, hits, misses, hit_rate, errors."""
    return {
        "store": _stats_dict(store.stats()),
        "tiers": [_stats_dict(tier.stats()) for tier in _tiers(store)],
    }


def store_clear(store: KVStore) -> int:
    """Delete every entry of every tier; returns how many entries were removed (summed over
    tiers, so an entry held by two tiers counts twice)."""
    removed = 0
    for tier in _tiers(store):
        removed += len(list(tier.keys()))
        tier.clear()
    return removed


def _verify_tier(tier: KVStore, model_fingerprint: str | None) -> dict:
    counts = {"name": tier.name, "checked": 0, "ok": 0, "corrupt": 0, "vanished": 0}
    if not isinstance(tier, BlobStore):  # in-process objects: nothing can tear them
        entries = len(list(tier.keys()))
        counts.update(checked=entries, ok=entries)
        return counts
    for key in list(tier.keys()):
        counts["checked"] += 1
        try:
            blob = tier.get_blob(key)  # no hit/miss counted, recency untouched
            if blob is None:
                counts["vanished"] += 1  # evicted or deleted since the listing
                continue
            EncodedChunkKV(blob, model_fingerprint).verify()
        except CorruptEntryError as exc:
            log.warning("%s store: dropping corrupt entry %s (%s)", tier.name, key, exc)
            tier.drop_corrupt(key, exc)
            counts["corrupt"] += 1
            continue
        counts["ok"] += 1
    return counts


def store_verify(store: KVStore, model_fingerprint: str | None = None) -> dict:
    """Check every entry's header, shapes and checksums (and model, if given); drop corrupt
    ones. Returns {"checked", "ok", "corrupt", "vanished", "tiers": [per tier counts]}."""
    tiers = [_verify_tier(tier, model_fingerprint) for tier in _tiers(store)]
    totals = {
        name: sum(t[name] for t in tiers) for name in ("checked", "ok", "corrupt", "vanished")
    }
    return {**totals, "tiers": tiers}

"""What ``cacheblend store stats|clear|verify --store URL`` does, as plain functions; and the
checks that turn a store that cannot be reached or written into an error (where the user asked
for a write) or a stated degradation (``store_problems``: the server's /health, its startup).

A tier's ``get``/``put`` never raise for a backend failure (a miss costs a recompute), so these
functions ask the tiers directly: Redis answers a ping, a disk directory takes a probe file, a
written key is in every tier.
"""

from __future__ import annotations

import logging
import os
import uuid
from urllib.parse import urlsplit, urlunsplit

from cacheblend.errors import CacheBlendError
from cacheblend.store.base import KVStore, StoreStats
from cacheblend.store.blob import BlobStore
from cacheblend.store.codec import CorruptEntryError, EncodedChunkKV
from cacheblend.store.disk import DiskStore
from cacheblend.store.tiered import TieredStore

log = logging.getLogger(__name__)


class StoreUnavailableError(CacheBlendError):
    """The store cannot be reached, or cannot be written where a write was asked for."""


def _tiers(store: KVStore) -> list[KVStore]:
    return list(store.tiers) if isinstance(store, TieredStore) else [store]


def redact(url: str) -> str:
    """A store URL without passwords, for logs and messages."""
    parts = []
    for part in url.split(","):
        split = urlsplit(part)
        if split.password:
            netloc = f"***@{split.hostname}" + (f":{split.port}" if split.port else "")
            part = urlunsplit(split._replace(netloc=netloc))
        parts.append(part)
    return ",".join(parts)


def _disk_problem(tier: DiskStore) -> str | None:
    probe = tier.root / f".probe-{os.getpid()}-{uuid.uuid4().hex[:8]}"
    try:
        tier.root.mkdir(parents=True, exist_ok=True)
        probe.write_bytes(b"")
        probe.unlink()
    except OSError as exc:
        return f"disk store {tier.root} is not writable ({exc.strerror or exc})"
    return None


def tier_problem(tier: KVStore, write: bool = True) -> str | None:
    """Why ``tier`` cannot be used now, or None: a Redis server that does not answer, and
    (``write``) a disk directory that takes no file."""
    ping = getattr(tier, "ping", None)
    if callable(ping) and not ping():
        url = redact(str(getattr(tier, "url", tier.name)))
        return f"redis store {url} is unreachable (nothing answers there)"
    if write and isinstance(tier, DiskStore):
        return _disk_problem(tier)
    return None


def store_problems(store: KVStore, write: bool = True) -> list[str]:
    """One line per tier that cannot be used now (``tier_problem``); empty when all are fine."""
    return [p for p in (tier_problem(tier, write) for tier in _tiers(store)) if p]


def check_store(store: KVStore, write: bool = True) -> None:
    """Raise StoreUnavailableError naming every tier that cannot be used (see
    ``store_problems``)."""
    problems = store_problems(store, write)
    if problems:
        raise StoreUnavailableError("; ".join(problems))


def missing_tiers(store: KVStore, key: str) -> list[str]:
    """Names of the tiers that do not hold ``key`` (after a put: the writes that failed)."""
    missing = []
    for tier in _tiers(store):
        if isinstance(tier, BlobStore):
            try:
                found = tier.get_blob(key) is not None
            except CorruptEntryError:
                found = False
        else:
            found = key in set(tier.keys())
        if not found:
            missing.append(tier.name)
    return missing


def held_everywhere(store: KVStore, keys: list[str]) -> list[bool]:
    """For each key: is it in every tier now (each tier listed once, not probed per key)."""
    held = [True] * len(keys)
    for tier in _tiers(store):
        present = set(tier.keys())
        held = [h and key in present for h, key in zip(held, keys)]
    return held


def check_written(store: KVStore, keys: list[str]) -> None:
    """Raise StoreUnavailableError unless every tier holds every key: a write the user asked
    for did not happen (the store logs why; ``store_problems`` says it in one line)."""
    for key in keys:
        missing = missing_tiers(store, key)
        if missing:
            reasons = store_problems(store) or [
                f"the {', '.join(missing)} tier did not keep the entry (full, or evicted at once)"
            ]
            raise StoreUnavailableError(
                f"nothing was stored in the {', '.join(missing)} tier: " + "; ".join(reasons)
            )


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
    """{"store": totals, "tiers": [per tier]}: entries, bytes, hits, misses, hit_rate, errors.
    Raises StoreUnavailableError when a tier cannot be reached (its counts would be zeros)."""
    check_store(store, write=False)
    return {
        "store": _stats_dict(store.stats()),
        "tiers": [_stats_dict(tier.stats()) for tier in _tiers(store)],
    }


def store_clear(store: KVStore) -> int:
    """Delete every entry of every tier; returns how many entries were really removed (summed
    over tiers, so an entry held by two tiers counts twice). Raises StoreUnavailableError when
    a tier cannot be reached or some entries are still there afterwards."""
    check_store(store, write=False)
    removed, failures = 0, []
    for tier in _tiers(store):
        keys = list(tier.keys())
        removed += sum(bool(tier.delete(key)) for key in keys)
        tier.clear()  # what a listing does not show (e.g. a Redis entry's orphaned parts)
        left = len(list(tier.keys()))
        if left:
            failures.append(f"{left} of {len(keys)} {tier.name} entries could not be deleted")
    if failures:
        reasons = store_problems(store)
        raise StoreUnavailableError(
            f"deleted {removed} entries, but " + "; ".join(failures)
            + (f" ({'; '.join(reasons)})" if reasons else "")
        )
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
    ones. Returns {"checked", "ok", "corrupt", "vanished", "tiers": [per tier counts]}.
    Raises StoreUnavailableError when a tier cannot be reached (nothing could be checked)."""
    check_store(store, write=False)
    tiers = [_verify_tier(tier, model_fingerprint) for tier in _tiers(store)]
    totals = {
        name: sum(t[name] for t in tiers) for name in ("checked", "ok", "corrupt", "vanished")
    }
    return {**totals, "tiers": tiers}

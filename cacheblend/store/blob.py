"""``BlobStore``: the shared half of every tier that keeps entries as encoded bytes (disk, Redis).

Subclasses only move bytes (``_read`` / ``_write`` / ``delete`` / ``keys`` / ``_usage``); this
class encodes with the tier's codec, decodes and verifies on ``get``, turns a corrupt, torn or
foreign entry into a miss (dropping it and counting an error), and keeps the counters.
"""

from __future__ import annotations

import logging
import threading
from abc import abstractmethod

from cacheblend.store.base import ChunkKV, KVStore, StoreStats
from cacheblend.store.codec import CODECS, DEFAULT_CODEC, CorruptEntryError, decode, encode

log = logging.getLogger(__name__)


class BlobStore(KVStore):
    """A tier of encoded entries. ``codec`` is used by ``put``; ``model_fingerprint``, when set,
    makes entries of any other model a miss (dropped as foreign)."""

    def __init__(self, codec: str = DEFAULT_CODEC, model_fingerprint: str | None = None) -> None:
        if codec not in CODECS:
            raise ValueError(f"unknown KV codec {codec!r}; supported: {', '.join(CODECS)}")
        self.codec = codec
        self.model_fingerprint = model_fingerprint
        self._stats = StoreStats(self.name)
        self._stats_lock = threading.Lock()
        self._warned: set[str] = set()

    # -- what a subclass implements -------------------------------------------------------------

    @abstractmethod
    def _read(self, key: str, touch: bool = True) -> bytes | None:
        """The stored bytes, or None if absent or the backend failed (the subclass logs and
        counts a backend failure). May raise ``CorruptEntryError`` for a torn container.
        ``touch`` marks the entry as recently used."""

    @abstractmethod
    def _write(self, key: str, blob: bytes) -> None:
        """Store ``blob`` atomically; never raises for a backend failure (log and count)."""

    @abstractmethod
    def _usage(self) -> tuple[int, int]:
        """(entries, bytes) currently stored, as the backend sees them."""

    # -- the KVStore interface -----------------------------------------------------------------

    def get(self, key: str) -> ChunkKV | None:
        found = self.lookup(key)
        return found[0] if found is not None else None

    def lookup(self, key: str) -> tuple[ChunkKV, bytes] | None:
        """``get`` that also returns the verified encoded bytes (``TieredStore`` promotes them
        to other tiers of the same codec without re-encoding)."""
        try:
            blob = self._read(key)
            kv = decode(blob, self.model_fingerprint) if blob is not None else None
        except CorruptEntryError as exc:
            self.drop_corrupt(key, exc)
            blob = kv = None
        with self._stats_lock:
            if kv is None:
                self._stats.misses += 1
                return None
            self._stats.hits += 1
        return kv, blob

    def put(self, key: str, kv: ChunkKV) -> None:
        self.put_blob(key, encode(kv, self.codec))

    def get_blob(self, key: str) -> bytes | None:
        """The raw stored bytes, unverified (no hit/miss counted, recency untouched); None if
        absent. Raises ``CorruptEntryError`` for a torn container (a Redis entry missing parts).
        """
        return self._read(key, touch=False)

    def put_blob(self, key: str, blob: bytes) -> None:
        """Store an already encoded entry (must be ``encode(kv, self.codec)`` output)."""
        self._write(key, blob)

    def stats(self) -> StoreStats:
        entries, nbytes = self._usage()
        with self._stats_lock:
            self._stats.entries, self._stats.bytes = entries, nbytes
            return StoreStats(**vars(self._stats))

    # -- shared bookkeeping --------------------------------------------------------------------

    def drop_corrupt(self, key: str, exc: CorruptEntryError) -> None:
        """Delete an unusable entry so the next put rewrites it; warn once per store."""
        self.count_error()
        self.warn_once("corrupt", "%s store: dropping unusable entry %s (%s)", self.name, key, exc)
        self.delete(key)

    def count_error(self) -> None:
        with self._stats_lock:
            self._stats.errors += 1

    def warn_once(self, kind: str, message: str, *args: object) -> None:
        """Log a warning the first time ``kind`` happens in this store, at debug level after."""
        level = logging.DEBUG if kind in self._warned else logging.WARNING
        self._warned.add(kind)
        log.log(level, message, *args)

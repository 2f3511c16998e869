"""Shared tier on a Redis or Valkey server, for several serving processes or machines.

An entry is a small JSON manifest at ``<prefix>m:<key>`` naming a version id, and the encoded
bytes split in parts at ``<prefix>p:<key>:<version>:<i>`` (``chunk_bytes`` each). Parts and
manifest are written in one MULTI/EXEC, the manifest last and only if absent (entries are
immutable): a reader finds either no manifest or one whose parts are all there; parts of a lost
race are deleted. Reads fetch the manifest, then every part in one pipeline, and the codec
verifies the checksums.

Failures never reach the caller: a down, slow or restarted server makes ``get`` a miss and
``put`` a no-op, counts an error and logs one warning per outage; for ``retry_after`` seconds
after a failure the store does not call the server at all (no per-request timeouts while it is
down), then redis-py reconnects on the next call.
"""

from __future__ import annotations

import json
import logging
import time
import uuid
from collections.abc import Iterator

import redis
from redis.backoff import NoBackoff
from redis.retry import Retry

from cacheblend.store.blob import BlobStore
from cacheblend.store.codec import DEFAULT_CODEC, CorruptEntryError

log = logging.getLogger(__name__)

_OUTAGE_ERRORS = (redis.ConnectionError, redis.TimeoutError)


def _escape_glob(text: str) -> str:
    """``text`` as a literal in a SCAN MATCH pattern."""
    return "".join("\\" + c if c in "*?[]\\" else c for c in text)


class RedisStore(BlobStore):
    """Entries on the server at ``url`` (``redis://host:port/db``), under ``prefix``."""

    name = "redis"

    def __init__(
        self,
        url: str = "redis://127.0.0.1:6379/0",
        prefix: str = "cacheblend:",
        ttl: float | None = None,
        chunk_bytes: int = 8 << 20,
        codec: str = DEFAULT_CODEC,
        model_fingerprint: str | None = None,
        socket_timeout: float = 1.0,
        retry_after: float = 1.0,
        health_check_interval: int = 15,
    ) -> None:
        super().__init__(codec, model_fingerprint)
        if chunk_bytes <= 0:
            raise ValueError(f"chunk_bytes must be positive, got {chunk_bytes}")
        self.url = url
        self.prefix = prefix
        self.ttl = ttl
        self.chunk_bytes = chunk_bytes
        self.retry_after = retry_after
        self._client = redis.Redis.from_url(
            url,
            socket_timeout=socket_timeout,
            socket_connect_timeout=socket_timeout,
            health_check_interval=health_check_interval,
            retry=Retry(NoBackoff(), retries=1),  # one reconnect: a restarted server's dead socket
        )
        self._down_until = 0.0  # monotonic time before which the server is not called
        self._down = False

    # -- key names -----------------------------------------------------------------------------

    def _manifest_key(self, key: str) -> str:
        return f"{self.prefix}m:{key}"

    def _part_key(self, key: str, version: str, index: int) -> str:
        return f"{self.prefix}p:{key}:{version}:{index}"

    def _expiry(self, grace: float = 0.0) -> int | None:
        # Parts outlive their manifest by a grace period, so a found manifest has all its parts.
        return None if self.ttl is None else max(1, round(self.ttl + grace))

    # -- outage handling -----------------------------------------------------------------------

    def _available(self) -> bool:
        return time.monotonic() >= self._down_until

    def _succeeded(self) -> None:
        if self._down:
            self._down = False
            log.info("redis store %s: server reachable again", self.url)

    def _failed(self, op: str, exc: Exception) -> None:
        """Count the failure; warn once per outage (connection) or once per kind (other)."""
        self.count_error()
        if isinstance(exc, _OUTAGE_ERRORS):
            self._down_until = time.monotonic() + self.retry_after
            if not self._down:
                self._down = True
                log.warning(
                    "redis store %s unavailable (%s during %s); serving misses, retrying every"
                    " %.1fs",
                    self.url,
                    exc,
                    op,
                    self.retry_after,
                )
        else:
            self.warn_once(f"redis-{op}", "redis store %s: %s failed: %s", self.url, op, exc)

    # -- BlobStore -----------------------------------------------------------------------------

    def _parse_manifest(self, raw: bytes) -> tuple[str, int, int]:
        try:
            manifest = json.loads(raw)
            version, parts, size = manifest["version"], manifest["parts"], manifest["size"]
        except (ValueError, KeyError, TypeError) as exc:
            raise CorruptEntryError(f"bad manifest: {exc}") from exc
        if not (isinstance(version, str) and isinstance(parts, int) and isinstance(size, int)):
            raise CorruptEntryError("bad manifest field types")
        if parts < 1 or size < 0:
            raise CorruptEntryError("bad manifest sizes")
        return version, parts, size

    def _read(self, key: str, touch: bool = True) -> bytes | None:
        if not self._available():
            return None
        try:
            raw = self._client.get(self._manifest_key(key))
            if raw is None:
                self._succeeded()
                return None
            version, num_parts, size = self._parse_manifest(raw)
            pipe = self._client.pipeline(transaction=False)
            for index in range(num_parts):
                pipe.get(self._part_key(key, version, index))
            parts = pipe.execute()
            if any(part is None for part in parts):
                # Deleted or evicted under us: corrupt only if the manifest still names them.
                if self._client.get(self._manifest_key(key)) != raw:
                    return None
                raise CorruptEntryError("missing parts")
        except redis.RedisError as exc:
            self._failed("get", exc)
            return None
        self._succeeded()
        blob = parts[0] if num_parts == 1 else b"".join(parts)
        if len(blob) != size:
            raise CorruptEntryError(f"entry has {len(blob)} bytes, manifest says {size}")
        return blob

    def _write(self, key: str, blob: bytes) -> None:
        if not self._available():
            return
        manifest_key = self._manifest_key(key)
        version = uuid.uuid4().hex[:16]
        view = memoryview(blob)
        part_keys = []
        try:
            if self._client.exists(manifest_key):
                self._succeeded()
                return  # entries are immutable
            pipe = self._client.pipeline(transaction=True)  # MULTI/EXEC: all or nothing
            for index, start in enumerate(range(0, max(len(blob), 1), self.chunk_bytes)):
                part_keys.append(self._part_key(key, version, index))
                part = view[start : start + self.chunk_bytes]
                pipe.set(part_keys[-1], part, ex=self._expiry(grace=60))
            manifest = json.dumps({"version": version, "parts": len(part_keys), "size": len(blob)})
            pipe.set(manifest_key, manifest, ex=self._expiry(), nx=True)
            *_, manifest_set = pipe.execute()
            if not manifest_set:  # another writer won: our parts are unreferenced
                self._client.delete(*part_keys)
        except redis.RedisError as exc:
            self._failed("put", exc)
            return
        self._succeeded()

    def _usage(self) -> tuple[int, int]:
        entries, nbytes = 0, 0
        try:
            names = list(self._scan_manifests())
            for start in range(0, len(names), 512):
                for raw in self._client.mget(names[start : start + 512]):
                    if raw is None:
                        continue
                    try:
                        nbytes += self._parse_manifest(raw)[2]
                    except CorruptEntryError:
                        continue
                    entries += 1
        except redis.RedisError as exc:
            self._failed("stats", exc)
        return entries, nbytes

    def _scan_manifests(self) -> Iterator[bytes]:
        pattern = _escape_glob(self.prefix) + "m:*"
        return self._client.scan_iter(match=pattern, count=1000)

    # -- KVStore -------------------------------------------------------------------------------

    def delete(self, key: str) -> bool:
        manifest_key = self._manifest_key(key)
        try:
            raw = self._client.get(manifest_key)
            if raw is None:
                return False
            doomed = [manifest_key]
            try:
                version, num_parts, _ = self._parse_manifest(raw)
                doomed += [self._part_key(key, version, i) for i in range(num_parts)]
            except CorruptEntryError:
                pass  # a bad manifest: its parts (if any) are unreachable; TTL or clear ends them
            return self._client.delete(*doomed) > 0
        except redis.RedisError as exc:
            self._failed("delete", exc)
            return False

    def keys(self) -> Iterator[str]:
        start = len(self.prefix) + len("m:")
        try:
            return iter([name.decode()[start:] for name in self._scan_manifests()])
        except redis.RedisError as exc:
            self._failed("keys", exc)
            return iter([])

    def clear(self) -> None:
        """Delete every manifest and part under ``prefix`` (orphaned parts too)."""
        try:
            pattern = _escape_glob(self.prefix) + "*"
            batch = []
            for name in self._client.scan_iter(match=pattern, count=1000):
                batch.append(name)
                if len(batch) >= 512:
                    self._client.delete(*batch)
                    batch.clear()
            if batch:
                self._client.delete(*batch)
        except redis.RedisError as exc:
            self._failed("clear", exc)

    def ping(self) -> bool:
        """True if the server answers now."""
        try:
            return bool(self._client.ping())
        except redis.RedisError:
            return False

    def close(self) -> None:
        self._client.close()

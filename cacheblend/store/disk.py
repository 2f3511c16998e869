"""Local-disk tier: one file per entry, LRU by access time within a byte budget.

Layout: ``<root>/<key[:2]>/<key>.kv``, each file an encoded entry (see ``codec``). Safe with
several processes sharing ``root``:

- a writer writes ``.tmp-*`` in the target's directory and ``os.replace``-s it into place, so a
  reader opens either the whole old file or the whole new one, never a torn one;
- the directory is the index (no in-process copy to go stale): entries left by earlier runs
  are found, and file mtimes carry the LRU order across restarts;
- writers serialize on an ``flock`` of ``<root>/.lock``; under it they re-scan the directory,
  evict the least recently used entries until the new one fits, then write, so the budget holds
  across processes (temp files count, and any temp file seen under the lock is a crashed
  writer's: it is removed);
- a read hit sets the file's mtime to now: that is the LRU clock every process sees (atime is
  unreliable under relatime/noatime); a file another process deleted is just a miss.

A full disk or read-only directory makes ``put`` log one warning and return; ``get`` still works.
"""

from __future__ import annotations

import fcntl
import logging
import os
import re
import threading
import time
import uuid
from collections.abc import Iterator
from contextlib import contextmanager, suppress
from dataclasses import dataclass
from pathlib import Path

from cacheblend.store.blob import BlobStore
from cacheblend.store.codec import DEFAULT_CODEC

log = logging.getLogger(__name__)

SUFFIX = ".kv"
TEMP_PREFIX = ".tmp-"
LOCK_NAME = ".lock"
_KEY_RE = re.compile(r"^[0-9A-Za-z_-]{2,200}$")


def _touch(path: Path) -> None:
    """Set mtime (the LRU clock) to now, at full resolution: the kernel's own "now" is
    jiffy-coarse, which would tie entries written or read within a few milliseconds."""
    now = time.time_ns()
    os.utime(path, ns=(now, now))


@dataclass(frozen=True)
class _File:
    key: str | None  # None for a leftover temp file
    path: Path
    size: int
    mtime_ns: int


class DiskStore(BlobStore):
    """Entries as files under ``path``, at most ``max_bytes`` in total (temp files included)."""

    name = "disk"

    def __init__(
        self,
        path: str | os.PathLike,
        max_bytes: int = 16 << 30,
        codec: str = DEFAULT_CODEC,
        model_fingerprint: str | None = None,
        fsync: bool = False,
    ) -> None:
        super().__init__(codec, model_fingerprint)
        if max_bytes <= 0:
            raise ValueError(f"max_bytes must be positive, got {max_bytes}")
        self.root = Path(path)
        self.max_bytes = max_bytes
        self.fsync = fsync  # durability across power loss; checksums catch torn files anyway
        self._lock = threading.Lock()
        try:
            self.root.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            self._write_failed(exc)

    # -- paths and scanning --------------------------------------------------------------------

    def _path(self, key: str) -> Path:
        if not _KEY_RE.match(key):
            raise ValueError(f"invalid store key {key!r} (expected a hex digest)")
        return self.root / key[:2] / f"{key}{SUFFIX}"

    def _scan(self) -> list[_File]:
        """Every entry and temp file on disk now; files vanishing mid-scan are skipped."""
        found = []
        try:
            subdirs = [d for d in os.scandir(self.root) if len(d.name) == 2 and d.is_dir()]
        except OSError:
            return found
        for subdir in subdirs:
            try:
                children = list(os.scandir(subdir.path))
            except OSError:
                continue
            for child in children:
                is_entry = child.name.endswith(SUFFIX)
                if not (is_entry or child.name.startswith(TEMP_PREFIX)):
                    continue
                try:
                    stat = child.stat()
                except OSError:
                    continue
                key = child.name[: -len(SUFFIX)] if is_entry else None
                found.append(_File(key, Path(child.path), stat.st_size, stat.st_mtime_ns))
        return found

    @contextmanager
    def _writer_lock(self) -> Iterator[None]:
        """Exclusive across threads (``threading.Lock``) and processes (``flock``)."""
        with self._lock:
            fd = os.open(self.root / LOCK_NAME, os.O_RDONLY | os.O_CREAT, 0o644)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX)
                yield
            finally:
                os.close(fd)  # releases the flock

    # -- BlobStore -----------------------------------------------------------------------------

    def _read(self, key: str, touch: bool = True) -> bytes | None:
        path = self._path(key)
        try:
            with open(path, "rb") as file:
                blob = file.read()
        except FileNotFoundError:
            return None
        except OSError as exc:
            self.count_error()
            self.warn_once("read", "disk store %s: cannot read %s (%s)", self.root, path, exc)
            return None
        if touch:
            with suppress(OSError):  # read-only directory or evicted: recency is best effort
                _touch(path)
        return blob

    def _write(self, key: str, blob: bytes) -> None:
        path = self._path(key)
        size = len(blob)
        if size > self.max_bytes:
            log.debug("disk store: entry %s (%d B) exceeds the budget, not stored", key, size)
            return
        temp = path.with_name(f"{TEMP_PREFIX}{key}-{os.getpid()}-{uuid.uuid4().hex[:8]}")
        try:
            with self._writer_lock():
                if path.exists():  # entries are immutable: keep it, mark it used
                    try:
                        _touch(path)
                        return
                    except FileNotFoundError:  # deleted (``delete`` takes no lock): write it
                        pass
                self._make_room(size)
                path.parent.mkdir(exist_ok=True)
                with open(temp, "wb") as file:
                    file.write(blob)
                    if self.fsync:
                        file.flush()
                        os.fsync(file.fileno())
                os.replace(temp, path)
                with suppress(FileNotFoundError):  # deleted already: a later miss, not a failure
                    _touch(path)
        except OSError as exc:
            with suppress(OSError):
                temp.unlink(missing_ok=True)
            self._write_failed(exc)

    def _make_room(self, size: int) -> None:
        """Under the writer lock: remove stale temp files, then evict LRU entries until
        ``size`` more bytes fit in the budget."""
        files = self._scan()
        for stale in (f for f in files if f.key is None):
            log.debug("disk store: removing a crashed writer's temp file %s", stale.path)
            stale.path.unlink(missing_ok=True)
        entries = sorted((f for f in files if f.key is not None), key=lambda f: f.mtime_ns)
        total = sum(f.size for f in entries)
        for victim in entries:
            if total + size <= self.max_bytes:
                break
            victim.path.unlink(missing_ok=True)
            total -= victim.size

    def _write_failed(self, exc: OSError) -> None:
        self.count_error()
        self.warn_once(
            "write",
            "disk store %s is not writable (%s); entries are not being saved",
            self.root,
            exc,
        )

    def _usage(self) -> tuple[int, int]:
        entries = [f for f in self._scan() if f.key is not None]
        return len(entries), sum(f.size for f in entries)

    # -- KVStore -------------------------------------------------------------------------------

    def delete(self, key: str) -> bool:
        try:
            self._path(key).unlink()
            return True
        except FileNotFoundError:
            return False
        except OSError as exc:
            self.count_error()
            self.warn_once("delete", "disk store %s: cannot delete %s (%s)", self.root, key, exc)
            return False

    def keys(self) -> Iterator[str]:
        """Keys on disk now (a fresh scan: sees other processes' writes)."""
        return iter([f.key for f in self._scan() if f.key is not None])

"""Document registry: id -> text, for documents uploaded ahead of traffic.

The KV of a document lives in the engine's store; the registry only maps an id to its text (and
token count), so a request can name the document instead of sending it. When the store has a
Redis tier the texts go to the same Redis server, so every replica behind it resolves every id;
otherwise they stay in this process. Values are JSON, never pickle.
"""

from __future__ import annotations

import hashlib
import json
import threading
from abc import ABC, abstractmethod
from dataclasses import asdict, dataclass

from cacheblend.store.base import KVStore


@dataclass(frozen=True)
class StoredDocument:
    text: str
    num_tokens: int


class RegistryFullError(Exception):
    """The in-memory registry holds as many documents as it is allowed to."""


class RegistryUnavailableError(Exception):
    """The shared registry's server cannot be reached."""


def document_id(text: str) -> str:
    """A content-derived id: the same text always gets the same id, on every replica."""
    return "doc-" + hashlib.sha256(text.encode()).hexdigest()[:32]


class DocumentRegistry(ABC):
    """Contract: ``get`` returns None for an unknown id; ``put`` replaces; ``delete`` says
    whether the id existed. The Redis registry raises ``RegistryUnavailableError`` when the
    server is down (a request naming a document cannot be served without its text)."""

    @abstractmethod
    def get(self, doc_id: str) -> StoredDocument | None: ...

    @abstractmethod
    def put(self, doc_id: str, document: StoredDocument) -> None: ...

    @abstractmethod
    def delete(self, doc_id: str) -> bool: ...

    @abstractmethod
    def ids(self) -> list[str]:
        """Every registered id, sorted."""

    def close(self) -> None:
        """Release connections; the default has nothing to release."""


class MemoryDocuments(DocumentRegistry):
    def __init__(self, max_documents: int = 100_000) -> None:
        self.max_documents = max_documents
        self._documents: dict[str, StoredDocument] = {}
        self._lock = threading.Lock()

    def get(self, doc_id: str) -> StoredDocument | None:
        with self._lock:
            return self._documents.get(doc_id)

    def put(self, doc_id: str, document: StoredDocument) -> None:
        with self._lock:
            if doc_id not in self._documents and len(self._documents) >= self.max_documents:
                raise RegistryFullError(
                    f"the registry holds {self.max_documents} documents; delete some first"
                )
            self._documents[doc_id] = document

    def delete(self, doc_id: str) -> bool:
        with self._lock:
            return self._documents.pop(doc_id, None) is not None

    def ids(self) -> list[str]:
        with self._lock:
            return sorted(self._documents)


class RedisDocuments(DocumentRegistry):
    """Texts at ``<prefix>doc:<id>`` as JSON ``{"text", "num_tokens"}``."""

    def __init__(self, url: str, prefix: str = "cacheblend:", socket_timeout: float = 2.0) -> None:
        import redis  # lazy: the redis extra is optional

        self._errors = (redis.ConnectionError, redis.TimeoutError)
        self.prefix = f"{prefix}doc:"
        self._client = redis.Redis.from_url(
            url, socket_timeout=socket_timeout, socket_connect_timeout=socket_timeout
        )

    def _call(self, fn, *args):
        try:
            return fn(*args)
        except self._errors as exc:
            raise RegistryUnavailableError(f"document registry unavailable: {exc}") from exc

    def get(self, doc_id: str) -> StoredDocument | None:
        raw = self._call(self._client.get, self.prefix + doc_id)
        if raw is None:
            return None
        try:
            value = json.loads(raw)
            return StoredDocument(text=str(value["text"]), num_tokens=int(value["num_tokens"]))
        except (ValueError, KeyError, TypeError):
            return None  # not ours, or torn: treat as unknown

    def put(self, doc_id: str, document: StoredDocument) -> None:
        self._call(self._client.set, self.prefix + doc_id, json.dumps(asdict(document)))

    def delete(self, doc_id: str) -> bool:
        return bool(self._call(self._client.delete, self.prefix + doc_id))

    def ids(self) -> list[str]:
        pattern = "".join("\\" + c if c in "*?[]\\" else c for c in self.prefix) + "*"
        names = self._call(lambda: list(self._client.scan_iter(match=pattern, count=1000)))
        return sorted(name.decode()[len(self.prefix) :] for name in names)

    def close(self) -> None:
        self._client.close()


def _redis_tier(store: KVStore):
    tiers = getattr(store, "tiers", None) or [store]
    for tier in tiers:
        if tier.name == "redis" and hasattr(tier, "url"):
            return tier
    return None


def open_documents(store: KVStore, max_documents: int = 100_000) -> DocumentRegistry:
    """The registry that goes with ``store``: on its Redis server if it has one."""
    tier = _redis_tier(store)
    if tier is None:
        return MemoryDocuments(max_documents)
    return RedisDocuments(tier.url, prefix=getattr(tier, "prefix", "cacheblend:"))

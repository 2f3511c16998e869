"""The store's one plug-in point: ``KVStore``, and the value it holds: ``ChunkKV``.

A ``ChunkKV`` holds one segment's per-layer keys *before RoPE* and values, so an entry does not
depend on the position it is used at: the fusor rotates keys to their prompt positions on load.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Iterator
from dataclasses import dataclass, field

import torch


@dataclass
class ChunkKV:
    """Per-layer K (pre-RoPE) and V of one segment's tokens.

    keys, values: (num_layers, num_kv_heads, num_tokens, head_dim), any float dtype;
    ``layer(i)`` returns fp32 views for computation.
    """

    keys: torch.Tensor
    values: torch.Tensor
    meta: dict = field(default_factory=dict)

    def __post_init__(self) -> None:
        assert self.keys.shape == self.values.shape, (self.keys.shape, self.values.shape)
        assert self.keys.dim() == 4, self.keys.shape

    @property
    def num_layers(self) -> int:
        return self.keys.shape[0]

    @property
    def num_tokens(self) -> int:
        return self.keys.shape[2]

    @property
    def nbytes(self) -> int:
        return self.keys.nbytes + self.values.nbytes

    def layer(self, index: int) -> tuple[torch.Tensor, torch.Tensor]:
        """(K, V) of one layer as fp32, each (num_kv_heads, num_tokens, head_dim)."""
        return self.keys[index].float(), self.values[index].float()


@dataclass
class StoreStats:
    """Counters every tier keeps; ``hits + misses`` = lookups."""

    name: str
    entries: int = 0
    bytes: int = 0
    hits: int = 0
    misses: int = 0
    errors: int = 0  # corrupt entries dropped, backend failures

    @property
    def hit_rate(self) -> float:
        lookups = self.hits + self.misses
        return self.hits / lookups if lookups else 0.0


class KVStore(ABC):
    """A key -> ``ChunkKV`` map. Contract for every tier:

    - ``get`` returns None on a miss, and also when an entry is corrupt, torn, of another model
      or otherwise unreadable (it drops such an entry and counts an error); it never raises
      for a backend failure: a miss costs a recompute, never a request.
    - ``put`` never raises for a backend failure (disk full, server down): it logs and counts.
    - Keys are hex digests from ``cacheblend.store.keys``; values are immutable once written.
    """

    name: str = "store"

    @abstractmethod
    def get(self, key: str) -> ChunkKV | None: ...

    @abstractmethod
    def put(self, key: str, kv: ChunkKV) -> None: ...

    @abstractmethod
    def delete(self, key: str) -> bool: ...

    @abstractmethod
    def keys(self) -> Iterator[str]: ...

    @abstractmethod
    def stats(self) -> StoreStats: ...

    def contains(self, key: str) -> bool:
        return self.get(key) is not None

    def clear(self) -> None:
        for key in list(self.keys()):
            self.delete(key)

    def close(self) -> None:
        """Release connections and files; the default has nothing to release."""

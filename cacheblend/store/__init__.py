"""KV cache store: keys, codec, and the memory / disk / Redis tiers behind one base class."""

from cacheblend.store.base import ChunkKV, KVStore

__all__ = ["ChunkKV", "KVStore"]

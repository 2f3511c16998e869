"""``bench store``: entry size per codec, encode/decode time, and load throughput per tier.

Loads are measured on a warm page cache / local server: they bound what a tier can deliver to
the fusor on this machine, not a cold-disk or remote-network figure.
"""

from __future__ import annotations

import tempfile

import torch

from cacheblend.bench.timing import median_seconds
from cacheblend.store.base import ChunkKV, KVStore
from cacheblend.store.codec import CODECS, EncodedChunkKV, decode, encode
from cacheblend.store.disk import DiskStore
from cacheblend.store.keys import chunk_key
from cacheblend.store.memory import MemoryStore

_MODEL = "bench-store"


def _random_entry(num_layers: int, kv_heads: int, head_dim: int, tokens: int) -> ChunkKV:
    generator = torch.Generator().manual_seed(0)
    shape = (num_layers, kv_heads, tokens, head_dim)
    keys = torch.randn(shape, generator=generator).half()  # (L, H, T, D), as the engine stores
    values = torch.randn(shape, generator=generator).half()
    return ChunkKV(keys, values, {"model": _MODEL})


def _bench_codecs(kv: ChunkKV, repeats: int) -> dict:
    results = {}
    reference_k = kv.keys.float()
    for codec in CODECS:
        blob = encode(kv, codec)
        decoded = decode(blob)
        error = (decoded.keys.float() - reference_k).abs().max().item()
        lazy = EncodedChunkKV(blob)
        results[codec] = {
            "bytes": len(blob),
            "bytes_per_token": round(len(blob) / kv.num_tokens, 1),
            "encode_s": median_seconds(lambda c=codec: encode(kv, c), repeats),
            "decode_s": median_seconds(lambda b=blob: decode(b), repeats),
            "decode_layer_fp32_s": median_seconds(lambda e=lazy: e.layer(0), repeats),
            "max_abs_error_k": error,
        }
    return results


def _bench_tier(store: KVStore, key: str, kv: ChunkKV, repeats: int) -> dict:
    """get(): the tier's load; load_fp32: get() plus every layer as fp32 (what the fusor uses)."""
    store.put(key, kv)
    if store.get(key) is None:
        return {"error": "entry not stored (budget or backend failure)"}

    def load_fp32() -> None:
        entry = store.get(key)
        for index in range(entry.num_layers):
            entry.layer(index)

    get_s = median_seconds(lambda: store.get(key), repeats)
    load_s = median_seconds(load_fp32, repeats)
    gigabytes = kv.nbytes / 1e9  # the fp16 payload delivered
    return {
        "get_s": get_s,
        "get_gbps": round(gigabytes / get_s, 3),
        "load_fp32_s": load_s,
        "load_fp32_gbps": round(gigabytes / load_s, 3),
    }


def bench_store(
    num_layers: int = 30,
    kv_heads: int = 3,
    head_dim: int = 64,
    tokens: int = 3072,
    redis_url: str | None = None,
    repeats: int = 5,
) -> dict:
    """Benchmark one ``tokens``-long entry of the default model's KV shape (fp16 in memory).

    Returns {"shape", "fp16_bytes", "codecs": {codec: sizes, times, error},
    "tiers": {memory|disk|redis: get and load times, GB/s of fp16 payload}}; times are medians
    of ``repeats`` runs after one warm-up. Without ``redis_url`` a local valkey-server is started
    (the redis tier is skipped, with a reason, if none is installed).
    """
    kv = _random_entry(num_layers, kv_heads, head_dim, tokens)
    key = chunk_key(_MODEL, [], list(range(tokens)))
    result: dict = {
        "shape": {
            "layers": num_layers,
            "kv_heads": kv_heads,
            "head_dim": head_dim,
            "tokens": tokens,
        },
        "fp16_bytes": kv.nbytes,
        "repeats": repeats,
        "codecs": _bench_codecs(kv, repeats),
        "tiers": {},
    }
    tiers = result["tiers"]
    tiers["memory"] = {
        "note": "get returns the stored object (no copy); load_fp32 is the real cost",
        **_bench_tier(MemoryStore(), key, kv, repeats),
    }
    with tempfile.TemporaryDirectory(prefix="cacheblend-bench-") as directory:
        tiers["disk"] = _bench_tier(DiskStore(directory, max_bytes=4 * kv.nbytes), key, kv, repeats)
    tiers["redis"] = _bench_redis(redis_url, key, kv, repeats)
    return result


def _bench_redis(redis_url: str | None, key: str, kv: ChunkKV, repeats: int) -> dict:
    try:
        from redis.utils import HIREDIS_AVAILABLE

        from cacheblend.store.redis_store import RedisStore
        from cacheblend.store.valkey_server import ValkeyServer
    except ImportError as exc:
        return {"skipped": f"redis-py not installed ({exc})"}
    parser = {"parser": "hiredis" if HIREDIS_AVAILABLE else "python (pip install hiredis)"}
    if redis_url is not None:
        store = RedisStore(redis_url, prefix="cacheblend-bench:")
        try:
            return {**parser, **_bench_tier(store, key, kv, repeats)}
        finally:
            store.delete(key)
            store.close()
    try:
        server = ValkeyServer()
    except FileNotFoundError as exc:
        return {"skipped": str(exc)}
    with server:
        store = RedisStore(server.url, prefix="cacheblend-bench:")
        try:
            return {
                "server": "local valkey-server",
                **parser,
                **_bench_tier(store, key, kv, repeats),
            }
        finally:
            store.close()

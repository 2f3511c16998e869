"""bench_store runs end to end on a tiny entry (the real numbers come from the CLI)."""

from cacheblend.store.bench import bench_store


def test_bench_store_small(valkey_server):
    result = bench_store(num_layers=2, tokens=32, redis_url=valkey_server.url, repeats=1)
    assert set(result["codecs"]) == {"fp16", "fp32", "int8"}
    fp16 = result["codecs"]["fp16"]["bytes_per_token"]
    assert fp16 > 2 * 2 * 3 * 64 * 2  # layers * (K, V) * heads * head_dim * 2 bytes + header
    assert result["codecs"]["fp32"]["max_abs_error_k"] == 0.0
    for tier in ("memory", "disk", "redis"):
        assert result["tiers"][tier]["load_fp32_gbps"] > 0, result["tiers"][tier]

"""open_store: URL forms, options, and clear errors."""

import pytest

from cacheblend.store.disk import DiskStore
from cacheblend.store.factory import open_store, parse_size
from cacheblend.store.memory import MemoryStore
from cacheblend.store.tiered import TieredStore


def test_memory():
    assert isinstance(open_store("memory"), MemoryStore)
    assert open_store("memory:64M").max_bytes == 64 << 20


def test_disk(tmp_path):
    store = open_store(f"disk:{tmp_path}?max_bytes=1G&codec=int8", model_fingerprint="m")
    assert isinstance(store, DiskStore)
    assert (store.root, store.max_bytes, store.codec, store.model_fingerprint) == (
        tmp_path,
        1 << 30,
        "int8",
        "m",
    )
    assert open_store(f"disk:{tmp_path}", codec="fp32").codec == "fp32"


def test_disk_default_path(tmp_path, monkeypatch):
    monkeypatch.setenv("CACHEBLEND_HOME", str(tmp_path))
    assert open_store("disk").root == tmp_path / "kv"


def test_redis_url_and_own_parameters():
    pytest.importorskip("redis")
    store = open_store("redis://127.0.0.1:1/3?prefix=x:&ttl=60&chunk_bytes=1M&socket_timeout=2")
    assert type(store).__name__ == "RedisStore"  # no connection until used
    assert (store.prefix, store.ttl, store.chunk_bytes) == ("x:", 60.0, 1 << 20)
    kwargs = store._client.connection_pool.connection_kwargs
    assert (kwargs["port"], kwargs["db"]) == (1, 3)
    assert open_store("valkey://localhost:6379/0").url == "redis://localhost:6379/0"


def test_tiered(tmp_path, valkey_server):
    pytest.importorskip("redis")
    from cacheblend.store.redis_store import RedisStore

    url = f"memory:1G,disk:{tmp_path},{valkey_server.url}"
    store = open_store(url, model_fingerprint="m")
    assert isinstance(store, TieredStore)
    assert [type(t) for t in store.tiers] == [MemoryStore, DiskStore, RedisStore]
    assert store.tiers[2].model_fingerprint == "m"
    plus = open_store(f"memory + disk:{tmp_path}")
    assert [type(t) for t in plus.tiers] == [MemoryStore, DiskStore]


@pytest.mark.parametrize("url", ["", "s3://bucket", "memcached://x", "memory:lots", "redis:/x"])
def test_bad_urls_name_the_supported_forms(url):
    with pytest.raises(ValueError, match="memory|size"):
        open_store(url)


def test_unknown_option():
    with pytest.raises(TypeError, match="model_fingerprint"):
        open_store("memory", max_bytes=3)


def test_unknown_disk_parameter(tmp_path):
    with pytest.raises(ValueError, match="maxbytes"):
        open_store(f"disk:{tmp_path}?maxbytes=3")


def test_parse_size():
    assert parse_size("123") == 123
    assert parse_size("4k") == 4096
    assert parse_size("1.5GiB") == 3 << 29
    assert parse_size("2T") == 2 << 40
    with pytest.raises(ValueError):
        parse_size("-1")

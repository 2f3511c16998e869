"""store stats | clear | verify."""

import pytest

from cacheblend.store.disk import DiskStore
from cacheblend.store.memory import MemoryStore
from cacheblend.store.ops import store_clear, store_stats, store_verify
from cacheblend.store.tiered import TieredStore

pytest.importorskip("redis")
from cacheblend.store.redis_store import RedisStore


@pytest.fixture
def stack(tmp_path, valkey_server, redis_prefix):
    redis_tier = RedisStore(valkey_server.url, prefix=redis_prefix)
    store = TieredStore([MemoryStore(), DiskStore(tmp_path), redis_tier])
    yield store
    redis_tier.clear()


def _key(index: int) -> str:
    return f"{index:032x}"


def test_stats(stack, make_kv):
    stack.put(_key(1), make_kv())
    stack.get(_key(1))
    stack.get(_key(2))
    stats = store_stats(stack)
    assert [t["name"] for t in stats["tiers"]] == ["memory", "disk", "redis"]
    assert [t["entries"] for t in stats["tiers"]] == [1, 1, 1]
    assert stats["store"]["hits"] == 1 and stats["store"]["misses"] == 1
    assert stats["store"]["hit_rate"] == 0.5
    assert store_stats(MemoryStore())["tiers"][0]["entries"] == 0


def test_verify_drops_corrupt_entries(stack, make_kv, tmp_path):
    _, disk, redis_tier = stack.tiers
    for index in range(3):
        stack.put(_key(index), make_kv(index))
    path = next(tmp_path.rglob(f"{_key(1)}.kv"))
    path.write_bytes(path.read_bytes()[:-1] + b"\0")
    redis_tier._client.delete(min(redis_tier._client.scan_iter(match=redis_tier.prefix + "p:*")))
    report = store_verify(stack)
    assert (report["checked"], report["corrupt"]) == (9, 2)
    assert [t["corrupt"] for t in report["tiers"]] == [0, 1, 1]
    assert disk.get_blob(_key(1)) is None and disk.stats().errors == 1
    assert store_verify(stack)["corrupt"] == 0


def test_verify_with_a_model_drops_foreign_entries(tmp_path, make_kv):
    disk = DiskStore(tmp_path)
    disk.put(_key(1), make_kv(model="other"))
    disk.put(_key(2), make_kv())
    report = store_verify(disk, model_fingerprint="test-model-fingerprint")
    assert (report["ok"], report["corrupt"]) == (1, 1)


def test_clear(stack, make_kv):
    for index in range(2):
        stack.put(_key(index), make_kv(index))
    assert store_clear(stack) == 6
    assert list(stack.keys()) == []

"""TieredStore: top-down lookup, promotion on hit, write-through, per-tier stats."""

import pytest

from cacheblend.store import tiered
from cacheblend.store.disk import DiskStore
from cacheblend.store.memory import MemoryStore
from cacheblend.store.tiered import TieredStore

KEY = "ab" * 16


@pytest.fixture
def stack(tmp_path):
    memory = MemoryStore()
    disk = DiskStore(tmp_path / "disk")
    shared = DiskStore(tmp_path / "shared")  # stands in for Redis: another encoded tier
    return memory, disk, shared, TieredStore([memory, disk, shared])


def test_put_writes_through_every_tier(stack, make_kv, same_kv):
    memory, disk, shared, store = stack
    store.put(KEY, make_kv())
    for tier in (memory, disk, shared):
        same_kv(tier.get(KEY), make_kv())


def test_hit_in_a_lower_tier_is_promoted(stack, make_kv, same_kv):
    memory, disk, shared, store = stack
    shared.put(KEY, make_kv())
    same_kv(store.get(KEY), make_kv())
    assert memory.get(KEY) is not None and disk.get(KEY) is not None
    assert [s.hits for s in store.tier_stats()] == [1, 1, 1]  # incl. the two checks above
    store.get(KEY)
    assert [s.hits for s in store.tier_stats()] == [2, 1, 1]  # served by memory now


def test_miss_everywhere(stack):
    *_, store = stack
    assert store.get(KEY) is None
    stats = store.stats()
    assert (stats.hits, stats.misses) == (0, 1)
    assert [s.misses for s in store.tier_stats()] == [1, 1, 1]


def test_encoded_tiers_share_one_encoding(stack, make_kv, monkeypatch):
    *_, store = stack
    calls = []
    real_encode = tiered.encode
    monkeypatch.setattr(
        tiered, "encode", lambda kv, codec: calls.append(codec) or real_encode(kv, codec)
    )
    store.put(KEY, make_kv())
    assert calls == ["fp16"]


def test_promotion_reuses_the_verified_bytes(stack, make_kv, monkeypatch):
    _memory, disk, shared, store = stack
    shared.put(KEY, make_kv())
    monkeypatch.setattr(tiered, "encode", lambda *a: pytest.fail("re-encoded on promotion"))
    assert store.get(KEY) is not None and disk.get_blob(KEY) == shared.get_blob(KEY)


def test_corrupt_lower_copy_falls_through(stack, make_kv):
    _memory, disk, shared, store = stack
    disk.put(KEY, make_kv())
    shared.put(KEY, make_kv())
    path = next((disk.root).rglob("*.kv"))
    path.write_bytes(path.read_bytes()[:-10])
    assert store.get(KEY) is not None  # served by the shared tier, disk copy dropped
    assert disk.stats().errors == 1 and disk.get(KEY) is not None  # re-promoted


def test_delete_keys_clear_and_stats(stack, make_kv):
    memory, disk, shared, store = stack
    store.put(KEY, make_kv(1))
    shared.put("cd" * 16, make_kv(2))
    assert sorted(store.keys()) == sorted([KEY, "cd" * 16])
    stats = store.stats()
    assert stats.entries == 2 and stats.bytes == shared.stats().bytes
    assert store.delete(KEY) and all(t.get(KEY) is None for t in (memory, disk, shared))
    store.clear()
    assert list(store.keys()) == []


def test_needs_a_tier():
    with pytest.raises(ValueError):
        TieredStore([])

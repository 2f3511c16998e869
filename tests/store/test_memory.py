"""MemoryStore: LRU within a byte budget."""

from cacheblend.store.memory import MemoryStore


def test_put_get_and_stats(make_kv):
    store = MemoryStore()
    kv = make_kv()
    assert store.get("a") is None
    store.put("a", kv)
    assert store.get("a") is kv
    stats = store.stats()
    assert (stats.entries, stats.bytes, stats.hits, stats.misses) == (1, kv.nbytes, 1, 1)
    assert stats.hit_rate == 0.5


def test_lru_eviction_keeps_the_budget(make_kv):
    size = make_kv().nbytes
    store = MemoryStore(max_bytes=3 * size)
    for index in range(3):
        store.put(f"k{index}", make_kv(index))
    store.get("k0")  # k1 is now the least recently used
    store.put("k3", make_kv(3))
    assert store.get("k1") is None
    assert all(store.get(k) is not None for k in ("k0", "k2", "k3"))
    assert store.stats().bytes <= 3 * size


def test_entry_larger_than_budget_is_not_kept(make_kv):
    store = MemoryStore(max_bytes=10)
    store.put("a", make_kv())
    assert store.get("a") is None and store.stats().bytes == 0


def test_delete_clear_keys(make_kv):
    store = MemoryStore()
    store.put("a", make_kv(0))
    store.put("b", make_kv(1))
    assert sorted(store.keys()) == ["a", "b"]
    assert store.delete("a") and not store.delete("a")
    store.clear()
    assert list(store.keys()) == [] and store.stats().bytes == 0

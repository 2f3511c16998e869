"""RedisStore against a real local valkey-server: parts and manifest, corruption -> miss, and a
crashed, hung or restarted server never raises and is reconnected to by itself."""

from __future__ import annotations

import json
import logging
import time

import pytest
import redis

from cacheblend.store.codec import encode
from cacheblend.store.redis_store import RedisStore
from cacheblend.store.valkey_server import ValkeyServer
from tests.store.test_disk import exercise_store, writer_entry

MODEL = "test-model-fingerprint"
KEY = "ab" * 16


@pytest.fixture
def store(valkey_server, redis_prefix):
    store = RedisStore(valkey_server.url, prefix=redis_prefix, chunk_bytes=16 << 10)
    yield store
    store.clear()
    store.close()


@pytest.fixture
def client(valkey_server):
    client = redis.Redis.from_url(valkey_server.url)
    yield client
    client.close()


def _warnings(caplog) -> list[logging.LogRecord]:
    return [r for r in caplog.records if r.levelno == logging.WARNING]


def test_round_trip_in_parts(store, client, make_kv, same_kv):
    kv = make_kv()
    assert store.get(KEY) is None
    store.put(KEY, kv)
    same_kv(store.get(KEY), kv)
    size = len(encode(kv))
    manifest = json.loads(client.get(f"{store.prefix}m:{KEY}"))
    assert manifest["size"] == size and manifest["parts"] == -(-size // (16 << 10)) > 1
    stats = store.stats()
    assert (stats.entries, stats.bytes, stats.hits, stats.misses, stats.errors) == (
        1,
        size,
        1,
        1,
        0,
    )


def test_single_part_entry(valkey_server, redis_prefix, make_kv, same_kv):
    store = RedisStore(valkey_server.url, prefix=redis_prefix)
    store.put(KEY, make_kv())
    same_kv(store.get(KEY), make_kv())
    store.clear()


def test_prefixes_isolate_stores(valkey_server, store, make_kv):
    other = RedisStore(valkey_server.url, prefix=store.prefix + "other:")
    other.put(KEY, make_kv(1))
    store.put("cd" * 16, make_kv(2))
    assert list(store.keys()) == ["cd" * 16]
    assert list(other.keys()) == [KEY]
    other.clear()
    assert list(store.keys()) == ["cd" * 16]


def test_delete_clear_and_no_orphans(store, client, make_kv):
    store.put(KEY, make_kv(1))
    store.put("cd" * 16, make_kv(2))
    assert store.delete(KEY) and not store.delete(KEY)
    assert store.get(KEY) is None
    store.clear()
    assert list(client.scan_iter(match=store.prefix + "*")) == []


def test_entries_are_immutable_and_a_lost_race_leaves_no_parts(store, client, make_kv, same_kv):
    store.put(KEY, make_kv(1))
    parts_before = sorted(client.scan_iter(match=store.prefix + "p:*"))
    store._client.exists = lambda *names: 0  # a writer that checked just before the other wrote
    store.put(KEY, make_kv(2))
    same_kv(store.get(KEY), make_kv(1))
    assert sorted(client.scan_iter(match=store.prefix + "p:*")) == parts_before


def test_ttl(valkey_server, redis_prefix, client, make_kv):
    store = RedisStore(valkey_server.url, prefix=redis_prefix, ttl=1, chunk_bytes=64 << 10)
    store.put(KEY, make_kv())
    assert 0 < client.ttl(f"{redis_prefix}m:{KEY}") <= 1
    assert all(client.ttl(name) > 1 for name in client.scan_iter(match=redis_prefix + "p:*"))
    time.sleep(1.2)
    assert store.get(KEY) is None and store.stats().errors == 0
    store.clear()


def _first_part(client, store) -> bytes:
    return min(client.scan_iter(match=store.prefix + "p:*"))


@pytest.mark.parametrize("damage", ["flip", "truncate", "missing", "manifest"])
def test_corrupt_entry_is_a_miss_and_dropped(store, client, make_kv, caplog, damage):
    store.put(KEY, make_kv())
    part = _first_part(client, store)
    if damage == "flip":
        data = bytearray(client.get(part))
        data[-1] ^= 0x01
        client.set(part, bytes(data))
    elif damage == "truncate":
        client.set(part, client.get(part)[:100])
    elif damage == "missing":
        client.delete(part)
    else:
        client.set(f"{store.prefix}m:{KEY}", b"{not json")
    with caplog.at_level(logging.WARNING):
        assert store.get(KEY) is None
    assert store.stats().errors == 1 and len(_warnings(caplog)) == 1
    assert client.get(f"{store.prefix}m:{KEY}") is None  # dropped: the next put rewrites it
    store.put(KEY, make_kv())
    assert store.get(KEY) is not None


def test_foreign_model_is_a_miss(valkey_server, store, make_kv):
    store.put(KEY, make_kv(model="another-model"))
    reader = RedisStore(valkey_server.url, prefix=store.prefix, model_fingerprint=MODEL)
    assert reader.get(KEY) is None and reader.stats().errors == 1
    assert store.get(KEY) is None  # dropped


def test_crash_and_restart(make_kv, same_kv, caplog):
    with ValkeyServer() as server:
        store = RedisStore(server.url, retry_after=0.2, socket_timeout=0.5)
        store.put(KEY, make_kv(1))
        same_kv(store.get(KEY), make_kv(1))
        server.kill()
        with caplog.at_level(logging.WARNING):
            start = time.monotonic()
            assert store.get(KEY) is None
            store.put("cd" * 16, make_kv(2))  # dropped, never raises
            for _ in range(20):
                assert store.get(KEY) is None
            assert time.monotonic() - start < 2
        assert len(_warnings(caplog)) == 1  # one warning per outage, not per request
        assert store.stats().errors >= 1
        assert list(store.keys()) == [] and store.stats().entries == 0
        server.start()  # same port, empty (no persistence)
        time.sleep(0.25)  # past retry_after
        store.put(KEY, make_kv(3))  # reconnects by itself
        same_kv(store.get(KEY), make_kv(3))
        store.close()


def test_hung_server_times_out_to_a_miss(make_kv, same_kv, caplog):
    with ValkeyServer() as server:
        store = RedisStore(server.url, retry_after=0.2, socket_timeout=0.3)
        store.put(KEY, make_kv())
        server.pause()
        try:
            start = time.monotonic()
            with caplog.at_level(logging.WARNING):
                assert store.get(KEY) is None
                store.put("cd" * 16, make_kv(2))
            assert time.monotonic() - start < 2.0
            assert store.stats().errors >= 1 and len(_warnings(caplog)) == 1
        finally:
            server.resume()
        time.sleep(0.25)
        same_kv(store.get(KEY), make_kv())
        store.close()


def redis_worker(url: str, prefix: str, writer: int, iterations: int) -> dict:
    store = RedisStore(url, prefix=prefix, chunk_bytes=16 << 10)  # ~10 parts per entry
    return exercise_store(store, writer, iterations)


def test_two_processes_share_a_server(valkey_server, redis_prefix, spawn_pool):
    args = [(valkey_server.url, redis_prefix, writer, 300) for writer in (0, 1)]
    results = spawn_pool.starmap(redis_worker, args)
    for counts in results:
        assert counts["hits"] > 20, counts
        assert counts["bad"] == 0 and counts["errors"] == 0, counts
    RedisStore(valkey_server.url, prefix=redis_prefix).clear()


def test_writer_entries_differ():
    assert not writer_entry(0, 1).keys.equal(writer_entry(1, 1).keys)

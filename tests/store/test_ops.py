"""store stats | clear | verify, and their failures: a dead Redis or undeletable entries are
errors, never zeros or a count of what was not deleted."""

import contextlib
import socket
import subprocess

import pytest

from cacheblend.cli import main
from cacheblend.store.disk import DiskStore
from cacheblend.store.memory import MemoryStore
from cacheblend.store.ops import (
    StoreUnavailableError,
    check_written,
    store_clear,
    store_problems,
    store_stats,
    store_verify,
)
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


# --- failures are reported, never counted as success ----------------------------------------



def dead_redis_url() -> str:
    """A Redis URL with nothing listening (a port just freed)."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    return f"redis://127.0.0.1:{port}/0"


@contextlib.contextmanager
def immutable(path):
    """``chattr +i``: not even root may add or remove entries in ``path``."""
    if subprocess.run(["chattr", "+i", str(path)], capture_output=True, check=False).returncode != 0:
        pytest.skip("chattr +i is not available on this filesystem")
    try:
        yield path
    finally:
        subprocess.run(["chattr", "-i", str(path)], check=True)


def test_clear_counts_only_what_it_deleted(tmp_path, make_kv):
    disk = DiskStore(tmp_path)
    for index in range(3):
        disk.put(_key(index), make_kv(index))
    locked = next(tmp_path.rglob("*.kv")).parent
    held = len(list(locked.glob("*.kv")))
    with immutable(locked), pytest.raises(StoreUnavailableError) as failed:
        store_clear(disk)
    message = str(failed.value)
    assert f"deleted {3 - held} entries" in message
    assert f"{held} of 3 disk entries could not be deleted" in message
    assert len(list(disk.keys())) == held


def test_dead_redis_is_an_error_not_zeros():
    store = RedisStore(dead_redis_url(), socket_timeout=0.2)
    for operation in (store_stats, store_clear, store_verify):
        with pytest.raises(StoreUnavailableError, match="unreachable"):
            operation(store)
    assert len(store_problems(store)) == 1


def test_unwritable_disk_is_a_problem(tmp_path, make_kv):
    disk = DiskStore(tmp_path / "kv")
    assert store_problems(disk) == []
    with immutable(tmp_path / "kv"):
        (problem,) = store_problems(disk)
        assert "not writable" in problem and str(tmp_path / "kv") in problem
        stack = TieredStore([MemoryStore(), disk])
        stack.put(_key(1), make_kv())
        with pytest.raises(StoreUnavailableError, match="nothing was stored in the disk tier"):
            check_written(stack, [_key(1)])


@pytest.mark.parametrize("action", ["stats", "verify", "clear"])
def test_store_cli_against_dead_redis_fails_in_one_line(action, capsys):
    assert main(["store", action, "--store", dead_redis_url() + "?socket_timeout=0.2"]) == 2
    captured = capsys.readouterr()
    assert captured.out == ""
    (line,) = captured.err.strip().splitlines()
    assert line.startswith("error: redis store") and "unreachable" in line


def test_store_clear_cli_on_immutable_dir(tmp_path, make_kv, capsys):
    disk = DiskStore(tmp_path)
    disk.put(_key(1), make_kv())
    with immutable(next(tmp_path.rglob("*.kv")).parent):
        assert main(["store", "clear", "--store", f"disk:{tmp_path}"]) == 2
    captured = capsys.readouterr()
    assert '"deleted"' not in captured.out
    assert "deleted 0 entries, but 1 of 1 disk entries could not be deleted" in captured.err

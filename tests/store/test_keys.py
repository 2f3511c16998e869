"""Keys: stable across processes, and different whenever an entry's contents could differ."""

from cacheblend.store import keys
from cacheblend.store.keys import chunk_key, make_key, prefix_key


def test_key_is_a_stable_hex_digest():
    # Frozen values: if these change, every stored entry is orphaned; bump KV_LAYOUT_VERSION
    # on purpose instead.
    assert chunk_key("model-a", [1], [10, 11, 12]) == "106765ce4f9d5e3a4d12832e88ea867e"
    assert prefix_key("model-a", [], [1, 2, 3]) == "ba1adb3102d34b28795a3bd80031f1b1"


def test_key_is_the_same_in_another_process(spawn_pool):
    assert spawn_pool.apply(chunk_key, ("m", [1], [2, 3])) == chunk_key("m", [1], [2, 3])


def test_every_input_changes_the_key():
    base = make_key("chunk", "m", [1], [2, 3])
    variants = [
        make_key("prefix", "m", [1], [2, 3]),
        make_key("chunk", "m2", [1], [2, 3]),
        make_key("chunk", "m", [], [2, 3]),
        make_key("chunk", "m", [1], [2, 4]),
        make_key("chunk", "m", [1], [3, 2]),
        make_key("chunk", "m", [1], [2, 3, 0]),
    ]
    assert len({base, *variants}) == len(variants) + 1


def test_boundary_between_context_and_ids_matters():
    assert make_key("chunk", "m", [1, 2], [3]) != make_key("chunk", "m", [1], [2, 3])
    assert make_key("chunk", "ab", [], [1]) != make_key("chun", "kab", [], [1])


def test_layout_version_is_part_of_the_key(monkeypatch):
    before = chunk_key("m", [], [1, 2])
    monkeypatch.setattr(keys, "KV_LAYOUT_VERSION", "kv-prerope-v999")
    assert chunk_key("m", [], [1, 2]) != before


def test_large_token_ids_are_not_truncated():
    assert chunk_key("m", [], [2**40]) != chunk_key("m", [], [0])

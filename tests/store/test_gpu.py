"""The hot tier (``gpu``): a bytes-bounded LRU on a device, in front of the other tiers. Run on
CPU tensors here (``device=cpu``) and on the meta device, which stands in for a device the
host cannot read: entries must land there whatever tier they came from."""

from __future__ import annotations

import pytest
import torch

from cacheblend.store.base import ChunkKV
from cacheblend.store.factory import open_store
from cacheblend.store.gpu import DeviceStore
from cacheblend.store.memory import MemoryStore
from cacheblend.store.tiered import TieredStore


def entry(tokens: int = 4, fill: float = 1.0) -> ChunkKV:
    shape = (2, 1, tokens, 8)  # fp16: 2 x 2 x 4 x 8 x 2 bytes = 256 bytes for 4 tokens
    return ChunkKV(torch.full(shape, fill, dtype=torch.float16),
                   torch.full(shape, fill, dtype=torch.float16), {"model": "m"})


def test_put_moves_the_entry_to_the_device_in_its_dtype():
    store = DeviceStore(device="meta")
    store.put("a", entry())
    got = store.get("a")
    assert got.keys.device.type == "meta" and got.values.device.type == "meta"
    assert got.keys.dtype == torch.float16 and got.meta == {"model": "m"}


def test_lru_within_the_byte_budget():
    store = DeviceStore(max_bytes=600, device="cpu")  # room for two 256-byte entries
    store.put("a", entry())
    store.put("b", entry())
    assert store.get("a") is not None  # a is now the most recent
    store.put("c", entry())
    assert store.get("b") is None and store.get("a") is not None and store.get("c") is not None
    assert store.stats().bytes == 512
    store.put("huge", entry(tokens=40))  # larger than the budget: not kept
    assert store.get("huge") is None and store.stats().entries == 2


def test_a_lower_tier_hit_is_promoted_onto_the_device():
    hot, warm = DeviceStore(device="meta"), MemoryStore()
    warm.put("k", entry(fill=3.0))
    tiered = TieredStore([hot, warm])
    first = tiered.get("k")
    assert first.keys.device.type == "cpu"  # served from the memory tier this time
    assert hot.get("k").keys.device.type == "meta"  # and copied up for the next request
    assert tiered.get("k").keys.device.type == "meta"


def test_factory_forms():
    store = open_store("gpu:64M?device=cpu")
    assert isinstance(store, DeviceStore) and store.max_bytes == 64 << 20
    assert store.device == torch.device("cpu")
    tiered = open_store("gpu?device=cpu,memory")
    assert isinstance(tiered, TieredStore) and isinstance(tiered.tiers[0], DeviceStore)
    with pytest.raises(ValueError, match="unknown gpu store parameter"):
        open_store("gpu?color=red")


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the message without CUDA")
def test_factory_refuses_cuda_without_cuda():
    with pytest.raises(ValueError, match="needs a CUDA device"):
        open_store("gpu:1G")

"""The hot tier: entries resident in accelerator memory, a bytes-bounded LRU.

In front of memory / disk / Redis (``gpu:8G,memory,disk``), a hit here never crosses PCIe: the
fusor's loader converts and rotates the entry in place. Entries keep the dtype they were stored
in (fp16 by default: half the bytes of fp32, converted to the compute dtype on the device).
A promotion from a lower tier, or a ``put``, copies the entry to the device once.
"""

from __future__ import annotations

import torch

from cacheblend.store.base import ChunkKV
from cacheblend.store.memory import MemoryStore


class DeviceStore(MemoryStore):
    """``MemoryStore`` whose entries live on ``device`` (``cuda`` for the hot tier; any torch
    device works, which is how the tests run it on a CPU)."""

    name = "gpu"

    def __init__(self, max_bytes: int = 4 << 30, device: str | torch.device = "cuda") -> None:
        super().__init__(max_bytes)
        self.device = torch.device(device)

    def put(self, key: str, kv: ChunkKV) -> None:
        if kv.nbytes > self.max_bytes:
            return
        if kv.keys.device != self.device:
            kv = ChunkKV(kv.keys.to(self.device), kv.values.to(self.device), dict(kv.meta))
        super().put(key, kv)

"""Layer-wise loading of cached rows into the request's KV, optionally one layer ahead.

For layer i, every cached span's (pre-RoPE K, V) is read from its source, converted to fp32,
rotated to the span's prompt positions and written into the request KV. With ``prefetch`` a
background thread does layer i+1 while the caller computes layer i.
"""

from __future__ import annotations

from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from typing import Protocol

import torch

from cacheblend.kv import RequestKV
from cacheblend.model.rope import RopeTable


class KVSource(Protocol):
    """Anything with per-layer pre-RoPE K and V: a ChunkKV, a lazily decoded store entry."""

    num_tokens: int

    def layer(self, index: int) -> tuple[torch.Tensor, torch.Tensor]: ...


@dataclass
class CachedSpan:
    start: int  # prompt position of the span's first token
    source: KVSource

    @property
    def end(self) -> int:
        return self.start + self.source.num_tokens


class LayerLoader:
    _executor: ThreadPoolExecutor | None = None  # shared by all requests; one thread

    def __init__(self, spans: list[CachedSpan], rope: RopeTable, kv: RequestKV,
                 prefetch: bool = False) -> None:
        self.spans = spans
        self.rope = rope
        self.kv = kv
        self.prefetch = prefetch and bool(spans)
        self._pending: dict[int, Future] = {}
        self.seconds = 0.0

    def _fill(self, index: int) -> None:
        for span in self.spans:
            k, v = span.source.layer(index)  # (KV, n, hd) each
            device = self.kv.keys.device
            k = k.to(device=device, dtype=torch.float32)
            self.kv.keys[index, :, span.start : span.end] = self.rope.apply_range(k, span.start)
            self.kv.values[index, :, span.start : span.end] = v.to(device, torch.float32)

    def load(self, index: int, num_layers: int) -> None:
        """Make layer ``index`` of every cached span present in the request KV."""
        if not self.spans:
            return
        future = self._pending.pop(index, None)
        if future is not None:
            future.result()
        else:
            self._fill(index)
        if self.prefetch and index + 1 < num_layers:
            if LayerLoader._executor is None:
                LayerLoader._executor = ThreadPoolExecutor(1, thread_name_prefix="kv-prefetch")
            self._pending[index + 1] = LayerLoader._executor.submit(self._fill, index + 1)

    def close(self) -> None:
        for future in self._pending.values():
            future.result()
        self._pending.clear()

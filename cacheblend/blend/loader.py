"""Loading cached rows into the request's KV: every cached span's (pre-RoPE K, V) is converted
to fp32, its keys rotated to the span's prompt positions, and written into the request KV.

Modes (``LOADING_MODES``), measured in docs/benchmarks.md:
- ``layer``: layer i is loaded when the fusor reaches it;
- ``prefetch``: as ``layer``, and a background thread loads layer i+1 while layer i computes;
- ``bulk``: every layer of a span in one vectorised step before layer 0 (few large ops instead
  of layers x spans small ones, which matters on a CPU where each op pays a threading cost).
"""

from __future__ import annotations

from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from typing import Protocol

import torch

from cacheblend.config import LOADING_MODES
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
                 mode: str = "bulk") -> None:
        assert mode in LOADING_MODES, mode
        self.spans = spans
        self.rope = rope
        self.kv = kv
        self.mode = mode
        self.prefetch = mode == "prefetch" and bool(spans)
        self._pending: dict[int, Future] = {}
        self._bulk_done = False

    def _fill_from(self, first: int) -> None:
        """Layers ``first``.. of every span (earlier layers may already hold fresh rows)."""
        device = self.kv.keys.device
        for span in self.spans:
            keys = getattr(span.source, "keys", None)
            if keys is None:  # a lazily decoded source: layer by layer
                for index in range(first, self.kv.keys.shape[0]):
                    self._fill_span(span, index)
                continue
            keys = keys[first:].to(device=device, dtype=torch.float32)  # (L', KV, n, hd)
            positions = slice(span.start, span.end)
            self.kv.keys[first:, :, positions] = self.rope.apply_range(keys, span.start)
            self.kv.values[first:, :, positions] = span.source.values[first:].to(device,
                                                                                 torch.float32)

    def _fill_span(self, span: CachedSpan, index: int) -> None:
        k, v = span.source.layer(index)  # (KV, n, hd) each
        device = self.kv.keys.device
        k = k.to(device=device, dtype=torch.float32)
        self.kv.keys[index, :, span.start : span.end] = self.rope.apply_range(k, span.start)
        self.kv.values[index, :, span.start : span.end] = v.to(device, torch.float32)

    def _fill(self, index: int) -> None:
        with torch.inference_mode():  # thread-local: the prefetch thread needs it too
            for span in self.spans:
                self._fill_span(span, index)

    def load(self, index: int, num_layers: int) -> None:
        """Make layer ``index`` of every cached span present in the request KV."""
        if not self.spans:
            return
        if self.mode == "bulk":
            if not self._bulk_done:
                self._fill_from(index)
                self._bulk_done = True
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

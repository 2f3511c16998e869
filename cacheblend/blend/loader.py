"""Loading cached rows into the request's KV: every cached span's (pre-RoPE K, V) is moved to the
engine's device in the store's dtype, converted there, its keys rotated (in fp32) to the span's
prompt positions, and written into the request KV (in the compute dtype).

Modes (``LOADING_MODES``), measured in docs/benchmarks.md:
- ``layer``: layer i is loaded when the fusor reaches it;
- ``prefetch``: as ``layer``, and layer i+1 is loaded while layer i computes: on CUDA by a side
  stream (host entries copied from pinned memory with ``non_blocking``; the compute stream waits
  on an event only when it reaches the layer), on the CPU by a background thread;
- ``bulk``: every layer of a span in one vectorised step before layer 0 (few large ops instead
  of layers x spans small ones, which matters on a CPU where each op pays a threading cost).

Entries already on the device (the ``gpu`` store tier) never cross PCIe: they are converted and
rotated in place. The loader measures what it moved (bytes, seconds: CUDA events on CUDA) for
the loading controller.
"""

from __future__ import annotations

import threading
import time
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


def _real_cuda(device: torch.device) -> bool:
    """A CUDA device this process can drive (False for fake CUDA tensors on a CPU machine)."""
    return device.type == "cuda" and torch.cuda.is_available()


class LayerLoader:
    _executor: ThreadPoolExecutor | None = None  # CPU prefetch, shared by all requests; one thread

    def __init__(self, spans: list[CachedSpan], rope: RopeTable, kv: RequestKV,
                 mode: str = "bulk") -> None:
        assert mode in LOADING_MODES, mode
        self.spans = spans
        self.rope = rope
        self.kv = kv
        self.mode = mode
        self.device = kv.keys.device
        self.cuda = _real_cuda(self.device)
        self.stream = None
        if mode == "prefetch" and spans and self.cuda:
            self.stream = torch.cuda.Stream(self.device)
            # The request KV was just allocated on the compute stream: start after it.
            self.stream.wait_stream(torch.cuda.current_stream(self.device))
        self.prefetch_thread = mode == "prefetch" and bool(spans) and not self.cuda
        self._pending: dict[int, Future] = {}
        self._events: dict[int, torch.cuda.Event] = {}
        self._bulk_done = False
        self.nbytes = 0  # bytes of cached entries moved into the request KV
        self._seconds = 0.0  # host-timed loads (CPU)
        self._timing: list[tuple[torch.cuda.Event, torch.cuda.Event]] = []  # CUDA
        self._lock = threading.Lock()

    # --- moving one tensor --------------------------------------------------------------------

    def _on_device(self, tensor: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
        """``tensor`` on the KV's device in ``dtype``: copied in its stored dtype (from pinned
        memory, asynchronously, on CUDA), converted on the device."""
        if tensor.device != self.device:
            if self.cuda:
                if not tensor.is_pinned():
                    tensor = tensor.pin_memory()  # the caching host allocator reuses buffers
                tensor = tensor.to(self.device, non_blocking=True)
            else:
                tensor = tensor.to(self.device)
        return tensor.to(dtype)

    def _write(self, layers: slice | int, span: CachedSpan, keys: torch.Tensor,
               values: torch.Tensor) -> None:
        """keys/values: (..., KV, n, hd) pre-RoPE rows of ``span`` for ``layers``."""
        rows = slice(span.start, span.end)
        moved = _nbytes(keys) + _nbytes(values)  # in the store's dtype
        keys = self._on_device(keys, torch.float32)  # rotated in fp32, cast when written
        self.kv.keys[layers, :, rows] = self.rope.apply_range(keys, span.start)
        self.kv.values[layers, :, rows] = self._on_device(values, self.kv.dtype)
        with self._lock:
            self.nbytes += moved

    # --- filling layers -----------------------------------------------------------------------

    def _fill_from(self, first: int) -> None:
        """Layers ``first``.. of every span (earlier layers may already hold fresh rows)."""
        for span in self.spans:
            keys = getattr(span.source, "keys", None)
            if keys is None:  # a lazily decoded source: layer by layer
                for index in range(first, self.kv.keys.shape[0]):
                    self._write(index, span, *span.source.layer(index))
                continue
            self._write(slice(first, None), span, keys[first:], span.source.values[first:])

    def _fill(self, index: int) -> None:
        with torch.inference_mode():  # thread-local: the prefetch thread needs it too
            for span in self.spans:
                keys = getattr(span.source, "keys", None)
                if keys is None:
                    self._write(index, span, *span.source.layer(index))
                else:
                    self._write(index, span, keys[index], span.source.values[index])

    def _timed(self, fill, *args) -> None:
        if self.cuda:
            stream = self.stream or torch.cuda.current_stream(self.device)
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record(stream)
            fill(*args)
            end.record(stream)
            self._timing.append((start, end))
            return
        began = time.perf_counter()
        fill(*args)
        with self._lock:
            self._seconds += time.perf_counter() - began

    def _enqueue(self, index: int) -> None:
        """Load layer ``index`` on the side stream; the compute stream waits for it later."""
        with torch.cuda.stream(self.stream):
            self._timed(self._fill, index)
            event = torch.cuda.Event()
            event.record(self.stream)
        self._events[index] = event

    def load(self, index: int, num_layers: int) -> None:
        """Make layer ``index`` of every cached span present in the request KV (for work
        queued after this call, on CUDA)."""
        if not self.spans:
            return
        if self.mode == "bulk":
            if not self._bulk_done:
                self._timed(self._fill_from, index)
                self._bulk_done = True
            return
        if self.stream is not None:
            if index not in self._events:
                self._enqueue(index)
            torch.cuda.current_stream(self.device).wait_event(self._events.pop(index))
            if index + 1 < num_layers:
                self._enqueue(index + 1)  # copies under layer index's compute
            return
        future = self._pending.pop(index, None)
        if future is not None:
            future.result()
        else:
            self._timed(self._fill, index)
        if self.prefetch_thread and index + 1 < num_layers:
            if LayerLoader._executor is None:
                LayerLoader._executor = ThreadPoolExecutor(1, thread_name_prefix="kv-prefetch")
            self._pending[index + 1] = LayerLoader._executor.submit(self._timed, self._fill,
                                                                     index + 1)

    def pending(self, index: int) -> bool:
        """Whether layer ``index`` is being prefetched: the caller must ``load`` it before
        writing fresh rows there, or the prefetch could overwrite them."""
        return index in self._pending or index in self._events

    def close(self) -> None:
        for future in self._pending.values():
            future.result()
        self._pending.clear()
        if self.stream is not None:
            current = torch.cuda.current_stream(self.device)
            for event in self._events.values():  # prefetched but never used
                current.wait_event(event)
            self._events.clear()

    def seconds(self) -> float:
        """Time spent loading (after ``close``). On CUDA this waits for the loads, not for the
        compute queued after them: a host wait after the layer loop, never inside it."""
        if not self._timing:
            return self._seconds
        self._timing[-1][1].synchronize()
        return sum(start.elapsed_time(end) for start, end in self._timing) / 1000.0


def _nbytes(tensor: torch.Tensor) -> int:
    return tensor.numel() * tensor.element_size()

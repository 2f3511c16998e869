"""The loading controller: per request, how much to recompute and whether blending pays off.

It keeps three online estimates (exponential moving averages): the store's lookup throughput
(bytes/s, from every lookup: read, verify, decode), the device load throughput (bytes/s of
entries moved into the request KV: host->device copy, conversion, rotation; measured by the
fusor's loader, with CUDA events on CUDA) and the model's recompute cost (seconds per
token-layer, from every fused prefill). Per request it

- raises the recompute ratio above the requested one where the extra recompute hides under the
  time the loads take anyway (the paper's rule): loading a request's entries costs
  ``bytes / lookup rate + bytes / device load rate``; recomputing a ratio r of the chunk tokens
  after the last check layer costs ``r x chunk tokens x layers after it x seconds per
  token-layer``; the ratio where the two meet is the largest that costs no time. On this CPU
  loading is ~100x cheaper than recompute, so it keeps the requested ratio; on a GPU, where
  entries cross PCIe (~25 GB/s pinned) and bf16 recompute is fast, it matters. Never below
  ``min_ratio``;
- falls back to a plain prefill when too few chunk tokens hit for blending to pay: computing the
  misses first and then blending (every chunk token to the first check layer, each check's
  share to the next: ``blend_fraction``) would cost more than a full prefill. The missed chunks are
  still precomputed and stored, after the answer, so the next request hits.
"""

from __future__ import annotations

import threading
from dataclasses import dataclass

from cacheblend.config import BlendConfig


@dataclass(frozen=True)
class Decision:
    method: str  # what runs: the requested method, or "full" on fallback
    ratio: float
    reason: str


class LoadingController:
    def __init__(self, num_layers: int, min_ratio: float = 0.0, smoothing: float = 0.3) -> None:
        self.num_layers = num_layers
        self.min_ratio = min_ratio
        self.smoothing = smoothing
        self.load_bytes_per_s: float | None = None
        self.transfer_bytes_per_s: float | None = None
        self.seconds_per_token_layer: float | None = None
        self._lock = threading.Lock()

    def _update(self, current: float | None, sample: float) -> float:
        return sample if current is None else (1 - self.smoothing) * current + self.smoothing * sample

    def observe_load(self, nbytes: int, seconds: float) -> None:
        if nbytes > 0 and seconds > 0:
            with self._lock:
                self.load_bytes_per_s = self._update(self.load_bytes_per_s, nbytes / seconds)

    def observe_transfer(self, nbytes: int, seconds: float) -> None:
        """Entries moved into a request KV on the compute device (copy, convert, rotate)."""
        if nbytes > 0 and seconds > 0:
            with self._lock:
                self.transfer_bytes_per_s = self._update(self.transfer_bytes_per_s,
                                                         nbytes / seconds)

    def load_seconds(self, load_bytes: int) -> float | None:
        """Estimated time to look up and move ``load_bytes`` of entries (None before any)."""
        if not self.load_bytes_per_s:
            return None
        seconds = load_bytes / self.load_bytes_per_s
        if self.transfer_bytes_per_s:
            seconds += load_bytes / self.transfer_bytes_per_s
        return seconds

    def observe_compute(self, token_layers: int, seconds: float) -> None:
        if token_layers > 0 and seconds > 0:
            with self._lock:
                self.seconds_per_token_layer = self._update(self.seconds_per_token_layer,
                                                            seconds / token_layers)

    def blend_fraction(self, check_layers: tuple[int, ...],
                       check_ratios: tuple[float, ...]) -> float:
        """Share of a full prefill's token-layers a blend with this schedule computes (its chunk
        part): every chunk token through the first check layer, then each check's share of them
        up to the next check, the last check's to the last layer."""
        last = self.num_layers - 1
        bounds = [min(layer, last) for layer in check_layers] + [last]
        computed = bounds[0] + 1
        for ratio, start, end in zip(check_ratios, bounds, bounds[1:]):
            computed += ratio * (end - start)
        return computed / self.num_layers

    def decide(self, method: str, blend: BlendConfig, chunk_tokens: int, missed_tokens: int,
               load_bytes: int) -> Decision:
        """Serve ``method`` as asked, fall back to a full prefill when too many chunk tokens
        missed for a blend to pay (``blend.fallback``), or raise blend's ratio to hide the load."""
        ratio = blend.ratio
        if method not in ("blend", "reuse", "epic") or chunk_tokens == 0:
            return Decision(method, ratio, "no chunks to fuse")
        ratio = max(ratio, self.min_ratio)
        if blend.fallback and method == "blend":
            # Token-layer costs relative to a full prefill of the chunks: misses are computed
            # in full first, then the blend runs over all chunk tokens.
            schedule = blend.with_ratio(ratio)
            fraction = self.blend_fraction(schedule.check_layers, schedule.check_ratios)
            blend_cost = missed_tokens + fraction * chunk_tokens
            if blend_cost > chunk_tokens:
                return Decision("full", ratio, f"{missed_tokens}/{chunk_tokens} chunk tokens "
                                "missed: a full prefill is cheaper; misses stored afterwards")
        load_s = self.load_seconds(load_bytes)
        if method == "blend" and load_s is not None and self.seconds_per_token_layer:
            # the ratio is what runs after the last check layer
            per_ratio_s = chunk_tokens * (self.num_layers - blend.check_layers[-1] - 1) * \
                self.seconds_per_token_layer
            hidden_ratio = load_s / per_ratio_s if per_ratio_s > 0 else 0.0
            if hidden_ratio > ratio:
                return Decision(method, min(1.0, hidden_ratio),
                                "recompute raised to hide under the load time")
        return Decision(method, ratio, "requested")

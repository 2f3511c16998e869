"""Drift correction: the part of a chunk's KV error that its tokens share, taken out of the rows
that are not recomputed.

A chunk's cached K/V were computed without the chunks before it. At a given layer, every token
of the chunk misses the same context, and part of the error is common to them: on 3 MultiNews
development prompts, a per-chunk, per-KV-head mean offset (pre-RoPE) carries 14-44% of the
key error's energy at layers 1-29 (median 28%) and 4-19% of the value error's (median 12%;
``benchmarks/drift_variants.py --energy``, docs/results.md, issue 12 round 5). With it, the
default's first-token KL fell 1.4-2.9x at the same recompute on four datasets. The tokens the
fusor recomputes in a chunk measure that offset for free: their fresh K/V minus their cached
K/V. ``DriftCorrection`` adds the mean of it, times a scale (``BlendConfig.drift``: keys,
values), to the chunk's other cached rows at that layer, before the layer's queries (and a
check layer's selector) read them. A recomputed row is overwritten with its fresh K/V right
after, so a chunk whose every token is recomputed is exactly what it was without the
correction (blend at ratio 1 still equals a full prefill).

With ``BlendConfig.drift_pool`` = P > 0, a chunk's offset is shrunk toward the request's: the
mean over the chunk's n measured rows and P pseudo-rows at the mean over every measured row of
every chunk, (sum of the chunk's drifts + P x the request's mean) / (n + P). The measured rows
are a few dozen per chunk, picked for their attention and deviation, not at random; the
request-wide mean is steadier.

Keys are offset before RoPE and rotated to each row's position (a rotation is linear, so that
is the rotated offset). A chunk with no recomputed token at a layer is left as it is. Layer 0
is never corrected: its K/V depend on the token alone. Everything runs on the device with fixed
shapes (a scatter-add over a chunk index, then a gather that gives every row its chunk's
offset): no host reads in the layer loop.
"""

from __future__ import annotations

import torch

from cacheblend.model.rope import RopeTable, apply_rope, rotate_half


class DriftCorrection:
    def __init__(self, spans: list[tuple[int, int]], total: int, scale: tuple[float, float],
                 rope: RopeTable, device: torch.device, pool: float = 0.0) -> None:
        self.num_chunks = len(spans)
        self.pool = pool
        self.key_scale, self.value_scale = scale
        self.rope = rope
        # chunk_of[p]: the chunk of position p; num_chunks outside every chunk.
        chunk_of = torch.full((total,), self.num_chunks, dtype=torch.long)
        for index, (start, end) in enumerate(spans):
            chunk_of[start:end] = index
        self.chunk_of = chunk_of.to(device)
        # The rows from the first chunk's start to the last one's end, as one slice, and which
        # chunk's offset each takes (num_chunks, a zero offset, for a row between chunks): a
        # layer's offsets reach every row by one gather along that index.
        self.begin, self.end = min(s for s, _ in spans), max(e for _, e in spans)
        self.row_chunk = self.chunk_of[self.begin:self.end]  # (R,)
        # A key offset is rotated to its row's position: R_p d = cos_p * d + sin_p * rh(d).
        self.cos = rope.cos[self.begin:self.end]
        self.sin = rope.sin[self.begin:self.end]
        self._measured: tuple[torch.Tensor, int] | None = None  # the computed set last seen

    def correct(self, positions: torch.Tensor, count: int, fresh_k_raw: torch.Tensor,
                fresh_v: torch.Tensor, layer_keys: torch.Tensor,
                layer_values: torch.Tensor) -> None:
        """Offset every chunk row of this layer by its chunk's mean drift, measured on the
        chunk rows computed here: the first ``count`` of ``positions`` (sorted; the plan puts
        chunk rows first), with their fresh pre-RoPE keys and values (KV, >= count, hd).
        ``layer_keys`` / ``layer_values`` (KV, T, hd) still hold the cached rows there (the
        caller writes the fresh ones after this call)."""
        if count == 0:
            return
        if self._measured is None or self._measured[0] is not positions \
                or self._measured[1] != count:  # a new computed set: a check narrowed it
            self._track(positions, count)
        rows = positions[:count]
        heads, head_dim = fresh_v.shape[0], fresh_v.shape[2]
        # Back before RoPE: the inverse rotation (cos(-a) = cos a, sin(-a) = -sin a).
        cached_k = apply_rope(layer_keys[:, rows].float(), self._cos, -self._sin)
        drift = torch.cat([fresh_k_raw[:, :count].float() - cached_k,
                           fresh_v[:, :count].float() - layer_values[:, rows].float()])
        # One row per chunk and a last, always zero, for the rows between chunks.
        means = torch.zeros((self.num_chunks + 1, 2 * heads * head_dim), dtype=torch.float32,
                            device=drift.device)
        means.index_add_(0, self._chunk, drift.transpose(0, 1).reshape(count, -1))
        if self.pool:  # the request's mean, before the sums become means
            request_mean = means.sum(0, keepdim=True).div_(count)
            means.mul_(self._share).addcmul_(self._pooled, request_mean)
        else:
            means.mul_(self._share)
        mean_k, mean_v = means.view(-1, 2 * heads, head_dim).transpose(0, 1).chunk(2)
        # (KV, C + 1, hd) -> (KV, R, hd): each row's offset, gathered one tensor at a time so
        # that at most two (KV, R, hd) temporaries live at once; a key offset is rotated to its
        # row's position (cos_p d + sin_p rotate_half(d)) before it is added.
        span = slice(self.begin, self.end)
        if self.key_scale:
            offset = mean_k.index_select(1, self.row_chunk).mul_(self.cos).addcmul_(
                rotate_half(mean_k).index_select(1, self.row_chunk), self.sin)
            layer_keys[:, span].add_(offset, alpha=self.key_scale)
        if self.value_scale:
            layer_values[:, span].add_(mean_v.index_select(1, self.row_chunk),
                                       alpha=self.value_scale)

    def _track(self, positions: torch.Tensor, count: int) -> None:
        """What depends on the computed set alone, once per set: each measured row's chunk, one
        over each chunk's count plus the pool (0 for a chunk with none, and for the rows between
        chunks: their offset stays 0), the request mean's weight, the rotation."""
        self._measured = (positions, count)
        rows = positions[:count]
        self._chunk = self.chunk_of[rows]
        tally = torch.zeros(self.num_chunks + 1, dtype=torch.float32, device=rows.device).index_add_(
            0, self._chunk, torch.ones(count, dtype=torch.float32, device=rows.device))
        measured = tally > 0
        self._share = torch.where(measured, 1.0 / (tally + self.pool).clamp_min(1.0),
                                  0.0)[:, None]
        self._pooled = torch.where(measured, self.pool / (tally + self.pool).clamp_min(1.0),
                                   0.0)[:, None]
        self._cos, self._sin = self.rope.cos[rows], self.rope.sin[rows]

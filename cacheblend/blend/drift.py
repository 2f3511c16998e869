"""Drift correction: the part of a chunk's KV error that its tokens share, taken out of the rows
that are not recomputed.

A chunk's cached K/V were computed without the chunks before it. At a given layer, every token
of the chunk misses the same context, and much of the error is common to them: on MultiNews
development prompts, a per-chunk, per-KV-head mean offset (pre-RoPE) carries 20-44% of the
key error's energy at layers 2-8 and 15-30% at most later ones, and 10-19% of the value
error's (docs/results.md, issue 12 round 5). The tokens the fusor recomputes in a chunk measure
that offset for free: their fresh K/V minus their cached K/V. ``DriftCorrection`` adds the mean
of it, times a scale (``BlendConfig.drift``: keys, values), to the chunk's other cached rows at
that layer, before the layer's queries read them. A recomputed row is overwritten with its fresh
K/V right after, so a chunk whose every token is recomputed is exactly what it was without the
correction (blend at ratio 1 still equals a full prefill).

Keys are offset before RoPE and rotated to each row's position (a rotation is linear, so that
is the rotated offset). A chunk with no recomputed token at a layer is left as it is. Layer 0
is never corrected: its K/V depend on the token alone. Everything runs on the device with fixed
shapes (a scatter-add over a chunk index, then one small matrix product that gives every row
its chunk's offset): no host reads in the layer loop.
"""

from __future__ import annotations

import torch

from cacheblend.model.rope import RopeTable, rotate_half


class DriftCorrection:
    def __init__(self, spans: list[tuple[int, int]], total: int, scale: tuple[float, float],
                 rope: RopeTable, device: torch.device) -> None:
        self.num_chunks = len(spans)
        self.key_scale, self.value_scale = scale
        # chunk_of[p]: the chunk of position p, or num_chunks (a bin never applied) outside.
        chunk_of = torch.full((total,), self.num_chunks, dtype=torch.long)
        for index, (start, end) in enumerate(spans):
            chunk_of[start:end] = index
        self.chunk_of = chunk_of.to(device)
        # The rows from the first chunk's start to the last one's end, as one slice, and which
        # chunk's offset each takes (one-hot; none for a row between chunks): the offsets of a
        # layer reach every row in one small matrix product, not a gather per row.
        self.begin, self.end = min(s for s, _ in spans), max(e for _, e in spans)
        rows = self.chunk_of[self.begin:self.end]
        self.one_hot = torch.nn.functional.one_hot(rows, self.num_chunks + 1)[:, :-1].float()
        # A key offset is rotated to its row's position: R_p d = cos_p * d + sin_p * rh(d).
        self.cos = rope.cos[self.begin:self.end].to(device)
        self.sin = rope.sin[self.begin:self.end].to(device)

    def correct(self, rope: RopeTable, positions: torch.Tensor, fresh_k_raw: torch.Tensor,
                fresh_v: torch.Tensor, layer_keys: torch.Tensor,
                layer_values: torch.Tensor) -> None:
        """Offset every chunk row of this layer by its chunk's mean drift, measured on the
        rows computed here (``positions``, sorted; their fresh pre-RoPE keys and values, each
        (KV, n, hd)). ``layer_keys`` / ``layer_values`` (KV, T, hd) still hold the cached rows
        at ``positions`` (the caller writes the fresh ones after this call)."""
        heads, n, head_dim = fresh_v.shape
        chunk = self.chunk_of[positions]  # (n,); rows outside chunks fall in the last bin
        cached_k = rope.unapply(layer_keys[:, positions], positions)
        drift = torch.cat([fresh_k_raw.float() - cached_k.float(),
                           fresh_v.float() - layer_values[:, positions].float()], dim=0)
        bins = self.num_chunks + 1
        total = torch.zeros((bins, 2 * heads * head_dim), device=drift.device).index_add_(
            0, chunk, drift.transpose(0, 1).reshape(n, -1))
        count = torch.zeros(bins, device=drift.device).index_add_(
            0, chunk, torch.ones(n, device=drift.device))
        mean = (total / count.clamp_min(1.0)[:, None])[:-1]  # (C, 2 KV hd); none measured: 0
        mean_k, mean_v = mean.view(-1, 2 * heads, head_dim).transpose(0, 1).chunk(2)
        # (3 KV, C, hd) -> (3 KV, R, hd): each row's key offset, its rotate_half (for the
        # rotation) and its value offset, scaled, in the layout of the rows they are added to.
        scaled = torch.cat([mean_k * self.key_scale, rotate_half(mean_k) * self.key_scale,
                            mean_v * self.value_scale])
        key, key_half, value = (self.one_hot @ scaled).chunk(3)
        rows = slice(self.begin, self.end)
        dtype = layer_keys.dtype
        if self.key_scale:
            layer_keys[:, rows] += (key.mul_(self.cos).addcmul_(key_half, self.sin)).to(dtype)
        if self.value_scale:
            layer_values[:, rows] += value.to(dtype)

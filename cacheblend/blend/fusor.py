"""The cache fusor: one layer loop that serves every method.

A ``FusionPlan`` says which rows of the prompt come from cache (``cached``), which tokens are
computed from layer 0 (``active``), and at which layers the computed chunk tokens are narrowed
(``checks``). Then, per layer i:

1. cached rows of layer i are loaded into the request KV, keys rotated to their positions;
2. q/k/v of the active tokens are computed; at a check layer, their fresh K/V are compared with
   the cached rows and a selector keeps the high-deviation chunk tokens (tokens outside chunks,
   the suffix above all, are always kept);
3. fresh K/V overwrite the cached rows of the tokens computed at this layer;
4. the kept queries attend with the exact causal mask: query position p sees every key <= p.

full: nothing cached, all active. prefix: cached exact prefix, the rest active. reuse: chunks
cached, suffix active. epic: chunks cached, first k of each chunk + suffix active. blend: chunks
cached, chunks + suffix active, narrowed at the check layers.
"""

from __future__ import annotations

from collections.abc import Generator
from dataclasses import dataclass, field

import torch

from cacheblend.blend.loader import CachedSpan, LayerLoader
from cacheblend.blend.probe import probe_attention, suffix_positions
from cacheblend.blend.select import Candidates, Selector, kv_deviation, suffix_attention
from cacheblend.kv import RequestKV
from cacheblend.model.runner import ModelRunner


@dataclass
class FusionPlan:
    ids: torch.Tensor  # (T,) the whole prompt
    active: torch.Tensor  # (n,) sorted positions computed from layer 0; must contain T-1
    cached: list[CachedSpan] = field(default_factory=list)
    chunk_spans: list[tuple[int, int]] = field(default_factory=list)
    checks: list[tuple[int, Selector]] = field(default_factory=list)
    deviation: str = "k"
    capture: bool = False  # record pre-RoPE K/V of active rows (plans without checks only)
    resident: int = 0  # rows [0, resident) are in the request KV already (an earlier slice)
    probe_layers: int = 0  # > 0: query-aware selectors use a probe of the suffix (blend/probe.py)

    def __post_init__(self) -> None:
        total = self.ids.shape[0]
        assert self.active.numel() > 0 and int(self.active[-1]) == total - 1, "suffix must run"
        assert not (self.capture and self.checks), "capture needs a fixed active set"
        covered = torch.zeros(total, dtype=torch.bool)
        covered[: self.resident] = True
        for span in self.cached:
            covered[span.start : span.end] = True
        covered[self.active] = True
        assert bool(covered.all()), "every position must be cached or computed"

    @property
    def num_chunk_tokens(self) -> int:
        return sum(e - s for s, e in self.chunk_spans)

    def token_slices(self, size: int) -> list[FusionPlan]:
        """A plain plan (no checks, its active rows one contiguous tail) split into plans of at
        most ``size`` active rows each, run in order: chunked prefill. Slice j computes rows
        [a, b) at positions a..b-1 against rows [0, b) (earlier slices' rows are resident),
        which is exactly what the whole plan computes for those rows."""
        start, total = int(self.active[0]), self.ids.shape[0]
        if self.checks or size >= total - start or total - start != self.active.numel():
            return [self]
        slices = []
        for begin in range(start, total, size):
            end = min(begin + size, total)
            slices.append(FusionPlan(
                self.ids[:end], torch.arange(begin, end),
                self.cached if begin == start else [], self.chunk_spans, capture=self.capture,
                resident=self.resident if begin == start else begin))
        return slices


@dataclass
class FusionResult:
    logits: torch.Tensor  # (V,) for the last prompt position
    computed: torch.Tensor  # positions whose K/V at the last layer are fresh (sorted)
    active_per_layer: list[int]
    captured: list[tuple[torch.Tensor, torch.Tensor]] | None  # per layer (K pre-RoPE, V)
    load_seconds: float = 0.0


def _in_chunks(positions: torch.Tensor, spans: list[tuple[int, int]]) -> torch.Tensor:
    mask = torch.zeros_like(positions, dtype=torch.bool)
    for start, end in spans:
        mask |= (positions >= start) & (positions < end)
    return mask


class Fusor:
    def __init__(self, runner: ModelRunner) -> None:
        self.runner = runner

    def run(self, plan: FusionPlan, kv: RequestKV, loading: str = "bulk") -> FusionResult:
        """Run every layer of ``plan``; ``loading`` is one of cacheblend.config.LOADING_MODES."""
        layers = self.layers(plan, kv, loading)
        while True:
            try:
                next(layers)
            except StopIteration as done:
                return done.value

    @torch.inference_mode()
    def layers(self, plan: FusionPlan, kv: RequestKV, loading: str = "bulk"
               ) -> Generator[int, None, FusionResult]:
        """The layer loop as a generator: yields the number of tokens each layer computed, so a
        caller can interleave other work between layers (chunked prefill); returns the result.
        A caller that stops early must ``close()`` it (the loader's prefetch is joined)."""
        runner, rope = self.runner, self.runner.rope
        total = plan.ids.shape[0]
        assert kv.capacity >= total
        positions = plan.active.to(kv.keys.device)
        hidden = runner.embed(plan.ids.to(kv.keys.device)[positions])  # (n, D)
        checks = dict(plan.checks)
        loader = LayerLoader(plan.cached, rope, kv, mode=loading)
        cached_rows = torch.zeros(total, dtype=torch.bool)
        for span in plan.cached:
            cached_rows[span.start : span.end] = True
        captured = [] if plan.capture else None
        active_per_layer = []
        probed = None  # (T,) the suffix's attention from the probe pass, if the plan asks
        if plan.probe_layers and any(s.needs_attention for _, s in plan.checks):
            probed = probe_attention(runner, plan.ids, suffix_positions(
                positions, plan.chunk_spans), kv, loader, plan.probe_layers)

        last = runner.num_layers - 1
        try:
            for index in range(runner.num_layers):
                # Cached rows are needed unless every one of them is recomputed at this layer.
                recomputed_all = bool(cached_rows[positions.cpu()].sum() == cached_rows.sum())
                if index in checks or not recomputed_all:
                    loader.load(index, runner.num_layers)
                q, k_raw, v = runner.project_qkv(index, hidden)
                if captured is not None:
                    captured.append((k_raw, v))
                k = rope.apply(k_raw, positions)
                layer_keys, layer_values = kv.keys[index, :, :total], kv.values[index, :, :total]
                if index in checks:
                    keep = self._select(plan, checks[index], positions, k, v,
                                        layer_keys, layer_values, q, rope, probed)
                # Fresh K/V overwrite cached rows for every token computed at this layer.
                layer_keys[:, positions] = k
                layer_values[:, positions] = v
                if index in checks:
                    hidden, q, positions = hidden[keep], q[:, keep], positions[keep]
                active_per_layer.append(int(positions.shape[0]))
                if index == last:
                    computed = positions
                    # Only the last position's output is read.
                    hidden, q, positions = hidden[-1:], q[:, -1:], positions[-1:]
                q = rope.apply(q, positions)
                n = positions.shape[0]
                if n == total:  # every position in order: plain causal
                    attn = runner.attend(q, layer_keys, layer_values, causal=True)
                elif n > 1 and int(positions[0]) == total - n:  # a contiguous tail
                    attn = runner.attend_tail(q, layer_keys, layer_values)
                else:  # exact causal mask: query at p sees keys at positions <= p
                    attn = runner.attend_at(q, layer_keys, layer_values, positions)
                hidden = runner.finish_layer(index, hidden, attn)
                yield active_per_layer[-1]
        finally:
            loader.close()
        kv.length = max(kv.length, total)
        return FusionResult(
            logits=runner.logits(hidden[-1:])[0],
            computed=computed,
            active_per_layer=active_per_layer,
            captured=captured,
        )

    @staticmethod
    def _select(plan: FusionPlan, selector: Selector, positions, fresh_k, fresh_v,
                layer_keys, layer_values, q=None, rope=None, probed=None) -> torch.Tensor:
        """Bool mask over the active tokens: non-chunk tokens always, chunk tokens by selector.
        A query-aware selector also gets the suffix's attention on each chunk token at this
        layer (its queries against the fresh keys of the computed rows, cached keys elsewhere):
        the suffix computes that attention anyway, so it costs s x T scores, no extra layer.
        ``probed``: (T,) the probe pass's attention instead (blend/probe.py)."""
        in_chunk = _in_chunks(positions, plan.chunk_spans)
        keep = ~in_chunk
        chunk_index = in_chunk.nonzero().squeeze(1)
        if chunk_index.numel():
            chunk_positions = positions[chunk_index]
            deviation = kv_deviation(
                fresh_k[:, chunk_index], layer_keys[:, chunk_positions],
                fresh_v[:, chunk_index], layer_values[:, chunk_positions], plan.deviation,
            )
            attention = None
            if selector.needs_attention and probed is not None:
                attention = probed[chunk_positions]
            elif selector.needs_attention:
                suffix_index = (~in_chunk).nonzero().squeeze(1)  # (s,) always holds T-1
                suffix_at = positions[suffix_index]
                keys = layer_keys.clone()  # (KV, T, hd)
                keys[:, positions] = fresh_k
                key_positions = torch.arange(keys.shape[1], device=positions.device)
                mass = suffix_attention(rope.apply(q[:, suffix_index], suffix_at),
                                        suffix_at, keys, key_positions)  # (T,)
                attention = mass[chunk_positions]
            candidates = Candidates(chunk_positions, deviation, plan.chunk_spans,
                                    plan.num_chunk_tokens, attention)
            keep[chunk_index] = selector.keep(candidates)
        return keep

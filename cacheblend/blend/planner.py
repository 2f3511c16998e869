"""The planner: a request's segments and settings -> the FusionPlan that serves its method.

It probes the store for the prefix and every chunk, asks the loading controller whether
blending pays (and at which ratio), computes and stores the misses a fused prefill needs, and
builds the plan:

| method | cached rows | computed from layer 0 | narrowed at check layers |
|---|---|---|---|
| full | none | every token | no |
| prefix | longest chain of exact prefix entries | the rest | no |
| reuse | prefix + every chunk | suffix | no |
| epic | prefix + every chunk | first k tokens of each inexact chunk + suffix | no |
| blend | prefix + every chunk | every inexact chunk token + suffix | to the selected tokens |

An exact chunk (``exact_chunks``: its entry was computed after exactly the tokens before it, at
the same positions) is what a full prefill computes; blend below ratio 1 and epic skip it.

blend's check selectors come from the request's BlendConfig (``selector``, ``coverage``,
``first_k``) through ``blend.select.make_selector``.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field, replace

import torch

from cacheblend.blend.chunks import ChunkCache
from cacheblend.blend.controller import LoadingController
from cacheblend.blend.fusor import FusionPlan
from cacheblend.blend.loader import CachedSpan
from cacheblend.blend.select import first_k_mask, make_selector
from cacheblend.config import BlendConfig
from cacheblend.prompt import Segments
from cacheblend.request import RequestSettings


@dataclass
class Lookup:
    """What the store gave for a request's segments."""

    missed_tokens: int = 0
    borrowed_tokens: int = 0  # chunk tokens read from an entry stored under another context
    miss_s: float = 0.0
    load_s: float = 0.0
    load_bytes: int = 0
    deferred: list[int] = field(default_factory=list)  # chunks missed: stored after the answer
    exact: set[int] = field(default_factory=set)  # chunks whose entry is what full computes
    reason: str = ""


@dataclass
class PlannedPrefill:
    plan: FusionPlan
    method: str  # what runs (the controller may fall back to "full")
    ratio: float | None  # the blend ratio that runs
    lookup: Lookup


def hkvd_fallback(blend: BlendConfig) -> BlendConfig:
    """HKVD in place of a query-aware selector whose probe is too dear: at layer 0 a cached
    row's deviation is nothing but rounding (K/V there depend on the token alone), so a check
    there moves to layer 1."""
    layers = tuple(dict.fromkeys(max(1, layer) for layer in blend.check_layers))
    ratios = blend.check_ratios[len(blend.check_layers) - len(layers):]
    return replace(blend, probe_layers=0, selector="hkvd", check_layers=layers,
                   check_ratios=ratios)


def exact_chunks(segments: Segments, preamble: tuple[int, ...], borrowed: set[int]) -> set[int]:
    """The chunks whose own entry was computed after exactly the tokens before them in this
    prompt, at the same positions: in ``prefix`` mode the first chunk, after the request's own
    prefix (in ``alone`` mode, a first chunk with no prefix). Their cached KV is what a full
    prefill computes, so blending spends nothing on them. A borrowed entry never is."""
    exact = set()
    for index, (begin, _) in enumerate(segments.chunk_spans()):
        if (index not in borrowed and begin == len(preamble)
                and tuple(segments.ids[:begin]) == preamble):
            exact.add(index)
    return exact


class Planner:
    def __init__(self, chunks: ChunkCache, controller: LoadingController, num_layers: int) -> None:
        self.chunks = chunks
        self.controller = controller
        self.num_layers = num_layers

    def plan(self, segments: Segments, settings: RequestSettings) -> PlannedPrefill:
        ids = torch.tensor(segments.ids, dtype=torch.long)
        total = ids.shape[0]
        method, blend = settings.method, settings.blend
        spans = segments.chunk_spans()
        if method == "full":
            return PlannedPrefill(FusionPlan(ids, torch.arange(total)), method, None, Lookup())
        if method == "prefix":
            cached = self.chunks.prefix_chain(segments)
            start = min(cached[-1].end if cached else 0, total - 1)  # the last token always runs
            plan = FusionPlan(ids, torch.arange(start, total), cached, spans, capture=True)
            return PlannedPrefill(plan, method, None, Lookup())
        cached, lookup, ratio = self._lookup_chunks(segments, settings)
        if cached is None:  # the controller's fallback
            return PlannedPrefill(FusionPlan(ids, torch.arange(total)), "full", None, lookup)
        suffix = torch.arange(total - len(segments.suffix), total)
        chunk_tokens = sum(e - s for s, e in spans)
        checks, tokens = [], 0
        if method == "blend":
            blend = blend.with_ratio(ratio)
        # Exact chunks (``exact_chunks``) have nothing to correct: epic, and blend below ratio 1,
        # compute only the others (at ratio 1 blend recomputes every chunk token, as asked).
        if method == "epic" or (method == "blend" and blend.ratio < 1.0):
            spans = [span for i, span in enumerate(spans) if i not in lookup.exact]
        if method == "reuse":
            active = suffix
        elif method == "epic":
            chunk_positions = torch.cat([torch.arange(s, e) for s, e in spans] or [suffix[:0]])
            keep = first_k_mask(chunk_positions, spans, blend.epic_k)
            active = torch.cat([chunk_positions[keep], suffix])
        elif not spans:  # blend over exact chunks only: nothing to select
            active = suffix
        else:  # blend
            active = torch.cat([torch.arange(s, e) for s, e in spans] + [suffix])
            # At ratio 1 every chunk token is kept: there is nothing for a probe to rank.
            probe = self.probe_depth(blend) if blend.ratio < 1.0 else 0
            tokens = self._probe_tokens(probe, len(segments.suffix), chunk_tokens, blend)
            if probe and not tokens:  # not even the suffix's tail fits: HKVD selects
                blend = hkvd_fallback(blend)
            else:
                cost = self._probe_cost(probe, tokens, chunk_tokens, blend) if probe else 0.0
                blend = replace(blend.with_ratio(blend.ratio - cost), probe_layers=probe)
            for layer, layer_ratio, name in zip(blend.check_layers, blend.check_ratios,
                                                blend.selectors):
                selector = make_selector(name, layer_ratio, blend.coverage, blend.first_k)
                checks.append((min(layer, self.num_layers - 1), selector))
        probe_layers = blend.probe_layers if checks else 0
        # A ratio stays a share of every chunk token, spent on the inexact ones only.
        plan = FusionPlan(ids, active, cached, spans, checks, deviation=blend.deviation,
                          drift=blend.drift if checks else (0.0, 0.0),
                          drift_pool=blend.drift_pool,
                          probe_layers=probe_layers,
                          probe_tokens=tokens if probe_layers else 0,
                          probe_ramp=blend.probe_ramp,
                          num_chunk_tokens=chunk_tokens)
        return PlannedPrefill(plan, method, blend.ratio if method == "blend" else None, lookup)

    def probe_depth(self, blend: BlendConfig) -> int:
        """How many layers the probe runs for ``blend`` (0: none; -1 in the config: all)."""
        if set(blend.selectors) == {"hkvd"} or blend.probe_layers == 0:
            return 0
        return self.num_layers if blend.probe_layers < 0 else min(blend.probe_layers,
                                                                  self.num_layers)

    def _probe_tokens(self, layers: int, suffix_tokens: int, chunk_tokens: int, blend) -> int:
        """How many of the suffix's last tokens the probe runs (0: none fit). It may use up half
        the recompute budget: the whole suffix if that fits, else its last ``probe_tail``
        tokens (a long suffix, SAMSum's dialogue: on 16 SAMSum prompts probing the last 8 tokens
        gave a lower KL than probing the last 57 or 28, which half or a quarter of the budget
        would buy, as the budget left recomputes more: docs/results.md)."""
        if not layers:
            return 0
        # The inverse of _probe_cost: the most token-layers half the ratio buys, per probed layer.
        fits = int(blend.ratio / 2 * self._token_layers_after(chunk_tokens, blend)
                   / min(layers, self.num_layers))
        if suffix_tokens <= fits:
            return suffix_tokens
        return blend.probe_tail if blend.probe_tail <= fits else 0

    def _probe_cost(self, layers: int, suffix_tokens: int, chunk_tokens: int, blend) -> float:
        """The probe's token-layers (suffix x probed layers) as a share of the chunk tokens x
        layers after the last check: the ratio it uses up, so the budget stays compute-matched."""
        probed = suffix_tokens * min(layers, self.num_layers)
        return probed / self._token_layers_after(chunk_tokens, blend)

    def _token_layers_after(self, chunk_tokens: int, blend) -> int:
        """The chunk tokens x layers after the last check (at least 1): what a ratio is of."""
        after = self.num_layers - min(blend.check_layers[-1], self.num_layers - 1) - 1
        return max(1, chunk_tokens * after)

    def _lookup_chunks(self, segments: Segments, settings: RequestSettings):
        """(spans, lookup, ratio): entries for the prefix and every chunk (misses computed and
        stored first), or spans None when the controller finds a full prefill cheaper."""
        method, blend = settings.method, settings.blend
        preamble = self.chunks.preamble_for(segments.prefix, blend)
        lookup = Lookup()
        start = time.perf_counter()
        entries = self.chunks.probe(segments, preamble)
        borrowed = self.chunks.borrow(segments.chunks, entries[1:], preamble, blend)
        for index, entry in borrowed.items():
            entries[index + 1] = entry
        lookup.load_s = time.perf_counter() - start
        lookup.load_bytes = sum(e.nbytes for e in entries if e is not None)
        self.controller.observe_load(lookup.load_bytes, lookup.load_s)
        missed = [i for i, e in enumerate(entries[1:]) if e is None]
        chunk_tokens = sum(len(c) for c in segments.chunks)
        lookup.missed_tokens = sum(len(segments.chunks[i]) for i in missed)
        decision = self.controller.decide(method, blend, chunk_tokens, lookup.missed_tokens,
                                          lookup.load_bytes)
        lookup.reason = decision.reason
        if decision.method == "full":
            lookup.deferred = missed
            return None, lookup, decision.ratio
        lookup.borrowed_tokens = sum(len(segments.chunks[i]) for i in borrowed)
        lookup.exact = exact_chunks(segments, preamble, set(borrowed))
        start = time.perf_counter()
        spans = []
        prefix_entry = entries[0]
        if prefix_entry is None and segments.prefix:
            prefix_entry = self.chunks.compute_prefix(segments.prefix)
            lookup.missed_tokens += len(segments.prefix)
        if prefix_entry is not None:
            spans.append(CachedSpan(0, prefix_entry))
        for (begin, _), chunk, entry in zip(segments.chunk_spans(), segments.chunks, entries[1:]):
            if entry is None:
                entry = self.chunks.precompute(preamble, chunk)
            spans.append(CachedSpan(begin, entry))
        lookup.miss_s = time.perf_counter() - start if lookup.missed_tokens else 0.0
        return spans, lookup, decision.ratio

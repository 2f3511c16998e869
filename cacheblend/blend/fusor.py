"""The cache fusor: one layer loop that serves every method.

A ``FusionPlan`` says which rows of the prompt come from cache (``cached``), which tokens are
computed from layer 0 (``active``), and at which layers the computed chunk tokens are narrowed
(``checks``). Then, per layer i:

1. cached rows of layer i are loaded into the request KV, keys rotated to their positions;
2. q/k/v of the active tokens are computed; blend (``FusionPlan.drift``), at layers after the
   first: each chunk's cached rows move by the mean drift (fresh minus cached) of the chunk's
   tokens computed at this layer (blend/drift.py);
3. at a check layer, the fresh K/V are compared with the (corrected) cached rows and a selector
   keeps the high-deviation chunk tokens (tokens outside chunks, the suffix above all, are
   always kept); then fresh K/V overwrite the cached rows of the tokens computed at this layer;
4. the kept queries attend with the exact causal mask: query position p sees every key <= p.

full: nothing cached, all active. prefix: cached exact prefix, the rest active. reuse: chunks
cached, suffix active. epic: chunks cached, first k of each chunk + suffix active. blend: chunks
cached, chunks + suffix active, narrowed at the check layers.

The host never waits for the device inside the loop. Everything the host must know is decided
from the plan, once (``FusionPlan.__post_init__`` reads its CPU tensors): the attention kind of
the active set (causal / contiguous tail / scattered), whether cached rows are needed before the
first check layer, how many chunk tokens are active. Index tensors are built once per request on
the device. After a check layer the host needs the number of kept tokens: a selector that knows
it from the counts (HKVD) says so; otherwise it is read once (``host_sync``), the loop's only
intended device->host wait. Narrowing uses sorts and gathers, never boolean-mask indexing.
"""

from __future__ import annotations

from collections.abc import Generator
from dataclasses import dataclass, field

import torch

from cacheblend.blend.drift import DriftCorrection
from cacheblend.blend.loader import CachedSpan, LayerLoader
from cacheblend.blend.probe import probe_attention, suffix_count
from cacheblend.blend.select import Candidates, Selector, kv_deviation, output_share, suffix_probs
from cacheblend.device import host_sync
from cacheblend.kv import RequestKV
from cacheblend.model.attention import QueryLayout
from cacheblend.model.runner import ModelRunner


@dataclass
class FusionPlan:
    """What one fused prefill computes; host data (CPU tensors), checked and summarised once."""

    ids: torch.Tensor  # (T,) the whole prompt
    active: torch.Tensor  # (n,) sorted positions computed from layer 0; must contain T-1
    cached: list[CachedSpan] = field(default_factory=list)
    chunk_spans: list[tuple[int, int]] = field(default_factory=list)
    checks: list[tuple[int, Selector]] = field(default_factory=list)
    deviation: str = "k"
    capture: bool = False  # record pre-RoPE K/V of active rows (plans without checks only)
    resident: int = 0  # rows [0, resident) are in the request KV already (an earlier slice)
    probe_layers: int = 0  # > 0: query-aware selectors use a probe of the suffix, this deep (capped)
    probe_tokens: int = 0  # > 0: the probe runs only the suffix's last probe_tokens (0: all of it)
    probe_ramp: float = 0.0  # probed layer i of L weighs ((i + 1) / L) ** probe_ramp
    # What a check ratio is a share of: every chunk token of the prompt (0: those of chunk_spans).
    # The planner leaves exact chunks out of chunk_spans (nothing to fuse) but not out of this.
    num_chunk_tokens: int = 0
    # (key, value) scales of the drift correction of chunk rows not recomputed (blend/drift.py);
    # (0, 0): off.
    drift: tuple[float, float] = (0.0, 0.0)
    drift_pool: float = 0.0  # pseudo-tokens at the request-wide mean drift per chunk
    # Derived on the host at construction:
    kind: str = field(init=False)  # attention of the active set: causal | tail | scattered
    num_chunk_active: int = field(init=False)  # active positions inside chunks
    recomputes_cached: bool = field(init=False)  # every cached row is active (none needed)

    def __post_init__(self) -> None:
        total = self.ids.shape[0]
        active = self.active.cpu()  # a no-op for the CPU tensors planners build
        n = active.shape[0]
        assert n > 0 and int(active[-1]) == total - 1, "suffix must run"
        assert bool((active[1:] > active[:-1]).all()), "active positions must be sorted, unique"
        assert not (self.capture and self.checks), "capture needs a fixed active set"
        assert self.probe_layers >= 0, "the planner resolves the probe's depth (-1: all)"
        cached_rows = torch.zeros(total, dtype=torch.bool)
        for span in self.cached:
            cached_rows[span.start : span.end] = True
        covered = cached_rows.clone()
        covered[: self.resident] = True
        covered[active] = True
        assert bool(covered.all()), "every position must be cached or computed"
        in_chunk = torch.zeros(total, dtype=torch.bool)
        for start, end in self.chunk_spans:
            in_chunk[start:end] = True
        self.kind = ("causal" if n == total else
                     "tail" if int(active[0]) == total - n else "scattered")
        self.num_chunk_active = int(in_chunk[active].sum())
        if any(self.drift) and self.checks and not bool(
                in_chunk[active][: self.num_chunk_active].all()):  # drift reads them as a slice
            raise ValueError("with drift correction, active chunk positions must precede the "
                             "others")
        self.recomputes_cached = bool(cached_rows[active].sum() == cached_rows.sum())
        self.num_chunk_tokens = self.num_chunk_tokens or sum(e - s for s, e in self.chunk_spans)

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
    logits: torch.Tensor  # (V,) fp32, for the last prompt position
    computed: torch.Tensor  # positions whose K/V at the last layer are fresh (sorted, device)
    active_per_layer: list[int]
    captured: list[tuple[torch.Tensor, torch.Tensor]] | None  # per layer (K pre-RoPE, V)
    load_seconds: float = 0.0  # moving cached rows into the request KV (copy, convert, rotate)
    load_bytes: int = 0


@dataclass
class _Pass:
    """One request's way through the layers: device tensors and what the host knows of them."""

    hidden: torch.Tensor  # (n, D)
    positions: torch.Tensor  # (n,) sorted, on the device
    layout: QueryLayout  # the queries' attention, built once per set of positions
    in_chunk: torch.Tensor  # (T,) bool on the device: position lies in a chunk
    num_candidates: int  # active chunk tokens (known on the host)
    recomputes_cached: bool
    captured: list | None
    active_per_layer: list[int] = field(default_factory=list)
    computed: torch.Tensor | None = None
    probed: torch.Tensor | None = None  # (T,) the last position's output shares from a probe
    drift: DriftCorrection | None = None

    @property
    def n(self) -> int:
        return self.positions.shape[0]


def run_to_end(steps: Generator):
    """Advance a generator (the layer loop, or anything built on it) to its end; its return
    value."""
    while True:
        try:
            next(steps)
        except StopIteration as done:
            return done.value


def first_true(mask: torch.Tensor, count: int) -> torch.Tensor:
    """Ascending indices of the ``count`` True entries of ``mask`` (n,), without reading the
    mask on the host (``mask.nonzero()`` would): a stable sort puts them first, in order."""
    return torch.sort((~mask).to(torch.uint8), stable=True).indices[:count]


class Fusor:
    def __init__(self, runner: ModelRunner, controller=None) -> None:
        self.runner = runner
        self.controller = controller  # a LoadingController told the measured load rate

    def run(self, plan: FusionPlan, kv: RequestKV, loading: str = "bulk") -> FusionResult:
        """Run every layer of ``plan``; ``loading`` is one of cacheblend.config.LOADING_MODES."""
        return run_to_end(self.layers(plan, kv, loading))

    @torch.inference_mode()
    def layers(self, plan: FusionPlan, kv: RequestKV, loading: str = "bulk"
               ) -> Generator[int, None, FusionResult]:
        """The layer loop as a generator: yields the number of tokens each layer computed (a
        host-known count), so a caller can interleave other work between layers (chunked
        prefill); returns the result. A caller that stops early must ``close()`` it."""
        runner = self.runner
        total = plan.ids.shape[0]
        assert kv.capacity >= total
        state = self._start(plan, kv)
        checks = dict(plan.checks)
        loader = LayerLoader(plan.cached, runner.rope, kv, mode=loading)
        if plan.probe_layers and any(s.needs_attention for _, s in plan.checks):
            count = suffix_count(plan.active, plan.chunk_spans)
            probed = min(count, plan.probe_tokens or count)
            state.probed = probe_attention(runner, plan.ids, state.positions[state.n - probed:],
                                           kv, loader, plan.probe_layers,
                                           cached_end=total - count, ramp=plan.probe_ramp)
        try:
            for index in range(runner.num_layers):
                self._layer(index, plan, checks.get(index), state, kv, loader)
                yield state.active_per_layer[-1]
        finally:
            loader.close()
        kv.length = max(kv.length, total)
        load_seconds = loader.seconds() if loader.nbytes else 0.0
        if self.controller is not None and loader.nbytes:
            self.controller.observe_transfer(loader.nbytes, load_seconds)
        return FusionResult(
            logits=runner.logits(state.hidden[-1:])[0],
            computed=state.computed,
            active_per_layer=state.active_per_layer,
            captured=state.captured,
            load_seconds=load_seconds,
            load_bytes=loader.nbytes,
        )

    def _start(self, plan: FusionPlan, kv: RequestKV) -> _Pass:
        """Index tensors on the device, once per request (with the drift correction's tables,
        the only host->device copies)."""
        device = kv.keys.device
        total = plan.ids.shape[0]
        positions = plan.active.to(device)
        in_chunk = torch.zeros(total, dtype=torch.bool, device=device)
        for start, end in plan.chunk_spans:
            in_chunk[start:end] = True
        return _Pass(
            hidden=self.runner.embed(plan.ids[plan.active.to(plan.ids.device)].to(device)),
            positions=positions,
            layout=self.runner.attention.layout(plan.kind, positions, total),
            in_chunk=in_chunk,
            num_candidates=plan.num_chunk_active,
            recomputes_cached=plan.recomputes_cached,
            captured=[] if plan.capture else None,
            drift=(DriftCorrection(plan.chunk_spans, total, plan.drift, self.runner.rope, device,
                                   plan.drift_pool)
                   if any(plan.drift) and plan.checks and plan.chunk_spans else None),
        )

    def _layer(self, index: int, plan: FusionPlan, selector: Selector | None, state: _Pass,
               kv: RequestKV, loader: LayerLoader) -> None:
        """One layer for the active tokens: load cached rows, project, (select), overwrite the
        cached rows with fresh K/V, attend with the exact causal mask, MLP."""
        runner, rope = self.runner, self.runner.rope
        total = plan.ids.shape[0]
        # Cached rows are needed unless every one of them is recomputed at this layer (a layer
        # already being prefetched is waited for all the same, before fresh rows go in).
        if selector is not None or not state.recomputes_cached or loader.pending(index):
            loader.load(index, runner.num_layers)
        q, k_raw, v = runner.project_qkv(index, state.hidden)
        if state.captured is not None:
            state.captured.append((k_raw, v))
        k = rope.apply(k_raw, state.positions)
        layer_keys, layer_values = kv.keys[index, :, :total], kv.values[index, :, :total]
        keep, computed_chunk = None, state.num_candidates  # chunk rows come first (the plan)
        # The drift correction comes first (layers after the first: layer 0's K/V depend on the
        # token alone; and not while every cached row is recomputed, when a layer's rows may not
        # even be loaded): a check layer's selector then compares fresh K/V with the corrected
        # rows, and ranks tokens by the error the correction leaves, the error that a token not
        # recomputed would keep.
        if state.drift is not None and index > 0 and not state.recomputes_cached:
            state.drift.correct(state.positions, computed_chunk, k_raw, v, layer_keys,
                                layer_values)
        if selector is not None:
            keep = self._select(plan, selector, state, k, v, layer_keys, layer_values, q, rope)
        # Fresh K/V overwrite cached rows for every token computed at this layer.
        layer_keys[:, state.positions] = k
        layer_values[:, state.positions] = v
        if keep is not None:  # narrowed: from now on only the kept tokens run
            state.hidden, q, positions = state.hidden[keep], q[:, keep], state.positions[keep]
            state.positions = positions
            state.recomputes_cached = False
            state.layout = runner.attention.layout("scattered", positions, total)
        state.active_per_layer.append(state.n)
        if index == runner.num_layers - 1:
            state.computed = state.positions
            # Only the last position's output is read; it sees every key.
            state.hidden, q = state.hidden[-1:], q[:, -1:]
            state.positions = state.positions[-1:]
            state.layout = runner.attention.layout("tail", state.positions, total)
        q = rope.apply(q, state.positions)
        attn = runner.attend_layout(q, layer_keys, layer_values, state.layout)
        state.hidden = runner.finish_layer(index, state.hidden, attn)

    @staticmethod
    def _select(plan: FusionPlan, selector: Selector, state: _Pass, fresh_k, fresh_v,
                layer_keys, layer_values, q=None, rope=None) -> torch.Tensor | None:
        """Indices (into the active tokens) of those that keep running: non-chunk tokens always,
        chunk tokens by the selector; None when every token is kept.

        A query-aware selector also gets each chunk token's share of the last position's
        attention output at this layer (its query against the fresh K/V of the computed rows,
        cached K/V elsewhere): the suffix computes that attention anyway, so it costs T scores,
        no extra layer; or, with a probe pass (``state.probed``, blend/probe.py), the probe's."""
        positions, n, candidates_n = state.positions, state.n, state.num_candidates
        in_chunk = state.in_chunk[positions]  # (n,)
        keep = ~in_chunk
        if candidates_n:
            chunk_index = first_true(in_chunk, candidates_n)  # (c,)
            chunk_positions = positions[chunk_index]
            deviation = kv_deviation(
                fresh_k[:, chunk_index], layer_keys[:, chunk_positions],
                fresh_v[:, chunk_index], layer_values[:, chunk_positions], plan.deviation,
            ) if selector.needs_deviation else None
            attention = None
            if selector.needs_attention and state.probed is not None:
                attention = state.probed[chunk_positions]
            elif selector.needs_attention:
                keys, values = layer_keys.clone(), layer_values.clone()  # (KV, T, hd)
                keys[:, positions], values[:, positions] = fresh_k, fresh_v
                key_positions = torch.arange(keys.shape[1], device=positions.device)
                last = positions[-1:]  # T-1: the position that writes the answer
                probs = suffix_probs(rope.apply(q[:, -1:], last), last, keys, key_positions)
                attention = output_share(probs[:, :, -1], values)[chunk_positions]
            candidates = Candidates(chunk_positions, deviation, plan.chunk_spans,
                                    plan.num_chunk_tokens, attention)
            keep[chunk_index] = selector.keep(candidates)
        kept = selector.kept_count(candidates_n, plan.num_chunk_tokens) if candidates_n else 0
        num_keep = n - candidates_n + kept if kept is not None else host_sync(keep.sum())
        if num_keep == n:
            return None
        state.num_candidates = num_keep - (n - candidates_n)
        return first_true(keep, num_keep)

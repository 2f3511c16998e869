"""Engine: the one place the parts meet. The CLI, the server, the benchmarks and the tests call it.

ingest(documents)  -> precompute each document's KV (after the configured preamble) and store it
generate(request)  -> segments -> store lookups (misses computed and stored) -> fusion plan for
                      the request's method -> fused prefill -> decode; with per-request stats
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass, field, replace

import torch
from tqdm import tqdm

from cacheblend.blend.controller import LoadingController
from cacheblend.blend.fusor import FusionPlan, Fusor
from cacheblend.blend.loader import CachedSpan
from cacheblend.blend.select import FirstKSelector, HKVDSelector, UnionSelector, first_k_mask
from cacheblend.config import METHODS, BlendConfig, EngineConfig
from cacheblend.decode import Sampler, SamplingParams, StopChecker
from cacheblend.device import dtype_name
from cacheblend.errors import InvalidRequestError
from cacheblend.kv import RequestKV
from cacheblend.model.loader import LoadedModel, load_model
from cacheblend.model.runner import ModelRunner
from cacheblend.prompt import PromptBuilder, Segments
from cacheblend.store.base import ChunkKV, KVStore
from cacheblend.store.factory import open_store
from cacheblend.store.keys import chunk_key, prefix_key

log = logging.getLogger(__name__)

STORE_DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "int8": torch.float16}


@dataclass
class GenerateRequest:
    """One request. Either (documents, question) with optional system/instruction overrides,
    or ready-made ``segments`` (separator mode)."""

    question: str = ""
    documents: list[str] = field(default_factory=list)
    system: str | None = None
    instruction: str | None = None
    segments: Segments | None = None
    method: str | None = None
    ratio: float | None = None
    sampling: SamplingParams = field(default_factory=SamplingParams)


@dataclass
class RequestStats:
    method: str
    ratio: float | None
    prompt_tokens: int
    chunk_tokens: int
    reused_tokens: int  # positions whose final K/V came from cache
    recomputed_tokens: int  # cached positions computed again (selected by the fusor)
    computed_tokens: int  # positions with fresh K/V at the last layer
    missed_tokens: int  # chunk/prefix tokens with no entry: computed and stored first
    ttft_s: float
    prefill_s: float
    miss_s: float
    load_s: float = 0.0  # store lookups (read, verify, decode)
    load_bytes: int = 0
    requested_method: str = ""
    controller: str = ""  # the loading controller's reason for what ran
    decode_s: float = 0.0
    completion_tokens: int = 0
    store_s: float = 0.0  # store writes after the first token (prefix entries, fallback misses)

    def to_dict(self) -> dict:
        return asdict(self)


@dataclass
class GenerateResult:
    text: str
    token_ids: list[int]
    finish_reason: str
    stats: RequestStats
    first_logits: torch.Tensor | None = None


@dataclass
class IngestResult:
    key: str
    num_tokens: int
    cached: bool  # already in the store


@dataclass
class _Lookup:
    """What the store gave for a request's segments."""

    spans: list[CachedSpan] = field(default_factory=list)
    missed_tokens: int = 0
    miss_s: float = 0.0
    load_s: float = 0.0
    load_bytes: int = 0
    deferred: list[tuple[int, int]] = field(default_factory=list)  # misses stored after
    reason: str = ""


class Engine:
    def __init__(self, config: EngineConfig | None = None, store: KVStore | None = None,
                 loaded: LoadedModel | None = None) -> None:
        self.config = config or EngineConfig()
        if self.config.threads:
            torch.set_num_threads(self.config.threads)
        self.loaded = loaded or load_model(self.config.model, self.config.device,
                                           dtype=self.config.dtype)
        self.tokenizer = self.loaded.tokenizer
        self.runner = self.loaded.runner()
        if loaded is not None:  # an engine over a loaded model computes where and as it does
            self.config = replace(self.config, device=str(self.runner.device),
                                  dtype=dtype_name(self.runner.dtype))
        self.controller = LoadingController(self.runner.num_layers, self.config.blend.min_ratio)
        self.fusor = Fusor(self.runner, self.config.loading, self.controller)
        self.prompts = PromptBuilder(self.tokenizer)
        self.fingerprint = self.loaded.fingerprint
        if store is None:
            store = open_store(self.config.store, model_fingerprint=self.fingerprint,
                               codec=self.config.store_codec)
        self.store = store
        self.eos_ids = _eos_ids(self.tokenizer, self.loaded.model)
        self.lock = threading.RLock()  # one model: requests compute one at a time

    # --- segments ---------------------------------------------------------------------------

    def segments_for(self, request: GenerateRequest) -> Segments:
        if request.segments is not None:
            return request.segments
        system = self.config.system_prompt if request.system is None else request.system
        instruction = (self.config.instruction if request.instruction is None
                       else request.instruction)
        return self.prompts.build(system, instruction, request.documents, request.question)

    def default_prefix(self) -> tuple[int, ...]:
        return self.prompts.build(self.config.system_prompt, self.config.instruction, [], "").prefix

    def preamble_for(self, prefix: tuple[int, ...], blend: BlendConfig) -> tuple[int, ...]:
        """Tokens a chunk is precomputed after; part of the chunk's key."""
        if blend.precompute == "alone":
            return ()
        if blend.precompute == "sink":
            bos = self.tokenizer.bos_token_id
            return (bos if bos is not None else 0,)
        if blend.precompute == "preamble":
            return self.prompts.template_ids(blend.preamble)
        return prefix

    # --- precompute and store ---------------------------------------------------------------

    def _to_entry(self, kv: list[tuple[torch.Tensor, torch.Tensor]], start: int, end: int) -> ChunkKV:
        dtype = STORE_DTYPES[self.config.store_codec]
        keys = torch.stack([k[:, start:end] for k, _ in kv]).to(dtype)
        values = torch.stack([v[:, start:end] for _, v in kv]).to(dtype)
        return ChunkKV(keys.cpu().contiguous(), values.cpu().contiguous(),
                       meta={"model": self.fingerprint})

    def _precompute(self, preamble: tuple[int, ...], chunk: tuple[int, ...],
                    blend: BlendConfig) -> ChunkKV:
        """Compute a chunk after its preamble, store it (and the preamble as a prefix entry)."""
        ids = torch.tensor(preamble + chunk, dtype=torch.long, device=self.config.device)
        _, kv = self.runner.prefill(ids, return_kv=True)
        entry = self._to_entry(kv, len(preamble), len(preamble) + len(chunk))
        self.store.put(chunk_key(self.fingerprint, preamble, chunk), entry)
        if preamble and blend.precompute == "prefix":
            self.store.put(prefix_key(self.fingerprint, (), preamble),
                           self._to_entry(kv, 0, len(preamble)))
        return entry

    def _compute_prefix(self, prefix: tuple[int, ...]) -> ChunkKV:
        """Compute and store the exact KV of the prefix at position 0."""
        ids = torch.tensor(prefix, dtype=torch.long, device=self.config.device)
        _, kv = self.runner.prefill(ids, return_kv=True)
        entry = self._to_entry(kv, 0, len(prefix))
        self.store.put(prefix_key(self.fingerprint, (), prefix), entry)
        return entry

    def ingest(self, documents: list[str], progress: bool = True,
               blend: BlendConfig | None = None) -> list[IngestResult]:
        """Precompute and store every document's KV (skipping those already stored)."""
        blend = blend or self.config.blend
        preamble = self.preamble_for(self.default_prefix(), blend)
        results = []
        with self.lock, torch.inference_mode():
            for text in tqdm(documents, desc="ingest", unit="doc", disable=not progress):
                chunk = self.prompts.chunk_ids(text)
                self._check_length(len(preamble) + len(chunk))
                key = chunk_key(self.fingerprint, preamble, chunk)
                cached = self.store.get(key) is not None
                if not cached:
                    self._precompute(preamble, chunk, blend)
                results.append(IngestResult(key=key, num_tokens=len(chunk), cached=cached))
            self.ensure_prefix(self.default_prefix())
        return results

    def ensure_prefix(self, prefix: tuple[int, ...]) -> None:
        """Store the exact KV of ``prefix`` unless it is stored already."""
        if prefix and self.store.get(prefix_key(self.fingerprint, (), prefix)) is None:
            with self.lock, torch.inference_mode():
                self._compute_prefix(prefix)

    # --- plans --------------------------------------------------------------------------------

    def _probe(self, segments: Segments, preamble: tuple[int, ...]) -> tuple[list, _Lookup]:
        """Look up the prefix and every chunk; None where missing. Timed for the controller."""
        lookup = _Lookup()
        start = time.perf_counter()
        keys = [prefix_key(self.fingerprint, (), segments.prefix)] if segments.prefix else []
        keys += [chunk_key(self.fingerprint, preamble, c) for c in segments.chunks]
        entries = [self.store.get(key) for key in keys]
        lookup.load_s = time.perf_counter() - start
        lookup.load_bytes = sum(e.nbytes for e in entries if e is not None)
        self.controller.observe_load(lookup.load_bytes, lookup.load_s)
        if not segments.prefix:
            entries.insert(0, None)
        return entries, lookup

    def _lookup_chunks(self, segments: Segments, method: str, blend: BlendConfig):
        """Entries for the prefix and every chunk (misses computed and stored first), unless
        the controller finds a full prefill cheaper: then (None, lookup, decision)."""
        preamble = self.preamble_for(segments.prefix, blend)
        entries, lookup = self._probe(segments, preamble)
        missed = [i for i, e in enumerate(entries[1:]) if e is None]
        chunk_tokens = sum(len(c) for c in segments.chunks)
        lookup.missed_tokens = sum(len(segments.chunks[i]) for i in missed)
        decision = self.controller.decide(
            method, blend.ratio, blend.check_layers[0], chunk_tokens, lookup.missed_tokens,
            lookup.load_bytes, fallback=blend.fallback)
        lookup.reason = decision.reason
        if decision.method == "full":
            lookup.deferred = [(i, 0) for i in missed]
            return None, lookup, decision
        start = time.perf_counter()
        prefix_entry = entries[0]
        if prefix_entry is None and segments.prefix:
            prefix_entry = self._compute_prefix(segments.prefix)
            lookup.missed_tokens += len(segments.prefix)
        if prefix_entry is not None:
            lookup.spans.append(CachedSpan(0, prefix_entry))
        for (begin, _), chunk, entry in zip(segments.chunk_spans(), segments.chunks, entries[1:]):
            if entry is None:
                entry = self._precompute(preamble, chunk, blend)
            lookup.spans.append(CachedSpan(begin, entry))
        lookup.miss_s = time.perf_counter() - start if lookup.missed_tokens else 0.0
        return lookup.spans, lookup, decision

    def _store_deferred(self, segments: Segments, lookup: _Lookup, blend: BlendConfig) -> None:
        """Precompute and store what a fallback request missed (after its answer)."""
        self.ensure_prefix(segments.prefix)
        preamble = self.preamble_for(segments.prefix, blend)
        for index, _ in lookup.deferred:
            self._precompute(preamble, segments.chunks[index], blend)

    def _lookup_prefix_chain(self, segments: Segments) -> list[CachedSpan]:
        """Longest run of exact prefix entries (prefix, chunk 1, chunk 2, ...) from position 0."""
        spans, before = [], ()
        for piece in (segments.prefix, *segments.chunks):
            if not piece:
                continue
            entry = self.store.get(prefix_key(self.fingerprint, before, piece))
            if entry is None:
                break
            spans.append(CachedSpan(len(before), entry))
            before = before + piece
        return spans

    def _store_prefix_chain(self, segments: Segments, computed_from: int,
                            captured: list[tuple[torch.Tensor, torch.Tensor]]) -> None:
        """Store each prefix/chunk segment computed in this request as an exact prefix entry."""
        ids, start = segments.ids, 0
        for piece in (segments.prefix, *segments.chunks):
            end = start + len(piece)
            if piece and start >= computed_from:
                entry = self._to_entry(captured, start - computed_from, end - computed_from)
                self.store.put(prefix_key(self.fingerprint, tuple(ids[:start]), piece), entry)
            start = end

    def _plan(self, segments: Segments, method: str, blend: BlendConfig):
        """(FusionPlan, lookup, method that runs, ratio that runs)."""
        ids = torch.tensor(segments.ids, dtype=torch.long)
        total = ids.shape[0]
        suffix_start = total - len(segments.suffix)
        spans = segments.chunk_spans()
        if method == "prefix":
            cached = self._lookup_prefix_chain(segments)
            start = min(cached[-1].end if cached else 0, total - 1)  # the last token always runs
            plan = FusionPlan(ids, torch.arange(start, total), cached, spans, capture=True)
            return plan, _Lookup(spans=cached), method, None
        if method == "full":
            return FusionPlan(ids, torch.arange(total)), _Lookup(), method, None
        cached, lookup, decision = self._lookup_chunks(segments, method, blend)
        if cached is None:  # the controller's fallback
            return FusionPlan(ids, torch.arange(total)), lookup, "full", None
        suffix = torch.arange(suffix_start, total)
        checks = []
        if method == "reuse":
            active = suffix
        elif method == "epic":
            chunk_positions = torch.cat([torch.arange(s, e) for s, e in spans] or [suffix[:0]])
            keep = first_k_mask(chunk_positions, spans, blend.epic_k)
            active = torch.cat([chunk_positions[keep], suffix])
        else:  # blend
            active = torch.cat([torch.arange(s, e) for s, e in spans] + [suffix])
            blend = blend.with_ratio(decision.ratio)
            for layer, ratio in zip(blend.check_layers, blend.check_ratios):
                selector = HKVDSelector(ratio)
                if blend.first_k:
                    selector = UnionSelector(selector, FirstKSelector(blend.first_k))
                checks.append((min(layer, self.runner.num_layers - 1), selector))
        plan = FusionPlan(ids, active, cached, spans, checks, deviation=blend.deviation)
        return plan, lookup, method, decision.ratio if method == "blend" else None

    # --- generate -----------------------------------------------------------------------------

    def _check_length(self, num_tokens: int) -> None:
        if num_tokens >= self.runner.max_positions:
            raise InvalidRequestError(
                f"prompt has {num_tokens} tokens; the model allows at most "
                f"{self.runner.max_positions - 1} plus generated tokens"
            )

    def _resolve(self, request: GenerateRequest) -> tuple[str, BlendConfig]:
        method = request.method or self.config.blend.method
        if method not in METHODS:
            raise InvalidRequestError(f"method must be one of {', '.join(METHODS)}, got {method!r}")
        blend = self.config.blend
        if request.ratio is not None:
            if not 0.0 <= request.ratio <= 1.0:
                raise InvalidRequestError(f"ratio must lie in [0, 1], got {request.ratio}")
            blend = blend.with_ratio(request.ratio)
        return method, blend

    def prefill(self, request: GenerateRequest) -> tuple[RequestKV, torch.Tensor, RequestStats]:
        """Fused prefill only: (request KV, last-position logits, stats without decode). The
        store writes the request owes are done before it returns."""
        kv, logits, stats, store_writes = self.prefill_then_store(request)
        store_writes()
        return kv, logits, stats

    def prefill_then_store(self, request: GenerateRequest
                           ) -> tuple[RequestKV, torch.Tensor, RequestStats, Callable[[], None]]:
        """As ``prefill``, but the store writes this request owes (its exact-prefix entries,
        chunks a fallback request missed) come back as a call to make once the first token is
        out: they are not part of the time to first token."""
        method, blend = self._resolve(request)
        segments = self.segments_for(request)
        total = segments.num_tokens
        if total == 0:
            raise InvalidRequestError("the prompt is empty")
        self._check_length(total)
        start = time.perf_counter()
        with self.lock, torch.inference_mode():
            plan, lookup, ran, ratio = self._plan(segments, method, blend)
            capacity = min(self.runner.max_positions, total + request.sampling.max_tokens)
            kv = RequestKV(self.runner.num_layers, self.runner.num_kv_heads, self.runner.head_dim,
                           capacity, self.config.device, self.runner.dtype)
            fusion_start = time.perf_counter()
            result = self.fusor.run(plan, kv)
            self.controller.observe_compute(sum(result.active_per_layer),
                                            time.perf_counter() - fusion_start)
            elapsed = time.perf_counter() - start
        cached_rows = torch.zeros(total, dtype=torch.bool)
        for span in plan.cached:
            cached_rows[span.start : span.end] = True
        computed = int(result.computed.shape[0])
        stats = RequestStats(
            method=ran,
            ratio=ratio,
            prompt_tokens=total,
            chunk_tokens=sum(len(c) for c in segments.chunks),
            reused_tokens=total - computed,
            recomputed_tokens=int(cached_rows[result.computed.cpu()].sum()),
            computed_tokens=computed,
            missed_tokens=lookup.missed_tokens,
            ttft_s=elapsed,
            prefill_s=elapsed - lookup.miss_s,
            miss_s=lookup.miss_s,
            load_s=lookup.load_s,
            load_bytes=lookup.load_bytes,
            requested_method=method,
            controller=lookup.reason,
        )

        def store_writes() -> None:
            store_start = time.perf_counter()
            try:
                with self.lock, torch.inference_mode():
                    if ran == "prefix" and result.captured is not None:
                        self._store_prefix_chain(segments, int(plan.active[0]), result.captured)
                    if lookup.deferred:
                        self._store_deferred(segments, lookup, blend)
            except Exception:  # the answer stands; a later request recomputes what is missing
                log.exception("storing the KV a request computed failed")
            stats.store_s = time.perf_counter() - store_start

        return kv, result.logits, stats, store_writes

    def generate_iter(self, request: GenerateRequest) -> Iterator[tuple[str, GenerateResult | None]]:
        """Yields (text delta, None) as tokens are produced, then ("", GenerateResult)."""
        start = time.perf_counter()
        kv, logits, stats, store_writes = self.prefill_then_store(request)
        sampler = Sampler(request.sampling, self.config.device, self.eos_ids)
        stopper = StopChecker(self.tokenizer, request.sampling, self.eos_ids)
        first_logits = logits
        try:
            with self.lock, torch.inference_mode():
                token = sampler(logits)
                stats.ttft_s = time.perf_counter() - start
                decode_start = time.perf_counter()
                while True:
                    delta = stopper.add(token)
                    if delta:
                        yield delta, None
                    if store_writes is not None:  # the first token is out: now store
                        store_writes()
                        store_writes = None
                    if stopper.done:
                        break
                    if kv.length >= kv.capacity:
                        stopper.finish_reason = "length"
                        break
                    token = sampler(decode_step(self.runner, kv, token))
                stats.decode_s = time.perf_counter() - decode_start - stats.store_s
        finally:
            if store_writes is not None:  # the caller stopped reading before the first token
                store_writes()
        stats.completion_tokens = len(stopper.tokens)
        yield "", GenerateResult(stopper.text, stopper.tokens, stopper.finish_reason, stats,
                                 first_logits)

    def generate(self, request: GenerateRequest) -> GenerateResult:
        result = None
        for _, final in self.generate_iter(request):
            result = final or result
        assert result is not None
        return result

    def with_config(self, **blend_changes) -> Engine:
        """A view of this engine (same model and store) with other blend settings."""
        clone = object.__new__(Engine)
        clone.__dict__.update(self.__dict__)
        clone.config = replace(self.config, blend=replace(self.config.blend, **blend_changes))
        return clone


@torch.inference_mode()
def decode_step(runner: ModelRunner, kv: RequestKV, token: int) -> torch.Tensor:
    """Run one token at position kv.length, append its K/V; returns logits (V,)."""
    position = kv.length
    ids = torch.tensor([token], device=kv.keys.device)
    positions = torch.tensor([position], device=kv.keys.device)
    hidden = runner.embed(ids)
    for index in range(runner.num_layers):
        q, k, v = runner.project_qkv(index, hidden)
        kv.keys[index, :, position] = runner.rope.apply(k, positions)[:, 0]
        kv.values[index, :, position] = v[:, 0]
        keys, values = kv.layer(index, position + 1)
        hidden = runner.finish_layer(index, hidden, runner.attend(runner.rope.apply(q, positions),
                                                                  keys, values))
    kv.length = position + 1
    return runner.logits(hidden)[0]


def _eos_ids(tokenizer, model) -> set[int]:
    ids = set()
    for value in (tokenizer.eos_token_id, getattr(model.generation_config, "eos_token_id", None)):
        if isinstance(value, int):
            ids.add(value)
        elif isinstance(value, list | tuple):
            ids.update(int(v) for v in value)
    return ids

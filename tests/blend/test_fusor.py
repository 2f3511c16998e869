"""Fusor correctness: every method against a full prefill, the exact mask, misses, the suffix."""

from __future__ import annotations

import math

import torch

from cacheblend.blend.fusor import FusionPlan, Fusor
from cacheblend.blend.loader import CachedSpan
from cacheblend.config import BlendConfig
from cacheblend.decode import SamplingParams
from cacheblend.engine import GenerateRequest
from cacheblend.kv import RequestKV
from cacheblend.request import RequestSettings
from cacheblend.store.base import ChunkKV
from cacheblend.store.memory import MemoryStore

DOCS = [
    "The Greywater Lighthouse was designed by Miriam Osk and completed in 1798. " * 3,
    "Miriam Osk was born in 1761 in the mountain village of Tarn Hollow. " * 3,
    "The Vesk river reaches the sea at Port Alder after one hundred and forty kilometres. " * 3,
]
QUESTION = "Where was the designer of the lighthouse born?"


def request(method, ratio=None, documents=DOCS):
    return GenerateRequest(question=QUESTION, documents=documents, method=method, ratio=ratio)


def test_blend_with_every_token_selected_equals_full_prefill(engine_factory):
    engine = engine_factory(store_codec="fp32")
    engine.ingest(DOCS, progress=False)
    full_kv, full_logits, _ = engine.prefill(request("full"))
    blend_kv, blend_logits, stats = engine.prefill(request("blend", ratio=1.0))
    assert stats.missed_tokens == 0
    assert stats.recomputed_tokens == stats.chunk_tokens  # every chunk token recomputed
    assert (blend_logits - full_logits).abs().max().item() <= 1e-4
    n = full_kv.length
    assert blend_kv.length == n
    # The same fused KV: every layer, every position (the prefix comes from its exact entry).
    assert (blend_kv.keys[:, :, :n] - full_kv.keys[:, :, :n]).abs().max().item() <= 1e-4
    assert (blend_kv.values[:, :, :n] - full_kv.values[:, :, :n]).abs().max().item() <= 1e-4


def settings(engine, request: GenerateRequest) -> RequestSettings:
    return RequestSettings.resolve(request, engine.config.blend, "bulk")


def test_first_chunk_after_the_prefix_is_exact_and_never_recomputed(engine_factory):
    """In prefix mode the first chunk's entry was computed after exactly the tokens before it,
    at the same positions: it is what a full prefill computes, so blend spends none of its
    budget there (the budget stays a share of every chunk token)."""
    engine = engine_factory(store_codec="fp32")
    engine.ingest(DOCS, progress=False)
    segments = engine.segments_for(request("blend"))
    first = segments.chunk_spans()[0]
    full_kv, full_logits, _ = engine.prefill(request("full"))
    hkvd = BlendConfig(selector="hkvd", check_layers=(1,), check_ratios=(0.15,))
    for ratio in (0.15, 0.5):
        plan = engine.planner.plan(segments, settings(engine, GenerateRequest(
            question=QUESTION, documents=DOCS, method="blend", ratio=ratio, blend=hkvd))).plan
        assert first not in plan.chunk_spans and len(plan.chunk_spans) == len(DOCS) - 1
        assert not bool(((plan.active >= first[0]) & (plan.active < first[1])).any())
        assert plan.num_chunk_tokens == sum(len(c) for c in segments.chunks)
    # The premise: the entry equals full prefill's KV at those positions, every layer.
    blend_kv, _, stats = engine.prefill(GenerateRequest(
        question=QUESTION, documents=DOCS, method="blend", ratio=0.15, blend=hkvd))
    assert stats.recomputed_tokens == -(-15 * stats.chunk_tokens // 100)  # the same budget
    rows = slice(*first)
    assert (blend_kv.keys[:, :, rows] - full_kv.keys[:, :, rows]).abs().max().item() <= 1e-4
    assert (blend_kv.values[:, :, rows] - full_kv.values[:, :, rows]).abs().max().item() <= 1e-4
    # Every other chunk token recomputed (budget 99% of all > the other chunks): full's logits.
    _, logits, stats = engine.prefill(GenerateRequest(
        question=QUESTION, documents=DOCS, method="blend", ratio=0.99, blend=hkvd))
    assert stats.recomputed_tokens == stats.chunk_tokens - (first[1] - first[0])
    assert (logits - full_logits).abs().max().item() <= 1e-4


def test_borrowed_or_preamble_first_chunk_is_not_exact(engine_factory):
    engine = engine_factory(store_codec="fp32", blend={"precompute": "preamble"})
    engine.ingest(DOCS, progress=False)
    segments = engine.segments_for(request("blend"))
    assert engine.planner.plan(segments, settings(engine, request("blend"))).lookup.exact \
        == set()
    other = BlendConfig(precompute="prefix")  # no own-prefix entries: borrows the preamble's
    borrowed = engine.planner.plan(segments, settings(engine, GenerateRequest(
        question=QUESTION, documents=DOCS, method="blend", blend=other)))
    assert borrowed.lookup.borrowed_tokens == sum(len(c) for c in segments.chunks)
    assert borrowed.lookup.exact == set()
    assert len(borrowed.plan.chunk_spans) == len(DOCS)


def test_prefix_with_cached_prefix_and_no_chunks_equals_full(engine_factory):
    engine = engine_factory(store_codec="fp32")
    first = engine.prefill(request("prefix", documents=[]))[2]
    assert first.reused_tokens == 0  # nothing cached yet: computes all and stores the prefix
    _, logits, stats = engine.prefill(request("prefix", documents=[]))
    _, full_logits, _ = engine.prefill(request("full", documents=[]))
    assert stats.reused_tokens == stats.prompt_tokens - len(engine.segments_for(
        request("prefix", documents=[])).suffix)
    assert (logits - full_logits).abs().max().item() <= 1e-4


def test_prefix_chain_reuses_whole_segments_in_order(engine_factory):
    engine = engine_factory(store_codec="fp32")
    engine.prefill(request("prefix"))
    _, logits, stats = engine.prefill(request("prefix"))
    _, full_logits, _ = engine.prefill(request("full"))
    segments = engine.segments_for(request("prefix"))
    assert stats.reused_tokens == segments.num_tokens - len(segments.suffix)
    assert (logits - full_logits).abs().max().item() <= 1e-4
    # Another order of the same documents: only the system prefix is an exact prefix.
    _, _, reordered = engine.prefill(request("prefix", documents=DOCS[::-1]))
    assert reordered.reused_tokens == len(segments.prefix)


def test_suffix_is_always_recomputed(engine_factory):
    engine = engine_factory()
    engine.ingest(DOCS, progress=False)
    segments = engine.segments_for(request("blend"))
    suffix_len = len(segments.suffix)
    for method, ratio in (("reuse", None), ("blend", 0.0), ("blend", 0.15), ("epic", None)):
        _, _, stats = engine.prefill(request(method, ratio))
        assert stats.computed_tokens >= suffix_len, method
        assert stats.computed_tokens - stats.recomputed_tokens == suffix_len, method


def test_blend_selects_the_ratio_of_chunk_tokens(engine_factory):
    engine = engine_factory()
    engine.ingest(DOCS, progress=False)
    _, _, stats = engine.prefill(request("blend", ratio=0.15))
    # The default's probe takes its token-layers out of the 15%: the rest is recomputed.
    assert 0.0 < stats.ratio < 0.15
    assert stats.recomputed_tokens == math.ceil(stats.ratio * stats.chunk_tokens)
    hkvd = GenerateRequest(question=QUESTION, documents=DOCS, method="blend", ratio=0.15,
                           blend=BlendConfig(selector="hkvd", check_layers=(1,), check_ratios=(0.15,)))
    _, _, stats = engine.prefill(hkvd)
    assert stats.recomputed_tokens == -(-15 * stats.chunk_tokens // 100)  # ceil(0.15 x chunk)
    _, _, epic = engine.prefill(request("epic"))
    # The first chunk, computed after the request's own prefix, is exact: no sink to fix there.
    assert epic.recomputed_tokens == 16 * (len(DOCS) - 1)


def test_miss_is_computed_stored_and_hit_next_time(engine_factory):
    engine = engine_factory(blend={"fallback": False})
    _, first_logits, first = engine.prefill(request("blend"))
    segments = engine.segments_for(request("blend"))
    assert first.missed_tokens == sum(len(c) for c in segments.chunks) + len(segments.prefix)
    entries = engine.store.stats().entries
    assert entries == len(DOCS) + 1  # each chunk and the prefix
    _, second_logits, second = engine.prefill(request("blend"))
    assert second.missed_tokens == 0
    assert engine.store.stats().entries == entries
    # A miss costs time, not correctness.
    assert (first_logits - second_logits).abs().max().item() <= 1e-4


def test_exact_mask_for_scattered_recompute(runner):
    """Cached rows taken from a full prefill are exact; recomputing any scattered subset with the
    exact causal mask must then reproduce the full prefill. The reference implementations'
    bottom-right mask lets early selected tokens see later keys, which must differ."""
    torch.manual_seed(0)
    total = 120
    ids = torch.randint(0, runner.vocab_size, (total,))
    full_logits, full_kv = runner.prefill(ids, return_kv=True)
    cached = ChunkKV(torch.stack([k for k, _ in full_kv]), torch.stack([v for _, v in full_kv]))
    active = torch.tensor([3, 17, 18, 40, 77, 100, total - 1])
    plan = FusionPlan(ids, active, [CachedSpan(0, cached)])

    def run(fusor):
        kv = RequestKV(runner.num_layers, runner.num_kv_heads, runner.head_dim, total)
        return fusor.run(plan, kv).logits

    exact = run(Fusor(runner))
    assert (exact - full_logits[0]).abs().max().item() <= 1e-4

    class BottomRightFusor(Fusor):
        """The known bug: selected queries treated as the last rows of the prompt."""

        def run(self, plan, kv, loading="bulk"):
            def scattered(q, keys, values, layout):
                n, t = layout.positions.shape[0], keys.shape[1]
                mask = torch.ones(n, t, dtype=torch.bool).tril(diagonal=t - n)
                return runner.attention.full(q, keys, values, mask)

            runner.attention.scattered = scattered
            try:
                return super().run(plan, kv, loading)
            finally:
                del runner.attention.scattered

    wrong = run(BottomRightFusor(runner))
    assert (wrong - full_logits[0]).abs().max().item() > 1e-2


def test_blend_beats_reuse_on_first_token(engine_factory):
    engine = engine_factory()
    engine.ingest(DOCS, progress=False)
    _, full, _ = engine.prefill(request("full"))
    _, reuse, _ = engine.prefill(request("reuse"))
    _, blend, _ = engine.prefill(request("blend", ratio=0.3))

    def kl(logits):
        return torch.nn.functional.kl_div(logits.log_softmax(-1), full.log_softmax(-1),
                                          log_target=True, reduction="sum").item()

    assert kl(blend) < kl(reuse)


def test_controller_falls_back_to_full_on_misses_and_stores_them(engine_factory):
    engine = engine_factory()
    _, logits, first = engine.prefill(request("blend"))
    assert first.method == "full" and first.requested_method == "blend"
    assert "cheaper" in first.controller
    _, full_logits, _ = engine.prefill(request("full"))
    assert (logits - full_logits).abs().max().item() <= 1e-4  # it really ran a full prefill
    _, _, second = engine.prefill(request("blend"))  # the misses were stored afterwards
    assert second.method == "blend" and second.missed_tokens == 0


def test_controller_blends_when_most_chunks_hit(engine_factory):
    engine = engine_factory()
    engine.ingest(DOCS[:2], progress=False)
    _, _, stats = engine.prefill(request("blend"))
    assert stats.method == "blend"
    assert stats.missed_tokens == len(engine.segments_for(request("blend")).chunks[2])


def test_loading_modes_give_identical_results(engine_factory):
    engine = engine_factory()
    engine.ingest(DOCS, progress=False)
    results = {}
    for mode in ("bulk", "layer", "prefetch"):  # a per-request setting
        results[mode] = engine.prefill(GenerateRequest(**{**vars(request("blend")),
                                                          "loading": mode}))[1]
    # The same arithmetic on differently shaped tensors: equal up to fp32 rounding.
    assert torch.equal(results["layer"], results["prefetch"])
    assert (results["bulk"] - results["layer"]).abs().max().item() <= 1e-4


def test_blend_without_prefix_keeps_fresh_early_layers(engine_factory):
    """With no prefix every cached row is recomputed up to the check layer, so loading starts
    there; the fresh rows of earlier layers must survive it (decode reads them). Layer-0 K/V
    depend on the token alone, so a check layer of 2 is what exposes an overwrite."""
    from cacheblend.prompt import Segments

    engine = engine_factory(store_codec="fp32", blend={"check_layers": (2,), "check_ratios": (0.12,),
                                                        "selector": "qa"})
    full_segments = engine.segments_for(request("full"))
    segments = Segments((), full_segments.chunks, full_segments.suffix)
    bare = GenerateRequest(segments=segments, method="blend", ratio=1.0)
    engine.prefill(bare)  # stores the chunks
    blend_kv, blend_logits, stats = engine.prefill(bare)
    assert stats.missed_tokens == 0
    full_kv, full_logits, _ = engine.prefill(GenerateRequest(segments=segments, method="full"))
    n = full_kv.length
    assert (blend_logits - full_logits).abs().max().item() <= 1e-4
    assert (blend_kv.keys[:, :, :n] - full_kv.keys[:, :, :n]).abs().max().item() <= 1e-4
    assert (blend_kv.values[:, :, :n] - full_kv.values[:, :, :n]).abs().max().item() <= 1e-4


class CountingStore(MemoryStore):
    """A memory store that counts its writes."""

    def __init__(self) -> None:
        super().__init__()
        self.puts = 0

    def put(self, key, value) -> None:
        self.puts += 1
        super().put(key, value)


def test_store_writes_come_after_the_first_token(engine_factory):
    """A fallback request's misses and a prefix request's entries are stored once its first
    token is out: they are not part of its TTFT."""
    for method in ("blend", "prefix"):  # blend with nothing stored falls back to full
        store = CountingStore()
        engine = engine_factory(store=store)
        stream = engine.generate_iter(
            GenerateRequest(question=QUESTION, documents=DOCS, method=method,
                            sampling=SamplingParams(max_tokens=4, temperature=0.0)))
        first_delta, _ = next(stream)
        assert first_delta and store.puts == 0, method
        stream.close()  # a client that leaves after the first token: the writes still happen
        assert store.puts >= len(DOCS), method
        _, _, stats = engine.prefill(request(method))
        assert stats.missed_tokens == 0 and stats.reused_tokens > 0, method


def test_prefill_stores_before_it_returns(engine_factory):
    store = CountingStore()
    engine = engine_factory(store=store)
    _, _, stats = engine.prefill(request("blend"))
    assert stats.method == "full" and store.puts >= len(DOCS)

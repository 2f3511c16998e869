"""Selectors: HKVD budget, first-k, unions, deviation measures."""

from __future__ import annotations

import math

import pytest
import torch

from cacheblend.blend.select import (
    Candidates,
    ChunkBudgetSelector,
    FirstKSelector,
    HKVDSelector,
    QueryAttentionSelector,
    QueryDeviationSelector,
    UnionSelector,
    first_k_mask,
    kv_deviation,
    make_selector,
    output_share,
    suffix_probs,
)
from cacheblend.config import SELECTORS, BlendConfig
from cacheblend.errors import ConfigError

SPANS = [(10, 20), (20, 40)]


def candidates(deviation, attention=None):
    positions = torch.arange(10, 40)
    if attention is not None:
        attention = torch.tensor(attention, dtype=torch.float32)
    return Candidates(positions, torch.tensor(deviation, dtype=torch.float32), SPANS, 30,
                      attention)


def kept(mask):
    return mask.nonzero().squeeze(1).tolist()


def test_hkvd_keeps_the_top_ratio_by_deviation():
    deviation = [0.0] * 30
    deviation[5], deviation[17], deviation[29] = 3.0, 2.0, 1.0
    keep = HKVDSelector(0.1).keep(candidates(deviation))  # ceil(0.1 x 30) = 3
    assert keep.nonzero().squeeze(1).tolist() == [5, 17, 29]


def test_hkvd_ratio_zero_keeps_nothing_and_one_keeps_all():
    assert not HKVDSelector(0.0).keep(candidates([1.0] * 30)).any()
    assert HKVDSelector(1.0).keep(candidates([1.0] * 30)).all()


def test_first_k_per_chunk():
    keep = FirstKSelector(3).keep(candidates([0.0] * 30))
    assert (torch.arange(10, 40)[keep]).tolist() == [10, 11, 12, 20, 21, 22]
    assert first_k_mask(torch.tensor([5, 10, 19, 20, 39]), SPANS, 1).tolist() == [
        False, True, False, True, False]


def test_union_of_hkvd_and_first_k():
    deviation = [0.0] * 30
    deviation[29] = 5.0
    keep = UnionSelector(HKVDSelector(1 / 30), FirstKSelector(1)).keep(candidates(deviation))
    assert (torch.arange(10, 40)[keep]).tolist() == [10, 20, 39]


def test_deviation_measures():
    torch.manual_seed(0)
    k, v = torch.randn(3, 5, 8), torch.randn(3, 5, 8)
    k2, v2 = k.clone(), v.clone()
    k2[:, 1] += 1.0
    v2[:, 3] += 2.0
    assert kv_deviation(k2, k, v2, v, "k").argmax().item() == 1
    assert kv_deviation(k2, k, v2, v, "v").argmax().item() == 3
    both = kv_deviation(k2, k, v2, v, "kv")
    assert both[1] > 0 and both[3] > 0 and both[0] == 0


def test_query_attention_keeps_what_the_question_reads():
    attention = [0.01] * 30
    attention[3], attention[20] = 0.5, 0.3
    deviation = [0.0] * 30
    deviation[7] = 9.0  # HKVD's pick, ignored by the question
    keep = QueryAttentionSelector(2 / 30).keep(candidates(deviation, attention))
    assert kept(keep) == [3, 20]
    assert kept(HKVDSelector(1 / 30).keep(candidates(deviation, attention))) == [7]


def test_query_deviation_weighs_deviation_by_attention():
    deviation = [1.0] * 30
    deviation[4], deviation[25] = 10.0, 10.0
    attention = [0.02] * 30
    attention[25] = 0.2  # both deviate as much; the question reads token 25
    attention[12] = 0.3  # read, but its cached KV is nearly right
    deviation[12] = 0.1
    keep = QueryDeviationSelector(1 / 30).keep(candidates(deviation, attention))
    assert kept(keep) == [25]


def test_chunk_budget_follows_attention_mass():
    # chunk 1 = candidates 0..9, chunk 2 = 10..29; the question reads chunk 2 three times more
    attention = [0.025] * 10 + [0.0375] * 20  # masses 0.25 and 0.75
    deviation = list(range(30, 0, -1))  # HKVD alone would take chunk 1's tokens first
    keep = ChunkBudgetSelector(8 / 30).keep(candidates(deviation, attention))
    assert keep.sum() == 8
    assert kept(keep) == [0, 1, 10, 11, 12, 13, 14, 15]  # 2 : 6, each by deviation


def test_every_selector_is_compute_matched_at_a_fixed_budget():
    torch.manual_seed(0)
    deviation, attention = torch.rand(30).tolist(), torch.softmax(torch.randn(30), 0).tolist()
    for name in SELECTORS:
        for ratio in (0.0, 0.05, 0.15, 0.3, 1.0):
            keep = make_selector(name, ratio).keep(candidates(deviation, attention))
            assert keep.sum() == min(30, -(-ratio * 30 // 1)), (name, ratio)


def test_adaptive_coverage_keeps_the_smallest_set_holding_the_mass_capped():
    attention = [0.0] * 30
    attention[0], attention[1], attention[2] = 0.6, 0.3, 0.1  # an easy prompt
    keep = QueryAttentionSelector(0.5, coverage=0.85).keep(candidates([1.0] * 30, attention))
    assert kept(keep) == [0, 1]  # 0.6 + 0.3 >= 0.85
    flat = [1 / 30] * 30  # a hard one: the cap binds
    keep = QueryAttentionSelector(0.2, coverage=0.99).keep(candidates([1.0] * 30, flat))
    assert keep.sum() == 6
    deviation = [3.0, 2.0] + [1.0] * 28  # scores (dev x attention) 1.8, 0.6, 0.1, 0, ...
    keep = ChunkBudgetSelector(0.5, coverage=0.85).keep(candidates(deviation, attention))
    assert kept(keep) == [0, 1]


def test_selectors_needing_attention_say_so():
    assert not HKVDSelector(0.1).needs_attention
    assert QueryAttentionSelector(0.1).needs_attention
    assert UnionSelector(FirstKSelector(2), QueryDeviationSelector(0.1)).needs_attention
    keep = make_selector("qa", 1 / 30, first_k=1).keep(candidates([0.0] * 30, [0.0] * 29 + [1.0]))
    assert kept(keep) == [0, 10, 29]


def test_output_share_is_causal_sums_to_one_and_weighs_attention_by_value_norm():
    torch.manual_seed(0)
    q, keys, values = torch.randn(4, 1, 8), torch.randn(2, 6, 8), torch.randn(2, 6, 8)
    probs = suffix_probs(q, torch.tensor([3]), keys, torch.arange(6))[:, :, -1]  # (2, 2, 6)
    share = output_share(probs, values)
    assert share.shape == (6,) and abs(float(share.sum()) - 1.0) < 1e-5
    assert share[4:].abs().max() == 0  # keys after the query are unseen
    # by hand: weight x |value| of the KV head each query head reads, over heads, normalised
    by_hand = sum(probs[h // 2, h % 2] * values[h // 2].norm(dim=-1) for h in range(4))
    assert torch.allclose(share, by_hand / by_hand.sum(), atol=1e-6)
    # values of equal norm: the share is the mean attention weight
    unit = values / values.norm(dim=-1, keepdim=True)
    assert torch.allclose(output_share(probs, unit), probs.mean(dim=(0, 1)), atol=1e-6)


def test_blend_config_validates_selector_and_coverage():
    assert BlendConfig(selector="qkvd", coverage=0.9).selector == "qkvd"
    with pytest.raises(ConfigError):
        BlendConfig(selector="nope")
    with pytest.raises(ConfigError):
        BlendConfig(coverage=1.0)
    with pytest.raises(ConfigError):
        BlendConfig(probe_tail=0)
    # One selector per check layer: a two-stage schedule.
    staged = BlendConfig(selector=("qa", "qkvd"), check_layers=(0, 4), check_ratios=(0.2, 0.1))
    assert staged.selectors == ("qa", "qkvd")
    assert BlendConfig(selector="qa", check_layers=(1, 4), check_ratios=(0.3, 0.1)).selectors \
        == ("qa", "qa")
    for bad in (("qa",) * 2, ("qa", "nope"), ()):
        with pytest.raises(ConfigError):
            BlendConfig(selector=bad, check_layers=(0,), check_ratios=(0.1,))


DOCS = [
    "The Greywater Lighthouse was designed by Miriam Osk and completed in 1798. " * 3,
    "Miriam Osk was born in 1761 in the mountain village of Tarn Hollow. " * 3,
]


@pytest.mark.slow
@pytest.mark.parametrize("name", [s for s in SELECTORS if s != "hkvd"] + [("qa", "qkvd")])
def test_blend_with_every_token_selected_equals_full_prefill(engine_factory, name):
    from cacheblend.engine import GenerateRequest

    engine = engine_factory(store_codec="fp32")
    engine.ingest(DOCS, progress=False)
    question = "Where was the designer of the lighthouse born?"
    full_kv, full_logits, _ = engine.prefill(GenerateRequest(question=question, documents=DOCS,
                                                             method="full"))
    blend = BlendConfig(selector=name, check_layers=(1, 2), check_ratios=(1.0, 1.0))
    blend_kv, blend_logits, stats = engine.prefill(GenerateRequest(
        question=question, documents=DOCS, method="blend", blend=blend))
    assert stats.recomputed_tokens == stats.chunk_tokens
    assert (blend_logits - full_logits).abs().max().item() <= 1e-4
    n = full_kv.length
    assert (blend_kv.keys[:, :, :n] - full_kv.keys[:, :, :n]).abs().max().item() <= 1e-4


@pytest.mark.slow
@pytest.mark.parametrize("name", SELECTORS)
def test_each_selector_recomputes_its_ratio_in_a_real_prefill(engine_factory, name):
    from cacheblend.engine import GenerateRequest

    engine = engine_factory()
    engine.ingest(DOCS, progress=False)
    request = GenerateRequest(question="Who designed it?", documents=DOCS, method="blend",
                              blend=BlendConfig(selector=name, check_layers=(0,),
                                                check_ratios=(0.2,)))
    stats = engine.prefill(request)[2]
    # A query-aware selector's probe takes its token-layers out of the 20%: the rest is kept.
    assert stats.ratio == 0.2 if name == "hkvd" else 0.0 < stats.ratio < 0.2
    assert stats.recomputed_tokens == math.ceil(stats.ratio * stats.chunk_tokens)


@pytest.mark.slow
def test_a_two_stage_schedule_runs_each_check_layers_own_selector(engine_factory):
    """("qa", "qkvd") at layers (0, 4): the probe's attention keeps 60% at layer 0, then
    attention x deviation keeps half of them at layer 4 (less the probe's cost: these prompts
    are short, a probe of their suffix needs a large ratio)."""
    from cacheblend.blend.select import QueryAttentionSelector, QueryDeviationSelector
    from cacheblend.engine import GenerateRequest
    from cacheblend.request import RequestSettings

    engine = engine_factory()
    engine.ingest(DOCS, progress=False)
    blend = BlendConfig(selector=("qa", "qkvd"), check_layers=(0, 4), check_ratios=(0.6, 0.3))
    request = GenerateRequest(question="Who designed it?", documents=DOCS, method="blend",
                              blend=blend)
    planned = engine.planner.plan(engine.segments_for(request),
                                  RequestSettings.resolve(request, blend, "bulk"))
    (first, one), (second, two) = planned.plan.checks
    assert (first, second) == (0, 4) and planned.plan.probe_layers == 30
    assert type(one) is QueryAttentionSelector and type(two) is QueryDeviationSelector
    assert one.ratio == pytest.approx(2 * two.ratio)  # the probe's cost scales both
    stats = engine.prefill(request)[2]
    assert stats.recomputed_tokens == math.ceil(stats.ratio * stats.chunk_tokens)
    # HKVD at every check reads no probe.
    hkvd = BlendConfig(selector=("hkvd", "hkvd"), check_layers=(1, 4), check_ratios=(0.3, 0.1))
    assert engine.planner.probe_depth(hkvd) == 0


def test_blend_ratio_in_a_config_narrows_the_default_schedule(tmp_path):
    from cacheblend.config import load_config

    path = tmp_path / "c.yaml"
    path.write_text("blend:\n  ratio: 0.2\n")
    blend = load_config(path).blend
    assert blend.check_layers == BlendConfig().check_layers and blend.ratio == 0.2
    assert blend.check_ratios[0] == pytest.approx(0.2 * 1.5)  # the 1.5:1 shape is kept
    assert load_config(None, blend={"ratio": 0.05}).blend.ratio == 0.05
    for bad in ({"ratio": 2.0}, {"ratio": "x"}, {"check_ratios": [0.2]}):
        with pytest.raises(ConfigError, match="ratio"):
            load_config(None, blend=bad)


def test_probe_cost_comes_out_of_the_budget():
    from cacheblend.blend.planner import Planner

    planner = Planner(None, None, num_layers=30)
    blend = BlendConfig(selector="qa", check_layers=(1,), check_ratios=(0.12,))
    # 36 suffix tokens x 30 probed layers against 1920 chunk tokens x 28 layers after the check
    assert planner._probe_cost(30, 36, 1920, blend) == pytest.approx(36 * 30 / (1920 * 28))
    assert planner._probe_cost(99, 36, 1920, blend) == planner._probe_cost(30, 36, 1920, blend)
    # _probe_tokens is _probe_cost's inverse: what it picks costs at most half the ratio
    for check, suffix, chunks in ((0, 36, 1920), (0, 400, 1920), (1, 50, 300), (29, 5, 10000)):
        config = BlendConfig(selector="qa", check_layers=(check,), check_ratios=(0.12,))
        tokens = planner._probe_tokens(30, suffix, chunks, config)
        assert tokens in (suffix, config.probe_tail, 0)
        assert planner._probe_cost(30, tokens, chunks, config) <= config.ratio / 2
    # a check at the last layer leaves no layers to pay for a probe: none (HKVD selects)
    assert planner._probe_tokens(30, 5, 10000, BlendConfig(
        selector="qa", check_layers=(29,), check_ratios=(0.12,))) == 0
    depth = planner.probe_depth
    assert depth(BlendConfig(selector="qa", probe_layers=-1)) == 30  # -1: every layer
    assert depth(BlendConfig(selector="qa", probe_layers=99)) == 30
    assert depth(BlendConfig(selector="qa", probe_layers=8)) == 8
    assert depth(BlendConfig(selector="hkvd", probe_layers=8)) == 0  # HKVD reads no probe
    with pytest.raises(ConfigError):
        BlendConfig(probe_layers=-2)


def test_the_hkvd_fallback_never_checks_at_layer_0():
    from cacheblend.blend.planner import hkvd_fallback

    probed = BlendConfig(selector="qa", probe_layers=30, check_layers=(0,), check_ratios=(0.15,))
    assert hkvd_fallback(probed) == BlendConfig(selector="hkvd", probe_layers=0, check_layers=(1,),
                                                check_ratios=(0.15,))
    two = BlendConfig(selector="qa", probe_layers=8, check_layers=(0, 1, 4),
                      check_ratios=(0.3, 0.2, 0.1))
    fallback = hkvd_fallback(two)
    assert (fallback.selector, fallback.probe_layers) == ("hkvd", 0)
    assert (fallback.check_layers, fallback.check_ratios) == ((1, 4), (0.2, 0.1))
    staged = BlendConfig(selector=("qa", "qkvd"), probe_layers=-1, check_layers=(0, 4),
                         check_ratios=(0.2, 0.1))
    fallback = hkvd_fallback(staged)
    assert (fallback.selectors, fallback.check_layers) == (("hkvd", "hkvd"), (1, 4))


@pytest.mark.slow
def test_blend_after_a_probe_equals_full_prefill_when_every_token_is_kept(engine_factory):
    """The probe writes suffix rows and loads cached ones; the blend pass after it must still
    give exactly a full prefill when it recomputes every token."""
    from dataclasses import replace

    from cacheblend.engine import GenerateRequest
    from cacheblend.kv import RequestKV
    from cacheblend.request import RequestSettings

    engine = engine_factory(store_codec="fp32")
    engine.ingest(DOCS, progress=False)
    question = "Where was the designer of the lighthouse born?"
    full_kv, full_logits, _ = engine.prefill(GenerateRequest(question=question, documents=DOCS,
                                                             method="full"))
    request = GenerateRequest(question=question, documents=DOCS, method="blend")
    segments = engine.segments_for(request)
    settings = RequestSettings.resolve(request, BlendConfig(selector="qa"), "bulk")
    plan = engine.planner.plan(segments, settings).plan
    plan = replace(plan, probe_layers=30, checks=[(1, QueryAttentionSelector(1.0))])
    runner = engine.runner
    kv = RequestKV(runner.num_layers, runner.num_kv_heads, runner.head_dim, full_kv.length)
    result = engine.fusor.run(plan, kv)
    assert (result.logits - full_logits).abs().max().item() <= 1e-4
    n = full_kv.length
    assert (kv.keys[:, :, :n] - full_kv.keys[:, :, :n]).abs().max().item() <= 1e-4


@pytest.mark.slow
def test_a_long_suffix_is_probed_by_its_tail_and_a_tiny_budget_falls_back_to_hkvd(
        engine_factory):
    """The probe may use half the budget: a short question is probed whole, a long one by its
    last ``probe_tail`` tokens (SAMSum's dialogue), and with too small a budget for even those
    HKVD selects."""
    from cacheblend.engine import GenerateRequest
    from cacheblend.request import RequestSettings

    engine = engine_factory()
    engine.ingest(DOCS, progress=False)
    long_question = "Where was the designer of the lighthouse born, and when? " * 8
    for question, ratio, probe in (("Who?", 0.3, "whole"), (long_question, 0.3, "tail"),
                                   (long_question, 0.02, "none")):
        request = GenerateRequest(question=question, documents=DOCS, method="blend")
        settings = RequestSettings.resolve(
            request, BlendConfig(selector="qa", probe_layers=30, check_layers=(0,),
                                 check_ratios=(ratio,)), "bulk")
        segments = engine.segments_for(request)
        planned = engine.planner.plan(segments, settings)
        plan, selector = planned.plan, planned.plan.checks[0][1]
        assert (plan.probe_layers == 30) is (probe != "none")
        assert isinstance(selector, HKVDSelector if probe == "none" else QueryAttentionSelector)
        assert (planned.ratio < ratio) is (probe != "none")  # the probe's cost comes out
        if probe == "whole":
            assert plan.probe_tokens == len(segments.suffix)
        if probe == "tail":
            assert plan.probe_tokens == BlendConfig().probe_tail < len(segments.suffix)
            # the tail's token-layers against the chunk tokens x 29 layers after layer 0
            spent = plan.probe_tokens * 30 / (plan.num_chunk_tokens * 29)
            assert planned.ratio == pytest.approx(ratio - spent)
            assert len(segments.suffix) * 30 / (plan.num_chunk_tokens * 29) > ratio / 2
        if probe == "none":  # even the tail is more than half the budget
            assert BlendConfig().probe_tail * 30 / (plan.num_chunk_tokens * 29) > ratio / 2
    # ... and a tail-probed request runs end to end
    request = GenerateRequest(question=long_question, documents=DOCS, method="blend",
                              blend=BlendConfig(selector="qa", check_layers=(0,),
                                                check_ratios=(0.3,)))
    _, logits, stats = engine.prefill(request)
    assert torch.isfinite(logits).all() and 0 < stats.recomputed_tokens < stats.chunk_tokens


@pytest.mark.slow
def test_a_tail_probe_reads_only_the_cached_rows_and_its_own_tokens(engine_factory):
    """The suffix tokens a tail probe leaves out have no rows yet: whatever the request KV holds
    there (NaN here) changes nothing. At layer 0 the last token's attention is checked by hand
    against the cached rows and the tail's own keys."""
    from cacheblend.blend.loader import LayerLoader
    from cacheblend.blend.probe import probe_attention, suffix_count
    from cacheblend.engine import GenerateRequest
    from cacheblend.kv import RequestKV
    from cacheblend.request import RequestSettings

    engine = engine_factory(store_codec="fp32")
    engine.ingest(DOCS, progress=False)
    question = "Where was the designer of the lighthouse born, and when? " * 4
    request = GenerateRequest(question=question, documents=DOCS, method="reuse")
    plan = engine.planner.plan(engine.segments_for(request),
                               RequestSettings.resolve(request, BlendConfig(), "bulk")).plan
    runner, total = engine.runner, plan.ids.shape[0]
    cached_end = total - suffix_count(plan.active, plan.chunk_spans)
    tail = plan.active[-16:]
    assert int(tail[0]) > cached_end  # some of the suffix is left out

    def probe(fill: float, layers: int) -> torch.Tensor:
        kv = RequestKV(runner.num_layers, runner.num_kv_heads, runner.head_dim, total)
        kv.keys.fill_(fill)
        kv.values.fill_(fill)
        loader = LayerLoader(plan.cached, runner.rope, kv)
        with torch.inference_mode():
            mass = probe_attention(runner, plan.ids, tail, kv, loader, layers, cached_end)
        loader.close()
        return mass, kv

    (clean, _), (dirty, _) = probe(0.0, runner.num_layers), probe(float("nan"), runner.num_layers)
    assert torch.isfinite(dirty).all() and torch.equal(clean, dirty)
    assert float(clean[cached_end:].abs().sum()) == 0.0  # only the cached rows are ranked
    assert 0.0 < float(clean.sum()) < 1.0  # the rest of the mass sits on the tail itself

    first, kv = probe(0.0, 1)
    with torch.inference_mode():
        q, k, v = runner.project_qkv(0, runner.embed(plan.ids[tail]))
        group = runner.num_heads // runner.num_kv_heads
        keys = torch.cat([kv.keys[0, :, :cached_end], runner.rope.apply(k, tail)], dim=1)
        values = torch.cat([kv.values[0, :, :cached_end], v], dim=1)
        last_q = runner.rope.apply(q[:, -1:], tail[-1:])  # (H, 1, hd)
        scores = torch.einsum("hd,htd->ht", last_q[:, 0], keys.repeat_interleave(group, dim=0))
        probs = torch.softmax(scores * runner.head_dim**-0.5, dim=-1)  # (H, T')
        share = (probs * values.norm(dim=-1).repeat_interleave(group, dim=0)).sum(0)
    assert torch.allclose(first[:cached_end], (share / share.sum())[:cached_end], atol=1e-6)


def test_suffix_probs_groups_query_heads_by_their_kv_head():
    """GQA without repeating the keys: the same weights as a per-head softmax against the
    repeated keys (query head h reads KV head h // 2 here)."""
    torch.manual_seed(0)
    q, keys = torch.randn(4, 3, 8), torch.randn(2, 7, 8)
    q_positions, key_positions = torch.tensor([4, 5, 6]), torch.arange(7)
    probs = suffix_probs(q, q_positions, keys, key_positions)  # (2, 2, 3, 7)
    repeated = keys.repeat_interleave(2, dim=0)
    scores = (q @ repeated.transpose(1, 2)) * 8**-0.5
    scores = scores.masked_fill(key_positions[None, :] > q_positions[:, None], float("-inf"))
    assert torch.allclose(probs.reshape(4, 3, 7), torch.softmax(scores, dim=-1), atol=1e-6)


@pytest.mark.slow
def test_the_probe_computes_the_suffix_exactly_as_reuse_does(engine_factory):
    """The probe is reuse's pass of the suffix over the cached rows: through every layer, the
    suffix K/V it writes equal those of a ``reuse`` prefill (its one softmax gives both the
    attention output and the mass it ranks by)."""
    from cacheblend.blend.loader import LayerLoader
    from cacheblend.blend.probe import probe_attention, suffix_count
    from cacheblend.engine import GenerateRequest
    from cacheblend.kv import RequestKV
    from cacheblend.request import RequestSettings

    engine = engine_factory(store_codec="fp32")
    engine.ingest(DOCS, progress=False)
    request = GenerateRequest(question="Where was the designer born?", documents=DOCS,
                              method="reuse")
    reuse_kv, _, _ = engine.prefill(request)
    settings = RequestSettings.resolve(request, BlendConfig(), "bulk")
    plan = engine.planner.plan(engine.segments_for(request), settings).plan
    runner, n = engine.runner, reuse_kv.length
    kv = RequestKV(runner.num_layers, runner.num_kv_heads, runner.head_dim, n)
    loader = LayerLoader(plan.cached, runner.rope, kv)
    suffix = plan.active[plan.active.numel() - suffix_count(plan.active, plan.chunk_spans):]
    with torch.inference_mode():
        mass = probe_attention(runner, plan.ids, suffix, kv, loader, runner.num_layers)
    loader.close()
    assert abs(float(mass.sum()) - 1.0) < 1e-4
    rows = slice(int(suffix[0]), n)
    assert (kv.keys[:, :, rows] - reuse_kv.keys[:, :, rows]).abs().max().item() <= 1e-4
    assert (kv.values[:, :, rows] - reuse_kv.values[:, :, rows]).abs().max().item() <= 1e-4


def test_the_hkvd_config_file_is_cacheblends_own_selection():
    """benchmarks/configs/hkvd.yaml, the documented way back to the pre-issue-12 default."""
    from pathlib import Path

    from cacheblend.config import load_config

    path = Path(__file__).resolve().parents[2] / "benchmarks" / "configs" / "hkvd.yaml"
    assert load_config(path).blend == BlendConfig(selector="hkvd", probe_layers=0,
                                                  check_layers=(1,), check_ratios=(0.15,),
                                                  deviation="k", precompute="preamble",
                                                  drift=(0.0, 0.0))
    assert BlendConfig().selector == ("qa", "qkvd") and BlendConfig().probe_layers == -1
    assert BlendConfig().precompute == "prefix"
    preamble = load_config(path.with_name("preamble.yaml")).blend  # rounds 1-2's mode
    assert preamble == BlendConfig(precompute="preamble", deviation="k", drift=(0.0, 0.0))


def test_the_controllers_cost_model_follows_every_stage():
    """blend_fraction: every chunk token to the first check, each check's share to the next;
    the full-prefill fallback compares misses + that fraction with a full prefill."""
    from cacheblend.blend.controller import LoadingController

    controller = LoadingController(num_layers=30)
    one = controller.blend_fraction((1,), (0.15,))
    assert one == pytest.approx((2 + 0.15 * 28) / 30)  # CacheBlend's: layers 0-1, then 15%
    two = controller.blend_fraction((0, 4), (0.1725, 0.115))
    assert two == pytest.approx((1 + 0.1725 * 4 + 0.115 * 25) / 30)
    blend = BlendConfig()  # the default's two stages
    fraction = controller.blend_fraction(blend.check_layers, blend.check_ratios)
    chunk_tokens = 1000
    fits = int(chunk_tokens * (1 - fraction))  # the most misses for which blending still pays
    assert controller.decide("blend", blend, chunk_tokens, fits, 0).method == "blend"
    assert controller.decide("blend", blend, chunk_tokens, fits + 1, 0).method == "full"
    no_fallback = BlendConfig(fallback=False)
    assert controller.decide("blend", no_fallback, chunk_tokens, chunk_tokens, 0).method == \
        "blend"


def test_probe_ramp_weighs_each_probed_layer_by_its_depth():
    """Layer i of L weighs ((i + 1) / L) ** ramp: ramp 0 is the plain mean; the grammar's
    +rampN sets it; a negative, infinite or boolean ramp is a config error."""
    from cacheblend.blend.probe import layer_weights
    from cacheblend.eval.methods import parse_method

    assert layer_weights(4, 0.0) == [1.0, 1.0, 1.0, 1.0]
    assert layer_weights(4, 1.0) == [0.25, 0.5, 0.75, 1.0]
    assert layer_weights(2, 2.0) == [0.25, 1.0]
    assert BlendConfig().probe_ramp == 0.0
    assert BlendConfig(probe_ramp=2).probe_ramp == 2.0
    for bad in (-1.0, float("inf"), float("nan"), True):
        with pytest.raises(ConfigError, match="probe_ramp"):
            BlendConfig(probe_ramp=bad)
    spec = parse_method("blend[qa,qkvd]+probe30+ramp1.5@0.1:L0=0.15,L4")
    assert spec.blend_config(BlendConfig()).probe_ramp == 1.5
    assert parse_method("blend").blend_config(BlendConfig(probe_ramp=3)).probe_ramp == 3.0


@pytest.mark.slow
def test_a_ramped_probe_ranks_by_the_weighted_mean_of_its_layers(engine_factory, monkeypatch):
    """The probe's mass is the weighted mean of each probed layer's output shares (recorded as
    the probe computes them); ramp 0 gives the plain mean bit for bit; and the request's
    probe_ramp reaches the plan the fusor runs."""
    from cacheblend.blend import probe as probe_module
    from cacheblend.blend.loader import LayerLoader
    from cacheblend.engine import GenerateRequest
    from cacheblend.kv import RequestKV
    from cacheblend.request import RequestSettings

    engine = engine_factory(store_codec="fp32")
    engine.ingest(DOCS, progress=False)
    blend = BlendConfig(probe_ramp=2.0, check_ratios=(0.6, 0.3))  # the suffix fits the budget
    request = GenerateRequest(question="Where was the designer born?", documents=DOCS,
                              method="blend", blend=blend)
    plan = engine.planner.plan(engine.segments_for(request),
                               RequestSettings.resolve(request, blend, "bulk")).plan
    assert plan.probe_layers == engine.runner.num_layers and plan.probe_ramp == 2.0
    runner, total = engine.runner, plan.ids.shape[0]
    suffix = plan.active[plan.active.numel() - probe_module.suffix_count(plan.active,
                                                                         plan.chunk_spans):]
    shares = []
    share = probe_module.output_share

    def recorded(probs, values):
        shares.append(share(probs, values))
        return shares[-1]

    monkeypatch.setattr(probe_module, "output_share", recorded)

    def probe(ramp: float) -> torch.Tensor:
        shares.clear()
        kv = RequestKV(runner.num_layers, runner.num_kv_heads, runner.head_dim, total)
        loader = LayerLoader(plan.cached, runner.rope, kv)
        with torch.inference_mode():
            mass = probe_module.probe_attention(runner, plan.ids, suffix, kv, loader, 6,
                                                ramp=ramp)
        loader.close()
        return mass

    ramped = probe(2.0)
    weights = [((i + 1) / 6) ** 2 for i in range(6)]
    expected = sum(w * s for w, s in zip(weights, shares)) / sum(weights)
    assert len(shares) == 6 and torch.allclose(ramped, expected, atol=1e-7)
    plain = probe(0.0)
    total_share = shares[0].clone()
    for layer_share in shares[1:]:
        total_share += layer_share
    assert torch.equal(plain, total_share / 6)
    assert not torch.allclose(plain, ramped, atol=1e-4)  # the deeper layers rank differently

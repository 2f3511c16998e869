"""How good could the selection be? Oracle rankings at the default's budget.

The default recomputes n chunk tokens of a prompt through its last layers (``default`` below:
today two stages, the probe's ranking at layer 0, attention x deviation at layer 4). Here the same
fusor recomputes n tokens, chosen once at layer 0, ranked by:

- ``probe``: the probe's estimate of each token's share of the last position's attention output,
  over the cached (stale) KV: the one-stage schedule (round 3's ranking);
- ``exact share``: the share the probe estimates, from the suffix's pass over full prefill's KV
  (what a perfect probe would see);
- ``exact deviation``: how far each token's cached K and V are from full prefill's, summed over
  the layers (each layer's K and V deviations divided by their mean over the chunk tokens);
- ``exact share x deviation``: the product of the two.

None of the oracles is available to a real request (they read full prefill's KV); they bound
what a better estimate of the same quantity could recover at the same recompute count. First-
token KL against full prefill, mean with a 90% bootstrap interval, and the share of best reuse's
KL recovered (reuse in prefix and preamble mode, both computed here):

    .venv/bin/python benchmarks/oracle_selection.py --dataset multi_news --limit 50
"""

from __future__ import annotations

import json
from dataclasses import replace

import torch
from quality_args import dataset_parser
from tqdm import tqdm

from cacheblend.blend.fusor import FusionPlan
from cacheblend.blend.loader import CachedSpan, LayerLoader
from cacheblend.blend.probe import probe_attention, suffix_count
from cacheblend.blend.select import (
    Candidates,
    QueryAttentionSelector,
    QueryDeviationSelector,
    Selector,
    top_mask,
)
from cacheblend.config import BlendConfig, load_config
from cacheblend.engine import Engine, GenerateRequest
from cacheblend.eval.datasets import load_dataset
from cacheblend.eval.metrics import bootstrap_interval, first_token_kl, mean_of, worse_than
from cacheblend.eval.prompts import build_segments
from cacheblend.kv import RequestKV
from cacheblend.model.loader import load_model
from cacheblend.request import RequestSettings
from cacheblend.store.base import ChunkKV
from cacheblend.store.memory import MemoryStore

RANKINGS = ("probe", "exact share", "exact deviation", "exact share x deviation",
            "probe x exact deviation", "probe x deviation@L1 (k)", "probe x deviation@L1 (kv)",
            "probe x deviation@L2 (kv)", "probe x deviation@L4", "probe x deviation@L8",
            "probe x deviation@L15", "probe x deviation@L25", "probe x deviation@L8-29")

# Real two-stage schedules (no oracle): the probe's ranking keeps a x r at layer 0, then at
# layer L the probe's share x that layer's KV deviation keeps b x r, where r is the share the
# default recomputes; b None: compute-matched with one stage keeping r (a L + b (30 - L) = 30).
STAGED = ((2.0, 2, None), (2.0, 4, None), (1.5, 4, None), (2.0, 4, 1.0), (3.0, 4, None))


def staged_name(a: float, layer: int, b: float | None, deviation: str) -> str:
    return f"staged {a}r -> L{layer}-{deviation} " + ("(matched)" if b is None else f"{b}r")


class SoftDeviation(QueryDeviationSelector):
    """attention x deviation ** gamma (gamma < 1: the deviation weighs less)."""

    def __init__(self, ratio: float, gamma: float) -> None:
        super().__init__(ratio)
        self.gamma = gamma

    def score(self, candidates: Candidates) -> torch.Tensor:
        return candidates.attention * candidates.deviation.clamp_min(0).pow(self.gamma)


class RankBy(Selector):
    """Keep the ``budget`` candidates with the highest ``score`` (a (T,) tensor by position)."""

    needs_deviation = False

    def __init__(self, score: torch.Tensor, budget: int) -> None:
        self.score, self.budget = score, budget

    def keep(self, candidates: Candidates) -> torch.Tensor:
        return top_mask(self.score[candidates.positions], min(self.budget,
                                                              candidates.positions.shape[0]))

    def kept_count(self, num_candidates: int, num_chunk_tokens: int) -> int:
        return min(self.budget, num_candidates)


def new_kv(engine: Engine, total: int) -> RequestKV:
    runner = engine.runner
    return RequestKV(runner.num_layers, runner.num_kv_heads, runner.head_dim, total,
                     runner.device, runner.dtype)


def shares_over(engine: Engine, plan: FusionPlan, spans: list[CachedSpan],
                probed: int) -> torch.Tensor:
    """(T,) the probe's output shares of every position, over the KV held by ``spans``."""
    total = plan.ids.shape[0]
    kv = new_kv(engine, total)
    loader = LayerLoader(spans, engine.runner.rope, kv)
    count = suffix_count(plan.active, plan.chunk_spans)
    try:
        return probe_attention(engine.runner, plan.ids, plan.active[-probed:], kv, loader,
                               engine.runner.num_layers, cached_end=total - count)
    finally:
        loader.close()


def exact_deviation(plan: FusionPlan, captured, layers=None, on: str = "kv") -> torch.Tensor:
    """(T,) summed over ``layers`` (default all): each cached row's squared K and/or V distance
    from full prefill's, each layer's K and V terms divided by their mean over the candidates.
    At a check layer L the fusor's fresh K/V equal full prefill's (every chunk token ran every
    layer up to L), so layers=[L] is the deviation a check at L sees."""
    total = plan.ids.shape[0]
    in_chunk = torch.zeros(total, dtype=torch.bool)
    for start, end in plan.chunk_spans:
        in_chunk[start:end] = True
    score = torch.zeros(total)
    for layer in range(len(captured)) if layers is None else layers:
        full_k, full_v = captured[layer]
        for fresh, index in ((full_k, 0), (full_v, 1))[: 1 if on == "k" else 2]:
            cached = torch.zeros_like(fresh)
            for span in plan.cached:
                cached[:, span.start:span.end] = span.source.layer(layer)[index]
            dev = (fresh.float() - cached.float()).pow(2).sum(dim=(0, 2))
            score += torch.where(in_chunk, dev / dev[in_chunk].mean().clamp_min(1e-12), 0.0)
    return score


def oracle_scores(engine: Engine, plan: FusionPlan, full, probed: int) -> dict[str, torch.Tensor]:
    """Every ranking of RANKINGS: (T,) scores by position."""
    score = {}
    score["probe"] = shares_over(engine, plan, plan.cached, probed)
    whole = ChunkKV(torch.stack([k for k, _ in full.captured]),
                    torch.stack([v for _, v in full.captured]))
    score["exact share"] = shares_over(engine, plan, [CachedSpan(0, whole)], probed)
    score["exact deviation"] = exact_deviation(plan, full.captured)
    score["exact share x deviation"] = score["exact share"] * score["exact deviation"]
    score["probe x exact deviation"] = score["probe"] * score["exact deviation"]
    score["probe x deviation@L1 (k)"] = score["probe"] * exact_deviation(
        plan, full.captured, [1], "k")
    score["probe x deviation@L1 (kv)"] = score["probe"] * exact_deviation(
        plan, full.captured, [1])
    score["probe x deviation@L2 (kv)"] = score["probe"] * exact_deviation(
        plan, full.captured, [2])
    for layer in (4, 8, 15, 25):
        score[f"probe x deviation@L{layer}"] = score["probe"] * exact_deviation(
        plan, full.captured, [layer])
    score["probe x deviation@L8-29"] = score["probe"] * exact_deviation(
        plan, full.captured, range(8, 30))
    return score


def run_ranked(engine: Engine, plan: FusionPlan, score: torch.Tensor, budget: int) -> torch.Tensor:
    ranked = replace(plan, checks=[(0, RankBy(score, budget))], probe_layers=0, probe_tokens=0)
    return engine.fusor.run(ranked, new_kv(engine, plan.ids.shape[0])).logits


def main() -> None:
    parser = dataset_parser(__doc__)
    parser.add_argument("--skip", type=int, default=0, help="leave out the first N examples")
    parser.add_argument("--no-oracles", action="store_true", help="staged schedules only")
    parser.add_argument("--staged", help="a:L[:b],... (default: %(default)s)",
                        default=",".join(f"{a}:{layer}" + (f":{b}" if b else "")
                                         for a, layer, b in STAGED))
    parser.add_argument("--gamma", type=float, default=1.0,
                        help="the second stage ranks by attention x deviation ** gamma")
    parser.add_argument("--deviation", default="kv",
                        help="the second stage's deviation(s), comma-separated: k, v, kv")
    args = parser.parse_args()
    stages = [(float(p[0]), int(p[1]), float(p[2]) if len(p) > 2 else None)
              for p in (item.split(":") for item in args.staged.split(","))]
    rankings = () if args.no_oracles else RANKINGS
    torch.set_num_threads(args.threads)
    loaded = load_model(device="cpu")
    engine = Engine(load_config(None, blend={"fallback": False}), store=MemoryStore(),
                    loaded=loaded)
    dataset = load_dataset(args.dataset, passage_tokens=args.passage_tokens,
                           limit=args.skip + args.limit, tokenizer=engine.tokenizer)
    examples = dataset.examples[args.skip:]
    names = ("reuse", "reuse/preamble", "default", *rankings,
             *(staged_name(*stage, dev) for dev in args.deviation.split(",") for stage in stages))
    kl = {name: [] for name in names}
    for example in tqdm(examples, desc=dataset.name, unit="example"):
        segments = build_segments(engine.prompts, example)
        total = segments.num_tokens
        full_plan = FusionPlan(torch.tensor(segments.ids), torch.arange(total), capture=True)
        full = engine.fusor.run(full_plan, new_kv(engine, total))
        for name, blend in (("reuse", None), ("reuse/preamble",
                                                        BlendConfig(precompute="preamble", fallback=False))):
            logits = engine.prefill(GenerateRequest(segments=segments, method="reuse",
                                                    blend=blend))[1]
            kl[name].append(first_token_kl(full.logits, logits))
        request = GenerateRequest(segments=segments, method="blend")
        _, logits, stats = engine.prefill(request)
        kl["default"].append(first_token_kl(full.logits, logits))
        budget = stats.recomputed_tokens
        planned = engine.planner.plan(segments, RequestSettings.resolve(
            request, engine.config.blend, "bulk"))
        plan = planned.plan
        if planned.method != "blend" or not plan.probe_layers or not budget:
            # nothing to rank: one exact chunk, a probe too dear (HKVD), or a full fallback
            tqdm.write(f"{example.id}: skipped ({planned.method}, no probe or no budget)")
            for name in names[:3]:
                kl[name].pop()
            engine.store.clear()
            continue
        probed = plan.probe_tokens or suffix_count(plan.active, plan.chunk_spans)
        if rankings:
            score = oracle_scores(engine, plan, full, probed)
        for name in rankings:
            kl[name].append(first_token_kl(full.logits, run_ranked(engine, plan, score[name],
                                                                   budget)))
        layers = engine.runner.num_layers
        ratio = budget / plan.num_chunk_tokens
        for deviation in args.deviation.split(","):
            for a, layer, b in stages:
                # a x r tokens run layers [0, L), b x r run [L, layers): as r runs [0, layers).
                second = (layers - a * layer) / (layers - layer) if b is None else b
                checks = [(0, QueryAttentionSelector(a * ratio)),
                          (layer, SoftDeviation(second * ratio, args.gamma))]
                staged = replace(plan, checks=checks, deviation=deviation)
                logits = engine.fusor.run(staged, new_kv(engine, total)).logits
                kl[staged_name(a, layer, b, deviation)].append(
                    first_token_kl(full.logits, logits))
        engine.store.clear()
    best = min(("reuse", "reuse/preamble"), key=lambda name: mean_of(kl[name]))
    rows = []
    for name in names:
        values = kl[name]
        low, high = bootstrap_interval(mean_of, values)
        recovered = 1 - mean_of(values) / mean_of(kl[best])
        rows.append({"ranking": name, "kl": mean_of(values), "ci90": [low, high],
                     "recovered": recovered, "worse_than_best_reuse": worse_than(values, kl[best]),
                     "n": len(values)})
        print(f"{dataset.name:10s} {name:26s} KL {mean_of(values):.4f} [{low:.4f}, {high:.4f}]"
              f"  recovered {recovered:6.1%}  worse than {best} on "
              f"{worse_than(values, kl[best])}/{len(values)}")
    print(json.dumps({"dataset": dataset.name, "best_reuse": best, "rows": rows}))


if __name__ == "__main__":
    main()

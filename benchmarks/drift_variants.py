"""How much of a chunk's KV error is shared by its tokens, and what correcting it buys
(issue 12, round 5: blend/drift.py).

For each development prompt:

1. ``--energy``: at every layer, the share of the cached chunk rows' squared K (pre-RoPE) and V
   error against full prefill that a per-chunk, per-KV-head mean offset carries (1 - residual
   energy / energy), summed over the prompts;
2. the default blend's (at ``--ratio``; or each of ``--specs``) first-token KL against full
   prefill with the drift correction at several (key, value) scales (``--scales``), ``0,0``
   being the blend without it; and ``oracle``: the same blend with each chunk's exact mean
   offset (from full prefill's K/V over all the chunk's tokens, which no real request has)
   applied at both scales 1: what a perfect estimate of the offset gives. Each variant's
   difference from the first is paired per prompt.

    .venv/bin/python benchmarks/drift_variants.py --dataset musique --limit 10 --ratio 0.115
    .venv/bin/python benchmarks/drift_variants.py --dataset multi_news --limit 3 --energy
    .venv/bin/python benchmarks/drift_variants.py --dataset 2wikimqa --limit 12 \\
        --specs 'blend[qa,qkvd]-kv+probe30@0.1:L0=0.15,L4;blend[qa,qkvd]-kv+probe30@0.1:L0=0.2,L4' \\
        --scales '1,0.5;1,0.75'
"""

from __future__ import annotations

import json
from dataclasses import replace

import torch
from oracle_selection import new_kv
from quality_args import dataset_parser, engine_and_dataset
from tqdm import tqdm

from cacheblend.blend.drift import DriftCorrection
from cacheblend.blend.fusor import FusionPlan
from cacheblend.engine import GenerateRequest
from cacheblend.eval.methods import parse_method
from cacheblend.eval.metrics import bootstrap_interval, first_token_kl, mean_of
from cacheblend.eval.prompts import build_segments
from cacheblend.request import RequestSettings

SCALES = ((0.0, 0.0), (1.0, 0.0), (0.75, 0.0), (1.0, 0.25), (1.0, 0.5), (1.0, 0.75), (1.0, 1.0))


class OracleDrift:
    """Patches DriftCorrection.correct to take each chunk's mean offset from full prefill's
    K/V (``captured``, per layer (K pre-RoPE, V)) over all of the chunk's rows, not from the
    recomputed ones. Layers arrive in order, from 1, once per request."""

    def __init__(self) -> None:
        self.captured = None
        self.layer = 0
        self.original = DriftCorrection.correct

    def __enter__(self):
        oracle = self

        def correct(drift, positions, count, fresh_k_raw, fresh_v, layer_keys, layer_values):
            oracle.layer += 1
            full_k, full_v = oracle.captured[oracle.layer]
            every = torch.arange(drift.begin, drift.end, device=positions.device)
            every = every[drift.chunk_of[every] < drift.num_chunks]  # chunk rows only
            oracle.original(drift, every, every.shape[0], full_k[:, every], full_v[:, every],
                            layer_keys, layer_values)

        DriftCorrection.correct = correct
        return self

    def __exit__(self, *exc) -> None:
        DriftCorrection.correct = self.original


def shared_energy(plan: FusionPlan, captured, energy: dict) -> None:
    """Adds, per layer and K/V, the chunk rows' error energy and its residual after taking out
    each chunk's mean offset (per KV head)."""
    chunk_starts = {start for start, _ in plan.chunk_spans}
    for layer, (full_k, full_v) in enumerate(captured):
        for index, (name, fresh) in enumerate((("k", full_k), ("v", full_v))):
            total, residual = energy.setdefault((layer, name), [0.0, 0.0])
            for span in plan.cached:
                if span.start not in chunk_starts:
                    continue  # the prefix (exact)
                error = (fresh[:, span.start:span.end] - span.source.layer(layer)[index]).float()
                total += float(error.pow(2).sum())
                residual += float((error - error.mean(dim=1, keepdim=True)).pow(2).sum())
            energy[(layer, name)] = [total, residual]


def parse_scales(text: str) -> list:
    """``"1,0.5;1,0.75;oracle"`` -> [(1.0, 0.5), (1.0, 0.75), "oracle"]."""
    return [item if item == "oracle" else tuple(float(x) for x in item.split(","))
            for item in text.split(";")]


def main() -> None:
    parser = dataset_parser(__doc__)
    parser.add_argument("--ratio", type=float, help="the default's ratio (default: the config's)")
    parser.add_argument("--specs", help="';'-separated blend specs (eval grammar) to run instead "
                                        "of the default")
    parser.add_argument("--scales", default=";".join(
        [f"{k:g},{v:g}" for k, v in SCALES] + ["oracle"]),
        help="';'-separated key,value drift scales (and 'oracle')")
    parser.add_argument("--energy", action="store_true",
                        help="also the share of the K/V error a per-chunk mean carries, by layer")
    args = parser.parse_args()
    engine, dataset = engine_and_dataset(args)
    if args.specs:
        bases = {spec: parse_method(spec).request_blend(engine) for spec in args.specs.split(";")}
    else:
        blend = engine.config.blend
        bases = {"default": blend if args.ratio is None else blend.with_ratio(args.ratio)}
    variants = [(spec, scale) for spec in bases for scale in parse_scales(args.scales)]
    names = [f"{spec} drift {scale if scale == 'oracle' else '{:g},{:g}'.format(*scale)}"
             for spec, scale in variants]
    kl: dict[str, list[float]] = {name: [] for name in names}
    energy: dict = {}
    oracle = OracleDrift()
    for example in tqdm(dataset.examples, desc=dataset.name, unit="example"):
        segments = build_segments(engine.prompts, example)
        total = segments.num_tokens
        full = engine.fusor.run(FusionPlan(torch.tensor(segments.ids), torch.arange(total),
                                           capture=True), new_kv(engine, total))
        engine.generate(GenerateRequest(segments=segments, method="reuse"))  # store the chunks
        for name, (spec, scale) in zip(names, variants):
            blend = replace(bases[spec], drift=(1.0, 1.0) if scale == "oracle" else scale)
            request = GenerateRequest(segments=segments, method="blend", blend=blend)
            if scale == "oracle":
                oracle.captured, oracle.layer = full.captured, 0
                with oracle:
                    logits = engine.prefill(request)[1]
            else:
                logits = engine.prefill(request)[1]
            kl[name].append(first_token_kl(full.logits, logits))
        if args.energy:
            plan = engine.planner.plan(segments, RequestSettings.resolve(
                GenerateRequest(segments=segments, method="blend"), engine.config.blend,
                "bulk")).plan
            shared_energy(plan, full.captured, energy)
        engine.store.clear()
    rows = []
    first = kl[names[0]]
    for name in names:
        low, high = bootstrap_interval(mean_of, kl[name])
        diff = [a - b for a, b in zip(kl[name], first)]
        d_low, d_high = bootstrap_interval(mean_of, diff)
        rows.append({"variant": name, "kl": mean_of(kl[name]), "ci90": [low, high],
                     "minus_first": mean_of(diff), "minus_first_ci90": [d_low, d_high]})
        print(f"{dataset.name:10s} {name:50s} KL {mean_of(kl[name]):.4f} [{low:.4f}, {high:.4f}]"
              f"  minus the first {mean_of(diff):+.4f} [{d_low:+.4f}, {d_high:+.4f}], lower on "
              f"{sum(d < 0 for d in diff)}/{len(diff)}")
    shares = {}
    for (layer, name), (total, residual) in sorted(energy.items()):
        shares.setdefault(layer, {})[name] = 1 - residual / total if total else 0.0
    for layer, share in shares.items():
        print(f"layer {layer:2d}: a per-chunk mean carries {share['k']:.0%} of the K error's "
              f"energy, {share['v']:.0%} of V's")
    print(json.dumps({"dataset": dataset.name, "n": len(dataset.examples), "rows": rows,
                      "shared_energy": shares}))


if __name__ == "__main__":
    main()

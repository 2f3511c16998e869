"""TTFT of method specs against a yardstick on real prompts, timed back to back.

The eval's TTFT column times each method once per example, so it is only as quiet as the
machine. This times the specs on the first ``--limit`` prompts of each dataset, every chunk
stored first (in each precompute mode a spec uses), interleaved ``--repeats`` times after one
warm-up pass, each pass starting one spec later. Per prompt it keeps each spec's median prefill
time; per spec it reports the mean and median over prompts of its time over the first spec's
(the yardstick), and the ratio of the mean times.

    .venv/bin/python benchmarks/ttft_datasets.py --dataset musique,2wikimqa,multi_news,samsum \\
        --methods 'blend[hkvd]-k+nodrift@0.15:L1/preamble,blend,blend@0.09'
"""

from __future__ import annotations

import json
import statistics
import time

from quality_args import bundled_engine, dataset_parser

from cacheblend.engine import GenerateRequest
from cacheblend.eval.datasets import load_dataset
from cacheblend.eval.methods import parse_methods
from cacheblend.eval.prompts import build_segments


def main() -> None:
    parser = dataset_parser(__doc__)
    parser.set_defaults(limit=8)
    parser.add_argument("--methods", required=True,
                        help="comma-separated specs (eval grammar); the first is the yardstick")
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    engine = bundled_engine(args.threads)
    specs = parse_methods(args.methods)
    blends = {spec.label: spec.request_blend(engine) for spec in specs}
    report = {}
    for name in args.dataset.split(","):
        dataset = load_dataset(name, passage_tokens=args.passage_tokens, limit=args.limit,
                               tokenizer=engine.tokenizer)
        ratios: dict[str, list[float]] = {spec.label: [] for spec in specs}
        medians: dict[str, list[float]] = {spec.label: [] for spec in specs}
        for example in dataset.examples:
            segments = build_segments(engine.prompts, example)
            for blend in {b.precompute: b for b in blends.values()}.values():
                engine.generate(GenerateRequest(segments=segments, method="reuse", blend=blend))
            requests = {spec.label: GenerateRequest(segments=segments, method=spec.method,
                                                    blend=blends[spec.label]) for spec in specs}
            times: dict[str, list[float]] = {label: [] for label in requests}
            order = list(requests.items())
            for repeat in range(args.repeats + 1):
                for label, request in order[repeat % len(order):] + order[:repeat % len(order)]:
                    start = time.perf_counter()
                    engine.prefill(request)
                    if repeat:  # the first pass warms up (each pass starts one spec later)
                        times[label].append(time.perf_counter() - start)
            yardstick = statistics.median(times[specs[0].label])
            for label, values in times.items():
                ratios[label].append(statistics.median(values) / yardstick)
                medians[label].append(statistics.median(values))
            engine.store.clear()
        report[dataset.name] = {}
        for spec in specs:
            label = spec.label
            row = {"mean_ratio": statistics.mean(ratios[label]),
                   "median_ratio": statistics.median(ratios[label]),
                   "ratio_of_means": statistics.mean(medians[label]) / statistics.mean(
                       medians[specs[0].label]),
                   "mean_s": statistics.mean(medians[label])}
            report[dataset.name][label] = row
            print(f"{dataset.name:10s} {label:50s} TTFT / yardstick: mean {row['mean_ratio']:.3f}"
                  f"  median {row['median_ratio']:.3f}  of means {row['ratio_of_means']:.3f}"
                  f"  ({row['mean_s'] * 1000:.0f} ms)", flush=True)
    print(json.dumps({"examples": len(dataset.examples), "repeats": args.repeats,
                      "results": report}))


if __name__ == "__main__":
    main()

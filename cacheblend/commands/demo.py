"""`cacheblend demo`: the showcase. Ingest a sample corpus, then answer each question with a
full prefill and with CacheBlend, side by side: answers, TTFT, speedup, tokens reused."""

from __future__ import annotations

import argparse
import random

from cacheblend.commands.common import add_engine_args, make_engine
from cacheblend.commands.demo_corpus import DOCUMENTS, QUESTIONS


def add_parser(subparsers) -> None:
    parser = subparsers.add_parser("demo", help="full prefill vs CacheBlend on a sample corpus")
    parser.add_argument("--ratio", type=float, default=None,
                        help="blend recompute ratio (default: the config's)")
    parser.add_argument("--max-tokens", type=int, default=24)
    parser.add_argument("--seed", type=int, default=0, help="seed for the document order")
    add_engine_args(parser)
    parser.set_defaults(handler=run)


def run(args: argparse.Namespace) -> int:
    from cacheblend.decode import SamplingParams
    from cacheblend.engine import GenerateRequest

    engine = make_engine(args)
    ratio = engine.config.blend.ratio if args.ratio is None else args.ratio
    documents = list(DOCUMENTS.values())
    print(f"model {engine.loaded.name} ({engine.runner.num_layers} layers), store "
          f"{engine.config.store}")
    engine.ingest(documents)
    rng = random.Random(args.seed)
    sampling = SamplingParams(max_tokens=args.max_tokens)
    # Warm up once so the first timed request does not pay one-off costs.
    engine.generate(GenerateRequest(question="Hi", documents=documents[:1], method="full",
                                    sampling=SamplingParams(max_tokens=1)))
    for question, expected in QUESTIONS:
        order = documents[:]
        rng.shuffle(order)  # documents recur in a new order: prefix caching would miss
        runs = {}
        for method in ("full", "blend"):
            request = GenerateRequest(question=question, documents=order, method=method,
                                      ratio=ratio if method == "blend" else None,
                                      sampling=sampling)
            runs[method] = engine.generate(request)
        full, blend = runs["full"].stats, runs["blend"].stats
        print(f"\nQ: {question}   (expected: {expected})")
        print(f"  full  prefill   TTFT {full.ttft_s:5.2f}s  | {runs['full'].text.strip()!r}")
        print(f"  cacheblend@{ratio:<4} TTFT {blend.ttft_s:5.2f}s  | "
              f"{runs['blend'].text.strip()!r}")
        print(f"  speedup {full.ttft_s / blend.ttft_s:.1f}x; {blend.prompt_tokens} prompt tokens: "
              f"{blend.reused_tokens} reused, {blend.recomputed_tokens} recomputed, "
              f"{blend.missed_tokens} missed")
    return 0

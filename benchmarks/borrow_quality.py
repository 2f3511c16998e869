"""What borrowing costs in quality (``BlendConfig.borrow``, prefix mode).

The default blend and plain reuse, with each chunk's entry computed after the request's own
prefix (a hit), against the same methods reading entries borrowed from the engine's default
prefix (its generic system prompt and instruction: where uploads go) or from the preamble
("Document:\\n", what a preamble-mode engine stored). First-token KL against a full prefill,
mean with a 90% bootstrap interval, and how often borrowing is worse than its own-prefix hit.

    .venv/bin/python benchmarks/borrow_quality.py --dataset musique --limit 50

Each variant has its own in-memory store, cleared after every example; the borrowed variants'
stores hold only what ``Engine.ingest`` wrote, so every chunk is borrowed (checked).
"""

from __future__ import annotations

import json

import torch
from quality_args import dataset_parser
from tqdm import tqdm

from cacheblend.config import BlendConfig, load_config
from cacheblend.engine import Engine, GenerateRequest
from cacheblend.eval.datasets import load_dataset
from cacheblend.eval.metrics import bootstrap_interval, first_token_kl, mean_of, worse_than
from cacheblend.eval.prompts import build_segments
from cacheblend.model.loader import load_model
from cacheblend.store.memory import MemoryStore

VARIANTS = {  # name: how the store is filled before the request (None: by the request itself)
    "own prefix (hit)": None,
    "borrowed: engine default prefix": BlendConfig(),
    "borrowed: preamble": BlendConfig(precompute="preamble"),
}
METHODS = ("reuse", "blend")


def main() -> None:
    parser = dataset_parser(__doc__)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    loaded = load_model(device="cpu")
    config = load_config(None, blend={"fallback": False})  # a miss is computed, never full
    engines = {name: Engine(config, store=MemoryStore(), loaded=loaded) for name in VARIANTS}
    first = next(iter(engines.values()))
    dataset = load_dataset(args.dataset, passage_tokens=args.passage_tokens, limit=args.limit,
                           tokenizer=first.tokenizer)
    kl = {(v, m): [] for v in VARIANTS for m in METHODS}
    for example in tqdm(dataset.examples, desc=dataset.name, unit="example"):
        segments = build_segments(first.prompts, example)
        chunk_tokens = sum(len(c) for c in segments.chunks)
        _, full, _ = first.prefill(GenerateRequest(segments=segments, method="full"))
        for name, engine in engines.items():
            ingest = VARIANTS[name]
            if ingest is not None:
                engine.ingest(list(example.documents), progress=False, blend=ingest)
            for method in METHODS:
                request = GenerateRequest(segments=segments, method=method)
                _, logits, stats = engine.prefill(request)
                expected = 0 if ingest is None else chunk_tokens
                assert stats.borrowed_tokens == expected, (name, stats.borrowed_tokens)
                kl[name, method].append(first_token_kl(full, logits))
            engine.store.clear()
    own = "own prefix (hit)"
    rows = []
    for (name, method), values in kl.items():
        low, high = bootstrap_interval(mean_of, values)
        rows.append({"variant": name, "method": method, "kl": mean_of(values),
                     "ci90": [low, high], "worse_than_own": worse_than(values, kl[own, method]),
                     "n": len(values)})
        print(f"{dataset.name:10s} {method:6s} {name:32s} KL {mean_of(values):.4f} "
              f"[{low:.4f}, {high:.4f}]  worse than own-prefix hit on "
              f"{worse_than(values, kl[own, method])}/{len(values)}")
    print(json.dumps({"dataset": dataset.name, "rows": rows}))


if __name__ == "__main__":
    main()

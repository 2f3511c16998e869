"""What the probe costs inside a prefill, on real prompts: the time spent in the probe pass
(``blend.probe.probe_attention``), and the part of it that loads cached rows (``LayerLoader``:
work the blend pass would do anyway), as shares of the whole prefill, per dataset.

The probe runs the suffix through every layer before the blend pass starts. Its FLOPs are few
(suffix x layers, charged to the recompute budget), but each layer reads all of the layer's
weights for a handful of tokens, so on the CPU it costs about as much as a pass of ~64 tokens.

    .venv/bin/python benchmarks/probe_share.py --dataset musique,2wikimqa,multi_news,samsum \\
        --limit 6 --method 'blend[qa,qkvd]-kv+probe30+pool10@0.1:L0=0.15,L4'

With ``--rows 1,17,64,160`` it times instead the model's own matmuls (fused q/k/v, o, fused
gate/up, down) through every layer for batches of that many rows (median of ``--repeats``,
after a warm-up): the weights are read once per layer whatever the rows, so a few rows cost
nearly what many do.
"""

from __future__ import annotations

import json
import statistics
import time

import torch
import torch.nn.functional as F
from quality_args import bundled_engine, dataset_parser

from cacheblend.blend import fusor, loader
from cacheblend.engine import GenerateRequest
from cacheblend.eval.datasets import load_dataset
from cacheblend.eval.methods import parse_methods
from cacheblend.eval.prompts import build_segments


class Clock:
    """Wraps the probe and the loader's per-layer load; sums their wall time per prefill."""

    def __init__(self) -> None:
        self.probe = self.probe_load = 0.0
        self.inside = False
        probe, load = fusor.probe_attention, loader.LayerLoader.load

        def timed_probe(*args, **kwargs):
            start, self.inside = time.perf_counter(), True
            try:
                return probe(*args, **kwargs)
            finally:
                self.inside = False
                self.probe += time.perf_counter() - start

        def timed_load(layer_loader, *args, **kwargs):
            start = time.perf_counter()
            try:
                return load(layer_loader, *args, **kwargs)
            finally:
                if self.inside:
                    self.probe_load += time.perf_counter() - start

        fusor.probe_attention, loader.LayerLoader.load = timed_probe, timed_load

    def reset(self) -> None:
        self.probe = self.probe_load = 0.0


def time_layer_matmuls(runner, rows: int, repeats: int) -> float:
    """Seconds (median) for every layer's matmuls on a batch of ``rows`` tokens."""
    layers = [(w.qkv, w.o_proj, w.gate_up, w.down) for w in runner.layers]
    narrow = torch.randn(rows, layers[0][0].shape[1])
    wide = torch.randn(rows, layers[0][3].shape[1])
    times = []
    with torch.inference_mode():
        for repeat in range(repeats + 1):
            start = time.perf_counter()
            for qkv, o_proj, gate_up, down in layers:
                F.linear(narrow, qkv), F.linear(narrow, o_proj)
                F.linear(narrow, gate_up), F.linear(wide, down)
            if repeat:  # the first one warms up
                times.append(time.perf_counter() - start)
    return statistics.median(times)


def main() -> None:
    parser = dataset_parser(__doc__)
    parser.set_defaults(limit=6)
    parser.add_argument("--method", default="blend[qa,qkvd]-kv+probe30+pool10@0.1:L0=0.15,L4")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--rows", help="comma-separated batch sizes: time the layer matmuls only")
    args = parser.parse_args()
    engine = bundled_engine(args.threads)
    if args.rows:
        for rows in (int(r) for r in args.rows.split(",")):
            seconds = time_layer_matmuls(engine.runner, rows, args.repeats)
            print(f"{rows:5d} rows: {1000 * seconds:.1f} ms for the matmuls of "
                  f"{len(engine.runner.layers)} layers", flush=True)
        return
    spec = parse_methods(args.method)[0]
    blend = spec.request_blend(engine)
    clock = Clock()
    report = {}
    for name in args.dataset.split(","):
        dataset = load_dataset(name, passage_tokens=args.passage_tokens, limit=args.limit,
                               tokenizer=engine.tokenizer)
        totals, probes, loads = [], [], []
        for example in dataset.examples:
            segments = build_segments(engine.prompts, example)
            engine.generate(GenerateRequest(segments=segments, method="reuse", blend=blend))
            request = GenerateRequest(segments=segments, method=spec.method, blend=blend)
            runs = []
            for repeat in range(args.repeats + 1):
                clock.reset()
                start = time.perf_counter()
                engine.prefill(request)
                if repeat:  # the first one warms up
                    runs.append((time.perf_counter() - start, clock.probe, clock.probe_load))
            total, probe, load = (statistics.median(r[i] for r in runs) for i in range(3))
            totals.append(total)
            probes.append(probe)
            loads.append(load)
            engine.store.clear()
        row = {"prefill_ms": 1000 * statistics.mean(totals),
               "probe_share": sum(probes) / sum(totals),
               "probe_share_without_loading": (sum(probes) - sum(loads)) / sum(totals)}
        report[name] = row
        print(f"{name:10s} prefill {row['prefill_ms']:.0f} ms  probe {row['probe_share']:.1%}"
              f" ({row['probe_share_without_loading']:.1%} without loading the cached rows)",
              flush=True)
    print(json.dumps({"method": args.method, "examples": args.limit, "results": report}))


if __name__ == "__main__":
    main()

"""Where a method's first token differs from full prefill's: top-1 agreement split by how
decided full prefill's own first token is (the probability of its top token minus that of the
second), from an eval run's rows and its saved full-prefill logits.

    .venv/bin/python benchmarks/top1_margins.py runs/sel9 \\
        'blend[qa,qkvd]-kv+probe30@0.1:L0=0.15,L4' musique 2wikimqa multi_news samsum
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from safetensors.torch import load_file


def margin(path: Path) -> float:
    """Full prefill's top-1 minus top-2 probability, from a saved reference."""
    (logits,) = load_file(path).values()
    top = logits.float().softmax(-1).flatten().topk(2).values
    return float(top[0] - top[1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("run", type=Path, help="an eval --out directory")
    parser.add_argument("method")
    parser.add_argument("datasets", nargs="+")
    parser.add_argument("--split", type=float, default=0.05,
                        help="the margin that separates near-ties from decided tokens")
    args = parser.parse_args()
    for dataset in args.datasets:
        rows = [json.loads(line) for line in (args.run / dataset / "results.jsonl").open()]
        # The last row of each example (a run resumed to decode appends a second one).
        rows = list({r["example"]: r for r in rows if r.get("method") == args.method
                     and r.get("top1_agreement") is not None}.values())
        settings = {r["setting"] for r in rows}
        if len(settings) != 1:
            raise SystemExit(f"{dataset}: {args.method} has rows of {len(settings)} settings")
        (setting,) = settings
        logits = args.run / dataset / "full_logits" / setting
        split = {True: [], False: []}  # near-tie -> agreements
        for row in rows:
            tie = margin(logits / f"{row['example']}.safetensors") < args.split
            split[tie].append(row["top1_agreement"])
        every = split[True] + split[False]
        parts = [f"{dataset:10s} top-1 {sum(every) / len(every):.2f} on {len(every)}"]
        for tie, name in ((False, "decided"), (True, "near-tie")):
            values = split[tie]
            share = f"{sum(values) / len(values):.2f}" if values else "-"
            parts.append(f"{name} (margin {'<' if tie else '>='} {args.split:g}): {share} "
                         f"on {len(values)}, {len(values) - int(sum(values))} differ")
        print("; ".join(parts))


if __name__ == "__main__":
    main()

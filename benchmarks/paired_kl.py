"""Paired comparison of two methods of one eval run: the per-example difference of their
first-token KL (A - B; negative: A is closer to full prefill), its mean with a 90% bootstrap
interval, and on how many examples A is the better one.

    .venv/bin/python benchmarks/paired_kl.py runs/sel4 'blend[qa]+probe30@0.12:L0' \
        'blend[qa]+probe30@0.12:L0/preamble' musique 2wikimqa multi_news samsum

With ``--pooled``, every difference is also divided by its dataset's best-reuse KL (the lower
mean, over the examples compared, of ``reuse``, ``reuse/preamble`` or ``reuse/prefix`` in A's
run) and the pooled mean over all examples is
given with its interval: the difference in the share of reuse's loss recovered.

With ``--run-b``, B's rows come from another run (the same method at two commits):

    .venv/bin/python benchmarks/paired_kl.py runs/sel5 'blend[qa]+probe30@0.12:L0' \
        'blend[qa]+probe30@0.12:L0' musique 2wikimqa multi_news samsum --run-b runs/sel4
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from cacheblend.eval.metrics import bootstrap_interval, mean_of

REUSES = ("reuse", "reuse/preamble", "reuse/prefix")


def kl_by_example(path: Path, method: str) -> dict[str, float]:
    rows = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    return {r["example"]: r["kl_first_token"] for r in rows
            if r.get("method") == method and r.get("kl_first_token") is not None}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("run", help="an eval --out directory")
    parser.add_argument("a")
    parser.add_argument("b")
    parser.add_argument("datasets", nargs="+")
    parser.add_argument("--run-b", help="where B's rows are (default: the same run)")
    parser.add_argument("--pooled", action="store_true",
                        help="also pool the datasets, each difference over best reuse's KL")
    args = parser.parse_args()
    pooled = []
    for dataset in args.datasets:
        path = Path(args.run) / dataset / "results.jsonl"
        path_b = Path(args.run_b or args.run) / dataset / "results.jsonl"
        a, b = kl_by_example(path, args.a), kl_by_example(path_b, args.b)
        common = sorted(set(a) & set(b))
        diff = [a[e] - b[e] for e in common]
        low, high = bootstrap_interval(mean_of, diff)
        better = sum(d < 0 for d in diff)
        print(f"{dataset:10s} n={len(common)}  KL(A) - KL(B) = {mean_of(diff):+.4f} "
              f"[{low:+.4f}, {high:+.4f}]  A better on {better}/{len(common)}")
        if args.pooled:
            reuses = [kl_by_example(path, m) for m in REUSES]
            reuses = [r for r in reuses if set(common) <= set(r)]
            if not reuses:
                parser.error(f"{dataset}: --pooled needs reuse rows for every example in A's run")
            scale = min(mean_of([r[e] for e in common]) for r in reuses)
            pooled += [d / scale for d in diff]
    if pooled:
        low, high = bootstrap_interval(mean_of, pooled)
        print(f"pooled     n={len(pooled)}  (KL(A) - KL(B)) / best reuse's KL = "
              f"{mean_of(pooled):+.4f} [{low:+.4f}, {high:+.4f}]")


if __name__ == "__main__":
    main()

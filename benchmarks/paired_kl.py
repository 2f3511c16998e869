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

With ``--field``, another per-example number is compared instead of the KL (``gold``: the
dataset's gold metric, F1 or Rouge-L; ``vs_full``: the answer's agreement with full prefill's;
or a row key such as ``top1_agreement``); the sign reads the same way: A - B.

    .venv/bin/python benchmarks/paired_kl.py runs/sel9 \
        'blend[qa,qkvd]-kv+probe30@0.1:L0=0.15,L4' full musique 2wikimqa multi_news samsum \
        --field gold
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from cacheblend.eval.metrics import bootstrap_interval, mean_of

REUSES = ("reuse", "reuse/preamble", "reuse/prefix")


FIELDS = {"gold": ("f1", "rouge_l"), "vs_full": ("f1_vs_full", "rouge_l_vs_full")}


def by_example(path: Path, method: str, field: str = "kl_first_token") -> dict[str, float]:
    """Each example's ``field`` (a row key, or one of FIELDS' names) for ``method``, from its
    last row that has it (a run resumed to decode appends a second row)."""
    rows = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    out = {}
    for r in rows:
        if r.get("method") != method:
            continue
        for key in FIELDS.get(field, (field,)):
            if r.get(key) is not None:
                out[r["example"]] = r[key]
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("run", help="an eval --out directory")
    parser.add_argument("a")
    parser.add_argument("b")
    parser.add_argument("datasets", nargs="+")
    parser.add_argument("--run-b", help="where B's rows are (default: the same run)")
    parser.add_argument("--field", default="kl_first_token",
                        help="what to compare: kl_first_token, gold, vs_full or a row key")
    parser.add_argument("--pooled", action="store_true",
                        help="also pool the datasets, each difference over best reuse's KL")
    args = parser.parse_args()
    if args.pooled and args.field != "kl_first_token":
        parser.error("--pooled compares first-token KL only")
    name = "KL" if args.field == "kl_first_token" else args.field
    lower_is_better = args.field == "kl_first_token"
    pooled = []
    for dataset in args.datasets:
        path = Path(args.run) / dataset / "results.jsonl"
        path_b = Path(args.run_b or args.run) / dataset / "results.jsonl"
        for results in dict.fromkeys((path, path_b)):
            if not results.is_file():
                parser.error(f"{dataset}: no eval results at {results}")
        a, b = by_example(path, args.a, args.field), by_example(path_b, args.b, args.field)
        common = sorted(set(a) & set(b))
        if not common:
            missing = " and ".join(label for label, rows in (("A", a), ("B", b)) if not rows)
            parser.error(f"{dataset}: no example has {args.field} for both A and B"
                         + (f" ({missing}: none in the run)" if missing else ""))
        diff = [a[e] - b[e] for e in common]
        low, high = bootstrap_interval(mean_of, diff)
        better = sum(d < 0 if lower_is_better else d > 0 for d in diff)
        print(f"{dataset:10s} n={len(common)}  {name}(A) - {name}(B) = {mean_of(diff):+.4f} "
              f"[{low:+.4f}, {high:+.4f}]  A better on {better}/{len(common)}")
        if args.pooled:
            reuses = [by_example(path, m) for m in REUSES]
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

"""Can a request tell, before it recomputes, whether more recompute would pay? (issue 12's
adaptive budget.)

For every example of a dataset, runs the default blend once and records what a request-level
rule could read at run time:

- from the probe (before layer 0): the suffix's output share on the chunk tokens (``chunk
  mass``), its entropy, and the share left outside the top r of the chunk tokens (``left@r``);
- at the second check (layer 4): the candidates' attention x deviation, in total and left
  outside the top r (``s2left@r``), and the mean K and V deviations;
- the prompt's chunk token count.

Each signal is also taken per chunk token (divided by that count). It then reads an
eval run that holds the default schedule at 5%, 11.5% and 20% (``--run``, e.g. ``runs/sel6``),
and asks, per signal: does it rank the examples by how much 20% gains over 5% (Spearman rho),
and what share of best reuse's KL would be recovered if the examples it ranks highest got 20%
and those it ranks lowest 5%, the rest 11.5%, at the same mean recomputed token count as 11.5%
everywhere? ``oracle`` is the same allocation chosen with the KLs known (a bound, not a rule).

    .venv/bin/python benchmarks/budget_signals.py --dataset multi_news --run runs/sel6
"""

from __future__ import annotations

import json
from collections import defaultdict
from pathlib import Path

import torch
from quality_args import dataset_parser, engine_and_dataset
from tqdm import tqdm

from cacheblend.blend import fusor, select
from cacheblend.engine import GenerateRequest
from cacheblend.eval.prompts import build_segments

DEFAULT = "blend[qa,qkvd]-kv+probe30@{}:L0={},L4"
LEVELS = {0.05: DEFAULT.format(0.05, 0.075), 0.115: DEFAULT.format(0.115, 0.1725),
          0.2: DEFAULT.format(0.2, 0.3)}
RATIOS = (0.05, 0.115, 0.2)


class Recorder:
    """Wraps the fusor's probe and deviation, and the second stage's selector, to keep what
    they saw for one request."""

    def __init__(self) -> None:
        self.seen: dict = {}
        probe, deviation = fusor.probe_attention, fusor.kv_deviation
        keep = select.QueryDeviationSelector.keep
        seen = self.seen

        def probed(*args, **kwargs):
            seen["probe"] = probe(*args, **kwargs)
            return seen["probe"]

        def deviated(fresh_k, cached_k, fresh_v, cached_v, on):
            seen["dev_k"] = (fresh_k - cached_k).float().pow(2).sum(dim=(0, 2))
            seen["dev_v"] = (fresh_v - cached_v).float().pow(2).sum(dim=(0, 2))
            return deviation(fresh_k, cached_k, fresh_v, cached_v, on)

        def kept(selector, candidates):
            seen["candidates"] = candidates
            return keep(selector, candidates)

        fusor.probe_attention, fusor.kv_deviation = probed, deviated
        select.QueryDeviationSelector.keep = kept


def left_after(scores: torch.Tensor, count: int) -> float:
    """The score mass outside the ``count`` highest scores."""
    ranked = scores.sort(descending=True).values
    return float(ranked[count:].sum())


def signals(seen: dict) -> dict[str, float]:
    candidates = seen["candidates"]
    tokens = candidates.num_chunk_tokens
    in_chunk = torch.zeros(seen["probe"].shape[0], dtype=torch.bool)
    for start, end in candidates.chunk_spans:
        in_chunk[start:end] = True
    share = seen["probe"][in_chunk]
    spread = share / share.sum().clamp_min(1e-30)
    out = {"chunk mass": float(share.sum()),
           "entropy": float(-(spread * spread.clamp_min(1e-30).log()).sum()),
           "dev_k mean": float(seen["dev_k"].mean()), "dev_v mean": float(seen["dev_v"].mean())}
    for ratio in (0.05, 0.115, 0.1725, 0.3):
        out[f"left@{ratio}"] = left_after(share, int(ratio * tokens) + 1)
    deviation = seen["dev_k"] / seen["dev_k"].mean() + seen["dev_v"] / seen["dev_v"].mean()
    score = candidates.attention.float() * deviation
    out["s2 total"] = float(score.sum())
    for ratio in (0.05, 0.115):
        out[f"s2left@{ratio}"] = left_after(score, int(ratio * tokens) + 1)
    for name in list(out):
        out[f"{name} /token"] = out[name] / tokens
    out["chunk tokens"] = tokens
    return out


def rank(values: list[float]) -> list[int]:
    order = sorted(range(len(values)), key=values.__getitem__)
    ranks = [0] * len(values)
    for position, index in enumerate(order):
        ranks[index] = position
    return ranks


def spearman(a: list[float], b: list[float]) -> float:
    ra, rb = torch.tensor(rank(a), dtype=torch.float64), torch.tensor(rank(b), dtype=torch.float64)
    ra, rb = ra - ra.mean(), rb - rb.mean()
    return float((ra * rb).sum() / ((ra * ra).sum() * (rb * rb).sum()).sqrt().clamp_min(1e-30))


def allocate(order: list[int], tokens: list[int], top: float = 0.3) -> list[float]:
    """The first ``top`` of ``order`` get 20%, as many of the last as keep the mean recomputed
    token count at 11.5%'s get 5%, the rest 11.5%."""
    ratio = [0.115] * len(order)
    high = order[: round(top * len(order))]
    for index in high:
        ratio[index] = 0.2
    budget = 0.115 * sum(tokens)
    for index in reversed(order):
        if sum(r * t for r, t in zip(ratio, tokens)) <= budget or index in high:
            break
        ratio[index] = 0.05
    return ratio


def oracle_allocation(kl: list[dict], tokens: list[int]) -> list[float]:
    """Per example one of RATIOS, lowest total KL at 11.5%'s token count (Lagrangian sweep)."""
    budget, best = 0.115 * sum(tokens), None
    for step in range(4000):
        price = step * 1e-5
        ratio = [min(RATIOS, key=lambda r, i=i: kl[i][r] + price * r * tokens[i])
                 for i in range(len(kl))]
        if sum(r * t for r, t in zip(ratio, tokens)) <= budget:
            total = sum(kl[i][r] for i, r in enumerate(ratio))
            if best is None or total < best[0]:
                best = (total, ratio)
    return best[1]


def eval_kl(run: Path, dataset: str) -> tuple[dict, dict]:
    """Per example, the KL of each level and of best reuse (the better mode on average)."""
    rows = [json.loads(line) for line in (run / dataset / "results.jsonl").open()]
    setting = next(r["setting"] for r in reversed(rows) if "setting" in r)
    kl: dict = defaultdict(dict)
    for row in rows:
        if row.get("setting") == setting and "kl_first_token" in row:
            kl[row["example"]][row["method"]] = row["kl_first_token"]
    modes = [m for m in ("reuse", "reuse/preamble") if any(m in k for k in kl.values())]
    if not modes:
        raise SystemExit(f"{run / dataset}: no reuse rows to measure against")
    reuse = min(modes, key=lambda m: sum(k[m] for k in kl.values() if m in k))
    return kl, {e: k[reuse] for e, k in kl.items() if reuse in k}


def main() -> None:
    parser = dataset_parser(__doc__)
    parser.add_argument("--run", type=Path, required=True,
                        help="an eval --out with the default schedule at 5%%, 11.5%%, 20%%")
    args = parser.parse_args()
    engine, dataset = engine_and_dataset(args)
    kl, reuse = eval_kl(args.run, dataset.name)
    recorder = Recorder()
    measured: dict[str, dict] = {}
    for example in tqdm(dataset.examples, desc=dataset.name, unit="example"):
        if not all(label in kl.get(example.id, {}) for label in LEVELS.values()):
            continue
        segments = build_segments(engine.prompts, example)
        engine.generate(GenerateRequest(segments=segments, method="reuse"))  # store the chunks
        recorder.seen.clear()
        engine.prefill(GenerateRequest(segments=segments, method="blend"))
        if "candidates" in recorder.seen:  # else nothing to rank (one exact chunk)
            measured[example.id] = signals(recorder.seen)
        engine.store.clear()
    ids = list(measured)
    levels = [{r: kl[e][LEVELS[r]] for r in RATIOS} for e in ids]
    tokens = [int(measured[e]["chunk tokens"]) for e in ids]
    reuse_kl = sum(reuse[e] for e in ids) / len(ids)
    gain = [k[0.05] - k[0.2] for k in levels]

    def recovered(ratio: list[float]) -> float:
        return 1 - sum(levels[i][r] for i, r in enumerate(ratio)) / len(ids) / reuse_kl

    print(f"{dataset.name}: {len(ids)} examples; recovered at 11.5% everywhere "
          f"{recovered([0.115] * len(ids)):.1%}; oracle allocation "
          f"{recovered(oracle_allocation(levels, tokens)):.1%}")
    rows = []
    for name in measured[ids[0]]:
        values = [measured[e][name] for e in ids]
        order = sorted(range(len(ids)), key=lambda i: -values[i])
        ratio = allocate(order, tokens)
        cost = sum(r * t for r, t in zip(ratio, tokens)) / (0.115 * sum(tokens))
        rows.append({"signal": name, "rho_gain": spearman(values, gain),
                     "recovered": recovered(ratio), "token_cost": cost})
        print(f"  {name:22s} rho with the gain {rows[-1]['rho_gain']:+.2f}   recovered "
              f"{rows[-1]['recovered']:.1%} at {cost:.2f}x the tokens")
    print(json.dumps({"dataset": dataset.name, "n": len(ids), "rows": rows}))


if __name__ == "__main__":
    main()

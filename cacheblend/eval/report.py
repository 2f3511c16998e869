"""Markdown: one table per dataset, the TTFT sweep, plot links and the exact commands.

``write_report(out_dir, ...)`` writes ``out_dir/results.md`` (a ``docs/results.md``-style
page) and copies the plots next to it, so the page is self-contained wherever it is placed.
"""

from __future__ import annotations

import math
import shutil
import time
from pathlib import Path

from cacheblend.eval.plots import METRIC_NAMES

REPORT_FILE = "results.md"
PLOTS_DIR = "results_plots"


def _fmt(value, digits: int = 3) -> str:
    if value is None:
        return "-"
    if isinstance(value, float):
        if value != 0 and abs(value) < 10 ** -digits:
            return f"{value:.1e}"
        return f"{value:.{digits}f}"
    return str(value)


def dataset_table(summary: dict) -> str:
    """Markdown table: one row per method."""
    metric = summary["metric"]
    name = METRIC_NAMES.get(metric, metric)
    full_ttft = summary["methods"].get("full", {}).get("ttft_s")
    lines = [
        (f"| method | n | KL(full‖m) first token | top-1 agree | {name} | {name} vs full | "
        "TTFT s (mean) | speed-up vs full | recomputed of chunks | computed of prompt |"),
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for label, m in summary["methods"].items():
        ttft = m.get("ttft_s")
        speedup = full_ttft / ttft if full_ttft and ttft else None
        lines.append(
            f"| `{label}` | {m['n']} | {_fmt(m.get('kl_first_token'), 4)} | "
            f"{_fmt(m.get('top1_agreement'), 2)} | {_fmt(m.get(metric))} | "
            f"{_fmt(m.get(f'{metric}_vs_full'))} | {_fmt(ttft)} | "
            f"{'-' if speedup is None else f'{speedup:.2f}x'} | "
            f"{_pct(m.get('recomputed_frac'))} | {_pct(m.get('computed_frac'))} |"
        )
    return "\n".join(lines)


def _ci(interval, digits: int = 3) -> str:
    return "" if not interval else f" [{_fmt(interval[0], digits)}, {_fmt(interval[1], digits)}]"


def _share(value, interval=None) -> str:
    if value is None or math.isnan(value):
        return "-"
    text = f"{100 * value:.0f}%"
    if interval:
        text += f" [{100 * interval[0]:.0f}, {100 * interval[1]:.0f}]"
    return text


# CacheBlend's own setting (HKVD at 15%, check layer 1, precompute preamble), the TTFT yardstick
# of issue 12: named with its mode since the default mode is prefix (round 3), without it in
# earlier runs, and only as "blend" before issue 12; all are read the same way.
# CacheBlend's HKVD (key deviation, check layer 1, 15%) in its best mode: the TTFT yardstick.
# Named with -k since the default deviation became kv (round 4) and +nodrift since the default
# corrects drift (round 5); earlier runs' labels follow.
BLEND_BASELINES = ("blend[hkvd]-k+nodrift@0.15:L1/preamble", "blend[hkvd]-k@0.15:L1/preamble",
                   "blend[hkvd]@0.15:L1/preamble",
                   "blend[hkvd]@0.15:L1", "blend")


def _baseline(methods: dict) -> str:
    return next((label for label in BLEND_BASELINES if label in methods), BLEND_BASELINES[0])


def selection_table(summary: dict) -> str:
    """The measurement issue 12 asks for, one row per method: KL mean [90% bootstrap interval]
    and p90; the share of best-reuse's KL recovered [interval]; examples worse than best reuse;
    top-1 agreement; the answer score against full's; the gold score; TTFT over blend@0.15's."""
    metric = summary["metric"]
    name = METRIC_NAMES.get(metric, metric)
    methods = summary["methods"]
    best = next((m.get("best_reuse") for m in methods.values() if m.get("best_reuse")), None)
    baseline = _baseline(methods)
    base_ttft = methods.get(baseline, {}).get("ttft_s")
    lines = [
        (f"Against reuse in its best precompute mode here: `{best}`. Intervals: 90% bootstrap "
         "over examples (2000 resamples, seed 0)."),
        "",
        (f"| method | n | KL mean [90% CI] | KL p90 | recovered of best reuse's KL | worse than "
         f"reuse | top-1 [90% CI] | {name} vs full [90% CI] | {name} (gold) | TTFT / "
         f"`{baseline}` | recomputed |"),
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for label, m in methods.items():
        ttft = m.get("ttft_s")
        ratio = f"{ttft / base_ttft:.2f}x" if ttft and base_ttft else "-"
        worse = m.get("worse_than_reuse")
        worse_text = "-" if worse is None else f"{worse}/{m.get('n_vs_reuse')}"
        vs_full = m.get(f"{metric}_vs_full")
        lines.append(
            f"| `{label}` | {m['n']} | {_fmt(m.get('kl_first_token'), 4)}"
            f"{_ci(m.get('kl_ci'), 4)} | {_fmt(m.get('kl_p90'), 4)} | "
            f"{_share(m.get('recovered'), m.get('recovered_ci'))} | {worse_text} | "
            f"{_fmt(m.get('top1_agreement'), 2)}{_ci(m.get('top1_ci'), 2)} | "
            f"{_fmt(vs_full)}{_ci(m.get(f'{metric}_vs_full_ci')) if vs_full is not None else ''}"
            f" | {_fmt(m.get(metric))} | {ratio} | {_pct(m.get('recomputed_frac'))} |")
    return "\n".join(lines)


def overview_table(summaries: list[dict]) -> str:
    """One row per method found in every dataset: quality and speed-up, averaged over datasets
    (each dataset weighs the same), KL also as a share of ``reuse``'s."""
    labels = [label for label in summaries[0]["methods"]
              if all(label in s["methods"] for s in summaries)]

    def mean_of(label, key, per=lambda summary, value: value):
        values = [per(s, s["methods"][label].get(key)) for s in summaries]
        values = [v for v in values if v is not None]
        return sum(values) / len(values) if values else None

    def speedup(summary, ttft):
        full = summary["methods"].get("full", {}).get("ttft_s")
        return full / ttft if full and ttft else None

    def kl_share(summary, kl):
        reuse = summary["methods"].get("reuse", {}).get("kl_first_token")
        return kl / reuse if reuse and kl is not None else None

    lines = [("| method | KL(full‖m) | KL / reuse's | recovered of best reuse's KL (min over "
              "datasets) | worse than reuse | top-1 agree | score vs full | speed-up vs full | "
              "recomputed of chunks |"),
             "|---|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for label in labels:
        vs_full = [s["methods"][label].get(f"{s['metric']}_vs_full") for s in summaries]
        vs_full = [v for v in vs_full if v is not None]
        share = mean_of(label, "kl_first_token", kl_share)
        fast = mean_of(label, "ttft_s", speedup)
        recovered = [s["methods"][label].get("recovered") for s in summaries]
        recovered = [r for r in recovered if r is not None]
        worse = [s["methods"][label].get("worse_than_reuse") for s in summaries]
        compared = [s["methods"][label].get("n_vs_reuse") for s in summaries]
        worse_text = (f"{sum(worse)}/{sum(compared)}" if None not in worse + compared else "-")
        recovered_text = (f"{_share(sum(recovered) / len(recovered))} ({_share(min(recovered))})"
                          if len(recovered) == len(summaries) else "-")
        lines.append(
            f"| `{label}` | {_fmt(mean_of(label, 'kl_first_token'), 4)} | "
            f"{'-' if share is None else f'{share:.2f}x'} | {recovered_text} | {worse_text} | "
            f"{_fmt(mean_of(label, 'top1_agreement'), 2)} | "
            f"{_fmt(sum(vs_full) / len(vs_full)) if vs_full else '-'} | "
            f"{'-' if fast is None else f'{fast:.2f}x'} | "
            f"{_pct(mean_of(label, 'recomputed_frac'))} |")
    return "\n".join(lines)


def _scored_note(summary: dict) -> str:
    """Which methods decoded answers and on how many examples the scores are compared."""
    methods = summary["methods"]
    decoded = [label for label, m in methods.items() if m.get("n_decoded")]
    note = (f"Answers decoded by {', '.join(f'`{d}`' for d in decoded)}; their scores are "
            f"means over the {max((methods[d]['n_decoded'] for d in decoded), default=0)} "
            "examples all of them answered." if decoded else "No answers were decoded.")
    otherwise = {label: m["served_otherwise"] for label, m in methods.items()
                 if m.get("served_otherwise")}
    if otherwise:
        note += (" The loading controller ran another method than asked (a full prefill) in: "
                 + ", ".join(f"`{label}` {n}x" for label, n in otherwise.items()) + ".")
    return note


def _pct(value) -> str:
    return "-" if value is None else f"{100 * value:.1f}%"


BASELINES = ("full", "hf_full", "llama_cpp")  # what a blend request is compared with


def sweep_table(sweep: dict) -> str:
    """TTFT per (length, method), then each baseline's TTFT over blend's: the speed-ups."""
    labels = list(sweep["methods"])
    target = "blend" if "blend" in labels else None
    ratios = [b for b in BASELINES if b in labels and target and b != target]
    lines = ["| prompt tokens | " + " | ".join(f"`{label}`" for label in labels)
             + "".join(f" | {target} vs {b}" for b in ratios) + " |",
             "|---:|" + "---:|" * (len(labels) + len(ratios))]
    for index, length in enumerate(sweep["lengths"]):
        ttft, tokens = {}, None
        for label in labels:
            rows = sweep["methods"][label]
            row = rows[index] if index < len(rows) else None
            tokens = tokens or (row and row["prompt_tokens"])
            ttft[label] = row["ttft_s"] if row else None
        cells = [_fmt(ttft[label]) for label in labels]
        for base in ratios:
            ok = ttft[base] is not None and ttft[target]
            cells.append(f"{ttft[base] / ttft[target]:.2f}x" if ok else "-")
        lines.append(f"| {tokens or length} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def _place(plot: Path, out_dir: Path) -> str:
    """A link to ``plot`` relative to ``out_dir`` (copied into it when outside)."""
    plot, out_dir = plot.resolve(), out_dir.resolve()
    if not plot.is_relative_to(out_dir):
        target = out_dir / PLOTS_DIR / plot.name
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(plot, target)
        plot = target
    return plot.relative_to(out_dir).as_posix()


def write_report(out_dir: str | Path, summaries: list[dict], sweep: dict | None = None,
                 commands: list[str] | None = None,
                 plots: dict[str, dict[str, Path]] | None = None) -> Path:
    """Write ``out_dir/results.md``. ``plots``: {dataset or "ttft_sweep": {name: png path}}."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    plots = plots or {}
    parts = ["# Evaluation results", "",
             f"Generated {time.strftime('%Y-%m-%d %H:%M')} by `cacheblend eval`."]
    if commands:
        parts += ["", "Commands:", "", "```", *commands, "```"]
    parts += ["", ("Columns: first-token KL(full ‖ method) over the softmax of the last prompt "
              "position's logits (lower is better) and top-1 agreement with full prefill; answer "
              "scores against the gold answers and against the full-prefill answer (greedy "
              "decoding; QA answers are read from the first line); TTFT of requests whose chunks "
              "were all in the store (mean over examples); recomputed = cached chunk tokens "
              "computed again, computed = prompt tokens with fresh K/V at the last layer.")]
    if len(summaries) > 1:
        parts += ["", "## All datasets", "",
                  (f"Means over {', '.join(s['dataset'] for s in summaries)} (each dataset "
                   "weighs the same; speed-up and KL share taken per dataset, then averaged). "
                   "Score vs full: answer F1 or Rouge-L against the full-prefill answer."),
                  "", overview_table(summaries)]
    for summary in summaries:
        setting = summary["setting"]
        parts += ["", f"## {summary['dataset']}", "",
                  (f"{summary['examples']} examples ({summary['skipped']} skipped as too long); "
                  f"passages per example: {setting['passages'] or 'all'}, tokens per passage: "
                  f"{setting['passage_tokens'] or 'untruncated'}, max new tokens: "
                  f"{setting['max_tokens']}; model `{setting['model'][:12]}`, store codec "
                  f"{setting['store_codec']}."), "", dataset_table(summary)]
        if any("recovered" in m for m in summary["methods"].values()):
            parts += ["", "Against reuse, with intervals:", "", selection_table(summary)]
        parts += ["", _scored_note(summary)]
        if summary.get("answer_in_context") is not None:
            parts[-1] += (f" A gold answer occurs in the passages shown for "
                          f"{100 * summary['answer_in_context']:.0f}% of the examples (a ceiling "
                          "on answer F1).")
        for name, plot in plots.get(summary["dataset"], {}).items():
            parts += ["", f"![{summary['dataset']} {name}]({_place(Path(plot), out_dir)})"]
    if sweep:
        parts += ["", "## TTFT against prompt length", "",
                  (f"Median of {sweep['repeats']} requests after a warm-up, {sweep['source']} "
                  f"chunks of ~{sweep['chunk_tokens']} tokens. `prefix`: the system prefix is "
                  "cached, the chunks are not (a RAG request whose chunk order was not seen "
                  "before). `hf_full`: transformers' forward of the same ids. `llama_cpp`: llama.cpp "
                  "(llama-cpp-python) prefilling the same ids on the GGUF file itself, whose "
                  "weights stay quantized: a speed peer, not a quality one. `blend vs X`: X's "
                  "TTFT over blend's."), "",
                  sweep_table(sweep)]
        if sweep.get("skipped_peers"):
            parts += ["", f"Not installed, skipped: {', '.join(sweep['skipped_peers'])}."]
        for name, plot in plots.get("ttft_sweep", {}).items():
            parts += ["", f"![{name}]({_place(Path(plot), out_dir)})"]
    path = out_dir / REPORT_FILE
    path.write_text("\n".join(parts) + "\n", encoding="utf-8")
    return path

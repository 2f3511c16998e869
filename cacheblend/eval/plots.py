"""PNG plots (matplotlib, Agg backend): quality against TTFT with its Pareto front (against the
gold answers, against the full-prefill answer, and first-token KL), and TTFT against prompt
length."""

from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # files only, no display
import matplotlib.pyplot as plt

METRIC_NAMES = {"f1": "answer F1", "rouge_l": "Rouge-L", "top1_agreement": "top-1 agreement",
                "kl_first_token": "first-token KL vs full (nats)",
                "f1_vs_full": "answer F1 vs full prefill's answer",
                "rouge_l_vs_full": "Rouge-L vs full prefill's summary"}


def pareto_front(points: list[tuple[float, float]]) -> list[int]:
    """Indices of the points no other point beats on both axes (lower x, higher y), by x."""
    order = sorted(range(len(points)), key=lambda i: (points[i][0], -points[i][1]))
    front, best = [], float("-inf")
    for i in order:
        if points[i][1] > best:
            front.append(i)
            best = points[i][1]
    return front


def quality_metric(summary: dict, against_full: bool = False) -> str:
    """The task metric (``against_full``: scored against the full-prefill answer) when some
    method besides full decoded answers (the plot shows those methods), else top-1 agreement."""
    metric = summary["metric"] + ("_vs_full" if against_full else "")
    decoded = [label for label, m in summary["methods"].items() if m.get(metric) is not None]
    if any(label != "full" for label in decoded):
        return metric
    return "top1_agreement"


def _points(summary: dict, key: str) -> tuple[list[str], list[tuple[float, float]]]:
    labels, points = [], []
    for label, stats in summary["methods"].items():
        if stats.get("ttft_s") is not None and stats.get(key) is not None:
            labels.append(label)
            points.append((stats["ttft_s"], stats[key]))
    return labels, points


def plot_quality_vs_ttft(summary: dict, path: Path, key: str | None = None) -> Path:
    """One point per method; the Pareto front (faster and better) is joined and ringed.
    For KL (lower is better) the front is taken on -KL."""
    key = key or quality_metric(summary)
    lower_better = key == "kl_first_token"
    labels, points = _points(summary, key)
    fig, ax = plt.subplots(figsize=(7, 4.5))
    if points:
        xs, ys = zip(*points, strict=True)
        ax.scatter(xs, ys, s=30, color="tab:blue", zorder=3)
        for label, x, y in zip(labels, xs, ys, strict=True):
            ax.annotate(label, (x, y), textcoords="offset points", xytext=(4, 4), fontsize=8)
        front = pareto_front([(x, -y if lower_better else y) for x, y in points])
        fx, fy = [xs[i] for i in front], [ys[i] for i in front]
        ax.plot(fx, fy, "--", color="tab:red", zorder=2, label="Pareto front")
        ax.scatter(fx, fy, s=120, facecolors="none", edgecolors="tab:red", zorder=4)
        ax.legend(loc="best", fontsize=8)
        if lower_better and all(y > 0 for y in fy):
            ax.set_yscale("log")
    ax.set_xlabel("mean TTFT (s)")
    ax.set_ylabel(METRIC_NAMES.get(key, key))
    ax.set_title(f"{summary['dataset']}: {METRIC_NAMES.get(key, key)} vs TTFT "
                 f"({summary['examples']} examples)")
    ax.grid(alpha=0.3)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def plot_ttft_vs_length(sweep: dict, path: Path) -> Path:
    fig, ax = plt.subplots(figsize=(7, 4.5))
    for label, rows in sweep["methods"].items():
        if rows:
            ax.plot([r["prompt_tokens"] for r in rows], [r["ttft_s"] for r in rows],
                    marker="o", label=label)
    ax.set_xlabel("prompt tokens")
    ax.set_ylabel(f"TTFT (s, median of {sweep['repeats']})")
    ax.set_title(f"TTFT vs prompt length ({sweep['source']} chunks of ~{sweep['chunk_tokens']} "
                 "tokens)")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def plot_dataset(summary: dict, out_dir: Path) -> dict[str, Path]:
    """The dataset's plots into ``out_dir``: {name: path}."""
    name = summary["dataset"]
    return {
        "quality_vs_ttft": plot_quality_vs_ttft(summary, out_dir / f"quality_vs_ttft_{name}.png"),
        "fidelity_vs_ttft": plot_quality_vs_ttft(summary, out_dir / f"fidelity_vs_ttft_{name}.png",
                                                 key=quality_metric(summary, against_full=True)),
        "kl_vs_ttft": plot_quality_vs_ttft(summary, out_dir / f"kl_vs_ttft_{name}.png",
                                           key="kl_first_token"),
    }

"""Run every method on the same prompts; one JSONL row per (example, method); resumable.

Per example:
1. the prompt's segments are built once (``prompts.build_segments``) and used by every method;
2. the chunks are precomputed and stored first (one ``reuse`` request per precompute mode in
   use), so the timed requests below find every chunk in the store: their TTFT is the cost of a
   hit, never of a miss (a request that still misses, e.g. after an eviction, is run again);
3. ``full`` runs first: its first-token logits are the reference for KL / top-1 agreement (saved
   as safetensors so a resumed run need not recompute them) and its answer the reference for
   ``*_vs_full`` scores;
4. every other method runs, greedy; methods outside ``decode`` stop after the first token (they
   still get KL, top-1 and TTFT).

Rows carry a setting id (dataset files, passages, truncation, decode length, model, store codec,
prompts, blend defaults). A rerun with the same setting skips the (example, method) pairs already
in ``results.jsonl``; rows from other settings are kept in the file but ignored.
"""

from __future__ import annotations

import hashlib
import json
import logging
import re
import time
import weakref
from dataclasses import asdict, dataclass, field
from pathlib import Path
from statistics import mean, median

import torch
from tqdm import tqdm

from cacheblend.config import BlendConfig
from cacheblend.decode import SamplingParams
from cacheblend.engine import Engine, GenerateRequest, GenerateResult
from cacheblend.eval.datasets import TASK_METRIC, Example, LoadedDataset
from cacheblend.eval.methods import MethodSpec, parse_method
from cacheblend.eval.metrics import (
    METRICS,
    answer_in_context,
    bootstrap_interval,
    first_token_kl,
    mean_of,
    percentile,
    recovered_share,
    top1_agreement,
    worse_than,
)
from cacheblend.eval.prompts import PROMPTS, answer_text, build_segments, prompts_version
from cacheblend.prompt import Segments

log = logging.getLogger(__name__)

RESULTS_FILE = "results.jsonl"
SUMMARY_FILE = "summary.json"
AVERAGED = ("kl_first_token", "top1_agreement", "ttft_s", "prefill_s", "prompt_tokens",
            "computed_frac", "recomputed_frac")


@dataclass
class EvalPlan:
    specs: list[MethodSpec]  # "full" first
    max_tokens: int
    decode: set[str]  # labels that decode an answer (contains "full" when not empty)
    min_tokens: int = 0  # the task's (see prompts.TaskPrompt)
    progress: bool = True
    extra_setting: dict = field(default_factory=dict)

    @classmethod
    def build(cls, specs: list[MethodSpec], kind: str, max_tokens: int | None = None,
              decode: set[str] | None = None, progress: bool = True) -> EvalPlan:
        """``decode`` None: every method decodes. The full-prefill reference is always run."""
        specs = [s for s in specs if s.label != "full"]
        specs.insert(0, parse_method("full"))
        labels = {s.label for s in specs}
        decode = set(labels) if decode is None else set(decode)
        unknown = decode - labels
        if unknown:
            raise ValueError(f"--decode-methods names methods not evaluated: "
                             f"{', '.join(sorted(unknown))}")
        if decode:
            decode.add("full")  # the *_vs_full scores need the reference answer
        prompt = PROMPTS[kind]
        return cls(specs, max_tokens or prompt.max_tokens, decode, prompt.min_tokens, progress)


# Bumped when the engine computes a config's rows differently (2: exact chunks are not
# recomputed, issue 12 round 4; 3: the drift correction runs before a check layer's selection,
# round 6), so a resumed run never mixes rows from before and after.
FUSION_VERSION = 3


def setting_of(engine: Engine, dataset: LoadedDataset, plan: EvalPlan, seed: int) -> dict:
    """Everything that changes a row's numbers (the example selection does not)."""
    blend = asdict(engine.config.blend)
    blend.pop("method", None)
    return {
        "dataset": dataset.name,
        "files": [f"{p.name}:{p.stat().st_size}" for p in dataset.files],
        "passages": dataset.passages,
        "passage_tokens": dataset.passage_tokens,
        "seed": seed if dataset.kind == "dialogue" else None,  # seeds pick the samsum shots
        "max_tokens": plan.max_tokens,
        "model": engine.fingerprint,
        "store_codec": engine.config.store_codec,
        # what changes the TTFT columns
        "store": engine.store.name,
        "device": str(engine.config.device),
        "threads": torch.get_num_threads(),
        "loading": engine.config.loading,
        "prompts": prompts_version(dataset.kind),
        "blend_defaults": blend,
        "fusion": FUSION_VERSION,
        **plan.extra_setting,
    }


def setting_id(setting: dict) -> str:
    text = json.dumps(setting, sort_keys=True, default=str)
    return hashlib.blake2b(text.encode(), digest_size=6).hexdigest()


class ResultLog:
    """Append-only JSONL of rows; the rows of one setting, by (example, method)."""

    def __init__(self, path: Path, setting: str) -> None:
        self.path = path
        self.setting = setting
        self.rows: dict[tuple[str, str], dict] = {}
        if path.is_file():
            with open(path, encoding="utf-8") as handle:
                for number, line in enumerate(handle, 1):
                    try:
                        row = json.loads(line)
                    except ValueError:  # a torn last line after a crash
                        log.warning("%s:%d: skipping unreadable row", path, number)
                        continue
                    if row.get("setting") == setting:
                        self.rows[(row["example"], row["method"])] = row

    def get(self, example: str, method: str) -> dict | None:
        return self.rows.get((example, method))

    def done(self, example: str, method: str, needs_answer: bool) -> bool:
        row = self.get(example, method)
        return row is not None and (row.get("skipped") is not None or row.get("decoded")
                                    or not needs_answer)

    def append(self, row: dict) -> None:
        row = {"setting": self.setting, **row}
        self.path.parent.mkdir(parents=True, exist_ok=True)
        with open(self.path, "a", encoding="utf-8") as handle:
            handle.write(json.dumps(row) + "\n")
            handle.flush()
        self.rows[(row["example"], row["method"])] = row


class ReferenceLogits:
    """Full-prefill first-token logits per example, as safetensors (no pickle)."""

    def __init__(self, directory: Path) -> None:
        self.directory = directory

    def _path(self, example: str) -> Path:
        safe = re.sub(r"[^A-Za-z0-9_.-]", "_", example)
        return self.directory / f"{safe}.safetensors"

    def load(self, example: str) -> torch.Tensor | None:
        from safetensors import SafetensorError
        from safetensors.torch import load_file

        path = self._path(example)
        if not path.is_file():
            return None
        try:
            return load_file(str(path))["logits"]
        except (OSError, SafetensorError, KeyError) as exc:  # a torn file: recompute
            log.warning("cannot read %s (%s); recomputing", path, exc)
            return None

    def save(self, example: str, logits: torch.Tensor) -> None:
        from safetensors.torch import save_file

        self.directory.mkdir(parents=True, exist_ok=True)
        path = self._path(example)
        tmp = path.with_suffix(".tmp")
        save_file({"logits": logits.detach().float().cpu().contiguous()}, str(tmp))
        tmp.replace(path)


_WARM_MODELS: weakref.WeakSet = weakref.WeakSet()


def warm_up(engine: Engine) -> None:
    """One tiny request per method, once per model and process: the first calls pay one-off
    costs (allocator, kernel selection) that would otherwise land in the first example's TTFT."""
    if engine.loaded.model in _WARM_MODELS:
        return
    docs = ["Warm-up document one.", "Warm-up document two."]
    for method in ("full", "prefix", "reuse", "blend", "epic"):
        engine.generate(GenerateRequest(question="Warm up?", documents=docs, method=method,
                                        sampling=SamplingParams(max_tokens=2)))
    _WARM_MODELS.add(engine.loaded.model)


def _request(segments: Segments, method: str, max_tokens: int, min_tokens: int = 0,
             blend: BlendConfig | None = None) -> GenerateRequest:
    return GenerateRequest(segments=segments, method=method, blend=blend, sampling=SamplingParams(
        max_tokens=max_tokens, temperature=0.0, min_tokens=min(min_tokens, max_tokens)))


def generate_hit(engine: Engine, request: GenerateRequest) -> GenerateResult:
    """Generate; a request that had to precompute a missed chunk runs again, so its TTFT is
    that of a request whose chunks are all in the store."""
    result = engine.generate(request)
    if result.stats.missed_tokens:
        result = engine.generate(request)
    return result


def _scores(example: Example, answer: str, full_answer: str | None) -> dict:
    metric = TASK_METRIC[example.kind]
    score = METRICS[metric]
    text = answer_text(example.kind, answer)
    out = {metric: score(text, example.answers)}
    if full_answer is not None:
        reference = answer_text(example.kind, full_answer)
        out[f"{metric}_vs_full"] = score(text, [reference])
    return out


def _row(example: Example, spec: MethodSpec, result: GenerateResult, reference: torch.Tensor,
         decoded: bool, full_answer: str | None) -> dict:
    stats = result.stats
    row = {
        "example": example.id,
        "method": spec.label,
        "base": spec.method,
        "ratio": stats.ratio,
        "served_as": stats.method,  # what ran: the controller may fall back to full
        "decoded": decoded,
        "kl_first_token": first_token_kl(reference, result.first_logits),
        "top1_agreement": top1_agreement(reference, result.first_logits),
        "ttft_s": stats.ttft_s if stats.missed_tokens == 0 else None,
        "prefill_s": stats.prefill_s,
        "prompt_tokens": stats.prompt_tokens,
        "chunk_tokens": stats.chunk_tokens,
        "computed_tokens": stats.computed_tokens,
        "recomputed_tokens": stats.recomputed_tokens,
        "reused_tokens": stats.reused_tokens,
        "missed_tokens": stats.missed_tokens,
        "borrowed_tokens": stats.borrowed_tokens,
        "computed_frac": stats.computed_tokens / max(1, stats.prompt_tokens),
        "recomputed_frac": stats.recomputed_tokens / max(1, stats.chunk_tokens),
        "time": time.time(),
    }
    if decoded:
        row["answer"] = result.text
        row["completion_tokens"] = stats.completion_tokens
        row["decode_s"] = stats.decode_s
        row.update(_scores(example, result.text, full_answer))
    return row


def evaluate_example(engine: Engine, example: Example, plan: EvalPlan, results: ResultLog,
                     references: ReferenceLogits, bar: tqdm | None = None) -> None:
    pending = [s for s in plan.specs
               if not results.done(example.id, s.label, s.label in plan.decode)]
    if not pending:
        return
    segments = build_segments(engine.prompts, example)
    limit = engine.runner.max_positions
    if segments.num_tokens + plan.max_tokens >= limit:
        reason = f"prompt of {segments.num_tokens} tokens + {plan.max_tokens} exceeds {limit}"
        log.warning("%s: skipped: %s", example.id, reason)
        for spec in pending:
            results.append({"example": example.id, "method": spec.label, "skipped": reason})
        return

    def note(label: str) -> None:
        if bar is not None:
            bar.set_postfix_str(f"{example.id} {label}", refresh=True)

    # Precompute the chunks (per precompute mode) and the system prefix before anything is
    # timed: in serving, both were stored by earlier requests.
    blends = {spec.label: spec.request_blend(engine) for spec in pending}
    modes = {}
    for spec in pending:
        if spec.uses_chunks:
            modes.setdefault(blends[spec.label].precompute, blends[spec.label])
    if not modes and any(spec.method == "prefix" for spec in pending):
        modes[engine.config.blend.precompute] = None  # stores the shared system prefix
    for mode, blend in modes.items():
        note(f"precompute/{mode}")
        engine.generate(_request(segments, "reuse", 1, blend=blend))

    full_spec = plan.specs[0]
    full_row = results.get(example.id, full_spec.label)
    reference = references.load(example.id)
    if full_spec in pending or reference is None:
        note("full")
        decode = full_spec.label in plan.decode
        result = generate_hit(engine, _request(segments, "full", plan.max_tokens if decode else 1,
                                                plan.min_tokens))
        reference = result.first_logits
        references.save(example.id, reference)
        if full_spec in pending:
            full_row = _row(example, full_spec, result, reference, decode, None)
            if decode:
                full_row.update(_scores(example, result.text, result.text))
            results.append(full_row)
    full_answer = full_row.get("answer") if full_row else None

    for spec in pending:
        if spec is full_spec:
            continue
        note(spec.label)
        decode = spec.label in plan.decode
        request = _request(segments, spec.method, plan.max_tokens if decode else 1,
                           plan.min_tokens, blend=blends[spec.label])
        result = generate_hit(engine, request)
        results.append(_row(example, spec, result, reference, decode, full_answer))


def _mean(values: list) -> float | None:
    values = [v for v in values if v is not None]
    return mean(values) if values else None


def summarize(rows: list[dict], labels: list[str], metric: str) -> dict[str, dict]:
    """Per method: means over its rows (skipped rows excluded), plus counts and median TTFT.

    Answer scores are averaged over the examples that every decoding method answered, so the
    methods' scores compare the same examples.
    """
    rows = [r for r in rows if r.get("skipped") is None]
    answered: dict[str, set[str]] = {}
    for row in rows:
        if row.get("decoded"):
            answered.setdefault(row["method"], set()).add(row["example"])
    common = set.intersection(*answered.values()) if answered else set()
    out = {}
    for label in labels:
        mine = [r for r in rows if r["method"] == label]
        if not mine:
            continue
        summary = {"n": len(mine), "ratio": mine[0].get("ratio")}
        for key in AVERAGED:
            summary[key] = _mean([r.get(key) for r in mine])
        ttfts = [r["ttft_s"] for r in mine if r.get("ttft_s") is not None]
        summary["ttft_median_s"] = median(ttfts) if ttfts else None
        # Rows where the engine ran another method than asked (the controller's fallback).
        summary["served_otherwise"] = sum(
            1 for r in mine if r.get("served_as") not in (None, r.get("base")))
        scored = [r for r in mine if r.get("decoded") and r["example"] in common]
        summary["n_decoded"] = len(scored)
        for key in (metric, f"{metric}_vs_full"):
            summary[key] = _mean([r.get(key) for r in scored])
        vs_full = [r[f"{metric}_vs_full"] for r in scored if r.get(f"{metric}_vs_full") is not None]
        summary[f"{metric}_vs_full_ci"] = bootstrap_interval(mean_of, vs_full)
        out[label] = summary
    _against_reuse(rows, out)
    return out


def _against_reuse(rows: list[dict], out: dict[str, dict]) -> None:
    """Per method: KL p90, bootstrap 90% intervals of the mean KL and top-1 agreement, and,
    against reuse in its best precompute mode (of the ``reuse`` methods evaluated, the one with
    the lowest mean KL on this dataset), the share of its KL recovered (with an interval) and
    the number of examples where the method's KL is above reuse's."""
    by_method: dict[str, dict[str, dict]] = {}
    for row in rows:
        by_method.setdefault(row["method"], {})[row["example"]] = row
    reuses = [label for label in out if by_method[label] and
              next(iter(by_method[label].values())).get("base") == "reuse"]
    reuses = [label for label in reuses if out[label]["kl_first_token"] is not None]
    best = min(reuses, key=lambda label: out[label]["kl_first_token"]) if reuses else None
    for label, summary in out.items():
        mine = {e: r for e, r in by_method[label].items()
                if r.get("kl_first_token") is not None}
        kls = [r["kl_first_token"] for r in mine.values()]
        summary["kl_p90"] = percentile(kls, 90) if kls else None
        summary["kl_ci"] = bootstrap_interval(mean_of, kls)
        summary["top1_ci"] = bootstrap_interval(mean_of, [r["top1_agreement"]
                                                          for r in mine.values()])
        summary["best_reuse"] = best
        if best is None:
            continue
        common = [e for e in mine
                  if by_method[best].get(e, {}).get("kl_first_token") is not None]
        method_kl = [mine[e]["kl_first_token"] for e in common]
        reuse_kl = [by_method[best][e]["kl_first_token"] for e in common]
        if not common:
            continue
        summary["recovered"] = recovered_share(method_kl, reuse_kl)
        summary["recovered_ci"] = bootstrap_interval(recovered_share, method_kl, reuse_kl)
        summary["worse_than_reuse"] = worse_than(method_kl, reuse_kl)
        summary["n_vs_reuse"] = len(common)


def run_dataset(engine: Engine, dataset: LoadedDataset, plan: EvalPlan, out_dir: Path,
                seed: int = 0) -> dict:
    """Evaluate every (example, method) not yet in ``out_dir/results.jsonl``; returns the
    summary (also written to ``out_dir/summary.json``)."""
    setting = setting_of(engine, dataset, plan, seed)
    sid = setting_id(setting)
    out_dir.mkdir(parents=True, exist_ok=True)
    results = ResultLog(out_dir / RESULTS_FILE, sid)
    references = ReferenceLogits(out_dir / "full_logits" / sid)
    todo = [e for e in dataset.examples
            if any(not results.done(e.id, s.label, s.label in plan.decode) for s in plan.specs)]
    if todo:
        warm_up(engine)
    with tqdm(todo, desc=f"eval {dataset.name}", unit="example",
              disable=not plan.progress) as bar:
        for example in bar:
            evaluate_example(engine, example, plan, results, references, bar)
    ids = {e.id for e in dataset.examples}
    rows = [r for (example, _), r in results.rows.items() if example in ids]
    metric = TASK_METRIC[dataset.kind]
    summary = {
        "dataset": dataset.name,
        "kind": dataset.kind,
        "metric": metric,
        "examples": len(dataset.examples),
        "skipped": len({r["example"] for r in rows if r.get("skipped") is not None}),
        "evaluated_now": len(todo),
        "answer_in_context": (mean(answer_in_context(e.answers, e.documents)
                                   for e in dataset.examples)
                              if dataset.kind == "qa" and dataset.examples else None),
        "setting_id": sid,
        "setting": setting,
        "methods": summarize(rows, [s.label for s in plan.specs], metric),
        "out_dir": str(out_dir),
    }
    (out_dir / SUMMARY_FILE).write_text(json.dumps(summary, indent=2) + "\n")
    return summary

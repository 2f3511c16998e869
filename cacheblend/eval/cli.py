"""`cacheblend eval`: quality and TTFT of every method on RAG datasets; TTFT sweeps; reports.

    cacheblend eval --dataset musique --limit 20 --methods full,reuse,blend,epic --json
    cacheblend eval --dataset all --methods full,prefix,reuse,blend@0.05,blend,blend@0.3,epic
    cacheblend eval --data my.json --methods full,blend-v@0.15,blend-gradual,blend+first16
    cacheblend eval --dataset musique --methods full,reuse,blend \\
        --precompute alone,sink,preamble,prefix --decode-methods none
    cacheblend eval --sweep --sweep-lengths 1024,2048,4096,7680
    cacheblend eval --dataset all --report-dir docs       # rerun = resume; writes docs/results.md

Results go to ``--out`` (default ``eval-runs``): ``<out>/<dataset>/results.jsonl`` (one row per
(example, method), appended as they finish: a rerun resumes), ``summary.json``, ``results.md``
and plots; ``<out>/ttft_sweep.json`` and ``<out>/ttft_vs_length.png`` for the sweep.
"""

from __future__ import annotations

import argparse
import json
import logging
import shlex
from pathlib import Path

from cacheblend.commands.common import add_engine_args, engine_config
from cacheblend.config import PRECOMPUTE_MODES
from cacheblend.errors import CacheBlendError

log = logging.getLogger(__name__)

DEFAULT_METHODS = "full,prefix,reuse,blend,epic"


def add_parser(subparsers) -> None:
    parser = subparsers.add_parser(
        "eval", help="evaluate methods on RAG datasets (quality, TTFT) and sweep TTFT",
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    data = parser.add_argument_group("data")
    data.add_argument("--dataset", help="musique | 2wikimqa | multi_news | samsum, a "
                      "comma-separated list, or all (default: musique)")
    data.add_argument("--data", metavar="FILE", help="a JSON file in the common format "
                      "[{question, answers, ctxs: [{title, text}]}] (instead of --dataset)")
    data.add_argument("--data-dir", help="raw data directory (default: ../shared/data/raw)")
    data.add_argument("--limit", type=int, help="number of examples (default: all)")
    data.add_argument("--skip", type=int, default=0, help="leave out the first N examples "
                      "(e.g. those a setting was tuned on; rows already run are reused)")
    data.add_argument("--passages", type=int, help="passages (chunks) per example; 0 = all "
                      "(default: 6 for QA and SAMSum shots, all for multi_news)")
    data.add_argument("--passage-tokens", type=int, help="truncate each passage to N tokens; "
                      "0 = no truncation (default: 512 for multi_news, none otherwise)")
    data.add_argument("--seed", type=int, default=0, help="SAMSum shots and --shuffle order")
    data.add_argument("--shuffle", action="store_true", help="pick examples in a seeded order")
    run_group = parser.add_argument_group("methods")
    run_group.add_argument("--methods", default=DEFAULT_METHODS,
                           help="comma-separated method specs, e.g. full,prefix,reuse,"
                           "blend@0.05,blend-v@0.15,blend-gradual,blend@0.15:L1=0.3,L4,"
                           "blend+first16,epic@32,reuse/sink (see cacheblend/eval/methods.py)")
    run_group.add_argument("--precompute", help="comma-separated precompute modes to cross "
                           f"with the chunk methods: {', '.join(PRECOMPUTE_MODES)} "
                           "(default: the config's)")
    run_group.add_argument("--decode-methods", default="all",
                           help="methods that decode an answer: all | none | specs; the others "
                           "get KL, top-1 and TTFT only (full decodes whenever any does)")
    run_group.add_argument("--max-tokens", type=int,
                           help="max new tokens (default: 32 for QA, 128 for summaries)")
    sweep = parser.add_argument_group("TTFT sweep")
    sweep.add_argument("--sweep", action="store_true",
                       help="measure TTFT against prompt length (datasets only if given)")
    sweep.add_argument("--sweep-lengths", default="1024,2048,4096,7680")
    sweep.add_argument("--sweep-methods", default="full,prefix,reuse,blend,hf_full,llama_cpp",
                       help="method specs plus peers hf_full, llama_cpp (skipped if missing)")
    sweep.add_argument("--sweep-repeats", type=int, default=3)
    sweep.add_argument("--chunk-tokens", type=int, default=512, help="sweep chunk size")
    out = parser.add_argument_group("output")
    out.add_argument("--out", default="eval-runs", help="output directory (default eval-runs)")
    out.add_argument("--report-dir", help="also write results.md (+ plots) here, e.g. docs")
    out.add_argument("--json", action="store_true", help="print the summary as JSON")
    out.add_argument("--no-progress", action="store_true", help="no progress bars")
    add_engine_args(parser)
    parser.set_defaults(handler=run, eval_parser=parser)


def command_line(args: argparse.Namespace) -> str:
    """The command, with every option that differs from its default."""
    parts = ["cacheblend", "eval"]
    for action in args.eval_parser._actions:
        if not action.option_strings or action.dest == "help":
            continue
        value = getattr(args, action.dest, None)
        if value is None or value == action.default or value is False:
            continue
        option = max(action.option_strings, key=len)
        parts += [option] if value is True else [option, str(value)]
    return shlex.join(parts)


def _csv(text: str | None) -> list[str]:
    return [item.strip() for item in (text or "").split(",") if item.strip()]


def _int_list(text: str, name: str) -> list[int]:
    try:
        values = [int(item) for item in _csv(text)]
    except ValueError:
        raise CacheBlendError(f"{name} must be comma-separated integers, got {text!r}") from None
    if not values or any(v <= 0 for v in values):
        raise CacheBlendError(f"{name} must be positive integers, got {text!r}")
    return values


def _dataset_names(args: argparse.Namespace) -> list[str]:
    from cacheblend.eval.datasets import DATASETS

    if args.data:
        if args.dataset:
            raise CacheBlendError("give --dataset or --data, not both")
        return []
    names = _csv(args.dataset)
    if names == ["all"]:
        return list(DATASETS)
    if not names and not args.sweep:
        return ["musique"]
    return names


def _decode_labels(args: argparse.Namespace, precompute: list[str] | None) -> set[str] | None:
    from cacheblend.eval.methods import parse_methods

    text = args.decode_methods.strip().lower()
    if text == "all":
        return None
    if text == "none":
        return set()
    return {spec.label for spec in parse_methods(args.decode_methods, precompute)}


def run(args: argparse.Namespace) -> int:
    from cacheblend.engine import Engine
    from cacheblend.eval.datasets import load_common_file, load_dataset
    from cacheblend.eval.methods import parse_methods
    from cacheblend.eval.plots import plot_dataset, plot_ttft_vs_length
    from cacheblend.eval.report import dataset_table, sweep_table, write_report
    from cacheblend.eval.runner import EvalPlan, run_dataset

    for name in ("limit", "max_tokens", "sweep_repeats", "chunk_tokens"):
        value = getattr(args, name)
        if value is not None and value < 1:
            raise CacheBlendError(f"--{name.replace('_', '-')} must be >= 1")
    if args.skip < 0:
        raise CacheBlendError("--skip must be >= 0")
    precompute = _csv(args.precompute) or None
    specs = parse_methods(args.methods, precompute)  # errors before the model loads
    decode = _decode_labels(args, precompute)
    names = _dataset_names(args)
    lengths = _int_list(args.sweep_lengths, "--sweep-lengths") if args.sweep else []
    command = command_line(args)
    out_dir = Path(args.out)
    if args.data:
        load_common_file(args.data)  # a malformed file fails before the model loads
    engine = Engine(engine_config(args))
    for spec in specs:
        spec.request_blend(engine)  # a spec that does not apply to the config's defaults
    progress = not args.no_progress

    summaries, plots = [], {}
    for name in names or ([None] if args.data else []):
        dataset = load_dataset(name, data_file=args.data, data_dir=args.data_dir,
                               passages=args.passages, passage_tokens=args.passage_tokens,
                               limit=args.limit, seed=args.seed, shuffle=args.shuffle,
                               tokenizer=engine.tokenizer, skip=args.skip)
        plan = EvalPlan.build(specs, dataset.kind, args.max_tokens, decode, progress)
        dataset_dir = out_dir / dataset.name
        summary = run_dataset(engine, dataset, plan, dataset_dir, seed=args.seed)
        summary["command"] = command
        (dataset_dir / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
        plots[dataset.name] = plot_dataset(summary, dataset_dir)
        write_report(dataset_dir, [summary], commands=[command], plots=plots)
        summaries.append(summary)

    sweep_path = out_dir / "ttft_sweep.json"
    sweep = None
    if args.sweep:
        sweep = _run_sweep(engine, args, lengths, precompute, progress, names)
        sweep["command"] = command
        out_dir.mkdir(parents=True, exist_ok=True)
        sweep_path.write_text(json.dumps(sweep, indent=2) + "\n")
    elif sweep_path.is_file():
        sweep = json.loads(sweep_path.read_text())  # an earlier sweep joins the report
    if sweep:
        plots["ttft_sweep"] = {"ttft_vs_length": plot_ttft_vs_length(
            sweep, out_dir / "ttft_vs_length.png")}

    this_run = list(summaries)
    summaries = _with_earlier_summaries(out_dir, summaries, plots)
    commands = list(dict.fromkeys([s["command"] for s in summaries]
                                  + ([sweep["command"]] if sweep else [])))
    report = write_report(out_dir, summaries, sweep, commands, plots)
    if args.report_dir:
        report = write_report(args.report_dir, summaries, sweep, commands, plots)

    if args.json:  # this run's results only; the report also covers earlier datasets
        if len(this_run) == 1:
            output = dict(this_run[0])
        else:
            output = {"datasets": {s["dataset"]: s for s in this_run}}
        if args.sweep:
            output["ttft_sweep"] = sweep
        output["report"] = str(report)
        print(json.dumps(output, indent=2))
        return 0
    for summary in summaries:
        print(f"\n## {summary['dataset']} ({summary['examples']} examples)\n")
        print(dataset_table(summary))
    if args.sweep:
        print("\n## TTFT against prompt length\n")
        print(sweep_table(sweep))
    print(f"\nreport: {report}")
    return 0


def _with_earlier_summaries(out_dir: Path, summaries: list[dict], plots: dict) -> list[dict]:
    """This run's summaries plus those of datasets evaluated earlier into ``out_dir`` (their
    ``summary.json``), in the datasets' order: the report covers every dataset there."""
    from cacheblend.eval.datasets import DATASETS
    from cacheblend.eval.plots import plot_dataset
    from cacheblend.eval.runner import SUMMARY_FILE

    by_name = {s["dataset"]: s for s in summaries}
    for path in sorted(out_dir.glob(f"*/{SUMMARY_FILE}")):
        try:
            summary = json.loads(path.read_text())
            name = summary["dataset"]
        except (OSError, ValueError, KeyError, TypeError):
            log.warning("%s: unreadable summary, left out of the report", path)
            continue
        if name not in by_name:
            by_name[name] = summary
            plots[name] = plot_dataset(summary, path.parent)
    order = {name: index for index, name in enumerate(DATASETS)}
    return sorted(by_name.values(), key=lambda s: (order.get(s["dataset"], len(order)),
                                                   s["dataset"]))


def _run_sweep(engine, args, lengths, precompute, progress, names) -> dict:
    from cacheblend.eval.datasets import load_dataset
    from cacheblend.eval.sweep import run_sweep

    text, source = None, "synthetic"
    if args.data or names:  # cut the sweep's chunks from the (first) dataset's passages
        dataset = load_dataset(names[0] if names else None, data_file=args.data,
                               data_dir=args.data_dir, passages=0, passage_tokens=0)
        text = "\n\n".join(d for e in dataset.examples for d in e.documents)
        source = f"{dataset.name} passage"
    return run_sweep(engine, lengths, args.sweep_methods, args.sweep_repeats, args.chunk_tokens,
                     source_text=text, source=source, precompute=precompute, progress=progress)

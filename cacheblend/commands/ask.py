"""`cacheblend ask --doc FILE ... --question TEXT`: answer one question over documents."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from cacheblend.commands.common import add_engine_args, add_method_args, make_engine
from cacheblend.errors import CacheBlendError


def add_parser(subparsers) -> None:
    parser = subparsers.add_parser("ask", help="answer a question over documents")
    parser.add_argument("--doc", action="append", default=[], metavar="FILE",
                        help="a document file (repeat for several)")
    parser.add_argument("--question", required=True)
    parser.add_argument("--max-tokens", type=int, default=64)
    parser.add_argument("--temperature", type=float, default=0.0)
    parser.add_argument("--seed", type=int)
    parser.add_argument("--json", action="store_true", help="print answer and stats as JSON")
    add_method_args(parser)
    add_engine_args(parser)
    parser.set_defaults(handler=run)


def read_documents(paths: list[str]) -> list[str]:
    documents = []
    for path in paths:
        try:
            documents.append(Path(path).read_text(encoding="utf-8"))
        except (OSError, UnicodeDecodeError) as exc:
            raise CacheBlendError(f"cannot read document {path}: {exc}") from exc
    return documents


def run(args: argparse.Namespace) -> int:
    from cacheblend.decode import SamplingParams
    from cacheblend.engine import GenerateRequest

    documents = read_documents(args.doc)
    sampling = SamplingParams(max_tokens=args.max_tokens, temperature=args.temperature,
                              seed=args.seed)
    engine = make_engine(args)
    request = GenerateRequest(question=args.question, documents=documents, method=args.method,
                              ratio=args.ratio, sampling=sampling)
    if args.json:
        result = engine.generate(request)
        print(json.dumps({"answer": result.text, "finish_reason": result.finish_reason,
                          "stats": result.stats.to_dict()}, indent=2))
        return 0
    final = None
    for delta, result in engine.generate_iter(request):
        print(delta, end="", flush=True)
        final = result or final
    print("\n" + summary(final.stats))
    return 0


def summary(stats) -> str:
    """The stats line: what ran and why, TTFT, and the prompt tokens as a sum that adds up
    (reused + recomputed + not cached = prompt; see docs/serving.md for each count)."""
    ran = stats.method + ("" if stats.ratio is None else f" ratio={stats.ratio:g}")
    if stats.requested_method and stats.requested_method != stats.method:
        ran += f" instead of {stats.requested_method}"
    reason = stats.controller if stats.controller and stats.controller != "requested" else ""
    head = f"[{ran}{': ' + reason if reason else ''}]"
    fresh = stats.prompt_tokens - stats.reused_tokens - stats.recomputed_tokens
    line = (f"{head} TTFT {stats.ttft_s:.2f}s; {stats.prompt_tokens} prompt tokens = "
            f"{stats.reused_tokens} reused + {stats.recomputed_tokens} recomputed + "
            f"{fresh} not cached")
    if stats.missed_tokens:
        when = ("stored after the answer" if stats.method == "full"
                else "computed and stored first, then used like hits")
        line += f"; {stats.missed_tokens} of them were not in the store ({when})"
    return line

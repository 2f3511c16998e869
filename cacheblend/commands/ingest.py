"""`cacheblend ingest FILE ...`: precompute and store documents' KV caches."""

from __future__ import annotations

import argparse
import json

from cacheblend.commands.ask import read_documents
from cacheblend.commands.common import add_engine_args, make_engine


def add_parser(subparsers) -> None:
    parser = subparsers.add_parser("ingest", help="precompute and store document KV caches")
    parser.add_argument("files", nargs="+", metavar="FILE")
    add_engine_args(parser)
    parser.set_defaults(handler=run)


def run(args: argparse.Namespace) -> int:
    documents = read_documents(args.files)
    engine = make_engine(args)
    results = engine.ingest(documents)
    for path, result in zip(args.files, results):
        print(json.dumps({"file": path, "key": result.key, "tokens": result.num_tokens,
                          "already_stored": result.cached}))
    return 0

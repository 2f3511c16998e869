"""`cacheblend ingest FILE ...`: precompute and store documents' KV caches.

A store that cannot be reached or written is an error (exit 2, one line), checked before any
work and again after: every tier must hold every document's entry."""

from __future__ import annotations

import argparse
import json

from cacheblend.commands.ask import read_documents
from cacheblend.commands.common import add_engine_args, engine_config, make_engine


def add_parser(subparsers) -> None:
    parser = subparsers.add_parser("ingest", help="precompute and store document KV caches")
    parser.add_argument("files", nargs="+", metavar="FILE")
    add_engine_args(parser)
    parser.set_defaults(handler=run)


def run(args: argparse.Namespace) -> int:
    from cacheblend.store.factory import open_store
    from cacheblend.store.ops import check_store, check_written

    documents = read_documents(args.files)
    store = open_store(engine_config(args).store)  # checked before the model loads
    try:
        check_store(store)
    finally:
        store.close()
    engine = make_engine(args)
    results = engine.ingest(documents)
    check_written(engine.store, [result.key for result in results])
    for path, result in zip(args.files, results):
        print(json.dumps({"file": path, "key": result.key, "tokens": result.num_tokens,
                          "already_stored": result.cached}))
    return 0

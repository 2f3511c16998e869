"""`cacheblend store stats|clear|verify --store URL`. A store that cannot be reached, or entries
that could not be deleted, are a one-line error and exit status 2, never zeros."""

from __future__ import annotations

import argparse
import json


def add_parser(subparsers) -> None:
    parser = subparsers.add_parser("store", help="inspect, verify or clear a KV store")
    parser.add_argument("action", choices=("stats", "clear", "verify"))
    parser.add_argument("--store", required=True,
                        help="memory | disk:/path | redis://host:port/db | tiers joined by ','")
    parser.set_defaults(handler=run)


def run(args: argparse.Namespace) -> int:
    from cacheblend.store.factory import open_store
    from cacheblend.store.ops import store_clear, store_stats, store_verify

    store = open_store(args.store)
    try:
        if args.action == "stats":
            result = store_stats(store)
        elif args.action == "clear":
            result = {"deleted": store_clear(store)}
        else:
            result = store_verify(store)
    finally:
        store.close()
    print(json.dumps(result, indent=2))
    return 0

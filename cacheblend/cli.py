"""Command line: ask | ingest | demo | bench | eval | serve | store.

Each subcommand's arguments and handler live next to the code it drives (``add_parser`` +
``run`` functions); this module only assembles them and turns user errors into one line.
"""

from __future__ import annotations

import argparse
import importlib
import logging
import sys

from cacheblend.errors import CacheBlendError

# subcommand -> module with add_parser(subparsers) registering it with handler=run
COMMANDS = {
    "ask": "cacheblend.commands.ask",
    "ingest": "cacheblend.commands.ingest",
    "demo": "cacheblend.commands.demo",
    "bench": "cacheblend.bench.cli",
    "eval": "cacheblend.eval.cli",
    "serve": "cacheblend.server.cli",
    "store": "cacheblend.store.cli",
}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="cacheblend", description=__doc__.splitlines()[0])
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    subparsers = parser.add_subparsers(dest="command", required=True)
    for name, module_name in COMMANDS.items():
        try:
            module = importlib.import_module(module_name)
        except ImportError as exc:  # an optional part that is not installed
            stub = subparsers.add_parser(name, help=f"(unavailable: {exc})")
            stub.set_defaults(handler=_unavailable(name, exc))
            continue
        module.add_parser(subparsers)
    return parser


def _unavailable(name: str, exc: Exception):
    def handler(_args) -> int:
        raise CacheBlendError(f"`cacheblend {name}` is not available: {exc}")

    return handler


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(
        level=logging.DEBUG if args.verbose else logging.WARNING,
        format="%(levelname)s %(name)s: %(message)s",
    )
    try:
        return int(args.handler(args) or 0)
    except CacheBlendError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except (OSError, ValueError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    except Exception as exc:  # a bug, or a failure no one foresaw: still one line (-v: trace)
        logging.getLogger(__name__).debug("unexpected error", exc_info=True)
        print(f"error: {type(exc).__name__}: {exc} (rerun with -v for the traceback)",
              file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())

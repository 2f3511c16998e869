"""`cacheblend bench prefill|ttft|store|serve`: print JSON (or a summary) of one benchmark."""

from __future__ import annotations

import argparse
import contextlib
import json
import tempfile
from dataclasses import replace

from cacheblend.commands.common import add_engine_args, engine_config
from cacheblend.config import LOADING_MODES
from cacheblend.errors import ConfigError

RANDOM_MODEL_HELP = ("benchmark a random-weight model of this shape (llama3-8b, qwen2.5-7b, "
                     "mistral-7b, smollm2-135m, tiny) with the bundled tokenizer: no model hub")


def add_parser(subparsers) -> None:
    parser = subparsers.add_parser("bench", help="benchmarks (results belong in docs/)")
    kinds = parser.add_subparsers(dest="bench", required=True)

    prefill = kinds.add_parser("prefill", help="runner prefill vs transformers' forward")
    prefill.add_argument("--lengths", default="512,1024,2048,3072,4096")
    prefill.add_argument("--repeats", type=int, default=3)
    prefill.add_argument("--json", action="store_true")
    prefill.add_argument("--random-model", metavar="SHAPE", help=RANDOM_MODEL_HELP)
    add_engine_args(prefill)
    prefill.set_defaults(handler=run_prefill)

    ttft = kinds.add_parser("ttft", help="TTFT of every method on one RAG prompt")
    ttft.add_argument("--chunks", type=int, default=6)
    ttft.add_argument("--chunk-tokens", type=int, default=512)
    ttft.add_argument("--ratio", type=float, default=0.15)
    ttft.add_argument("--repeats", type=int, default=3)
    ttft.add_argument("--loading", choices=LOADING_MODES, default=None,
                      help="how cached rows are loaded (default: config, bulk)")
    ttft.add_argument("--json", action="store_true")
    ttft.add_argument("--random-model", metavar="SHAPE", help=RANDOM_MODEL_HELP)
    add_engine_args(ttft)
    ttft.set_defaults(handler=run_ttft)

    store = kinds.add_parser("store", help="store load throughput and bytes per token")
    store.add_argument("--tokens", type=int, default=3072)
    store.add_argument("--redis-url", help="a running server (default: start a local one)")
    store.add_argument("--json", action="store_true")
    store.set_defaults(handler=run_store)

    serve = kinds.add_parser("serve", help="requests/s and TTFT under Poisson arrivals")
    serve.add_argument("--json", action="store_true")
    serve.add_argument("--rates", default=None, help="comma-separated request rates (req/s)")
    serve.add_argument("--duration", type=float, default=None, help="seconds per rate")
    serve.add_argument("--docs", type=int, default=6)
    serve.add_argument("--doc-tokens", type=int, default=512)
    serve.add_argument("--pool", type=int, default=None, help="document pool size")
    add_engine_args(serve)
    serve.set_defaults(handler=run_serve)

    stall = kinds.add_parser("stall", help="running streams' inter-token latency while a long "
                             "prompt prefills, with and without chunked prefill")
    stall.add_argument("--json", action="store_true")
    stall.add_argument("--streams", type=int, default=3)
    stall.add_argument("--prompt-tokens", type=int, default=4096)
    stall.add_argument("--window", type=float, default=5.0, help="seconds measured alone")
    add_engine_args(stall)
    stall.set_defaults(handler=run_stall)

    upload = kinds.add_parser("upload", help="queue wait of a chat sent during a bulk upload")
    upload.add_argument("--json", action="store_true")
    upload.add_argument("--docs", type=int, default=16)
    upload.add_argument("--doc-tokens", type=int, default=512)
    add_engine_args(upload)
    upload.set_defaults(handler=run_upload)


def _print(result: dict, as_json: bool) -> None:
    print(json.dumps(result, indent=None if as_json else 2))


def _load(args: argparse.Namespace, config):
    """The benchmarked model: ``--random-model SHAPE`` or ``--model`` / the bundled one, on the
    config's device in its dtype (transformers' forward, the peer, runs in the same)."""
    from cacheblend.model.loader import load_model
    from cacheblend.model.random import build_random_model

    if config.threads:
        import torch

        torch.set_num_threads(config.threads)
    if args.random_model:
        if config.model:
            raise ConfigError("give --model or --random-model, not both")
        return build_random_model(args.random_model, config.device, config.dtype)
    return load_model(config.model, config.device, dtype=config.dtype)


def run_prefill(args: argparse.Namespace) -> int:
    from cacheblend.bench.prefill import bench_prefill

    config = engine_config(args)
    loaded = _load(args, config)
    lengths = [int(x) for x in args.lengths.split(",")]
    _print(bench_prefill(loaded, lengths, repeats=args.repeats), args.json)
    return 0


@contextlib.contextmanager
def _store_url(name: str | None):
    """`memory`, `disk` (a temp dir), `redis` (a local server started here), or a full URL."""
    if name in (None, "memory"):
        yield "memory"
    elif name == "disk":
        with tempfile.TemporaryDirectory(prefix="cacheblend-bench-") as path:
            yield f"disk:{path}"
    elif name == "redis":
        from cacheblend.store.valkey_server import ValkeyServer

        with ValkeyServer() as server:
            yield server.url
    else:
        yield name


def run_ttft(args: argparse.Namespace) -> int:
    from cacheblend.bench.ttft import bench_ttft
    from cacheblend.engine import Engine

    with _store_url(args.store) as url:
        args.store = url
        config = engine_config(args)
        if args.loading:
            config = replace(config, loading=args.loading)
        engine = Engine(config, loaded=_load(args, config) if args.random_model else None)
        result = bench_ttft(engine, args.chunks, args.chunk_tokens, args.ratio, args.repeats)
        result["store"] = url.split(":")[0]
        result["loading"] = engine.config.loading
        engine.store.close()
    _print(result, args.json)
    return 0


def run_store(args: argparse.Namespace) -> int:
    from cacheblend.store.bench import bench_store

    _print(bench_store(tokens=args.tokens, redis_url=args.redis_url), args.json)
    return 0


def run_serve(args: argparse.Namespace) -> int:
    from cacheblend.bench.serve import bench_serve

    options = {"docs": args.docs, "doc_tokens": args.doc_tokens}
    if args.rates:
        options["rates"] = [float(x) for x in args.rates.split(",")]
    if args.duration:
        options["duration"] = args.duration
    if args.pool:
        options["pool"] = args.pool
    _print(bench_serve(engine_config(args), **options), args.json)
    return 0


def run_stall(args: argparse.Namespace) -> int:
    from cacheblend.bench.interference import bench_stall

    result = bench_stall(engine_config(args), streams=args.streams,
                         prompt_tokens=args.prompt_tokens, window=args.window)
    _print(result, args.json)
    return 0


def run_upload(args: argparse.Namespace) -> int:
    from cacheblend.bench.interference import bench_upload

    _print(bench_upload(engine_config(args), docs=args.docs, doc_tokens=args.doc_tokens),
           args.json)
    return 0

"""``cacheblend serve``: the OpenAI-compatible HTTP server (FastAPI + uvicorn, imported lazily)."""

from __future__ import annotations

import argparse
import logging
import socket
import sys

from cacheblend import env
from cacheblend.commands.common import add_engine_args, make_engine
from cacheblend.config import METHODS
from cacheblend.errors import CacheBlendError
from cacheblend.server.settings import ServerSettings
from cacheblend.store.ops import redact

log = logging.getLogger(__name__)


def add_parser(subparsers) -> None:
    parser = subparsers.add_parser(
        "serve",
        help="OpenAI-compatible HTTP server with CacheBlend KV reuse",
        description="Serve /v1/chat/completions, /v1/completions, /v1/models, /v1/documents, "
        "/health and /metrics. Binds 127.0.0.1 unless --host says otherwise.",
    )
    add_engine_args(parser)
    defaults = ServerSettings()
    parser.add_argument("--host", default=defaults.host, help="bind address (default 127.0.0.1)")
    parser.add_argument("--port", type=int, default=defaults.port, help="default 8000")
    parser.add_argument(
        "--api-key",
        help="require 'Authorization: Bearer KEY' on every endpoint "
        "but /health (default: $CACHEBLEND_API_KEY)",
    )
    parser.add_argument(
        "--max-body-bytes",
        type=int,
        default=defaults.max_body_bytes,
        help=f"largest request body (default {defaults.max_body_bytes})",
    )
    parser.add_argument(
        "--max-document-chars",
        type=int,
        default=defaults.max_document_chars,
        help=f"largest document (default {defaults.max_document_chars})",
    )
    parser.add_argument(
        "--separator",
        help="LMCache-compatible mode: this string in a prompt "
        "splits it into segments, each tokenized alone (e.g. ' # # ')",
    )
    parser.add_argument(
        "--default-method",
        choices=METHODS,
        help="method for requests that name none (default: the config's)",
    )
    parser.add_argument(
        "--default-ratio",
        type=float,
        help="blend ratio for requests that give none (default: the config's)",
    )
    parser.add_argument(
        "--max-batch-size",
        type=int,
        default=defaults.max_batch_size,
        help="requests decoded together per step; 1 = one at a time "
        f"(default {defaults.max_batch_size})",
    )
    parser.add_argument(
        "--max-queue",
        type=int,
        default=defaults.max_queue,
        help=f"waiting requests beyond this get 429 (default {defaults.max_queue})",
    )
    parser.add_argument(
        "--max-tokens-limit",
        type=int,
        default=defaults.max_tokens_limit,
        help=f"largest max_tokens a request may ask (default {defaults.max_tokens_limit})",
    )
    parser.add_argument(
        "--drain-timeout",
        type=float,
        default=defaults.drain_timeout_s,
        help="on SIGTERM/SIGINT, seconds in-flight requests get to finish before they are "
        f"cancelled (default {defaults.drain_timeout_s:g})",
    )
    parser.add_argument(
        "--served-model-name",
        action="append",
        default=[],
        metavar="NAME",
        help="an id clients may pass as model; repeat for aliases, the first is the one "
        "responses carry (default: the model's name; the model's own name is always accepted)",
    )
    parser.add_argument(
        "--disable-log-requests",
        action="store_true",
        help="no log line per request (default: one INFO line each)",
    )
    parser.set_defaults(handler=run)


def settings_from_args(args: argparse.Namespace) -> ServerSettings:
    return ServerSettings(
        host=args.host,
        port=args.port,
        api_key=args.api_key or env.api_key(),
        served_model_names=tuple(args.served_model_name),
        max_body_bytes=args.max_body_bytes,
        max_document_chars=args.max_document_chars,
        separator=args.separator,
        default_method=args.default_method,
        default_ratio=args.default_ratio,
        max_batch_size=args.max_batch_size,
        max_queue=args.max_queue,
        max_tokens_limit=args.max_tokens_limit,
        drain_timeout_s=args.drain_timeout,
        log_requests=not args.disable_log_requests,
    )


def bind(host: str, port: int) -> socket.socket:
    """The listening socket, bound before the model loads: a port in use is a one-line error
    at once, not after the load."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind((host, port))
    except OSError as exc:
        sock.close()
        raise CacheBlendError(
            f"cannot listen on {host}:{port}: {exc.strerror or exc}; "
            "choose another --port or stop what is using it"
        ) from exc
    sock.listen(2048)
    return sock


def run(args: argparse.Namespace) -> int:
    import uvicorn  # the server extra: only needed here

    from cacheblend.server.app import create_app
    from cacheblend.server.drain import DrainingServer

    settings = settings_from_args(args)  # validate flags before loading the model
    sock = bind(settings.host, settings.port)
    if settings.log_requests:
        logging.getLogger("cacheblend.server.requests").setLevel(logging.INFO)
    engine = make_engine(args)
    app = create_app(engine, settings)
    if not settings.is_loopback and settings.api_key is None:
        log.warning(
            "serving on %s without an API key: anyone who can reach it can use it", settings.host
        )
    name = settings.served_model_name or engine.loaded.name
    print(
        f"cacheblend: serving {name} on http://{settings.host}:{sock.getsockname()[1]} "
        f"(store {redact(engine.config.store)}, key {'on' if settings.api_key else 'off'})",
        file=sys.stderr,
        flush=True,
    )
    config = uvicorn.Config(app, log_level="warning", timeout_graceful_shutdown=5)
    DrainingServer(config, app.state.scheduler, settings.drain_timeout_s).run(sockets=[sock])
    print("cacheblend: stopped", file=sys.stderr, flush=True)
    return 0

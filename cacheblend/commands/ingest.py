"""`cacheblend ingest FILE ...`: precompute and store documents' KV caches, here or through a
running server (``--server URL``: uploaded to ``POST /v1/documents``, whose precompute runs in
the server's background lane, between live requests).

Here, a store that cannot be reached or written is an error (exit 2, one line), checked before
any work and again after: every tier must hold every document's entry."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from tqdm import tqdm

from cacheblend import env
from cacheblend.commands.ask import read_documents
from cacheblend.commands.common import add_engine_args, engine_config, make_engine
from cacheblend.errors import CacheBlendError

UPLOAD_BATCH = 8  # documents per POST: progress shows, a failure loses little


def add_parser(subparsers) -> None:
    parser = subparsers.add_parser("ingest", help="precompute and store document KV caches")
    parser.add_argument("files", nargs="+", metavar="FILE")
    parser.add_argument("--server", metavar="URL",
                        help="upload to a running `cacheblend serve` (e.g. http://127.0.0.1:8000)"
                        " instead of loading the model here")
    parser.add_argument("--api-key", help="the server's API key (default: $CACHEBLEND_API_KEY)")
    add_engine_args(parser)
    parser.set_defaults(handler=run)


def run(args: argparse.Namespace) -> int:
    from cacheblend.store.factory import open_store
    from cacheblend.store.ops import check_store, check_written

    documents = read_documents(args.files)
    if args.server:
        return _upload(args, documents)
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


def _upload(args: argparse.Namespace, documents: list[str]) -> int:
    import httpx

    key = args.api_key or env.api_key()
    headers = {"Authorization": f"Bearer {key}"} if key else {}
    url = args.server.rstrip("/") + "/v1/documents"
    pairs = list(zip(args.files, documents))
    with httpx.Client(headers=headers, timeout=None) as client, \
            tqdm(total=len(pairs), desc="upload", unit="doc") as bar:
        for start in range(0, len(pairs), UPLOAD_BATCH):
            batch = pairs[start : start + UPLOAD_BATCH]
            try:
                response = client.post(url, json={"documents": [
                    {"id": _doc_id(path), "text": text} for path, text in batch]})
            except httpx.HTTPError as exc:
                raise CacheBlendError(f"cannot reach {args.server}: {exc}") from exc
            if response.status_code != 200:
                raise CacheBlendError(f"{url} answered {response.status_code}: "
                                      f"{_message(response)}")
            for (path, _), item in zip(batch, response.json()["data"]):
                bar.write(json.dumps({"file": path, "id": item["id"],
                                      "tokens": item["num_tokens"],
                                      "already_stored": item["cached"]}))
            bar.update(len(batch))
    return 0


def _doc_id(path: str) -> str:
    """A document id from its file name (the server's id pattern: letters, digits, ._-)."""
    stem = "".join(c if c.isalnum() or c in "._-" else "-" for c in Path(path).name)
    return stem.lstrip("-._")[:128] or "document"


def _message(response) -> str:
    try:
        return response.json()["error"]["message"]
    except (ValueError, KeyError, TypeError):
        return response.text[:200]

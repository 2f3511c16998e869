"""`cacheblend bench serve`: the HTTP server under load, over real HTTP on loopback.

``bench_serve``: RAG chat requests (``docs`` documents of ``doc_tokens`` tokens each, drawn
from a pool so that documents recur) arrive as a Poisson process at each rate, for ``full`` and
``blend``; reported per method and rate: requests/s completed, TTFT p50/p99 (client side: the
first streamed token), inter-token latency p50/p99, end-to-end latency, errors. The pool is uploaded first
(``POST /v1/documents``), as a RAG deployment precomputes its corpus.

``bench_batching``: closed-loop clients decoding long answers with ``max_batch_size`` 1 (one
request at a time) and larger; tokens/s and requests/s, in interleaved rounds.
"""

from __future__ import annotations

import asyncio
import itertools
import json
import random
import statistics
import time

import httpx

from cacheblend.commands.demo_corpus import DOCUMENTS, QUESTIONS
from cacheblend.config import EngineConfig
from cacheblend.engine import Engine
from cacheblend.server.app import create_app
from cacheblend.server.background import BackgroundServer
from cacheblend.server.settings import ServerSettings


def _engine(config: EngineConfig | Engine | None, loaded=None) -> Engine:
    if isinstance(config, Engine):
        return config
    return Engine(config or EngineConfig(), loaded=loaded)


def make_documents(engine: Engine, count: int, tokens: int) -> list[str]:
    """``count`` distinct documents of about ``tokens`` tokens: windows of the demo corpus."""
    ids = list(engine.prompts.user_ids(" ".join(DOCUMENTS.values())))
    while len(ids) < tokens + 37 * count:
        ids = ids + ids
    return [engine.tokenizer.decode(ids[37 * i : 37 * i + tokens]).strip() for i in range(count)]


def percentile(values: list[float], q: float) -> float | None:
    if not values:
        return None
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(q / 100 * (len(ordered) - 1)))]


async def _chat(client: httpx.AsyncClient, body: dict) -> dict:
    """One streamed chat request: TTFT and latency seen by the client, tokens, stats."""
    start = time.perf_counter()
    ttft, stats, tokens, arrivals = None, {}, 0, []
    async with client.stream("POST", "/v1/chat/completions", json={**body, "stream": True}) as r:
        if r.status_code != 200:
            await r.aread()
            return {"error": f"{r.status_code}: {r.text[:200]}"}
        async for line in r.aiter_lines():
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            chunk = json.loads(line[6:])
            if "error" in chunk:
                return {"error": chunk["error"]["message"]}
            if chunk["choices"] and chunk["choices"][0]["delta"].get("content"):
                tokens += 1
                arrivals.append(time.perf_counter())
                if ttft is None:
                    ttft = arrivals[-1] - start
            stats = chunk.get("cacheblend", stats)
    latency = time.perf_counter() - start
    return {
        "ttft": ttft if ttft is not None else latency,
        "latency": latency,
        "completion_tokens": stats.get("completion_tokens", tokens),
        "stats": stats,
        "arrivals": arrivals,  # when each streamed chunk came (perf_counter)
        "itl": [b - a for a, b in itertools.pairwise(arrivals)],  # inter-token latencies
    }


def _summary(results: list[dict], elapsed: float) -> dict:
    done = [r for r in results if "error" not in r]
    ttfts = [r["ttft"] for r in done]
    latencies = [r["latency"] for r in done]
    itls = [gap for r in done for gap in r["itl"]]
    return {
        "requests": len(results),
        "completed": len(done),
        "errors": len(results) - len(done),
        "elapsed_s": round(elapsed, 3),
        "requests_per_s": round(len(done) / elapsed, 4) if elapsed > 0 else None,
        "tokens_per_s": round(sum(r["completion_tokens"] for r in done) / elapsed, 3)
        if elapsed > 0
        else None,
        "ttft_p50_s": percentile(ttfts, 50),
        "ttft_p99_s": percentile(ttfts, 99),
        "itl_p50_s": percentile(itls, 50),
        "itl_p99_s": percentile(itls, 99),
        "latency_p50_s": percentile(latencies, 50),
        "latency_p99_s": percentile(latencies, 99),
        "missed_tokens": sum(r["stats"].get("missed_tokens", 0) for r in done),
        "first_error": next((r["error"] for r in results if "error" in r), None),
    }


def poisson_requests(
    rate: float, duration: float, ids: list[str], docs: int, seed: str
) -> list[tuple[float, list[str], str]]:
    """(arrival time, document ids, question) of each request: a Poisson process at ``rate``
    over ``duration`` seconds. The same seed gives the same requests to every method."""
    rng = random.Random(seed)
    requests, at = [], rng.expovariate(rate)
    while at < duration:
        requests.append((at, rng.sample(ids, docs), rng.choice(QUESTIONS)[0]))
        at += rng.expovariate(rate)
    return requests


async def _run_arrivals(
    url: str,
    model: str,
    method: str,
    requests: list[tuple[float, list[str], str]],
    max_tokens: int,
    drain: float,
) -> dict:
    """Send each request at its arrival time; wait for all (up to ``drain`` s after the last)."""
    limits = httpx.Limits(max_connections=1000, max_keepalive_connections=100)
    last = requests[-1][0] if requests else 0.0
    async with httpx.AsyncClient(base_url=url, timeout=drain + last, limits=limits) as client:
        tasks, start = [], time.perf_counter()
        for at, doc_ids, question in requests:
            await asyncio.sleep(max(0.0, start + at - time.perf_counter()))
            body = {
                "model": model,
                "max_tokens": max_tokens,
                "messages": [{"role": "user", "content": question}],
                "documents": [{"id": i} for i in doc_ids],
                "cacheblend": {"method": method},
            }
            tasks.append(asyncio.ensure_future(_chat(client, body)))
        if not tasks:
            return _summary([], last)
        done, pending = await asyncio.wait(tasks, timeout=drain)
        for task in pending:
            task.cancel()
        results = [
            t.result()
            if t in done and not t.exception()
            else {"error": "timeout" if t in pending else repr(t.exception())}
            for t in tasks
        ]
        return _summary(results, time.perf_counter() - start)


def bench_serve(
    config: EngineConfig | Engine | None = None,
    *,
    docs: int = 6,
    doc_tokens: int = 512,
    pool: int | None = None,
    rates: list[float] | tuple[float, ...] = (0.05, 0.1, 0.2),
    duration: float = 120.0,
    methods: tuple[str, ...] = ("full", "blend"),
    max_tokens: int = 8,
    max_batch_size: int | None = None,
    drain: float = 300.0,
    seed: int = 0,
    loaded=None,
) -> dict:
    """Requests/s, TTFT and inter-token latency p50/p99 under Poisson arrivals, per method and rate (see module)."""
    engine = _engine(config, loaded)
    pool = pool or 4 * docs
    if pool < docs:
        raise ValueError(f"pool ({pool}) must hold at least docs ({docs}) documents")
    settings = ServerSettings(
        max_batch_size=max_batch_size or ServerSettings.max_batch_size,
        max_tokens_limit=max(max_tokens, 1),
    )
    texts = make_documents(engine, pool, doc_tokens)
    out: dict = {
        "docs": docs,
        "doc_tokens": doc_tokens,
        "pool": pool,
        "duration_s": duration,
        "max_tokens": max_tokens,
        "max_batch_size": settings.max_batch_size,
        "store": engine.config.store.split(":")[0],
        "results": {},
    }
    with BackgroundServer(create_app(engine, settings)) as server:
        model = settings.served_model_name or engine.loaded.name
        with httpx.Client(base_url=server.url, timeout=drain) as client:
            upload = client.post("/v1/documents", json={"documents": texts})
            upload.raise_for_status()
            ids = [d["id"] for d in upload.json()["data"]]
            out["doc_tokens_actual"] = statistics.mean(
                d["num_tokens"] for d in upload.json()["data"]
            )
        for method in methods:  # one request per method first, not timed
            warm = [(0.0, ids[:docs], QUESTIONS[0][0])]
            asyncio.run(_run_arrivals(server.url, model, method, warm, 1, drain))
        for method in methods:
            out["results"][method] = {}
            for rate in rates:
                requests = poisson_requests(rate, duration, ids, docs, f"{seed}-{rate}")
                summary = asyncio.run(
                    _run_arrivals(server.url, model, method, requests, max_tokens, drain)
                )
                out["results"][method][str(rate)] = summary
    return out


async def _closed_loop(
    url: str, model: str, clients: int, requests_each: int, max_tokens: int
) -> dict:
    async with httpx.AsyncClient(base_url=url, timeout=600) as client:

        async def one_client(index: int) -> list[dict]:
            results = []
            for turn in range(requests_each):
                body = {
                    "model": model,
                    "max_tokens": max_tokens,
                    "messages": [
                        {
                            "role": "user",
                            "content": f"Write a long story about dragon number {index}-{turn}.",
                        }
                    ],
                }
                results.append(await _chat(client, body))
            return results

        start = time.perf_counter()
        per_client = await asyncio.gather(*(one_client(i) for i in range(clients)))
        return _summary([r for rs in per_client for r in rs], time.perf_counter() - start)


def bench_batching(
    config: EngineConfig | Engine | None = None,
    *,
    clients: int = 8,
    requests_each: int = 2,
    max_tokens: int = 32,
    batch_sizes: tuple[int, ...] = (1, 8),
    rounds: int = 2,
    loaded=None,
) -> dict:
    """Does batching decode steps across requests raise throughput? Closed-loop ``clients``
    run against servers with each ``max_batch_size``, in interleaved rounds; medians."""
    engine = _engine(config, loaded)
    runs: dict[int, list[dict]] = {size: [] for size in batch_sizes}
    servers = {
        size: BackgroundServer(
            create_app(engine, ServerSettings(max_batch_size=size, max_tokens_limit=max_tokens))
        ).start()
        for size in batch_sizes
    }
    model = engine.loaded.name
    try:
        for size, server in servers.items():  # warm-up
            asyncio.run(_closed_loop(server.url, model, 1, 1, 2))
        for _ in range(rounds):
            for size, server in servers.items():
                runs[size].append(
                    asyncio.run(_closed_loop(server.url, model, clients, requests_each, max_tokens))
                )
    finally:
        for server in servers.values():
            server.stop()
    out: dict = {
        "clients": clients,
        "requests_each": requests_each,
        "max_tokens": max_tokens,
        "rounds": rounds,
        "results": {},
    }
    for size, summaries in runs.items():
        out["results"][str(size)] = {
            "tokens_per_s": statistics.median(s["tokens_per_s"] for s in summaries),
            "requests_per_s": statistics.median(s["requests_per_s"] for s in summaries),
            "latency_p50_s": statistics.median(s["latency_p50_s"] for s in summaries),
            "errors": sum(s["errors"] for s in summaries),
        }
    return out


def main(argv: list[str] | None = None) -> int:
    """``python -m cacheblend.bench.serve batching|serve [...]``: print JSON."""
    import argparse

    parser = argparse.ArgumentParser(prog="python -m cacheblend.bench.serve")
    parser.add_argument("kind", choices=["batching", "serve"])
    parser.add_argument("--threads", type=int, help="torch threads (default: torch's)")
    parser.add_argument("--store", default="memory", help="store URL (default memory)")
    parser.add_argument("--clients", type=int, default=8)
    parser.add_argument("--requests-each", type=int, default=2)
    parser.add_argument("--max-tokens", type=int, help="default: 32 (batching), 8 (serve)")
    parser.add_argument("--batch-sizes", default="1,4,8")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--docs", type=int, default=6)
    parser.add_argument("--doc-tokens", type=int, default=512)
    parser.add_argument("--pool", type=int)
    parser.add_argument("--rates", default="0.05,0.1,0.2")
    parser.add_argument("--duration", type=float, default=120.0)
    args = parser.parse_args(argv)
    config = EngineConfig(threads=args.threads, store=args.store)
    if args.kind == "batching":
        result = bench_batching(
            config,
            clients=args.clients,
            requests_each=args.requests_each,
            max_tokens=args.max_tokens or 32,
            rounds=args.rounds,
            batch_sizes=tuple(int(x) for x in args.batch_sizes.split(",")),
        )
    else:
        result = bench_serve(
            config,
            docs=args.docs,
            doc_tokens=args.doc_tokens,
            pool=args.pool,
            rates=[float(x) for x in args.rates.split(",")],
            duration=args.duration,
            max_tokens=args.max_tokens or 8,
        )
    result["threads"] = args.threads
    print(json.dumps(result, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

"""`cacheblend bench stall` and `bench upload`: what live requests feel from other work.

``bench_stall``: ``streams`` chats decode long answers; their inter-token latency (ITL) is
measured alone for ``window`` seconds, then while a ``prompt_tokens``-token prompt prefills
(from its send to its first token). Run twice in one process on the same model: with chunked
prefill (``prefill_step_tokens`` / ``prefill_step_s`` from the config) and with it off (one
unbounded step), so the
ratio of p99s says what chunking buys.

``bench_upload``: ``docs`` documents are uploaded in one ``POST /v1/documents``; shortly after,
a one-word chat arrives. Reported: how long the chat waited in the queue (the server's
``queue_s``) and its TTFT, against how long the upload took.
"""

from __future__ import annotations

import asyncio
import itertools
import time
from dataclasses import replace

import httpx

from cacheblend.bench.serve import _chat, make_documents, percentile
from cacheblend.config import EngineConfig
from cacheblend.engine import Engine
from cacheblend.model.loader import load_model
from cacheblend.server.app import create_app
from cacheblend.server.background import BackgroundServer
from cacheblend.server.settings import ServerSettings

UNBOUNDED = 1 << 30  # prefill_step_tokens that never splits a prefill


def _gaps(results: list[dict], start: float, end: float, overlapping: bool) -> list[float]:
    """ITL gaps of the streams inside [start, end], or with ``overlapping`` every gap that
    overlaps it (a gap stalled by a prefill ends after the prefill's own first token: it
    counts)."""
    gaps = []
    for result in results:
        for a, b in itertools.pairwise(result.get("arrivals", [])):
            if (b >= start and a <= end) if overlapping else (a >= start and b <= end):
                gaps.append(b - a)
    return gaps


def _summary(values: list[float]) -> dict:
    return {"n": len(values), "p50_s": percentile(values, 50), "p99_s": percentile(values, 99)}


def bench_stall(config: EngineConfig | None = None, *, streams: int = 3,
                prompt_tokens: int = 4096, window: float = 5.0, loaded=None) -> dict:
    config = config or EngineConfig()
    loaded = loaded or load_model(config.model, config.device)
    out = {"streams": streams, "prompt_tokens": prompt_tokens, "window_s": window,
           "prefill_step_tokens": config.prefill_step_tokens,
           "prefill_step_s": config.prefill_step_s, "results": {}}
    unchunked = replace(config, prefill_step_tokens=UNBOUNDED, prefill_step_s=float("inf"))
    for name, engine_config in (("chunked", config), ("unchunked", unchunked)):
        engine = Engine(engine_config, loaded=loaded)
        long_text = make_documents(engine, 1, prompt_tokens)[0]
        settings = ServerSettings(max_tokens_limit=4096)
        with BackgroundServer(create_app(engine, settings)) as server:
            model = engine.loaded.name
            arrivals: list[list[float]] = []
            round_out = asyncio.run(_recording_round(server.url, model, streams, long_text,
                                                     window, arrivals))
        results = [{"arrivals": a} for a in arrivals]
        alone = _gaps(results, round_out["alone_start"], round_out["sent"], overlapping=False)
        during = _gaps(results, round_out["sent"], round_out["first_token"], overlapping=True)
        out["results"][name] = {
            "itl_alone": _summary(alone),
            "itl_during_prefill": _summary(during),
            "p99_ratio": (percentile(during, 99) / percentile(alone, 99)
                          if alone and during else None),
            "long_prompt_tokens": round_out["long"]["stats"].get("prompt_tokens"),
            "long_ttft_s": round_out["long"]["ttft"],
            "long_prefill_slices": round_out["long"]["stats"].get("prefill_slices"),
        }
    return out


async def _recording_round(url: str, model: str, streams: int, long_text: str, window: float,
                           arrivals: list[list[float]]) -> dict:
    """Streams decode; after ``window`` s alone, the long prompt is sent. Each stream's chunk
    arrival times are recorded in ``arrivals`` as they come (the streams are cancelled, not
    finished, once the long prompt's first token is out)."""
    async with httpx.AsyncClient(base_url=url, timeout=600) as client:
        async def stream(index: int) -> None:
            times: list[float] = []
            arrivals.append(times)
            body = {"model": model, "max_tokens": 2000, "min_tokens": 2000, "stream": True,
                    "messages": [{"role": "user", "content": f"Count upwards from {index}."}]}
            async with client.stream("POST", "/v1/chat/completions", json=body) as response:
                async for line in response.aiter_lines():
                    if line.startswith("data: {") and '"content"' in line:
                        times.append(time.perf_counter())

        tasks = [asyncio.ensure_future(stream(i)) for i in range(streams)]
        await asyncio.sleep(1.0)  # every stream is decoding
        alone_start = time.perf_counter()
        await asyncio.sleep(window)
        sent = time.perf_counter()
        long = await _chat(client, {"model": model, "max_tokens": 1,
                                    "messages": [{"role": "user", "content": long_text}],
                                    "cacheblend": {"method": "full"}})
        await asyncio.sleep(1.0)  # the streams record the tokens that follow the prefill
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
    return {"sent": sent, "first_token": sent + long["ttft"], "alone_start": alone_start,
            "long": long}


def bench_upload(config: EngineConfig | None = None, *, docs: int = 16, doc_tokens: int = 512,
                 delay: float = 0.5, loaded=None) -> dict:
    config = config or EngineConfig()
    engine = Engine(config, loaded=loaded)
    texts = make_documents(engine, docs, doc_tokens)
    settings = ServerSettings(max_documents_per_request=max(docs, 1))
    with BackgroundServer(create_app(engine, settings)) as server:
        model = engine.loaded.name
        out = asyncio.run(_upload_round(server.url, model, texts, delay))
    return {"docs": docs, "doc_tokens": doc_tokens, "delay_s": delay, **out}


async def _upload_round(url: str, model: str, texts: list[str], delay: float) -> dict:
    async with httpx.AsyncClient(base_url=url, timeout=600) as client:
        await client.post("/v1/chat/completions", json={  # warm-up, not timed
            "model": model, "max_tokens": 1, "messages": [{"role": "user", "content": "Hi"}]})
        start = time.perf_counter()
        upload = asyncio.ensure_future(client.post("/v1/documents", json={"documents": texts}))
        await asyncio.sleep(delay)
        chat = await _chat(client, {"model": model, "max_tokens": 1,
                                    "messages": [{"role": "user", "content": "Hi"}]})
        chat_done = time.perf_counter()
        response = await upload
        upload_s = time.perf_counter() - start
    response.raise_for_status()
    return {
        "chat_queue_s": chat["stats"].get("queue_s"),
        "chat_ttft_s": chat["ttft"],
        "chat_done_before_upload": chat_done < start + upload_s,
        "upload_s": upload_s,
    }

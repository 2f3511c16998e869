"""`cacheblend bench ttft`: time to first token of every method on one RAG-shaped prompt.

The chunks are windows of the demo corpus's real text, cut to exactly ``chunk_tokens`` ids.
Every method sees the same prompt. Chunks are ingested first (so blend/reuse/epic hit), and the
prefix method has the system prefix cached but not the chunks, as in RAG traffic where
documents recur in new orders. ``hf_full`` is transformers' own forward on the same ids, same
device, same dtype, SDPA attention.
"""

from __future__ import annotations

import torch

from cacheblend.bench.prefill import _device_label, _transformers_version
from cacheblend.bench.timing import interleaved_medians
from cacheblend.commands.demo_corpus import DOCUMENTS
from cacheblend.decode import SamplingParams
from cacheblend.device import dtype_name
from cacheblend.engine import Engine, GenerateRequest
from cacheblend.prompt import Segments

METHODS = ("full", "prefix", "reuse", "blend", "epic")


def rag_segments(engine: Engine, chunks: int, chunk_tokens: int, question: str) -> Segments:
    corpus = " ".join(DOCUMENTS.values())
    ids = list(engine.prompts.user_ids(corpus))
    while len(ids) < chunks * chunk_tokens + chunk_tokens:
        ids = ids + ids
    windows = tuple(tuple(ids[i * chunk_tokens + 7 * i : (i + 1) * chunk_tokens + 7 * i])
                    for i in range(chunks))
    base = engine.segments_for(GenerateRequest(question=question, documents=[]))
    return Segments(prefix=base.prefix, chunks=windows, suffix=base.suffix)


def bench_ttft(engine: Engine, chunks: int = 6, chunk_tokens: int = 512, ratio: float = 0.15,
               repeats: int = 3, question: str = "Who designed the lighthouse?") -> dict:
    segments = rag_segments(engine, chunks, chunk_tokens, question)
    one_token = SamplingParams(max_tokens=1)

    def request(method: str, seg: Segments = segments) -> GenerateRequest:
        return GenerateRequest(segments=seg, method=method, sampling=one_token,
                               ratio=ratio if method == "blend" else None)

    # Warm the store: chunk entries for reuse/blend/epic (and the system prefix).
    engine.generate(request("blend"))
    ids = torch.tensor([segments.ids], device=engine.runner.device)

    def prefix_run(counter=[0]):  # noqa: B006  (a counter kept across calls)
        # The prefix method stores what it computes, so the identical prompt would hit in
        # full next time. RAG traffic brings the same documents in new orders: each run gets
        # another rotation of the chunks (the same tokens), so only the system prefix hits.
        counter[0] += 1
        shift = counter[0] % len(segments.chunks) if segments.chunks else 0
        rotated = segments.chunks[shift:] + segments.chunks[:shift]
        return engine.generate(request("prefix", Segments(segments.prefix, rotated,
                                                          segments.suffix)))

    runs = {method: (lambda m=method: engine.generate(request(m))) for method in METHODS}
    runs["prefix"] = prefix_run

    def hf_first_token():
        with torch.inference_mode():
            logits = engine.loaded.model(ids, logits_to_keep=1).logits
        return int(logits[0, -1].argmax())

    runs["hf_full"] = hf_first_token
    medians = interleaved_medians(runs, repeats=repeats)
    stats = {m: engine.generate(request(m)).stats for m in METHODS if m != "prefix"}
    stats["prefix"] = prefix_run().stats
    model = engine.loaded.model
    out = {
        "model": engine.loaded.name,
        "device": _device_label(engine.runner.device),
        "dtype": dtype_name(engine.runner.dtype),
        "hf_peer": f"transformers {_transformers_version()} forward, "
                   f"attn={model.config._attn_implementation}",
        "tokens": segments.num_tokens,
        "chunks": chunks,
        "chunk_tokens": chunk_tokens,
        "ratio": ratio,
        "store": engine.config.store,
        "methods": {
            m: {"ttft_s": round(medians[m], 4), "reused_tokens": stats[m].reused_tokens,
                "computed_tokens": stats[m].computed_tokens,
                "missed_tokens": stats[m].missed_tokens,
                "store_load_s": round(stats[m].load_s, 4)}
            for m in METHODS
        },
        "hf_full": {"ttft_s": round(medians["hf_full"], 4)},
    }
    blend = medians["blend"]
    out["speedup_blend_vs_full"] = round(medians["full"] / blend, 2)
    out["speedup_blend_vs_hf_full"] = round(medians["hf_full"] / blend, 2)
    return out

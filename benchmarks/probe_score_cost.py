"""What the probe's score costs: the default blend (the output share: weight x value norm)
against the same blend ranking by the attention weight alone, and HKVD@0.15:L1, on the demo
corpus's six articles (an 857-token prompt, MultiNews' size), one thread, median of 10 timed
prefills after 2 warm-ups, interleaved.

    .venv/bin/python benchmarks/probe_score_cost.py
"""

import statistics as st
import time

import torch

from cacheblend.blend import probe
from cacheblend.commands.demo_corpus import DOCUMENTS
from cacheblend.config import BlendConfig, load_config
from cacheblend.engine import Engine, GenerateRequest
from cacheblend.model.loader import load_model
from cacheblend.store.memory import MemoryStore

share = probe.output_share


def weight(probs, values):
    return probs.mean(dim=(0, 1))


torch.set_num_threads(1)
engine = Engine(load_config(None), store=MemoryStore(), loaded=load_model(device="cpu"))
docs = list(DOCUMENTS.values())[:6]
engine.ingest(docs, progress=False)
req = GenerateRequest(question="Summarise the news articles above in one paragraph.",
                      documents=docs, method="blend")
hk = GenerateRequest(question=req.question, documents=docs, method="blend",
                     blend=BlendConfig(selector="hkvd", probe_layers=0, check_layers=(1,),
                                       check_ratios=(0.15,)))
print("prompt", len(engine.segments_for(req).ids))
t = {"share": [], "weight": [], "hkvd": []}
for _ in range(12):
    for name, times in t.items():
        probe.output_share = share if name == "share" else weight
        r = hk if name == "hkvd" else req
        start = time.perf_counter()
        engine.prefill(r)
        times.append(time.perf_counter() - start)
for name, times in t.items():
    print(name, round(st.median(times[2:]) * 1000, 1), "ms")

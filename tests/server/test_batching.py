"""decode_batch: several requests in one step give what each gives alone."""

from __future__ import annotations

import torch

from cacheblend.decode import SamplingParams
from cacheblend.engine import GenerateRequest, decode_step
from cacheblend.server.batching import decode_batch
from tests.server.server_helpers import make_engine


def test_batched_decode_matches_one_at_a_time(loaded_model):
    engine = make_engine(loaded_model)
    questions = [
        "What is the capital of Italy?",
        "Name three colours of the rainbow please.",
        "Hi",
    ]  # different lengths: ragged caches
    requests = [
        GenerateRequest(question=q, sampling=SamplingParams(max_tokens=8)) for q in questions
    ]
    alone = []
    for request in requests:
        kv, logits, _ = engine.prefill(request)
        tokens = [int(logits.argmax())]
        for _ in range(5):
            tokens.append(int(decode_step(engine.runner, kv, tokens[-1]).argmax()))
        alone.append(tokens)
    prefilled = [engine.prefill(request) for request in requests]
    caches = [kv for kv, _, _ in prefilled]
    tokens = [[int(logits.argmax())] for _, logits, _ in prefilled]
    for _ in range(5):
        reference = [decode_step(engine.runner, _copy(kv), t[-1]) for kv, t in zip(caches, tokens)]
        logits = decode_batch(engine.runner, caches, [t[-1] for t in tokens])  # (B, V)
        assert logits.shape == (len(requests), engine.runner.vocab_size)
        torch.testing.assert_close(logits, torch.stack(reference), atol=2e-4, rtol=1e-4)
        for row, t in enumerate(tokens):
            t.append(int(logits[row].argmax()))
    assert tokens == alone
    assert [kv.length for kv in caches] == [
        len(r.ids) + 5 for r in (engine.segments_for(q) for q in requests)
    ]


def _copy(kv):
    clone = object.__new__(type(kv))
    clone.__dict__.update(kv.__dict__)
    clone.keys, clone.values = kv.keys.clone(), kv.values.clone()
    return clone

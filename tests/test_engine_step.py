"""The one request lifecycle (Engine.step): batched decode, chunked prefill, the background
lane, cancellation. Every caller (CLI, eval, bench, server) runs this path."""

from __future__ import annotations

import pytest
import torch

from cacheblend.decode import SamplingParams, decode_step
from cacheblend.engine import GenerateRequest
from cacheblend.sequence import Status
from tests.blend.test_fusor import DOCS, QUESTION

pytestmark = pytest.mark.slow

QUESTIONS = ["What is the capital of Italy?", "Name three colours of the rainbow please.", "Hi"]


def _greedy(question, max_tokens=8, **kwargs):
    return GenerateRequest(question=question, sampling=SamplingParams(max_tokens=max_tokens),
                           **kwargs)


def _copy(kv):
    clone = object.__new__(type(kv))
    clone.__dict__.update(kv.__dict__)
    clone.keys, clone.values = kv.keys.clone(), kv.values.clone()
    return clone


def test_batched_decode_step_matches_one_at_a_time(engine_factory):
    engine = engine_factory()
    prefilled = [engine.prefill(_greedy(q)) for q in QUESTIONS]  # ragged caches
    caches = [kv for kv, _, _ in prefilled]
    tokens = [[int(logits.argmax())] for _, logits, _ in prefilled]
    for _ in range(5):
        alone = [decode_step(engine.runner, [_copy(kv)], [t[-1]])[0]
                 for kv, t in zip(caches, tokens)]
        logits = decode_step(engine.runner, caches, [t[-1] for t in tokens])  # (B, V)
        assert logits.shape == (len(QUESTIONS), engine.runner.vocab_size)
        torch.testing.assert_close(logits, torch.stack(alone), atol=2e-4, rtol=1e-4)
        for row, t in enumerate(tokens):
            t.append(int(logits[row].argmax()))
    assert [kv.length for kv in caches] == [
        len(engine.segments_for(_greedy(q)).ids) + 5 for q in QUESTIONS]


def test_requests_stepped_together_equal_each_alone(engine_factory):
    engine = engine_factory(prefill_step_s=float("inf"))  # all admitted in the first step
    alone = [engine.generate(_greedy(q)).token_ids for q in QUESTIONS]
    sequences = [engine.add_request(_greedy(q)) for q in QUESTIONS]
    batch_sizes = []
    while engine.has_work():
        batch_sizes.append(engine.step().decoded)
    assert max(batch_sizes) == len(QUESTIONS)  # they really decoded together
    results = [s.outbox[-1][1] for s in sequences]
    assert [r.token_ids for r in results] == alone
    deltas = ["".join(v[0] for k, v in s.outbox if k == "delta") for s in sequences]
    assert deltas == [r.text for r in results]


def test_max_batch_size_one_runs_requests_one_after_another(engine_factory):
    engine = engine_factory()
    for q in QUESTIONS:
        engine.add_request(_greedy(q, max_tokens=4))
    decoded = []
    while engine.has_work():
        decoded.append(engine.step(max_batch_size=1).decoded)
    assert max(decoded) == 1


def test_chunked_prefill_equals_a_whole_prefill_and_interleaves_decode(engine_factory):
    """A long prompt admitted while another request decodes is prefilled in token slices of
    at most prefill_step_tokens, with a decode step between slices; the result is the prefill
    it would have had alone."""
    engine = engine_factory(prefill_step_tokens=48, prefill_step_s=float("inf"))
    long_request = GenerateRequest(question=QUESTION, documents=DOCS, method="full",
                                   sampling=SamplingParams(max_tokens=6))
    _, whole_logits, whole = engine.prefill(long_request)
    assert whole.prefill_slices == 1
    alone = engine.generate(long_request)

    streamer = engine.add_request(_greedy("Count to twenty.", max_tokens=60))
    engine.step()  # the streamer is decoding now
    long_seq = engine.add_request(long_request)
    reports = []
    while not long_seq.finished:
        reports.append(engine.step())
    result = long_seq.outbox[-1][1]
    slices = result.stats.prefill_slices
    assert slices == -(-whole.prompt_tokens // 48) and slices > 2
    assert all(r.prefill_tokens <= 48 + 1e-9 for r in reports)  # the budget held every step
    assert sum(1 for r in reports if r.decoded) >= slices  # the stream went on meanwhile
    torch.testing.assert_close(result.first_logits, whole_logits, atol=1e-4, rtol=1e-4)
    assert result.token_ids == alone.token_ids
    assert not streamer.finished
    engine.abort(streamer)
    engine.step()
    assert streamer.finished and engine.num_running == 0


def test_fused_prefill_is_split_by_layers_under_the_budget(engine_factory):
    engine = engine_factory(prefill_step_tokens=4)
    engine.ingest(DOCS, progress=False)
    request = GenerateRequest(question=QUESTION, documents=DOCS, method="blend",
                              sampling=SamplingParams(max_tokens=3))
    _, whole_logits, _ = engine.prefill(request)
    engine.add_request(_greedy("Count to twenty.", max_tokens=60))
    engine.step()
    seq = engine.add_request(request)
    steps = 0
    while not seq.finished:
        engine.step()
        steps += 1
    result = seq.outbox[-1][1]
    assert steps > 3 and result.stats.method == "blend"
    assert torch.equal(result.first_logits, whole_logits)  # the same layers, paused between


def test_time_budget_pauses_a_prefill_between_layers(engine_factory):
    """prefill_step_s=0: while another request decodes, a prefill runs one layer per step."""
    engine = engine_factory(prefill_step_s=0.0)
    engine.add_request(GenerateRequest(question="Count to twenty.", sampling=SamplingParams(
        max_tokens=200, min_tokens=200)))
    engine.step()
    seq = engine.add_request(_greedy("What is the capital of Italy?", max_tokens=1))
    steps = 0
    while not seq.finished:
        report = engine.step()
        steps += 1
        assert report.decoded == 1
    assert steps >= engine.runner.num_layers


def test_background_lane_yields_to_live_requests(engine_factory):
    """Background work runs a layer at a time and stops as soon as a live request arrives;
    while one waits or prefills, no background work runs; the upload finishes afterwards."""
    engine = engine_factory()
    documents = [f"Document number {i} talks about topic {i} at some length." for i in range(8)]
    order, advanced = [], []
    upload = engine.ingest_slices(documents)

    def slices():  # the upload, with a live request arriving after its third layer
        while True:
            if len(advanced) == 3:
                engine.add_request(_greedy("Hi", max_tokens=2),
                                   emit=lambda kind, value: order.append(("chat", kind)))
            try:
                yield next(upload)
            except StopIteration as done:
                return done.value
            advanced.append(1)

    task = engine.submit(slices=slices(), background=True,
                         emit=lambda kind, value: order.append(("upload", kind)))
    engine.step()
    assert len(advanced) == 3  # it stopped for the live request
    while engine.has_work():
        engine.step()
    assert order.index(("chat", "done")) < order.index(("upload", "done"))
    assert len(advanced) > 3 * engine.runner.num_layers  # layers of several documents
    assert not task.cancelled
    assert engine.ingest(documents, progress=False)[0].cached  # the upload stored them


def test_a_cancelled_request_frees_its_cache(engine_factory):
    engine = engine_factory()
    seq = engine.add_request(_greedy("Tell me a long story.", max_tokens=50))
    engine.step()
    assert seq.status is Status.RUNNING and seq.kv is not None
    engine.abort(seq)
    engine.step()
    assert seq.finished and seq.kv is None and engine.num_running == 0


def test_an_invalid_request_fails_alone(engine_factory):
    engine = engine_factory()
    good = engine.add_request(_greedy("Hi", max_tokens=2))
    bad = engine.add_request(GenerateRequest(question="Hi", method="nonsense"))
    while engine.has_work():
        engine.step()
    assert good.outbox[-1][0] == "done"
    kind, error = bad.outbox[-1]
    assert kind == "error" and "method must be one of" in str(error)

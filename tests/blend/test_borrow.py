"""Prefix mode's borrowing: a chunk that misses under the request's own prefix is read from its
entry under the engine's default prefix or the preamble (BlendConfig.borrow)."""

from __future__ import annotations

import pytest

from cacheblend.config import BlendConfig, ConfigError
from cacheblend.engine import GenerateRequest
from cacheblend.store.memory import MemoryStore

DOCS = [
    "The Greywater Lighthouse was designed by Miriam Osk and completed in 1798. " * 3,
    "Miriam Osk was born in 1761 in the mountain village of Tarn Hollow. " * 3,
]
QUESTION = "Where was the designer of the lighthouse born?"
OTHER_SYSTEM = "You are a terse librarian. Cite nothing."


def request(system=None, ratio=None, method="blend", **blend):
    return GenerateRequest(question=QUESTION, documents=DOCS, method=method, ratio=ratio,
                           system=system, blend=BlendConfig(**blend) if blend else None)


def chunk_keys(engine, prefix):
    segments = engine.segments_for(request())
    return [engine.chunks.chunk_key(prefix, c) for c in segments.chunks]


def test_borrow_is_validated():
    with pytest.raises(ConfigError, match="borrow"):
        BlendConfig(borrow="yes")


def test_a_request_under_another_system_prompt_borrows_the_ingested_entries(engine_factory):
    engine = engine_factory(blend={"fallback": False})
    engine.ingest(DOCS, progress=False)
    entries = engine.store.stats().entries
    other = engine.segments_for(request(OTHER_SYSTEM))
    assert other.prefix != engine.default_prefix()
    chunk_tokens = sum(len(c) for c in other.chunks)

    _, _, stats = engine.prefill(request(OTHER_SYSTEM))
    assert stats.borrowed_tokens == chunk_tokens
    assert stats.missed_tokens == len(other.prefix)  # only the new prefix is computed
    assert engine.store.stats().entries == entries + 1  # its prefix entry; no chunk entries
    assert not any(engine.store.contains(k) for k in chunk_keys(engine, other.prefix))
    # Under the default system prompt the same documents are plain hits.
    _, _, stats = engine.prefill(request())
    assert (stats.borrowed_tokens, stats.missed_tokens) == (0, 0)


def test_a_borrowed_entry_is_read_as_if_it_were_the_requests_own(engine_factory):
    """reuse reads every chunk row as stored: borrowing the default prefix's entries gives the
    logits of an engine holding those same entries under the request's own prefix (placed and
    rotated alike), and not those of entries computed under that prefix."""
    lender = engine_factory(store_codec="fp32", blend={"fallback": False})
    lender.ingest(DOCS, progress=False)
    _, borrowed, stats = lender.prefill(request(OTHER_SYSTEM, method="reuse"))
    assert stats.borrowed_tokens == stats.chunk_tokens and stats.method == "reuse"

    own = engine_factory(store_codec="fp32", blend={"fallback": False, "borrow": False})
    other = own.segments_for(request(OTHER_SYSTEM))
    default = lender.default_prefix()
    for chunk in other.chunks:
        entry = lender.store.get(lender.chunks.chunk_key(default, chunk))
        own.store.put(own.chunks.chunk_key(other.prefix, chunk), entry)
    _, placed, stats = own.prefill(request(OTHER_SYSTEM, method="reuse"))
    assert (stats.borrowed_tokens, stats.missed_tokens) == (0, len(other.prefix))
    assert (borrowed - placed).abs().max().item() <= 1e-5

    native = engine_factory(store_codec="fp32", blend={"fallback": False, "borrow": False})
    native.prefill(request(OTHER_SYSTEM, method="reuse"))  # computes its own entries
    _, computed, _ = native.prefill(request(OTHER_SYSTEM, method="reuse"))
    assert (borrowed - computed).abs().max().item() > 1e-3  # the context shows: entries differ


def test_a_request_that_falls_back_to_full_borrows_nothing(engine_factory):
    engine = engine_factory()
    short = "Port Alder is small."
    engine.ingest([short], progress=False)  # the long document misses: a full prefill is cheaper
    _, _, stats = engine.prefill(GenerateRequest(question=QUESTION, documents=[short, DOCS[0]],
                                                 method="blend", system=OTHER_SYSTEM))
    assert stats.method == "full" and stats.borrowed_tokens == 0
    # The same lookup under blend (no fallback) borrows the short document.
    _, _, stats = engine.prefill(GenerateRequest(
        question=QUESTION, documents=[short, DOCS[1]], method="blend", system=OTHER_SYSTEM,
        blend=BlendConfig(fallback=False)))
    assert stats.method == "blend" and 0 < stats.borrowed_tokens < stats.chunk_tokens


def test_deleting_a_document_drops_the_entry_a_request_could_borrow(engine_factory):
    store = MemoryStore()
    engine_factory(store=store, blend={"precompute": "preamble"}).ingest(DOCS, progress=False)
    engine = engine_factory(store=store)
    engine.ingest(DOCS, progress=False)
    keys = engine.document_keys(DOCS[0])
    assert keys[0] == engine.document_key(DOCS[0]) and len(keys) == 2
    assert all(store.contains(k) for k in keys)
    for key in keys:
        store.delete(key)
    _, _, stats = engine.prefill(request(OTHER_SYSTEM, fallback=False))
    assert stats.borrowed_tokens == sum(len(c) for c in engine.segments_for(request()).chunks[1:])


def test_without_borrow_the_chunks_are_computed_under_the_request_prefix(engine_factory):
    engine = engine_factory(blend={"fallback": False, "borrow": False})
    engine.ingest(DOCS, progress=False)
    other = engine.segments_for(request(OTHER_SYSTEM))
    _, _, stats = engine.prefill(request(OTHER_SYSTEM))
    assert stats.borrowed_tokens == 0
    assert stats.missed_tokens == len(other.prefix) + sum(len(c) for c in other.chunks)
    assert all(engine.store.contains(k) for k in chunk_keys(engine, other.prefix))
    # Its own entries now exist, and an entry of its own comes before any borrowed one.
    _, _, stats = engine.prefill(request(OTHER_SYSTEM, fallback=False, borrow=True))
    assert (stats.borrowed_tokens, stats.missed_tokens) == (0, 0)


def test_entries_of_a_preamble_mode_engine_are_borrowed(engine_factory):
    """A store warmed by an engine in preamble mode (the default before this one) stays warm."""
    store = MemoryStore()
    old = engine_factory(store=store, blend={"precompute": "preamble"})
    old.ingest(DOCS, progress=False)
    engine = engine_factory(store=store, blend={"fallback": False})
    _, _, stats = engine.prefill(request(OTHER_SYSTEM))
    assert stats.borrowed_tokens == sum(len(c) for c in engine.segments_for(request()).chunks)
    assert stats.missed_tokens == len(engine.segments_for(request(OTHER_SYSTEM)).prefix)


def test_borrow_preambles_order_and_modes(engine_factory):
    engine = engine_factory()
    chunks, default = engine.chunks, engine.default_prefix()
    preamble = engine.prompts.template_ids(BlendConfig().preamble)
    other = engine.segments_for(request(OTHER_SYSTEM)).prefix
    assert chunks.borrow_preambles(other, BlendConfig()) == [default, preamble]
    assert chunks.borrow_preambles(default, BlendConfig()) == [preamble]  # never its own
    assert chunks.borrow_preambles(other, BlendConfig(borrow=False)) == []
    assert chunks.borrow_preambles(preamble, BlendConfig(precompute="preamble")) == []


def test_a_later_chat_turn_borrows_the_uploaded_documents(engine_factory):
    """A chat's earlier turns sit before the documents, so its prefix is new every turn."""
    engine = engine_factory(blend={"fallback": False})
    engine.ingest(DOCS, progress=False)
    messages = [{"role": "user", "content": "Hello"}, {"role": "assistant", "content": "Hi!"},
                {"role": "user", "content": QUESTION}]
    segments = engine.chat_segments(messages, DOCS)
    assert segments.prefix[:len(engine.default_prefix())] != engine.default_prefix()
    _, _, stats = engine.prefill(GenerateRequest(segments=segments, method="blend"))
    assert stats.borrowed_tokens == sum(len(c) for c in segments.chunks)
    assert stats.missed_tokens == len(segments.prefix)

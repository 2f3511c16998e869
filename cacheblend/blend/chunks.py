"""Chunk and prefix entries: their keys, their precompute and their store I/O, in one place.

Every key the engine, the server and the CLI use is made here (over the model fingerprint, the
preamble a chunk is precomputed after, and the token ids), so a document uploaded through the
server, ingested from the CLI and looked up by a request all meet at the same key.
"""

from __future__ import annotations

from collections.abc import Generator

import torch

from cacheblend.blend.fusor import FusionPlan, Fusor, run_to_end
from cacheblend.blend.loader import CachedSpan
from cacheblend.config import BlendConfig
from cacheblend.kv import RequestKV
from cacheblend.prompt import PromptBuilder, Segments
from cacheblend.store.base import ChunkKV, KVStore
from cacheblend.store.keys import chunk_key, prefix_key

STORE_DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "int8": torch.float16}

LayerKV = list[tuple[torch.Tensor, torch.Tensor]]  # per layer (K before RoPE, V), (KV, n, hd)


class ChunkCache:
    """Computes chunk / prefix KV with the runner and reads and writes it in the store."""

    def __init__(self, fusor: Fusor, store: KVStore, fingerprint: str,
                 prompts: PromptBuilder, codec: str, default_prefix: tuple[int, ...] = ()) -> None:
        self.fusor = fusor
        self.store = store
        self.fingerprint = fingerprint
        self.prompts = prompts
        self.dtype = STORE_DTYPES[codec]
        self.default_prefix = default_prefix  # the engine's: ingest precomputes after it

    # --- keys ---------------------------------------------------------------------------------

    def preamble_for(self, prefix: tuple[int, ...], blend: BlendConfig) -> tuple[int, ...]:
        """Tokens a chunk is precomputed after; part of the chunk's key."""
        if blend.precompute == "alone":
            return ()
        if blend.precompute == "sink":
            bos = self.prompts.tokenizer.bos_token_id
            return (bos if bos is not None else 0,)
        if blend.precompute == "preamble":
            return self.prompts.template_ids(blend.preamble)
        return prefix

    def chunk_key(self, preamble: tuple[int, ...], chunk: tuple[int, ...]) -> str:
        return chunk_key(self.fingerprint, preamble, chunk)

    def borrow_preambles(self, preamble: tuple[int, ...], blend: BlendConfig
                         ) -> list[tuple[int, ...]]:
        """The other contexts a chunk's entry may sit under, tried in order when the chunk
        misses under ``preamble`` (``blend.borrow``, ``prefix`` mode only): the engine's default
        prefix, where ingest and uploads precompute documents, then the configured preamble
        (entries a ``preamble``-mode engine stored). A request with another system prompt or
        instruction, or a chat whose earlier turns make its prefix new, then reads the stored
        entry, and blending corrects it as it corrects any entry, instead of computing the
        chunk again."""
        if blend.precompute != "prefix" or not blend.borrow:
            return []
        others = (self.default_prefix, self.prompts.template_ids(blend.preamble))
        return [p for p in dict.fromkeys(others) if p and p != preamble]

    def prefix_key(self, before: tuple[int, ...], piece: tuple[int, ...]) -> str:
        return prefix_key(self.fingerprint, before, piece)

    def probe(self, segments: Segments, preamble: tuple[int, ...]) -> list[ChunkKV | None]:
        """[prefix entry, chunk entries...], None where missing (and for an empty prefix)."""
        entries = [self.store.get(self.prefix_key((), segments.prefix))] if segments.prefix \
            else [None]
        return entries + [self.store.get(self.chunk_key(preamble, c)) for c in segments.chunks]

    def borrow(self, chunks: tuple[tuple[int, ...], ...], entries: list[ChunkKV | None],
               preamble: tuple[int, ...], blend: BlendConfig) -> dict[int, ChunkKV]:
        """{index: entry} for the chunks that missed (``entries[i]`` None) but are stored under
        one of ``borrow_preambles``."""
        others = self.borrow_preambles(preamble, blend)
        borrowed: dict[int, ChunkKV] = {}
        for index, (chunk, entry) in enumerate(zip(chunks, entries)):
            if entry is not None:
                continue
            for other in others:
                found = self.store.get(self.chunk_key(other, chunk))
                if found is not None:
                    borrowed[index] = found
                    break
        return borrowed

    # --- compute and store --------------------------------------------------------------------

    def to_entry(self, kv: LayerKV, start: int, end: int) -> ChunkKV:
        keys = torch.stack([k[:, start:end] for k, _ in kv]).to(self.dtype)
        values = torch.stack([v[:, start:end] for _, v in kv]).to(self.dtype)
        return ChunkKV(keys.cpu().contiguous(), values.cpu().contiguous(),
                       meta={"model": self.fingerprint})

    def _prefill_steps(self, ids: tuple[int, ...]) -> Generator[int, None, LayerKV]:
        """A plain prefill through the fusor's layer loop (pausing after each layer); returns
        per layer (K before RoPE, V)."""
        runner = self.fusor.runner
        plan = FusionPlan(torch.tensor(ids, dtype=torch.long), torch.arange(len(ids)),
                          capture=True)
        kv = RequestKV(runner.num_layers, runner.num_kv_heads, runner.head_dim, len(ids),
                       runner.device, runner.dtype)
        result = yield from self.fusor.layers(plan, kv)
        return result.captured

    def _prefill(self, ids: tuple[int, ...]) -> LayerKV:
        return run_to_end(self._prefill_steps(ids))

    def precompute_steps(self, preamble: tuple[int, ...], chunk: tuple[int, ...]
                         ) -> Generator[int, None, ChunkKV]:
        """Compute a chunk after its preamble and store it, pausing after each layer; returns
        the chunk's entry. (The prefix entry is the callers' business: ``compute_prefix`` or
        ``ensure_prefix`` stores it once, not once per chunk.)"""
        kv = yield from self._prefill_steps(preamble + chunk)
        entry = self.to_entry(kv, len(preamble), len(preamble) + len(chunk))
        self.store.put(self.chunk_key(preamble, chunk), entry)
        return entry

    def precompute(self, preamble: tuple[int, ...], chunk: tuple[int, ...]) -> ChunkKV:
        """As ``precompute_steps``, at once."""
        return run_to_end(self.precompute_steps(preamble, chunk))

    def compute_prefix(self, prefix: tuple[int, ...]) -> ChunkKV:
        """Compute and store the exact KV of the prefix at position 0."""
        entry = self.to_entry(self._prefill(prefix), 0, len(prefix))
        self.store.put(self.prefix_key((), prefix), entry)
        return entry

    def ensure_prefix(self, prefix: tuple[int, ...]) -> None:
        """Store the exact KV of ``prefix`` unless it is stored already."""
        if prefix and self.store.get(self.prefix_key((), prefix)) is None:
            self.compute_prefix(prefix)

    def store_prefix_chain(self, segments: Segments, computed_from: int,
                           captured: LayerKV) -> None:
        """Store each prefix/chunk segment computed in a request as an exact prefix entry."""
        ids, start = segments.ids, 0
        for piece in (segments.prefix, *segments.chunks):
            end = start + len(piece)
            if piece and start >= computed_from:
                entry = self.to_entry(captured, start - computed_from, end - computed_from)
                self.store.put(self.prefix_key(tuple(ids[:start]), piece), entry)
            start = end

    def prefix_chain(self, segments: Segments) -> list[CachedSpan]:
        """Longest run of exact prefix entries (prefix, chunk 1, chunk 2, ...) from position 0."""
        spans, before = [], ()
        for piece in (segments.prefix, *segments.chunks):
            if not piece:
                continue
            entry = self.store.get(self.prefix_key(before, piece))
            if entry is None:
                break
            spans.append(CachedSpan(len(before), entry))
            before = before + piece
        return spans

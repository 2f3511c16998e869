"""Cache keys: a blake2b-128 digest over everything that decides an entry's contents.

Never Python's ``hash()`` (salted per process). A key covers the model fingerprint, the KV
layout/codec version, the kind of entry, the precompute preamble and the segment's token ids,
so a cache from another model, tokenizer, layout or preamble can never be found.
"""

from __future__ import annotations

import hashlib
from array import array
from collections.abc import Sequence

# Bump when the meaning of stored K/V changes (pre-RoPE keys, layer order, ...).
KV_LAYOUT_VERSION = "kv-prerope-v1"


def _ids_bytes(ids: Sequence[int]) -> bytes:
    return array("q", ids).tobytes()


def make_key(kind: str, model_fingerprint: str, context_ids: Sequence[int], ids: Sequence[int]) -> str:
    """Digest of (layout version, kind, model, context ids, segment ids).

    kind: "chunk" (context = the precompute preamble) or "prefix" (context = every token before
    the segment, which makes the prefix entries an exact, position-bound prefix cache).
    """
    digest = hashlib.blake2b(digest_size=16)
    for part in (KV_LAYOUT_VERSION.encode(), kind.encode(), model_fingerprint.encode()):
        digest.update(len(part).to_bytes(4, "little"))
        digest.update(part)
    for seq in (context_ids, ids):
        digest.update(len(seq).to_bytes(8, "little"))
        digest.update(_ids_bytes(seq))
    return digest.hexdigest()


def chunk_key(model_fingerprint: str, preamble_ids: Sequence[int], ids: Sequence[int]) -> str:
    return make_key("chunk", model_fingerprint, preamble_ids, ids)


def prefix_key(model_fingerprint: str, before_ids: Sequence[int], ids: Sequence[int]) -> str:
    return make_key("prefix", model_fingerprint, before_ids, ids)

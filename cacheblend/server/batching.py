"""One decode step for several requests at once.

Each request has its own ``RequestKV`` (its own length); the projections, the MLP and the LM head
run once over the stacked tokens (B rows), so the weights are read once per step instead of once
per request. Attention runs per request against its own cache: no row ever sees another
request's keys, so batching cannot mix requests.
"""

from __future__ import annotations

import torch

from cacheblend.kv import RequestKV
from cacheblend.model.runner import ModelRunner


@torch.inference_mode()
def decode_batch(runner: ModelRunner, caches: list[RequestKV], tokens: list[int]) -> torch.Tensor:
    """Append one token to each cache (at its own position); returns logits (B, V)."""
    assert caches and len(caches) == len(tokens), (len(caches), len(tokens))
    device = caches[0].keys.device
    ids = torch.tensor(tokens, device=device)  # (B,)
    positions = torch.tensor([cache.length for cache in caches], device=device)  # (B,)
    for cache in caches:
        assert cache.length < cache.capacity, (cache.length, cache.capacity)
    hidden = runner.embed(ids)  # (B, D)
    for index in range(runner.num_layers):
        q, k, v = runner.project_qkv(index, hidden)  # q (H, B, hd); k, v (KV, B, hd)
        q = runner.rope.apply(q, positions)
        k = runner.rope.apply(k, positions)
        outputs = []
        for row, cache in enumerate(caches):
            position = cache.length
            cache.keys[index, :, position] = k[:, row]
            cache.values[index, :, position] = v[:, row]
            keys, values = cache.layer(index, position + 1)  # (KV, position + 1, hd)
            outputs.append(runner.attend(q[:, row : row + 1], keys, values))  # (H, 1, hd)
        hidden = runner.finish_layer(index, hidden, torch.cat(outputs, dim=1))  # (B, D)
    for cache in caches:
        cache.length += 1
    return runner.logits(hidden)  # (B, V)

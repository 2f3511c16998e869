"""The probe: a cheap pass of the suffix (the question) over the cached KV, before blending.

Like ``reuse``, only the suffix is computed, against the cached chunk rows as they are, for the
first ``layers`` layers; at each, the attention of the prompt's last position (the one whose
output is the first answer token) on every position is kept, and its mean over heads and the
probed layers tells a query-aware selector which chunk tokens the answer reads (ProphetKV's first
stage). The last position alone ranks better than the mean over all the suffix's queries: on 16
MuSiQue / MultiNews development prompts, blend[qa]+probe30@0.15:L0 recovered 74% / 61% of reuse's
KL with it against 69% / 46% with the mean (docs/results.md). It costs the suffix's tokens x
``layers`` token-layers; the planner takes that out of the recompute budget, so a probed blend is
compute-matched with an unprobed one at the same ratio. The suffix rows it writes are
overwritten by the blend pass, which computes the suffix at every layer.
"""

from __future__ import annotations

import torch

from cacheblend.blend.loader import LayerLoader
from cacheblend.blend.select import suffix_probs
from cacheblend.kv import RequestKV
from cacheblend.model.runner import ModelRunner


def suffix_count(active: torch.Tensor, spans: list[tuple[int, int]]) -> int:
    """How many of a plan's active positions (host data) come after the last chunk: the
    suffix, a contiguous tail. Counted on the host, so the device tail is a plain slice."""
    end = max((e for _, e in spans), default=0)
    return int((active.cpu() >= end).sum())


def probe_attention(runner: ModelRunner, ids: torch.Tensor, suffix: torch.Tensor, kv: RequestKV,
                    loader: LayerLoader, layers: int) -> torch.Tensor:
    """(T,) the last position's attention on every position, averaged over heads and the first
    ``layers`` layers of a pass of the suffix over the cached rows (T = ids' length)."""
    total = ids.shape[0]
    layers = min(layers, runner.num_layers)
    suffix = suffix.to(kv.keys.device)
    key_positions = torch.arange(total, device=kv.keys.device)
    hidden = runner.embed(ids.to(kv.keys.device)[suffix])  # (s, D)
    mass = torch.zeros(total, device=kv.keys.device)
    for index in range(layers):
        loader.load(index, runner.num_layers)
        q, k, v = runner.project_qkv(index, hidden)
        layer_keys, layer_values = kv.keys[index, :, :total], kv.values[index, :, :total]
        layer_keys[:, suffix] = runner.rope.apply(k, suffix)
        layer_values[:, suffix] = v
        probs = suffix_probs(runner.rope.apply(q, suffix), suffix, layer_keys, key_positions)
        mass += probs[:, :, -1].mean(dim=(0, 1))  # the last position's: it writes the answer
        if index + 1 < layers:  # the last probed layer's output is not needed
            # The weights that gave the mass also give the attention output: one softmax.
            kv_heads, group, s, _ = probs.shape
            attn = probs.to(layer_values.dtype).view(kv_heads, group * s, total) @ layer_values
            hidden = runner.finish_layer(index, hidden, attn.view(kv_heads * group, s, -1))
    return mass / max(1, layers)

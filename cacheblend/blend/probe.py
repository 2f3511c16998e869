"""The probe: a cheap pass of the suffix (the question) over the cached KV, before blending.

Like ``reuse``, only the suffix is computed, against the cached chunk rows as they are, for the
first ``layers`` layers. At each, every position's share of the attention output of the
prompt's last position (the one whose output is the first answer token) is kept: its attention
weight times its value norm, over heads (``select.output_share``). The mean over the probed
layers tells a query-aware selector which chunk tokens the answer reads (ProphetKV's first
stage). On the development prompts (16 each of MuSiQue and MultiNews, docs/results.md), the last
position ranked better than the mean over all the suffix's queries (74% / 61% of reuse's KL
recovered at 15%, against 69% / 46%), and weighting by the value norm better than the weight
alone (KL 0.069 / 0.102 against 0.080 / 0.109 at 12%).

It costs the suffix's tokens x ``layers`` token-layers; the planner takes that out of the
recompute budget, so a probed blend is compute-matched with an unprobed one at the same ratio,
and lets the probe use at most half of it. A suffix too long for that (SAMSum's dialogue) is
probed by its last ``probe_tail`` tokens, which see the cached rows and each other but not the
suffix before them (on the first 16 SAMSum prompts, ranking by weight alone: KL 0.261 with the
last 8 tokens, against 0.399 for the HKVD fallback before; 0.233 with the output share). The
suffix rows the probe writes are overwritten by the blend pass, which computes the suffix at
every layer.
"""

from __future__ import annotations

import torch

from cacheblend.blend.loader import LayerLoader
from cacheblend.blend.select import output_share, suffix_probs
from cacheblend.kv import RequestKV
from cacheblend.model.runner import ModelRunner


def suffix_count(active: torch.Tensor, spans: list[tuple[int, int]]) -> int:
    """How many of a plan's active positions (host data) come after the last chunk: the
    suffix, a contiguous tail. Counted on the host, so the device tail is a plain slice."""
    end = max((e for _, e in spans), default=0)
    return int((active.cpu() >= end).sum())


def layer_weights(layers: int, ramp: float) -> list[float]:
    """How much each of ``layers`` probed layers weighs in the ranking: layer i weighs
    ((i + 1) / layers) ** ramp (ramp 0: every layer 1, the plain mean)."""
    return [((i + 1) / layers) ** ramp for i in range(layers)]


def probe_attention(runner: ModelRunner, ids: torch.Tensor, suffix: torch.Tensor, kv: RequestKV,
                    loader: LayerLoader, layers: int, cached_end: int | None = None,
                    ramp: float = 0.0) -> torch.Tensor:
    """(T,) the last position's output share of every position (``output_share``), averaged
    over the first ``layers`` layers of a pass of ``suffix`` over the cached rows (T = ids'
    length), layer i weighing ((i + 1) / layers) ** ``ramp`` (``layer_weights``).

    ``suffix`` is the suffix's tail that is probed: every suffix token, or, for a suffix too
    long to probe within the budget, its last few. The tokens left out are not seen: the
    probed ones attend to the cached rows [0, ``cached_end``) and to each other (``cached_end``
    defaults to where ``suffix`` starts)."""
    total = ids.shape[0]
    layers = min(layers, runner.num_layers)
    device = kv.keys.device
    suffix = suffix.to(device)
    start = total - suffix.shape[0]  # the probed tail is contiguous: [start, total)
    cached_end = start if cached_end is None else cached_end
    whole = cached_end == start
    key_positions = (torch.arange(total, device=device) if whole else
                     torch.cat([torch.arange(cached_end, device=device), suffix]))
    hidden = runner.embed(ids.to(device)[suffix])  # (s, D)
    mass = torch.zeros(key_positions.shape[0], device=device)
    weights = layer_weights(layers, ramp)
    for index in range(layers):
        loader.load(index, runner.num_layers)
        q, k, v = runner.project_qkv(index, hidden)
        layer_keys, layer_values = kv.keys[index, :, :total], kv.values[index, :, :total]
        layer_keys[:, start:] = runner.rope.apply(k, suffix)
        layer_values[:, start:] = v
        if not whole:  # the rows between (the suffix left out) hold nothing yet: skip them
            layer_keys = torch.cat([layer_keys[:, :cached_end], layer_keys[:, start:]], dim=1)
            layer_values = torch.cat([layer_values[:, :cached_end], layer_values[:, start:]],
                                     dim=1)
        probs = suffix_probs(runner.rope.apply(q, suffix), suffix, layer_keys, key_positions)
        # The last position writes the answer.
        mass.add_(output_share(probs[:, :, -1], layer_values), alpha=weights[index])
        if index + 1 < layers:  # the last probed layer's output is not needed
            # The weights that gave the mass also give the attention output: one softmax.
            kv_heads, group, s, keys_n = probs.shape
            attn = probs.to(layer_values.dtype).view(kv_heads, group * s, keys_n) @ layer_values
            hidden = runner.finish_layer(index, hidden, attn.view(kv_heads * group, s, -1))
    mass /= max(1.0, sum(weights))  # a weighted mean (ramp 0: the plain one, as it always was)
    if whole:
        return mass
    full = torch.zeros(total, device=device)
    full[:cached_end] = mass[:cached_end]
    return full

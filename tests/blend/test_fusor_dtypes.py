"""Blend with every chunk token selected equals a full prefill in every compute dtype the test
device supports (a tiny random model: bf16 matmuls are ~100x slower than fp32 on a CPU)."""

from __future__ import annotations

import time

import pytest
import torch

from cacheblend.blend.fusor import FusionPlan, Fusor
from cacheblend.blend.loader import CachedSpan
from cacheblend.blend.select import HKVDSelector
from cacheblend.device import torch_dtype
from cacheblend.kv import RequestKV
from cacheblend.model.random import random_model
from cacheblend.model.runner import ModelRunner
from cacheblend.store.base import ChunkKV
from tests.conftest import TOLERANCE, max_relative_diff

PREFIX, CHUNK, SUFFIX = 6, 30, 8


def entry(runner: ModelRunner, ids: torch.Tensor, start: int, end: int) -> ChunkKV:
    """Pre-RoPE K/V of ids[start:end] computed after ids[:start] (start 0: alone)."""
    _, kv = runner.prefill(ids[:end], return_kv=True)
    return ChunkKV(torch.stack([k[:, start:end] for k, _ in kv]),
                   torch.stack([v[:, start:end] for _, v in kv]))


def setup(device, dtype_name: str, seed: int):
    """A tiny random model in the dtype, a prompt of prefix + two chunks + suffix, its spans."""
    runner = ModelRunner(random_model("tiny", device=str(device), dtype=torch_dtype(dtype_name)))
    torch.manual_seed(seed)
    ids = torch.randint(0, 1000, (PREFIX + 2 * CHUNK + SUFFIX,))
    return runner, ids, [(PREFIX, PREFIX + CHUNK), (PREFIX + CHUNK, PREFIX + 2 * CHUNK)]


def test_blend_at_ratio_one_equals_full_in_every_dtype(device, dtype_name):
    runner, ids, spans = setup(device, dtype_name, seed=3)
    dtype, total = runner.dtype, ids.shape[0]
    cached = [CachedSpan(0, entry(runner, ids, 0, PREFIX))]  # the exact prefix
    for start, end in spans:  # each chunk computed alone, then moved to its position
        cached.append(CachedSpan(start, entry(runner, ids[start:end], 0, end - start)))
    active = torch.arange(PREFIX, total)

    def run(plan):
        kv = RequestKV(runner.num_layers, runner.num_kv_heads, runner.head_dim, total,
                       device, dtype)
        return Fusor(runner).run(plan, kv), kv

    full, full_kv = run(FusionPlan(ids, torch.arange(total)))
    blend, blend_kv = run(FusionPlan(ids, active, cached, spans, [(1, HKVDSelector(1.0))]))
    assert blend.active_per_layer == [total - PREFIX] * runner.num_layers
    assert blend_kv.keys.dtype == dtype and blend.logits.dtype == torch.float32
    tolerance = TOLERANCE[dtype_name]
    assert max_relative_diff(blend.logits, full.logits, dtype_name) <= tolerance
    assert max_relative_diff(blend_kv.keys, full_kv.keys, dtype_name) <= tolerance
    assert max_relative_diff(blend_kv.values, full_kv.values, dtype_name) <= tolerance
    # And a real selection (ratio 0.15) runs in this dtype too: it differs, but stays close.
    partial, _ = run(FusionPlan(ids, active, cached, spans, [(1, HKVDSelector(0.15))]))
    assert partial.active_per_layer[-1] == SUFFIX + 9  # ceil(0.15 x 60)
    assert torch.isfinite(partial.logits).all()


def test_loading_modes_agree_in_every_dtype(device, dtype_name):
    """bulk, layer and prefetch (a side CUDA stream on CUDA, a thread on the CPU) load the same
    rows: entries stored fp16 on the host, and one already on the device (the gpu tier)."""
    runner, ids, spans = setup(device, dtype_name, seed=4)
    dtype, total = runner.dtype, ids.shape[0]

    def stored(kv: ChunkKV, on_device: bool) -> ChunkKV:
        place = device if on_device else "cpu"
        return ChunkKV(kv.keys.to(place, torch.float16), kv.values.to(place, torch.float16))

    cached = [CachedSpan(0, stored(entry(runner, ids, 0, PREFIX), True))]
    for start, end in spans:
        cached.append(CachedSpan(start, stored(entry(runner, ids[start:end], 0, CHUNK), False)))
    plan = FusionPlan(ids, torch.cat([torch.arange(s, e) for s, e in spans] +
                                     [torch.arange(total - SUFFIX, total)]),
                      cached, spans, [(1, HKVDSelector(0.15))])
    logits = {}
    for mode in ("bulk", "layer", "prefetch"):
        kv = RequestKV(runner.num_layers, runner.num_kv_heads, runner.head_dim, total,
                       device, dtype)
        result = Fusor(runner).run(plan, kv, mode)
        assert result.load_bytes == sum(s.source.nbytes for s in cached)  # every layer
        logits[mode] = result.logits
    assert torch.equal(logits["layer"], logits["prefetch"])
    assert max_relative_diff(logits["bulk"], logits["layer"], dtype_name) <= TOLERANCE[dtype_name]


@pytest.mark.cuda
def test_prefetch_uses_a_side_stream_on_cuda(device):
    from cacheblend.blend.loader import LayerLoader

    runner = ModelRunner(random_model("tiny", device=str(device), dtype=torch.bfloat16))
    source = ChunkKV(torch.zeros(runner.num_layers, runner.num_kv_heads, 8, runner.head_dim,
                                 dtype=torch.float16), torch.zeros(
        runner.num_layers, runner.num_kv_heads, 8, runner.head_dim, dtype=torch.float16))
    kv = RequestKV(runner.num_layers, runner.num_kv_heads, runner.head_dim, 8, device,
                   torch.bfloat16)
    loader = LayerLoader([CachedSpan(0, source)], runner.rope, kv, mode="prefetch")
    assert loader.stream is not None
    for index in range(runner.num_layers):
        loader.load(index, runner.num_layers)
    loader.close()
    assert loader.nbytes == source.nbytes and loader.seconds() > 0
    assert kv.keys.abs().sum().item() == 0


def test_prefetched_layers_never_overwrite_fresh_rows(device):
    """Without a prefix every cached row is recomputed before the check layer, so layers after
    it need no load, but one may already be prefetched: the fusor waits for it before writing
    fresh rows, so the result is the full prefill's."""
    runner = ModelRunner(random_model("tiny", device=str(device)))
    torch.manual_seed(5)
    total = 2 * CHUNK + SUFFIX
    ids = torch.randint(0, 1000, (total,))
    spans = [(0, CHUNK), (CHUNK, 2 * CHUNK)]


    class SlowSource:
        """A lazily decoded entry whose later layers arrive late (a slow tier)."""

        def __init__(self, kv: ChunkKV) -> None:
            self.kv, self.num_tokens = kv, kv.num_tokens

        def layer(self, index: int):
            if index > 1:
                time.sleep(0.2)  # the prefetch thread writes well after the compute moved on
            return self.kv.keys[index], self.kv.values[index]

    cached = [CachedSpan(s, SlowSource(entry(runner, ids[s:e], 0, e - s))) for s, e in spans]
    blend = FusionPlan(ids, torch.arange(total), cached, spans, [(1, HKVDSelector(1.0))])
    assert blend.recomputes_cached
    results = {}
    for name, plan, mode in (("full", FusionPlan(ids, torch.arange(total)), "bulk"),
                             ("prefetch", blend, "prefetch")):
        kv = RequestKV(runner.num_layers, runner.num_kv_heads, runner.head_dim, total, device)
        results[name] = (Fusor(runner).run(plan, kv, mode).logits, kv)
    assert (results["prefetch"][0] - results["full"][0]).abs().max().item() <= 1e-4
    assert (results["prefetch"][1].keys - results["full"][1].keys).abs().max().item() <= 1e-4

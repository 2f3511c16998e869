"""The fused prefill on a device whose values the host cannot read: every method and loading
mode must run through without a host sync (``int(tensor)``, ``.item()``, a boolean-mask index)
or a tensor left on the CPU, except the fusor's one marked ``host_sync`` after a check layer.

Where this torch build has CUDA, the run uses ``FakeTensorMode`` with fake ``cuda:0`` tensors:
mixing devices raises ``FakeTensorDeviceMismatchError`` and a value read raises. On a CPU-only
build, Python indexing of a fake CUDA tensor fails inside torch's own binding (``t[1:3]`` raises
"PyTorch is not linked with support for cuda devices": it takes a CUDA device guard), so there
the same run uses the ``meta`` device, where ``.item()`` and ``nonzero`` cannot be computed,
under ``OneDevice``, a dispatch mode that fails any op mixing devices other than an explicit
copy (meta itself lets a CPU tensor be indexed by meta indices, for one). The runner picks the
same sync-free attention backend for both (every device but the CPU).
"""

from __future__ import annotations

import contextlib
import math

import pytest
import torch
import transformers
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves

from cacheblend.blend import fusor as fusor_module
from cacheblend.blend.drift import DriftCorrection
from cacheblend.blend.fusor import FusionPlan, Fusor
from cacheblend.blend.loader import CachedSpan
from cacheblend.blend.select import (
    FirstKSelector,
    HKVDSelector,
    QueryAttentionSelector,
    QueryDeviationSelector,
    UnionSelector,
)
from cacheblend.kv import RequestKV
from cacheblend.model.attention import CUDAAttention
from cacheblend.model.random import shape_config
from cacheblend.model.runner import ModelRunner
from cacheblend.store.base import ChunkKV

PREFIX, SPANS, SUFFIX = 4, [(4, 24), (24, 50)], 10
TOTAL = SPANS[-1][1] + SUFFIX

DEVICES = ["meta", pytest.param("fake-cuda", marks=pytest.mark.skipif(
    not torch.backends.cuda.is_built(), reason="fake CUDA indexing needs a CUDA build of torch"))]


class DeviceMixError(RuntimeError):
    pass


class OneDevice(TorchDispatchMode):
    """Every op's tensors on one device, except explicit copies (``.to``, ``copy_``) and CPU
    scalars; and no value read back (``.item()``, ``int()``, ``nonzero``)."""

    COPIES = frozenset({torch.ops.aten._to_copy.default, torch.ops.aten.copy_.default})
    READS = frozenset({torch.ops.aten._local_scalar_dense.default, torch.ops.aten.nonzero.default})

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func in self.READS:
            raise DeviceMixError(f"{func}: a value read back to the host")
        if func not in self.COPIES:
            devices = {leaf.device for leaf in tree_leaves((args, kwargs))
                       if isinstance(leaf, torch.Tensor)
                       and not (leaf.device.type == "cpu" and leaf.dim() == 0)}
            if len(devices) > 1:
                raise DeviceMixError(f"{func} mixes devices {sorted(map(str, devices))}")
        return func(*args, **kwargs)


def no_host_device(kind: str):
    """(device, build mode, run mode): where tensors go, the mode to make them in, the mode to
    run the fusor in. Plans are built outside both: they are host data."""
    if kind == "meta":
        return torch.device("meta"), contextlib.nullcontext(), OneDevice()
    from torch._subclasses.fake_tensor import FakeTensorMode

    mode = FakeTensorMode(allow_non_fake_inputs=True)
    return torch.device("cuda:0"), mode, mode


def move_model(model: torch.nn.Module, device: torch.device) -> torch.nn.Module:
    """Parameters and buffers replaced one by one (``Module.to`` cannot swap fake tensors)."""
    for module in model.modules():
        for name, param in list(module._parameters.items()):
            if param is not None:
                module._parameters[name] = torch.nn.Parameter(param.detach().to(device),
                                                              requires_grad=False)
        for name, buffer in list(module._buffers.items()):
            if buffer is not None:
                module._buffers[name] = buffer.to(device)
    return model


def cached_spans(entry) -> list[CachedSpan]:
    """A cached prefix on the device (the ``gpu`` tier) and two chunks on the host (copied in
    by the loader)."""
    return [CachedSpan(0, entry(PREFIX, "device"))] + [
        CachedSpan(start, entry(end - start, "cpu")) for start, end in SPANS]


def plans(cached: list[CachedSpan]) -> dict[str, FusionPlan]:
    """The methods' plan shapes (host data, checked on the host at construction)."""
    ids = torch.randint(0, 1000, (TOTAL,))
    suffix = torch.arange(SPANS[-1][1], TOTAL)
    chunk_positions = torch.arange(SPANS[0][0], SPANS[-1][1])
    first_k = torch.cat([torch.arange(s, s + 3) for s, _ in SPANS])
    return {
        "full": FusionPlan(ids, torch.arange(TOTAL)),
        "prefix": FusionPlan(ids, torch.arange(PREFIX, TOTAL), cached[:1], SPANS, capture=True),
        "reuse": FusionPlan(ids, suffix, cached, SPANS),
        "epic": FusionPlan(ids, torch.cat([first_k, suffix]), cached, SPANS),
        "blend": FusionPlan(ids, torch.cat([chunk_positions, suffix]), cached, SPANS,
                            [(1, HKVDSelector(0.15))]),
        "blend-probed": FusionPlan(ids, torch.cat([chunk_positions, suffix]), cached, SPANS,
                                   [(0, QueryAttentionSelector(0.12))], probe_layers=99),
        "blend-qa-in-pass": FusionPlan(ids, torch.cat([chunk_positions, suffix]), cached, SPANS,
                                       [(1, QueryAttentionSelector(0.12))]),  # no probe
        "blend-tail-probed": FusionPlan(ids, torch.cat([chunk_positions, suffix]), cached, SPANS,
                                        [(0, QueryAttentionSelector(0.12))], probe_layers=99,
                                        probe_tokens=2),  # a long suffix: its last 2 tokens
        # The default's shape: two stages, drift correction (blend/drift.py) at every layer.
        "blend-default": FusionPlan(ids, torch.cat([chunk_positions, suffix]), cached, SPANS,
                                    [(0, QueryAttentionSelector(0.1725)),
                                     (2, QueryDeviationSelector(0.115))], deviation="kv",
                                    probe_layers=99, drift=(1.0, 0.5)),
        "blend-gradual": FusionPlan(ids, torch.cat([chunk_positions, suffix]), cached, SPANS,
                                    [(1, UnionSelector(HKVDSelector(0.3), FirstKSelector(2))),
                                     (2, HKVDSelector(0.15))]),
    }


@pytest.mark.parametrize("kind", DEVICES)
@pytest.mark.parametrize("loading", ["bulk", "layer", "prefetch"])
def test_fused_prefill_never_reads_the_device(kind, loading, monkeypatch):
    syncs = []

    def allowed_host_sync(value):  # the one marked read: answer what HKVD + first-k keep here
        syncs.append(value.shape)
        return SUFFIX + math.ceil(0.3 * (TOTAL - PREFIX - SUFFIX)) + 2

    monkeypatch.setattr(fusor_module, "host_sync", allowed_host_sync)
    corrections = []
    correct = DriftCorrection.correct
    monkeypatch.setattr(DriftCorrection, "correct",
                        lambda self, *args: corrections.append(1) or correct(self, *args))
    torch.manual_seed(0)
    config = shape_config("tiny")
    device, build_mode, run_mode = no_host_device(kind)
    with build_mode:
        model = transformers.AutoModelForCausalLM.from_config(config, dtype=torch.bfloat16)
        runner = ModelRunner(move_model(model, device))
        layers, heads, head_dim = runner.num_layers, runner.num_kv_heads, runner.head_dim

        def entry(n, where):
            shape = (layers, heads, n, head_dim)
            place = device if where == "device" else "cpu"
            return ChunkKV(torch.empty(shape, dtype=torch.float16, device=place),
                           torch.empty(shape, dtype=torch.float16, device=place))

        cached = cached_spans(entry)
    cases = plans(cached)
    assert isinstance(runner.attention, CUDAAttention)
    results = {}
    with run_mode:
        for name, plan in cases.items():
            kv = RequestKV(layers, heads, head_dim, TOTAL + 4, device, torch.bfloat16)
            results[name] = Fusor(runner).run(plan, kv, loading)
    for name, result in results.items():
        assert result.logits.device.type == device.type, name
        assert result.logits.shape == (config.vocab_size,), name
        assert result.computed.device.type == device.type, name
    assert results["blend"].active_per_layer[1:] == [SUFFIX + math.ceil(0.15 * 46)] * 3
    # The default's shape: a probe of every layer, then the last position's attention ranks at
    # layer 0, a fixed budget: no read either.
    assert results["blend-probed"].active_per_layer == [SUFFIX + math.ceil(0.12 * 46)] * layers
    assert len(corrections) == layers - 1  # the default's drift correction ran at every layer
    assert results["blend-default"].active_per_layer == (
        [SUFFIX + math.ceil(0.1725 * 46)] * 2 + [SUFFIX + math.ceil(0.115 * 46)] * (layers - 2))
    assert results["prefix"].captured is not None and len(results["prefix"].captured) == layers
    assert len(syncs) == 1  # only the union selector's check layer reads back, once


def test_a_selector_mask_left_on_the_cpu_is_caught():
    """The issue's original bug (a selector mask built without a device) fails here."""

    class CPUMaskSelector(HKVDSelector):
        def keep(self, candidates):  # the selector as it was before issue 10
            mask = torch.zeros(candidates.positions.shape[0], dtype=torch.bool)  # no device
            mask[torch.topk(candidates.deviation, 5).indices] = True
            return mask

    config = shape_config("tiny")
    model = move_model(transformers.AutoModelForCausalLM.from_config(config), torch.device("meta"))
    runner = ModelRunner(model)
    ids = torch.randint(0, 1000, (TOTAL,))
    plan = FusionPlan(ids, torch.arange(TOTAL), [], SPANS, [(1, CPUMaskSelector(0.1))])
    kv = RequestKV(runner.num_layers, runner.num_kv_heads, runner.head_dim, TOTAL, "meta")
    with pytest.raises(DeviceMixError, match="mixes devices"), OneDevice():
        Fusor(runner).run(plan, kv)

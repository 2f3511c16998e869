"""The runner equals transformers' own forward: tiny random configs of every family, and the
real bundled model at several lengths."""

from __future__ import annotations

import pytest
import torch
import transformers

from cacheblend.device import torch_dtype
from cacheblend.errors import UnsupportedModelError
from cacheblend.model.attention import CPUAttention, CUDAAttention
from cacheblend.model.runner import ModelRunner
from tests.conftest import TOLERANCE, max_relative_diff

TINY = {"vocab_size": 128, "hidden_size": 64, "intermediate_size": 96, "num_hidden_layers": 3,
            "num_attention_heads": 4, "num_key_value_heads": 2, "max_position_embeddings": 512,
            "rms_norm_eps": 1e-6}


def tiny_model(family: str, **extra):
    torch.manual_seed(0)
    config_class = {
        "llama": transformers.LlamaConfig,
        "mistral": transformers.MistralConfig,
        "qwen2": transformers.Qwen2Config,
        "qwen3": transformers.Qwen3Config,
    }[family]
    kwargs = dict(TINY, **extra)
    if family == "qwen3":
        kwargs.setdefault("head_dim", 16)
    config = config_class(**kwargs)
    config._attn_implementation = "sdpa"
    model = transformers.AutoModelForCausalLM.from_config(config, dtype=torch.float32).eval()
    with torch.no_grad():  # random biases and norms, so the test sees them
        for name, param in model.named_parameters():
            if name.endswith("bias") or "norm" in name:
                param.normal_(1.0 if "norm" in name else 0.0, 0.1)
    return model


def compare(model, length: int, num_logits: int | None = None) -> float:
    torch.manual_seed(1)
    ids = torch.randint(0, model.config.vocab_size, (length,))
    num_logits = num_logits or length
    with torch.inference_mode():
        expected = model(ids[None], logits_to_keep=num_logits).logits[0]
        runner = ModelRunner(model)
        got, _ = runner.prefill(ids, num_logits=num_logits)
    return (expected - got).abs().max().item()


@pytest.mark.parametrize("family", ["llama", "mistral", "qwen2", "qwen3"])
@pytest.mark.parametrize("length", [1, 9, 200])
def test_tiny_families_match_transformers(family, length):
    assert compare(tiny_model(family), length) <= 1e-4


@pytest.mark.parametrize("family", ["llama", "mistral", "qwen2", "qwen3"])
@pytest.mark.parametrize("length", [9, 200])
def test_tiny_families_match_transformers_in_every_dtype(family, length, device, dtype_name):
    """Runner and transformers' forward (SDPA) in the same dtype on the test device; bf16 and
    fp16 within the stated tolerance relative to the largest logit (tests/conftest.py)."""
    model = tiny_model(family).to(device=device, dtype=torch_dtype(dtype_name))
    torch.manual_seed(1)
    ids = torch.randint(0, model.config.vocab_size, (length,), device=device)
    with torch.inference_mode():
        expected = model(ids[None], logits_to_keep=length).logits[0]
        got, _ = ModelRunner(model).prefill(ids, num_logits=length)
    assert got.dtype == torch.float32 and got.device.type == device.type
    assert max_relative_diff(got, expected, dtype_name) <= TOLERANCE[dtype_name]


def test_attention_backends_agree():
    """The sync-free SDPA backend (CUDA and every non-CPU device) equals the CPU kernels, for
    tail and scattered queries (run here on CPU tensors)."""
    torch.manual_seed(0)
    keys, values = torch.randn(3, 200, 64), torch.randn(3, 200, 64)
    q = torch.randn(9, 70, 64)
    cpu, sdpa = CPUAttention(9, 3, 0.125), CUDAAttention(9, 3, 0.125)
    for kind, positions in (("tail", torch.arange(130, 200)),
                            ("scattered", torch.sort(torch.randperm(200)[:70]).values)):
        expected = cpu.attend(q, keys, values, cpu.layout(kind, positions, 200))
        got = sdpa.attend(q, keys, values, sdpa.layout(kind, positions, 200))
        assert (got - expected).abs().max().item() <= 1e-5, kind


@pytest.mark.parametrize("rope", [
    {"rope_type": "linear", "factor": 2.0},
    {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
     "original_max_position_embeddings": 64},
])
def test_rope_variants_match_transformers(rope):
    model = tiny_model("llama", rope_parameters={"rope_theta": 10000.0, **rope})
    assert compare(model, 300) <= 1e-4


def test_last_token_pruning_matches_transformers():
    model = tiny_model("qwen2")
    assert compare(model, 50, num_logits=1) <= 1e-4
    assert compare(model, 50, num_logits=7) <= 1e-4


def test_dynamic_rope_refused():
    model = tiny_model("llama", rope_parameters={"rope_theta": 10000.0, "rope_type": "dynamic",
                                                 "factor": 2.0})
    with pytest.raises(UnsupportedModelError, match="dynamic"):
        ModelRunner(model)


def test_unsupported_family_refused():
    config = transformers.GPT2Config(n_layer=1, n_embd=32, n_head=2, vocab_size=50)
    model = transformers.AutoModelForCausalLM.from_config(config)
    with pytest.raises(UnsupportedModelError, match="not supported"):
        ModelRunner(model)


def test_fused_weights_are_shared_not_copied():
    model = tiny_model("llama")
    runner = ModelRunner(model)
    q_proj = model.model.layers[0].self_attn.q_proj.weight
    assert q_proj.data_ptr() == runner.layers[0].qkv.data_ptr()


@pytest.mark.slow
@pytest.mark.parametrize("length", [16, 1000, 4096])
def test_real_model_matches_transformers(loaded_model, runner, length):
    torch.manual_seed(2)
    ids = torch.randint(0, loaded_model.model.config.vocab_size, (length,))
    with torch.inference_mode():
        expected = loaded_model.model(ids[None], logits_to_keep=32).logits[0]
        got, _ = runner.prefill(ids, num_logits=32)
    assert (expected - got).abs().max().item() <= 1e-4


def test_tail_attention_equals_masked_attention(runner):
    torch.manual_seed(0)
    keys, values = torch.randn(3, 200, 64), torch.randn(3, 200, 64)
    q = torch.randn(9, 70, 64)
    positions = torch.arange(130, 200)
    expected = runner.attend_at(q, keys, values, positions)
    assert (runner.attend_tail(q, keys, values) - expected).abs().max().item() <= 1e-5

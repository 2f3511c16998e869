"""Random-weight models of real models' shapes, built locally: benchmarks without a model hub.

``build_random_model("llama3-8b", device="cuda", dtype="bf16")`` gives a ``LoadedModel`` whose
transformers model has the named model's architecture and sizes (configs written out here from
the models' published config.json files) and random weights, with the bundled SmolLM2
tokenizer. Timing does not depend on the weights' values, so the engine and transformers' own
forward can be compared at a 7-8B shape on any GPU, offline.

The bundled tokenizer has 49,152 ids; a shape with a smaller vocabulary (mistral-7b: 32,768) is
widened to 49,152 so every id the tokenizer makes exists (noted in the shape's ``note``).
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass, field

import torch

from cacheblend.errors import ConfigError

TOKENIZER_VOCAB = 49152  # the bundled SmolLM2 tokenizer


@dataclass(frozen=True)
class Shape:
    family: str  # llama | mistral | qwen2
    config: dict = field(default_factory=dict)
    note: str = ""


SHAPES: dict[str, Shape] = {
    # meta-llama/Meta-Llama-3-8B
    "llama3-8b": Shape("llama", {
        "vocab_size": 128256, "hidden_size": 4096, "intermediate_size": 14336,
        "num_hidden_layers": 32, "num_attention_heads": 32, "num_key_value_heads": 8,
        "max_position_embeddings": 8192, "rope_theta": 500000.0, "rms_norm_eps": 1e-5,
        "tie_word_embeddings": False}),
    # Qwen/Qwen2.5-7B-Instruct (q/k/v biases; no sliding window)
    "qwen2.5-7b": Shape("qwen2", {
        "vocab_size": 152064, "hidden_size": 3584, "intermediate_size": 18944,
        "num_hidden_layers": 28, "num_attention_heads": 28, "num_key_value_heads": 4,
        "max_position_embeddings": 32768, "rope_theta": 1000000.0, "rms_norm_eps": 1e-6,
        "tie_word_embeddings": False, "use_sliding_window": False}),
    # mistralai/Mistral-7B-Instruct-v0.3 (no sliding window)
    "mistral-7b": Shape("mistral", {
        "vocab_size": TOKENIZER_VOCAB, "hidden_size": 4096, "intermediate_size": 14336,
        "num_hidden_layers": 32, "num_attention_heads": 32, "num_key_value_heads": 8,
        "max_position_embeddings": 32768, "rope_theta": 1000000.0, "rms_norm_eps": 1e-5,
        "tie_word_embeddings": False, "sliding_window": None},
        note="vocabulary widened from 32,768 to the bundled tokenizer's 49,152"),
    # HuggingFaceTB/SmolLM2-135M-Instruct: the bundled model's shape
    "smollm2-135m": Shape("llama", {
        "vocab_size": 49152, "hidden_size": 576, "intermediate_size": 1536,
        "num_hidden_layers": 30, "num_attention_heads": 9, "num_key_value_heads": 3,
        "max_position_embeddings": 8192, "rope_theta": 100000.0, "rms_norm_eps": 1e-5,
        "tie_word_embeddings": True}),
    # for tests: every code path of the runner in milliseconds on a CPU
    "tiny": Shape("llama", {
        "vocab_size": TOKENIZER_VOCAB, "hidden_size": 64, "intermediate_size": 128,
        "num_hidden_layers": 4, "num_attention_heads": 4, "num_key_value_heads": 2,
        "max_position_embeddings": 8192, "rope_theta": 10000.0, "rms_norm_eps": 1e-5,
        "tie_word_embeddings": True}),
}


def shape_config(name: str):
    """The transformers config object of a named shape (SDPA attention)."""
    import transformers

    if name not in SHAPES:
        raise ConfigError(f"unknown model shape {name!r}; known: {', '.join(SHAPES)}")
    shape = SHAPES[name]
    config_class = {"llama": transformers.LlamaConfig, "mistral": transformers.MistralConfig,
                    "qwen2": transformers.Qwen2Config}[shape.family]
    config = config_class(**shape.config)
    config._attn_implementation = "sdpa"
    return config


def random_model(name: str, device: str = "cpu", dtype: str | torch.dtype = torch.float32,
                 seed: int = 0) -> torch.nn.Module:
    """A transformers causal LM of shape ``name`` with random weights, built on ``device`` in
    ``dtype`` directly (no fp32 copy on the host: an 8B shape is 16 GB in bf16)."""
    import transformers

    from cacheblend.device import torch_dtype

    config = shape_config(name)
    torch.manual_seed(seed)
    with torch.device(device):
        model = transformers.AutoModelForCausalLM.from_config(config, dtype=torch_dtype(dtype))
    with torch.no_grad():  # std 0.02 normal everywhere (what transformers' init does), norms 1
        for param_name, param in model.named_parameters():
            if "norm" in param_name:
                param.fill_(1.0)
            else:  # weights and the q/k/v biases of qwen2
                param.normal_(0.0, 0.02)
    return model.eval()


def build_random_model(name: str, device: str = "cpu", dtype: str | torch.dtype = torch.float32,
                       seed: int = 0, home=None):
    """A ``LoadedModel`` of shape ``name`` with random weights and the bundled tokenizer."""
    from transformers import AutoTokenizer

    from cacheblend.device import dtype_name, torch_dtype
    from cacheblend.model.loader import LoadedModel, resolve_model_dir

    model = random_model(name, device, dtype, seed)
    tokenizer_dir, _ = resolve_model_dir(None, home)  # the bundled model's tokenizer files
    tokenizer = AutoTokenizer.from_pretrained(str(tokenizer_dir))
    # Distinct per shape, seed and dtype: entries of one random model never serve another.
    digest = hashlib.blake2b(f"random:{name}:{seed}:{dtype_name(torch_dtype(dtype))}".encode(),
                             digest_size=16)
    return LoadedModel(model=model, tokenizer=tokenizer, name=f"random-{name}",
                       fingerprint=digest.hexdigest(), path=tokenizer_dir)

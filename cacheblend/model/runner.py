"""A layer-wise forward over a transformers model's own weights.

The runner only computes: the caller (the fusor, the decode loop) owns the KV cache and decides
which tokens run at which layer. Supported: Llama, Mistral, Qwen2 (q/k/v bias), Qwen3 (q/k norm).
q/k/v and gate/up are fused into single matmuls; the HF modules keep views of the fused weights,
so no weight is stored twice and transformers' own forward stays usable for comparison.

The runner computes in the model's dtype (fp32 on the CPU, bf16 by default on CUDA) with
transformers' own precision rules: RMSNorm statistics in fp32, RoPE tables in fp32, softmax
statistics in fp32 inside the attention kernels; logits come back as fp32. Attention goes
through a device-specific backend (``cacheblend.model.attention``).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from cacheblend.errors import UnsupportedModelError
from cacheblend.model.attention import Attention, QueryLayout, attention_for
from cacheblend.model.rope import RopeTable


@dataclass
class LayerWeights:
    input_norm: torch.Tensor  # (D,)
    qkv: torch.Tensor  # (q_dim + 2 kv_dim, D)
    qkv_bias: torch.Tensor | None
    q_norm: torch.Tensor | None  # (head_dim,) Qwen3
    k_norm: torch.Tensor | None
    o_proj: torch.Tensor  # (D, q_dim)
    post_norm: torch.Tensor  # (D,)
    gate_up: torch.Tensor  # (2 I, D)
    down: torch.Tensor  # (D, I)


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """As transformers' LlamaRMSNorm: statistics in fp32, the product in the input's dtype."""
    if x.dtype == torch.float32:
        return weight * (x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps))
    wide = x.float()
    return weight * (wide * torch.rsqrt(wide.pow(2).mean(-1, keepdim=True) + eps)).to(x.dtype)


def _fuse(modules: list[torch.nn.Linear]) -> torch.Tensor:
    """Concatenate Linear weights and point each module at its slice of the result."""
    fused = torch.cat([m.weight.data for m in modules], dim=0).contiguous()
    start = 0
    for module in modules:
        rows = module.weight.shape[0]
        module.weight.data = fused[start : start + rows]
        start += rows
    return fused


def _max_positions(config) -> int:
    limit = config.max_position_embeddings
    window = getattr(config, "sliding_window", None)
    layer_types = getattr(config, "layer_types", None) or []
    uses_window = "sliding_attention" in layer_types or (
        config.model_type == "mistral" and window is not None
    )
    if uses_window and window:
        # Within the window, sliding attention equals full attention; beyond it we would differ.
        limit = min(limit, window)
    return limit


class ModelRunner:
    """Per-layer building blocks over one loaded model, on its device and in its dtype."""

    def __init__(self, hf_model: torch.nn.Module) -> None:
        config = hf_model.config
        self.config = config
        if config.model_type not in ("llama", "mistral", "qwen2", "qwen3"):
            raise UnsupportedModelError(f"model type {config.model_type!r} is not supported")
        if getattr(config, "hidden_act", "silu") != "silu":
            raise UnsupportedModelError(f"activation {config.hidden_act!r} is not supported")
        self.num_layers = config.num_hidden_layers
        self.num_heads = config.num_attention_heads
        self.num_kv_heads = config.num_key_value_heads
        self.hidden_size = config.hidden_size
        self.head_dim = getattr(config, "head_dim", None) or config.hidden_size // self.num_heads
        self.eps = config.rms_norm_eps
        self.max_positions = _max_positions(config)
        self.vocab_size = config.vocab_size
        base = hf_model.model
        self.device = base.embed_tokens.weight.device
        self.dtype = base.embed_tokens.weight.dtype
        self.embed_tokens = base.embed_tokens.weight  # (V, D)
        self.final_norm = base.norm.weight
        self.lm_head = hf_model.lm_head.weight  # (V, D), tied or not
        self.rope = RopeTable(base.rotary_emb, config, self.max_positions)
        self.layers = [self._layer_weights(layer) for layer in base.layers]
        self.q_dim = self.num_heads * self.head_dim
        self.kv_dim = self.num_kv_heads * self.head_dim
        self.scale = self.head_dim**-0.5
        self.attention: Attention = attention_for(self.device, self.num_heads, self.num_kv_heads,
                                                  self.scale, self.dtype)

    @staticmethod
    def _layer_weights(layer) -> LayerWeights:
        attn, mlp = layer.self_attn, layer.mlp
        projections = [attn.q_proj, attn.k_proj, attn.v_proj]
        bias = None
        if attn.q_proj.bias is not None:
            bias = torch.cat([p.bias.data for p in projections]).contiguous()
        if getattr(attn.o_proj, "bias", None) is not None or getattr(mlp.down_proj, "bias", None) is not None:
            raise UnsupportedModelError("o_proj / MLP biases are not supported")
        q_norm = getattr(attn, "q_norm", None)
        k_norm = getattr(attn, "k_norm", None)
        return LayerWeights(
            input_norm=layer.input_layernorm.weight,
            qkv=_fuse(projections),
            qkv_bias=bias,
            q_norm=q_norm.weight if q_norm is not None else None,
            k_norm=k_norm.weight if k_norm is not None else None,
            o_proj=attn.o_proj.weight,
            post_norm=layer.post_attention_layernorm.weight,
            gate_up=_fuse([mlp.gate_proj, mlp.up_proj]),
            down=mlp.down_proj.weight,
        )

    # --- the per-layer pieces the fusor drives -------------------------------------------------

    def embed(self, ids: torch.Tensor) -> torch.Tensor:
        """ids (n,) -> hidden (n, D)."""
        return self.embed_tokens[ids]

    def project_qkv(self, index: int, hidden: torch.Tensor):
        """hidden (n, D) -> q (H, n, hd), k (KV, n, hd), v (KV, n, hd); q and k before RoPE."""
        weights = self.layers[index]
        n = hidden.shape[0]
        x = rms_norm(hidden, weights.input_norm, self.eps)
        qkv = F.linear(x, weights.qkv, weights.qkv_bias)  # (n, q_dim + 2 kv_dim)
        q, k, v = qkv.split([self.q_dim, self.kv_dim, self.kv_dim], dim=-1)
        q = q.view(n, self.num_heads, self.head_dim)
        k = k.view(n, self.num_kv_heads, self.head_dim)
        if weights.q_norm is not None:
            q = rms_norm(q, weights.q_norm, self.eps)
            k = rms_norm(k, weights.k_norm, self.eps)
        v = v.view(n, self.num_kv_heads, self.head_dim)
        return q.transpose(0, 1), k.transpose(0, 1), v.transpose(0, 1)

    def attend(
        self,
        q: torch.Tensor,
        keys: torch.Tensor,
        values: torch.Tensor,
        mask: torch.Tensor | None = None,
        causal: bool = False,
    ) -> torch.Tensor:
        """q (H, n, hd) against keys/values (KV, T, hd) -> (H, n, hd).

        causal=True: queries are positions 0..n-1 and T == n (the fast path).
        mask (n, T) bool: True where a query may attend.
        Neither: every query sees every key (a decode step).
        """
        if causal:
            return self.attention.causal(q, keys, values)
        return self.attention.full(q, keys, values, mask)

    def attend_tail(self, q: torch.Tensor, keys: torch.Tensor, values: torch.Tensor) -> torch.Tensor:
        """Exact causal attention for the last n positions (n = q's length) against all T keys."""
        n, total = q.shape[1], keys.shape[1]
        positions = torch.arange(total - n, total, device=q.device)
        return self.attention.attend(q, keys, values,
                                     self.attention.layout("tail", positions, total))

    def attend_at(self, q: torch.Tensor, keys: torch.Tensor, values: torch.Tensor,
                  positions: torch.Tensor) -> torch.Tensor:
        """Exact causal attention for queries at sorted ``positions`` (n,): a query at p sees
        every key at position <= p."""
        layout = self.attention.layout("scattered", positions, keys.shape[1])
        return self.attention.attend(q, keys, values, layout)

    def attend_layout(self, q: torch.Tensor, keys: torch.Tensor, values: torch.Tensor,
                      layout: QueryLayout) -> torch.Tensor:
        """Attention for queries described by a layout built once (the fusor's per-layer call)."""
        return self.attention.attend(q, keys, values, layout)

    def finish_layer(self, index: int, hidden: torch.Tensor, attn: torch.Tensor) -> torch.Tensor:
        """Output projection, residual, MLP: hidden (n, D), attn (H, n, hd) -> hidden (n, D)."""
        weights = self.layers[index]
        n = hidden.shape[0]
        hidden = hidden + F.linear(attn.transpose(0, 1).reshape(n, self.q_dim), weights.o_proj)
        x = rms_norm(hidden, weights.post_norm, self.eps)
        gate, up = F.linear(x, weights.gate_up).chunk(2, dim=-1)
        return hidden + F.linear(F.silu(gate) * up, weights.down)

    def logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """hidden (n, D) -> logits (n, V), fp32 whatever the model's dtype."""
        return F.linear(rms_norm(hidden, self.final_norm, self.eps), self.lm_head).float()

    # --- convenience: a plain causal prefill from position 0 ----------------------------------

    @torch.inference_mode()
    def prefill(
        self, ids: torch.Tensor, return_kv: bool = False, num_logits: int = 1
    ) -> tuple[torch.Tensor, list[tuple[torch.Tensor, torch.Tensor]] | None]:
        """Full causal prefill of ids (n,) at positions 0..n-1.

        Returns logits (num_logits, V) for the last positions and, if asked, per-layer
        (K before RoPE, V), each (KV, n, hd).
        """
        ids = ids.to(self.device)
        n = ids.shape[0]
        if n > self.max_positions:
            raise ValueError(f"{n} tokens exceed the model's {self.max_positions} positions")
        num_logits = min(num_logits, n)
        hidden = self.embed(ids)
        kv = [] if return_kv else None
        last = self.num_layers - 1
        for index in range(self.num_layers):
            q, k, v = self.project_qkv(index, hidden)
            if kv is not None:
                kv.append((k, v))
            k = self.rope.apply_range(k, 0)
            if index == last and num_logits < n:
                # Only the last positions' outputs are read: their queries alone, masked.
                q = self.rope.apply_range(q[:, -num_logits:], n - num_logits)
                mask = None
                if num_logits > 1:
                    query_positions = torch.arange(n - num_logits, n, device=ids.device)
                    mask = torch.arange(n, device=ids.device)[None, :] <= query_positions[:, None]
                attn = self.attend(q, k, v, mask=mask)
                hidden = self.finish_layer(index, hidden[-num_logits:], attn)
            else:
                q = self.rope.apply_range(q, 0)
                hidden = self.finish_layer(index, hidden, self.attend(q, k, v, causal=True))
        return self.logits(hidden[-num_logits:]), kv

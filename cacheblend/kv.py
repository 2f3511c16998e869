"""The per-request KV cache: what the fusor fills and the decode loop extends."""

from __future__ import annotations

import torch


class RequestKV:
    """Per-layer keys (after RoPE) and values for one request, slot index == token position.

    keys, values: (num_layers, num_kv_heads, capacity, head_dim) in the engine's compute dtype
    (fp32 on the CPU, bf16 by default on CUDA), on the engine's device.
    """

    def __init__(self, num_layers: int, num_kv_heads: int, head_dim: int, capacity: int,
                 device: str | torch.device = "cpu", dtype: torch.dtype = torch.float32) -> None:
        shape = (num_layers, num_kv_heads, capacity, head_dim)
        self.keys = torch.empty(shape, dtype=dtype, device=device)
        self.values = torch.empty(shape, dtype=dtype, device=device)
        self.length = 0

    @property
    def capacity(self) -> int:
        return self.keys.shape[2]

    @property
    def dtype(self) -> torch.dtype:
        return self.keys.dtype

    @property
    def device(self) -> torch.device:
        return self.keys.device

    def layer(self, index: int, length: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """Views of one layer's first ``length`` (default: all valid) rows."""
        n = self.length if length is None else length
        return self.keys[index, :, :n], self.values[index, :, :n]

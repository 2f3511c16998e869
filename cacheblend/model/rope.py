"""Rotary position embeddings at arbitrary positions.

Keys are cached *before* RoPE, so moving a chunk to a new position is just applying RoPE at the
new positions. That is exact only when the rotation depends on the position alone; the variants
below do, and others (dynamic NTK, YaRN, LongRoPE) are refused.
"""

from __future__ import annotations

import torch

from cacheblend.errors import UnsupportedModelError

SUPPORTED_ROPE_TYPES = ("default", "linear", "llama3")


def rope_type_of(config) -> str:
    params = getattr(config, "rope_parameters", None) or getattr(config, "rope_scaling", None) or {}
    return params.get("rope_type", params.get("type", "default")) or "default"


class RopeTable:
    """cos/sin for every position up to ``max_positions``, computed once by the model's own
    rotary module (so every RoPE variant matches transformers exactly). The table stays fp32
    whatever the model's dtype: in bf16 a position like 8,000 has no exact angle, and cached
    keys are rotated once per use, so the rotation runs in fp32 and only its result is cast."""

    def __init__(self, rotary_module: torch.nn.Module, config, max_positions: int) -> None:
        rope_type = rope_type_of(config)
        if rope_type not in SUPPORTED_ROPE_TYPES:
            raise UnsupportedModelError(
                f"RoPE type {rope_type!r} depends on more than the position, so cached keys "
                f"cannot be moved exactly; supported: {', '.join(SUPPORTED_ROPE_TYPES)}"
            )
        inv_freq = rotary_module.inv_freq
        positions = torch.arange(max_positions, device=inv_freq.device)[None, :]
        probe = torch.zeros(1, device=inv_freq.device, dtype=torch.float32)
        with torch.no_grad():
            cos, sin = rotary_module(probe, positions)
        self.cos = cos[0].float().contiguous()  # (max_positions, head_dim)
        self.sin = sin[0].float().contiguous()  # (max_positions, head_dim)
        self.max_positions = max_positions

    def apply(self, x: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        """Rotate x (heads, n, head_dim) to ``positions`` (n,)."""
        return apply_rope(x, self.cos[positions], self.sin[positions])

    def apply_range(self, x: torch.Tensor, start: int) -> torch.Tensor:
        """Rotate x (heads, n, head_dim) to the contiguous positions start..start+n-1."""
        n = x.shape[-2]
        return apply_rope(x, self.cos[start : start + n], self.sin[start : start + n])

    def rotate_by_delta(self, x: torch.Tensor, delta: int) -> torch.Tensor:
        """Move keys already rotated to some positions by ``delta`` more positions: R(p+d) = R(d)R(p)."""
        n = x.shape[-2]
        index = (torch.full((n,), delta, dtype=torch.long, device=self.cos.device)
                 if delta >= 0 else None)
        if index is None:
            # Rotating by -d is the transpose: cos(-d) = cos d, sin(-d) = -sin d.
            cos, sin = self.cos[-delta].expand(n, -1), -self.sin[-delta].expand(n, -1)
            return apply_rope(x, cos, sin)
        return apply_rope(x, self.cos[index], self.sin[index])


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    half = x.shape[-1] // 2
    return torch.cat((-x[..., half:], x[..., :half]), dim=-1)


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """x: (heads, n, head_dim) of any float dtype; cos, sin: (n, head_dim) fp32. Computed in
    fp32, returned in x's dtype."""
    if x.dtype == torch.float32:
        return x * cos + rotate_half(x) * sin
    wide = x.float()
    return (wide * cos + rotate_half(wide) * sin).to(x.dtype)

"""A cached key moved to position p equals the key computed at p."""

from __future__ import annotations

import torch

from cacheblend.model.rope import apply_rope


def test_cached_key_moved_equals_fresh_key(runner):
    """Layer-0 keys depend on the token alone, so a chunk's key cached at one position and
    rotated to p must equal the key computed with the chunk really at p."""
    torch.manual_seed(0)
    chunk = torch.randint(0, runner.vocab_size, (40,))
    filler = torch.randint(0, runner.vocab_size, (123,))
    _, alone = runner.prefill(chunk, return_kv=True)  # cached: at positions 0..39
    _, placed = runner.prefill(torch.cat([filler, chunk]), return_kv=True)  # at 123..162
    cached_k, fresh_k = alone[0][0], placed[0][0][:, 123:]
    moved = runner.rope.apply_range(cached_k, 123)
    fresh = runner.rope.apply_range(fresh_k, 123)
    assert (moved - fresh).abs().max().item() <= 1e-5


def test_rotate_by_delta_equals_rotation_at_target(runner):
    torch.manual_seed(0)
    keys = torch.randn(3, 50, runner.head_dim)
    at_10 = runner.rope.apply_range(keys, 10)
    for delta in (0, 1, 517, 4000, -7):
        moved = runner.rope.rotate_by_delta(at_10, delta)
        expected = runner.rope.apply_range(keys, 10 + delta)
        # The table's angles are fp32 products position * frequency: their rounding grows with
        # the position (~4e3 * 6e-8 rad at 4K), so the tolerance does too.
        tolerance = 2e-5 + 1e-7 * abs(10 + delta)
        assert (moved - expected).abs().max().item() <= tolerance, delta


def test_rotation_preserves_norm(runner):
    keys = torch.randn(3, 20, runner.head_dim)
    positions = torch.arange(20) * 97
    rotated = runner.rope.apply(keys, positions)
    assert torch.allclose(rotated.norm(dim=-1), keys.norm(dim=-1), atol=1e-4)
    cos, sin = runner.rope.cos[positions], runner.rope.sin[positions]
    assert torch.equal(apply_rope(keys, cos, sin), rotated)

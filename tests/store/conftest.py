"""Fixtures for the store tests: small random entries and a session-wide Valkey server."""

from __future__ import annotations

import multiprocessing
import multiprocessing.pool
import uuid
from collections.abc import Callable, Iterator

import pytest
import torch

from cacheblend.store.base import ChunkKV

MODEL = "test-model-fingerprint"


def random_kv(
    seed: int = 0,
    layers: int = 4,
    heads: int = 3,
    tokens: int = 50,
    head_dim: int = 64,
    dtype: torch.dtype = torch.float16,
    model: str = MODEL,
) -> ChunkKV:
    """A small random entry: (layers, heads, tokens, head_dim) K and V in ``dtype``."""
    generator = torch.Generator().manual_seed(seed)
    shape = (layers, heads, tokens, head_dim)
    keys = torch.randn(shape, generator=generator).to(dtype)
    values = torch.randn(shape, generator=generator).to(dtype)
    return ChunkKV(keys, values, {"model": model, "seed": seed})


def assert_same_kv(got: ChunkKV, want: ChunkKV) -> None:
    assert got is not None
    assert torch.equal(got.keys.float(), want.keys.float())
    assert torch.equal(got.values.float(), want.values.float())


@pytest.fixture
def make_kv() -> Callable[..., ChunkKV]:
    return random_kv


@pytest.fixture
def same_kv() -> Callable[[ChunkKV, ChunkKV], None]:
    return assert_same_kv




@pytest.fixture
def redis_prefix() -> str:
    return f"test-{uuid.uuid4().hex[:8]}:"


@pytest.fixture(scope="session")
def spawn_pool() -> Iterator[multiprocessing.pool.Pool]:
    """Two fresh 'spawn' worker processes, shared by the multi-process tests (each start
    imports torch: seconds on this machine)."""
    with multiprocessing.get_context("spawn").Pool(2) as pool:
        yield pool

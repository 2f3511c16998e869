"""Shared fixtures: the raw data directory (tests skip without it) and one loaded model."""

from __future__ import annotations

import pytest
import torch

from cacheblend.errors import CacheBlendError


@pytest.fixture(autouse=True)
def one_torch_thread():
    """One intra-op thread: the 2 cores are shared, and 2 threads spinning against other
    processes make these tiny requests ~10x slower. Restored after each test."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="session")
def data_dir():
    from cacheblend.eval.datasets import find_data_dir

    try:
        return find_data_dir()
    except CacheBlendError:
        pytest.skip("no raw data directory (../shared/data/raw)")


@pytest.fixture(scope="session")
def loaded():
    from cacheblend.model.loader import load_model

    try:
        return load_model()
    except CacheBlendError as exc:
        pytest.skip(f"bundled model unavailable: {exc}")


@pytest.fixture
def engine(loaded):
    """A fresh engine (own memory store) around the shared model."""
    from cacheblend.config import EngineConfig
    from cacheblend.engine import Engine

    return Engine(EngineConfig(), loaded=loaded)

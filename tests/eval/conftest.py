"""Shared fixtures: the raw data directory (tests skip without it) and one loaded model."""

from __future__ import annotations

import pytest

from cacheblend.errors import CacheBlendError


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

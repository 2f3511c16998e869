"""Live servers over real HTTP on loopback: uvicorn in a background thread, one per session.

Every server shares the one loaded model (``loaded_model`` from the root conftest); each has
its own engine view and in-memory store unless a test passes its own.
"""

from __future__ import annotations

from collections.abc import Iterator

import httpx
import pytest

from cacheblend.engine import Engine
from cacheblend.server.background import BackgroundServer
from cacheblend.server.settings import ServerSettings
from tests.server.server_helpers import API_KEY, SEPARATOR, make_engine


@pytest.fixture(scope="session", autouse=True)
def _restore_torch_threads():
    """The server tests run engines with one thread; give the rest of the session its own."""
    import torch

    threads = torch.get_num_threads()
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="session")
def serve():
    """serve(engine, **settings) -> a started BackgroundServer, stopped at session end."""
    from cacheblend.server.app import create_app

    servers = []

    def start(engine: Engine, **settings) -> BackgroundServer:
        server = BackgroundServer(create_app(engine, ServerSettings(**settings))).start()
        servers.append(server)
        return server

    yield start
    for server in servers:
        server.stop()


@pytest.fixture(scope="session")
def live(loaded_model, serve) -> BackgroundServer:
    """The shared server: API key on, separator mode on, small limits."""
    engine = make_engine(loaded_model)
    return serve(
        engine,
        api_key=API_KEY,
        separator=SEPARATOR,
        max_tokens_limit=64,
        default_max_tokens=4,
        max_body_bytes=256 << 10,
        max_document_chars=16 << 10,
        max_documents_per_request=8,
    )


@pytest.fixture(scope="session")
def model_name(live) -> str:
    return live.app.state.engine.loaded.name


@pytest.fixture(scope="session")
def client(live):
    """The official OpenAI client against the shared server."""
    from openai import OpenAI

    return OpenAI(base_url=f"{live.url}/v1", api_key=API_KEY, max_retries=0, timeout=120)


@pytest.fixture(scope="session")
def http(live) -> Iterator[httpx.Client]:
    """A raw HTTP client with the key (for bad input the OpenAI client would refuse to send)."""
    with httpx.Client(
        base_url=live.url, headers={"Authorization": f"Bearer {API_KEY}"}, timeout=120
    ) as client:
        yield client


@pytest.fixture(scope="session")
def valkey(valkey_server):
    """The session's real Redis-compatible server (tests/conftest.py)."""
    return valkey_server

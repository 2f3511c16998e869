"""A store that cannot be written or reached: uploads fail with 503 and the reason, /health
says degraded, the start logs a warning, /metrics shows the tier unavailable; chats still run."""

from __future__ import annotations

import logging
import socket

import httpx
import pytest

from cacheblend.server.app import create_app
from cacheblend.server.background import BackgroundServer
from cacheblend.server.settings import ServerSettings
from cacheblend.store.disk import DiskStore
from cacheblend.store.memory import MemoryStore
from cacheblend.store.tiered import TieredStore
from tests.server.server_helpers import assert_error, make_engine
from tests.server.test_metrics import scrape, value


@pytest.fixture
def unwritable_store(tmp_path):
    blocker = tmp_path / "a-file"
    blocker.write_text("the store's parent is a file: nothing can be created under it")
    return TieredStore([MemoryStore(), DiskStore(blocker / "kv")]), str(blocker)


def start(engine, caplog) -> tuple[BackgroundServer, list[str]]:
    with caplog.at_level(logging.WARNING, logger="cacheblend.server.app"):
        app = create_app(engine, ServerSettings())
    warnings = [r.getMessage() for r in caplog.records if r.name == "cacheblend.server.app"]
    return BackgroundServer(app).start(), warnings


def test_unwritable_disk(loaded_model, unwritable_store, caplog):
    store, blocker = unwritable_store
    server, warnings = start(make_engine(loaded_model, store=store), caplog)
    try:
        assert any("store degraded" in w and blocker in w for w in warnings), warnings
        with httpx.Client(base_url=server.url, timeout=120) as http:
            health = http.get("/health").json()
            assert health["status"] == "degraded"
            assert len(health["problems"]) == 1 and blocker in health["problems"][0]
            upload = http.post("/v1/documents", json={"documents": ["Zorblat has a mill."]})
            error = assert_error(upload, 503, code="store_unavailable", param="documents[0]")
            assert "not writable" in error["message"]
            assert http.get("/v1/documents").json()["data"] == []  # not registered
            model = http.get("/v1/models").json()["data"][0]["id"]
            chat = http.post("/v1/chat/completions", json={
                "model": model, "max_tokens": 1, "messages": [{"role": "user", "content": "Hi"}]})
            assert chat.status_code == 200  # the system goes on, visibly degraded
            samples = scrape(http)
            assert value(samples, "cacheblend_store_available", tier="disk") == 0
            assert value(samples, "cacheblend_store_available", tier="memory") == 1
    finally:
        server.stop()


def test_dead_redis_tier(loaded_model, caplog):
    pytest.importorskip("redis")
    from cacheblend.store.redis_store import RedisStore

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        url = f"redis://127.0.0.1:{sock.getsockname()[1]}/0"
    store = TieredStore([MemoryStore(), RedisStore(url, socket_timeout=0.2)])
    server, warnings = start(make_engine(loaded_model, store=store), caplog)
    try:
        assert any("unreachable" in w and url in w for w in warnings), warnings
        with httpx.Client(base_url=server.url, timeout=120) as http:
            health = http.get("/health").json()
            assert health["status"] == "degraded" and url in health["problems"][0]
            upload = http.post("/v1/documents", json={"documents": ["Zorblat has a mill."]})
            assert upload.status_code == 503, upload.text
    finally:
        server.stop()


def test_healthy_store_is_ok(http):
    health = http.get("/health").json()
    assert health["status"] == "ok" and health["problems"] == []

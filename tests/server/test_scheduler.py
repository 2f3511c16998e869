"""A failure inside the worker fails only the requests it touches; the server keeps serving."""

from __future__ import annotations

import httpx
import pytest

import cacheblend.engine as engine_module
from tests.server.server_helpers import assert_error, make_engine


@pytest.fixture(scope="module")
def server(loaded_model, serve):
    engine = make_engine(loaded_model)
    return serve(engine, max_tokens_limit=8)


def chat(client, model, stream=False):
    body = {
        "model": model,
        "max_tokens": 3,
        "stream": stream,
        "messages": [{"role": "user", "content": "Say yes."}],
    }
    return client.post("/v1/chat/completions", json=body)


def test_prefill_bug_is_a_500_for_that_request_only(server, model_name, monkeypatch):
    engine = server.app.state.engine
    with httpx.Client(base_url=server.url, timeout=60) as client:
        monkeypatch.setattr(engine.planner, "plan", _raise)
        error = assert_error(chat(client, model_name), 500, code="internal_error")
        assert error["type"] == "server_error" and "boom" not in error["message"]
        monkeypatch.undo()
        assert chat(client, model_name).status_code == 200


def test_decode_bug_fails_the_batch_and_the_worker_goes_on(server, model_name, monkeypatch):
    with httpx.Client(base_url=server.url, timeout=60) as client:
        monkeypatch.setattr(engine_module, "decode_step", _raise)
        assert_error(chat(client, model_name), 500)
        streamed = chat(client, model_name, stream=True)  # headers sent: the error is an event
        assert streamed.status_code == 200
        assert '"error"' in streamed.text and streamed.text.endswith("data: [DONE]\n\n")
        monkeypatch.undo()
        assert chat(client, model_name).status_code == 200
        assert client.get("/health").json()["status"] == "ok"


def _raise(*args, **kwargs):
    raise RuntimeError("boom")

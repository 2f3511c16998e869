"""Bad input of every kind gets a 4xx with an OpenAI-style error body naming the problem."""

from __future__ import annotations

import httpx
import openai
import pytest

from tests.server.server_helpers import API_KEY, assert_error

CHAT = "/v1/chat/completions"
USER = [{"role": "user", "content": "Hi"}]


@pytest.fixture(scope="module")
def body(model_name):
    return lambda **fields: {"model": model_name, "messages": USER, "max_tokens": 2, **fields}


def test_malformed_json(http):
    for raw in (b"{bad", b'{"model": "x",}', b"", b"[1, 2", b"\xff\xfe"):
        response = http.post(CHAT, content=raw, headers={"content-type": "application/json"})
        assert response.status_code == 400, (raw, response.text)
        assert response.json()["error"]["type"] == "invalid_request_error"
    assert_error(
        http.post(CHAT, content=b"{bad", headers={"content-type": "application/json"}),
        400,
        code="invalid_json",
        match="not valid JSON",
    )
    assert_error(http.post(CHAT, content=b"hello", headers={"content-type": "text/plain"}), 400)
    assert_error(http.post(CHAT, json=[1, 2]), 400)


@pytest.mark.parametrize(
    "fields, param",
    [
        ({"model": 5}, "model"),
        ({"messages": "hi"}, "messages"),
        ({"messages": [{"role": "wizard", "content": "hi"}]}, "messages[0].role"),
        ({"messages": [{"role": "user", "content": 5}]}, "messages[0].content"),
        ({"messages": [{"content": "hi"}]}, "messages[0].role"),
        ({"max_tokens": "5"}, "max_tokens"),
        ({"temperature": "hot"}, "temperature"),
        ({"stream": "yes"}, "stream"),
        ({"stop": 5}, "stop"),
        ({"documents": "one doc"}, "documents"),
        ({"documents": [5]}, "documents[0]"),
        ({"cacheblend": {"method": "magic"}}, "cacheblend.method"),
        ({"cacheblend": {"ratio": "lots"}}, "cacheblend.ratio"),
        ({"cacheblend": {"methdo": "blend"}}, "cacheblend.methdo"),
    ],
)
def test_wrong_types(http, body, fields, param):
    error = assert_error(http.post(CHAT, json=body(**fields)), 400)
    assert error["param"] is not None and error["param"].startswith(param), error


@pytest.mark.parametrize(
    "fields, param",
    [
        ({"messages": []}, "messages"),
        ({"messages": None}, "messages"),
        ({"messages": [{"role": "system", "content": "Be brief."}]}, "messages"),
    ],
)
def test_empty_or_missing_messages(http, body, fields, param):
    request = body(**fields)
    if fields["messages"] is None:
        del request["messages"]
    assert_error(http.post(CHAT, json=request), 400, param=param)


def test_missing_model_and_body(http):
    assert_error(http.post(CHAT, json={"messages": USER}), 400, param="model")
    assert_error(http.post(CHAT), 400)


@pytest.mark.parametrize(
    "fields, param",
    [
        ({"temperature": -1}, "temperature"),
        ({"temperature": 2.5}, "temperature"),
        ({"top_p": 0}, "top_p"),
        ({"top_p": 1.5}, "top_p"),
        ({"top_k": -1}, "top_k"),
        ({"min_tokens": -1}, "min_tokens"),
        ({"min_tokens": 9, "max_tokens": 4}, "min_tokens"),
        ({"max_tokens": 0}, "max_tokens"),
        ({"max_tokens": -5}, "max_tokens"),
        ({"max_tokens": 10**9}, "max_tokens"),
        ({"max_completion_tokens": 0}, "max_completion_tokens"),
        ({"n": 17}, "n"),
        ({"n": 0}, "n"),
        ({"seed": 2**70}, "seed"),
        ({"stop": ["a", "b", "c", "d", "e"]}, None),
        ({"stop": [""]}, None),
        ({"presence_penalty": 2.5}, "presence_penalty"),
        ({"frequency_penalty": -2.5}, "frequency_penalty"),
        ({"repetition_penalty": 0}, "repetition_penalty"),
        ({"logit_bias": {"hello": 5}}, "logit_bias"),
        ({"logit_bias": {"10": 101}}, "logit_bias"),
        ({"logit_bias": {"999999999": 1}}, "logit_bias"),
        ({"top_logprobs": 2}, "top_logprobs"),
        ({"logprobs": True, "top_logprobs": 21}, "top_logprobs"),
        ({"cacheblend": {"ratio": 1.5}}, "cacheblend.ratio"),
        ({"cacheblend": {"ratio": -0.1}}, "cacheblend.ratio"),
    ],
)
def test_invalid_sampling_values(http, body, fields, param):
    error = assert_error(http.post(CHAT, json=body(**fields)), 400)
    if param is not None:
        assert error["param"] == param, error
    else:
        assert "stop" in error["message"], error


def test_nan_and_infinity_are_refused(http, model_name):
    raw = (
        f'{{"model": "{model_name}", "messages": [{{"role": "user", "content": "Hi"}}], '
        '"temperature": NaN}'
    ).encode()
    assert_error(
        http.post(CHAT, content=raw, headers={"content-type": "application/json"}),
        400,
        param="temperature",
    )


def test_unknown_model(http, body, client):
    assert_error(
        http.post(CHAT, json=body(model="gpt-4")),
        404,
        param="model",
        code="model_not_found",
        match="gpt-4",
    )
    with pytest.raises(openai.NotFoundError):
        client.completions.create(model="gpt-4", prompt="Hi", max_tokens=1)


def test_prompt_longer_than_the_model(http, body, model_name):
    long_text = "hello " * 9000
    error = assert_error(
        http.post(CHAT, json=body(messages=[{"role": "user", "content": long_text}])), 400
    )
    assert "tokens" in error["message"]
    assert_error(
        http.post(
            "/v1/completions", json={"model": model_name, "prompt": long_text, "max_tokens": 1}
        ),
        400,
        match="tokens",
    )
    assert_error(
        http.post(
            "/v1/completions",
            json={
                "model": model_name,
                "prompt": "x",
                "max_tokens": 1,
                "stream": True,
                "documents": ["hello " * 2000] * 5,
            },
        ),
        400,
        match="tokens",
    )  # a stream fails before it starts
    dense = "".join(chr(0x4E00 + i % 20000) for i in range(9000))  # several tokens a character
    assert_error(
        http.post("/v1/documents", json={"documents": [dense]}),
        400,
        param="documents[0]",
        code="document_too_long",
    )


def test_body_over_the_limit(http, body):
    big = body(messages=[{"role": "user", "content": "x" * (300 << 10)}])
    assert_error(http.post(CHAT, json=big), 413, code="body_too_large")

    def chunks():  # no Content-Length: counted while read
        yield b'{"model": "m", "messages": [{"role": "user", "content": "'
        for _ in range(400):
            yield b"x" * 1024
        yield b'"}]}'

    assert_error(
        http.post(CHAT, content=chunks(), headers={"content-type": "application/json"}), 413
    )


def test_document_limits(http, body):
    assert_error(http.post(CHAT, json=body(documents=["d"] * 9)), 413, param="documents")
    assert_error(
        http.post(CHAT, json=body(documents=["y" * (17 << 10)])),
        413,
        param="documents[0]",
        code="document_too_large",
    )
    assert_error(http.post(CHAT, json=body(documents=["  "])), 400, param="documents[0]")
    assert_error(http.post("/v1/documents", json={"documents": []}), 400, param="documents")
    assert_error(http.post("/v1/documents", json={"documents": ["y" * (17 << 10)]}), 413)


def test_unknown_or_invalid_document_id(http, body):
    assert_error(
        http.post(CHAT, json=body(documents=[{"id": "never-uploaded"}])),
        404,
        param="documents[0].id",
        code="document_not_found",
        match="never-uploaded",
    )
    assert_error(
        http.post(CHAT, json=body(documents=[{"id": "../etc/passwd"}])),
        400,
        param="documents[0].id",
        match="pattern",
    )
    assert_error(
        http.post(CHAT, json=body(documents=[{}])),
        400,
        param="documents[0]",
        match="needs an id or a text",
    )
    assert_error(http.delete("/v1/documents/never-uploaded"), 404, code="document_not_found")
    assert_error(http.delete("/v1/documents/bad$id"), 400, param="document_id")


def test_separator_and_documents_together(http, body):
    messages = [{"role": "user", "content": "a # # b # # c"}]
    assert_error(
        http.post(CHAT, json=body(messages=messages, documents=["d"])), 400, param="documents"
    )


def test_completion_specific(http, model_name):
    request = {"model": model_name, "max_tokens": 1}
    assert_error(
        http.post("/v1/completions", json={**request, "prompt": [[1, 2], [10**9]]}),
        400,
        param="prompt[1]",
    )
    assert_error(http.post("/v1/completions", json={**request, "prompt": []}), 400)
    assert_error(
        http.post("/v1/completions", json={**request, "prompt": [10**9]}), 400, param="prompt"
    )
    assert_error(http.post("/v1/completions", json={**request, "prompt": ""}), 400, match="empty")
    assert_error(
        http.post("/v1/completions", json={**request, "prompt": "a", "echo": True}),
        400,
        param="echo",
    )
    assert_error(http.post("/v1/completions", json={"model": model_name}), 400, param="prompt")


def test_unknown_route_and_method(http):
    assert_error(http.get("/v1/nothing"), 404)
    assert_error(http.get(CHAT), 405)


def test_api_key_required(live, http):
    with httpx.Client(base_url=live.url, timeout=30) as anonymous:
        assert anonymous.get("/health").status_code == 200
        for method, path in [
            ("GET", "/v1/models"),
            ("POST", CHAT),
            ("POST", "/v1/completions"),
            ("POST", "/v1/documents"),
            ("DELETE", "/v1/documents/x"),
            ("GET", "/metrics"),
            ("GET", "/openapi.json"),
            ("GET", "/nothing"),
        ]:
            response = anonymous.request(method, path, json={})
            assert_error(response, 401, code="invalid_api_key")
            wrong = anonymous.request(method, path, headers={"Authorization": "Bearer nope"})
            assert_error(wrong, 401, code="invalid_api_key")
        raw = anonymous.get("/v1/models", headers={"Authorization": API_KEY})  # no "Bearer"
        assert raw.status_code == 401
    assert http.get("/v1/models").status_code == 200


def test_api_key_with_openai_client(live, model_name):
    from openai import OpenAI

    wrong = OpenAI(base_url=f"{live.url}/v1", api_key="wrong", max_retries=0)
    with pytest.raises(openai.AuthenticationError):
        wrong.models.list()

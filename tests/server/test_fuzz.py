"""Fuzz the request schema (hypothesis, bounded): the field names come from the app's own OpenAPI
spec, the values are plausible, wrong-typed or arbitrary JSON, plus raw bytes. Whatever
arrives: no 5xx, every error is an OpenAI-style body, and the server stays up."""

from __future__ import annotations

import json
from urllib.parse import quote

import httpx
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from cacheblend.config import METHODS
from tests.server.server_helpers import API_KEY, HEADERS, make_engine

BUDGET = settings(
    max_examples=70,
    deadline=None,
    derandomize=True,
    database=None,
    suppress_health_check=list(HealthCheck),
)

leaf = st.none() | st.booleans() | st.integers(-(2**70), 2**70) | st.floats() | st.text(max_size=12)
anything = st.recursive(
    leaf,
    lambda inner: (
        st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=6), inner, max_size=3)
    ),
    max_leaves=8,
)
short_text = st.text(max_size=40)
part = st.fixed_dictionaries({"type": st.sampled_from(["text", "image_url"]), "text": short_text})
message = st.fixed_dictionaries(
    {"role": st.sampled_from(["user", "system", "assistant", "developer", "tool"])},
    optional={"content": short_text | st.lists(part, max_size=2) | anything, "name": anything},
)
document = short_text | st.fixed_dictionaries(
    {},
    optional={
        "id": st.from_regex(r"\A[A-Za-z0-9][A-Za-z0-9._:-]{0,8}\Z") | short_text,
        "text": short_text,
        "extra": anything,
    },
)


def plausible(model: str) -> dict[str, st.SearchStrategy]:
    """Values for the fields the spec names: mostly near the valid range, some just outside."""
    return {
        "model": st.sampled_from([model, model, "gpt-4", ""]),
        "messages": st.lists(message, max_size=3),
        "prompt": short_text
        | st.lists(st.integers(-5, 60000), max_size=4)
        | st.lists(short_text, max_size=2),
        "max_tokens": st.integers(-2, 3),
        "max_completion_tokens": st.integers(-1, 3),
        "temperature": st.floats(-1, 3),
        "top_p": st.floats(-0.5, 1.5),
        "top_k": st.integers(-2, 50),
        "seed": st.integers(-(2**65), 2**65),
        "stop": short_text | st.lists(st.text(max_size=3), max_size=5),
        "n": st.integers(0, 3),
        "stream": st.booleans(),
        "stream_options": st.fixed_dictionaries({}, optional={"include_usage": anything}),
        "documents": st.lists(document, max_size=3),
        "cacheblend": st.fixed_dictionaries(
            {},
            optional={
                "method": st.sampled_from([*METHODS, "magic"]),
                "ratio": st.floats(-0.5, 1.5),
            },
        ),
    }


some_text = st.text(min_size=1, max_size=40).filter(str.strip)
sampling = {
    "max_tokens": st.integers(1, 2),
    "temperature": st.floats(0, 2),
    "top_p": st.floats(0.01, 1),
    "top_k": st.integers(0, 20),
    "seed": st.integers(0, 2**32),
    "stop": st.lists(st.text(min_size=1, max_size=3), max_size=2),
    "stream": st.booleans(),
    "stream_options": st.fixed_dictionaries({"include_usage": st.booleans()}),
    "documents": st.lists(some_text | st.fixed_dictionaries({"text": some_text}), max_size=2),
    "cacheblend": st.fixed_dictionaries(
        {}, optional={"method": st.sampled_from(METHODS), "ratio": st.floats(0, 1)}
    ),
}


def valid(model: str, path: str) -> st.SearchStrategy[dict]:
    """Requests the server should serve (200), to reach the deep paths too."""
    if path == "/v1/documents":
        return st.fixed_dictionaries({"documents": st.lists(some_text, min_size=1, max_size=2)})
    if path == "/v1/completions":
        prompt = some_text | st.lists(st.integers(0, 49151), min_size=1, max_size=4)
        return st.fixed_dictionaries({"model": st.just(model), "prompt": prompt}, optional=sampling)
    turn = st.fixed_dictionaries(
        {"role": st.sampled_from(["system", "assistant"]), "content": short_text}
    )
    user = st.fixed_dictionaries({"role": st.just("user"), "content": short_text})
    messages = st.tuples(st.lists(turn, max_size=2), user).map(lambda t: [*t[0], t[1]])
    return st.fixed_dictionaries({"model": st.just(model), "messages": messages}, optional=sampling)


def body_properties(spec: dict, path: str, method: str = "post") -> list[str]:
    schema = spec["paths"][path][method]["requestBody"]["content"]["application/json"]["schema"]
    name = schema["$ref"].rsplit("/", 1)[-1]
    return sorted(spec["components"]["schemas"][name]["properties"])


@pytest.fixture(scope="module")
def fuzz_server(loaded_model, serve):
    """Its own server: at most 2 tokens per request, so valid examples stay fast."""
    return serve(
        make_engine(loaded_model),
        api_key=API_KEY,
        separator=" # # ",
        max_tokens_limit=2,
        default_max_tokens=2,
        max_body_bytes=64 << 10,
    )


@pytest.fixture(scope="module")
def fuzz(fuzz_server, model_name):
    with httpx.Client(base_url=fuzz_server.url, headers=HEADERS, timeout=60) as client:
        spec = client.get("/openapi.json").json()
        yield client, spec, (model_name, plausible(model_name))
    with httpx.Client(base_url=fuzz_server.url, timeout=10) as client:
        assert client.get("/health").json()["status"] == "ok"  # still up


def check(response: httpx.Response) -> None:
    assert response.status_code < 500, (response.status_code, response.text[:500])
    if response.status_code >= 400:
        error = response.json()["error"]
        assert isinstance(error["message"], str) and error["type"], error
        return
    if response.headers["content-type"].startswith("text/event-stream"):
        events = [line[6:] for line in response.text.splitlines() if line.startswith("data: ")]
        assert events[-1] == "[DONE]", events[-3:]
        for event in events[:-1]:
            assert "error" not in json.loads(event), event
    else:
        response.json()


def bodies(fuzz_data, path: str) -> st.SearchStrategy:
    """A third each: valid; valid with one spec field replaced; any subset of spec fields with
    plausible or arbitrary values (or arbitrary JSON altogether)."""
    _, spec, (model, values) = fuzz_data
    names = body_properties(spec, path)
    wild = {name: values.get(name, anything) | anything for name in names}
    good = valid(model, path)
    mutated = st.tuples(good, st.sampled_from(names)).flatmap(
        lambda pair: wild[pair[1]].map(lambda value: {**pair[0], pair[1]: value})
    )
    return good | mutated | st.fixed_dictionaries({}, optional=wild) | anything


@pytest.mark.parametrize("path", ["/v1/chat/completions", "/v1/completions", "/v1/documents"])
def test_fuzz_post_bodies(fuzz, path):
    client = fuzz[0]

    @BUDGET
    @given(body=bodies(fuzz, path))
    def run(body):
        check(
            client.post(
                path,
                content=json.dumps(body).encode(),
                headers={"content-type": "application/json"},
            )
        )

    run()


@settings(
    max_examples=40,
    deadline=None,
    derandomize=True,
    database=None,
    suppress_health_check=list(HealthCheck),
)
@given(
    raw=st.binary(max_size=200),
    path=st.sampled_from(["/v1/chat/completions", "/v1/completions", "/v1/documents"]),
    content_type=st.sampled_from(
        ["application/json", "text/plain", "", "application/x-www-form-urlencoded"]
    ),
)
def test_fuzz_raw_bytes(fuzz, raw, path, content_type):
    check(fuzz[0].post(path, content=raw, headers={"content-type": content_type}))


@settings(
    max_examples=30,
    deadline=None,
    derandomize=True,
    database=None,
    suppress_health_check=list(HealthCheck),
)
@given(doc_id=st.text(max_size=140))
def test_fuzz_document_ids(fuzz, doc_id):
    response = fuzz[0].delete("/v1/documents/" + quote(doc_id, safe=""))
    assert response.status_code < 500, response.text

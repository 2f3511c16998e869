"""OpenAI / vLLM options beyond the basics, through the official `openai` client: logprobs,
n, penalties, logit_bias, batched prompts, cached tokens, documents listing, tokenizer
endpoints, model aliases; and every unsupported option refused by name."""

from __future__ import annotations

import math

import openai
import pytest

from tests.server.server_helpers import DOCS, assert_error

CHAT = "/v1/chat/completions"
HF_ID = "HuggingFaceTB/SmolLM2-135M-Instruct"


def ask(client, model, content="Name three fruits.", **kwargs):
    kwargs.setdefault("max_tokens", 4)
    return client.chat.completions.create(
        model=model, messages=[{"role": "user", "content": content}], **kwargs
    )


def test_chat_logprobs(client, model_name):
    response = ask(client, model_name, logprobs=True, top_logprobs=3)
    choice = response.choices[0]
    entries = choice.logprobs.content
    assert len(entries) == response.usage.completion_tokens
    assert "".join(e.token for e in entries) == choice.message.content
    for entry in entries:
        assert entry.logprob <= 0 and len(entry.top_logprobs) == 3
        assert bytes(entry.bytes).decode() == entry.token
        tops = [t.logprob for t in entry.top_logprobs]
        assert tops == sorted(tops, reverse=True)
        assert entry.top_logprobs[0].token == entry.token  # greedy: the most likely one
        assert entry.logprob == pytest.approx(tops[0])
    assert ask(client, model_name).choices[0].logprobs is None  # only when asked


def test_chat_logprobs_stream_match(client, model_name):
    whole = ask(client, model_name, logprobs=True, top_logprobs=1)
    chunks = list(ask(client, model_name, logprobs=True, top_logprobs=1, stream=True))
    streamed = [e for c in chunks if c.choices and c.choices[0].logprobs
                for e in c.choices[0].logprobs.content]
    assert [e.token for e in streamed] == [e.token for e in whole.choices[0].logprobs.content]
    assert [e.logprob for e in streamed] == pytest.approx(
        [e.logprob for e in whole.choices[0].logprobs.content], abs=1e-4
    )


def test_completion_logprobs(client, model_name):
    response = client.completions.create(
        model=model_name, prompt="The capital of France is", max_tokens=4, logprobs=2
    )
    logprobs = response.choices[0].logprobs
    assert "".join(logprobs.tokens) == response.choices[0].text
    assert logprobs.text_offset[0] == 0
    assert logprobs.text_offset[1] == len(logprobs.tokens[0])
    for token, logprob, top in zip(logprobs.tokens, logprobs.token_logprobs,
                                   logprobs.top_logprobs):
        assert math.isfinite(logprob) and logprob <= 0
        assert token in top and len(top) <= 3  # the top 2 and the sampled token
    parts = list(client.completions.create(
        model=model_name, prompt="The capital of France is", max_tokens=4, logprobs=2,
        stream=True,
    ))
    streamed = [t for p in parts if p.choices[0].logprobs for t in p.choices[0].logprobs.tokens]
    assert streamed == logprobs.tokens


def test_n_choices_seeded(client, model_name):
    kwargs = {"n": 3, "temperature": 1.0, "seed": 11, "max_tokens": 6}
    first = ask(client, model_name, "Tell me a word.", **kwargs)
    again = ask(client, model_name, "Tell me a word.", **kwargs)
    assert [c.index for c in first.choices] == [0, 1, 2]
    texts = [c.message.content for c in first.choices]
    assert texts == [c.message.content for c in again.choices]  # seed + i per choice
    assert len(set(texts)) > 1  # the choices are not one sample repeated
    single = ask(client, model_name, "Tell me a word.", temperature=1.0, seed=12, max_tokens=6)
    assert single.choices[0].message.content == texts[1]  # choice 1 used seed 11 + 1
    usage = first.usage
    assert usage.prompt_tokens == single.usage.prompt_tokens  # the prompt counted once
    assert usage.completion_tokens == sum(
        s["completion_tokens"] for s in first.model_extra["cacheblend"]["choices"]
    )
    chunks = list(ask(client, model_name, "Tell me a word.", stream=True, **kwargs))
    streamed = {i: "" for i in range(3)}
    for chunk in chunks:
        for choice in chunk.choices:
            streamed[choice.index] += choice.delta.content or ""
    assert list(streamed.values()) == texts
    finished = [c.choices[0].index for c in chunks if c.choices and c.choices[0].finish_reason]
    assert sorted(finished) == [0, 1, 2]


def test_batched_completion_prompts(client, model_name):
    prompts = ["The sky is", "Two plus two is"]
    batch = client.completions.create(model=model_name, prompt=prompts, max_tokens=3, n=2)
    alone = [client.completions.create(model=model_name, prompt=p, max_tokens=3) for p in prompts]
    assert [c.index for c in batch.choices] == [0, 1, 2, 3]
    assert [c.text for c in batch.choices] == [alone[0].choices[0].text] * 2 + [
        alone[1].choices[0].text
    ] * 2  # greedy: vLLM's order, n per prompt
    assert batch.usage.prompt_tokens == sum(a.usage.prompt_tokens for a in alone)
    ids = client.completions.create(model=model_name, prompt=[[504, 6660], [314]], max_tokens=1)
    assert len(ids.choices) == 2 and ids.usage.prompt_tokens == 3


def test_logit_bias_changes_the_answer(client, model_name, http):
    plain = client.completions.create(model=model_name, prompt="Hello", max_tokens=3)
    token = http.post("/tokenize", json={"prompt": " banana"}).json()["tokens"][0]
    biased = client.completions.create(
        model=model_name, prompt="Hello", max_tokens=3, logit_bias={str(token): 100}
    )
    assert plain.choices[0].text != biased.choices[0].text
    assert biased.choices[0].text.startswith(" banana")


def test_penalties_change_the_answer(client, model_name):
    prompt = "Repeat after me: cat cat cat cat cat cat"
    plain = ask(client, model_name, prompt, max_tokens=12).choices[0].message.content
    for options in ({"frequency_penalty": 2.0}, {"presence_penalty": 2.0},
                    {"extra_body": {"repetition_penalty": 1.8}}):
        other = ask(client, model_name, prompt, max_tokens=12, **options).choices[0]
        assert other.message.content != plain, options


def test_cached_tokens_in_usage(client, model_name):
    docs = [f"{doc} (Volume {i}.)" for i, doc in enumerate(DOCS)]
    extra = {"documents": docs}
    ask(client, model_name, "Who is the mayor?", extra_body=extra)
    ask(client, model_name, "Who is the mayor?", extra_body=extra)
    again = ask(client, model_name, "Who is the mayor?", extra_body=extra)
    stats = again.model_extra["cacheblend"]
    assert stats["missed_tokens"] == 0 and stats["reused_tokens"] > 0
    assert again.usage.prompt_tokens_details.cached_tokens == stats["reused_tokens"]


def test_documents_list_and_get(http):
    text = "The Ambel ferry runs twice a day from the Lake of Mirrors to Zorblat."
    uploaded = http.post("/v1/documents", json={"documents": [{"id": "ferry-1", "text": text}]})
    assert uploaded.status_code == 200, uploaded.text
    listing = http.get("/v1/documents").json()
    assert listing["object"] == "list"
    entry = next(d for d in listing["data"] if d["id"] == "ferry-1")
    assert entry["cached"] is True and entry["num_tokens"] == uploaded.json()["data"][0][
        "num_tokens"]
    one = http.get("/v1/documents/ferry-1").json()
    assert one == {**entry, "text": text}
    assert_error(http.get("/v1/documents/not-there"), 404, code="document_not_found")
    http.delete("/v1/documents/ferry-1")
    assert "ferry-1" not in [d["id"] for d in http.get("/v1/documents").json()["data"]]


def test_tokenize_and_detokenize(http, client, model_name):
    tokens = http.post("/tokenize", json={"model": model_name, "prompt": "Hello world"}).json()
    assert tokens["count"] == len(tokens["tokens"]) == 2 and tokens["max_model_len"] > 1000
    text = http.post("/detokenize", json={"model": model_name, "tokens": tokens["tokens"]})
    assert text.json() == {"prompt": "Hello world"}
    messages = [{"role": "user", "content": "Hi there"}]
    chat = http.post("/tokenize", json={"messages": messages}).json()
    served = ask(client, model_name, "Hi there", max_tokens=1)
    assert chat["count"] == served.usage.prompt_tokens  # the ids the request is served with
    assert_error(http.post("/tokenize", json={}), 400, match="prompt or messages")
    assert_error(http.post("/detokenize", json={"tokens": [10**9]}), 400, param="tokens")
    assert_error(http.post("/tokenize", json={"model": "gpt-4", "prompt": "x"}), 404)


def test_model_aliases(loaded_model, serve):
    from openai import OpenAI

    from tests.server.server_helpers import make_engine

    server = serve(make_engine(loaded_model), served_model_names=("smol", "tiny"))
    aliased = OpenAI(base_url=f"{server.url}/v1", api_key="x", max_retries=0, timeout=120)
    assert [m.id for m in aliased.models.list()] == ["smol", "tiny", loaded_model.name]
    for name in ("smol", "tiny", loaded_model.name, HF_ID):
        response = ask(aliased, name, max_tokens=1)
        assert response.model == "smol"  # as vLLM: the first served name
    assert aliased.models.retrieve(HF_ID).id == HF_ID
    with pytest.raises(openai.NotFoundError, match="smol"):
        ask(aliased, "gpt-4", max_tokens=1)


def test_hugging_face_id_accepted(client):
    assert ask(client, HF_ID, max_tokens=1).choices[0].message.content is not None


@pytest.mark.parametrize(
    "fields",
    [
        {"tools": [{"type": "function", "function": {"name": "f", "parameters": {}}}]},
        {"tool_choice": "required"},
        {"functions": [{"name": "f"}]},
        {"function_call": {"name": "f"}},
        {"response_format": {"type": "json_object"}},
        {"response_format": {"type": "json_schema", "json_schema": {"name": "x"}}},
        {"guided_json": {"type": "object"}},
        {"guided_choice": ["a", "b"]},
        {"use_beam_search": True},
        {"min_p": 0.1},
        {"stop_token_ids": [2]},
        {"ignore_eos": True},
        {"prompt_logprobs": 1},
        {"echo": True},
        {"skip_special_tokens": False},
        {"chat_template": "{{ messages }}"},
        {"audio": {"voice": "alloy"}},
    ],
)
def test_unsupported_chat_options_are_refused(http, model_name, fields):
    body = {"model": model_name, "messages": [{"role": "user", "content": "Hi"}],
            "max_tokens": 1, **fields}
    name = next(iter(fields))
    error = assert_error(http.post(CHAT, json=body), 400, param=name, code="unsupported")
    assert name in error["message"] and "remove it" in error["message"]


def test_no_op_values_of_unsupported_options_pass(http, model_name):
    body = {"model": model_name, "messages": [{"role": "user", "content": "Hi"}],
            "max_tokens": 1, "tools": [], "tool_choice": "none",
            "response_format": {"type": "text"}, "parallel_tool_calls": False,
            "user": "someone", "metadata": {"a": "b"}}
    assert http.post(CHAT, json=body).status_code == 200


def test_unsupported_with_openai_client(client, model_name):
    with pytest.raises(openai.BadRequestError, match="response_format"):
        ask(client, model_name, response_format={"type": "json_object"})
    with pytest.raises(openai.BadRequestError, match="tools"):
        ask(client, model_name, tools=[{"type": "function",
                                        "function": {"name": "f", "parameters": {}}}])
    with pytest.raises(openai.BadRequestError, match="suffix"):
        client.completions.create(model=model_name, prompt="a", suffix="b", max_tokens=1)
    with pytest.raises(openai.BadRequestError, match="best_of"):
        client.completions.create(model=model_name, prompt="a", best_of=3, max_tokens=1)
    message = {"role": "assistant", "content": "x", "tool_calls": [
        {"id": "1", "type": "function", "function": {"name": "f", "arguments": "{}"}}]}
    with pytest.raises(openai.BadRequestError, match="tool_calls"):
        client.chat.completions.create(
            model=model_name, max_tokens=1,
            messages=[{"role": "user", "content": "a"}, message,
                      {"role": "user", "content": "b"}],
        )


@pytest.mark.parametrize(
    "fields, param, words",
    [
        ({"max_tokens": "5"}, "max_tokens", ["must be an integer", "'5'"]),
        ({"temperature": 3}, "temperature", ["must be <= 2"]),
        ({"n": 0}, "n", ["must be >= 1"]),
        ({"messages": [{"role": "tool", "content": "x"}]}, "messages[0].role",
         ["must be one of", "'tool'"]),
        ({"cacheblend": {"methdo": "blend"}}, "cacheblend.methdo", ["not a known field"]),
        ({"stream": "yes"}, "stream", ["true or false"]),
    ],
)
def test_400s_name_the_field_and_the_fix(http, model_name, fields, param, words):
    body = {"model": model_name, "messages": [{"role": "user", "content": "Hi"}],
            "max_tokens": 1, **fields}
    error = assert_error(http.post(CHAT, json=body), 400, param=param)
    for word in words:
        assert word in error["message"], error
    assert "Input should" not in error["message"] and "String should" not in error["message"]


def test_curl_form_body_is_read_as_json(http, model_name):
    form = {"content-type": "application/x-www-form-urlencoded"}
    body = b'{"documents": ["Zorblat has a clock tower with 12 bells."]}'
    response = http.post("/v1/documents", content=body, headers=form)
    assert response.status_code == 200, response.text
    error = assert_error(
        http.post("/v1/documents", content=b"documents=abc", headers=form), 400,
        code="invalid_json"
    )
    assert "application/x-www-form-urlencoded" in error["message"]
    assert "Content-Type: application/json" in error["message"]

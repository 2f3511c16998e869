"""The OpenAI endpoints and cacheblend's extensions, through the official `openai` client."""

from __future__ import annotations

import openai
import pytest

from tests.server.server_helpers import DOCS, SEPARATOR

QUESTION = "Who is the mayor of Zorblat?"


def chat(client, model, content=QUESTION, max_tokens=4, **kwargs):
    return client.chat.completions.create(
        model=model,
        messages=[{"role": "user", "content": content}],
        max_tokens=max_tokens,
        **kwargs,
    )


def test_models(client, model_name):
    assert [m.id for m in client.models.list()] == [model_name]
    assert client.models.retrieve(model_name).id == model_name
    with pytest.raises(openai.NotFoundError):
        client.models.retrieve("gpt-4")


def test_chat_completion(client, model_name):
    response = chat(client, model_name)
    choice = response.choices[0]
    assert response.object == "chat.completion" and response.model == model_name
    assert choice.message.role == "assistant" and choice.message.content
    assert choice.finish_reason in ("stop", "length")
    usage = response.usage
    assert 0 < usage.completion_tokens <= 4
    assert usage.total_tokens == usage.prompt_tokens + usage.completion_tokens
    stats = response.model_extra["cacheblend"]
    assert stats["prompt_tokens"] == usage.prompt_tokens
    assert stats["completion_tokens"] == usage.completion_tokens
    assert stats["method"] == "blend" and stats["queue_s"] >= 0


def test_chat_stream_matches_non_stream(client, model_name):
    whole = chat(client, model_name, "Name a colour.")
    chunks = list(
        chat(
            client,
            model_name,
            "Name a colour.",
            stream=True,
            stream_options={"include_usage": True},
        )
    )
    assert chunks[0].choices[0].delta.role == "assistant"
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == whole.choices[0].message.content  # greedy: the same tokens
    final = [c for c in chunks if c.choices and c.choices[0].finish_reason]
    assert len(final) == 1 and final[0].model_extra["cacheblend"]["prompt_tokens"] > 0
    assert chunks[-1].choices == [] and chunks[-1].usage.total_tokens == whole.usage.total_tokens


def test_completion_and_stream(client, model_name):
    whole = client.completions.create(model=model_name, prompt="The sky is", max_tokens=4)
    assert whole.object == "text_completion" and whole.choices[0].text
    assert whole.model_extra["cacheblend"]["chunk_tokens"] == 0
    parts = list(
        client.completions.create(model=model_name, prompt="The sky is", max_tokens=4, stream=True)
    )
    assert "".join(p.choices[0].text for p in parts) == whole.choices[0].text
    assert parts[-1].choices[0].finish_reason == whole.choices[0].finish_reason
    ids = client.completions.create(model=model_name, prompt=[504, 6660, 314], max_tokens=2)
    assert ids.usage.prompt_tokens == 3


def test_documents_in_chat_are_reused(client, model_name):
    docs = [f"{doc} (Chapter {i}.)" for i, doc in enumerate(DOCS)]  # new to this server
    extra = {"documents": docs, "cacheblend": {"method": "blend", "ratio": 0.2}}
    first = chat(client, model_name, extra_body=extra).model_extra["cacheblend"]
    assert first["requested_method"] == "blend" and first["chunk_tokens"] > 30
    assert first["missed_tokens"] >= first["chunk_tokens"]  # computed, then stored
    # (the engine may answer a request that misses everything by a full prefill, which stores
    # the chunks but not the prefix: the next blend request stores that)
    chat(client, model_name, "Is Zorblat big?", extra_body={"documents": docs[1:]})
    again = chat(
        client, model_name, "Where does the Ambel flow?", extra_body={"documents": docs[::-1]}
    ).model_extra["cacheblend"]
    assert again["missed_tokens"] == 0  # every document's KV came from the store
    assert again["method"] == "blend" and again["reused_tokens"] > again["computed_tokens"]
    ratio = chat(client, model_name, extra_body=extra).model_extra["cacheblend"]
    assert ratio["method"] == "blend" and ratio["ratio"] == pytest.approx(0.2)
    full = chat(
        client, model_name, extra_body={"documents": docs, "cacheblend": {"method": "full"}}
    ).model_extra["cacheblend"]
    assert full["method"] == "full" and full["computed_tokens"] == full["prompt_tokens"]


def test_documents_mixed_forms_in_completion(client, model_name):
    response = client.completions.create(
        model=model_name,
        prompt=QUESTION,
        max_tokens=2,
        extra_body={"documents": [DOCS[0], {"id": "inline-1", "text": DOCS[2]}]},
    )
    assert response.model_extra["cacheblend"]["chunk_tokens"] > 20


def test_upload_reference_delete(client, http, model_name):
    text = "Qarth's oldest bridge, the Vell Span, was built of black basalt in 1402."
    upload = http.post(
        "/v1/documents",
        json={"documents": [text, {"id": "bridge-2", "text": text + " It has 9 arches."}]},
    )
    assert upload.status_code == 200, upload.text
    data = upload.json()["data"]
    assert [d["num_tokens"] > 10 for d in data] == [True, True]
    auto_id = data[0]["id"]
    assert data[1]["id"] == "bridge-2"
    again = http.post("/v1/documents", json={"documents": [text]}).json()["data"][0]
    assert again == {**data[0], "cached": True}  # content-derived id, KV already stored

    response = chat(
        client,
        model_name,
        "When was the Vell Span built?",
        extra_body={"documents": [{"id": auto_id}, {"id": "bridge-2"}]},
    )
    stats = response.model_extra["cacheblend"]
    assert stats["missed_tokens"] == 0 and stats["chunk_tokens"] == sum(
        d["num_tokens"] for d in data
    )

    assert http.delete("/v1/documents/bridge-2").json() == {
        "id": "bridge-2",
        "object": "document",
        "deleted": True,
    }
    assert http.delete("/v1/documents/bridge-2").status_code == 404
    with pytest.raises(openai.NotFoundError, match="bridge-2"):
        chat(client, model_name, extra_body={"documents": [{"id": "bridge-2"}]})


def test_separator_mode(client, model_name):
    prompt = SEPARATOR.join(["Context:", DOCS[0], DOCS[1], "Question: " + QUESTION + "\nAnswer:"])
    first = client.completions.create(model=model_name, prompt=prompt, max_tokens=2)
    stats = first.model_extra["cacheblend"]
    assert stats["chunk_tokens"] > 20 and stats["missed_tokens"] > 0  # two segments, each alone
    client.completions.create(model=model_name, prompt=prompt, max_tokens=2)  # see above
    third = client.completions.create(model=model_name, prompt=prompt, max_tokens=2)
    stats = third.model_extra["cacheblend"]
    assert stats["missed_tokens"] == 0 and stats["method"] == "blend"
    assert stats["reused_tokens"] > stats["computed_tokens"]

    content = SEPARATOR.join(["Read these.", DOCS[2], DOCS[0], QUESTION])
    response = chat(client, model_name, content)
    assert response.model_extra["cacheblend"]["chunk_tokens"] > 20


def test_sampling_is_seeded(client, model_name):
    kwargs = {"temperature": 1.0, "top_p": 0.9, "seed": 7, "max_tokens": 4}
    first = client.completions.create(model=model_name, prompt="Once upon", **kwargs)
    second = client.completions.create(model=model_name, prompt="Once upon", **kwargs)
    assert first.choices[0].text == second.choices[0].text


def test_stop_string(client, model_name):
    whole = chat(client, model_name, "Count: 1, 2, 3,", max_tokens=8)
    text = whole.choices[0].message.content
    if len(text) > 2:
        stopped = chat(client, model_name, "Count: 1, 2, 3,", max_tokens=8, stop=[text[1:3]])
        assert stopped.choices[0].message.content == text[:1]
        assert stopped.choices[0].finish_reason == "stop"

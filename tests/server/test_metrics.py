"""/metrics: scraped over HTTP and parsed with prometheus_client's own parser."""

from __future__ import annotations

from prometheus_client.parser import text_string_to_metric_families

from tests.server.server_helpers import DOCS


def scrape(http) -> dict[tuple[str, tuple], float]:
    response = http.get("/metrics")
    assert response.status_code == 200
    assert response.headers["content-type"].startswith("text/plain")
    samples = {}
    for family in text_string_to_metric_families(response.text):
        for sample in family.samples:
            samples[(sample.name, tuple(sorted(sample.labels.items())))] = sample.value
    return samples


def value(samples, name, **labels) -> float:
    return samples.get((name, tuple(sorted(labels.items()))), 0.0)


def test_metrics_follow_requests(http, model_name):
    before = scrape(http)
    body = {
        "model": model_name,
        "max_tokens": 2,
        "documents": DOCS[:2],
        "messages": [{"role": "user", "content": "What is Zorblat famous for?"}],
    }
    stats = [http.post("/v1/chat/completions", json=body).json()["cacheblend"] for _ in range(2)]
    assert http.post("/v1/chat/completions", json={"model": "nope"}).status_code == 400
    after = scrape(http)

    def delta(name, **labels):
        return value(after, name, **labels) - value(before, name, **labels)

    for method in {s["method"] for s in stats}:  # the method that ran (the engine may fall back)
        count = sum(s["method"] == method for s in stats)
        assert delta("cacheblend_time_to_first_token_seconds_count", method=method) == count
        assert delta("cacheblend_request_latency_seconds_count", method=method) == count
        assert delta("cacheblend_request_latency_seconds_sum", method=method) > 0
    for kind in ("reused", "recomputed", "missed", "borrowed", "computed", "prompt", "completion"):
        want = sum(s[f"{kind}_tokens"] for s in stats)
        assert delta("cacheblend_tokens_total", kind=kind) == want, kind
    assert delta("cacheblend_requests_total", endpoint="/v1/chat/completions", status="200") == 2
    assert delta("cacheblend_requests_total", endpoint="/v1/chat/completions", status="400") == 1
    assert delta("cacheblend_store_hits_total", tier="memory") > 0
    assert value(after, "cacheblend_store_bytes", tier="memory") > 0
    assert value(after, "cacheblend_store_entries", tier="memory") > 0
    assert value(after, "cacheblend_queue_length") == 0
    assert ("cacheblend_running_requests", ()) in after
    assert delta("cacheblend_decode_batch_size_count") >= 1


def test_unauthorized_requests_are_counted(live, http):
    import httpx

    before = scrape(http)
    httpx.get(f"{live.url}/v1/models", timeout=10)
    after = scrape(http)
    key = ("cacheblend_requests_total", (("endpoint", "/v1/models"), ("status", "401")))
    assert after[key] - before.get(key, 0.0) == 1


def test_labels_say_what_ran(http, model_name):
    """No documents: nothing is fused, so the label is not the requested `blend`."""
    before = scrape(http)
    completion = http.post("/v1/completions", json={
        "model": model_name, "prompt": "Plain text, no documents", "max_tokens": 1}).json()
    assert completion["cacheblend"]["method"] == "blend"  # what was asked (engine stats)
    after = scrape(http)
    count = "cacheblend_time_to_first_token_seconds_count"
    assert value(after, count, method="full") - value(before, count, method="full") == 1
    assert value(after, count, method="blend") == value(before, count, method="blend")

    chats = [http.post("/v1/chat/completions", json={
        "model": model_name, "max_tokens": 1,
        "messages": [{"role": "user", "content": "A plain chat"}]}).json() for _ in range(2)]
    later = scrape(http)
    assert chats[1]["cacheblend"]["reused_tokens"] > 0  # the chat template's prefix, cached
    assert value(later, count, method="prefix") - value(after, count, method="prefix") >= 1
    assert value(later, count, method="blend") == value(before, count, method="blend")


def test_prefix_and_chunk_reuse_are_separate_counters(http, model_name):
    docs = [f"{d} (Edition {i}.)" for i, d in enumerate(DOCS)]
    body = {"model": model_name, "max_tokens": 1, "documents": docs,
            "messages": [{"role": "user", "content": "What flows into the lake?"}]}
    http.post("/v1/chat/completions", json=body)  # stores what it misses
    before = scrape(http)
    stats = http.post("/v1/chat/completions", json=body).json()["cacheblend"]
    after = scrape(http)

    def delta(name):
        return value(after, name) - value(before, name)

    assert stats["method"] == "blend" and 0 < stats["prefix_reused_tokens"] < stats[
        "reused_tokens"]
    assert delta("cacheblend_prefix_reused_tokens_total") == stats["prefix_reused_tokens"]
    assert delta("cacheblend_chunk_reused_tokens_total") == (
        stats["reused_tokens"] - stats["prefix_reused_tokens"])


def test_one_log_line_per_request(http, model_name, caplog):
    import logging

    with caplog.at_level(logging.INFO, logger="cacheblend.server.requests"):
        response = http.post("/v1/chat/completions", json={
            "model": model_name, "max_tokens": 2,
            "messages": [{"role": "user", "content": "Log me"}]})
        http.post("/v1/chat/completions", json={"model": model_name})  # a 400
    lines = [r.getMessage() for r in caplog.records if r.name == "cacheblend.server.requests"]
    assert len(lines) == 2, lines
    body = response.json()
    assert response.headers["x-request-id"] == body["id"]
    ok = lines[0]
    assert ok.startswith(f"{body['id']} POST /v1/chat/completions 200 ")
    usage = body["usage"]
    for field in (f"prompt={usage['prompt_tokens']}", f"completion={usage['completion_tokens']}",
                  f"reused={body['cacheblend']['reused_tokens']}", "method=", "ttft="):
        assert field in ok, ok
    assert " POST /v1/chat/completions 400 " in lines[1]

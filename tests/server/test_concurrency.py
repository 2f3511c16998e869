"""Many clients at once: no cross-request contamination, disconnects free their work, a full
queue says 429, and a bounded load test keeps zero errors and stable memory."""

from __future__ import annotations

import random
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import httpx
import pytest

from tests.server.server_helpers import DOCS, HEADERS, assert_error, make_engine

PROMPTS = [
    "What colour is the sky?",
    "Name a fruit that is yellow.",
    "What is the capital of France?",
    "Say hello in Spanish.",
    "What do bees make?",
    "How many legs does a spider have?",
]


def ask(http, model, prompt, max_tokens=6, **extra):
    body = {
        "model": model,
        "max_tokens": max_tokens,
        "messages": [{"role": "user", "content": prompt}],
        **extra,
    }
    response = http.post("/v1/chat/completions", json=body)
    assert response.status_code == 200, response.text
    return response.json()["choices"][0]["message"]["content"]


def test_no_cross_request_contamination(http, model_name):
    alone = {p: ask(http, model_name, p) for p in PROMPTS}
    jobs = PROMPTS * 2
    random.Random(0).shuffle(jobs)
    with ThreadPoolExecutor(len(jobs)) as pool:
        together = list(pool.map(lambda p: (p, ask(http, model_name, p)), jobs))
    for prompt, text in together:  # batched with others, greedy: the same answer as alone
        assert text == alone[prompt], prompt


def wait_idle(live, timeout: float) -> float:
    """Seconds until the scheduler has nothing running or waiting (fails after timeout)."""
    scheduler = live.app.state.scheduler
    start = time.monotonic()
    while scheduler.running or scheduler.queue_length:
        assert time.monotonic() - start < timeout, "work was not freed"
        time.sleep(0.02)
    return time.monotonic() - start


def test_disconnect_mid_stream_frees_work(live, http, model_name):
    cancelled = live.app.state.metrics.cancelled
    before = cancelled._value.get()
    body = {
        "model": model_name,
        "max_tokens": 64,
        "stream": True,
        "messages": [{"role": "user", "content": "Write a very long story about a cat."}],
    }
    with http.stream("POST", "/v1/chat/completions", json=body) as response:
        assert response.status_code == 200
        lines = (line for line in response.iter_lines() if line)
        assert next(lines).startswith("data: ")  # the role
        assert next(lines).startswith("data: ")  # the first token
        deadline = time.monotonic() + 2
        while live.app.state.scheduler.running != 1 and time.monotonic() < deadline:
            time.sleep(0.01)
        assert live.app.state.scheduler.running == 1
    # 64 tokens take seconds; the freed request leaves within a step or two
    assert wait_idle(live, timeout=3.0) < 3.0
    assert cancelled._value.get() == before + 1


def test_disconnect_while_waiting_frees_work(live, model_name):
    cancelled = live.app.state.metrics.cancelled
    before = cancelled._value.get()
    body = {
        "model": model_name,
        "max_tokens": 64,
        "messages": [{"role": "user", "content": "Write a very long story about a dog."}],
    }
    with (
        httpx.Client(base_url=live.url, timeout=0.5, headers=HEADERS) as impatient,
        pytest.raises(httpx.ReadTimeout),
    ):
        impatient.post("/v1/chat/completions", json=body)
    assert wait_idle(live, timeout=3.0) < 3.0
    assert cancelled._value.get() == before + 1


def test_queue_full_and_cancel_while_queued(loaded_model, serve, model_name):
    server = serve(make_engine(loaded_model), max_batch_size=1, max_queue=1, max_tokens_limit=64)
    scheduler = server.app.state.scheduler
    body = {
        "model": model_name,
        "max_tokens": 64,
        "messages": [{"role": "user", "content": "Write a very long story about a fox."}],
    }
    with httpx.Client(base_url=server.url, timeout=60) as client:
        stream = client.stream("POST", "/v1/chat/completions", json={**body, "stream": True})
        running = stream.__enter__()  # runs: the one batch slot is taken
        assert running.status_code == 200
        waiter = threading.Thread(target=lambda: _post_with_timeout(server.url, body, 1.0))
        waiter.start()  # waits in the queue, then its client gives up
        deadline = time.monotonic() + 5
        while scheduler.queue_length < 1 and time.monotonic() < deadline:
            time.sleep(0.01)
        assert scheduler.queue_length == 1
        assert_error(client.post("/v1/chat/completions", json=body), 429, code="queue_full")
        waiter.join()
        deadline = time.monotonic() + 3
        while scheduler.queue_length and time.monotonic() < deadline:
            time.sleep(0.01)
        assert scheduler.queue_length == 0  # the gone client's request left the queue
        stream.__exit__(None, None, None)
    deadline = time.monotonic() + 3
    while scheduler.running and time.monotonic() < deadline:
        time.sleep(0.02)
    assert scheduler.running == 0


def _post_with_timeout(url, body, timeout):
    try:
        httpx.post(f"{url}/v1/chat/completions", json=body, timeout=timeout)
    except httpx.TimeoutException:
        pass


def rss_bytes() -> int:
    with open("/proc/self/status") as status:
        for line in status:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    raise RuntimeError("no VmRSS")


def test_load_16_clients(live, model_name):
    """16 concurrent clients, ~30 s, tiny prompts: zero errors, memory flat after warm-up."""
    clients, duration, max_requests = 16, 25.0, 400
    words = ["alpha", "bravo", "charlie", "delta", "echo", "foxtrot", "golf", "hotel"]
    errors: list[str] = []
    done = []
    lock = threading.Lock()

    def one(client: httpx.Client, rng: random.Random) -> None:
        body = {
            "model": model_name,
            "max_tokens": rng.choice([2, 3, 4]),
            "messages": [{"role": "user", "content": f"Say {rng.choice(words)}."}],
        }
        if rng.random() < 0.3:
            body["documents"] = rng.sample(DOCS, 2)
        if rng.random() < 0.5:
            body["stream"] = True
            with client.stream("POST", "/v1/chat/completions", json=body) as response:
                lines = [line for line in response.iter_lines() if line]
                ok = (
                    response.status_code == 200
                    and lines[-1] == "data: [DONE]"
                    and not any('"error"' in line for line in lines)
                )
        else:
            response = client.post("/v1/chat/completions", json=body)
            ok = response.status_code == 200 and response.json()["choices"][0]["finish_reason"]
        with lock:
            done.append(1)
            if not ok:
                errors.append(f"{response.status_code}")

    def worker(seed: int, until: float, count: int | None) -> None:
        rng = random.Random(seed)
        with httpx.Client(base_url=live.url, headers=HEADERS, timeout=120) as client:
            made = 0
            while time.monotonic() < until and (count is None or made < count):
                if len(done) >= max_requests:
                    return
                try:
                    one(client, rng)
                except Exception as exc:  # noqa: BLE001 - any failure is an error here
                    with lock:
                        errors.append(repr(exc))
                made += 1

    def run(seconds: float, count: int | None, seed: int) -> None:
        until = time.monotonic() + seconds
        threads = [
            threading.Thread(target=worker, args=(seed + i, until, count)) for i in range(clients)
        ]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(seconds + 120)
            assert not thread.is_alive(), "a client hung"

    run(60.0, 2, seed=100)  # warm-up: every code path and allocation size once
    warm_rss, warm_done = rss_bytes(), len(done)
    start = time.monotonic()
    run(duration, None, seed=200)
    elapsed = time.monotonic() - start
    end_rss = rss_bytes()
    served = len(done) - warm_done
    assert errors == []
    assert served >= 2 * clients, served
    growth = end_rss - warm_rss
    assert growth < max(96 << 20, warm_rss // 10), (warm_rss >> 20, end_rss >> 20)
    print(
        f"load: {served} requests in {elapsed:.1f}s ({served / elapsed:.2f}/s), "
        f"RSS {warm_rss >> 20} -> {end_rss >> 20} MiB"
    )
    assert wait_idle(live, timeout=5.0) < 5.0

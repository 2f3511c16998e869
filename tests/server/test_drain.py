"""Graceful drain of a real `cacheblend serve` process: SIGTERM stops admitting (JSON 503 with
Retry-After, /health 'draining'), lets in-flight requests finish within --drain-timeout,
cancels the rest with a JSON error, and exits 0 without a traceback."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import httpx
import pytest

pytestmark = pytest.mark.slow

ROOT = Path(__file__).resolve().parents[2]


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _serve(drain_timeout: float):
    port = _free_port()
    env = {**os.environ, "PYTHONPATH": str(ROOT), "CACHEBLEND_API_KEY": ""}
    process = subprocess.Popen(
        [sys.executable, "-c", "import sys; from cacheblend.cli import main; sys.exit(main())",
         "serve", "--port", str(port), "--threads", "1", "--max-tokens-limit", "4096",
         "--drain-timeout", str(drain_timeout)],
        env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 240
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise AssertionError(f"server exited: {process.communicate()[1][-2000:]}")
        try:
            if httpx.get(url + "/health", timeout=1).status_code == 200:
                return process, url
        except httpx.HTTPError:
            time.sleep(0.2)
    process.kill()
    raise AssertionError("server did not start")


def _stream(url: str, max_tokens: int, out: list, started: threading.Event) -> None:
    model = httpx.get(url + "/v1/models").json()["data"][0]["id"]
    body = {"model": model, "max_tokens": max_tokens, "min_tokens": max_tokens, "stream": True,
            "messages": [{"role": "user", "content": "Count upwards from one."}]}
    events = []
    with httpx.stream("POST", url + "/v1/chat/completions", json=body, timeout=120) as response:
        out.append(("status", response.status_code))
        for line in response.iter_lines():
            if line.startswith("data: "):
                events.append(line[6:])
                started.set()
    out.append(("events", events))


def _drain(drain_timeout: float, max_tokens: int):
    process, url = _serve(drain_timeout)
    streams = [([], threading.Event()) for _ in range(3)]
    threads = [threading.Thread(target=_stream, args=(url, max_tokens, out, started))
               for out, started in streams]
    for thread in threads:
        thread.start()
    for _, started in streams:
        assert started.wait(120)
    process.send_signal(signal.SIGTERM)
    time.sleep(0.3)
    health = httpx.get(url + "/health", timeout=5)
    model = httpx.get(url + "/v1/models", timeout=5).json()["data"][0]["id"]
    refused = httpx.post(url + "/v1/chat/completions", timeout=5, json={
        "model": model, "messages": [{"role": "user", "content": "Hi"}]})
    for thread in threads:
        thread.join(120)
    _, stderr = process.communicate(timeout=60)
    return process.returncode, stderr, health, refused, [out for out, _ in streams]


def _check_common(returncode, stderr, health, refused) -> None:
    assert returncode == 0, stderr[-2000:]
    assert "Traceback" not in stderr, stderr[-2000:]
    assert health.status_code == 503 and health.json()["status"] == "draining"
    assert refused.status_code == 503 and refused.headers.get("retry-after")
    assert refused.json()["error"]["code"] == "shutting_down"


def test_sigterm_lets_in_flight_requests_finish():
    returncode, stderr, health, refused, outs = _drain(drain_timeout=60, max_tokens=30)
    _check_common(returncode, stderr, health, refused)
    for out in outs:
        events = dict(out)["events"]
        assert events[-1] == "[DONE]"
        finals = [json.loads(e) for e in events[:-1]]
        assert not any("error" in f for f in finals)
        assert finals[-1]["choices"][0]["finish_reason"] == "length"


def test_drain_timeout_cancels_the_rest_with_a_json_error():
    returncode, stderr, health, refused, outs = _drain(drain_timeout=1, max_tokens=4000)
    _check_common(returncode, stderr, health, refused)
    for out in outs:
        events = dict(out)["events"]
        assert events[-1] == "[DONE]"
        error = json.loads(events[-2])["error"]
        assert error["code"] == "shutting_down" and "shut down" in error["message"]

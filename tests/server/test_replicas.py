"""Scale-out: two real `cacheblend serve` processes share one Redis-compatible server, so a
document uploaded through one is a store hit on the other (texts and KV both shared)."""

from __future__ import annotations

import os
import subprocess
import sys
import tempfile
import time
import uuid

import httpx
import pytest
from prometheus_client.parser import text_string_to_metric_families

from cacheblend.store.valkey_server import free_port
from tests.server.server_helpers import API_KEY, DOCS, HEADERS


class Replica:
    """`python -m cacheblend.cli serve` on a free port; its log kept for failures."""

    def __init__(self, store: str, key_in_env: bool) -> None:
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.log = tempfile.NamedTemporaryFile(prefix="cacheblend-serve-")  # noqa: SIM115 - stop()
        args = [
            sys.executable,
            "-m",
            "cacheblend.cli",
            "serve",
            "--port",
            str(self.port),
            "--store",
            store,
            "--threads",
            "1",
            "--max-tokens-limit",
            "8",
        ]
        env = {k: v for k, v in os.environ.items() if k != "CACHEBLEND_API_KEY"}
        if key_in_env:
            env["CACHEBLEND_API_KEY"] = API_KEY
        else:
            args += ["--api-key", API_KEY]
        self.process = subprocess.Popen(args, env=env, stdout=self.log, stderr=subprocess.STDOUT)

    def wait_ready(self, timeout: float = 180.0) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                break
            try:
                if httpx.get(f"{self.url}/health", timeout=1).status_code == 200:
                    return
            except httpx.TransportError:
                pass
            time.sleep(0.2)
        self.log.seek(0)
        raise RuntimeError(f"replica on {self.port} did not start:\n{self.log.read().decode()}")

    def stop(self) -> None:
        self.process.terminate()
        try:
            self.process.wait(15)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait()
        self.log.close()


@pytest.fixture(scope="module")
def replicas(valkey):
    store = f"memory,{valkey.url}?prefix=test-{uuid.uuid4().hex[:8]}:"
    pair = [Replica(store, key_in_env=True), Replica(store, key_in_env=False)]
    try:
        for replica in pair:
            replica.wait_ready()
        yield pair
    finally:
        for replica in pair:
            replica.stop()


def redis_hits(client: httpx.Client) -> float:
    for family in text_string_to_metric_families(client.get("/metrics").text):
        for sample in family.samples:
            if sample.name == "cacheblend_store_hits_total" and sample.labels == {"tier": "redis"}:
                return sample.value
    return 0.0


def test_document_uploaded_to_one_replica_hits_on_the_other(replicas):
    first, second = replicas
    with (
        httpx.Client(base_url=first.url, headers=HEADERS, timeout=120) as a,
        httpx.Client(base_url=second.url, headers=HEADERS, timeout=120) as b,
    ):
        assert httpx.get(f"{second.url}/v1/models", timeout=10).status_code == 401  # key on
        model = a.get("/v1/models").json()["data"][0]["id"]
        upload = a.post("/v1/documents", json={"documents": DOCS[:2]})
        assert upload.status_code == 200, upload.text
        ids = [d["id"] for d in upload.json()["data"]]
        assert not any(d["cached"] for d in upload.json()["data"])

        hits_before = redis_hits(b)
        body = {
            "model": model,
            "max_tokens": 2,
            "documents": [{"id": i} for i in ids],
            "messages": [{"role": "user", "content": "What is Zorblat famous for?"}],
        }
        response = b.post("/v1/chat/completions", json=body)
        assert response.status_code == 200, response.text
        stats = response.json()["cacheblend"]
        assert stats["missed_tokens"] == 0  # prefix and both documents came from Redis
        assert stats["method"] == "blend" and stats["reused_tokens"] > stats["computed_tokens"]
        assert redis_hits(b) >= hits_before + 3  # the prefix and two chunks

        again = b.post("/v1/documents", json={"documents": DOCS[:2]}).json()["data"]
        assert [d["id"] for d in again] == ids and all(d["cached"] for d in again)

        assert b.delete(f"/v1/documents/{ids[0]}").status_code == 200
        gone = a.post("/v1/chat/completions", json=body)
        assert gone.status_code == 404 and gone.json()["error"]["param"] == "documents[0].id"

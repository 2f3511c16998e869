"""bench_serve / bench_batching run end to end at a tiny size."""

from __future__ import annotations

from cacheblend.bench.serve import bench_batching, bench_serve, percentile, poisson_requests
from tests.server.server_helpers import make_engine


def test_bench_serve_tiny(loaded_model):
    result = bench_serve(
        make_engine(loaded_model),
        docs=2,
        doc_tokens=24,
        pool=3,
        rates=[4.0],
        duration=1.5,
        max_tokens=2,
        drain=60,
    )
    assert set(result["results"]) == {"full", "blend"}
    for method in ("full", "blend"):
        run = result["results"][method]["4.0"]
        assert run["errors"] == 0 and run["completed"] == run["requests"] > 0, run
        assert 0 < run["ttft_p50_s"] <= run["ttft_p99_s"] and run["requests_per_s"] > 0
    assert result["results"]["blend"]["4.0"]["missed_tokens"] == 0  # the pool was uploaded


def test_bench_batching_tiny(loaded_model):
    result = bench_batching(
        make_engine(loaded_model),
        clients=2,
        requests_each=1,
        max_tokens=2,
        batch_sizes=(1, 2),
        rounds=1,
    )
    assert set(result["results"]) == {"1", "2"}
    assert all(r["errors"] == 0 and r["tokens_per_s"] > 0 for r in result["results"].values())


def test_percentile():
    assert percentile([], 50) is None
    assert percentile([3.0, 1.0, 2.0], 50) == 2.0
    assert percentile(list(range(101)), 99) == 99


def test_poisson_requests_are_the_same_for_every_method():
    ids = [f"d{i}" for i in range(10)]
    first = poisson_requests(2.0, 30.0, ids, 3, "0-2.0")
    assert first == poisson_requests(2.0, 30.0, ids, 3, "0-2.0")
    assert 30 <= len(first) <= 90  # about rate x duration
    assert all(len(set(doc_ids)) == 3 for _, doc_ids, _ in first)
    times = [at for at, _, _ in first]
    assert times == sorted(times) and times[-1] < 30.0

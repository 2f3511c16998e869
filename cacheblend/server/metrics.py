"""Prometheus metrics, one registry per app (so two apps in one process never share counters).

Request timing comes from the scheduler, status counts from the middleware, and the store's
per-tier counters are read at scrape time from ``KVStore.stats()``.
"""

from __future__ import annotations

import logging
from collections.abc import Callable

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
from prometheus_client.registry import Collector

from cacheblend.store.base import KVStore, StoreStats
from cacheblend.store.ops import tier_problem

log = logging.getLogger(__name__)

CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"
TIME_BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 25.0, 60.0, 120.0)
TOKEN_KINDS = ("prompt", "completion", "reused", "recomputed", "computed", "missed",
               "borrowed")


def served_method(stats: dict) -> str:
    """What ran, for labels and logs: the engine's method, except that a fusion method with no
    chunks to fuse ran as a plain prefill (``full``), or as ``prefix`` when its prefix KV came
    from the cache."""
    method = stats.get("method", "unknown")
    if method in ("blend", "reuse", "epic") and not stats.get("chunk_tokens"):
        return "prefix" if stats.get("reused_tokens") else "full"
    return method


def _tiers(store: KVStore) -> list[KVStore]:
    return list(getattr(store, "tiers", None) or [store])


def tier_stats(store: KVStore) -> list[StoreStats]:
    """Each tier's own counters (a single store is its only tier)."""
    per_tier = getattr(store, "tier_stats", None)
    return per_tier() if callable(per_tier) else [store.stats()]


class StoreCollector(Collector):
    """Hits, misses, errors, entries and bytes of every store tier, read at scrape time."""

    def __init__(self, store: KVStore) -> None:
        self.store = store

    def collect(self):
        hits = CounterMetricFamily("cacheblend_store_hits", "Store lookups found", labels=["tier"])
        misses = CounterMetricFamily(
            "cacheblend_store_misses", "Store lookups not found", labels=["tier"]
        )
        errors = CounterMetricFamily(
            "cacheblend_store_errors",
            "Corrupt entries dropped and backend failures",
            labels=["tier"],
        )
        entries = GaugeMetricFamily("cacheblend_store_entries", "Entries held", labels=["tier"])
        size = GaugeMetricFamily("cacheblend_store_bytes", "Bytes held", labels=["tier"])
        available = GaugeMetricFamily(
            "cacheblend_store_available",
            "1 if the tier can be reached and written now, 0 if not (see /health)",
            labels=["tier"],
        )
        try:
            stats = tier_stats(self.store)
            tiers = _tiers(self.store)
        except Exception:  # a scrape must never fail because a tier is down
            log.warning("could not read store stats", exc_info=True)
            stats, tiers = [], []
        seen: dict[str, int] = {}
        for index, tier in enumerate(stats):
            seen[tier.name] = seen.get(tier.name, 0) + 1
            label = tier.name if seen[tier.name] == 1 else f"{tier.name}{seen[tier.name]}"
            hits.add_metric([label], tier.hits)
            misses.add_metric([label], tier.misses)
            errors.add_metric([label], tier.errors)
            entries.add_metric([label], tier.entries)
            size.add_metric([label], tier.bytes)
            if index < len(tiers):
                available.add_metric([label], 0 if tier_problem(tiers[index]) else 1)
        yield from (hits, misses, errors, entries, size, available)


class ServerMetrics:
    def __init__(self, store: KVStore | None = None) -> None:
        self.registry = CollectorRegistry()
        registry = self.registry
        self.ttft = Histogram(
            "cacheblend_time_to_first_token_seconds",
            "Arrival to first token, queue wait included",
            ["method"],
            buckets=TIME_BUCKETS,
            registry=registry,
        )
        self.latency = Histogram(
            "cacheblend_request_latency_seconds",
            "Arrival to last token (end to end)",
            ["method"],
            buckets=TIME_BUCKETS,
            registry=registry,
        )
        self.queue_wait = Histogram(
            "cacheblend_queue_wait_seconds",
            "Time a request waited before its prefill started",
            buckets=TIME_BUCKETS,
            registry=registry,
        )
        self.tokens = Counter(
            "cacheblend_tokens",
            "Tokens by kind: prompt, completion, "
            "reused (KV from cache), recomputed, computed, missed (no entry), borrowed (an "
            "entry stored under another context: BlendConfig.borrow)",
            ["kind"],
            registry=registry,
        )
        self.prefix_reused = Counter(
            "cacheblend_prefix_reused_tokens",
            "Reused prompt tokens from exact-prefix entries (what prefix caching also reuses)",
            registry=registry,
        )
        self.chunk_reused = Counter(
            "cacheblend_chunk_reused_tokens",
            "Reused prompt tokens from chunk entries at any position (what only blending reuses)",
            registry=registry,
        )
        self.requests = Counter(
            "cacheblend_requests",
            "HTTP requests by endpoint and status",
            ["endpoint", "status"],
            registry=registry,
        )
        self.cancelled = Counter(
            "cacheblend_cancelled_requests",
            "Requests whose client left before the end",
            registry=registry,
        )
        self.batch_size = Histogram(
            "cacheblend_decode_batch_size",
            "Requests per decode step",
            buckets=(1, 2, 4, 8, 16, 32, 64),
            registry=registry,
        )
        self.queue_length = Gauge(
            "cacheblend_queue_length", "Requests waiting for the model", registry=registry
        )
        self.running = Gauge(
            "cacheblend_running_requests", "Requests being decoded", registry=registry
        )
        for kind in TOKEN_KINDS:
            self.tokens.labels(kind=kind)
        if store is not None:
            registry.register(StoreCollector(store))

    def watch_queue(self, queue_length: Callable[[], int], running: Callable[[], int]) -> None:
        self.queue_length.set_function(queue_length)
        self.running.set_function(running)

    def observe_request(self, stats: dict, queue_s: float, ttft_s: float, latency_s: float) -> None:
        """A finished generation: ``stats`` is ``RequestStats.to_dict()``."""
        method = served_method(stats)
        self.queue_wait.observe(queue_s)
        self.ttft.labels(method=method).observe(ttft_s)
        self.latency.labels(method=method).observe(latency_s)
        tokens = self.tokens
        tokens.labels(kind="prompt").inc(stats.get("prompt_tokens", 0))
        tokens.labels(kind="completion").inc(stats.get("completion_tokens", 0))
        tokens.labels(kind="reused").inc(stats.get("reused_tokens", 0))
        tokens.labels(kind="recomputed").inc(stats.get("recomputed_tokens", 0))
        tokens.labels(kind="computed").inc(stats.get("computed_tokens", 0))
        tokens.labels(kind="missed").inc(stats.get("missed_tokens", 0))
        tokens.labels(kind="borrowed").inc(stats.get("borrowed_tokens", 0))
        prefix = stats.get("prefix_reused_tokens", 0)
        self.prefix_reused.inc(prefix)
        self.chunk_reused.inc(stats.get("reused_tokens", 0) - prefix)

    def render(self) -> bytes:
        return generate_latest(self.registry)

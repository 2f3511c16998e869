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

log = logging.getLogger(__name__)

CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"
TIME_BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 25.0, 60.0, 120.0)
TOKEN_KINDS = ("prompt", "completion", "reused", "recomputed", "computed", "missed")


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
        try:
            stats = tier_stats(self.store)
        except Exception:  # a scrape must never fail because a tier is down
            log.warning("could not read store stats", exc_info=True)
            stats = []
        seen: dict[str, int] = {}
        for tier in stats:
            seen[tier.name] = seen.get(tier.name, 0) + 1
            label = tier.name if seen[tier.name] == 1 else f"{tier.name}{seen[tier.name]}"
            hits.add_metric([label], tier.hits)
            misses.add_metric([label], tier.misses)
            errors.add_metric([label], tier.errors)
            entries.add_metric([label], tier.entries)
            size.add_metric([label], tier.bytes)
        yield from (hits, misses, errors, entries, size)


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
            "reused (KV from cache), recomputed, computed, missed (no entry)",
            ["kind"],
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
        method = stats.get("method", "unknown")
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

    def render(self) -> bytes:
        return generate_latest(self.registry)

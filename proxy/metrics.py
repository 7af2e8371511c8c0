"""Prometheus metrics for `GET /-/metrics`, one registry per app.

The hot path only bumps plain counters (no locks: the proxy is one event-loop
thread); token counts, token TTLs and the in-flight gauge are read from their
owners when Prometheus scrapes. prometheus-client renders the exposition format.
"""

from __future__ import annotations

from bisect import bisect_left
from collections import Counter
from collections.abc import Callable, Iterable, Iterator
from typing import Any

from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.core import (
    CounterMetricFamily,
    GaugeMetricFamily,
    HistogramMetricFamily,
    Metric,
)
from prometheus_client.registry import Collector

READ_METHODS = frozenset({"GET", "HEAD", "OPTIONS"})
LATENCY_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60)
CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"


class Metrics:
    def __init__(self) -> None:
        self.registry = CollectorRegistry(auto_describe=False)
        self.requests: Counter[tuple[str, str, str]] = Counter()
        self.retries: Counter[str] = Counter()
        self.in_flight = 0
        self.reloads: Counter[str] = Counter()  # outcome -> count (SPEC §9)
        # upstream -> per-bucket counts (last: +Inf) and the sum of observations.
        self.latency: dict[str, tuple[list[int], list[float]]] = {}
        self.relays_open: Counter[str] = Counter()  # WebSocket relays, by upstream
        self.relay_bytes: Counter[tuple[str, str]] = Counter()  # (upstream, direction)
        # The open relays' (upstream, bytes down, bytes up), read when scraped.
        self.live_relays: Callable[[], Iterable[tuple[str, int, int]]] = tuple
        # Set in a worker of `run --workers N` (proxy/workermetrics.py): a scrape
        # then answers with every worker's numbers merged, not this process's alone.
        self.merged: Callable[[], bytes] | None = None

    def watch(
        self,
        sources: Callable[[], Iterable[tuple[str, dict[str, Any]]]],
        store: Callable[[], dict[tuple[str, str], int]] = dict,
    ) -> None:
        """Register the scrape-time view of the upstreams: (name, auth.counters()),
        and of the token store: {(operation, outcome): count}."""
        self.registry.register(_ScrapeCollector(self, sources, store))

    def request_done(
        self,
        upstream: str | None,
        method: str,
        status: int,
        upstream_seconds: float | None,
        retried: bool,
    ) -> None:
        name = upstream or ""
        method_class = "read" if method in READ_METHODS else "write"
        self.requests[(name, method_class, f"{status // 100}xx")] += 1
        if retried:
            self.retries[name] += 1
        if upstream is not None and upstream_seconds is not None:
            entry = self.latency.get(upstream)
            if entry is None:
                entry = self.latency[upstream] = ([0] * (len(LATENCY_BUCKETS) + 1), [0.0])
            entry[0][bisect_left(LATENCY_BUCKETS, upstream_seconds)] += 1
            entry[1][0] += upstream_seconds

    def relay_opened(self, upstream: str) -> None:
        self.relays_open[upstream] += 1

    def relay_closed(self, upstream: str, bytes_down: int, bytes_up: int) -> None:
        self.relays_open[upstream] -= 1
        self.relay_bytes[(upstream, "down")] += bytes_down
        self.relay_bytes[(upstream, "up")] += bytes_up

    def render(self) -> bytes:
        if self.merged is not None:
            return self.merged()
        return generate_latest(self.registry)


class _ScrapeCollector(Collector):
    def __init__(
        self,
        metrics: Metrics,
        sources: Callable[[], Iterable[tuple[str, dict[str, Any]]]],
        store: Callable[[], dict[tuple[str, str], int]],
    ) -> None:
        self._metrics = metrics
        self._sources = sources
        self._store = store

    def collect(self) -> Iterator[Metric]:
        m = self._metrics
        requests = CounterMetricFamily(
            "authproxy_requests",
            "Requests handled, by upstream (empty: no route), method class and status class.",
            labels=["upstream", "method_class", "status_class"],
        )
        for (upstream, method_class, status_class), count in sorted(m.requests.items()):
            requests.add_metric([upstream, method_class, status_class], count)
        yield requests
        retries = CounterMetricFamily(
            "authproxy_retries", "Requests replayed after a retry status.", labels=["upstream"]
        )
        fetches = CounterMetricFamily(
            "authproxy_token_fetches",
            "Token requests (login, refresh) by outcome.",
            labels=["upstream", "outcome"],
        )
        ttl = GaugeMetricFamily(
            "authproxy_token_ttl_seconds",
            "Seconds until the current token expires (absent: no token or no expiry).",
            labels=["upstream"],
        )
        for name, counters in self._sources():
            retries.add_metric([name], m.retries.get(name, 0))
            fetches.add_metric([name, "success"], counters["fetch_success"])
            fetches.add_metric([name, "failure"], counters["fetch_failure"])
            if counters["ttl"] is not None:
                ttl.add_metric([name], counters["ttl"])
        yield retries
        yield fetches
        yield ttl
        reloads = CounterMetricFamily(
            "authproxy_config_reloads", "Configuration reloads, by outcome.", labels=["outcome"]
        )
        for outcome in ("success", "failure"):
            reloads.add_metric([outcome], m.reloads.get(outcome, 0))
        yield reloads
        store_ops = CounterMetricFamily(
            "authproxy_token_store_operations",
            "Token store operations by outcome (ok, error, bypassed while down, conflict, held).",
            labels=["operation", "outcome"],
        )
        fallbacks = CounterMetricFamily(
            "authproxy_token_store_fallbacks",
            "Tokens obtained from memory because the shared store was unavailable.",
        )
        fallback_count = 0
        for (operation, outcome), count in sorted(self._store().items()):
            if operation == "fallback":
                fallback_count += count
            else:
                store_ops.add_metric([operation, outcome], count)
        fallbacks.add_metric([], fallback_count)
        yield store_ops
        yield fallbacks
        yield GaugeMetricFamily(
            "authproxy_in_flight_requests", "Requests being handled now.", value=m.in_flight
        )
        latency = HistogramMetricFamily(
            "authproxy_upstream_latency_seconds",
            "Time from sending a request upstream to its response headers.",
            labels=["upstream"],
        )
        bounds = [*(str(b) for b in LATENCY_BUCKETS), "+Inf"]
        for upstream, (counts, total) in sorted(m.latency.items()):
            cumulative, running = [], 0
            for bound, count in zip(bounds, counts, strict=True):
                running += count
                cumulative.append((bound, running))
            latency.add_metric([upstream], cumulative, total[0])
        yield latency
        relays = GaugeMetricFamily(
            "authproxy_websocket_relays_open", "WebSocket relays open now.", labels=["upstream"]
        )
        for upstream, count in sorted(m.relays_open.items()):
            relays.add_metric([upstream], count)
        yield relays
        relayed = CounterMetricFamily(
            "authproxy_websocket_relayed_bytes",
            "Bytes WebSocket relays carried: down to the client, up from it.",
            labels=["upstream", "direction"],
        )
        carried = Counter(m.relay_bytes)
        for upstream, down, up in m.live_relays():
            carried[(upstream, "down")] += down
            carried[(upstream, "up")] += up
        for (upstream, direction), count in sorted(carried.items()):
            relayed.add_metric([upstream, direction], count)
        yield relayed

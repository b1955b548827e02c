"""Prometheus metrics of the gateway, on a registry owned by the app (no global state)."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client.exposition import CONTENT_TYPE_LATEST

_LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300, 600)
_TTFT_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2, 5, 10, 30, 60, 300)

CONTENT_TYPE = CONTENT_TYPE_LATEST


class Metrics:
    """The gateway's counters, gauges and histograms; children are cached per label set."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry(auto_describe=True)
        self.requests = Counter("synapse_requests", "Requests answered, by model, backend and status.",
                                ["model", "backend", "status"], registry=self.registry)
        self.latency = Histogram("synapse_request_duration_seconds", "Time from request to last byte.",
                                 ["model", "backend"], buckets=_LATENCY_BUCKETS, registry=self.registry)
        self.ttft = Histogram("synapse_time_to_first_token_seconds",
                              "Time from request to the first byte of the upstream answer.",
                              ["model", "backend"], buckets=_TTFT_BUCKETS, registry=self.registry)
        self.in_flight = Gauge("synapse_requests_in_flight", "Requests being served, by backend.",
                               ["backend"], registry=self.registry)
        self.upstream_errors = Counter("synapse_upstream_errors", "Failed attempts at a backend, by kind.",
                                       ["backend", "kind"], registry=self.registry)
        self.retries = Counter("synapse_retries", "Attempts beyond the first, by model and backend tried.",
                               ["model", "backend"], registry=self.registry)
        self.tokens = Counter("synapse_tokens", "Tokens reported by backends, by model and direction.",
                              ["model", "direction"], registry=self.registry)
        self.backend_up = Gauge("synapse_backend_up", "1 when the backend answered its last probe.",
                                ["backend"], registry=self.registry)
        self._in_flight: dict[str, Gauge] = {}
        self._children: dict[tuple[str, str, str], tuple[Counter, Histogram, Histogram]] = {}

    def observe(self, *, model: str, backend: str, status: int, seconds: float,
                ttft: float | None) -> None:
        """Record one finished request; label children are looked up once per (model, backend, status)."""
        key = (model, backend, str(status))
        children = self._children.get(key)
        if children is None:
            children = (self.requests.labels(model, backend, key[2]), self.latency.labels(model, backend),
                        self.ttft.labels(model, backend))
            self._children[key] = children
        requests, latency, first = children
        requests.inc()
        latency.observe(seconds)
        if ttft is not None:
            first.observe(ttft)

    def in_flight_gauge(self, backend: str) -> Gauge:
        gauge = self._in_flight.get(backend)
        if gauge is None:
            gauge = self._in_flight[backend] = self.in_flight.labels(backend)
        return gauge

    def render(self) -> bytes:
        return generate_latest(self.registry)

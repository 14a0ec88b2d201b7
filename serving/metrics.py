"""Prometheus metrics of the API, at ``GET /metrics``.

Counters and histograms are updated as requests go; the gauges that are about *now*
(served model version, parameter lag, feature freshness) are computed at scrape time.
With several uvicorn workers set ``PROMETHEUS_MULTIPROC_DIR`` (docker-compose does):
counters and histograms then add up over the workers, and the gauges come from the worker
that answered the scrape.
"""

from __future__ import annotations

import os
import time
from collections import deque
from collections.abc import Iterator
from typing import Any

from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Counter, Histogram, generate_latest
from prometheus_client.core import GaugeMetricFamily
from prometheus_client.multiprocess import MultiProcessCollector

from serving.models import ServedModels
from serving.request_path import RequestPath

BUCKETS = (0.0005, 0.001, 0.002, 0.003, 0.005, 0.0075, 0.01, 0.015, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5)
ENDPOINTS = ("/recommendations", "/events", "/model", "/healthz", "/readyz", "/metrics")


class Metrics:
    def __init__(self, models: ServedModels, path: RequestPath) -> None:
        self.registry = CollectorRegistry()
        r = self.registry
        self.requests = Counter("freshrec_requests", "HTTP requests by endpoint and status code",
                                ["endpoint", "status"], registry=r)
        self.latency = Histogram("freshrec_request_seconds", "HTTP request latency by endpoint", ["endpoint"],
                                 buckets=BUCKETS, registry=r)
        self.stage = Histogram("freshrec_stage_seconds", "time per stage of a recommendation request", ["stage"],
                               buckets=BUCKETS, registry=r)
        self.degraded = Counter("freshrec_degraded_responses", "recommendations answered without Redis",
                                registry=r)
        self.candidates = Counter("freshrec_candidates", "candidates by the source that found them", ["source"],
                                  registry=r)
        self.models, self.path = models, path
        self._seen: deque[tuple[float, dict[float, float], dict[str, float], float]] = deque()
        r.register(_Live(self))

    def recent(self, window_s: float = 10.0) -> dict[str, Any]:
        """This process's recommendation requests over about the last ``window_s``: their
        count, p50/p99 latency (interpolated within the histogram's buckets) and the
        candidates by source. Call it about once a second (the status feed does)."""
        now = time.monotonic()
        latency = {float(x.labels["le"]): x.value for m in self.latency.collect() for x in m.samples
                   if x.name.endswith("_bucket") and x.labels.get("endpoint") == "/recommendations"}
        sources = {x.labels["source"]: x.value for m in self.candidates.collect() for x in m.samples
                   if x.name.endswith("_total")}
        degraded = next((x.value for m in self.degraded.collect() for x in m.samples if x.name.endswith("_total")),
                        0.0)
        self._seen.append((now, latency, sources, degraded))
        while len(self._seen) > 2 and now - self._seen[1][0] >= window_s:
            self._seen.popleft()
        then, old_latency, old_sources, old_degraded = self._seen[0]
        bounds = sorted(latency)
        cumulative = [latency[b] - old_latency.get(b, 0.0) for b in bounds]
        requests = int(cumulative[-1]) if cumulative else 0
        return {"window_s": round(now - then, 1), "requests": requests,
                "p50_ms": _quantile_ms(bounds, cumulative, 0.5), "p99_ms": _quantile_ms(bounds, cumulative, 0.99),
                "degraded": int(degraded - old_degraded),
                "sources": {k: int(v - old_sources.get(k, 0.0)) for k, v in sorted(sources.items())}}

    def collect(self) -> Iterator[GaugeMetricFamily]:
        now_ms = time.time() * 1000
        m = self.models
        yield GaugeMetricFamily("freshrec_model_version", "parameter version served (0: none yet)", value=m.version)
        yield GaugeMetricFamily("freshrec_canary_version", "canary version (0: no canary)",
                                value=m.canary[0] if m.canary else 0)
        yield GaugeMetricFamily("freshrec_parameter_lag_seconds", "now - publish time of the served version",
                                value=(now_ms - m.published_ms) / 1000 if m.published_ms else float("nan"))
        newest = self.path.newest_feature_ms
        yield GaugeMetricFamily("freshrec_feature_freshness_seconds",
                                "now - event time of the newest feature value read",
                                value=(now_ms - newest) / 1000 if newest else float("nan"))

    def exposition(self) -> tuple[bytes, str]:
        registry = self.registry
        if os.environ.get("PROMETHEUS_MULTIPROC_DIR"):
            registry = CollectorRegistry()
            MultiProcessCollector(registry)
            registry.register(_Live(self))
        return generate_latest(registry), CONTENT_TYPE_LATEST


def _quantile_ms(bounds: list[float], cumulative: list[float], q: float) -> float | None:
    """The ``q`` quantile of a histogram (cumulative counts per upper bound), in ms,
    interpolated within its bucket; past the last finite bound, that bound.

    >>> _quantile_ms([0.001, 0.002, float("inf")], [50, 100, 100], 0.75)
    1.5
    >>> _quantile_ms([0.001, float("inf")], [0, 4], 0.5)
    1.0
    """
    if not cumulative or cumulative[-1] <= 0:
        return None
    target = q * cumulative[-1]
    lower, below = 0.0, 0.0
    for bound, count in zip(bounds, cumulative, strict=True):
        if count >= target:
            if bound == float("inf"):
                return round(lower * 1000, 2) if lower else None
            inside = count - below
            return round((lower + (bound - lower) * ((target - below) / inside if inside else 1.0)) * 1000, 2)
        lower, below = bound, count
    return None


class RequestTimer:
    """Plain ASGI middleware (BaseHTTPMiddleware costs ~0.3 ms a request): latency and status
    of every request, by endpoint. ``app.add_middleware(RequestTimer, metrics=m)``."""

    def __init__(self, app: Any, metrics: Metrics) -> None:
        self.app, self.metrics = app, metrics

    async def __call__(self, scope: dict[str, Any], receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        start = time.perf_counter()
        status = 500  # unless a response starts

        async def send_status(message: dict[str, Any]) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
            await send(message)

        try:
            await self.app(scope, receive, send_status)
        finally:
            path = scope["path"]
            endpoint = path if path in ENDPOINTS else "/admin" if path.startswith("/admin") else "other"
            self.metrics.latency.labels(endpoint).observe(time.perf_counter() - start)
            self.metrics.requests.labels(endpoint, str(status)).inc()


class _Live:
    def __init__(self, metrics: Metrics) -> None:
        self.metrics = metrics

    def collect(self) -> Iterator[GaugeMetricFamily]:
        return self.metrics.collect()

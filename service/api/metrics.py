"""Prometheus metrics of the API process, on a registry of its own (one per app).

Recorded by the API:
- `attribution_http_requests_total{method,route,status}` and
  `attribution_http_request_duration_seconds{method,route}` (route = path template);
- `attribution_result_cache_hits_total` / `attribution_result_cache_misses_total`: POST
  /v1/queries answered from an identical succeeded query vs. enqueued as a new job.
Collected at scrape time:
- `attribution_queue_depth`: jobs waiting in the queue;
- `attribution_jobs{status}`: queries per status (all tenants);
- `attribution_job_duration_seconds`: histogram of computed jobs' run time (started → finished);
- `attribution_cache_hits_total` / `attribution_cache_misses_total`: the workers' Redis cache
  of training-set losses and fit artifacts (`service.artifact_store.cache_stats`).
A part that cannot be collected (database or Redis down) is left out of that scrape.

Several API processes (`python -m service --processes N`, N > 1, which sets
`PROMETHEUS_MULTIPROC_DIR` to a private directory for its worker processes): each process
writes the recorded counters and histograms to its own files there, and every scrape sums
those of all processes (prometheus_client's multiprocess mode, `MultiProcessCollector`), so
any process answers `/metrics` with the totals. The state collected at scrape time is read
once, by the process answering.
"""

from __future__ import annotations

import logging
import os
import time
from collections.abc import Iterator

from prometheus_client import CollectorRegistry, Counter, Histogram, generate_latest
from prometheus_client.core import (
    CounterMetricFamily,
    GaugeMetricFamily,
    HistogramMetricFamily,
    Metric,
)
from prometheus_client.multiprocess import MultiProcessCollector
from prometheus_client.registry import Collector
from sqlalchemy.orm import Session, sessionmaker
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from service import queue
from service.db.models import QueryStatus
from service.db.repositories import queries as query_repo
from service.settings import Settings

log = logging.getLogger(__name__)

JOB_DURATION_BUCKETS = (0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0, 300.0, 600.0, 1800.0, 3600.0)
UNMATCHED_ROUTE = "<unmatched>"
# Read by prometheus_client when it is first imported: set, every process writes its values to files there.
MULTIPROCESS_DIR_ENV = "PROMETHEUS_MULTIPROC_DIR"


class ServiceMetrics:
    def __init__(self, settings: Settings, sessions: sessionmaker[Session]) -> None:
        self.registry = CollectorRegistry()
        shared_dir = os.environ.get(MULTIPROCESS_DIR_ENV)
        # One process: the recorded metrics live in this registry. Several: in the shared
        # directory, which the registry reads back summed over all processes.
        recorded = None if shared_dir else self.registry
        self.requests = Counter("attribution_http_requests", "HTTP requests by route template and status",
                                ["method", "route", "status"], registry=recorded)
        self.latency = Histogram("attribution_http_request_duration_seconds", "HTTP request latency",
                                 ["method", "route"], registry=recorded)
        self.result_cache_hits = Counter("attribution_result_cache_hits",
                                         "queries answered from an identical succeeded query", registry=recorded)
        self.result_cache_misses = Counter("attribution_result_cache_misses",
                                           "queries enqueued as new jobs", registry=recorded)
        if shared_dir:
            MultiProcessCollector(self.registry, path=shared_dir)
        self.registry.register(_StateCollector(settings, sessions))

    def render(self) -> bytes:
        return generate_latest(self.registry)


class _StateCollector(Collector):
    """Queue, job and cache state, read when Prometheus scrapes."""

    def __init__(self, settings: Settings, sessions: sessionmaker[Session]) -> None:
        self.settings = settings
        self.sessions = sessions

    def collect(self) -> Iterator[Metric]:
        yield from self._queue()
        yield from self._jobs()
        yield from self._cache()

    def _queue(self) -> Iterator[Metric]:
        try:
            depth = queue.queue_depth(self.settings)
        except Exception as exc:  # Redis down: leave the gauge out of this scrape
            log.debug("queue depth unavailable: %s", exc)
            return
        yield GaugeMetricFamily("attribution_queue_depth", "jobs waiting in the queue", value=depth)

    def _jobs(self) -> Iterator[Metric]:
        try:
            with self.sessions() as session:
                counts = query_repo.count_by_status(session)
                durations = query_repo.job_durations(session, JOB_DURATION_BUCKETS)
        except Exception as exc:  # database down
            log.debug("job metrics unavailable: %s", exc)
            return
        jobs = GaugeMetricFamily("attribution_jobs", "queries by status", labels=["status"])
        for status in QueryStatus:
            jobs.add_metric([status.value], counts.get(status.value, 0))
        yield jobs
        buckets = [(str(bound), count) for bound, count in zip(durations.bounds, durations.cumulative, strict=True)]
        buckets.append(("+Inf", durations.count))
        yield HistogramMetricFamily("attribution_job_duration_seconds", "run time of computed jobs",
                                    buckets=buckets, sum_value=durations.total_seconds)

    def _cache(self) -> Iterator[Metric]:
        try:
            from service.artifact_store import cache_stats

            stats = cache_stats(self.settings)
        except Exception as exc:  # Redis down or cache unavailable
            log.debug("cache stats unavailable: %s", exc)
            return
        yield CounterMetricFamily("attribution_cache_hits", "worker cache hits (losses, artifacts)",
                                  value=stats.get("hits", 0))
        yield CounterMetricFamily("attribution_cache_misses", "worker cache misses (losses, artifacts)",
                                  value=stats.get("misses", 0))


class MetricsMiddleware:
    """Counts and times every HTTP request by method, route template and status."""

    def __init__(self, app: ASGIApp, metrics: ServiceMetrics) -> None:
        self.app = app
        self.metrics = metrics

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        status = 500
        started = time.perf_counter()

        async def send_with_status(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = int(message["status"])
            await send(message)

        try:
            await self.app(scope, receive, send_with_status)
        finally:
            route = getattr(scope.get("route"), "path", UNMATCHED_ROUTE)
            method = str(scope.get("method", ""))
            self.metrics.requests.labels(method, route, str(status)).inc()
            self.metrics.latency.labels(method, route).observe(time.perf_counter() - started)

"""Prometheus metrics of the HTTP server: requests and latency per endpoint and view (or
service), errors by kind.

With several worker processes each one writes its values to files in
`PROMETHEUS_MULTIPROC_DIR` (which `flows.serve` sets), and /metrics of any worker sums them all
(prometheus-client's multiprocess mode). A name label holds only names that exist (a read of an
unknown name is labelled ""), so hostile names cannot grow the label set.
"""

from __future__ import annotations

import os
from typing import Any

from prometheus_client import CollectorRegistry, Counter, Histogram, generate_latest
from prometheus_client.multiprocess import MultiProcessCollector

MULTIPROC_ENV = "PROMETHEUS_MULTIPROC_DIR"
# seconds; reads take tens of microseconds, a batch of 100 about a millisecond
_BUCKETS = (0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.5, 1.0)


class ServingMetrics:
    """Counters and histograms of one server process."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        self._requests = Counter(
            "featureflow_http_requests",
            "HTTP requests answered, by endpoint, view or service, and status",
            ["endpoint", "name", "status"],
            registry=self.registry,
        )
        self._latency = Histogram(
            "featureflow_http_request_seconds",
            "time to answer an HTTP request, by endpoint and view or service",
            ["endpoint", "name"],
            buckets=_BUCKETS,
            registry=self.registry,
        )
        self._errors = Counter(
            "featureflow_http_errors",
            "HTTP requests answered with an error, by endpoint and kind",
            ["endpoint", "kind"],
            registry=self.registry,
        )
        self._counters: dict[tuple[str, str, int], Any] = {}
        self._histograms: dict[tuple[str, str], Any] = {}

    def answered(
        self, endpoint: str, name: str, status: int, seconds: float, kind: str | None
    ) -> None:
        """Count one answered request (`kind` names the error, None for a success)."""
        counter = self._counters.get((endpoint, name, status))
        if counter is None:  # label lookups cost microseconds: keep the children
            counter = self._counters[(endpoint, name, status)] = self._requests.labels(
                endpoint, name, str(status)
            )
        histogram = self._histograms.get((endpoint, name))
        if histogram is None:
            histogram = self._histograms[(endpoint, name)] = self._latency.labels(endpoint, name)
        counter.inc()
        histogram.observe(seconds)
        if kind is not None:
            self._errors.labels(endpoint, kind).inc()

    def exposition(self) -> bytes:
        """The Prometheus text format of every worker process (or of this one alone)."""
        if os.environ.get(MULTIPROC_ENV):
            registry = CollectorRegistry()
            MultiProcessCollector(registry)  # type: ignore[no-untyped-call]  # untyped upstream
            return bytes(generate_latest(registry))
        return bytes(generate_latest(self.registry))

"""Per-request counters kept as plain ints, exported to Prometheus at scrape time.

``prometheus_client`` children take a lock and a few attribute lookups per
``inc``/``observe``; on the proxy's hot path that is several microseconds per
request. :class:`RequestStats` counts into dicts (the event loop is single
threaded) and a Collector turns them into the same families on scrape.
"""

from __future__ import annotations

from bisect import bisect_left
from collections.abc import Iterator
from typing import Any

from prometheus_client.core import CounterMetricFamily, HistogramMetricFamily

__all__ = ["BUCKETS", "RequestStats"]

BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)


class RequestStats:
    """Requests by (route, upstream, status) and latency histograms by (route, upstream)."""

    def __init__(self, namespace: str = "stanchion") -> None:
        self.ns = namespace
        self.requests: dict[tuple[str, str, int], int] = {}
        self.latency: dict[tuple[str, str], list[float]] = {}

    def record(self, route: str, upstream: str, status: int, elapsed: float | None) -> None:
        """Count one answered request (and its latency when it reached an upstream)."""
        key = (route, upstream, status)
        self.requests[key] = self.requests.get(key, 0) + 1
        if elapsed is None:
            return
        lk = (route, upstream)
        h = self.latency.get(lk)
        if h is None:
            h = self.latency[lk] = [0.0] * (len(BUCKETS) + 2)
        h[bisect_left(BUCKETS, elapsed)] += 1
        h[-1] += elapsed

    def describe(self) -> list[Any]:
        """Nothing up front: families appear once requests are counted."""
        return []

    def collect(self) -> Iterator[Any]:
        """The Prometheus families, built from the plain counters."""
        c = CounterMetricFamily(
            f"{self.ns}_ambassador_requests",
            "Requests answered, by route, upstream and status",
            labels=["route", "upstream", "status"],
        )
        for (route, upstream, status), n in list(self.requests.items()):
            c.add_metric([route, upstream, str(status)], n)
        yield c
        h = HistogramMetricFamily(
            f"{self.ns}_ambassador_request_duration_seconds",
            "Time to the last byte of the response, by route and upstream",
            labels=["route", "upstream"],
        )
        for (route, upstream), counts in list(self.latency.items()):
            cum = 0.0
            buckets = []
            for bound, cnt in zip(BUCKETS, counts, strict=False):
                cum += cnt
                buckets.append((repr(bound), cum))
            cum += counts[len(BUCKETS)]
            buckets.append(("+Inf", cum))
            h.add_metric([route, upstream], buckets, counts[-1])
        yield h

"""Prometheus metrics of one sidecar (a registry per instance, so tests can run several)."""

from __future__ import annotations

from collections.abc import Iterator

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from infer_logger.spool import Spool


class _SpoolCollector(Collector):
    """Reads the spool's own counters at scrape time, so the spool stays free of metrics code."""

    def __init__(self, spool: Spool) -> None:
        self.spool = spool

    def collect(self) -> Iterator[Metric]:
        stats = self.spool.stats
        dropped = CounterMetricFamily(
            "infer_logger_events_dropped",
            "Events given up on, by reason (spool_full, spool_overflow, rejected, corrupt_segments)",
            labels=["reason"],
        )
        for reason, count in sorted(stats.dropped.items()):
            dropped.add_metric([reason], count)
        dropped.add_metric(["corrupt_segments"], stats.corrupt)
        yield dropped
        yield GaugeMetricFamily("infer_logger_spool_bytes", "Bytes in the spool", value=self.spool.size_bytes())


class Metrics:
    def __init__(self, spool: Spool) -> None:
        self.registry = CollectorRegistry(auto_describe=True)
        self.spool = spool
        r = self.registry
        r.register(_SpoolCollector(spool))
        self.accepted = Counter(
            "infer_logger_events_accepted", "Events appended to the spool", ["type"], registry=r
        )
        self.delivered = Counter(
            "infer_logger_events_delivered", "Events a sink acknowledged", ["sink"], registry=r
        )
        self.retried = Counter(
            "infer_logger_batches_retried", "Batches a sink failed and will retry", ["sink"], registry=r
        )
        self.sink_lag = Gauge(
            "infer_logger_sink_lag_bytes", "Spool bytes a sink has not taken yet", ["sink"], registry=r
        )
        self.sink_latency = Histogram(
            "infer_logger_sink_latency_seconds",
            "Time for a sink to take one batch",
            ["sink"],
            registry=r,
            buckets=(0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10),
        )
        self.requests = Counter(
            "infer_logger_requests", "Requests proxied", ["logged", "code"], registry=r
        )
        self.upstream_latency = Histogram(
            "infer_logger_upstream_latency_seconds", "Predictor response time", registry=r
        )

    def drop(self, reason: str, count: int) -> None:
        self.spool.stats.dropped[reason] += count

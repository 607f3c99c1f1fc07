"""Prometheus metrics of one sidecar (a registry per instance, so tests can run several)."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import Any

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector
from prometheus_client.samples import Sample

from infer_logger.spool import SpoolView

RemoteStatus = dict[str, Any]
"""A delivery child's report (`infer_logger.delivery`): its sinks' health and `export()`ed metrics."""



class _SpoolCollector(Collector):
    """Reads the spool's own counters at scrape time, so the spool stays free of metrics code.

    With a delivery child, its drop counts (rejected events, corrupt segments) are added in.
    """

    def __init__(self, spool: SpoolView, remote: Callable[[], RemoteStatus | None] | None) -> None:
        self.spool = spool
        self.remote = remote

    def collect(self) -> Iterator[Metric]:
        stats = self.spool.stats
        counts: dict[str, float] = {"corrupt_segments": stats.corrupt, **stats.dropped}
        status = self.remote() if self.remote else None
        for reason, count in (status or {}).get("dropped", {}).items():
            counts[reason] = counts.get(reason, 0) + count
        dropped = CounterMetricFamily(
            "infer_logger_events_dropped",
            "Events given up on, by reason (spool_full, spool_overflow, spool_error, rejected, corrupt_segments)",
            labels=["reason"],
        )
        for reason, count in sorted(counts.items()):
            dropped.add_metric([reason], count)
        yield dropped
        self.spool.refresh()
        yield GaugeMetricFamily("infer_logger_spool_bytes",
                                "Bytes the spool holds, what spool.max_bytes bounds (on disk, the open segment counts "
                                "whole until it rolls, delivered or not: the backlog is infer_logger_sink_lag_bytes)",
                                value=self.spool.size_bytes())


class _SinkCounts(Collector):
    """What sinks count of their own (`stats()`: a Fluentd connection's connects, reconnects and
    errors, which its client library would not tell), read at scrape time."""

    def __init__(self) -> None:
        self.sinks: dict[str, Any] = {}
        self._before: dict[tuple[str, str], int] = {}  # what sinks of a name counted before their successor

    def watch(self, name: str, sink: Any) -> None:
        """Count `sink`'s `stats()` under `name` from now on, over what the sink it replaces (a
        sidecar started again) counted: a counter never goes back."""
        old = self.sinks.get(name)
        if old is not None and old is not sink:
            for event, count in old.stats().items():
                self._before[name, event] = self._before.get((name, event), 0) + count
        self.sinks[name] = sink

    def collect(self) -> Iterator[Metric]:
        family = CounterMetricFamily("infer_logger_sink_client_events",
                                     "What a sink's own client counted, by sink and event (e.g. reconnects)",
                                     labels=["sink", "event"])
        for name, sink in self.sinks.items():
            for event, count in sink.stats().items():
                family.add_metric([name, event], count + self._before.get((name, event), 0))
        yield family


class _RemoteCollector(Collector):
    """The delivery child's families, as its last report had them."""

    def __init__(self, remote: Callable[[], RemoteStatus | None]) -> None:
        self.remote = remote

    def collect(self) -> Iterator[Metric]:
        status = self.remote()
        for name, documentation, kind, samples in (status or {}).get("families", []):
            family = Metric(name, documentation, kind)
            family.samples = [Sample(n, labels, value) for n, labels, value in samples]
            yield family


class CarriedReports:
    """The delivery children's reports as one series: a child's counters start at zero, so
    those of the children before it are added in, and the last report stays shown while no
    fresh one exists (a child restarting), so /metrics never goes backwards or gaps."""

    def __init__(self) -> None:
        self._last: RemoteStatus | None = None
        self._bases: dict[tuple[str, tuple[tuple[str, str], ...]], float] = {}
        self._dropped: dict[str, float] = {}

    def keep(self, report: RemoteStatus) -> None:
        """Take a child's report; one from a new child first folds the previous one's counts in."""
        last = self._last
        if last is not None and last["pid"] != report["pid"]:
            for _, _, kind, samples in last["families"]:
                for name, labels, value in samples:
                    if _cumulative(kind, name):
                        key = (name, tuple(sorted(labels.items())))
                        self._bases[key] = self._bases.get(key, 0.0) + value
            for reason, count in last["dropped"].items():
                self._dropped[reason] = self._dropped.get(reason, 0) + count
        self._last = report

    def report(self) -> RemoteStatus | None:
        """The last report kept, its counters carried over (None before the first)."""
        if self._last is None:
            return None
        bases = dict(self._bases)
        families = []
        for name, documentation, kind, samples in self._last["families"]:
            out = []
            for sample, labels, value in samples:
                key = (sample, tuple(sorted(labels.items())))
                out.append([sample, labels, value + bases.pop(key, 0.0) if _cumulative(kind, sample) else value])
            # Series only a departed child had (a label the new one has not used yet).
            for key in [k for k in bases if k[0].startswith(name + "_") and _cumulative(kind, k[0])]:
                out.append([key[0], dict(key[1]), bases.pop(key)])
            families.append([name, documentation, kind, out])
        dropped = dict(self._dropped)
        for reason, count in self._last["dropped"].items():
            dropped[reason] = dropped.get(reason, 0) + count
        return {"families": families, "dropped": dropped}


def _cumulative(kind: str, sample: str) -> bool:
    """Samples that only grow within a child (not gauges, nor a counter's creation time)."""
    return kind in ("counter", "histogram") and not sample.endswith("_created")


def export(metrics: Metrics) -> RemoteStatus:
    """What a delivery child reports of its metrics: the delivery families and its drop counts."""
    families = [
        [f.name, f.documentation, f.type, [[s.name, s.labels, s.value] for s in f.samples]]
        for metric in metrics.delivery
        for f in metric.collect()
    ]
    stats = metrics.spool.stats
    return {"families": families, "dropped": {"corrupt_segments": stats.corrupt, **stats.dropped}}


class Metrics:
    """The sidecar's metrics. With `remote` (a delivery child's status), the delivery families
    come from the child's reports, and this process's own delivery metrics stay unregistered."""

    def __init__(self, spool: SpoolView, *, remote: Callable[[], RemoteStatus | None] | None = None) -> None:
        self.registry = CollectorRegistry(auto_describe=True)
        self.spool = spool
        r = self.registry
        self._spool_collector = _SpoolCollector(spool, remote)
        r.register(self._spool_collector)
        own = r if remote is None else None
        if remote is not None:
            r.register(_RemoteCollector(remote))
        self.accepted = Counter(
            "infer_logger_events_accepted", "Events appended to the spool", ["type"], registry=r
        )
        self.delivered = Counter(
            "infer_logger_events_delivered", "Events a sink acknowledged", ["sink"], registry=own
        )
        self.retried = Counter(
            "infer_logger_batches_retried", "Batches a sink failed and will retry", ["sink"], registry=own
        )
        self.sink_lag = Gauge(
            "infer_logger_sink_lag_bytes", "Spool bytes a sink has not taken yet", ["sink"], registry=own
        )
        self.sink_latency = Histogram(
            "infer_logger_sink_latency_seconds",
            "Time for a sink to take one batch",
            ["sink"],
            registry=own,
            buckets=(0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10),
        )
        self.sink_counts = _SinkCounts()
        if own is not None:
            own.register(self.sink_counts)
        # The families the sink workers keep: in the delivery child when there is one.
        self.delivery = (self.delivered, self.retried, self.sink_lag, self.sink_latency, self.sink_counts)
        self.requests = Counter(
            "infer_logger_requests", "Requests proxied", ["logged", "code"], registry=r
        )
        self.upstream_latency = Histogram(
            "infer_logger_upstream_latency_seconds", "Predictor response time", registry=r
        )

    def use(self, spool: SpoolView) -> None:
        """Read `spool` from now on: a logger started again after a stop opens a new one.

        It counts on in the old one's stats (its counters started at zero, and the drop counts
        went backwards), which also take what the old one still refuses (a late request's append)."""
        if spool is not self.spool:
            stats, new = self.spool.stats, spool.stats
            stats.appended += new.appended
            stats.corrupt += new.corrupt
            for reason, count in new.dropped.items():
                stats.dropped[reason] += count
            spool.stats = stats
        self.spool = self._spool_collector.spool = spool

    def drop(self, reason: str, count: int) -> None:
        self.spool.stats.dropped[reason] += count

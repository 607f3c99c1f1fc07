"""Prometheus metrics of one explainer server (a registry per app, so tests can run several).

Counts the service and subscriber keep anyway are read at scrape time; the server itself only
times explanations and counts answers, once per request: nothing per perturbed row.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import TYPE_CHECKING

from prometheus_client import CollectorRegistry, Counter, Histogram
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

if TYPE_CHECKING:
    from explainers.service import ExplainerService
    from explainers.subscriber import ExplainSubscriber


class _StateCollector(Collector):
    def __init__(self, service: ExplainerService, subscriber: ExplainSubscriber) -> None:
        self.service = service
        self.subscriber = subscriber

    def collect(self) -> Iterator[Metric]:
        yield GaugeMetricFamily("infer_logger_explainer_ready", "1 once the explainer is fitted and warm",
                                value=1.0 if self.service.ready else 0.0)
        client = self.service.client
        yield CounterMetricFamily("infer_logger_explainer_predictor_requests",
                                  "HTTP requests sent to the predictor (black box)",
                                  value=client.requests if client is not None else 0)
        yield CounterMetricFamily("infer_logger_explainer_events_explained",
                                  "Explanation events made from inference events", value=self.subscriber.explained)
        yield CounterMetricFamily("infer_logger_explainer_events_other_model",
                                  "Inference events of another model (their modelname), not explained",
                                  value=self.subscriber.other_models)
        cache = self.subscriber.cache
        cache.sweep()
        yield CounterMetricFamily("infer_logger_explainer_events_evicted",
                                  "Halves of exchanges dropped from the join cache for room (never explained)",
                                  value=cache.evicted)
        yield CounterMetricFamily("infer_logger_explainer_events_expired",
                                  "Halves of exchanges whose other half did not come within cache_ttl (never explained)",
                                  value=cache.expired)
        yield CounterMetricFamily("infer_logger_explainer_events_dropped_at_stop",
                                  "Halves of exchanges waiting in the join cache when the subscriber stopped "
                                  "(it is in memory: never explained)", value=cache.stopped)
        yield GaugeMetricFamily("infer_logger_explainer_events_waiting",
                                "Halves of exchanges waiting in the join cache for their other half", value=len(cache))


class ExplainerMetrics:
    def __init__(self, service: ExplainerService, subscriber: ExplainSubscriber) -> None:
        self.registry = r = CollectorRegistry(auto_describe=True)
        r.register(_StateCollector(service, subscriber))
        self.explain_seconds = Histogram(
            "infer_logger_explainer_explain_seconds", "Time to answer one explain request, by protocol",
            ["protocol"], registry=r,
            buckets=(0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60),
        )
        self.errors = Counter("infer_logger_explainer_errors", "Requests answered with an error, by status",
                              ["status"], registry=r)

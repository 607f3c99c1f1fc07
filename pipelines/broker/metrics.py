"""Prometheus metrics of one broker process (a registry per broker, so tests can run several)."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram


class BrokerMetrics:
    def __init__(self) -> None:
        self.registry = r = CollectorRegistry(auto_describe=True)
        self.accepted = Counter(
            "infer_logger_broker_events_accepted", "Events a broker took into its log", ["broker"], registry=r
        )
        self.refused = Counter(
            "infer_logger_broker_events_refused",
            "Events not taken, by reason (invalid, oversize, disconnected, timeout, unavailable, ttl_expired, "
            "unknown_broker); a request refused before its events were read (a body too large, cut off, late, "
            "not decodable, or sent while not ready) counts as one",
            ["reason"],
            registry=r,
        )
        self.filtered = Counter(
            "infer_logger_trigger_events_filtered", "Events a trigger's filter passed over", ["trigger"], registry=r
        )
        self.delivered = Counter(
            "infer_logger_trigger_events_delivered", "Events a subscriber accepted", ["trigger"], registry=r
        )
        self.attempts = Counter(
            "infer_logger_trigger_delivery_attempts",
            "Delivery attempts by status (-1 = no response)",
            ["trigger", "code"],
            registry=r,
        )
        self.replies = Counter(
            "infer_logger_trigger_replies", "Reply events put back into the broker", ["trigger"], registry=r
        )
        self.dead_lettered = Counter(
            "infer_logger_trigger_events_dead_lettered", "Events sent to a dead-letter sink", ["trigger"],
            registry=r,
        )
        self.lost = Counter(
            "infer_logger_trigger_events_failed",
            "Events given up on with no dead-letter sink, or that the dead-letter sink refused too",
            ["trigger"],
            registry=r,
        )
        self.latency = Histogram(
            "infer_logger_trigger_delivery_seconds",
            "Time from reading an event to its delivery (retries included)",
            ["trigger"],
            registry=r,
            buckets=(0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60),
        )
        self.lag = Gauge(
            "infer_logger_trigger_lag_bytes", "Log bytes a trigger has not committed yet", ["trigger"], registry=r
        )
        self.reloads = Counter(
            "infer_logger_broker_config_reloads", "Trigger file reloads by result (ok, error)", ["result"],
            registry=r,
        )

"""The broker: CloudEvents in over HTTP, a durable log per broker, triggers that filter and deliver.

Knative Eventing's broker and trigger model, in one process (or many, on Kafka): Knative
`Trigger` manifests load as they are; filters are Knative's (`filter.attributes`, and `filters`
with exact, prefix, suffix, all, any, not, cesql); delivery retries, backs off and dead-letters
as knative/eventing does; subscriber replies go back into the broker, bounded by a TTL.

    broker.py      Broker: the ASGI app (with lifespan), logs per broker, triggers, reload
    ingress.py     the HTTP face: POST /[<ns>/<broker>], /triggers/..., /healthz /readyz /metrics
    handler.py     Knative's filter handler, synchronously (POST /triggers/<ns>/<name>/<uid>)
    trigger.py     Trigger manifests and the short form, validated, with file:line errors
    filters.py     the filter dialects            delivery.py  DeliverySpec, retries, backoff
    dispatcher.py  one trigger's deliveries       endpoints.py URL and in-process destinations
    channel.py     the spool as a broker's log    kafka_channel.py  a topic as a broker's log
    transport.py   the HTTP client of deliveries  components.py     in-process subscribers
    settings.py    BrokerSettings                 server.py / cli.py  running it

Names are imported lazily, so that `infer-logger --help` does not load the broker.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from infer_logger.documents import DocumentError
    from pipelines.broker.broker import Broker, UnknownBrokerError
    from pipelines.broker.channel import ChannelError, RefusedError
    from pipelines.broker.components import Replier, register_component
    from pipelines.broker.delivery import DeliverySpec, Destination, RetryPolicy, parse_duration
    from pipelines.broker.filters import FilterResult, build_trigger_filter
    from pipelines.broker.server import BrokerThread, serve
    from pipelines.broker.settings import BrokerSettings, load_broker_settings
    from pipelines.broker.trigger import Trigger, TriggerSet, load_trigger_files, load_triggers

_EXPORTS = {
    "Broker": "broker",
    "UnknownBrokerError": "broker",
    "ChannelError": "channel",
    "RefusedError": "channel",
    "Replier": "components",
    "register_component": "components",
    "DeliverySpec": "delivery",
    "Destination": "delivery",
    "RetryPolicy": "delivery",
    "parse_duration": "delivery",
    "DocumentError": "trigger",  # defined in infer_logger.documents
    "FilterResult": "filters",
    "build_trigger_filter": "filters",
    "BrokerThread": "server",
    "serve": "server",
    "BrokerSettings": "settings",
    "load_broker_settings": "settings",
    "Trigger": "trigger",
    "TriggerSet": "trigger",
    "load_trigger_files": "trigger",
    "load_triggers": "trigger",
}

__all__ = [
    "Broker",
    "BrokerSettings",
    "BrokerThread",
    "ChannelError",
    "DeliverySpec",
    "Destination",
    "DocumentError",
    "FilterResult",
    "RefusedError",
    "Replier",
    "RetryPolicy",
    "Trigger",
    "TriggerSet",
    "UnknownBrokerError",
    "build_trigger_filter",
    "load_broker_settings",
    "load_trigger_files",
    "load_triggers",
    "parse_duration",
    "register_component",
    "serve",
]


def __getattr__(name: str) -> Any:
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module 'pipelines.broker' has no attribute {name!r}")
    return getattr(importlib.import_module(f"pipelines.broker.{module}"), name)

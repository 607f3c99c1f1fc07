"""Settings of the broker, read once: flags > `INFER_LOGGER_BROKER_*` env vars > YAML file > defaults.

    # broker.yaml
    port: 9082
    channel: disk                 # disk (default, survives kill -9) | memory | kafka
    dir: infer-logger-data/broker
    trigger_files: [triggers.yaml]
    delivery: {retry: 5, backoffPolicy: exponential, backoffDelay: PT0.2S, timeout: PT10S}
    components:                   # in-process subscribers, by name
      - {type: store, name: audit, path: infer-logger-data/audit.db}
    addresses:                    # what `ref: {name: ...}` means when it is not a component
      event-display: http://127.0.0.1:9000/
    kafka: {bootstrap_servers: 127.0.0.1:9092}

Triggers live in their own files (see `pipelines.broker.trigger`), so that they can be reloaded.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ByteSize, ConfigDict, Field, field_validator, model_validator
from pydantic_settings import SettingsConfigDict

from infer_logger.config import LayeredSettings
from infer_logger.errors import ConfigError
from infer_logger.fields import NamedPath, Seconds
from infer_logger.sinks.base import SinkConfig
from infer_logger.sinks.kafka import BootstrapServers, checked_config
from pipelines.broker.components import component_config
from pipelines.broker.delivery import DeliverySpec, Destination
from pipelines.broker.trigger import check_name

DEFAULT_DELIVERY = DeliverySpec(
    retry=10, backoff_policy="exponential", backoff_delay="PT0.2S", timeout="PT30S", retry_after_max="PT30S"
)
"""Under every broker's and trigger's delivery: Knative's default broker delivery, a 30 s
timeout per attempt, and Retry-After honoured up to 30 s."""


class SpoolSection(BaseModel):
    model_config = ConfigDict(extra="forbid")

    segment_bytes: ByteSize = Field(ByteSize(16 << 20), gt=0)
    max_bytes: ByteSize = Field(ByteSize(1 << 30), gt=0)
    """Cap on one broker's log, on disk or in memory (`channel: memory`); past it new events are
    refused (503) or, with `overflow: drop_oldest`, the oldest segment (in memory: events) is
    dropped (even if a trigger has not read it)."""
    overflow: Literal["drop_newest", "drop_oldest"] = "drop_newest"
    fsync_interval: Seconds | None = Field(None, gt=0)
    """Seconds between fsyncs; unset = page cache only (survives kill -9, not a power cut)."""
    memory_max_events: int = Field(100_000, ge=1)


_TOPIC = re.compile(r"[a-zA-Z0-9._-]+")
_MAX_TOPIC = 249


class KafkaChannelSettings(BaseModel):
    model_config = ConfigDict(extra="forbid")

    bootstrap_servers: BootstrapServers = "127.0.0.1:9092"
    topic_prefix: str = "knative-broker"
    """A broker's topic is `<prefix>-<namespace>-<name>`."""
    group_prefix: str = "knative-trigger"
    """A trigger's consumer group is `<prefix>-<namespace>-<name>`."""
    partitions: int = Field(10, ge=1)
    """Partitions of a topic the broker creates: the most consumers of one trigger that get work."""
    replication_factor: int = Field(1, ge=1)
    config: dict[str, str | int | float | bool] = Field(default_factory=dict)
    """librdkafka properties for every client (TLS, SASL, ...); not those the channel's promises
    rest on (`acks` but all, `group.id`, `group.instance.id`, auto-committed offsets)."""

    @field_validator("config")
    @classmethod
    def _check_config(cls, value: dict[str, str | int | float | bool]) -> dict[str, str | int | float | bool]:
        if "group.instance.id" in value:  # one static member for every trigger's consumer: fenced off
            raise ValueError("group.instance.id: each trigger is a consumer group of its own")
        return checked_config(value, group="group_prefix (each trigger's own group)")

    def topic(self, namespace: str, name: str) -> str:
        """A broker's topic; ConfigError where Kafka would refuse it (long names can add up)."""
        topic = f"{self.topic_prefix}-{namespace}-{name}"
        if len(topic) > _MAX_TOPIC or not _TOPIC.fullmatch(topic):
            raise ConfigError("kafka.topic_prefix", f"broker {namespace}/{name}: its topic {topic[:80]!r} is no "
                              f"Kafka topic name (at most {_MAX_TOPIC} of a-z A-Z 0-9 . _ -)")
        return topic

    def group(self, namespace: str, trigger: str) -> str:
        """A trigger's consumer group."""
        return f"{self.group_prefix}-{namespace}-{trigger}"


class BrokerSettings(LayeredSettings):
    model_config = SettingsConfigDict(
        env_prefix="INFER_LOGGER_BROKER_", env_nested_delimiter="__", extra="forbid", populate_by_name=True
    )

    host: str = Field("127.0.0.1", min_length=1)  # "" is every address to uvicorn
    port: int = Field(9082, ge=0, le=65535)
    namespace: str = "default"
    """Namespace of triggers and brokers that name none."""
    name: str = "default"
    """The broker `POST /` goes to (any broker is also at `POST /<namespace>/<name>`)."""
    channel: Literal["disk", "memory", "kafka"] = "disk"
    """Where a broker keeps its log: `disk` (the spool: nothing accepted is lost on restart or
    kill -9), `memory` (lost on restart), `kafka` (a topic per broker, a consumer group per trigger)."""
    role: Literal["all", "ingress", "dispatcher"] = "all"
    """With `channel: kafka`, run only the ingress or only the trigger dispatchers."""
    dir: NamedPath = Path("infer-logger-data/broker")
    """Spools (one per broker, `<dir>/<namespace>/<name>`) and their trigger checkpoints."""
    spool: SpoolSection = SpoolSection()
    kafka: KafkaChannelSettings = KafkaChannelSettings()
    delivery: DeliverySpec = DeliverySpec()
    """Every broker's default delivery (over DEFAULT_DELIVERY; a Broker's and a trigger's lie over it)."""
    trigger_files: list[NamedPath] = []
    """YAML files of triggers (Knative manifests or the short form); re-read on SIGHUP."""
    components: list[dict[str, Any]] = []
    """In-process subscribers by name: sink configs (`type` + options), `name` defaults to the type."""
    addresses: dict[str, str] = {}
    """Names a `ref` may use for a URL (as a Kubernetes Service name would resolve)."""
    default_ttl: int = Field(255, ge=1, le=2**31 - 1)
    """`knativebrokerttl` given to events that arrive without one; each reply takes one off."""
    max_event_bytes: ByteSize = Field(ByteSize(1 << 20), gt=0)
    """Largest event accepted (413 beyond)."""
    max_request_bytes: ByteSize = Field(ByteSize(16 << 20), gt=0)
    """Largest request body (a batch) accepted (413 beyond)."""
    request_read_timeout: Seconds = Field(60.0, gt=0)
    """Seconds a request body may take to arrive whole, from its head, before it is answered 408 and
    the connection closed (a sender dribbling it would hold the connection for ever)."""
    batch_size: int = Field(100, ge=1)
    """Events a trigger reads from the log at a time."""
    parallelism: int = Field(64, ge=1)
    """Deliveries in flight per trigger."""
    drain_timeout: Seconds = Field(5.0, ge=0)
    """Seconds to finish deliveries at shutdown; the rest is delivered after the next start."""
    trigger_endpoint: bool = True
    """Serve `POST /triggers/<ns>/<name>/<uid>`: one filtered, synchronous delivery (Knative's
    filter handler), for other dispatchers and for testing a trigger."""

    @field_validator("namespace", "name")
    @classmethod
    def _names(cls, value: str) -> str:
        return check_name(value)

    @field_validator("components")
    @classmethod
    def _components(cls, specs: list[dict[str, Any]]) -> list[dict[str, Any]]:
        seen: set[str] = set()
        for spec in specs:
            config = component_config(spec)
            if config.sink_name in seen:
                raise ValueError(f"two components are named {config.sink_name!r}: give them distinct `name`s")
            seen.add(config.sink_name)
        return specs

    @field_validator("addresses")
    @classmethod
    def _addresses(cls, addresses: dict[str, str]) -> dict[str, str]:
        for url in addresses.values():
            Destination(uri=url)
        return addresses

    @model_validator(mode="after")
    def _roles(self) -> BrokerSettings:
        if self.role != "all" and self.channel != "kafka":
            raise ValueError(f"role {self.role!r} needs channel: kafka (a {self.channel} log is one process's)")
        return self

    @model_validator(mode="after")
    def _room_for_events(self) -> BrokerSettings:
        if self.max_request_bytes < self.max_event_bytes:  # a batch of one such event was refused
            raise ValueError(f"max_request_bytes ({self.max_request_bytes.human_readable()}) must be at least "
                             f"max_event_bytes ({self.max_event_bytes.human_readable()})")
        # As the sidecar's spool: a log below an event's size answered 503 (retry) to every
        # event that size for ever, and one of a few events holds no backlog worth the name.
        if self.channel != "kafka" and self.spool.max_bytes < 4 * self.max_event_bytes:
            raise ValueError(
                f"spool.max_bytes ({self.spool.max_bytes.human_readable()}) must be at least 4 x "
                f"max_event_bytes ({self.max_event_bytes.human_readable()}): raise spool.max_bytes "
                f"or lower max_event_bytes")
        return self

    def component_configs(self) -> dict[str, SinkConfig]:
        configs = [component_config(spec) for spec in self.components]
        return {config.sink_name: config for config in configs}

    def effective_delivery(self) -> DeliverySpec:
        return self.delivery.over(DEFAULT_DELIVERY)


def load_broker_settings(config_file: Path | None = None, **flags: Any) -> BrokerSettings:
    """Merge the sources and validate; ConfigError names the first bad field."""
    return BrokerSettings.load(config_file, **flags)

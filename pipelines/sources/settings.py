"""`infer-logger ingest` settings: one source feeding one sink, and where to serve health and metrics.

    source:
      type: forward          # or kafka (bootstrap_servers, topics, group_id, ...)
      port: 24224
    sink:
      type: store            # any sink the sidecar has: http (a broker), elasticsearch, ...
      path: infer-logger-data/audit.db
    port: 9084               # /healthz /readyz /metrics

Flags override `INFER_LOGGER_INGEST_*` env vars (nested keys with `__`:
`INFER_LOGGER_INGEST_SOURCE__PORT=24225`), which override the YAML file.
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Any

from pydantic import Field, ValidationInfo, field_validator
from pydantic_settings import SettingsConfigDict

from infer_logger.config import LayeredSettings
from infer_logger.fields import Seconds
from infer_logger.sinks import SinkSpec, StoreSinkConfig
from pipelines.sources.forward import ForwardSourceConfig
from pipelines.sources.kafka import KafkaSourceConfig

SourceSpec = Annotated[ForwardSourceConfig | KafkaSourceConfig, Field(discriminator="type")]


class IngestSettings(LayeredSettings):
    model_config = SettingsConfigDict(
        env_prefix="INFER_LOGGER_INGEST_", env_nested_delimiter="__", extra="forbid", populate_by_name=True
    )

    host: str = Field("127.0.0.1", min_length=1)  # "" is every address to uvicorn
    """Address of the health and metrics endpoints."""
    port: int = Field(9084, ge=0, le=65535)  # the explainer's is 9083: both may run on one host
    source: SourceSpec = ForwardSourceConfig()
    """Where events come from: `forward` (a Fluentd Forward server) or `kafka` (a consumer group)."""
    sink: SinkSpec = StoreSinkConfig()
    """Where they go: the source moves on (acks a chunk, commits an offset) only once it took them."""
    drain_timeout: Seconds = Field(5.0, ge=0)
    """Seconds a stop waits for the batch in hand; then it is given up: not acked, not committed,
    sent again (a sink that does not answer held SIGTERM for minutes, past a pod's grace period)."""

    @field_validator("source", "sink", mode="before")
    @classmethod
    def _default_type(cls, value: Any, info: ValidationInfo) -> Any:
        """A `source:` or `sink:` naming no type (`--listen` alone, `INFER_LOGGER_INGEST_SINK__PATH`)
        is the default's type, forward or store (the union could not tell which, and named none)."""
        if isinstance(value, dict) and "type" not in value:
            assert info.field_name is not None
            return {"type": cls.model_fields[info.field_name].default.type, **value}
        return value


def load_ingest_settings(config_file: Path | None = None, **flags: Any) -> IngestSettings:
    """Merge the sources and validate; ConfigError names the first bad field."""
    return IngestSettings.load(config_file, **flags)

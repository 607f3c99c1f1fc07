"""Sinks, registered by `type`.

A sink's config is data (a pydantic model with a `type` literal); `build()` turns it into a live
`Sink`. `SinkSpec` is the discriminated union the settings validate against, so an unknown type
fails with the allowed values named.
"""

from __future__ import annotations

from typing import Annotated

from pydantic import Field

from infer_logger.sinks.base import Sink, SinkConfig
from infer_logger.sinks.elasticsearch import ElasticsearchSinkConfig
from infer_logger.sinks.file import FileSinkConfig
from infer_logger.sinks.fluentd import FluentdSinkConfig
from infer_logger.sinks.http import HttpSinkConfig
from infer_logger.sinks.kafka import KafkaSinkConfig
from infer_logger.sinks.store import StoreSinkConfig

# Client libraries (elasticsearch, …) are imported by `build()`, so configs load without extras.
SinkSpec = Annotated[
    HttpSinkConfig
    | FileSinkConfig
    | StoreSinkConfig
    | ElasticsearchSinkConfig
    | FluentdSinkConfig
    | KafkaSinkConfig,
    Field(discriminator="type"),
]

REGISTRY: dict[str, type[SinkConfig]] = {
    "http": HttpSinkConfig,
    "file": FileSinkConfig,
    "store": StoreSinkConfig,
    "elasticsearch": ElasticsearchSinkConfig,
    "fluentd": FluentdSinkConfig,
    "kafka": KafkaSinkConfig,
}

__all__ = [
    "REGISTRY",
    "ElasticsearchSinkConfig",
    "FileSinkConfig",
    "FluentdSinkConfig",
    "HttpSinkConfig",
    "KafkaSinkConfig",
    "Sink",
    "SinkConfig",
    "SinkSpec",
    "StoreSinkConfig",
]

"""The source contract: a config (data) builds a live source that feeds a subscriber.

The subscriber is anything with the `Sink` protocol (`send_batch`): the store sink, the http
sink towards a broker, a `MemorySink` in tests. A source hands it events in batches and moves
its own position (Kafka offsets, ...) only after `send_batch` returned: at-least-once.
"""

from __future__ import annotations

from typing import Protocol, runtime_checkable

from pydantic import BaseModel, ConfigDict

from infer_logger.sinks.base import Sink


@runtime_checkable
class Source(Protocol):
    """Reads events and hands them to its subscriber until stopped.

    `run` returns after `stop()` (once the batch in hand is handled or given up, never
    committed half-way); `aclose` stops it, waits for `run`, and releases the connections.
    """

    async def start(self) -> None:
        """Take what must be had before `run` (a listening socket); raises when it cannot be.
        A peer that is not there yet (a Kafka broker) is waited for by `run`, not refused here."""
        ...

    async def run(self) -> None: ...

    def stop(self) -> None: ...

    async def drain(self, timeout: float) -> bool:
        """`stop`, and wait up to `timeout` s for the batch in hand to be handled (acked,
        committed); False if it was not: `aclose` then gives it up, to come again."""
        ...

    async def aclose(self) -> None: ...

    def stats(self) -> dict[str, int]:
        """Its counters by name, each only ever growing (`/metrics` of `infer-logger ingest`)."""
        ...


class SourceConfig(BaseModel):
    """Base of every source's settings; subclasses set `type` as a Literal and implement `build`."""

    model_config = ConfigDict(extra="forbid")

    name: str | None = None
    """Names the source in logs and metrics; defaults to its type."""

    def build(self, subscriber: Sink) -> Source:
        raise NotImplementedError

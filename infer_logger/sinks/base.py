"""The sink contract: a config (data) builds a live sink (a connection)."""

from __future__ import annotations

from collections.abc import Sequence
from typing import ClassVar, Protocol, runtime_checkable

from pydantic import BaseModel, ConfigDict, Field

from infer_logger.cloudevents.event import CloudEvent


@runtime_checkable
class Sink(Protocol):
    """Takes batches of events; raising means "not taken".

    `send_batch` raises `SinkError` for a failure worth retrying (the whole batch is retried) and
    `RejectedError` for events the sink will never take (they are dead-lettered). Returning means
    every event is durably with the sink: only then does the spool checkpoint move.
    """

    async def send_batch(self, events: Sequence[CloudEvent]) -> None: ...

    async def aclose(self) -> None: ...


class SinkConfig(BaseModel):
    """Base of every sink's settings; subclasses set `type` as a Literal and implement `build`."""

    model_config = ConfigDict(extra="forbid")

    kind: ClassVar[str] = ""
    name: str | None = None
    """Names the sink's checkpoint and metrics; defaults to its type (must be unique)."""
    batch_size: int | None = Field(None, ge=1)
    """Events per batch for this sink; unset = `delivery.batch_size`."""
    in_flight: int | None = Field(None, ge=1, le=64)
    """Batches handed to this sink before the oldest is acknowledged; unset = `delivery.in_flight`.
    Above 1, a retried batch may land after a later one (nothing is lost either way)."""

    def build(self) -> Sink:
        raise NotImplementedError

    @property
    def sink_name(self) -> str:
        return self.name or str(getattr(self, "type"))

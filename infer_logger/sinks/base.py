"""The sink contract: a config (data) builds a live sink (a connection)."""

from __future__ import annotations

import re
from collections.abc import Sequence
from typing import ClassVar, Protocol, runtime_checkable

from pydantic import BaseModel, ConfigDict, Field, field_validator

from infer_logger.cloudevents.event import CloudEvent
from infer_logger.documents import first_surrogate


@runtime_checkable
class Sink(Protocol):
    """Takes batches of events; raising means "not taken".

    `send_batch` raises `SinkError` for a failure worth retrying (the whole batch is retried) and
    `RejectedError` for events the sink will never take (they are dead-lettered). Returning means
    every event is durably with the sink: only then does the spool checkpoint move.
    """

    async def send_batch(self, events: Sequence[CloudEvent]) -> None: ...

    async def aclose(self) -> None: ...


# What a file name in the spool directory cannot hold: a path separator, NUL, control characters.
_NOT_IN_NAME = re.compile(r"[/\\\x00-\x1f\x7f]")
# `user:password@` up to the authority's last @ (a password may hold one); every URL of a list.
_USERINFO = re.compile(r"//[^/?#]*@")
_ADDRESS = ("url", "path", "bootstrap_servers", "topic", "host", "port", "index")


def without_userinfo(url: str) -> str:
    """`url` (or the text of a list of them) without `user:password@`: for messages, logs, dead
    letters and checkpoints' destinations."""
    return _USERINFO.sub("//", url)


class SinkConfig(BaseModel):
    """Base of every sink's settings; subclasses set `type` as a Literal and implement `build`."""

    model_config = ConfigDict(extra="forbid")

    kind: ClassVar[str] = ""
    name: str | None = None
    """Names the sink's checkpoint, dead-letter file and metrics; defaults to its type (must be
    unique). Anything a file name can hold: no `/`, `\\` or control characters, not starting
    with `.`, at most 200 bytes in UTF-8."""
    batch_size: int | None = Field(None, ge=1)
    """Events per batch for this sink; unset = `delivery.batch_size`."""
    in_flight: int | None = Field(None, ge=1, le=64)
    """Batches handed to this sink before the oldest is acknowledged; unset = `delivery.in_flight`.
    Above 1, a retried batch may land after a later one (nothing is lost either way)."""

    @field_validator("name")
    @classmethod
    def _file_name(cls, name: str | None) -> str | None:
        # It names files in the spool directory: a `/` could not be saved (so the spool was never
        # freed), a `..` would reach outside it. Anything else stays: a renamed sink's checkpoint
        # is orphaned and the whole spool sent again.
        if name is None or name == "":
            return name
        bad = _NOT_IN_NAME.search(name)
        if bad:
            raise ValueError(f"{name!r}: a sink name names files, so it cannot hold {bad.group()!r}")
        if name.startswith("."):
            raise ValueError(f"{name!r}: a sink name names files, so it cannot start with '.'")
        # It is also in /readyz's JSON and the metrics: a byte that is not UTF-8 (U+DC80..U+DCFF,
        # surrogateescape) made every /readyz a 500.
        if surrogate := first_surrogate(name):
            raise ValueError(f"{name!r}: a sink name cannot hold U+{ord(surrogate):04X}, which is not UTF-8 text")
        if len(name.encode("utf-8")) > 200:
            raise ValueError(f"{name[:20]!r}…: a sink name names files, so it is at most 200 bytes (UTF-8)")
        return name

    def build(self) -> Sink:
        raise NotImplementedError

    def destination(self) -> str:
        """Where it delivers, kept (as a digest) with its checkpoint: a renamed sink finds its own,
        another one given its name does not take it. Its address only (another timeout is the
        same place), a URL without user and password (a new password is too)."""
        address = {key: str(getattr(self, key)) for key in _ADDRESS if getattr(self, key, None) is not None}
        if "url" in address:
            address["url"] = without_userinfo(address["url"])
        return f"{getattr(self, 'type', '')}:{sorted(address.items())}"

    @property
    def sink_name(self) -> str:
        return self.name or str(self.type)

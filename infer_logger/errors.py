"""One error tree for infer-logger.

    InferLoggerError
    ├── ConfigError                 bad settings; names the field and the allowed values
    ├── InvalidEventError           a CloudEvent that breaks the spec; names the attribute
    │   └── MissingAttributeError
    ├── BinaryDataError             a malformed OIP binary tensor data body; names the tensor
    ├── SpoolError                  the on-disk spool cannot be used
    │   └── CorruptRecordError      a record failed its checksum or is cut short
    └── SinkError                   a sink could not take a batch; retried
        └── RejectedError           the sink refused events for good; dead-lettered, not retried
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from infer_logger.cloudevents.event import CloudEvent


class InferLoggerError(Exception):
    """Root of every error raised by infer-logger on purpose."""


class ConfigError(InferLoggerError, ValueError):
    def __init__(self, field: str, message: str) -> None:
        super().__init__(f"{field}: {message}")
        self.field = field
        self.message = message


class InvalidEventError(InferLoggerError, ValueError):
    item: int | None = None
    """In a batch, the position of the event it is about."""

    def __init__(self, attribute: str, message: str) -> None:
        super().__init__(f"{attribute}: {message}" if attribute else message)
        self.attribute = attribute
        self.message = message


class MissingAttributeError(InvalidEventError):
    def __init__(self, attribute: str) -> None:
        super().__init__(attribute, "required attribute is missing")


class BinaryDataError(InferLoggerError, ValueError):
    """A body of the binary tensor data extension that does not add up; `tensor` is None when the
    fault is the body's own (header, JSON part, trailing bytes)."""

    def __init__(self, tensor: str | None, message: str) -> None:
        super().__init__(f"tensor {tensor!r}: {message}" if tensor else message)
        self.tensor = tensor
        self.message = message


class SpoolError(InferLoggerError):
    pass


class SpoolBusyError(SpoolError):
    """Another process holds the spool's lock (it may let go: worth waiting for)."""


class CorruptRecordError(SpoolError):
    """`resume`: where the records go on past the bad one (its frame held), else None."""

    def __init__(self, message: str, resume: int | None = None) -> None:
        super().__init__(message)
        self.resume = resume


class StoreBusyError(InferLoggerError):
    """Another connection held the audit store's lock past the wait (it may let go: worth trying again)."""


class SinkError(InferLoggerError):
    """A sink failed to take a batch; the worker retries with backoff.

    `pending`: the events still to send, when the sink knows it took the others (empty: all of
    the batch); the worker then retries only those, so a flaky receiver does not get the rest again.
    """

    def __init__(self, message: str, *, retry_after: float | None = None,
                 pending: Sequence[CloudEvent] = ()) -> None:
        super().__init__(message)
        self.retry_after = retry_after
        self.pending = list(pending)

    def pending_among(self, sent: Sequence[CloudEvent]) -> set[int] | None:
        """The `id()`s of the pending events when there are some and each is one of `sent`, else
        None: a copy named instead would have its original taken for taken, and it was not."""
        pending = {id(e) for e in self.pending}
        return pending if pending and pending <= {id(e) for e in sent} else None


class RejectedError(SinkError):
    """The sink refused some events for good (e.g. HTTP 400): retrying cannot help.

    `events` lists the refused ones (all of the batch when empty); the rest were taken.
    `too_large`: refused for their size (what an HTTP front answers with 413).
    `together`: refused as one message (a batch POST), not each on its own: for its size, or for
    one bad event in it; each may still be taken alone or in a smaller batch, so the worker sends
    them again in halves.
    """

    def __init__(self, message: str, events: Sequence[CloudEvent] = (), *, too_large: bool = False,
                 together: bool = False, reasons: Sequence[str] = ()) -> None:
        super().__init__(message)
        self.events = list(events)
        self.too_large = too_large
        self.together = together
        self.reasons = list(reasons)
        """Each event's own reason, when they differ (refusals gathered from several sends)."""

    def taken(self, batch: Sequence[CloudEvent]) -> int:
        """How many events of `batch` were taken: those not named (naming other events, such as
        an explanation the sink made of them, does not make them fewer)."""
        if not self.events:
            return 0
        named = {id(e) for e in self.events}
        return sum(1 for e in batch if id(e) not in named)

    def refusals(self, batch: Sequence[CloudEvent]) -> list[tuple[CloudEvent, str]]:
        """The refused events of `batch` (what was sent) with the reason for each."""
        refused = self.events or list(batch)
        if len(self.reasons) == len(refused):
            return list(zip(refused, self.reasons, strict=True))
        return [(event, str(self)) for event in refused]

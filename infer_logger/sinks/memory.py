"""`MemorySink`: a sink double that keeps events in a list and fails on demand (for unit tests)."""

from __future__ import annotations

from collections.abc import Callable, Sequence

from infer_logger.cloudevents.event import CloudEvent
from infer_logger.errors import SinkError


class MemorySink:
    def __init__(self) -> None:
        self.events: list[CloudEvent] = []
        self.calls = 0
        self.closed = False
        # Returns an exception to raise for this batch, or None to take it.
        self.fail: Callable[[Sequence[CloudEvent]], Exception | None] = lambda batch: None

    async def send_batch(self, events: Sequence[CloudEvent]) -> None:
        self.calls += 1
        if (error := self.fail(events)) is not None:
            raise error
        self.events.extend(events)

    async def aclose(self) -> None:
        self.closed = True


def failing(times: int, error: Exception | None = None) -> Callable[[Sequence[CloudEvent]], Exception | None]:
    """A `fail` policy: the first `times` batches fail with `error` (a SinkError by default)."""
    left = [times]

    def policy(batch: Sequence[CloudEvent]) -> Exception | None:
        if left[0] > 0:
            left[0] -= 1
            return error or SinkError("down")
        return None

    return policy

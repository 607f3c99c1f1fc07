"""`Halving`: a sink whose batches refused together go again in halves.

A sink that sends a batch as one message (an http batch POST, a Kafka record batch) may have it
refused whole although each event, or a smaller batch, would be taken: for its size (413, a
topic's `max.message.bytes`), or for one bad event in it (a 400 to a batch POST):
`RejectedError(together=True)`. Those events go again in halves, in order, until each piece is
taken or an event is refused alone. The sink workers and everything else that calls
`send_batch` itself (the sources, the broker's Kafka channel, the explainer's replies) send
through it, so that only an event refused alone is dead-lettered.

It raises what a sink raises: `RejectedError` naming the events refused for good (the others
taken; `reasons` holds each one's own), or, for a failure worth retrying once part of the batch
was taken, `SinkError` whose `pending` are the events not taken (those refused so far among
them: they are refused again on the retry, never lost).
"""

from __future__ import annotations

from collections.abc import Sequence

from infer_logger.cloudevents.event import CloudEvent
from infer_logger.errors import RejectedError, SinkError
from infer_logger.sinks.base import Sink


def _split(exc: RejectedError, piece: Sequence[CloudEvent]) -> list[CloudEvent] | None:
    """The events to send again in halves, or None when the refusal is for good."""
    if not exc.together:
        return None
    refused = list({id(e): e for e in exc.events}.values()) or list(piece)  # each once: halves shrink
    held = {id(e) for e in piece}
    if not all(id(e) in held for e in refused):  # events not of the piece: the piece was refused
        refused = list(piece)
    # The halves shrink, so this ends at single events.
    return refused if 1 < len(refused) <= len(piece) else None


class Halving:
    """Wraps a sink; `send_batch` keeps the `Sink` contract (see the module docstring)."""

    def __init__(self, sink: Sink) -> None:
        self.sink = sink

    async def send_batch(self, events: Sequence[CloudEvent]) -> None:
        try:
            await self.sink.send_batch(events)
            return
        except RejectedError as exc:
            again = _split(exc, events)
            if again is None:
                raise
        refused: list[tuple[CloudEvent, str]] = []
        why: RejectedError | None = None  # the first refusal for good
        todo = [again[len(again) // 2:], again[:len(again) // 2]]  # a stack: the first half on top
        while todo:
            piece = todo.pop()
            try:
                await self.sink.send_batch(piece)
            except RejectedError as exc:
                if (again := _split(exc, piece)) is not None:
                    todo += [again[len(again) // 2:], again[:len(again) // 2]]
                    continue
                refused += exc.refusals(piece)
                why = why or exc
            except Exception as exc:  # retried by the caller, as the sink's own failure would be
                among = exc.pending_among(piece) if isinstance(exc, SinkError) else None
                left = [*(e for e, _ in refused), *(piece if among is None else [e for e in piece if id(e) in among]),
                        *(e for p in reversed(todo) for e in p)]
                raise SinkError(f"{exc} (after {len(events) - len(left)} of {len(events)} events were taken "
                                f"in smaller batches)", retry_after=getattr(exc, "retry_after", None),
                                pending=left) from exc
        if why is not None:
            raise RejectedError(f"{why} ({len(refused)} of {len(events)} events refused in smaller batches)",
                                [e for e, _ in refused], too_large=why.too_large,
                                reasons=[reason for _, reason in refused])

    async def aclose(self) -> None:
        await self.sink.aclose()

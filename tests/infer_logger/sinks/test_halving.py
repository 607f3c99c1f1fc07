"""`Halving`'s logic, with a sink double (the sinks that refuse together are tested against
real receivers in their own files, and through the sources that send through it)."""

from __future__ import annotations

import asyncio
from collections.abc import Sequence

import pytest

from infer_logger.cloudevents.event import CloudEvent
from infer_logger.errors import RejectedError, SinkError
from infer_logger.sinks.halving import Halving
from infer_logger.sinks.memory import MemorySink


def events(n: int) -> list[CloudEvent]:
    return [CloudEvent({"specversion": "1.0", "id": str(i), "source": "/s", "type": "t"}) for i in range(n)]


def ids(batch: Sequence[CloudEvent]) -> list[str]:
    return [e.id for e in batch]


def too_big(limit: int, alone: frozenset[str] | set[str] = frozenset()) -> MemorySink:
    """Refuses a batch of more than `limit` events together, and each event of `alone` even alone."""
    sink = MemorySink()
    sink.fail = lambda batch: (RejectedError("413", batch, too_large=True, together=True)
                               if len(batch) > limit or any(e.id in alone for e in batch) else None)
    return sink


async def test_a_batch_taken_whole_is_sent_once() -> None:
    sink = too_big(10)
    await Halving(sink).send_batch(events(10))
    assert sink.calls == 1 and ids(sink.events) == ids(events(10))


async def test_halves_until_taken_in_order() -> None:
    sink = too_big(3)
    await Halving(sink).send_batch(events(20))
    assert ids(sink.events) == ids(events(20))


async def test_only_an_event_too_large_alone_is_refused() -> None:
    sink = too_big(4, {"5", "11"})
    with pytest.raises(RejectedError) as info:
        await Halving(sink).send_batch(events(16))
    assert ids(info.value.events) == ["5", "11"] and info.value.too_large and not info.value.together
    assert ids(sink.events) == [str(i) for i in range(16) if i not in (5, 11)]
    assert "413" in str(info.value) and info.value.reasons == ["413", "413"]


async def test_each_refusal_keeps_its_own_reason() -> None:
    sink = too_big(1)
    refuse = sink.fail
    sink.fail = lambda batch: RejectedError(f"invalid {batch[0].id}") if len(batch) == 1 else refuse(batch)
    with pytest.raises(RejectedError) as info:
        await Halving(sink).send_batch(events(3))
    assert [(e.id, why) for e, why in info.value.refusals([])] == [
        ("0", "invalid 0"), ("1", "invalid 1"), ("2", "invalid 2")]


async def test_a_refusal_not_for_size_is_raised_as_it_is() -> None:
    sink = MemorySink()
    refusal = RejectedError("400 invalid", events(3)[1:2])
    sink.fail = lambda batch: refusal
    with pytest.raises(RejectedError) as info:
        await Halving(sink).send_batch(events(3))
    assert info.value is refusal and sink.calls == 1


async def test_a_failure_before_anything_was_taken_is_raised_as_it_is() -> None:
    sink = MemorySink()
    down = SinkError("down")
    sink.fail = lambda batch: down
    with pytest.raises(SinkError) as info:
        await Halving(sink).send_batch(events(3))
    assert info.value is down


async def test_a_failure_in_a_half_leaves_the_rest_pending() -> None:
    """What was taken is not sent again; what was refused so far is (refused again, never lost)."""
    sink = too_big(2, {"1"})
    refuse = sink.fail
    down = SinkError("down", retry_after=3.0)
    sink.fail = lambda batch: down if ids(batch) == ["4", "5"] else refuse(batch)
    with pytest.raises(SinkError) as info:
        await Halving(sink).send_batch(events(8))
    assert not isinstance(info.value, RejectedError)
    assert ids(sink.events) == ["0", "2", "3"]
    assert ids(info.value.pending) == ["1", "4", "5", "6", "7"] and info.value.retry_after == 3.0
    assert "3 of 8 events were taken" in str(info.value)


async def test_a_half_partly_taken_leaves_only_its_own_pending() -> None:
    class Partial(MemorySink):
        async def send_batch(self, batch: Sequence[CloudEvent]) -> None:
            if len(batch) > 4:
                raise RejectedError("413", batch, too_large=True, together=True)
            if ids(batch) == ["4", "5", "6", "7"]:
                self.events.extend(batch[:2])
                raise SinkError("cut off", pending=batch[2:])
            self.events.extend(batch)

    sink = Partial()
    with pytest.raises(SinkError) as info:
        await Halving(sink).send_batch(events(8))
    assert ids(info.value.pending) == ["6", "7"] and ids(sink.events) == [str(i) for i in range(6)]


async def test_an_other_error_in_a_half_becomes_a_sink_error() -> None:
    sink = too_big(2)
    refuse = sink.fail
    sink.fail = lambda batch: OSError("disk") if ids(batch) == ["2", "3"] else refuse(batch)
    with pytest.raises(SinkError) as info:
        await Halving(sink).send_batch(events(4))
    assert ids(info.value.pending) == ["2", "3"] and isinstance(info.value.__cause__, OSError)


async def test_aclose_closes_the_sink() -> None:
    sink = MemorySink()
    await Halving(sink).aclose()
    assert sink.closed


async def test_a_refusal_naming_events_not_of_the_piece_halves_the_piece() -> None:
    """Taken at its word, the foreign events were sent in halves and the piece's own never again:
    lost, counted delivered."""
    foreign = events(3)
    batch = [CloudEvent({**e.attributes, "id": f"b{e.id}"}) for e in events(4)]
    sink = MemorySink()
    sink.fail = lambda sent: RejectedError("400", foreign, together=True) if len(sent) > 2 else None
    await Halving(sink).send_batch(batch)
    assert ids(sink.events) == ids(batch)


async def test_pending_events_not_of_the_piece_leave_the_piece_pending() -> None:
    batch = events(4)
    sink = MemorySink()
    calls = 0

    def fail(sent: Sequence[CloudEvent]) -> Exception | None:
        nonlocal calls
        calls += 1
        if calls == 1:
            return RejectedError("413", sent, together=True)
        return SinkError("down", pending=[CloudEvent(dict(e.attributes)) for e in sent])  # copies

    sink.fail = fail
    with pytest.raises(SinkError) as info:
        await Halving(sink).send_batch(batch)
    assert ids(info.value.pending) == ids(batch) and all(any(p is e for e in batch) for p in info.value.pending)


async def test_a_refusal_naming_an_event_twice_ends() -> None:
    """[e0, e0] refused for each piece: a one-event piece was halved into [e0, e0] again, for ever."""
    batch = events(2)
    sink = MemorySink()
    sink.fail = lambda sent: RejectedError("400", [sent[0], sent[0]], together=True)
    with pytest.raises(RejectedError):
        await asyncio.wait_for(Halving(sink).send_batch(batch), 10)
    assert sink.calls < 10

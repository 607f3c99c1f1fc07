"""A broker's log and the triggers reading it: the spool (disk or memory) behind `Channel`.

Each trigger has its own reader and checkpoint, so a slow or dead subscriber holds back only
its own trigger. A trigger reads ahead of its checkpoint: batches are read, their matching
events delivered concurrently (at most `parallelism` in flight), and the checkpoint moves past
a batch once it and every batch before it settled; what was settled past it goes to the runner
taking over (a reload's, or the next run's, with the checkpoint: see `Ahead`). Healthy triggers
read the same batches at the same positions, so a batch is decoded once and shared (events are
never mutated).

A new trigger starts at the end of the log (as a new Knative trigger sees only new events); its
checkpoint is written at once, so a crash before its first delivery cannot skip events. A broker
with no trigger keeps nothing.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import hashlib
import logging
import re
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import NamedTuple, Protocol

import orjson

from infer_logger.cloudevents.event import CloudEvent
from infer_logger.errors import InferLoggerError, InvalidEventError
from infer_logger.spool import BATCH_BYTES, DiskSpool, MemorySpool, Position, SpoolReader

log = logging.getLogger(__name__)

TTL = "knativebrokerttl"
_INTEGER = re.compile(r"-?[0-9]+")
# Pass-through headers ride in the spool record under a key that no CloudEvent attribute can have.
_HEADERS = "@headers"
# A batch read for every trigger is decoded once and kept for the others, up to these (by count
# only it was `batch_size` events of up to `max_event_bytes`, 100 MiB a batch, times 64 batches).
_CACHE_BATCHES = 64
_CACHE_BYTES = 64 << 20
# Checkpoints are written at most this often per trigger (each is a file write and rename): at a
# low rate every event would otherwise cost one per trigger. A crash redelivers at most this much.
_COMMIT_INTERVAL = 0.05


def parse_ttl(raw: object) -> int:
    """A `knativebrokerttl` value as a CloudEvents Integer (signed 32-bit); raises InvalidEventError.

    int() would also take "1_0", " +5 " and other scripts' digits: a CloudEvents Integer is none
    of them; and it raises past 4300 digits (12 are past the 32-bit range already).
    """
    value: int | None = raw if type(raw) is int else None
    if isinstance(raw, str) and _INTEGER.fullmatch(raw):
        digits = raw.lstrip("-").lstrip("0") or "0"
        if len(digits) > 11:
            raise InvalidEventError(TTL, f"{raw[:20]}... is outside the signed 32-bit range")
        value = -int(digits) if raw.startswith("-") else int(digits)
    if value is None:
        raise InvalidEventError(TTL, f"must be an integer, not {raw!r}")
    if not -(2**31) <= value < 2**31:  # a bigger one could not even be stored
        raise InvalidEventError(TTL, f"{value} is outside the signed 32-bit range")
    return value


class ChannelError(InferLoggerError):
    """A broker's log did not take events (full, or Kafka unreachable): the sender may retry.

    `pending`: the positions (in the events appended) of those not stored, when the others were;
    None when none or which is not known."""

    def __init__(self, message: str, *, pending: Sequence[int] | None = None) -> None:
        super().__init__(message)
        self.pending = None if pending is None else list(pending)


def event_size(event: CloudEvent) -> int:
    """What an event weighs against `max_event_bytes`: its data and attributes."""
    return len(event.data or b"") + sum(len(k) + len(str(v)) for k, v in event.attributes.items())


class RefusedError(ChannelError):
    """The log refused events for good (e.g. larger than Kafka takes): a retry cannot help.

    `refused`: the positions (in the events appended) of the refused ones, the others stored;
    None: all of them."""

    def __init__(self, message: str, *, too_large: bool, refused: Sequence[int] | None = None) -> None:
        super().__init__(message)
        self.too_large = too_large
        self.refused = None if refused is None else list(refused)


class Handler(Protocol):
    """What a channel runs for each trigger (a `TriggerDispatcher`)."""

    settled: int

    def take(self, events: Sequence[CloudEvent]) -> list[CloudEvent]: ...

    async def deliver(self, event: CloudEvent) -> None: ...


class Channel(Protocol):
    ready: bool

    async def start(self) -> None: ...

    async def append(self, events: Sequence[CloudEvent]) -> None: ...

    async def attach(self, trigger: str, handler: Handler) -> None: ...

    async def detach(self, trigger: str, *, forget: bool, timeout: float) -> None: ...

    async def replace(self, trigger: str, handler: Handler, *, timeout: float) -> None: ...

    def lag(self, trigger: str) -> int | None: ...

    def forget_detached(self) -> None:
        """Once the triggers are attached at a channel's opening: drop the progress kept for any
        other (removed while the broker was down), so one added back later starts as new."""

    async def aclose(self, timeout: float) -> None: ...


def pack(event: CloudEvent) -> CloudEvent:
    if not event.meta:
        return event
    return CloudEvent({**event.attributes, _HEADERS: orjson.dumps(event.meta).decode()}, event.data)


def unpack(event: CloudEvent) -> CloudEvent:
    if _HEADERS not in event.attributes:
        return event
    attributes = dict(event.attributes)
    meta = orjson.loads(str(attributes.pop(_HEADERS)))
    return CloudEvent(attributes, event.data, meta if isinstance(meta, dict) else {})


class SpoolChannel:
    def __init__(self, spool: DiskSpool | MemorySpool, *, batch_size: int = 100, parallelism: int = 64) -> None:
        self.spool = spool
        self.batch_size = batch_size
        self.parallelism = parallelism
        self.ready = True
        self._runners: dict[str, _Runner] = {}
        self._closing = False  # replies of deliveries still draining are kept for the next start
        self._cache: dict[Position, tuple[list[CloudEvent], Position, int]] = {}
        self._cached_bytes = 0

    async def start(self) -> None:
        self.spool.start_fsync()

    async def append(self, events: Sequence[CloudEvent]) -> None:
        if not self._runners and not self._closing:
            # No trigger, no one to deliver to (a later trigger starts at the end anyway): keeping
            # them would only grow the log, which nothing would ever collect.
            return
        for i, event in enumerate(events):
            if not self.spool.append(pack(event)):
                raise ChannelError("the broker's log cannot take events (full, or its disk refuses: see its log)",
                                   pending=range(i, len(events)) if i else None)

    async def attach(self, trigger: str, handler: Handler) -> None:
        spool = self.spool
        fresh = isinstance(spool, MemorySpool) or not spool.checkpoint_path(trigger).exists()
        reader = spool.reader(trigger)
        if fresh:
            # Not collecting: at start, a trigger with undelivered events may come after this
            # one, not yet attached to claim the segments (a restart never appends to old ones).
            reader.commit(spool.tail(), force=True, collect=False)
        runner = self._runners[trigger] = _Runner(self, reader, handler)
        runner.start()

    async def detach(self, trigger: str, *, forget: bool, timeout: float) -> None:
        runner = self._runners.pop(trigger, None)
        if runner is None:
            return
        await runner.stop(timeout)
        self.spool.remove_reader(trigger, forget=forget)

    async def replace(self, trigger: str, handler: Handler, *, timeout: float) -> None:
        """A changed trigger: the new handler goes on from the old one's checkpoint, past the
        events the old one settled beyond it."""
        old = self._runners[trigger]
        await old.stop(timeout)
        runner = self._runners[trigger] = _Runner(self, old.reader, handler, settled=old.settled_ahead())
        runner.start()

    def lag(self, trigger: str) -> int | None:
        """Bytes behind the trigger's progress (its checkpoint file may trail by _COMMIT_INTERVAL)."""
        runner = self._runners.get(trigger)
        if runner is None:
            return None
        return runner.reader.lag(runner.committed)

    def forget_detached(self) -> None:
        # A checkpoint outlives a trigger removed from the files while the broker was down: added
        # back, it went on from there and got every event sent while it did not exist (removed
        # by a reload, its checkpoint goes at once).
        if isinstance(self.spool, DiskSpool):
            for name in self.spool.checkpointed():
                if name not in self._runners:
                    self.spool.remove_reader(name, forget=True)

    async def aclose(self, timeout: float) -> None:
        self._closing = True
        await asyncio.gather(*(self.detach(name, forget=False, timeout=timeout) for name in list(self._runners)))
        self.spool.close()

    def read(self, reader: SpoolReader, start: Position, count: int | None = None,
             stop: Position | None = None) -> tuple[list[CloudEvent], Position]:
        """The batch at `start`, decoded once for every trigger that reads it; with `count`, the
        `count` events there, or with `stop`, none from there on (a batch as an earlier runner
        read it, or up to one: not shared)."""
        hit = self._cache.get(start)
        if hit is not None and count is None and stop is None:
            return hit[0], hit[1]  # not for a batch as read before: a cached read may have gone on past a segment's end
        # A batch read again at its recorded size is read whole, as it was.
        events, end = reader.read(count or self.batch_size, start, stop, max_bytes=None if count else BATCH_BYTES)
        events = [unpack(e) for e in events]
        if events and count is None and stop is None:
            size = sum(event_size(e) for e in events)  # attributes too: an extension may be the weight
            while self._cache and (len(self._cache) >= _CACHE_BATCHES or self._cached_bytes + size > _CACHE_BYTES):
                self._cached_bytes -= self._cache.pop(next(iter(self._cache)))[2]
            self._cache[start] = (events, end, size)
            self._cached_bytes += size
        return events, end


class Settled(NamedTuple):
    """One batch a runner read past its checkpoint, as the next runner must find it again."""

    size: int  # events
    digest: str  # of their ids
    settled: frozenset[int]  # indices of those settled
    end: Position  # where the batch ended (a read of `count` events may stop short of a segment's end)


Ahead = dict[Position, Settled]
"""What a trigger settled past its checkpoint, by batch start. The checkpoint waits for the
oldest event still in flight, and everything settled after it was delivered again: a runner
taking over (a reload's, or the next run's: it is kept with the checkpoint) reads each batch
again at its size and skips the settled events where the batch read has the recorded ids and
ends no later than it did (see `_Runner._recorded`)."""


def _digest(ids: Sequence[str]) -> str:
    return hashlib.blake2b("\n".join(ids).encode(), digest_size=8).hexdigest()  # ids hold no control characters


def _ahead_to_json(ahead: Ahead) -> list[list[object]] | None:
    """As the checkpoint keeps it: the indices not settled (fewer, as a rule)."""
    return [[start.segment, start.offset, e.size, e.digest, sorted(set(range(e.size)) - e.settled),
             e.end.segment, e.end.offset] for start, e in sorted(ahead.items())] or None


_MAX_RECORDED = 100_000
"""Events of one recorded batch, at most (a trigger reads `batch_size` at a time)."""


def _ahead_from_json(data: object) -> Ahead:
    ahead: Ahead = {}
    try:
        for segment, offset, size, digest, unsettled, end_segment, end_offset in data or ():  # type: ignore[attr-defined]
            start, end = Position(int(segment), int(offset)), Position(int(end_segment), int(end_offset))
            unsettled = [int(i) for i in unsettled]
            # What a run writes: no checkpoint file says otherwise unless edited or damaged.
            if not (0 <= int(size) <= _MAX_RECORDED and start.segment >= 0 and start.offset >= 0 and end > start
                    and all(0 <= i < int(size) for i in unsettled)):
                raise ValueError(f"a batch recorded at {start.segment}:{start.offset} is not one a run records")
            ahead[start] = Settled(int(size), str(digest), frozenset(range(int(size))) - frozenset(unsettled), end)
    except (TypeError, ValueError) as exc:  # a file of another version, or edited: all goes again
        log.warning("ignoring what a trigger settled past its checkpoint, unreadable: %s", exc)
        return {}
    return ahead


@dataclass(slots=True)
class _Batch:
    start: Position
    end: Position
    ids: tuple[str, ...] = ()  # of the events read, to know them again
    left: int = 1  # one for the reading itself, until every matching event is scheduled
    considered: int = 0  # leading events scheduled or filtered out (all, once the batch is read whole)
    in_flight: set[int] = field(default_factory=set)  # indices of the events being delivered
    before: frozenset[int] = frozenset()  # indices a runner this one replaced had settled

    def settled(self) -> frozenset[int]:
        """Indices of the events delivered, dead-lettered or filtered out."""
        return frozenset(range(self.considered)) - self.in_flight | self.before


class _Runner:
    def __init__(self, channel: SpoolChannel, reader: SpoolReader, handler: Handler, *,
                 settled: Ahead | None = None) -> None:
        self.channel = channel
        self.reader = reader
        self.handler = handler
        self.read_pos = self.committed = reader.position
        # What the runner before this one settled past the checkpoint (see Ahead): a reload's
        # handed over, else the last run's, kept with the checkpoint.
        self._settled = settled if settled is not None else _ahead_from_json(reader.ahead)
        self._starts = collections.deque(sorted(self._settled))  # those not yet passed, in log order
        reader.ahead = None
        self._window: collections.deque[_Batch] = collections.deque()
        self._commit_timer: asyncio.TimerHandle | None = None
        self._slots = asyncio.Semaphore(channel.parallelism)
        self._deliveries: set[asyncio.Task[None]] = set()
        self._stopping = False
        self._task: asyncio.Task[None] | None = None

    def start(self) -> None:
        self._task = asyncio.get_running_loop().create_task(self._run())

    async def _run(self) -> None:
        loop = asyncio.get_running_loop()
        while not self._stopping:
            again, stop = self._recorded()
            try:
                if again is not None and again.size == 0:  # it only moved past a segment's end or a corrupt stretch
                    events, end = self.channel.read(self.reader, self.read_pos, None, again.end)
                else:
                    events, end = self.channel.read(self.reader, self.read_pos, again.size if again else None, stop)
            except OSError as exc:
                log.error("reading the broker's log: %s; trying again in 1s", exc)
                await asyncio.sleep(1.0)
                continue
            if not events and end == self.read_pos:
                await self.reader.wait(0.5)
                continue
            batch = _Batch(self.read_pos, end, tuple(event.id for event in events))
            events_left = events
            # The same batch: the same ids, read no further than it ended (a read past it went on
            # from a segment's lost tail into another); it ends where it did, not short of a
            # segment boundary it crossed.
            if (again is not None and len(events) == again.size and end <= again.end
                    and _digest(batch.ids) == again.digest):
                batch.end = end = again.end
                if again.settled:
                    batch.before = again.settled
                    events_left = [event for i, event in enumerate(events) if i not in again.settled]
            self._window.append(batch)
            taken = self.handler.take(events_left)
            index = {id(event): i for i, event in enumerate(events)}
            for event in taken:
                batch.considered = i = index[id(event)]  # those before it are scheduled or filtered out
                await self._slots.acquire()
                batch.left += 1
                batch.in_flight.add(i)
                task = loop.create_task(self._deliver(event, i, batch))
                self._deliveries.add(task)
                task.add_done_callback(self._deliveries.discard)
            batch.considered = len(events)
            self.read_pos = end
            batch.left -= 1
            self._advance()

    async def _deliver(self, event: CloudEvent, index: int, batch: _Batch) -> None:
        try:
            await self.handler.deliver(event)
        finally:
            self._slots.release()
        batch.left -= 1  # not on cancellation: a cancelled delivery is redelivered after restart
        batch.in_flight.discard(index)
        self._advance()

    def _recorded(self) -> tuple[Settled | None, Position | None]:
        """The runner before's record of the batch at `read_pos`, to read it again at its size
        (live traffic reads small batches, which a read of `batch_size` would not line up with),
        and the start of the next recorded batch, to read no further before it.

        A batch recorded as starting at the end of a segment since deleted (its checkpoint's
        save deletes it) starts at the next segment's beginning now. A record is only a
        candidate: `_run` applies it to a batch read of its size that has its ids and ends no
        later than it did. A read from a place an overflow dropped, or past a tail a crash cut,
        goes on with later events (and a response shares its request's id), but then `size`
        events end later: only where none of the batch's events were lost do they end as it did."""
        found = None
        while self._starts and self._starts[0] <= self.read_pos:
            start = self._starts.popleft()
            entry = self._settled.pop(start, None)
            if entry is not None and (start == self.read_pos or entry.end > self.read_pos):
                found = entry
        # Not past a record whose place the log no longer holds: the read would stop short for good.
        stop = next((start for start in self._starts if self.reader.holds(start)), None)
        return found, stop

    def settled_ahead(self) -> Ahead:
        """The events settled past the checkpoint (also those the runner before settled that
        this one has not read again)."""
        # Not read yet: one starting at the end of a segment since deleted ends past the checkpoint
        # (`_recorded` takes it at the next segment's start).
        ahead = {start: entry for start, entry in self._settled.items()
                 if start >= self.committed or entry.end > self.committed}
        for batch in self._window:  # every one, settled events or not: its size lines the next reads up
            ahead[batch.start] = Settled(len(batch.ids), _digest(batch.ids), batch.settled(), batch.end)
        return ahead

    def _advance(self) -> None:
        end = None
        while self._window and self._window[0].left == 0:
            end = self._window.popleft().end
        if end is not None:
            self.committed = end
            if self._commit_timer is None:
                self._commit_timer = asyncio.get_running_loop().call_later(_COMMIT_INTERVAL, self._commit)

    def _commit(self, *, force: bool = False) -> None:
        self._commit_timer = None
        if self.committed == self.reader.position and not force:
            return
        try:
            self.reader.commit(self.committed, force=force)
        except OSError as exc:  # the next batch writes it again; meanwhile a restart redelivers
            log.error("trigger checkpoint not written: %s", exc)

    async def stop(self, timeout: float) -> None:
        """Stop reading; give deliveries in flight `timeout` seconds, then cancel them."""
        self._stopping = True
        self.reader.wake()
        if self._task is not None:
            self._task.cancel()  # it may be waiting for a delivery slot
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
        if self._deliveries:
            _, pending = await asyncio.wait(list(self._deliveries), timeout=timeout)
            for task in pending:
                task.cancel()
            await asyncio.gather(*pending, return_exceptions=True)
        if self._commit_timer is not None:
            self._commit_timer.cancel()
        self.reader.ahead = _ahead_to_json(self.settled_ahead())  # for the next run
        self._commit(force=True)

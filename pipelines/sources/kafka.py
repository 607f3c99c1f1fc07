"""`kafka` source: a consumer group that hands inference events to a subscriber, at-least-once.

One loop: fill a batch (poll in the consumer's own thread), decode it with the CloudEvents
Kafka binding (binary and structured), give the events to the subscriber, dead-letter what is
not a CloudEvent, and only then commit the batch's offsets. A failing subscriber is retried
with backoff and nothing is committed or skipped meanwhile; while it fails, and while a slow one
works, the partitions are paused and polled, so the consumer stays in its group and learns of
rebalances.

Rebalances lose and reorder nothing: every consumer call, and so every rebalance callback,
runs in that one thread between the loop's steps. A revoke drops the records of the revoked
partitions from the batch in hand (uncommitted, their next owner reads them again from the
committed offset) and commits what was handled but not yet committed. Record key = event id
keeps an id's events in one partition, so in one consumer's batches, in order; the subscriber
keeps that order as far as it says (the http sink sends an id's events one after another, a
failed one holding back the later ones; other ids' events arrive in any order).

A stop with a batch handled in part (a subscriber given up on mid-batch, as the broker does with
a delivery stuck in retries) commits each partition up to its first record not handled and names
the handled ones past it in the commit's metadata (`infer-logger/settled:` and ranges of offsets
relative to the committed one). Whoever owns the partition next reads that at assignment and
skips them: what was delivered is not delivered again. Commits keep naming those not yet passed.
"""

from __future__ import annotations

import asyncio
import base64
import itertools
import logging
import queue
import re
import threading
import time
from collections.abc import Callable, Coroutine, Sequence
from concurrent.futures import Executor, Future
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Annotated, Any, Literal, TypeVar, cast

import orjson
from pydantic import Field, field_validator, model_validator

from infer_logger import appending, deadletter, fields
from infer_logger.cloudevents.event import CloudEvent
from infer_logger.cloudevents.kafka import KafkaRecord, from_kafka, to_kafka_structured
from infer_logger.dispatch import Backoff
from infer_logger.errors import ConfigError, RejectedError, SinkError
from infer_logger.sinks.base import Sink
from infer_logger.sinks.halving import Halving
from infer_logger.sinks.kafka import (
    CLIENT,
    NO_CLIENT,
    BootstrapServers,
    ClientValue,
    checked_config,
    client_logger,
)
from pipelines.sources.base import SourceConfig

if CLIENT:  # else the config still validates, and `build()` says what to install
    from confluent_kafka import (
        Consumer,
        KafkaError,
        KafkaException,
        Message,
        Producer,
        TopicPartition,
    )

log = logging.getLogger(__name__)

T = TypeVar("T")
Headers = list[tuple[str, str | bytes | None]]
PartitionKey = tuple[str, int]

# Headers added to a dead-lettered record (its own headers, key and value are kept as they were).
REASON_HEADER = "dead-letter-reason"
TOPIC_HEADER = "dead-letter-topic"
PARTITION_HEADER = "dead-letter-partition"
OFFSET_HEADER = "dead-letter-offset"
DROPPED_HEADER = "dead-letter-value-bytes"  # a copy too large to keep: its value's size, value and headers left out

Letter = tuple[bytes | None, bytes | None, Headers]
"""(value, key, headers) of a dead-letter record."""

_POLL = 0.1  # seconds a poll may block: bounds how late `stop()` is noticed
_KEEPALIVE = 1.0  # seconds between polls while the subscriber works on a batch
_DEAD_LETTER_TIMEOUT = 10.0  # seconds to wait for the dead-letter topic's acknowledgements
_DEAD_LETTER_MESSAGE_TIMEOUT_MS = 30_000  # the dead-letter producer's delivery timeout (librdkafka: 300 s)
_IN_FLIGHT_WAIT = 35.0  # seconds in-flight dead letters may take to settle: past the delivery timeout
_METADATA_REFRESH_MS = 5000  # topic metadata refresh (librdkafka: 300000)
_SETTLED = "infer-logger/settled:"  # commit metadata naming records handled past the committed offset
_SETTLED_MAX_CHARS = 3000  # Kafka refuses metadata over offset.metadata.max.bytes (4096 by default)
_SETTLED_MAX = 100_000  # records one commit may name: those past it are delivered again instead
_RANGE = re.compile(r"([0-9]{1,19})(?:-([0-9]{1,19}))?")
_COMMITTED_TIMEOUT = 10.0  # seconds to read a new assignment's commit metadata
_PROBE_EVERY = 1.0  # seconds between metadata requests asking whether a broker is back
_PROBE_TIMEOUT = 0.5  # seconds one may take (it holds the consumer's thread while none answers)
_TOPIC_NAME = re.compile(r"[A-Za-z0-9._-]{1,249}")  # what Kafka accepts as a topic's name (not "." or "..")
_SAY_EVERY = 60.0  # seconds between two warnings of one client error code
_SAY_SKIPPED = 10  # records skipped (no dead-letter setting) logged one by one per batch; the rest counted
_COMMIT_SLOW = 5.0  # seconds a commit may wait for Kafka before it is said (log, /readyz)
# Seconds a stop waits for the consumer's close (its last commit, leaving the group). librdkafka
# waits for ever on a commit while the coordinator does not answer (a stalled broker).
_CLOSE_TIMEOUT = 10.0


class KafkaSourceConfig(SourceConfig):
    type: Literal["kafka"] = "kafka"
    bootstrap_servers: BootstrapServers
    """`host:port[,host:port...]` of the brokers to start from."""
    topics: list[Annotated[str, Field(min_length=1)]] = Field(min_length=1)
    """Topics to read; a name starting with `^` is a regular expression."""
    group_id: str = Field("infer-logger", min_length=1)
    """The consumer group: consumers sharing it share the topics' partitions."""
    batch_size: int = Field(default=500, ge=1)
    """Most events handed to the subscriber at once."""
    batch_timeout: fields.Seconds = Field(default=0.5, gt=0)
    """Seconds to wait for a first record before looking again (and at `stop()`)."""
    auto_offset_reset: Literal["earliest", "latest"] = "earliest"
    """Where a group without a committed offset starts."""
    session_timeout_ms: int = Field(default=45_000, ge=1_000)
    """How long the group waits for a silent consumer before giving its partitions away."""
    retry_max: fields.Seconds = Field(default=30.0, gt=0)
    """Longest pause, in seconds, between two attempts at a failing subscriber."""
    dead_letter_topic: str | None = None
    """Records that are not CloudEvents (or that the subscriber refused) go here, with headers
    `dead-letter-reason`, `-topic`, `-partition`, `-offset`; a copy too large for the producer or
    the topic goes without its value and own headers, `dead-letter-value-bytes` saying its size."""
    dead_letter_file: fields.AppendedPath | None = None
    """... or are appended here as JSON lines; with neither, they are logged and skipped. Refused
    events that are no records (an explanation the subscriber made) go as events: structured
    CloudEvents with `dead-letter-reason` to the topic, `{reason, attributes, data}` to the file."""
    config: dict[str, ClientValue] = Field(default_factory=dict)
    """librdkafka properties passed through last (TLS, SASL, `max.poll.interval.ms`,
    `partition.assignment.strategy`, ...); the dead-letter producer gets all but the consumer's own,
    and a delivery timeout of its own (30 s: a stalled broker holds a batch's dead letters no longer)."""

    @field_validator("config")
    @classmethod
    def _check_config(cls, value: dict[str, ClientValue]) -> dict[str, ClientValue]:
        return checked_config(value, group="group_id")  # the dead-letter producer gets it too

    @field_validator("topics")
    @classmethod
    def _check_patterns(cls, topics: list[str]) -> list[str]:
        # librdkafka refused a bad one only once subscribing, a KafkaException out of `run()`.
        for topic in topics:
            if topic.startswith("^"):
                try:
                    re.compile(topic)
                except re.error as exc:
                    raise ValueError(f"{topic!r} is no regular expression: {exc}") from None
            elif (why := _illegal_topic(topic)) is not None:
                raise ValueError(why)
        return topics

    @field_validator("dead_letter_topic")
    @classmethod
    def _check_dead_letter_topic(cls, topic: str | None) -> str | None:
        # A name Kafka never accepts was found out at the first dead letter, retried for ever: the
        # offsets held at it for good.
        if topic is not None:
            if (why := _illegal_topic(topic)) is not None:
                raise ValueError(why)
            if topic in ("__consumer_offsets", "__transaction_state"):
                raise ValueError(f"{topic!r} is one of Kafka's internal topics")
        return topic

    @model_validator(mode="after")
    def _check_dead_letter(self) -> KafkaSourceConfig:
        if self.dead_letter_topic is not None and self.dead_letter_file is not None:
            raise ValueError("dead_letter_topic and dead_letter_file: choose one")
        dead = self.dead_letter_topic
        if dead is not None and any(t == dead or (t.startswith("^") and re.search(t, dead)) for t in self.topics):
            raise ValueError(f"dead_letter_topic {dead!r} is also read: records would loop")
        return self

    def consumer_config(self) -> dict[str, ClientValue]:
        return {
            "bootstrap.servers": self.bootstrap_servers,
            "group.id": self.group_id,
            "enable.auto.commit": False,  # offsets move only after the subscriber took the events
            "enable.auto.offset.store": False,
            "auto.offset.reset": self.auto_offset_reset,
            "session.timeout.ms": self.session_timeout_ms,
            "reconnect.backoff.max.ms": 1000,
            # A topic subscribed to before it exists (a sidecar's first event creates it) or new
            # topics matching a `^regex` subscription: seen within seconds, not librdkafka's 5 min.
            "topic.metadata.refresh.interval.ms": _METADATA_REFRESH_MS,
            **self.config,
        }

    def build(self, subscriber: Sink) -> KafkaSource:
        if not CLIENT:
            raise ConfigError("type", NO_CLIENT)
        return KafkaSource(self, subscriber)


@dataclass(slots=True)
class _Record:
    msg: Message
    event: CloudEvent | None  # None: dead-lettered, for `reason`
    reason: str = ""
    taken: bool = False  # handled: by the subscriber (or dead-lettered), in this run or one before

    @property
    def partition(self) -> PartitionKey:
        return self.msg.topic() or "", self.msg.partition() or 0


class KafkaSource:
    def __init__(self, config: KafkaSourceConfig, subscriber: Sink) -> None:
        self.config = config
        self.subscriber = subscriber
        self._send = Halving(subscriber).send_batch  # batches refused together go again in halves
        self.address = config.bootstrap_servers
        self.assignment: frozenset[PartitionKey] = frozenset()
        """Partitions this consumer owns now."""
        self.delivered = 0
        self.dead_lettered = 0
        self.skipped = 0  # records neither delivered nor dead-lettered: no dead-letter setting, too large
        self._backoff = Backoff(maximum=config.retry_max)
        # Every consumer call runs in this one thread (the rebalance callbacks with them).
        self._thread = _DaemonThread("kafka-source")
        self._batch: list[_Record] = []
        self._strays: list[tuple[CloudEvent, str]] = []  # refused events that are no records of it
        self._uncommitted: dict[PartitionKey, int] = {}
        self._settled: dict[PartitionKey, set[int]] = {}  # offsets handled past the committed one
        self._held = False
        self._stopping = False
        self._wake = asyncio.Event()
        self._running = False
        self._done = asyncio.Event()
        self._task: asyncio.Future[None] | None = None  # `run()`'s loop
        self._gave_up = False  # `aclose` cancelled the loop
        self._closed = False
        self._stuck = False  # a close not done within _CLOSE_TIMEOUT: the thread is Kafka's now
        self._dead_letters: Producer | None = None
        self._delivering: threading.Event | None = None  # set once the subscriber has the batch
        self._said: dict[int, float] = {}  # client error code: when last logged
        self._dead_letters_fail: str | None = None  # why the batch's dead letters are not written, retried
        self._unreachable = False  # no broker answered since librdkafka said all were down
        self._probed = 0.0
        self._commit_began: float | None = None  # a commit waiting for Kafka: since when (monotonic)
        self._consumer = self._client(Consumer, config.consumer_config())
        if config.dead_letter_topic is not None:
            # Made now: a setting it refuses (one the consumer takes) is a ConfigError at build,
            # not a first dead letter retried for ever.
            try:
                self._dead_letter_producer()
            except ConfigError:
                self._consumer.close()
                raise

    def _client(self, cls: Callable[[dict[str, Any]], T], conf: dict[str, Any]) -> T:
        full = {**conf, "error_cb": self._on_error, "logger": client_logger(__name__)}
        try:
            return cls(full)
        except (KafkaException, TypeError, ValueError) as exc:
            raise ConfigError("config", f"kafka source {self.address}: {exc}") from exc

    async def _call(self, fn: Callable[..., T], *args: Any) -> T:
        return await asyncio.get_running_loop().run_in_executor(self._thread, fn, *args)

    # -- the loop -------------------------------------------------------------------------------

    async def start(self) -> None:
        """Nothing to take first: `run` waits for brokers that are not there yet."""

    def stats(self) -> dict[str, int]:
        return {"delivered": self.delivered, "dead_lettered": self.dead_lettered, "skipped": self.skipped}

    @property
    def problem(self) -> str | None:
        """Why it cannot read now or cannot get past a batch (the ingest's `/readyz` reason), else None."""
        if self._unreachable:
            return f"no Kafka broker reachable at {self.address}"
        if (began := self._commit_began) is not None and (waited := time.monotonic() - began) >= _COMMIT_SLOW:
            return f"offsets commit not answered for {waited:.0f}s by Kafka at {self.address}"
        return self._dead_letters_fail

    async def run(self) -> None:
        if self._closed:
            return
        self._running = True
        # A task of its own: `aclose` cancels the loop, never the caller's task awaiting `run`.
        self._task = asyncio.ensure_future(self._consume())
        try:
            await self._task
        except asyncio.CancelledError:
            current = asyncio.current_task()
            if not (self._gave_up and current is not None and not current.cancelling()):
                raise
        finally:
            if not self._done.is_set():  # cancelled before its first step: its end never ran
                try:
                    await self._close(self._close_consumer)
                finally:
                    self._done.set()

    async def _consume(self) -> None:
        try:
            await self._call(self._subscribe)
            while not self._stopping:
                self._batch = await self._call(self._fill)
                if not self._batch:
                    continue
                if not await self._handle():
                    # Stopping while the subscriber still fails: what it took is committed.
                    await self._committing(self._commit_handled)
                    break
                await self._committing(self._commit_and_resume)
        finally:
            try:
                await self._close(self._close_consumer)
            finally:  # also when a stop that would not wait cancelled the close
                self._done.set()

    def stop(self) -> None:
        self._stopping = True
        self._wake.set()

    async def drain(self, timeout: float) -> bool:
        self.stop()
        if self._running:
            try:
                await asyncio.wait_for(self._done.wait(), timeout)
            except TimeoutError:
                return False
        return True

    async def aclose(self) -> None:
        if self._closed:
            return
        self._closed = True
        if self._running:
            # The step in hand gets _CLOSE_TIMEOUT (callers that give the batch in hand longer
            # drain first), then is cancelled: a subscriber or a consumer call that does not end.
            if not await self.drain(_CLOSE_TIMEOUT) and self._task is not None:
                self._gave_up = True
                self._task.cancel()
            await self._done.wait()  # the close in run's end is bounded
        else:
            await self._close(self._close_consumer)
        if self._dead_letters is not None:
            await self._close(self._dead_letters.close)  # nothing queued: every batch was flushed
        self._thread.shutdown()

    @property
    def left_closing(self) -> bool:
        """Whether a close Kafka did not answer within _CLOSE_TIMEOUT was given up on."""
        return self._stuck

    async def _close(self, close: Callable[[], object]) -> None:
        """`close` in the consumer's thread, waited for up to _CLOSE_TIMEOUT: a call Kafka never
        answers (a commit to a stalled broker) holds the thread, and the stop goes on without it."""
        if self._stuck:
            return
        closing = asyncio.wrap_future(self._thread.submit(close))
        deadline = asyncio.get_running_loop().time() + _CLOSE_TIMEOUT
        cancelled = False
        while not closing.done():
            try:
                if not (await asyncio.wait([closing], timeout=deadline - asyncio.get_running_loop().time()))[0]:
                    break
            except asyncio.CancelledError:
                # A stop that gave the batch up: the close still gets its time (else the process's
                # exit cut it short: no leave, the group waits session.timeout.ms for it).
                cancelled = True
        if not closing.done():
            self._stuck = True
            log.error("kafka source %s: Kafka did not answer within %gs of the stop (a commit, leaving the "
                      "group): left closing; what was not committed comes again", self.address, _CLOSE_TIMEOUT)
        if cancelled:
            raise asyncio.CancelledError
        if closing.done():
            closing.result()

    async def _handle(self) -> bool:
        """Events to the subscriber, then dead letters; True once all of the batch is handled."""
        attempt = 0
        delivered = False
        while True:
            try:
                if not delivered:
                    await self._deliver([r for r in self._batch if r.event is not None and not r.taken])
                    delivered = True
                # Each written once: a retry after a failure here sends nothing to the subscriber
                # again (asked again, it may not refuse the same way).
                await self._dead_letter([r for r in self._batch if r.event is None and not r.taken])
                for r in self._batch:
                    r.taken = True
                if self._strays:
                    await self._call(self._dead_letter_events, self._strays)
                self._dead_letters_fail = None
                return True
            except Exception as exc:  # noqa: BLE001 - any failure of the subscriber is retried, never fatal
                attempt += 1
                if delivered:  # the dead letters: retried (it may pass), but the offsets wait meanwhile
                    self._dead_letters_fail = f"dead letters not written, the offsets wait for them: {exc}"
                if self._stopping:
                    log.warning("kafka source %s: stopping with a batch not all handled (%s): what was not "
                                "comes again", self.address, exc)
                    return False
                delay = self._backoff.delay(attempt, getattr(exc, "retry_after", None))
                if attempt == 1 or attempt % 10 == 0:
                    log.warning("kafka source %s: %s; retry %d in %.2fs", self.address, exc, attempt, delay)
                try:
                    await asyncio.wait_for(self._wake.wait(), delay)
                except TimeoutError:
                    pass
                await self._call(self._hold)  # a revoke meanwhile shrinks self._batch

    async def _deliver(self, records: list[_Record]) -> None:
        if not records:
            return
        sent = [cast(CloudEvent, r.event) for r in records]
        try:
            await self._polling(self._send(sent))
        except RejectedError as exc:
            refusals = exc.refusals(sent)
            why = {id(e): reason for e, reason in refusals}
            batch = {id(e) for e in sent}
            for r in records:
                if id(r.event) in why:
                    r.event, r.reason = None, f"refused by the subscriber: {why[id(r.event)]}"
            # Events the subscriber made of these or earlier batches' (an explanation, a cached
            # half): no record of this batch to dead-letter, so written as events, before the
            # offsets move past what made them.
            self._strays += [(e, reason) for e, reason in refusals if id(e) not in batch]
        except SinkError as exc:
            # It took all but `pending` (part of a batch sent in halves, then a failure): those are
            # not sent again.
            if (pending := exc.pending_among(sent)) is not None:
                for r in records:
                    r.taken = id(r.event) not in pending
                self.delivered += sum(1 for r in records if r.taken)
            raise
        for r in records:
            r.taken = r.taken or r.event is not None  # a stop before the dead letters commits these
        self.delivered += sum(1 for r in records if r.event is not None)

    async def _committing(self, commit: Callable[[], None]) -> None:
        """`commit` in the consumer's thread, warned of once it waits past _COMMIT_SLOW (see `_commit`)."""
        step = asyncio.ensure_future(self._call(commit))
        try:
            if not (await asyncio.wait({step}, timeout=_COMMIT_SLOW))[0]:
                log.warning("kafka source %s: offsets commit not answered for %gs (Kafka unreachable?); "
                            "waiting for it", self.address, _COMMIT_SLOW)
            await step
        finally:
            step.cancel()  # a stop cancelling the wait: the call itself runs on (as `_call`'s)

    async def _polling(self, work: Coroutine[Any, Any, None]) -> None:
        """Await `work`, polling the paused consumer every second while it runs.

        A subscriber that retries inside `send_batch` (the broker's trigger dispatcher: minutes,
        with its default delivery) would outlast `max.poll.interval.ms` (300 s): the consumer
        left the group, the commit was refused, and the batch came again, forever.
        """
        task = asyncio.ensure_future(work)
        delivering = self._delivering = threading.Event()
        task.add_done_callback(lambda _: delivering.set())
        try:
            while not (await asyncio.wait({task}, timeout=_KEEPALIVE))[0]:
                await self._call(self._hold)
        finally:
            if not task.done():
                task.cancel()
            delivering.set()
            self._delivering = None
        task.result()

    async def _dead_letter(self, records: list[_Record]) -> None:
        """Dead letters of the records not taken; each one written is marked `taken` at once, so
        that a retry after a later failure does not write it twice."""
        if not records:
            return
        before = self.dead_lettered
        try:
            if self.config.dead_letter_topic is not None:
                await self._call(self._produce_dead_letters, records)  # marks each as it goes
            else:
                if self.config.dead_letter_file is not None:
                    await self._call(self._write_dead_letters, records)
                    self.dead_lettered += len(records)
                else:
                    for r in records[:_SAY_SKIPPED]:
                        log.error("kafka source %s: %s[%d] offset %d skipped, not dead-lettered (no dead-letter "
                                  "topic or file): %s", self.address, *r.partition, r.msg.offset(), r.reason)
                    if len(records) > _SAY_SKIPPED:
                        log.error("kafka source %s: and %d more records of the batch skipped, not dead-lettered",
                                  self.address, len(records) - _SAY_SKIPPED)
                    self.skipped += len(records)
                for r in records:
                    r.taken = True
        finally:
            # Said once they are written: a dead-letter topic or file that fails is retried (and logged) first.
            if written := self.dead_lettered - before:
                first = records[0]
                log.error("kafka source %s: %d records dead-lettered; first %s[%d] offset %d: %s", self.address,
                          written, *first.partition, first.msg.offset(), first.reason)

    # -- in the consumer thread ------------------------------------------------------------------

    def _subscribe(self) -> None:
        try:
            self._consumer.subscribe(self.config.topics, on_assign=self._on_assign, on_revoke=self._on_revoke,
                                     on_lost=self._on_lost)
        except KafkaException as exc:
            # librdkafka's own regex engine judges `^patterns` (no lookahead, no `(?:`), and only
            # here: subscribing at build joined the group before `run()` (rebalances for others).
            raise ConfigError("topics", f"kafka source {self.address}: librdkafka refuses {self.config.topics}: "
                                        f"{exc.args[0].str()}") from None

    def _fill(self) -> list[_Record]:
        """Up to batch_size records: waits for the first, then takes only what is already there."""
        batch: list[_Record] = []
        self._batch = batch  # a revoke while polling drops records from it
        waited = 0.0
        while len(batch) < self.config.batch_size and not self._stopping:
            msg = self._consumer.poll(0 if batch else _POLL)
            if msg is None:
                self._probe()
                waited += _POLL
                if batch or waited >= self.config.batch_timeout:
                    break
                continue
            if (error := msg.error()) is not None:
                self._on_record_error(error)
                continue
            self._unreachable = False  # a record came from a broker
            record = self._decode(msg)
            # Handled before a stop that committed short of it (see the module docstring).
            record.taken = msg.offset() in self._settled.get(record.partition, ())
            batch.append(record)
        return self._batch

    @staticmethod
    def _decode(msg: Message) -> _Record:
        try:
            headers = cast(list[tuple[str, bytes | None]], msg.headers() or [])
            return _Record(msg, from_kafka(KafkaRecord(headers, msg.key(), msg.value())))
        except Exception as exc:  # noqa: BLE001 - InvalidEventError, bad UTF-8, bad JSON: not a CloudEvent
            # Anything else a record makes decoding raise is its fault too: out of here, it
            # ended `run()`, and a restart met the same record.
            return _Record(msg, None, f"not a CloudEvent: {exc}")

    def _hold(self) -> None:
        """While the subscriber fails: poll with every partition paused, to stay in the group."""
        self._held = True
        self._consumer.pause(self._consumer.assignment())
        self._probe()
        msg = self._consumer.poll(0)  # serves rebalance callbacks; paused, it returns no record...
        if msg is not None and msg.error() is None:  # ...unless one came from a partition new here
            self._consumer.seek(TopicPartition(msg.topic() or "", msg.partition() or 0, msg.offset() or 0))
        self._consumer.pause(self._consumer.assignment())

    def _commit_and_resume(self) -> None:
        for r in self._batch:
            self._uncommitted[r.partition] = max(self._uncommitted.get(r.partition, 0), (r.msg.offset() or 0) + 1)
        self._batch = []
        self._commit(self.assignment)
        if self._held:
            self._held = False
            self._consumer.resume(self._consumer.assignment())

    def _commit_handled(self) -> None:
        """Each partition of a batch handled in part up to its first record not handled, naming
        the handled ones past it (see the module docstring)."""
        if self._strays:  # events the subscriber made of them, refused, not written yet: all comes again
            self._batch = []
            return
        records: dict[PartitionKey, list[_Record]] = {}
        for r in self._batch:
            records.setdefault(r.partition, []).append(r)
        for key, mine in records.items():
            if not any(r.taken for r in mine):
                continue  # nothing handled: it stays where it was
            offsets = [(r.msg.offset() or 0, r.taken) for r in mine]
            first = min((o for o, taken in offsets if not taken), default=None)
            if first is None:
                self._uncommitted[key] = max(self._uncommitted.get(key, 0), max(o for o, _ in offsets) + 1)
            else:
                self._uncommitted[key] = first
                self._settled.setdefault(key, set()).update(o for o, taken in offsets if taken and o > first)
        self._batch = []
        self._commit(self.assignment)

    def _commit(self, partitions: frozenset[PartitionKey] | list[PartitionKey]) -> None:
        offsets, left = [], {}
        for key in partitions:
            if key not in self._uncommitted:
                continue
            offset = self._uncommitted[key]
            left[key] = {o for o in self._settled.get(key, ()) if o >= offset}  # those read so far are passed
            metadata = _settled_metadata(offset, left[key])  # None is refused: left out instead
            offsets.append(TopicPartition(*key, offset) if metadata is None else
                           TopicPartition(*key, offset, metadata=metadata))
        if not offsets:
            return
        # Waited for: the offsets are known committed before the next batch, and before a revoke
        # hands the partitions on. It holds the only consumer thread meanwhile (librdkafka gives a
        # commit to a broker gone up to ~session.timeout.ms), so no poll hears that every broker
        # is down: `problem` tells of the wait instead.
        self._commit_began = time.monotonic()
        try:
            self._consumer.commit(offsets=offsets, asynchronous=False)
        except KafkaException as exc:  # left uncommitted: its records come again (at-least-once)
            log.warning("kafka source %s: commit failed: %s", self.address, exc.args[0].str())
            return
        finally:
            self._commit_began = None
        for tp in offsets:
            key = (tp.topic, tp.partition)
            self._uncommitted.pop(key, None)
            if left[key]:
                self._settled[key] = left[key]
            else:
                self._settled.pop(key, None)

    def _read_settled(self, consumer: Consumer, partitions: list[TopicPartition]) -> None:
        """The records handled past the committed offsets of partitions new here (a stop named them)."""
        try:
            committed = consumer.committed(partitions, timeout=_COMMITTED_TIMEOUT)
        except KafkaException as exc:
            log.warning("kafka source %s: reading the committed offsets of %s: %s; records handled past them "
                        "may come again", self.address, _names(partitions), exc.args[0].str())
            return
        for tp in committed:
            key = (tp.topic, tp.partition)
            settled = _parse_settled(tp.metadata, tp.offset)
            if settled is None:
                log.warning("kafka source %s: %s[%d]: commit metadata %.80r names no records: ignored",
                            self.address, *key, tp.metadata)
            if settled:
                self._settled[key] = settled
            else:
                self._settled.pop(key, None)

    def _probe(self) -> None:
        """While no broker was reachable, whether one answers now: an idle topic brings no
        record, and a group that kept its assignment no rebalance, to say it is back (librdkafka
        says when all brokers are down, not when one is up again)."""
        if not self._unreachable or time.monotonic() - self._probed < _PROBE_EVERY:
            return
        try:
            self._consumer.list_topics(timeout=_PROBE_TIMEOUT)  # a metadata request to any broker
        except KafkaException:
            return
        finally:
            self._probed = time.monotonic()
        self._unreachable = False
        log.info("kafka source %s: a broker is reachable again", self.address)

    def _on_assign(self, consumer: Consumer, partitions: list[TopicPartition]) -> None:
        self._unreachable = False  # the group coordinator answered
        self.assignment = self.assignment | {(tp.topic, tp.partition) for tp in partitions}
        if partitions:
            self._read_settled(consumer, partitions)
        if not self._held:
            # librdkafka keeps a partition's pause across losing and getting it back: one paused
            # by `_hold`, then lost (a stalled broker past session.timeout.ms) and assigned
            # again after the resume, was never read again.
            try:
                consumer.resume(partitions)
            except KafkaException as exc:
                log.warning("kafka source %s: resuming %s: %s", self.address, _names(partitions), exc.args[0].str())
        log.info("kafka source %s: assigned %s", self.address, _names(partitions))

    def _on_revoke(self, consumer: Consumer, partitions: list[TopicPartition]) -> None:
        revoked = [(tp.topic, tp.partition) for tp in partitions]
        delivering = self._delivering
        if delivering is not None and any(r.partition in revoked for r in self._batch):
            # Served by a keep-alive poll while the subscriber has these records: their next
            # owner must not deliver them (and an id's later events) while that delivery is
            # still going, or the older copies land last. Held up to max.poll.interval.ms.
            delivering.wait()
        self._commit(revoked)  # what was handled; the batch in hand is not, and goes
        self._forget(set(revoked))
        log.info("kafka source %s: revoked %s", self.address, _names(partitions))

    def _on_lost(self, consumer: Consumer, partitions: list[TopicPartition]) -> None:
        # Out of the group already: a commit would be refused. The new owner re-reads them.
        self._forget({(tp.topic, tp.partition) for tp in partitions})
        log.warning("kafka source %s: lost %s", self.address, _names(partitions))

    def _forget(self, partitions: set[PartitionKey]) -> None:
        self._batch[:] = [r for r in self._batch if r.partition not in partitions]
        for key in partitions:
            self._uncommitted.pop(key, None)
            self._settled.pop(key, None)  # the commit names them for the next owner
        self.assignment = self.assignment - partitions

    def _close_consumer(self) -> None:
        self._consumer.close()  # leaves the group; on_revoke commits what was handled

    def _dead_letter_producer(self) -> Producer:
        if self._dead_letters is None:
            conf: dict[str, Any] = {k: v for k, v in self.config.consumer_config().items()
                                    if k not in _CONSUMER_ONLY and k not in ("message.timeout.ms", "delivery.timeout.ms")}
            # Its delivery timeout bounds how long a stalled broker holds a batch's dead letters
            # (in-flight copies settle within it: `_IN_FLIGHT_WAIT`), whatever the consumer's config.
            conf["message.timeout.ms"] = _DEAD_LETTER_MESSAGE_TIMEOUT_MS
            conf.update({"acks": "all", "enable.idempotence": True, "delivery.report.only.error": True})
            self._dead_letters = self._client(Producer, conf)
        return self._dead_letters

    def _produce_dead_letters(self, records: Sequence[_Record]) -> None:
        """Copies of the records to the dead-letter topic, each marked `taken` once written (and
        counted) or given up: too large even without its value (logged)."""
        topic = cast(str, self.config.dead_letter_topic)

        def ours(r: _Record) -> Headers:
            return [(REASON_HEADER, r.reason.encode()), (TOPIC_HEADER, r.partition[0].encode()),
                    (PARTITION_HEADER, str(r.partition[1]).encode()), (OFFSET_HEADER, str(r.msg.offset()).encode())]

        def written(r: _Record) -> None:
            r.taken = True
            self.dead_lettered += 1

        whole = [(r.msg.value(), r.msg.key(), [*cast(Headers, r.msg.headers() or []), *ours(r)]) for r in records]
        # A copy over a size limit (ours or the topic's) would be refused at every retry, and
        # hold the offsets for good: those records go again without their value and headers.
        big = [records[i] for i in self._produce_letters(topic, whole, lambda i: written(records[i]))]
        bare = [(None, r.msg.key(), [*ours(r), (DROPPED_HEADER, str(len(r.msg.value() or b"")).encode())])
                for r in big]
        for i in self._produce_letters(topic, bare, lambda i: written(big[i])):
            r = big[i]
            r.taken = True
            self.skipped += 1
            log.error("kafka source %s: %s[%d] offset %d not dead-lettered (too large even without its value): %s",
                      self.address, *r.partition, r.msg.offset(), r.reason)

    def _produce_letters(self, topic: str, letters: Sequence[Letter], done: Callable[[int], None]) -> list[int]:
        """(value, key, headers) records to the dead-letter topic; `done(i)` for each one the broker
        took (also when a later one fails: a retry does not write it twice); the indexes of those
        refused as too large alone. SinkError for any other failure."""

        def refused_alone(i: int) -> bool:
            return bool(self._produce_flushed(topic, [letters[i]], lambda _: done(i)))

        too_large = self._produce_flushed(topic, letters, done)
        if len(too_large) > 1:
            # The broker refuses a record batch for its size (a topic's max.message.bytes) with
            # each record's report saying so: asked alone, most may be taken whole.
            too_large = [i for i in too_large if refused_alone(i)]
        return too_large

    def _produce_flushed(self, topic: str, letters: Sequence[Letter], done: Callable[[int], None]) -> list[int]:
        if not letters:
            return []
        producer = self._dead_letter_producer()
        failures: list[tuple[KafkaError, int]] = []
        too_large: list[int] = []
        produced: list[int] = []
        deadline = time.monotonic() + _DEAD_LETTER_TIMEOUT
        for i, letter in enumerate(letters):
            try:
                if not self._produce_one(producer, topic, letter, partial(_on_letter, failures, i), deadline):
                    failures.append((KafkaError(KafkaError._TIMED_OUT, "the local queue stayed full"), i))
                    break
            except KafkaException as exc:
                if exc.args[0].code() == KafkaError.MSG_SIZE_TOO_LARGE:  # over the producer's own limit
                    too_large.append(i)
                    continue
                failures.append((exc.args[0], i))
                break
            produced.append(i)
        # Everything queued is settled before going on: none lingers to arrive after a retry's copy.
        try:
            settled = producer.flush(max(0.0, deadline - time.monotonic())) == 0
            if not settled:
                # What was never sent goes; what is in flight settles (message.timeout.ms bounds
                # it): purged in flight, a copy the broker took anyway was written again.
                producer.purge(in_queue=True, in_flight=False, blocking=True)
                settled = producer.flush(_IN_FLIGHT_WAIT) == 0
            if not settled:  # a backstop: librdkafka's own timeout fires first
                producer.purge(in_queue=True, in_flight=True, blocking=True)
                settled = producer.flush(1.0) == 0  # a purged one reports it; one without a report was taken
        except KafkaException as exc:  # a fatal error, raised from flush
            failures.append((exc.args[0], -1))
            settled = False
        failed = {i for _, i in failures}
        if settled:  # with only failures reported, each other one produced was taken
            for i in produced:
                if i not in failed:
                    done(i)
        too_large += [i for error, i in failures if error.code() == KafkaError.MSG_SIZE_TOO_LARGE]
        other = [error for error, _ in failures if error.code() != KafkaError.MSG_SIZE_TOO_LARGE]
        if other or not settled:
            if any(e.fatal() or e.code() == KafkaError._FATAL for e in other):
                # An idempotent producer's fatal error (the broker lost its sequence state) stays
                # for good: the retry gets a new producer.
                self._dead_letters = None
                log.warning("kafka source %s: the dead-letter producer failed for good (%s): a new one is made",
                            self.address, other[0].str())
            what = other[0].str() if other else f"not acknowledged within {_DEAD_LETTER_TIMEOUT:g}s"
            raise SinkError(f"dead-letter topic {topic}: {what}")
        return sorted(set(too_large))

    @staticmethod
    def _produce_one(producer: Producer, topic: str, letter: Letter, on_delivery: Callable[..., None],
                     deadline: float) -> bool:
        """Queue one letter (KafkaException when refused); False when the local queue stayed full."""
        value, key, headers = letter
        while True:
            try:
                producer.produce(topic, value, key, headers=headers, on_delivery=on_delivery)
                return True
            except BufferError:  # the local queue is full: what is out makes room
                if len(producer) == 0:  # nothing out to make room: larger than queue.buffering.max.kbytes
                    too_large = KafkaError(KafkaError.MSG_SIZE_TOO_LARGE, "larger than the local queue")
                    raise KafkaException(too_large) from None
                if time.monotonic() >= deadline:
                    return False
                producer.poll(0.1)

    def _dead_letter_events(self, refused: list[tuple[CloudEvent, str]]) -> None:
        """Events that are no record of the batch, as structured CloudEvents to the dead-letter
        topic (with `dead-letter-reason`; one too large there without its data) or as events to
        the file; with neither, logged. Each one written or given up leaves `refused` at once,
        so that a retry after a later failure does not write it twice."""
        ids = ", ".join(e.id for e, _ in refused[:10])
        reason = refused[0][1] if refused else ""
        gone: set[int] = set()
        lost: list[CloudEvent] = []
        try:
            if self.config.dead_letter_topic is not None:
                lost = self._produce_events(self.config.dead_letter_topic, refused, gone.add)
            elif self.config.dead_letter_file is not None:
                deadletter.append(self.config.dead_letter_file, refused, fsync=True)
                gone.update(range(len(refused)))
            else:
                lost = [e for e, _ in refused]
        finally:
            if written := len(gone):
                log.error("kafka source %s: the subscriber refused %d events that are no records of the batch, "
                          "dead-lettered: %s; ids %s", self.address, written, reason, ids)
                self.dead_lettered += written
            refused[:] = [x for k, x in enumerate(refused) if k not in gone]
        if lost:
            log.error("kafka source %s: the subscriber refused %d events that are no records of the batch, not "
                      "dead-lettered (%s): %s; ids %s", self.address, len(lost),
                      "too large even without data" if self.config.dead_letter_topic else "no dead-letter topic or file",
                      reason, ", ".join(e.id for e in lost[:10]))
        refused.clear()

    def _produce_events(self, topic: str, refused: Sequence[tuple[CloudEvent, str]],
                        done: Callable[[int], None]) -> list[CloudEvent]:
        """The events, structured, to `topic` (`done(i)` for each one written); those too large
        even without their data."""

        def letter(event: CloudEvent, reason: str, *dropped: tuple[str, bytes]) -> Letter:
            message = to_kafka_structured(event)
            return message.value, message.key, [*message.headers.items(), (REASON_HEADER, reason.encode()), *dropped]

        big = self._produce_letters(topic, [letter(e, why) for e, why in refused], done)
        bare = [letter(CloudEvent(refused[i][0].attributes, None), refused[i][1],
                       (DROPPED_HEADER, str(len(refused[i][0].data or b"")).encode())) for i in big]
        return [refused[big[k]][0] for k in self._produce_letters(topic, bare, lambda k: done(big[k]))]

    def _write_dead_letters(self, records: Sequence[_Record]) -> None:
        path = cast(Path, self.config.dead_letter_file)
        path.parent.mkdir(parents=True, exist_ok=True)
        lines = b"".join(orjson.dumps({
            "reason": r.reason, "topic": r.partition[0], "partition": r.partition[1], "offset": r.msg.offset(),
            "key": _text(r.msg.key()), "headers": [[k, _text(v)] for k, v in cast(Headers, r.msg.headers() or [])],
            "value": _text(r.msg.value()),
        }) + b"\n" for r in records)
        # Whole or not at all (a write cut short left a torn line, then every record again), and
        # on disk before the offsets move past them.
        appending.append(path, lines, fsync=True)

    def _on_record_error(self, error: KafkaError) -> None:
        if error.code() != KafkaError._PARTITION_EOF:
            log.warning("kafka source %s: %s", self.address, error.str())

    def _on_error(self, error: KafkaError) -> None:
        code = error.code()
        if code in (KafkaError._TRANSPORT, KafkaError._RESOLVE):
            return  # a broker not answering: said as _ALL_BROKERS_DOWN
        if code == KafkaError._ALL_BROKERS_DOWN:
            self._unreachable = True  # until a broker answers (`_probe`): /readyz says so
        # Reported again at each reconnect round (~1 s; ~20 a second from a peer that is not
        # Kafka): once a minute per code is enough.
        now = time.monotonic()
        if now - self._said.get(code, -_SAY_EVERY) < _SAY_EVERY:
            return
        self._said[code] = now
        if code == KafkaError._ALL_BROKERS_DOWN:
            log.warning("kafka source: no broker reachable at %s; retrying", self.address)
        else:
            log.warning("kafka source %s: %s", self.address, error.str())


# Consumer properties a producer would warn about; the rest (TLS, SASL, ...) is shared.
_CONSUMER_ONLY = frozenset({"group.id", "enable.auto.commit", "enable.auto.offset.store", "auto.offset.reset",
                            "session.timeout.ms", "max.poll.interval.ms", "partition.assignment.strategy",
                            "heartbeat.interval.ms", "group.instance.id", "fetch.min.bytes", "fetch.wait.max.ms",
                            "isolation.level", "enable.partition.eof"})


class _DaemonThread(Executor):
    """One daemon thread running the calls submitted, in order.

    Not ThreadPoolExecutor: the interpreter's exit joins its threads, so a consumer call Kafka
    never answers (a commit to a stalled broker) held the process after a stop gave up on it.
    """

    def __init__(self, name: str) -> None:
        self._calls: queue.SimpleQueue[tuple[Future[Any], Callable[[], Any]] | None] = queue.SimpleQueue()
        self._thread = threading.Thread(target=self._work, name=name, daemon=True)
        self._shut = False

    def submit(self, fn: Callable[..., T], /, *args: Any, **kwargs: Any) -> Future[T]:
        if self._shut:
            raise RuntimeError("cannot schedule new futures after shutdown")
        if not self._thread.is_alive():
            self._thread.start()
        future: Future[T] = Future()
        self._calls.put((future, partial(fn, *args, **kwargs)))
        return future

    def shutdown(self, wait: bool = False, *, cancel_futures: bool = False) -> None:
        self._shut = True
        if self._thread.is_alive():
            self._calls.put(None)
            if wait:
                self._thread.join()

    def _work(self) -> None:
        while (call := self._calls.get()) is not None:
            future, fn = call
            if future.set_running_or_notify_cancel():
                try:
                    future.set_result(fn())
                except BaseException as exc:  # noqa: BLE001 - the caller's to see
                    future.set_exception(exc)


def _illegal_topic(name: str) -> str | None:
    """Why Kafka never accepts `name` as a topic's, else None."""
    if _TOPIC_NAME.fullmatch(name) is None or name in (".", ".."):
        return f"{name[:60]!r} is no topic name Kafka accepts (1 to 249 of A-Z a-z 0-9 . _ -; not '.' or '..')"
    return None


def _settled_metadata(offset: int, settled: set[int]) -> str | None:
    """Commit metadata naming `settled` (offsets from `offset` on) as ranges relative to it: "1-3,7".
    Those that do not fit are left out (delivered again: at-least-once)."""
    ranges: list[str] = []
    size, count = len(_SETTLED), 0
    relative = sorted(o - offset for o in settled)
    for _, run in itertools.groupby(enumerate(relative), key=lambda at: at[1] - at[0]):  # consecutive ones
        values = [value for _, value in run]
        text = str(values[0]) if len(values) == 1 else f"{values[0]}-{values[-1]}"
        count, size = count + len(values), size + len(text) + 1
        if size > _SETTLED_MAX_CHARS or count > _SETTLED_MAX:
            break
        ranges.append(text)
    return _SETTLED + ",".join(ranges) if ranges else None


def _parse_settled(metadata: str | None, offset: int) -> set[int] | None:
    """The offsets `_settled_metadata` named; empty for metadata not ours, None for ours unreadable."""
    if not metadata or not metadata.startswith(_SETTLED) or offset < 0:
        return set()
    settled: set[int] = set()
    for text in metadata[len(_SETTLED):].split(","):
        if (match := _RANGE.fullmatch(text)) is None:
            return None
        first, last = int(match[1]), int(match[2] or match[1])
        if not first <= last or len(settled) + last - first >= _SETTLED_MAX:
            return None
        settled.update(range(offset + first, offset + last + 1))
    return settled


def _on_letter(failures: list[tuple[KafkaError, int]], index: int, error: KafkaError | None, msg: Message) -> None:
    if error is not None:
        failures.append((error, index))


def _text(raw: bytes | str | None) -> str | dict[str, str] | None:
    """Bytes as UTF-8 text when they are, else {"base64": ...} (as infer_logger's dead letters)."""
    if raw is None or isinstance(raw, str):
        return raw
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError:
        return {"base64": base64.b64encode(raw).decode()}


def _names(partitions: list[TopicPartition]) -> str:
    return ", ".join(f"{tp.topic}[{tp.partition}]" for tp in partitions) or "nothing"

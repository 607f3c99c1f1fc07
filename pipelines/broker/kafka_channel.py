"""`channel: kafka`: a broker's log is a topic, each trigger a consumer group, as in Knative's
Kafka broker. Any number of broker processes may share them: each one's ingress produces to the
topic, and the group spreads a trigger's partitions over the processes that run it.

Ingress answers 202 only once the topic acknowledged the event (acks=all). Requests arriving
together are produced and flushed together (one flush for all of them), since the producer
sink takes one batch at a time. A trigger's consumer is the shared Kafka source: it hands each
batch to the trigger's dispatcher and commits once every event of it settled. A trigger stopped
(reload, removal, the broker's stop) with deliveries still in flight past the timeout gives them
up; the source then commits what settled, so those are not delivered again (see its docstring).

A new trigger's group starts at the topic's end: its offsets are committed there before it
joins, so that a restart before its first batch cannot skip or replay events. One added while
Kafka does not answer waits, and its group starts at the events written since it was added.
Pass-through headers (X-Request-Id, Knative-*, X-B3-*) are not carried over Kafka.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Any, TypeVar

from confluent_kafka import ConsumerGroupTopicPartitions, KafkaError, KafkaException, TopicPartition
from confluent_kafka.admin import AdminClient, NewTopic, OffsetSpec

from infer_logger.cloudevents.event import CloudEvent
from infer_logger.errors import RejectedError, SinkError
from infer_logger.sinks.halving import Halving
from infer_logger.sinks.kafka import KafkaSinkConfig, client_logger
from pipelines.broker.channel import ChannelError, Handler, RefusedError
from pipelines.broker.settings import KafkaChannelSettings
from pipelines.sources.kafka import KafkaSource, KafkaSourceConfig

log = logging.getLogger(__name__)
_T = TypeVar("_T")

_TIMEOUT = 10.0
_RECONNECT_MAX = 10.0  # seconds between tries to reach Kafka at start
_START_WAIT = 1.0  # seconds a start waits for Kafka before serving without its topic
_UNREACHABLE = frozenset({KafkaError._TIMED_OUT, KafkaError._TRANSPORT, KafkaError._ALL_BROKERS_DOWN,
                          KafkaError.REQUEST_TIMED_OUT})
_LIBRDKAFKA_LOG = client_logger(__name__)


class _UnreachableError(ChannelError):
    """No Kafka broker answered (as opposed to one that answered with a refusal)."""


def _said_if_failed(task: asyncio.Task[None]) -> None:
    """A trigger's consumer that ended with an error reads nothing more: said at once, not as
    "Task exception was never retrieved" at the broker's exit (or never)."""
    if not task.cancelled() and (exc := task.exception()) is not None:
        log.error("kafka channel: %s stopped: %s: %s; its trigger delivers nothing until the broker restarts",
                  task.get_name(), type(exc).__name__, exc)


def _answer(done: asyncio.Future[None], error: Exception | None = None) -> None:
    """Tell an append how it went, unless its caller was cancelled meanwhile (a reply's delivery
    given up at a reload): setting that raised, and ended the flush for every append after it."""
    if done.done():
        return
    if error is None:
        done.set_result(None)
    else:
        done.set_exception(error)


def _answer_of(future: Future[_T]) -> _T:
    """An admin request's answer; its own timeout ends it first, this bound is a backstop."""
    try:
        return future.result(timeout=_TIMEOUT + 5)
    except TimeoutError:
        raise KafkaException(KafkaError(KafkaError._TIMED_OUT, "no answer from Kafka")) from None


def _offsets(admin: AdminClient, specs: dict[TopicPartition, OffsetSpec]) -> dict[int, int]:
    """Each partition's offset for its spec (-1: no record matches a time)."""
    futures = admin.list_offsets(specs, request_timeout=_TIMEOUT)
    return {tp.partition: _answer_of(future).offset for tp, future in futures.items()}


class _Abortable:
    """A trigger's dispatcher as its Kafka source's subscriber, each event delivered on its own
    (filtered and `parallelism` at a time, as the disk channel's runners do), so that a stop can
    give up the deliveries in flight and the batch fails naming just those events: the others
    settled."""

    def __init__(self, handler: Handler, parallelism: int) -> None:
        self.handler = handler
        self._slots = asyncio.Semaphore(parallelism)
        self._in_flight: set[asyncio.Future[None]] = set()

    async def send_batch(self, events: Sequence[CloudEvent]) -> None:
        taken = self.handler.take(events)  # the others are settled: filtered out
        deliveries = [asyncio.ensure_future(self._deliver(event)) for event in taken]
        self._in_flight.update(deliveries)
        try:
            outcomes = await asyncio.gather(*deliveries, return_exceptions=True)
        finally:
            self._in_flight.difference_update(deliveries)
        pending = [event for event, outcome in zip(taken, outcomes, strict=True) if isinstance(outcome, BaseException)]
        if pending:
            raise SinkError(f"{len(pending)} of {len(events)} events not settled: their trigger stopped",
                            pending=pending)

    async def _deliver(self, event: CloudEvent) -> None:
        if event.meta:
            # A record's headers outside the binding are its producer's, not pass-through headers
            # (those are not carried over Kafka): sent on as HTTP headers, they spoofed the event's
            # own or an authorization, and one no HTTP header can hold failed every attempt.
            event = CloudEvent(event.attributes, event.data)
        async with self._slots:
            await self.handler.deliver(event)

    def abort(self) -> None:
        for delivery in self._in_flight:
            delivery.cancel()

    async def aclose(self) -> None:
        """Nothing to release: the dispatcher's endpoints belong to the broker."""


class KafkaChannel:
    def __init__(self, settings: KafkaChannelSettings, namespace: str, name: str, *, batch_size: int = 100,
                 parallelism: int = 64) -> None:
        self.settings = settings
        self.namespace = namespace
        self.topic = settings.topic(namespace, name)
        self.batch_size = batch_size
        self.parallelism = parallelism
        self.ready = False
        # Records refused as one record batch for its size (a topic's max.message.bytes) go in halves.
        # An event too large is the sender's to keep (413), not the log's to cut.
        self._sink = Halving(KafkaSinkConfig(
            bootstrap_servers=settings.bootstrap_servers, topic=self.topic, linger_ms=1, cut_to_fit=False,
            config=dict(settings.config),
        ).build())
        self._pending: list[tuple[Sequence[CloudEvent], asyncio.Future[None]]] = []
        self._flusher: asyncio.Task[None] | None = None
        self._sources: dict[str, tuple[KafkaSource, asyncio.Task[None], _Abortable]] = {}
        # Triggers whose group could not be placed yet, and when each was added.
        self._starting: dict[str, tuple[asyncio.Task[None], float]] = {}
        self._placing: dict[str, Future[None]] = {}  # their last placing job
        # Attaching and detaching a trigger wait for Kafka: one at a time, or a reload could detach
        # it while attached (found in no table) and it ran on, removed. A lock per trigger: a reload
        # changes its triggers side by side (Kafka down, each waits its timeouts).
        self._locks: dict[str, asyncio.Lock] = {}
        self._reached = False  # the topic exists: Kafka answered
        self._waiting: dict[str, Handler] = {}  # triggers attached before that
        self._connecting: asyncio.Task[None] | None = None
        self._admin = ThreadPoolExecutor(1, thread_name_prefix="kafka-channel")

    def _client_config(self) -> dict[str, Any]:
        # librdkafka's own log goes through logging (else it prints every failed connect to stderr).
        return {"bootstrap.servers": self.settings.bootstrap_servers, "logger": _LIBRDKAFKA_LOG,
                **self.settings.config}

    async def start(self) -> None:
        """Create the topic. Kafka answering within `_START_WAIT`: the topic is created, or its
        refusal fails the start (a reload keeps the running triggers). Not answering (a silent one
        takes `_TIMEOUT` to say so), it is not waited for: that held the broker's port closed,
        /healthz too. The broker serves; this broker's ingress answers 503 and its triggers wait
        until the topic exists, and Kafka is tried until then."""
        loop = asyncio.get_running_loop()
        first: asyncio.Future[None] = loop.create_future()  # the first try's end, as the start sees it
        self._connecting = loop.create_task(self._connect(first), name=f"connect:{self.topic}")
        try:
            await asyncio.wait_for(asyncio.shield(first), _START_WAIT)
        except TimeoutError:
            if not first.cancel():  # it ended as the wait did (the loop held): taken as within it
                first.result()
                return
            # From here on what the try ends with is logged, and tried again, not raised.
            log.warning("kafka channel: kafka at %s has not answered within %gs; serving meanwhile (topic %s's "
                        "ingress answers 503 until it is created)", self.settings.bootstrap_servers, _START_WAIT,
                        self.topic)

    async def _connect(self, first: asyncio.Future[None]) -> None:
        try:
            await self._create(first)
        except Exception as exc:  # no ChannelError: a bug, or a setting only the client refuses
            if not first.done():
                first.set_exception(exc)
                return
            log.error("kafka channel: creating topic %s failed: %s: %s; its ingress answers 503 until the broker "
                      "restarts", self.topic, type(exc).__name__, exc, exc_info=exc)

    async def _create(self, first: asyncio.Future[None]) -> None:
        delay, said = 1.0, ""
        while True:
            try:
                await asyncio.get_running_loop().run_in_executor(self._admin, self._create_topic)
                break
            except ChannelError as exc:
                unreachable = isinstance(exc, _UnreachableError)
                if not first.done():  # the start waits for this try
                    if not unreachable:  # answered, but refused: the start fails, naming why
                        first.set_exception(exc)
                        return
                    first.set_result(None)  # it goes on, not ready
                if str(exc) != said:  # tried again: a refusal too may pass (brokers joining a cluster)
                    said = str(exc)
                    log.log(logging.WARNING if unreachable else logging.ERROR,
                            "kafka channel: %s; trying again until it is created (its ingress answers 503 meanwhile)",
                            exc)
            await asyncio.sleep(delay)
            delay = min(delay * 2, _RECONNECT_MAX)
        if said:
            log.warning("kafka channel: kafka at %s answers: topic %s ready", self.settings.bootstrap_servers,
                        self.topic)
        self._reached = True  # attached from now on at once: none joins the waiting
        for trigger in list(self._waiting):
            async with self._lock(trigger):
                if (handler := self._waiting.pop(trigger, None)) is not None:  # else detached meanwhile
                    await self._attach(trigger, handler)
        self.ready = True
        if not first.done():
            first.set_result(None)

    def _create_topic(self) -> None:
        admin = AdminClient(self._client_config())
        topic = NewTopic(self.topic, self.settings.partitions, self.settings.replication_factor)
        future = admin.create_topics([topic], operation_timeout=_TIMEOUT)[self.topic]
        try:
            future.result(timeout=_TIMEOUT)
            log.info("kafka channel: created topic %s (%d partitions)", self.topic, self.settings.partitions)
        except KafkaException as exc:
            code = exc.args[0].code()
            if code != KafkaError.TOPIC_ALREADY_EXISTS:
                kind = _UnreachableError if code in _UNREACHABLE else ChannelError
                raise kind(f"kafka at {self.settings.bootstrap_servers}: topic {self.topic}: "
                           f"{exc.args[0].str()}") from None
        except TimeoutError:
            raise _UnreachableError(f"kafka at {self.settings.bootstrap_servers}: no broker answered within "
                                    f"{_TIMEOUT:g}s (creating topic {self.topic})") from None

    # -- ingress ---------------------------------------------------------------------------------

    async def append(self, events: Sequence[CloudEvent]) -> None:
        if not events:
            return
        loop = asyncio.get_running_loop()
        done: asyncio.Future[None] = loop.create_future()
        self._pending.append((events, done))
        if self._flusher is None or self._flusher.done():
            self._flusher = loop.create_task(self._flush())
        await done

    async def _flush(self) -> None:
        while self._pending:
            waiting, self._pending = self._pending, []
            sent = [e for events, _ in waiting for e in events]
            try:
                await self._sink.send_batch(sent)
            except RejectedError as exc:  # some events refused for good (e.g. too large)
                refused = {id(e) for e, _ in exc.refusals(sent)}
                for events, done in waiting:
                    mine = [i for i, e in enumerate(events) if id(e) in refused]
                    if mine:  # the others of the append were stored: the sender is told which
                        _answer(done, RefusedError(str(exc), too_large=exc.too_large,
                                                   refused=mine if len(mine) < len(events) else None))
                    else:
                        _answer(done)
            except Exception as exc:  # noqa: BLE001 - every waiter learns it, none is left hanging
                # Part of a batch refused in halves may have been written: an append none of whose
                # events are pending is done, another is told which of its events are pending
                # (told to send them all again, its sender would duplicate those written).
                pending = exc.pending_among(sent) if isinstance(exc, SinkError) else None
                for events, done in waiting:
                    left = None if pending is None else [i for i, e in enumerate(events) if id(e) in pending]
                    if left == []:
                        _answer(done)
                    else:
                        partial = left is not None and len(left) < len(events)
                        _answer(done, ChannelError(str(exc), pending=left if partial else None))
            else:
                for _, done in waiting:
                    _answer(done)

    # -- triggers --------------------------------------------------------------------------------

    def group(self, trigger: str) -> str:
        return self.settings.group(self.namespace, trigger)

    def _lock(self, trigger: str) -> asyncio.Lock:
        return self._locks.setdefault(trigger, asyncio.Lock())

    async def attach(self, trigger: str, handler: Handler) -> None:
        async with self._lock(trigger):
            await self._attach(trigger, handler)

    async def _attach(self, trigger: str, handler: Handler, added: float | None = None) -> None:
        """`added`: when a trigger whose group was never placed was added (a changed one)."""
        if not self._reached:
            # A new trigger's group starts at the topic's end, which takes Kafka to know: later.
            self._waiting[trigger] = handler
            return
        group, since = self.group(trigger), added
        added = time.time() if added is None else added
        try:
            await asyncio.get_running_loop().run_in_executor(self._admin, self._start_at_end, group, since)
        except KafkaException as exc:
            # Its consumer would start at the topic's start: every event retained, sent before
            # the trigger existed. It waits until its group is placed.
            log.warning("kafka channel: could not start group %s at the end: %s; retrying", group, exc.args[0].str())
            task = asyncio.get_running_loop().create_task(self._start_later(trigger, handler, added),
                                                          name=f"start:{group}")
            task.add_done_callback(_said_if_failed)
            self._starting[trigger] = task, added
            return
        self._run(trigger, handler)

    async def _start_later(self, trigger: str, handler: Handler, added: float) -> None:
        """Place a new trigger's group once Kafka answers: at the events written since it was
        added (the end then would skip those the ingress took meanwhile)."""
        delay = 1.0
        while True:
            await asyncio.sleep(delay)
            # A job of its own, kept: a detach cancelling this task does not stop it once it runs.
            self._placing[trigger] = job = self._admin.submit(self._start_at_end, self.group(trigger), added)
            try:
                await asyncio.wrap_future(job)
                break
            except KafkaException:
                delay = min(delay * 2, _RECONNECT_MAX)
        log.warning("kafka channel: group %s placed: its trigger runs", self.group(trigger))
        del self._starting[trigger]  # no await from here on: a detach finds it in one table or the other
        del self._placing[trigger]
        self._run(trigger, handler)

    def _run(self, trigger: str, handler: Handler) -> None:
        group = self.group(trigger)
        subscriber = _Abortable(handler, self.parallelism)
        source = KafkaSourceConfig(
            bootstrap_servers=self.settings.bootstrap_servers, topics=[self.topic], group_id=group,
            batch_size=self.batch_size, batch_timeout=0.2, auto_offset_reset="earliest",
            config=dict(self.settings.config),
        ).build(subscriber)
        task = asyncio.get_running_loop().create_task(source.run(), name=f"trigger:{group}")
        task.add_done_callback(_said_if_failed)
        self._sources[trigger] = (source, task, subscriber)

    def _start_at_end(self, group: str, since: float | None = None) -> None:
        """Commit the topic's end offsets for a group that has none (a new trigger), or with
        `since` (a time) the offsets of the first records written from then on.

        Through the admin client, whose every request has a timeout: a consumer's commit waits
        for ever on a Kafka that takes the request and never answers (frozen, no reset), and
        this job with it, holding the triggers lock and, at exit, the process."""
        admin = AdminClient(self._client_config())  # kept until the answers: a dropped client cancels them
        metadata = admin.list_topics(self.topic, timeout=_TIMEOUT).topics[self.topic]
        if metadata.error is not None or not metadata.partitions:  # deleted meanwhile: tried again later
            raise KafkaException(metadata.error or KafkaError(KafkaError.UNKNOWN_TOPIC_OR_PART))
        partitions = [TopicPartition(self.topic, p) for p in sorted(metadata.partitions)]
        asked = ConsumerGroupTopicPartitions(group, partitions)
        committed = _answer_of(admin.list_consumer_group_offsets([asked], request_timeout=_TIMEOUT)[group])
        if any(tp.offset >= 0 for tp in committed.topic_partitions):
            return
        ends = _offsets(admin, {tp: OffsetSpec.latest() for tp in partitions})
        if since is not None:  # the first written since; none written since: the end
            at = OffsetSpec.for_timestamp(int(since * 1000))
            ends.update({p: o for p, o in _offsets(admin, {tp: at for tp in partitions}).items() if o >= 0})
        starts = [TopicPartition(self.topic, p, ends[p]) for p in sorted(ends)]
        placed = _answer_of(admin.alter_consumer_group_offsets([ConsumerGroupTopicPartitions(group, starts)],
                                                               request_timeout=_TIMEOUT)[group])
        for tp in placed.topic_partitions:
            if tp.error is not None:
                raise KafkaException(tp.error)

    async def detach(self, trigger: str, *, forget: bool, timeout: float) -> None:
        async with self._lock(trigger):
            await self._detach(trigger, forget=forget, timeout=timeout)

    async def _detach(self, trigger: str, *, forget: bool, timeout: float) -> float | None:
        """Returns when the trigger was added if its group was never placed."""
        if self._waiting.pop(trigger, None) is not None:
            return None
        if (starting := self._starting.pop(trigger, None)) is not None:
            task, added = starting
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task
            job = self._placing.pop(trigger, None)
            if forget and job is not None and not job.cancel():  # it ran, or runs
                with contextlib.suppress(Exception):
                    await asyncio.wrap_future(job)
                # Placed, the group's offsets committed: a trigger of that name added later would
                # resume from them. One that failed placed nothing (and a delete would wait on
                # Kafka down too).
                if job.exception() is None:
                    await asyncio.get_running_loop().run_in_executor(self._admin, self._delete_group,
                                                                     self.group(trigger))
            return added
        entry = self._sources.pop(trigger, None)
        if entry is None:
            return None
        source, task, subscriber = entry
        source.stop()
        # Deliveries in flight get `timeout`; those given up then come again, not those settled.
        _, pending = await asyncio.wait([task], timeout=timeout)
        if pending:
            subscriber.abort()
            _, pending = await asyncio.wait([task], timeout=_TIMEOUT)  # the commit, leaving the group
        if pending:
            task.cancel()
        # Bounded by the source: a close Kafka does not answer is left closing (and said so).
        await asyncio.gather(task, source.aclose(), return_exceptions=True)
        if source.left_closing:
            return None  # a group delete would wait on Kafka too
        if forget:
            await asyncio.get_running_loop().run_in_executor(self._admin, self._delete_group, self.group(trigger))
        return None

    async def replace(self, trigger: str, handler: Handler, *, timeout: float) -> None:
        async with self._lock(trigger):
            added = await self._detach(trigger, forget=False, timeout=timeout)
            await self._attach(trigger, handler, added)  # one never placed: at the events since it was added

    def _delete_group(self, group: str) -> None:
        admin = AdminClient(self._client_config())  # kept until the answer: a dropped client cancels it
        try:
            admin.delete_consumer_groups([group], request_timeout=_TIMEOUT)[group].result(timeout=_TIMEOUT)
        except Exception as exc:  # noqa: BLE001 - a leftover group only holds offsets
            # A trigger of that name added later would resume from the group's offsets.
            log.warning("kafka channel: group %s not deleted: %s: %s", group, type(exc).__name__, exc)

    def lag(self, trigger: str) -> int | None:
        return None

    def forget_detached(self) -> None:
        # A removed trigger's consumer group stays with the cluster: this process cannot tell one
        # removed while it was down from one another broker process still runs.
        pass

    async def aclose(self, timeout: float) -> None:
        if self._connecting is not None:
            self._connecting.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._connecting
        self._waiting.clear()
        # Every trigger ever locked: one being attached is in no table yet, its detach waits for it.
        triggers = {*self._locks, *self._sources, *self._starting}
        await asyncio.gather(*(self.detach(t, forget=False, timeout=timeout) for t in triggers))
        if self._flusher is not None:
            with contextlib.suppress(Exception):
                await self._flusher
        await self._sink.aclose()
        # Not waited for: a job in hand ends within its Kafka timeouts, and waiting here held the
        # event loop (a reload closes a removed broker's channel while the others serve).
        self._admin.shutdown(wait=False, cancel_futures=True)

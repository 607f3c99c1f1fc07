"""`kafka` sink: inference events to a topic with the CloudEvents Kafka binding.

`send_batch` produces every event of the batch, then flushes librdkafka's queue in a worker
thread until the broker acknowledged them all (acks=all), so the spool checkpoint moves only
after delivery. Flushing also serves the delivery reports and sends at once, without waiting
out `linger.ms`; the event loop never blocks. For throughput, only failures cost a Python
callback (`delivery.report.only.error`) and binary mode's headers come from a cache
(`BinaryRecords`): the sink's per-event cost stays near the raw producer's.

Failures: a record the broker refuses for good (too large, invalid topic) is rejected and
dead-lettered by the worker; anything else (broker down, timeouts, leader moves) fails the
batch with `SinkError` and the worker retries it whole (at-least-once: a retry may duplicate).
When no broker is reachable, a batch fails after `_DOWN_GRACE` rather than waiting out the
delivery timeout, and what it left queued is purged so that the retry does not duplicate it.
"""

from __future__ import annotations

import asyncio
import logging
import re
import string
import time
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from typing import Literal

from pydantic import Field, field_validator

from infer_logger.cloudevents.event import AttributeValue, CloudEvent, attribute_text
from infer_logger.cloudevents.kafka import to_kafka_structured
from infer_logger.errors import ConfigError, RejectedError, SinkError
from infer_logger.sinks.base import SinkConfig

try:
    from confluent_kafka import KafkaError, KafkaException, Message, Producer
except ImportError:  # the `kafka` extra: without it the config still validates and `build()` says so
    CLIENT = False
else:
    CLIENT = True
NO_CLIENT = "the kafka sink and source need `pip install 'infer-logger[kafka]'` (confluent-kafka)"

log = logging.getLogger(__name__)

ClientValue = str | int | float | bool
"""A librdkafka property value, as confluent-kafka takes it."""
Headers = list[tuple[str, str | bytes | None]]
Record = tuple[bytes | None, bytes | None, Headers]
"""(key, value, headers) of one Kafka record, as `produce` takes them."""

# Errors that retrying the same record can never fix: the worker dead-letters those records.
PERMANENT: frozenset[int] = frozenset({
    KafkaError.MSG_SIZE_TOO_LARGE,
    KafkaError.TOPIC_EXCEPTION,  # the broker's INVALID_TOPIC_EXCEPTION
    KafkaError.RECORD_LIST_TOO_LARGE,
    KafkaError.INVALID_RECORD,
    KafkaError._INVALID_ARG,
}) if CLIENT else frozenset()

_FLUSH_SLICE = 0.2  # seconds per flush in the thread: bounds how late the loop notices a dead broker
_DOWN_GRACE = 2.0  # seconds a batch may wait with every broker down (reconnects take <= 1 s)
_UNREACHABLE = (KafkaError._PURGE_QUEUE, KafkaError._PURGE_INFLIGHT, KafkaError._MSG_TIMED_OUT) if CLIENT else ()
_TOPIC_CHARS = re.compile(r"[^A-Za-z0-9._-]")
_MISSING = "unknown"


class KafkaSinkConfig(SinkConfig):
    type: Literal["kafka"] = "kafka"
    bootstrap_servers: str
    """`host:port[,host:port...]` of the brokers to start from."""
    topic: str = "inference-events"
    """The topic, or a template of event attributes, e.g. `inference-{namespace}-{inferenceservicename}`
    or `{modelname}`. Characters a topic name cannot hold become `_`; a missing or empty attribute
    renders as `unknown`."""
    mode: Literal["binary", "structured"] = "binary"
    """CloudEvents Kafka content mode: `ce_*` headers and the payload as value, or a JSON event."""
    idempotent: bool = True
    """`enable.idempotence`: broker-side dedup of librdkafka's own retries, in order per partition."""
    linger_ms: float = Field(default=5.0, ge=0)
    """How long librdkafka waits to fill a request (a batch's end is sent at once regardless)."""
    compression: Literal["none", "gzip", "snappy", "lz4", "zstd"] = "none"
    """`compression.type` of produced record batches."""
    delivery_timeout: float = Field(default=30.0, gt=0)
    """Seconds librdkafka retries one record (`message.timeout.ms`) before the batch fails."""
    config: dict[str, ClientValue] = Field(default_factory=dict)
    """librdkafka properties passed through last, e.g. TLS and SASL: `security.protocol`,
    `ssl.ca.location`, `sasl.mechanism`, `sasl.username`, `sasl.password`."""

    @field_validator("topic")
    @classmethod
    def _check_topic(cls, value: str) -> str:
        TopicTemplate(value)
        return value

    def producer_config(self) -> dict[str, ClientValue]:
        return {
            "bootstrap.servers": self.bootstrap_servers,
            "acks": "all",
            "enable.idempotence": self.idempotent,
            "linger.ms": self.linger_ms,
            "compression.type": self.compression,
            "message.timeout.ms": max(1, round(self.delivery_timeout * 1000)),
            # librdkafka's default backs off up to 10 s: a restarted broker would sit idle that long.
            "reconnect.backoff.max.ms": 1000,
            "delivery.report.only.error": True,
            **self.config,
        }

    def build(self) -> KafkaSink:
        if not CLIENT:
            raise ConfigError("type", NO_CLIENT)
        return KafkaSink(self)


class TopicTemplate:
    """`inference-{namespace}-{modelname}`: a topic name from event attributes."""

    def __init__(self, template: str) -> None:
        try:
            parts = list(string.Formatter().parse(template))
        except ValueError as exc:
            raise ValueError(f"topic template {template!r}: {exc}") from None
        # (literal, attribute or None) pairs: `{x}` ends a pair; a trailing literal has no field.
        self.parts: list[tuple[str, str | None]] = []
        for literal, field, spec, conversion in parts:
            if _TOPIC_CHARS.search(literal):
                raise ValueError(f"topic {template!r}: a topic name holds only letters, digits, '.', '_', '-'")
            if field is not None and (not re.fullmatch(r"[a-z0-9]+", field) or spec or conversion):
                raise ValueError(f"topic {template!r}: {{{field}}} is not an attribute name (lower-case a-z, 0-9)")
            self.parts.append((literal, field))
        self.fields = [field for _, field in self.parts if field is not None]
        if not template:
            raise ValueError("topic must not be empty")
        self.constant = template if not self.fields else None
        self._cache: dict[tuple[object, ...], str] = {}

    def render(self, event: CloudEvent) -> str:
        if self.constant is not None:
            return self.constant
        attributes = event.attributes
        values = tuple(attributes.get(f) for f in self.fields)
        topic = self._cache.get(values)
        if topic is None:
            if len(self._cache) > 10_000:  # attribute values are few (models); bound the odd case
                self._cache.clear()
            out = []
            for literal, field in self.parts:
                out.append(literal)
                if field is not None:
                    value = attributes.get(field)
                    text = "" if value is None else attribute_text(value)
                    out.append(_TOPIC_CHARS.sub("_", text) or _MISSING)
            topic = self._cache[values] = "".join(out)
        return topic


class BinaryRecords:
    """`to_kafka_binary(event)` as a `produce`-ready record, the headers of repeated values cached.

    Most attributes of a sidecar's events repeat (source, service, model, path, status), and
    building their headers anew is most of the binding's cost: with them cached, encoding costs
    about a third as much, less than `produce` itself. It must equal the binding (a test checks).
    """

    def __init__(self, size: int = 4096) -> None:
        self.size = size
        self._headers: dict[tuple[str, AttributeValue], tuple[str, bytes]] = {}

    def __call__(self, event: CloudEvent) -> Record:
        cache = self._headers
        headers: Headers = []
        for item in event.attributes.items():
            header = cache.get(item)
            if header is None:
                name, value = item
                header = ("content-type" if name == "datacontenttype" else "ce_" + name,
                          attribute_text(value).encode())
                if type(value) is str:  # True == 1 as keys: only strings are cached
                    if len(cache) >= self.size:  # unique values (id, time) would fill it: start over
                        cache.clear()
                    cache[item] = header
            headers.append(header)
        partition_key = event.attributes.get("partitionkey")
        key = event.id if partition_key is None else attribute_text(partition_key)
        return key.encode(), event.data, headers


class KafkaSink:
    def __init__(self, config: KafkaSinkConfig) -> None:
        self.config = config
        self.address = config.bootstrap_servers
        self._topic = TopicTemplate(config.topic)
        self._structured = config.mode == "structured"
        self._binary = BinaryRecords()
        self._executor = ThreadPoolExecutor(1, thread_name_prefix="kafka-sink")
        self._lock = asyncio.Lock()
        # Filled by librdkafka's callbacks in the flushing thread; read after the flush returned.
        self._failed: list[tuple[KafkaError, Message]] = []
        self._down: KafkaError | None = None
        self._transport_error = ""
        self._fatal: KafkaError | None = None
        self._closed = False
        self._producer = self._new_producer()

    def _new_producer(self) -> Producer:
        conf = {
            **self.config.producer_config(),
            "on_delivery": self._on_delivery,
            "error_cb": self._on_error,
            "logger": logging.getLogger(f"{__name__}.librdkafka"),
        }
        try:
            return Producer(conf)
        except (KafkaException, TypeError, ValueError) as exc:
            raise ConfigError("config", f"kafka sink {self.address}: {exc}") from exc

    def _encode(self, event: CloudEvent) -> Record:
        # A payload that is itself a CloudEvent would read as structured mode in binary mode.
        if self._structured or (event.datacontenttype or "").startswith("application/cloudevents"):
            message = to_kafka_structured(event)
            headers: Headers = list(message.headers.items())
            return message.key, message.value, headers
        return self._binary(event)

    async def send_batch(self, events: Sequence[CloudEvent]) -> None:
        if not events:
            return
        async with self._lock:  # one batch at a time: its failures are the only ones recorded
            if self._fatal is not None:
                await self._replace_producer()
            self._failed.clear()
            refused = await self._produce_all(events)
            await self._wait_delivered()
            self._raise_failures(events, refused)
            self._down = None

    async def _produce_all(self, events: Sequence[CloudEvent]) -> dict[int, KafkaError]:
        """Queues every event; returns those librdkafka refused on the spot, by index."""
        refused: dict[int, KafkaError] = {}
        produce = self._producer.produce
        render = self._topic.render
        encode = self._encode
        for index, event in enumerate(events):
            key, value, headers = encode(event)
            topic = render(event)
            while True:
                try:
                    produce(topic, value, key, headers=headers)
                    break
                except BufferError:  # the local queue is full: let the thread drain some of it
                    await self._flush(_FLUSH_SLICE)
                except KafkaException as exc:
                    refused[index] = exc.args[0]
                    self._note_fatal(exc.args[0])
                    break
        return refused

    async def _flush(self, timeout: float) -> int:
        loop = asyncio.get_running_loop()
        try:
            return await loop.run_in_executor(self._executor, self._producer.flush, timeout)
        except KafkaException as exc:  # confluent-kafka raises fatal errors from flush/poll
            self._note_fatal(exc.args[0])
            raise SinkError(f"kafka {self.address}: {self._describe(exc.args[0])}") from exc

    async def _wait_delivered(self) -> None:
        started = time.monotonic()
        limit = self.config.delivery_timeout + 5.0  # librdkafka's own timeout fires before this
        purged = False
        while await self._flush(_FLUSH_SLICE):
            waited = time.monotonic() - started
            if not purged and ((self._down is not None and waited > _DOWN_GRACE) or waited > limit):
                # Nothing will be delivered soon: fail the rest now and keep no copy queued that
                # could arrive after the retry (their reports come back as _PURGE_* failures).
                self._producer.purge(in_queue=True, in_flight=True, blocking=False)
                purged = True

    def _raise_failures(self, events: Sequence[CloudEvent], refused: dict[int, KafkaError]) -> None:
        if not refused and not self._failed:
            return
        failures, unmatched = self._match_failures(events)
        failures.update(refused)
        # A report that matches no event cannot be dead-lettered precisely: retrying is the safe answer.
        retryable = unmatched + [e for e in failures.values() if e.code() not in PERMANENT]
        if retryable:
            raise SinkError(f"kafka {self.address}: {len(events) if unmatched else len(retryable)} of "
                            f"{len(events)} events not delivered: {self._describe(retryable[0])}")
        bad = sorted(failures)
        reason = self._describe(failures[bad[0]])
        raise RejectedError(f"kafka {self.address} refused {len(bad)} events: {reason}", [events[i] for i in bad])

    def _match_failures(self, events: Sequence[CloudEvent]) -> tuple[dict[int, KafkaError], list[KafkaError]]:
        """Failed delivery reports back to event indexes, by (topic, key, value); and the unmatched.

        Encoding is deterministic, so nothing is kept per record on the fast path; equal records
        fail alike, so an ambiguous match does not matter.
        """
        index: dict[tuple[str, bytes | None, bytes | None], list[int]] = {}
        if self._failed:
            for i, event in enumerate(events):
                key, value, _ = self._encode(event)
                index.setdefault((self._topic.render(event), key, value), []).append(i)
        matched: dict[int, KafkaError] = {}
        unmatched: list[KafkaError] = []
        for error, msg in self._failed:
            hits = index.get((msg.topic() or "", msg.key(), msg.value()))
            if hits is None:
                unmatched.append(error)
            for i in hits or ():
                matched[i] = error
        return matched, unmatched

    def _describe(self, error: KafkaError) -> str:
        if error.code() in _UNREACHABLE and self._down is not None:
            detail = f" ({self._transport_error})" if self._transport_error else ""
            return f"no broker reachable{detail}"
        return f"{error.name()}: {error.str()}"

    def _note_fatal(self, error: KafkaError) -> None:
        """A fatal error (e.g. the broker lost the idempotence state) ends this producer's use."""
        if (error.fatal() or error.code() == KafkaError._FATAL) and self._fatal is None:
            self._fatal = error
            log.error("kafka sink %s: fatal client error, a new producer takes over: %s", self.address, error.str())

    def _on_delivery(self, error: KafkaError | None, msg: Message) -> None:
        if error is not None:
            self._failed.append((error, msg))
            self._note_fatal(error)

    def _on_error(self, error: KafkaError) -> None:
        code = error.code()
        if error.fatal():
            self._note_fatal(error)
        elif code == KafkaError._ALL_BROKERS_DOWN:
            if self._down is None:
                log.warning("kafka sink: no broker reachable at %s (%s); retrying", self.address,
                            self._transport_error or error.str())
            self._down = error
        elif code in (KafkaError._TRANSPORT, KafkaError._RESOLVE):  # every failed connect: kept, not logged
            self._transport_error = error.str()
        else:
            log.warning("kafka sink %s: %s", self.address, error.str())

    async def _replace_producer(self) -> None:
        old, self._producer = self._producer, self._new_producer()
        self._fatal = None
        old.purge(in_queue=True, in_flight=True, blocking=False)
        # Closing joins librdkafka's threads: not on the event loop.
        await asyncio.get_running_loop().run_in_executor(self._executor, old.close)

    async def aclose(self) -> None:
        """Delivers what is still queued (briefly), then stops the client and its thread."""
        if self._closed:
            return
        self._closed = True
        try:
            if await self._flush(min(5.0, self.config.delivery_timeout)):
                self._producer.purge(in_queue=True, in_flight=True, blocking=False)
            await asyncio.get_running_loop().run_in_executor(self._executor, self._producer.close)
        except SinkError as exc:  # a fatal client has nothing left to deliver
            log.warning("kafka sink %s: %s", self.address, exc)
        finally:
            self._executor.shutdown(wait=True)

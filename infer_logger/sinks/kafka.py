"""`kafka` sink: inference events to a topic with the CloudEvents Kafka binding.

`send_batch` produces every event of the batch and returns once the broker acknowledged each
of them (acks=all), so the spool checkpoint moves only after delivery. Several batches may be
with the sink at once (`in_flight`, 4 by default; calls may overlap) and stream through one
producer, each tracked on its own, at no Python cost per delivered record:

- every record of a batch gets the batch's one callback object (`_Reports`);
  `delivery.report.only.error` keeps successes in C, so only failures call it, and they land
  in their own batch (purged records too);
- confluent-kafka holds a reference to that object per record until the record's report is
  served: once the batch is produced, the last report frees it, and a weak reference's callback
  wakes the event loop (`call_soon_threadsafe`), once per batch;
- one thread per producer serves the reports while any batch is out: it polls while a batch is
  being produced (`linger.ms` fills requests), and flushes once all are (a batch's tail goes out
  at once); its flush draining the queue also completes the batches sealed before (a backstop).

The event loop never blocks: `produce` only queues (a full queue is waited out asynchronously).
Batches are produced whole and in call order. Binary mode's headers come from a cache
(`BinaryRecords`). So the sink's client CPU per event stays near the raw producer's plus encoding.

Failures: a record the broker refuses for good (too large, invalid topic) is rejected and
dead-lettered by the worker; records the broker refused as one record batch for its size (a topic
whose `max.message.bytes` is below librdkafka's batches) are refused together, and the worker sends
them again in halves, so that only a record too large alone is dead-lettered (those records may
then land after later ones of their partition: a piece may go in two record batches, the first
refused again). One record refused so while another batch was in flight may have shared its
record batch with that one's records: it fails the batch as below, and is judged when retried
(the worker starts no batch meanwhile). Anything else
(broker down, timeouts, leader moves) fails the batch with `SinkError` naming as `pending` the
records not acknowledged (and those never produced), which the worker retries (at-least-once: a
report that matches no record has the whole batch retried, which may duplicate).
When no broker is reachable, batches fail after `_DOWN_GRACE` rather than waiting out the
delivery timeout: everything queued is purged, so that a retry does not duplicate it, and each
purged record's report reaches its own batch as a failure (records in flight, to a broker that is
up after all, are left to librdkafka's timeout: that broker may still write them). A fatal client
error fails the outstanding batches (purged at once), and the next batch gets a new producer.
"""
from __future__ import annotations

import asyncio
import logging
import math
import operator
import re
import string
import sys
import threading
import time
import weakref
from collections.abc import Callable, Sequence
from typing import Annotated, Any, Literal, Self

from pydantic import AfterValidator, Field, field_validator, model_validator

from infer_logger import events
from infer_logger.cloudevents.event import AttributeValue, CloudEvent, attribute_text
from infer_logger.cloudevents.json_format import is_event_format
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
_TOO_LARGE = frozenset({KafkaError.MSG_SIZE_TOO_LARGE, KafkaError.RECORD_LIST_TOO_LARGE}) if CLIENT else frozenset()

_POLL_SLICE = 0.1  # seconds per poll/flush in the poll thread: bounds how late it notices a dead broker
_IDLE_POLL = 1.0  # seconds between polls of an idle producer (its log and error callbacks)
_DOWN_GRACE = 2.0  # seconds a batch may wait with every broker down (reconnects take <= 1 s)
_PROBE = 0.5  # seconds a metadata request may take to tell that a broker is back
_FULL_WAIT = 0.005  # seconds the event loop waits for room when librdkafka's local queue is full
_UNREACHABLE = (KafkaError._PURGE_QUEUE, KafkaError._PURGE_INFLIGHT, KafkaError._MSG_TIMED_OUT) if CLIENT else ()
_TOPIC_CHARS = re.compile(r"[^A-Za-z0-9._-]")
_MISSING = "unknown"
_TOPIC_MAX = 249  # characters in a topic name
_MAX_RECORD = 1_000_000  # librdkafka's default message.max.bytes
_QUEUE_KBYTES = 1_048_576  # librdkafka's default queue.buffering.max.kbytes
_INT32 = 2_147_483_647  # librdkafka's integer properties are C ints: message.timeout.ms goes to here
_LINGER_MAX = 900_000  # librdkafka's range of linger.ms
_TIMEOUTS = ("message.timeout.ms", "delivery.timeout.ms")  # librdkafka's name and its alias
_LINGERS = ("linger.ms", "queue.buffering.max.ms")  # ... and linger_ms's
_CUTS = 12  # cuts of one record's data before it is refused (each keeps at most 95% of the last)
_CUT_MARGIN = 4096  # bytes kept free in a record whose data was cut to fit: its two new headers, rounding


class _Repeats(logging.Filter):
    """librdkafka logs every failed connect at ERROR: with a broker down, a line every 50 ms to
    1 s per client, for as long as it is down. The same line (its counters aside: "after 0ms",
    "3 identical error(s) suppressed") from one client passes once a minute; the clients' error
    callbacks say what it means meanwhile. Lines that differ otherwise (another broker, another
    partition's offset reset) are other lines."""

    EVERY = 60.0

    def __init__(self) -> None:
        super().__init__()
        self._last: dict[tuple[str, str], float] = {}

    def filter(self, record: logging.LogRecord) -> bool:
        args = record.args
        if not isinstance(args, tuple) or len(args) != 3:  # confluent-kafka's (facility, client, text)
            return True
        key = (str(args[1]), _COUNTERS.sub("", f"{args[0]} {args[2]}"))
        now = time.monotonic()
        if now - self._last.get(key, -self.EVERY) < self.EVERY:
            return False
        if len(self._last) >= 1024:  # bounded: client names and broker addresses vary
            self._last.clear()
        self._last[key] = now
        return True


# librdkafka: "(after 0ms in state CONNECT, 4 identical error(s) suppressed)"
_COUNTERS = re.compile(r"after \d+ms|, \d+ identical error\(s\) suppressed")
_REPEATS = _Repeats()


def client_logger(name: str) -> logging.Logger:
    """The logger a librdkafka client gets (its own log goes through logging, else it prints to
    stderr), with repeated lines held back."""
    logger = logging.getLogger(f"{name}.librdkafka")
    if _REPEATS not in logger.filters:
        logger.addFilter(_REPEATS)
    return logger


def _bootstrap(value: str) -> str:
    # librdkafka takes an empty list and then waits for ever for a broker it was never given (it
    # skips empty entries, as Kafka's Java client does: `a:9092,` is fine).
    if not any(part.strip() for part in value.split(",")):
        raise ValueError(f"{value!r} names no broker: give host:port[,host:port...]")
    return value


BootstrapServers = Annotated[str, AfterValidator(_bootstrap)]
"""`host:port[,host:port...]` of the brokers to start from."""


def checked_config(config: dict[str, ClientValue], *, group: str | None = None) -> dict[str, ClientValue]:
    """A config validator. `config` is passed through last, so the properties what is promised rests
    on are refused there: `transactional.id` (librdkafka then refuses every record until
    `init_transactions()`, which nothing here calls), `acks` but all (an event counts as delivered
    once every in-sync replica has it). For a consumer, whose group the setting `group` names:
    `group.id`, and offsets committed or stored by librdkafka (they move once the subscriber took
    the events: at-least-once)."""
    if "transactional.id" in config:
        raise ValueError("transactional.id is not supported: a transactional producer would refuse every record")
    for key in ("acks", "request.required.acks"):  # librdkafka's name, and its alias
        acks = config.get(key)
        if acks is not None and str(acks).lower() not in ("all", "-1"):
            raise ValueError(f"{key} {acks!r}: only all (-1): an event is delivered once every in-sync replica has it")
    if group is not None:
        if "group.id" in config:
            raise ValueError(f"group.id: the consumer group is set by {group}")
        for key in ("enable.auto.commit", "enable.auto.offset.store"):
            if key in config and str(config[key]).lower() not in ("false", "f", "0"):
                raise ValueError(f"{key}: offsets move once the subscriber took the events (at-least-once), "
                                 "not when librdkafka would")
    return config


def _milliseconds(seconds: float) -> int:
    return max(1, round(seconds * 1000))


def _client_integer(conf: dict[str, ClientValue], name: str, default: int, low: int, high: int) -> int:
    """librdkafka's integer property `name` as it will read it, for the sink to rely on too.
    ConfigError unless it is an integer in librdkafka's range: librdkafka reads a float's text up to
    its first non-digit (1e30 as "1e+30", so 1), and "1MB" would pass its own check as 1."""
    value = conf.get(name, default)
    where = f"kafka sink {conf.get('bootstrap.servers')}: {name}: {value!r}"
    try:
        if isinstance(value, bool):
            raise TypeError
        number = int(value)
    except (TypeError, ValueError, OverflowError):  # OverflowError: an infinite float
        raise ConfigError("config", f"{where} is not an integer") from None
    if not low <= number <= high:
        raise ConfigError("config", f"{where} is outside librdkafka's range {low}..{high}")
    return number


def _refusal(error: KafkaError, topic: str) -> KafkaError:
    """Why `produce` refused a record. A name Kafka never accepts is refused for good, but when
    the broker's answer beats the first record (a race), librdkafka says "unknown topic"."""
    if error.code() == KafkaError._UNKNOWN_TOPIC and (len(topic) > _TOPIC_MAX or topic in (".", "..")):
        return KafkaError(KafkaError.TOPIC_EXCEPTION, f"{topic[:60]}...: not a legal topic name "
                                                      f"(at most {_TOPIC_MAX} characters, not '.' or '..')")
    return error


class KafkaSinkConfig(SinkConfig):
    type: Literal["kafka"] = "kafka"
    bootstrap_servers: BootstrapServers
    """`host:port[,host:port...]` of the brokers to start from."""
    topic: str = "inference-events"
    """The topic, or a template of event attributes, e.g. `inference-{namespace}-{inferenceservicename}`
    or `{modelname}`. Characters a topic name cannot hold become `_`; a missing or empty attribute
    renders as `unknown`."""
    mode: Literal["binary", "structured"] = "binary"
    """CloudEvents Kafka content mode: `ce_*` headers and the payload as value, or a JSON event (an
    event without data goes structured either way: binary mode's null value is a tombstone)."""
    idempotent: bool = True
    """`enable.idempotence`: broker-side dedup of librdkafka's own retries, in order per partition."""
    linger_ms: float = Field(default=5.0, ge=0, le=_LINGER_MAX, allow_inf_nan=False)
    """How long librdkafka waits to fill a request (a batch's end is sent at once regardless)."""
    compression: Literal["none", "gzip", "snappy", "lz4", "zstd"] = "none"
    """`compression.type` of produced record batches."""
    delivery_timeout: float = Field(default=30.0, gt=0, le=_INT32 / 1000, allow_inf_nan=False)
    """Seconds librdkafka retries one record (`message.timeout.ms`) before the batch fails; more
    than `linger_ms`. `message.timeout.ms` under `config` applies instead (0: no limit)."""
    in_flight: int | None = Field(4, ge=1, le=64)
    """Batches with the sink before the oldest is acknowledged (null: `delivery.in_flight`).
    Batches are produced in spool order, and the idempotent producer keeps that order across its
    in-flight requests, so order holds across batches too. Failed batches are retried in spool
    order and no new batch starts meanwhile, so a broker outage keeps it as well (nothing is lost;
    a retry may duplicate); only records of a later batch the broker took before an earlier
    batch's records failed stay ahead of them. 1 keeps spool order even then; without
    `idempotent`, librdkafka's own retries may reorder as well."""
    cut_to_fit: bool = True
    """Data over librdkafka's `message.max.bytes` (or its local queue's `queue.buffering.max.kbytes`)
    is cut to fit and marked `truncated` (as the sidecar marks payloads over its `max_payload_bytes`);
    off, the event is refused (dead-lettered)."""
    config: dict[str, ClientValue] = Field(default_factory=dict)
    """librdkafka properties passed through last, e.g. TLS and SASL: `security.protocol`,
    `ssl.ca.location`, `sasl.mechanism`, `sasl.username`, `sasl.password`. For topics whose
    `max.message.bytes` is below librdkafka's `batch.size` (1 MB), give `batch.size` at most
    theirs: record batches the broker refuses for their size are sent again in halves."""

    @field_validator("topic")
    @classmethod
    def _check_topic(cls, value: str) -> str:
        # A name the broker never accepts would have every event dead-lettered: a constant one, or
        # a template whose fixed text (each field at least a character) is too long already.
        template = TopicTemplate(value)
        shortest = sum(len(literal) for literal, _ in template.parts) + len(template.fields)
        if shortest > _TOPIC_MAX or (template.constant is not None and value in (".", "..")):
            raise ValueError(f"{value[:60]!r}: not a legal topic name (at most {_TOPIC_MAX} characters, "
                             f"not '.' or '..')")
        return value

    @model_validator(mode="after")
    def _over_linger(self) -> Self:
        # librdkafka refuses to start otherwise, and its error named the field `config`; one that
        # `config` sets (the timeout, or linger.ms) is librdkafka's to check.
        if not any(name in self.config for name in (*_TIMEOUTS, *_LINGERS)) \
                and _milliseconds(self.delivery_timeout) <= self.linger_ms:
            raise ValueError(f"delivery_timeout: {self.delivery_timeout:g} s is not over linger_ms "
                             f"({self.linger_ms:g} ms): librdkafka needs a record's timeout to exceed the "
                             "time it may wait before sending it")
        return self

    @field_validator("config")
    @classmethod
    def _check_config(cls, value: dict[str, ClientValue]) -> dict[str, ClientValue]:
        return checked_config(value)

    def producer_config(self) -> dict[str, ClientValue]:
        return {
            "bootstrap.servers": self.bootstrap_servers,
            "acks": "all",
            "enable.idempotence": self.idempotent,
            "linger.ms": self.linger_ms,
            "compression.type": self.compression,
            "message.timeout.ms": _milliseconds(self.delivery_timeout),
            # librdkafka's default backs off up to 10 s: a restarted broker would sit idle that long.
            "reconnect.backoff.max.ms": 1000,
            **self.config,
        }

    def message_timeout(self) -> float:
        """Seconds librdkafka gives a record: `delivery_timeout`, unless `config` sets
        `message.timeout.ms` or its alias: set last, the last of them applies (0: no limit)."""
        conf = self.producer_config()
        name = [key for key in conf if key in _TIMEOUTS][-1]  # the order librdkafka is given them
        milliseconds = _client_integer(conf, name, 0, 0, _INT32)
        return milliseconds / 1000 if milliseconds else math.inf

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
        # Only texts are cached: as keys True == 1 (rendered "true" and "1"), False == 0.
        cached = all(type(v) is str or v is None for v in values)
        topic = self._cache.get(values) if cached else None
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
            topic = "".join(out)
            if cached:
                self._cache[values] = topic
        return topic


_UNIQUE = frozenset({"id", "time", "recordedtime", "traceparent", "partitionkey"})
"""Attributes whose values differ from event to event."""


class _HeaderCache(dict[tuple[str, AttributeValue], tuple[str, bytes]]):
    """(attribute, value) -> its binary-mode header; a miss builds it, and keeps it when safe."""

    __slots__ = ("size",)

    def __init__(self, size: int) -> None:
        super().__init__()
        self.size = size

    def __missing__(self, item: tuple[str, AttributeValue]) -> tuple[str, bytes]:
        name, value = item
        header = ("content-type" if name == "datacontenttype" else "ce_" + name, attribute_text(value).encode())
        # As keys True == 1 and False == 0, texts "true" and "1": booleans, 0 and 1 are not kept.
        # Nor are values unique to an event: they would only flush the repeated ones out.
        kind = type(value)
        if name not in _UNIQUE and (kind is str or (kind is int and value not in (0, 1))):
            if len(self) >= self.size:  # unique values (id, time) would fill it: start over
                self.clear()
            self[item] = header
        return header


def _header_name(attribute: str) -> str:
    return "content-type" if attribute == "datacontenttype" else "ce_" + attribute


class _Layout:
    """Headers of the events whose attributes come in one order (a sidecar's all do): a template
    per combination of the text values that repeat, into which the varying ones are put."""

    __slots__ = ("key", "templates", "varying")

    def __init__(self, names: tuple[str, ...], first: dict[str, AttributeValue]) -> None:
        # Text values repeat; ids, times and numbers (status, latency) change from event to event.
        fixed = [n for n in names if n not in _UNIQUE and type(first[n]) is str]
        self.varying = tuple((i, n, _header_name(n)) for i, n in enumerate(names) if n not in fixed)
        self.key: Callable[[dict[str, AttributeValue]], Any]
        if len(fixed) > 1:
            self.key = operator.itemgetter(*fixed)  # a tuple of the values, in C
        else:
            self.key = lambda attributes: tuple(attributes[n] for n in fixed)
        self.templates: dict[Any, Headers] = {}


class BinaryRecords:
    """`to_kafka_binary(event)` as a `produce`-ready record, the headers of repeated values cached.

    Most attributes of a sidecar's events repeat (source, service, model, path, type), and
    building their headers anew is most of the binding's cost. Events whose attributes come in
    one order share a `_Layout`: the headers of their repeated text values come ready-made from
    a template (found by those values), and only the varying ones (id, times, numbers) are
    encoded per event. A first sight goes the general way, through a cache of single headers
    (looked up in C: only misses run Python). It must equal the binding (a test checks).
    """

    def __init__(self, size: int = 4096) -> None:
        self.size = size
        self._headers = _HeaderCache(size)
        self._lookup = self._headers.__getitem__
        self._layouts: dict[tuple[str, ...], _Layout] = {}

    def __call__(self, event: CloudEvent) -> Record:
        attributes = event.attributes
        names = tuple(attributes)
        layout = self._layouts.get(names)
        if layout is None:
            if len(self._layouts) >= 64:  # attribute orders are few; bound the odd stream
                self._layouts.clear()
            layout = self._layouts[names] = _Layout(names, attributes)
        values = layout.key(attributes)
        template = layout.templates.get(values)
        if template is not None:
            # A hit means equal text values: `==` never matches a str with anything but that str.
            headers = template.copy()
            for index, name, header in layout.varying:
                value = attributes[name]
                headers[index] = (header, (value if type(value) is str else attribute_text(value)).encode())
        else:
            headers = list(map(self._lookup, attributes.items()))
            if all(type(v) is str for v in values):
                if len(layout.templates) >= self.size:
                    layout.templates.clear()
                layout.templates[values] = headers.copy()
        partition_key = attributes.get("partitionkey")
        key = event.id if partition_key is None else attribute_text(partition_key)
        return key.encode(), event.data, headers


class _Reports:
    """The delivery-report callback of one batch's records, and how the batch knows it is done.

    `delivery.report.only.error` keeps successes in C: only failures call it. confluent-kafka
    holds a reference to a record's callback until the record's report is served, so once the
    batch is produced and let go of it, the last report frees it, and the weak reference's
    callback completes the batch: per batch, without a Python call per delivered record.
    """

    __slots__ = ("__weakref__", "batch")

    def __init__(self, batch: _Batch) -> None:
        self.batch = batch

    def __call__(self, error: KafkaError | None, msg: Message) -> None:  # the poll thread; failures only
        if error is not None:
            self.batch.failed.append((error, msg))
            self.batch.client.note_fatal(error)


class _Batch:
    """Delivery accounting of one `send_batch`: its failures, and a future set once all is reported."""

    __slots__ = ("client", "done", "failed", "future", "loop", "pinned", "produced", "sealed", "since", "stopped",
                 "topic", "watch")

    def __init__(self, client: _Client, loop: asyncio.AbstractEventLoop) -> None:
        self.client = client
        self.loop = loop
        self.future: asyncio.Future[None] = loop.create_future()
        self.failed: list[tuple[KafkaError, Message]] = []
        self.produced = 0
        self.stopped: int | None = None  # the index of the first event not produced, if any was not
        self.topic: str | None = None  # of its last record: what a probe asks about
        self.sealed = False  # every record is produced (or none more will be)
        self.done = False  # every produced record is reported
        self.since = time.monotonic()  # grace and timeouts count from here (restarted by a purge)
        self.watch: weakref.ref[_Reports] | None = None  # kept: a weak reference's callback needs it alive
        self.pinned: _Reports | None = None

    def reports(self) -> _Reports:
        reports = _Reports(self)
        self.watch = weakref.ref(reports, self._released)
        return reports

    def _released(self, _: object) -> None:
        """The last reference to the batch's callback went (any thread): every record is reported."""
        self.complete()

    def complete(self) -> None:
        """Wake the event loop, once (idempotent there)."""
        if self.done:
            return
        self.done = True
        # Every record delivered, and its last report served by the poll thread after any "all
        # brokers down" served before it (one queue, in order): a broker answered since.
        if self.produced and not self.failed and threading.current_thread() is self.client._thread:
            self.client.reached()
        try:
            self.loop.call_soon_threadsafe(self._finish)
        except RuntimeError:  # the loop is closed: nobody waits for this batch any more
            pass

    def _finish(self) -> None:
        if not self.future.done():  # cancelled with its send_batch: nothing to tell
            self.future.set_result(None)


class _Client:
    """One librdkafka producer, and the one thread that serves its reports while batches are out.

    Only that thread polls, so delivery reports, error and log callbacks run there, never on the
    event loop. While a batch is being produced it polls (`linger.ms` fills the requests); once
    every batch is produced it flushes (the tails go out at once). It also purges what will not
    be delivered soon: what is queued after `_DOWN_GRACE` with every broker down, unless a broker
    answers a metadata request by then or a batch was delivered since (librdkafka tells when the
    last one goes, not when one is back); everything after the delivery timeout (a backstop:
    librdkafka's own, whichever `config` set, fires first); at once after a fatal error; and when
    closing, after its timeout.
    """

    def __init__(self, config: KafkaSinkConfig) -> None:
        self.address = config.bootstrap_servers
        self.timeout = config.message_timeout()  # librdkafka's, which `config` may have set
        self.limit = self.timeout + 5.0
        # "All brokers down", until a broker is seen to answer (a batch delivered, or a probe).
        self.down: KafkaError | None = None
        self.down_since = 0.0
        self._down_said = 0.0  # when the outage was last logged
        self.transport_error = ""
        self.fatal: KafkaError | None = None
        self.batches: list[_Batch] = []  # outstanding, oldest first; guarded by `_cond`
        self._cond = threading.Condition()
        self._closing = False
        self._close_by = 0.0
        self._warned = False
        conf = {
            **config.producer_config(),
            # Successes stay in C (no Python call, no Message object): a batch completes when
            # its callback is released (`_Reports`), and only failures call it.
            "delivery.report.only.error": True,
            "error_cb": self._on_error,
            "logger": client_logger(__name__),
        }
        try:
            self.producer = Producer(conf)
        except (KafkaException, TypeError, ValueError) as exc:
            raise ConfigError("config", f"kafka sink {self.address}: {exc}") from exc
        self._thread: threading.Thread | None = None  # started with the first batch

    def start_batch(self, loop: asyncio.AbstractEventLoop) -> _Batch:
        batch = _Batch(self, loop)
        with self._cond:
            self.batches.append(batch)
            self._cond.notify()
        if self._thread is None:
            self._thread = threading.Thread(target=self._run, name=f"kafka-sink {self.address}", daemon=True)
            self._thread.start()
        return batch

    def seal(self, batch: _Batch, held: bool) -> None:
        """The event loop let go of the batch's callback: `batch.produced` records are out."""
        if not held and not self._warned:
            self._warned = True
            log.warning("kafka sink %s: this confluent-kafka does not hold a record's callback until its "
                        "report; batches complete only when the producer's queue drains", self.address)
        batch.sealed = True
        if batch.produced == 0:
            batch.complete()

    def _run(self) -> None:
        producer = self.producer
        while True:
            with self._cond:
                if not self.batches and not self._closing:
                    self._cond.wait(_IDLE_POLL)
                idle = not self.batches
                if idle and self._closing:
                    return  # closing, and every batch has its reports
                sealed = [b for b in self.batches if b.sealed]
                producing = len(sealed) < len(self.batches)
            try:
                if idle:
                    # Nothing out: still serve the client's log and error callbacks now and then, so
                    # that a broker going away is reported when it happens, not in a burst later.
                    producer.poll(0)
                    continue
                if producing:  # more records are coming: let `linger.ms` fill the requests
                    producer.poll(_POLL_SLICE)
                elif producer.flush(_POLL_SLICE) == 0:
                    # Every record is queued, so the tails went out at once; and now every report
                    # is served: the batches sealed before are done (a backstop of `_Reports`).
                    for batch in sealed:
                        batch.complete()
            except KafkaException as exc:  # confluent-kafka raises fatal errors from poll/flush
                self.note_fatal(exc.args[0])
            except Exception:  # a bug in a callback: keep serving, or batches would hang
                log.exception("kafka sink %s: error while serving delivery reports", self.address)
            self._check()

    def _check(self) -> None:
        """Drop finished batches; purge when nothing will be delivered soon."""
        with self._cond:
            self.batches = [b for b in self.batches if not b.done]
            if not self.batches:
                return
            now = time.monotonic()
            oldest = min(b.since for b in self.batches)
            # The grace counts from when the last broker went, not from before: reconnects get it whole.
            unreachable = self.down is not None and now - max(oldest, self.down_since) > _DOWN_GRACE
            closed = self._closing and now >= self._close_by
            hopeless = self.fatal is not None or now - oldest > self.limit or closed
            if not (unreachable or hopeless):
                return
            topic = self.batches[0].topic
        if not hopeless and self._answers(topic):
            # Back since its last "all brokers down" (librdkafka does not say when): let them be.
            self.reached()
            return
        with self._cond:
            # Fail what is queued now rather than later, and keep no copy that could arrive after
            # the retry. Each purged record is reported (_PURGE_*) to its own batch as a failure;
            # a batch still being produced may get more records: its grace starts over.
            now = time.monotonic()
            for batch in self.batches:
                batch.since = now
        try:
            # Only a hopeless batch loses its records in flight. With every broker down none is (a
            # dropped connection's requests go back to the queue); one in flight means a connection
            # is up after all, unnoticed (a probe to a busy broker times out): that broker may still
            # write it, and the retry would again. librdkafka's own timeout ends it meanwhile.
            self.producer.purge(in_queue=True, in_flight=hopeless, blocking=False)
        except KafkaException as exc:
            log.warning("kafka sink %s: purge failed: %s", self.address, exc)

    def _answers(self, topic: str | None) -> bool:
        """Whether a broker answers a metadata request now (blocking, at most `_PROBE` seconds)."""
        try:
            self.producer.list_topics(topic, timeout=_PROBE)
        except KafkaException:
            return False
        return True

    def close(self, timeout: float) -> None:
        """Blocking: deliver what is out within `timeout` (then purge it), stop the thread and client."""
        with self._cond:
            self._closing = True
            self._close_by = time.monotonic() + timeout
            self._cond.notify()
        if self._thread is not None:
            self._thread.join()
        # Every record was reported (delivered or purged): nothing is left for close() to flush.
        self.producer.close()

    def note_fatal(self, error: KafkaError) -> None:
        """A fatal error (e.g. the broker lost the idempotence state) ends this producer's use."""
        if (error.fatal() or error.code() == KafkaError._FATAL) and self.fatal is None:
            self.fatal = error
            log.error("kafka sink %s: fatal client error, a new producer takes over: %s", self.address, error.str())

    def _on_error(self, error: KafkaError) -> None:
        code = error.code()
        if error.fatal():
            self.note_fatal(error)
        elif code == KafkaError._ALL_BROKERS_DOWN:  # when the last one goes, and at each failed reconnect round
            now = time.monotonic()
            if self.down is None:  # the outage began with the first
                self.down_since = now
            if self.down is None or now - self._down_said >= _Repeats.EVERY:  # not a line a second while it lasts
                self._down_said = now
                log.warning("kafka sink: no broker reachable at %s (%s); retrying", self.address,
                            self.transport_error or error.str())
            self.down = error
        elif code in (KafkaError._TRANSPORT, KafkaError._RESOLVE):  # every failed connect: kept, not logged
            self.transport_error = error.str()
        else:
            log.warning("kafka sink %s: %s", self.address, error.str())

    def reached(self) -> None:
        """A broker answered: none is down any more."""
        self.down = None
        self.transport_error = ""

    def describe(self, error: KafkaError) -> str:
        if error.code() in _UNREACHABLE and self.down is not None:
            detail = f" ({self.transport_error})" if self.transport_error else ""
            return f"no broker reachable{detail}"
        return f"{error.name()}: {error.str()}"


class KafkaSink:
    """Safe for concurrent `send_batch` calls: each returns once its own records are acknowledged."""

    def __init__(self, config: KafkaSinkConfig) -> None:
        self.config = config
        self.address = config.bootstrap_servers
        self._topic = TopicTemplate(config.topic)
        self._structured = config.mode == "structured"
        self._binary = BinaryRecords()
        self._cut_to_fit = config.cut_to_fit
        conf = config.producer_config()
        # librdkafka counts a record's value against its local queue's bytes: a value over them
        # is refused as "queue full" however empty the queue is, so it is cut to fit them too.
        kbytes = _client_integer(conf, "queue.buffering.max.kbytes", _QUEUE_KBYTES, 1, _INT32)
        self._queue_bytes = kbytes * 1024
        self._max_record = min(_client_integer(conf, "message.max.bytes", _MAX_RECORD, 1000, 1_000_000_000),
                               self._queue_bytes)
        # Held while a batch's records are produced (and while a fatal producer is replaced), not
        # while they are awaited: batches go out whole, in call order, and overlap in flight.
        self._producing = asyncio.Lock()
        self._closed = False
        # One flag per call in flight: whether another was in flight with it (`_raise_failures`).
        self._sending: list[list[bool]] = []
        self._client = _Client(config)

    def _encode(self, event: CloudEvent) -> Record:
        # A payload that is itself a CloudEvent would read as structured mode in binary mode; an
        # event without data (a 204's response) would be a tombstone, which a compacted topic
        # takes for the deletion of its key's records: the exchange's other events (keyed by id).
        if self._structured or event.data is None or is_event_format(event.datacontenttype):
            message = to_kafka_structured(event)
            headers: Headers = list(message.headers.items())
            return message.key, message.value, headers
        return self._binary(event)

    async def send_batch(self, events: Sequence[CloudEvent]) -> None:
        if not events:
            return
        shared = [bool(self._sending)]
        for other in self._sending:
            other[0] = True
        self._sending.append(shared)
        try:
            async with self._producing:
                if self._closed:
                    raise SinkError(f"kafka {self.address}: the sink is closed")
                if self._client.fatal is not None:
                    await self._replace_client()
                client = self._client
                batch = client.start_batch(asyncio.get_running_loop())
                refused: dict[int, KafkaError] = {}
                cut: dict[int, tuple[bytes | None, bytes | None]] = {}
                await self._produce_all(batch, events, refused, cut)
            await batch.future
        finally:
            self._sending.remove(shared)
        self._raise_failures(client, events, refused, batch.failed, batch.stopped, cut, shared=shared[0])

    async def _produce_all(self, batch: _Batch, events: Sequence[CloudEvent], refused: dict[int, KafkaError],
                           cut: dict[int, tuple[bytes | None, bytes | None]]) -> None:
        """Queues the events; those librdkafka refused on the spot go to `refused`, by index, and
        the (key, value) of those cut to fit (`_cut`) to `cut`, where their reports are matched.

        Then lets go of the batch's callback (also when cancelled: a traceback would keep this
        frame), so that the batch completes with its last record's report, unawaited if need be.
        """
        producer = batch.client.producer
        produce = producer.produce
        render = self._topic.render
        constant = self._topic.constant
        binary = None if self._structured else self._binary
        reports = batch.reports()
        produced = 0
        held = True
        topic: str | None = None
        try:
            for index, event in enumerate(events):
                content_type = event.attributes.get("datacontenttype")
                if binary is not None and event.data is not None and not is_event_format(content_type):
                    key, value, headers = binary(event)
                else:
                    key, value, headers = self._encode(event)
                topic = constant or render(event)
                cuts = 0
                shrinking = event  # the last cut: each cut shrinks it (its record's size is known)
                emptied = False
                while True:
                    try:
                        if produced:
                            # Positional (topic, value, key, partition, on_delivery): cheaper to parse.
                            produce(topic, value, key, -1, reports, headers=headers)
                        else:
                            before = sys.getrefcount(reports)
                            produce(topic, value, key, -1, reports, headers=headers)
                            # The client holds one reference per record out (the GIL is held
                            # throughout: no report can release it meanwhile). If not, completing
                            # on release would be early: keep it, and wait for the queue to drain.
                            if sys.getrefcount(reports) != before + 1:
                                batch.pinned = reports
                                held = False
                        produced += 1
                        break
                    except BufferError:  # the local queue is full: the poll thread drains it
                        # Room never comes for a record larger than the whole queue; nor when it
                        # was refused twice running with the queue empty (only this produces).
                        size = len(value or b"")
                        if size <= self._queue_bytes and (len(producer) or not emptied):
                            emptied = not len(producer)
                            # Purged or failing: the rest would fail too. Closing: aclose waits
                            # for this (the lock), and its close is brief, unlike the room.
                            if self._closed or any(e.code() not in PERMANENT for e, _ in batch.failed):
                                batch.stopped = index
                                return
                            await asyncio.sleep(_FULL_WAIT)
                            continue
                        error = KafkaError(KafkaError.MSG_SIZE_TOO_LARGE, f"a record of {size} bytes does not fit "
                                           f"librdkafka's local queue (queue.buffering.max.kbytes)")
                    except KafkaException as exc:
                        error = exc.args[0]
                    if error.code() == KafkaError.MSG_SIZE_TOO_LARGE and self._cut_to_fit and cuts < _CUTS:
                        smaller = self._cut(shrinking, key, value, headers)
                        if smaller is not None:
                            cuts += 1
                            shrinking = smaller
                            key, value, headers = self._encode(smaller)
                            cut[index] = key, value
                            continue
                    refused[index] = _refusal(error, topic)
                    batch.client.note_fatal(error)
                    break
        finally:
            batch.produced = produced
            batch.topic = topic
            del reports  # with every report in already, this completes the batch
            batch.client.seal(batch, held)

    def _cut(self, event: CloudEvent, key: bytes | None, value: bytes | None, headers: Headers) -> CloudEvent | None:
        """`event` with its data cut so that its record (key, value, headers) fits `message.max.bytes`
        and the local queue, marked as the sidecar marks a payload over its `max_payload_bytes` (a
        cap set past it, as its default of 1 MiB was, had every payload it cut dead-lettered here);
        None when cutting the data cannot make it fit. The record shrinks with the data in both
        modes (structured mode may hold it as base64): cut in proportion, less a margin.

        `event` is the last cut, if any, and (key, value, headers) its record: cut data is no
        longer JSON, so structured mode holds it as base64 (4 bytes for 3), and the next cut
        shrinks that in its own proportion. The first cut's `datasize` (the whole data's) stays."""
        data = event.data
        rest = len(key or b"") + sum(len(name) + len(text or b"") for name, text in headers)
        room = self._max_record - _CUT_MARGIN - rest
        if not data or not value or room <= 0:  # too large without the data too
            return None
        # At most 95% of the last: escapes denser at the data's start than on average (text in a
        # structured record's JSON string) had each proportional cut keep too much, cut after cut.
        keep = min(len(data) * room // len(value), len(data) * 19 // 20)
        attributes = dict(event.attributes)
        attributes[events.DATASIZE] = attributes.get(events.DATASIZE) or len(data)
        attributes[events.TRUNCATED] = True
        return CloudEvent(attributes, data[:keep])

    def _raise_failures(self, client: _Client, events: Sequence[CloudEvent], refused: dict[int, KafkaError],
                        failed: list[tuple[KafkaError, Message]], stopped: int | None = None,
                        cut: dict[int, tuple[bytes | None, bytes | None]] | None = None, *,
                        shared: bool = False) -> None:
        """Raise for what the batch did not deliver: RejectedError for records refused for good,
        else SinkError naming as `pending` the failed records and those never produced (from
        `stopped` on; one topic missing resent every other topic's records on each retry).
        `shared`: another call was in flight with this one (their records may share a record batch)."""
        if not refused and not failed and stopped is None:
            return
        unsent = len(events) if stopped is None else stopped  # the first event never produced
        failures, unmatched = self._match_failures(events, failed, cut or {})
        # The broker refuses a whole record batch for its size (a topic's max.message.bytes below
        # librdkafka's ~1 MB batches): several reports then say so, and each record may be taken
        # alone. Not counted: produce() refusing a record for its own size (in `refused`).
        oversize = [i for i, e in failures.items() if e.code() in _TOO_LARGE]
        together = len(oversize) > 1
        # One alone in this call, with another call in flight: its record batch may have held the
        # other's records, so nothing is known of its own size. Retried (the worker starts no batch
        # while one fails): refused alone then, it is refused for good.
        unknown = oversize if shared and not together else []
        failures.update(refused)
        # A report that matches no event cannot be dead-lettered precisely: retrying is the safe answer.
        retryable = unmatched + [e for i, e in failures.items() if e.code() not in PERMANENT or i in unknown]
        if retryable or stopped is not None:
            pending = [] if unmatched else [e for i, e in enumerate(events) if i in failures or i >= unsent]
            what = client.describe(retryable[0]) if retryable else "the local queue stayed full"
            raise SinkError(f"kafka {self.address}: {len(pending) or len(events)} of {len(events)} events not "
                            f"delivered: {what}", pending=pending)
        bad = sorted(failures)
        reason = client.describe(failures[bad[0]])
        too_large = together or all(e.code() in _TOO_LARGE for e in failures.values())
        # Together: the worker sends every failed record again in halves (refused ones among them
        # are refused again, alone at last); none that was acknowledged is resent.
        raise RejectedError(f"kafka {self.address} refused {len(bad)} events: {reason}", [events[i] for i in bad],
                            too_large=too_large, together=together)

    def _match_failures(self, events: Sequence[CloudEvent], failed: list[tuple[KafkaError, Message]],
                        cut: dict[int, tuple[bytes | None, bytes | None]]) -> tuple[dict[int, KafkaError], list[KafkaError]]:
        """This batch's failed reports back to event indexes, by (topic, key, value); and the unmatched.

        Encoding is deterministic, so nothing is kept per record on the fast path; equal records
        fail alike, so an ambiguous match does not matter.
        """
        index: dict[tuple[str, bytes | None, bytes | None], list[int]] = {}
        if failed:
            for i, event in enumerate(events):
                key, value = cut[i] if i in cut else self._encode(event)[:2]  # a cut one, as produced
                index.setdefault((self._topic.render(event), key, value), []).append(i)
        matched: dict[int, KafkaError] = {}
        unmatched: list[KafkaError] = []
        for error, msg in failed:
            hits = index.get((msg.topic() or "", msg.key(), msg.value()))
            if hits is None:
                unmatched.append(error)
            for i in hits or ():
                matched[i] = error
        return matched, unmatched

    async def _replace_client(self) -> None:
        """After a fatal error: fail the old producer's outstanding batches, then start anew."""
        old = self._client
        # Its thread purges at once (the error is fatal), serves the reports, then stops; closing
        # joins librdkafka's threads: not on the event loop.
        await asyncio.to_thread(old.close, 0.0)
        self._client = _Client(self.config)

    async def aclose(self) -> None:
        """Delivers what is still out (briefly, then purges it), then stops the client and its thread."""
        if self._closed:
            return
        self._closed = True
        # A batch being produced finishes first; one waiting for room in the queue stops (`_closed`).
        async with self._producing:
            await asyncio.to_thread(self._client.close, min(5.0, self._client.timeout))

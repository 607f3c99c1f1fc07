"""The kafka source against a real Kafka-protocol broker, feeding MemorySink subscribers."""

from __future__ import annotations

import asyncio
import socket
import subprocess
import sys
import threading
import time
import uuid
from collections.abc import AsyncIterator, Callable, Iterator, Sequence
from contextlib import asynccontextmanager, contextmanager
from pathlib import Path
from typing import Any, ClassVar, cast

import orjson
import pytest
from confluent_kafka import Consumer, KafkaError, KafkaException, Message, Producer, TopicPartition
from confluent_kafka.admin import AdminClient, NewTopic  # type: ignore[attr-defined]
from pydantic import ValidationError

from infer_logger.cloudevents.event import CloudEvent
from infer_logger.errors import ConfigError, RejectedError, SinkError
from infer_logger.events import EXPLANATION, REQUEST, RESPONSE
from infer_logger.sinks.http import HttpSinkConfig
from infer_logger.sinks.kafka import KafkaSinkConfig
from infer_logger.sinks.memory import MemorySink
from infer_logger.testing import EventCollector
from pipelines.sources import Source
from pipelines.sources.kafka import (
    DROPPED_HEADER,
    OFFSET_HEADER,
    PARTITION_HEADER,
    REASON_HEADER,
    TOPIC_HEADER,
    Headers,
    KafkaSource,
    KafkaSourceConfig,
    _parse_settled,
    _settled_metadata,
)
from tests.file_size import cut_short_then_again
from tests.services import NoidaServer

# Quick group joins and rebalances: a member learns of a rebalance at its next heartbeat.
FAST_GROUP: dict[str, str | int | float | bool] = {"heartbeat.interval.ms": 300}


def event(i: int, type_: str = REQUEST) -> CloudEvent:
    return CloudEvent({"specversion": "1.0", "id": f"id-{i}", "source": "http://sidecar/", "type": type_,
                       "datacontenttype": "application/json"}, b'{"instances":[[%d]]}' % i)


def new_topic(bootstrap: str, partitions: int = 1) -> str:
    name = f"src-{uuid.uuid4().hex[:12]}"
    admin = AdminClient({"bootstrap.servers": bootstrap})  # kept alive until the topic exists
    admin.create_topics([NewTopic(name, num_partitions=partitions, replication_factor=1)])[name].result(10)
    return name


async def publish(bootstrap: str, topic: str, events: Sequence[CloudEvent], mode: str = "binary") -> None:
    sink = KafkaSinkConfig(bootstrap_servers=bootstrap, topic=topic, mode=mode).build()  # type: ignore[arg-type]
    await sink.send_batch(events)
    await sink.aclose()


def publish_raw(bootstrap: str, topic: str, records: Sequence[tuple[bytes | None, Headers]]) -> None:
    producer = Producer({"bootstrap.servers": bootstrap, "acks": "all"})
    for value, headers in records:
        producer.produce(topic, value, b"poison", headers=headers)
    assert producer.flush(10) == 0


def committed(bootstrap: str, group: str, topic: str, partitions: int = 1) -> list[int]:
    """The group's committed offset per partition (negative: none)."""
    consumer = Consumer({"bootstrap.servers": bootstrap, "group.id": group})
    try:
        got = consumer.committed([TopicPartition(topic, p) for p in range(partitions)], timeout=10)
        return [tp.offset for tp in got]
    finally:
        consumer.close()


def read_topic(bootstrap: str, topic: str, count: int) -> list[Message]:
    """Up to `count` records of partition 0 from its start (10 s at most)."""
    consumer = Consumer({"bootstrap.servers": bootstrap, "group.id": "dlq-reader"})
    consumer.assign([TopicPartition(topic, 0, 0)])
    got: list[Message] = []
    deadline = time.monotonic() + 10
    while len(got) < count and time.monotonic() < deadline:
        if (msg := consumer.poll(0.2)) is not None and msg.error() is None:
            got.append(msg)
    consumer.close()
    return got


async def until(check: Callable[[], bool], timeout: float = 15.0, what: str = "condition") -> None:
    deadline = time.monotonic() + timeout
    while not check():
        if time.monotonic() > deadline:
            raise TimeoutError(f"{what} not met in {timeout}s")
        await asyncio.sleep(0.05)


def source_config(bootstrap: str, topic: str, group: str, **extra: Any) -> KafkaSourceConfig:
    return KafkaSourceConfig(bootstrap_servers=bootstrap, topics=[topic], group_id=group, batch_size=50,
                             batch_timeout=0.2, session_timeout_ms=6000, retry_max=0.3,
                             config={**FAST_GROUP, **extra.pop("config", {})}, **extra)


@asynccontextmanager
async def running(source: KafkaSource) -> AsyncIterator[KafkaSource]:
    task = asyncio.create_task(source.run())
    try:
        yield source
    finally:
        await source.aclose()
        await asyncio.wait_for(task, 10)


@contextmanager
def _not_kafka() -> Iterator[tuple[str, list[int]]]:
    """A TCP server answering each connection with an HTTP error; its address and a count of connections."""
    server = socket.create_server(("127.0.0.1", 0))
    connections = [0]

    def serve() -> None:
        while True:
            try:
                conn, _ = server.accept()
            except OSError:  # closed: done
                return
            connections[0] += 1
            with conn:
                try:
                    conn.recv(100)
                    conn.sendall(b"HTTP/1.1 400 Bad Request\r\n\r\n")
                except OSError:
                    pass

    thread = threading.Thread(target=serve, daemon=True)
    thread.start()
    try:
        yield f"127.0.0.1:{server.getsockname()[1]}", connections
    finally:
        try:
            server.shutdown(socket.SHUT_RDWR)  # wakes the accept (a close alone does not)
        except OSError:
            pass
        server.close()
        thread.join(5)


class TestConsume:
    """Events arrive decoded from both content modes; offsets move only after the subscriber."""

    async def test_consume_and_commit(self, kafka_bootstrap: str) -> None:
        topic, group = new_topic(kafka_bootstrap), f"g-{uuid.uuid4().hex[:8]}"
        await publish(kafka_bootstrap, topic, [event(i) for i in range(60)], mode="binary")
        await publish(kafka_bootstrap, topic, [event(i) for i in range(60, 120)], mode="structured")
        sink = MemorySink()
        source = source_config(kafka_bootstrap, topic, group).build(sink)
        assert isinstance(source, Source)
        async with running(source):
            await until(lambda: len(sink.events) >= 120, what="120 events")
            await until(lambda: committed(kafka_bootstrap, group, topic) == [120], what="commit")
        assert [e.id for e in sink.events] == [f"id-{i}" for i in range(120)]
        assert sink.events[0].json() == {"instances": [[0]]} and sink.events[119].type == REQUEST
        assert source.delivered == 120 and sink.calls >= 3  # batches of at most 50

    async def test_restart_resumes_from_the_committed_offset(self, kafka_bootstrap: str) -> None:
        topic, group = new_topic(kafka_bootstrap), f"g-{uuid.uuid4().hex[:8]}"
        await publish(kafka_bootstrap, topic, [event(i) for i in range(20)])
        first = MemorySink()
        async with running(source_config(kafka_bootstrap, topic, group).build(first)):
            await until(lambda: len(first.events) >= 20, what="first 20")
        await publish(kafka_bootstrap, topic, [event(i) for i in range(20, 40)])
        second = MemorySink()
        async with running(source_config(kafka_bootstrap, topic, group).build(second)):
            await until(lambda: len(second.events) >= 20, what="next 20")
            await until(lambda: committed(kafka_bootstrap, group, topic) == [40], what="commit")
        assert [e.id for e in second.events] == [f"id-{i}" for i in range(20, 40)]


class TestFailingSubscriber:
    """A failing subscriber is retried; nothing is committed or skipped meanwhile."""

    async def test_retried_then_committed(self, kafka_bootstrap: str) -> None:
        topic, group = new_topic(kafka_bootstrap), f"g-{uuid.uuid4().hex[:8]}"
        await publish(kafka_bootstrap, topic, [event(i) for i in range(30)])
        sink, down = MemorySink(), [True]
        sink.fail = lambda batch: SinkError("store down") if down[0] else None
        async with running(source_config(kafka_bootstrap, topic, group).build(sink)):
            await until(lambda: sink.calls >= 3, what="3 attempts")
            assert committed(kafka_bootstrap, group, topic) == [-1001]  # OFFSET_INVALID: none
            down[0] = False
            await until(lambda: len(sink.events) >= 30, what="30 events")
            await until(lambda: committed(kafka_bootstrap, group, topic) == [30], what="commit")
        assert [e.id for e in sink.events] == [f"id-{i}" for i in range(30)]

    async def test_stopped_while_failing_then_redelivered(self, kafka_bootstrap: str) -> None:
        topic, group = new_topic(kafka_bootstrap), f"g-{uuid.uuid4().hex[:8]}"
        await publish(kafka_bootstrap, topic, [event(i) for i in range(10)])
        failing = MemorySink()
        failing.fail = lambda batch: SinkError("store down")
        async with running(source_config(kafka_bootstrap, topic, group).build(failing)):
            await until(lambda: failing.calls >= 2, what="2 attempts")
        assert committed(kafka_bootstrap, group, topic) == [-1001]
        sink = MemorySink()
        async with running(source_config(kafka_bootstrap, topic, group).build(sink)):
            await until(lambda: len(sink.events) >= 10, what="10 events")
        assert [e.id for e in sink.events] == [f"id-{i}" for i in range(10)]


    async def test_stopped_with_a_batch_taken_in_part_commits_what_was_taken(self, kafka_bootstrap: str) -> None:
        topic, group = new_topic(kafka_bootstrap), f"g-{uuid.uuid4().hex[:8]}"
        await publish(kafka_bootstrap, topic, [event(i) for i in range(10)])
        taken: list[CloudEvent] = []

        async def some(events: Sequence[CloudEvent]) -> None:  # every other one taken, then down
            if not taken:
                taken.extend(events[1::2])
            raise SinkError("down for the rest", pending=[e for e in events if e not in taken])

        subscriber = MemorySink()
        subscriber.send_batch = some  # type: ignore[method-assign]
        async with running(source_config(kafka_bootstrap, topic, group).build(subscriber)):
            await until(lambda: bool(taken), what="the first attempt")
        # Up to the first not taken; those taken past it named for whoever reads next.
        assert committed(kafka_bootstrap, group, topic) == [0]
        sink = MemorySink()
        async with running(source_config(kafka_bootstrap, topic, group).build(sink)):
            await until(lambda: len(sink.events) >= 5, what="5 events")
        assert [e.id for e in sink.events] == [f"id-{i}" for i in range(0, 10, 2)]
        assert committed(kafka_bootstrap, group, topic) == [10]
        again = MemorySink()
        async with running(source_config(kafka_bootstrap, topic, group).build(again)):
            await publish(kafka_bootstrap, topic, [event(10)])
            await until(lambda: len(again.events) >= 1, what="the next event")
        assert [e.id for e in again.events] == ["id-10"]

    async def test_commit_metadata_not_ours_is_left_alone(self, kafka_bootstrap: str) -> None:
        topic, group = new_topic(kafka_bootstrap), f"g-{uuid.uuid4().hex[:8]}"
        await publish(kafka_bootstrap, topic, [event(i) for i in range(4)])
        other = Consumer({"bootstrap.servers": kafka_bootstrap, "group.id": group})
        try:  # another tool's note
            other.commit(offsets=[TopicPartition(topic, 0, 1, metadata="checkpoint 7")], asynchronous=False)
        finally:
            other.close()
        sink = MemorySink()
        async with running(source_config(kafka_bootstrap, topic, group).build(sink)):
            await until(lambda: len(sink.events) >= 3, what="3 events")
        assert [e.id for e in sink.events] == ["id-1", "id-2", "id-3"]


def test_settled_metadata_round_trip() -> None:
    assert _settled_metadata(100, set()) is None
    text = _settled_metadata(100, {100, 101, 102, 105, 107, 108})
    assert text == "infer-logger/settled:0-2,5,7-8"
    assert _parse_settled(text, 100) == {100, 101, 102, 105, 107, 108}
    # Too many to name: the first ones only (the others are delivered again).
    many = _settled_metadata(0, set(range(0, 10_000, 2)))
    assert many is not None and len(many) <= 3000
    named = _parse_settled(many, 0)
    assert named and named == set(range(0, 2 * len(named), 2))
    assert _parse_settled("another tool's note", 5) == set() and _parse_settled(None, 5) == set()
    for bad in ("x", "3-1", "-2", "1-", "0-999999999999"):
        assert _parse_settled(f"infer-logger/settled:{bad}", 5) is None, bad


class Recorder(MemorySink):
    """A subscriber that also appends to a log shared by several consumers (arrival order)."""

    def __init__(self, log: list[CloudEvent]) -> None:
        super().__init__()
        self.log = log

    async def send_batch(self, events: Sequence[CloudEvent]) -> None:
        await super().send_batch(events)
        self.log.extend(events)


class TestGroup:
    """Consumers of one group share partitions; joins and leaves lose and reorder nothing."""

    async def test_two_consumers(self, kafka_bootstrap: str) -> None:
        topic, group = new_topic(kafka_bootstrap, partitions=4), f"g-{uuid.uuid4().hex[:8]}"
        arrivals: list[CloudEvent] = []
        a_sink, b_sink = Recorder(arrivals), Recorder(arrivals)
        a = source_config(kafka_bootstrap, topic, group).build(a_sink)
        b = source_config(kafka_bootstrap, topic, group).build(b_sink)
        types = (REQUEST, RESPONSE, EXPLANATION)
        async with running(a):
            await publish(kafka_bootstrap, topic, [event(i, t) for i in range(30) for t in types])
            await until(lambda: len(a_sink.events) >= 20, what="a's first events")
            async with running(b):  # joins mid-stream: a rebalance while a consumes
                await until(lambda: bool(a.assignment) and bool(b.assignment), what="both assigned")
                assert not a.assignment & b.assignment
                await publish(kafka_bootstrap, topic, [event(i, t) for t in types for i in range(30, 90)])
                await until(lambda: len(first_seen(arrivals)) >= 270, what="all 270 events")
                assert b_sink.events and a.assignment | b.assignment == {(topic, p) for p in range(4)}
            # b left: a owns every partition again and reads on.
            await publish(kafka_bootstrap, topic, [event(i, t) for i in range(90, 100) for t in types])
            await until(lambda: len(first_seen(arrivals)) >= 300, what="all 300 events")
        seen = first_seen(arrivals)
        for i in range(100):
            assert [t for (id_, t) in seen if id_ == f"id-{i}"] == list(types), f"id-{i}"


def first_seen(arrivals: list[CloudEvent]) -> list[tuple[str, str]]:
    """(id, type) in order of first arrival: at-least-once may repeat, but never reorder."""
    return list(dict.fromkeys((e.id, e.type) for e in arrivals))


class TestDeadLetters:
    """What is not a CloudEvent is dead-lettered with its reason; the consumer goes on."""

    POISON: ClassVar[list[tuple[bytes, Headers]]] = [
        (b"not an event", []),  # no headers at all
        (b"{oops", [("content-type", b"application/cloudevents+json")]),  # structured, bad JSON
        (b"{}", [("ce_specversion", b"1.0"), ("ce_source", b"/s"), ("ce_type", b"t")]),  # no ce_id
    ]

    async def test_to_a_topic(self, kafka_bootstrap: str) -> None:
        topic, group = new_topic(kafka_bootstrap), f"g-{uuid.uuid4().hex[:8]}"
        dead = f"{topic}-dead"
        await publish(kafka_bootstrap, topic, [event(0), event(1)])
        publish_raw(kafka_bootstrap, topic, self.POISON)
        await publish(kafka_bootstrap, topic, [event(2)])
        sink = MemorySink()
        source = source_config(kafka_bootstrap, topic, group, dead_letter_topic=dead).build(sink)
        async with running(source):
            await until(lambda: len(sink.events) >= 3, what="3 events")
            await until(lambda: committed(kafka_bootstrap, group, topic) == [6], what="commit")
        assert [e.id for e in sink.events] == ["id-0", "id-1", "id-2"] and source.dead_lettered == 3
        got = read_topic(kafka_bootstrap, dead, 3)
        assert [m.value() for m in got] == [value for value, _ in self.POISON]
        headers = [dict(cast(list[tuple[str, bytes]], m.headers() or [])) for m in got]
        assert [h[OFFSET_HEADER] for h in headers] == [b"2", b"3", b"4"]
        assert all(h[TOPIC_HEADER] == topic.encode() and h[PARTITION_HEADER] == b"0" for h in headers)
        assert all(h[REASON_HEADER].startswith(b"not a CloudEvent") for h in headers)
        assert b"id" in headers[2][REASON_HEADER] and headers[1]["content-type"] == b"application/cloudevents+json"

    async def test_records_that_broke_decoding_itself(self, kafka_bootstrap: str) -> None:
        """A null header value (Java clients write them) and a structured record whose data nests
        JSON 300 deep (our own structured sink writes it; orjson reads 1024 levels but writes
        254) raised out of decoding: `run()` ended, nothing committed, and every restart died on
        the same record. The first is delivered now (the null header dropped), the second too."""
        topic, group = new_topic(kafka_bootstrap), f"g-{uuid.uuid4().hex[:8]}"
        await publish(kafka_bootstrap, topic, [event(0)])
        publish_raw(kafka_bootstrap, topic, [(b"{}", [("ce_specversion", b"1.0"), ("ce_id", b"id-1"),
                                                      ("ce_source", b"/s"), ("ce_type", b"t"), ("trace", None)])])
        deep = b"[" * 300 + b"]" * 300
        await publish(kafka_bootstrap, topic, [CloudEvent(event(2).attributes, deep)], mode="structured")
        sink = MemorySink()
        source = source_config(kafka_bootstrap, topic, group, dead_letter_topic=f"{topic}-dead").build(sink)
        async with running(source):
            await until(lambda: committed(kafka_bootstrap, group, topic) == [3], what="commit")
        assert [e.id for e in sink.events] == ["id-0", "id-1", "id-2"] and source.dead_lettered == 0
        assert "trace" not in sink.events[1].meta and sink.events[2].data == deep

    async def test_to_a_file_with_the_subscribers_refusals(self, kafka_bootstrap: str, tmp_path: Path) -> None:
        topic, group = new_topic(kafka_bootstrap), f"g-{uuid.uuid4().hex[:8]}"
        await publish(kafka_bootstrap, topic, [event(0), event(1), event(2)])
        publish_raw(kafka_bootstrap, topic, [(b"\xff\xfe", [("ce_id", b"\xff")])])
        sink = Picky(refuse="id-1")  # refused for good: dead-lettered too, the rest is taken
        path = tmp_path / "dead" / "kafka.jsonl"
        source = source_config(kafka_bootstrap, topic, group, dead_letter_file=path).build(sink)
        async with running(source):
            await until(lambda: committed(kafka_bootstrap, group, topic) == [4], what="commit")
        lines = [orjson.loads(line) for line in path.read_bytes().splitlines()]
        assert [(d["offset"], d["reason"].split(":")[0]) for d in lines] == [
            (1, "refused by the subscriber"), (3, "not a CloudEvent")]
        assert lines[1]["value"] == {"base64": "//4="} and lines[1]["headers"] == [["ce_id", {"base64": "/w=="}]]
        assert lines[0]["key"] == "id-1" and lines[0]["topic"] == topic
        assert [e.id for e in sink.events] == ["id-0", "id-2"]


    async def test_a_batch_refused_for_its_size_goes_in_halves(self, kafka_bootstrap: str, tmp_path: Path) -> None:
        """A subscriber's batch POST answered 413 (a receiver's request limit) had every event of
        the batch dead-lettered, though each fitted: only the event too large alone is."""
        topic, group = new_topic(kafka_bootstrap), f"g-{uuid.uuid4().hex[:8]}"
        padded = [CloudEvent(e.attributes, b'"%s"' % (b"x" * (50_000 if i == 25 else 2000)))
                  for i, e in enumerate(map(event, range(60)))]
        await publish(kafka_bootstrap, topic, padded)
        path = tmp_path / "dead.jsonl"
        with EventCollector() as receiver:
            receiver.max_body = 40_000
            sink = HttpSinkConfig(url=receiver.url, mode="batch").build()
            source = source_config(kafka_bootstrap, topic, group, dead_letter_file=path).build(sink)
            async with running(source):
                await until(lambda: committed(kafka_bootstrap, group, topic) == [60], what="commit")
            await sink.aclose()
            assert [e.id for e in receiver.events] == [f"id-{i}" for i in range(60) if i != 25]
        (line,) = (orjson.loads(line) for line in path.read_bytes().splitlines())
        assert line["key"] == "id-25" and "413" in line["reason"] and source.dead_lettered == 1

    async def test_a_failure_after_halves_were_taken_sends_only_the_rest_again(self, kafka_bootstrap: str) -> None:
        """A batch refused together, its first halves taken, then a failure: the whole batch was
        sent again, the halves taken twice."""
        topic, group = new_topic(kafka_bootstrap), f"g-{uuid.uuid4().hex[:8]}"
        await publish(kafka_bootstrap, topic, [event(i) for i in range(8)])
        sink, flaky = MemorySink(), [True]

        def fail(batch: Sequence[CloudEvent]) -> Exception | None:
            if len(batch) > 2:
                return RejectedError("413", batch, too_large=True, together=True)
            if batch[0].id == "id-4" and flaky:
                flaky.clear()
                return SinkError("down")
            return None

        sink.fail = fail
        source = source_config(kafka_bootstrap, topic, group).build(sink)
        async with running(source):
            await until(lambda: committed(kafka_bootstrap, group, topic) == [8], what="commit")
        assert [e.id for e in sink.events] == [f"id-{i}" for i in range(8)] and source.delivered == 8

class Picky(MemorySink):
    """Takes every event but one, which it refuses for good (RejectedError names it)."""

    def __init__(self, refuse: str) -> None:
        super().__init__()
        self.refuse = refuse

    async def send_batch(self, events: Sequence[CloudEvent]) -> None:
        await super().send_batch([e for e in events if e.id != self.refuse])
        if refused := [e for e in events if e.id == self.refuse]:
            raise RejectedError("bad instance", refused)


class Gated(MemorySink):
    """Takes a batch only once `gate` is set: a subscriber busy while the broker goes away."""

    def __init__(self) -> None:
        super().__init__()
        self.gate = asyncio.Event()
        self.waiting = 0

    async def send_batch(self, events: Sequence[CloudEvent]) -> None:
        self.waiting += 1
        await self.gate.wait()
        await super().send_batch(events)


class TestBrokerDown:
    """The broker unreachable at start, or gone mid-stream and back: the source names the address,
    keeps running, and loses nothing (at-least-once: a repeat is allowed, a reorder is not)."""

    async def test_down_at_start(self, caplog: pytest.LogCaptureFixture) -> None:
        server = NoidaServer("kafka").start()
        topic, group = new_topic(server.address), f"g-{uuid.uuid4().hex[:8]}"
        await publish(server.address, topic, [event(i) for i in range(20)])
        server.stop(keep_data=True)  # down when the source starts: the port refuses
        sink = MemorySink()
        source = source_config(server.address, topic, group).build(sink)
        try:
            async with running(source):
                await until(lambda: f"no broker reachable at {server.address}" in caplog.text,
                            what="a warning naming the address")
                await asyncio.sleep(2.5)  # reconnect rounds, each reported by librdkafka: said once
                assert caplog.text.count("no broker reachable") == 1
                server.start(fresh=False)
                await until(lambda: len(sink.events) >= 20, 30, what="20 events")
                await until(lambda: committed(server.address, group, topic) == [20], what="commit")
        finally:
            server.stop()
        assert [e.id for e in sink.events] == [f"id-{i}" for i in range(20)]

    async def test_unreachable_is_its_problem_until_a_broker_answers(self) -> None:
        """`problem` (the ingest's /readyz reason) names the address while no broker is reachable:
        at start, and again once the broker goes away from a consumer that kept its assignment
        (an idle topic: no record, no rebalance says it is back, only a broker that answers)."""
        server = NoidaServer("kafka")  # its port, nothing listening yet
        source = source_config(server.address, f"src-{uuid.uuid4().hex[:12]}", f"g-{uuid.uuid4().hex[:8]}").build(
            MemorySink())
        try:
            async with running(source):
                await until(lambda: source.problem is not None, what="unreachable at start")
                assert source.problem is not None and server.address in source.problem
                server.start()
                await until(lambda: source.problem is None, 30, what="ready once the broker is up")
        finally:
            server.stop()
        server = NoidaServer("kafka").start()
        topic, group = new_topic(server.address), f"g-{uuid.uuid4().hex[:8]}"
        source = source_config(server.address, topic, group).build(MemorySink())
        try:
            async with running(source):
                await until(lambda: bool(source.assignment), 30, what="assigned")
                assert source.problem is None
                server.stop(keep_data=True)
                await until(lambda: source.problem is not None, 30, what="unreachable mid-stream")
                server.start(fresh=False)
                await until(lambda: source.problem is None, 30, what="ready once the broker is back")
        finally:
            server.stop()

    async def test_a_peer_that_is_not_kafka_is_said_once_not_at_every_reconnect(
            self, caplog: pytest.LogCaptureFixture) -> None:
        """A bootstrap address that answers but is not Kafka: librdkafka reports the same error at
        every reconnect (~20 lines a second); the address is named and it is said once."""
        with _not_kafka() as (address, connections):
            source = source_config(address, "t", f"g-{uuid.uuid4().hex[:8]}").build(MemorySink())
            async with running(source):
                await until(lambda: connections[0] >= 6, 30, what="reconnects")
                assert source.problem is not None and address in source.problem
        said = [r.getMessage() for r in caplog.records
                if r.name == "pipelines.sources.kafka" and "Invalid response size" in r.getMessage()]
        assert len(said) == 1 and address in said[0], said

    async def test_a_topic_created_later(self, kafka_bootstrap: str) -> None:
        """Subscribed before it exists (a sidecar's first event creates it): read within seconds,
        not at librdkafka's default 5-minute metadata refresh."""
        topic, group = f"src-{uuid.uuid4().hex[:12]}", f"g-{uuid.uuid4().hex[:8]}"
        sink = MemorySink()
        async with running(source_config(kafka_bootstrap, topic, group).build(sink)):
            await asyncio.sleep(1.0)  # subscribed; the topic is not there yet
            await publish(kafka_bootstrap, topic, [event(i) for i in range(10)])
            await until(lambda: len(sink.events) >= 10, 20, what="10 events")
        assert [e.id for e in sink.events] == [f"id-{i}" for i in range(10)]

    async def test_restart_mid_stream(self, caplog: pytest.LogCaptureFixture) -> None:
        server = NoidaServer("kafka").start()
        topic, group = new_topic(server.address), f"g-{uuid.uuid4().hex[:8]}"
        sink = Gated()
        source = source_config(server.address, topic, group).build(sink)
        try:
            await publish(server.address, topic, [event(i) for i in range(30)])
            async with running(source):
                await until(lambda: sink.waiting >= 1, what="a batch in hand")
                server.stop(keep_data=True)  # gone while the subscriber works on a batch
                sink.gate.set()  # taken: its commit cannot reach the broker
                await until(lambda: "commit failed" in caplog.text, what="a failed commit")
                server.start(fresh=False)  # noida keeps its data across a restart on the same dir
                await publish(server.address, topic, [event(i) for i in range(30, 60)])
                await until(lambda: len(first_seen(sink.events)) >= 60, 30, what="all 60 events")
                await until(lambda: committed(server.address, group, topic) == [60], 30, what="commit")
        finally:
            server.stop()
        assert first_seen(sink.events) == [(f"id-{i}", REQUEST) for i in range(60)]


    async def test_a_partition_lost_while_held_is_read_again_when_assigned_again(self) -> None:
        """Paused while the subscriber failed, lost while the broker stalled past the session
        timeout, assigned again after the resume: librdkafka kept it paused, never read again."""

        class DownFor(MemorySink):
            until = 0.0

            async def send_batch(self, events: Sequence[CloudEvent]) -> None:
                if time.monotonic() < self.until:
                    raise SinkError("subscriber down")
                await super().send_batch(events)

        server = NoidaServer("kafka").start()
        topic, group = new_topic(server.address), f"g-{uuid.uuid4().hex[:8]}"
        sink = DownFor()
        source = source_config(server.address, topic, group).build(sink)
        try:
            async with running(source):
                await publish(server.address, topic, [event(1)])
                await until(lambda: committed(server.address, group, topic) == [1], what="first commit")
                sink.until = time.monotonic() + 14
                await publish(server.address, topic, [event(2)])
                await until(lambda: source._held, what="held")
                server.pause()  # past session.timeout.ms (6 s): the partition is lost
                await asyncio.sleep(12)
                server.resume()

                def second_commit() -> bool:
                    try:
                        return committed(server.address, group, topic) == [2]
                    except KafkaException:  # the broker still waking up
                        return False

                await until(second_commit, 40, what="second commit")
        finally:
            server.resume()
            server.stop()
        assert [e.id for e in sink.events] == ["id-1", "id-2"]

    async def test_a_stop_with_kafka_stalled_ends(self) -> None:
        """A commit to a broker that does not answer (SIGSTOPped) waits for ever in librdkafka:
        the stop waited with it. The consumer is left closing; the records come again."""
        server = NoidaServer("kafka").start()
        topic, group = new_topic(server.address), f"g-{uuid.uuid4().hex[:8]}"
        sink = Gated()
        source = source_config(server.address, topic, group).build(sink)
        task = asyncio.create_task(source.run())
        try:
            await publish(server.address, topic, [event(1)])
            await until(lambda: sink.waiting > 0, 30, what="the batch with the subscriber")
            server.pause()
            sink.gate.set()  # taken: the commit goes to the stalled broker
            await asyncio.sleep(0.5)
            assert not await source.drain(1)
            try:
                await asyncio.wait_for(asyncio.gather(source.aclose(), task, return_exceptions=True), 120)
            except TimeoutError:
                pytest.fail("the stop still waits for Kafka 120 s on")
        finally:
            server.resume()
            task.cancel()
            server.stop()
        assert [e.id for e in sink.events] == ["id-1"]

    async def test_an_ingest_stop_gives_the_consumers_close_its_time(self) -> None:
        """The ingest's stop cancels the source after drain_timeout (1 s): the cancel landed in
        the wait for the consumer's close, which the process's exit then cut short (no leave:
        the group waits session.timeout.ms for the member) though Kafka answered within 10 s."""
        from pipelines.sources.service import Ingest, Watched
        from pipelines.sources.settings import IngestSettings

        server = NoidaServer("kafka").start()
        topic, group = new_topic(server.address), f"g-{uuid.uuid4().hex[:8]}"
        sink = Watched(MemorySink())
        source = source_config(server.address, topic, group).build(sink)
        closed: list[bool] = []
        close = source._close_consumer
        source._close_consumer = lambda: (close(), closed.append(True))  # type: ignore[method-assign]
        ingest = Ingest(IngestSettings(drain_timeout=1), source, sink)
        ingest.begin()
        try:
            await publish(server.address, topic, [event(1)])
            await until(lambda: committed(server.address, group, topic) == [1], 30, what="the commit")
            server.pause()
            loop = asyncio.get_running_loop()
            loop.call_later(4, server.resume)  # within the close's 10 s
            await asyncio.wait_for(ingest.aclose(), 120)
            assert closed, "the consumer's close was cut short"
        finally:
            server.resume()
            server.stop()

    async def test_run_cancelled_before_its_loop_began_closes(self, kafka_bootstrap: str) -> None:
        """Cancelled at once, the loop's task never ran a line of it, its end included: the
        consumer stayed open and `aclose` waited for an end that never came."""
        source = source_config(kafka_bootstrap, new_topic(kafka_bootstrap), f"g-{uuid.uuid4().hex[:8]}").build(
            MemorySink())
        task = asyncio.create_task(source.run())
        await asyncio.sleep(0)  # run() has made its loop's task, not started yet
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await asyncio.wait_for(task, 120)
        await asyncio.wait_for(source.aclose(), 120)

    async def test_aclose_gives_up_the_loop_not_the_task_awaiting_run(self, monkeypatch: pytest.MonkeyPatch) -> None:
        """`aclose` cancelled the task running `run()`: a caller awaiting it inline, in a task
        doing more, was cancelled with it."""
        import pipelines.sources.kafka as kafka_source

        monkeypatch.setattr(kafka_source, "_CLOSE_TIMEOUT", 1.0)
        server = NoidaServer("kafka").start()
        topic, group = new_topic(server.address), f"g-{uuid.uuid4().hex[:8]}"
        sink = Gated()  # never opened: the batch stays with the subscriber
        source = source_config(server.address, topic, group).build(sink)

        async def supervisor() -> str:
            await source.run()
            return "went on"

        task = asyncio.create_task(supervisor())
        try:
            await publish(server.address, topic, [event(1)])
            await until(lambda: sink.waiting > 0, 30, what="the batch with the subscriber")
            await asyncio.wait_for(source.aclose(), 120)
            assert await asyncio.wait_for(task, 120) == "went on"
        finally:
            task.cancel()
            server.stop()


class TestConfig:
    """Config mistakes are refused when read."""

    def test_dead_letter_choices(self, tmp_path: Path) -> None:
        with pytest.raises(ValidationError, match="choose one"):
            KafkaSourceConfig(bootstrap_servers="b:9092", topics=["t"], dead_letter_topic="d",
                              dead_letter_file=tmp_path / "d.jsonl")
        with pytest.raises(ValidationError, match="loop"):
            KafkaSourceConfig(bootstrap_servers="b:9092", topics=["t", "d"], dead_letter_topic="d")
        with pytest.raises(ValidationError):
            KafkaSourceConfig(bootstrap_servers="b:9092", topics=[])
        # A pattern that matches it read each dead letter again: one bad record, ~180 dead letters a second.
        with pytest.raises(ValidationError, match="loop"):
            KafkaSourceConfig(bootstrap_servers="b:9092", topics=["^src-.*"], dead_letter_topic="src-dead")
        assert KafkaSourceConfig(bootstrap_servers="b:9092", topics=["^src-.*"], dead_letter_topic="dead-src")

    @pytest.mark.parametrize("name", ["bad name!", "", ".", "..", "x" * 250, "__consumer_offsets",
                                      "__transaction_state"])
    def test_a_dead_letter_topic_kafka_never_accepts_is_refused_when_read(self, name: str) -> None:
        """Taken, the first dead letter was retried for ever: the offsets never moved past it."""
        with pytest.raises(ValidationError, match=r"dead_letter_topic[\s\S]*(topic name|internal)"):
            KafkaSourceConfig(bootstrap_servers="b:9092", topics=["t"], dead_letter_topic=name)

    @pytest.mark.parametrize("name", ["bad name!", ".", "..", "x" * 250, "caf\u00e9"])
    def test_a_topic_name_kafka_never_accepts_is_refused_when_read(self, name: str) -> None:
        with pytest.raises(ValidationError, match=r"topics[\s\S]*topic name"):
            KafkaSourceConfig(bootstrap_servers="b:9092", topics=["t", name])

    def test_legal_topic_names_are_taken(self) -> None:
        longest = "x" * 249
        config = KafkaSourceConfig(bootstrap_servers="b:9092", topics=["a.B_c-9", longest, "__internal", "^any name"],
                                   dead_letter_topic="Dead.letters_1-x")
        assert config.topics[1] == longest and config.dead_letter_topic == "Dead.letters_1-x"
        # Kafka keeps only its own two: other names starting with `__` are anyone's
        assert KafkaSourceConfig(bootstrap_servers="b:9092", topics=["t"], dead_letter_topic="__dlq").dead_letter_topic

    def test_a_bad_topic_pattern_is_refused_when_read(self) -> None:
        """librdkafka refused it only once subscribing: a KafkaException ended `run()`."""
        with pytest.raises(ValidationError, match=r"topics[\s\S]*no regular expression"):
            KafkaSourceConfig(bootstrap_servers="b:9092", topics=["^(unclosed"])

    @pytest.mark.parametrize("pattern", ["^in(?:fer)ence-.*", "^inference-(?!dead)"])
    def test_a_pattern_librdkafka_refuses_is_a_config_error(self, pattern: str) -> None:
        """Python's regular expressions take these; librdkafka's do not, and `run()` ended with a
        bare KafkaException at its subscribe."""
        source = KafkaSourceConfig(bootstrap_servers="127.0.0.1:9", topics=[pattern]).build(MemorySink())
        with pytest.raises(ConfigError, match="topics"):
            asyncio.run(source.run())
        asyncio.run(source.aclose())

    @pytest.mark.parametrize("setting", [{"max.in.flight.requests.per.connection": 10}, {"retries": 0}])
    def test_a_setting_the_dead_letter_producer_refuses_is_refused_at_build(self, setting: dict[str, Any]) -> None:
        """The consumer takes these; the idempotent dead-letter producer, made at the first dead
        letter, did not: its ConfigError was retried for ever, the offsets never moved."""
        config = KafkaSourceConfig(bootstrap_servers="127.0.0.1:9", topics=["t"], dead_letter_topic="d",
                                   config=setting)
        with pytest.raises(ConfigError, match="config"):
            config.build(MemorySink())
        source = config.model_copy(update={"dead_letter_topic": None}).build(MemorySink())  # no producer: fine
        asyncio.run(source.aclose())

    def test_transactions_are_refused_when_read(self) -> None:
        """The dead-letter producer gets the source's config: with `transactional.id` it refused
        every dead letter, and the source held its batch for ever."""
        with pytest.raises(ValidationError, match=r"config[\s\S]*transactional.id"):
            KafkaSourceConfig(bootstrap_servers="b:9092", topics=["t"], config={"transactional.id": "t"})

    @pytest.mark.parametrize(("config", "words"), [
        ({"group.id": "mine"}, "group_id"),
        ({"enable.auto.commit": True}, "enable.auto.commit"),
        ({"enable.auto.offset.store": "true"}, "enable.auto.offset.store"),
    ])
    def test_properties_the_at_least_once_rests_on_are_refused_when_read(self, config: dict[str, object],
                                                                         words: str) -> None:
        """Passed through last, they took over: offsets committed before the subscriber took the
        events (lost at a restart), or a group other than `group_id`."""
        with pytest.raises(ValidationError, match=rf"config[\s\S]*{words}"):
            KafkaSourceConfig(bootstrap_servers="b:9092", topics=["t"], config=config)
        KafkaSourceConfig(bootstrap_servers="b:9092", topics=["t"], config={"enable.auto.commit": "false"})

    def test_client_config(self) -> None:
        conf = KafkaSourceConfig(bootstrap_servers="b:9092", topics=["t"], config={"security.protocol": "SSL"})
        assert conf.consumer_config()["enable.auto.commit"] is False
        assert conf.consumer_config()["security.protocol"] == "SSL"
        with pytest.raises(ConfigError, match="no.such.property"):
            KafkaSourceConfig(bootstrap_servers="b:9092", topics=["t"], config={"no.such.property": 1}).build(
                MemorySink())

    def test_without_the_client_library(self) -> None:
        """The config reads without confluent-kafka (an optional extra); building names the extra."""
        code = ("import sys; sys.modules['confluent_kafka'] = None\n"
                "from infer_logger.errors import ConfigError\n"
                "from pipelines.sources.kafka import KafkaSourceConfig as C; from infer_logger.sinks.memory import MemorySink\nc = C(bootstrap_servers='b:1', topics=['t'])\ntry: c.build(MemorySink())\nexcept ConfigError as e: print(e)")
        root = Path(__file__).resolve().parents[3]  # the repository: where `import infer_logger` works
        done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60,
                              check=True, cwd=root)
        assert "infer-logger[kafka]" in done.stdout


async def test_a_dead_letter_topic_that_refuses_holds_the_offset(kafka_bootstrap: str,
                                                                 caplog: pytest.LogCaptureFixture) -> None:
    """Dead letters that cannot be written are not skipped: the batch is retried, nothing committed."""
    topic, group = new_topic(kafka_bootstrap), f"g-{uuid.uuid4().hex[:8]}"
    await publish(kafka_bootstrap, topic, [event(0)])
    publish_raw(kafka_bootstrap, topic, [(b"not an event", [])])
    sink = MemorySink()
    # A name refused when read (too long) put past that: a topic that refuses, as one an ACL denies.
    config = source_config(kafka_bootstrap, topic, group).model_copy(update={"dead_letter_topic": "x" * 300})
    source = config.build(sink)
    async with running(source):
        await until(lambda: "retry 1" in caplog.text, what="a retried dead letter")
        await asyncio.sleep(0.5)
        assert committed(kafka_bootstrap, group, topic) == [-1001]
        assert source.dead_lettered == 0 and "dead-letter topic" in caplog.text
        assert "records dead-lettered" not in caplog.text  # not said while it is not so
        assert source.problem is not None and "dead letters" in source.problem  # /readyz: not ready
    assert [e.id for e in sink.events] == ["id-0"]  # taken once: the retry only re-sends the dead letter


async def test_dead_letters_that_keep_failing_are_its_problem_until_written(kafka_bootstrap: str,
                                                                              tmp_path: Path) -> None:
    """The consumer holds its offsets while they fail (retried: it may pass): /readyz said ready
    all along, the good events after the bad record delivered again at every restart."""
    topic, group = new_topic(kafka_bootstrap), f"g-{uuid.uuid4().hex[:8]}"
    await publish(kafka_bootstrap, topic, [event(0)])
    publish_raw(kafka_bootstrap, topic, [(b"not an event", [])])
    await publish(kafka_bootstrap, topic, [event(1)])
    (tmp_path / "dead").write_text("")  # a file where the dead-letter file's directory goes
    source = source_config(kafka_bootstrap, topic, group, dead_letter_file=tmp_path / "dead" / "k.jsonl").build(
        MemorySink())
    async with running(source):
        await until(lambda: source.problem is not None, what="dead letters failing said")
        assert source.problem is not None and "dead letters" in source.problem
        assert committed(kafka_bootstrap, group, topic) == [-1001]
        (tmp_path / "dead").unlink()
        await until(lambda: committed(kafka_bootstrap, group, topic) == [3], what="the commit")
        assert source.problem is None
    assert source.dead_lettered == 1


class _Slow(MemorySink):
    def __init__(self, seconds: float) -> None:
        super().__init__()
        self.seconds = seconds

    async def send_batch(self, events: Sequence[CloudEvent]) -> None:
        await asyncio.sleep(self.seconds)
        await super().send_batch(events)


@pytest.mark.slow
async def test_a_subscriber_slower_than_the_poll_interval_keeps_the_group(kafka_bootstrap: str) -> None:
    """A batch that takes longer than max.poll.interval.ms (a broker trigger retrying for
    minutes) is delivered once and committed: the consumer went on polling, paused, meanwhile.
    Without that it left the group, its commit was refused, and the batch came again forever."""
    topic, group = new_topic(kafka_bootstrap), f"g-{uuid.uuid4().hex[:8]}"
    await publish(kafka_bootstrap, topic, [event(i) for i in range(3)])
    sink = _Slow(8.0)
    source = source_config(kafka_bootstrap, topic, group, config={"max.poll.interval.ms": 6000}).build(sink)
    async with running(source):
        await until(lambda: committed(kafka_bootstrap, group, topic) == [3], timeout=30, what="commit")
        await asyncio.sleep(2)  # a refused commit would have brought the batch again by now
    assert sink.calls == 1 and [e.id for e in sink.events] == ["id-0", "id-1", "id-2"]


async def test_a_dead_letter_copy_too_large_goes_without_its_value(kafka_bootstrap: str) -> None:
    """A record just under the size limit grows past it with the dead-letter headers: the copy
    was refused at every retry and the offsets never moved. It goes without value and headers."""
    topic, group = new_topic(kafka_bootstrap), f"g-{uuid.uuid4().hex[:8]}"
    dead = f"{topic}-dead"
    publish_raw(kafka_bootstrap, topic, [(b"x" * 1900, [("h", b"y" * 50)]), (b"small", [])])
    await publish(kafka_bootstrap, topic, [event(0)])
    sink = MemorySink()
    # The producer's own limit (the topic's, on a real broker, refuses in the delivery report alike).
    source = source_config(kafka_bootstrap, topic, group, dead_letter_topic=dead,
                           config={"message.max.bytes": 2000}).build(sink)
    async with running(source):
        await until(lambda: committed(kafka_bootstrap, group, topic) == [3], what="commit")
    assert [e.id for e in sink.events] == ["id-0"] and source.dead_lettered == 2
    got = read_topic(kafka_bootstrap, dead, 2)
    by_offset = {dict(cast(list[tuple[str, bytes]], m.headers() or []))[OFFSET_HEADER]: m for m in got}
    big, small = by_offset[b"0"], by_offset[b"1"]
    assert big.value() is None and small.value() == b"small"
    headers = dict(cast(list[tuple[str, bytes]], big.headers() or []))
    assert headers[DROPPED_HEADER] == b"1900" and "h" not in headers
    assert headers[REASON_HEADER].startswith(b"not a CloudEvent")


class _Joining(MemorySink):
    """Keeps each batch's first event; refuses it when the next batch comes (a joining cache)."""

    def __init__(self) -> None:
        super().__init__()
        self.kept: CloudEvent | None = None

    async def send_batch(self, events: Sequence[CloudEvent]) -> None:
        await super().send_batch(events)
        earlier, self.kept = self.kept, events[0]
        if earlier is not None:
            raise RejectedError("cannot join", [earlier])


@pytest.mark.parametrize("where", ["none", "file", "topic"])
async def test_a_refused_event_that_is_no_record_of_the_batch_is_dead_lettered(
        kafka_bootstrap: str, caplog: pytest.LogCaptureFixture, tmp_path: Path, where: str) -> None:
    """An event of an earlier batch (a joining cache), or one the subscriber made (an explanation):
    no record of the batch to dead-letter; it was only logged, as of an earlier batch, with a
    dead-letter file or topic configured."""
    topic, group = new_topic(kafka_bootstrap), f"g-{uuid.uuid4().hex[:8]}"
    path, dead = tmp_path / "dead.jsonl", f"{topic}-dead"
    extra: dict[str, Any] = {"none": {}, "file": {"dead_letter_file": path}, "topic": {"dead_letter_topic": dead}}[where]
    sink = _Joining()
    source = source_config(kafka_bootstrap, topic, group, **extra).build(sink)
    async with running(source):
        await publish(kafka_bootstrap, topic, [event(0)])
        await until(lambda: committed(kafka_bootstrap, group, topic) == [1], what="first commit")
        await publish(kafka_bootstrap, topic, [event(1)])
        await until(lambda: committed(kafka_bootstrap, group, topic) == [2], what="second commit")
    assert [e.id for e in sink.events] == ["id-0", "id-1"] and "ids id-0" in caplog.text
    if where == "none":
        assert "not dead-lettered" in caplog.text and source.dead_lettered == 0
        return
    assert source.dead_lettered == 1
    if where == "file":
        (line,) = (orjson.loads(line) for line in path.read_bytes().splitlines())
        assert line["attributes"]["id"] == "id-0" and line["reason"] == "cannot join"
    else:
        (msg,) = read_topic(kafka_bootstrap, dead, 1)
        headers = dict(cast(list[tuple[str, bytes]], msg.headers() or []))
        assert headers[REASON_HEADER] == b"cannot join" and orjson.loads(msg.value() or b"")["id"] == "id-0"



class _Explaining(MemorySink):
    """Takes each batch and refuses, for good, an event it made of its first (an explanation)."""

    def __init__(self, size: int = 10) -> None:
        super().__init__()
        self.size = size

    async def send_batch(self, events: Sequence[CloudEvent]) -> None:
        await super().send_batch(events)
        made = CloudEvent({**events[0].attributes, "type": EXPLANATION}, b'"' + b"x" * self.size + b'"')
        raise RejectedError("413 too large", [made], too_large=True)


async def test_a_made_event_too_large_for_the_dead_letter_topic_goes_without_its_data(kafka_bootstrap: str) -> None:
    """Over the topic's limit it was retried for ever, the batch's offsets held (and its records
    sent to the subscriber again each time); over the producer's it was counted as written."""
    topic, group = new_topic(kafka_bootstrap), f"g-{uuid.uuid4().hex[:8]}"
    dead = f"{topic}-dead"
    await publish(kafka_bootstrap, topic, [event(0)])
    sink = _Explaining(1_200_000)
    source = source_config(kafka_bootstrap, topic, group, dead_letter_topic=dead,
                           config={"message.max.bytes": 5_000_000}).build(sink)
    async with running(source):
        await until(lambda: committed(kafka_bootstrap, group, topic) == [1], what="commit")
    (msg,) = read_topic(kafka_bootstrap, dead, 1)
    headers = dict(cast(list[tuple[str, bytes]], msg.headers() or []))
    assert headers[DROPPED_HEADER] == b"1200002" and headers[REASON_HEADER] == b"413 too large"
    assert "data" not in orjson.loads(msg.value() or b"") and sink.calls == 1 and source.dead_lettered == 1


async def test_a_made_event_whose_dead_letter_fails_is_written_later_without_asking_again(
        kafka_bootstrap: str, tmp_path: Path) -> None:
    """The batch went to the subscriber again, which need not refuse the same way twice (the
    explainer had settled the exchange): the refused event was then lost."""
    topic, group = new_topic(kafka_bootstrap), f"g-{uuid.uuid4().hex[:8]}"
    await publish(kafka_bootstrap, topic, [event(0)])
    (tmp_path / "dead").write_text("")  # a file where the dead-letter file's directory goes
    sink = _Explaining()
    source = source_config(kafka_bootstrap, topic, group, dead_letter_file=tmp_path / "dead" / "k.jsonl").build(sink)
    async with running(source):
        await until(lambda: sink.calls == 1, what="delivery")
        await asyncio.sleep(1.0)  # retrying the dead letter, not the subscriber
        (tmp_path / "dead").unlink()
        await until(lambda: committed(kafka_bootstrap, group, topic) == [1], what="commit")
    (line,) = (orjson.loads(line) for line in (tmp_path / "dead" / "k.jsonl").read_bytes().splitlines())
    assert line["attributes"]["type"] == EXPLANATION and sink.calls == 1


async def test_dead_letters_refused_as_one_record_batch_keep_their_values(kafka_bootstrap: str) -> None:
    """A dead-letter topic's max.message.bytes below librdkafka's record batch: every copy in it
    was reported too large and went again without its value, though each fitted alone."""
    topic, group = new_topic(kafka_bootstrap), f"g-{uuid.uuid4().hex[:8]}"
    dead = f"{topic}-dead"
    admin = AdminClient({"bootstrap.servers": kafka_bootstrap})
    admin.create_topics([NewTopic(dead, num_partitions=1, replication_factor=1,
                                  config={"max.message.bytes": "100000"})])[dead].result(10)
    publish_raw(kafka_bootstrap, topic, [(b"x" * 40_000, []) for _ in range(3)])
    source = source_config(kafka_bootstrap, topic, group, dead_letter_topic=dead).build(MemorySink())
    async with running(source):
        await until(lambda: committed(kafka_bootstrap, group, topic) == [3], what="commit")
    got = read_topic(kafka_bootstrap, dead, 3)
    assert [len(m.value() or b"") for m in got] == [40_000] * 3 and source.dead_lettered == 3



async def test_dead_letters_written_before_a_failure_are_not_written_again(
        kafka_bootstrap: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """Copies go in passes (whole, then without the value for those too large): a failure in a
    later pass had the retry write the first pass's copies again."""
    topic, group = new_topic(kafka_bootstrap), f"g-{uuid.uuid4().hex[:8]}"
    dead = f"{topic}-dead"
    admin = AdminClient({"bootstrap.servers": kafka_bootstrap})
    admin.create_topics([NewTopic(dead, num_partitions=1, replication_factor=1,
                                  config={"max.message.bytes": "100000"})])[dead].result(10)
    publish_raw(kafka_bootstrap, topic, [(b"small", []), (b"x" * 150_000, [])])
    source = source_config(kafka_bootstrap, topic, group, dead_letter_topic=dead).build(MemorySink())
    passes, produce = [0], source._produce_letters

    def failing_second_pass(*args: Any) -> list[int]:
        passes[0] += 1
        if passes[0] == 2:
            raise SinkError("the broker stalled")
        return produce(*args)

    monkeypatch.setattr(source, "_produce_letters", failing_second_pass)
    async with running(source):
        await until(lambda: committed(kafka_bootstrap, group, topic) == [2], what="commit")
    offsets = [dict(cast(list[tuple[str, bytes]], m.headers() or []))[OFFSET_HEADER] for m in read_topic(kafka_bootstrap, dead, 3)]
    assert offsets == [b"0", b"1"] and source.dead_lettered == 2


async def test_more_dead_letters_than_the_producer_queue_holds(kafka_bootstrap: str) -> None:
    """The local queue full: BufferError escaped the dead-letter pass, and every retry found the
    queue still full (nothing flushed): the batch looped for ever."""
    topic, group = new_topic(kafka_bootstrap), f"g-{uuid.uuid4().hex[:8]}"
    publish_raw(kafka_bootstrap, topic, [(b"not an event", []) for _ in range(7)])
    source = source_config(kafka_bootstrap, topic, group, dead_letter_topic=f"{topic}-dead",
                           config={"queue.buffering.max.messages": 3}).build(MemorySink())
    async with running(source):
        await until(lambda: committed(kafka_bootstrap, group, topic) == [7], what="commit")
    assert len(read_topic(kafka_bootstrap, f"{topic}-dead", 7)) == 7 and source.dead_lettered == 7


async def test_a_dead_letter_larger_than_the_producer_queue_goes_without_its_value(kafka_bootstrap: str) -> None:
    """Under message.max.bytes but over queue.buffering.max.kbytes: BufferError with the queue
    empty, room waited for that never came, and the batch retried for ever."""
    topic, group = new_topic(kafka_bootstrap), f"g-{uuid.uuid4().hex[:8]}"
    publish_raw(kafka_bootstrap, topic, [(b"x" * 200_000, [])])
    source = source_config(kafka_bootstrap, topic, group, dead_letter_topic=f"{topic}-dead",
                           config={"queue.buffering.max.kbytes": 100}).build(MemorySink())
    async with running(source):
        await until(lambda: committed(kafka_bootstrap, group, topic) == [1], what="commit")
    (msg,) = read_topic(kafka_bootstrap, f"{topic}-dead", 1)
    headers = dict(cast(list[tuple[str, bytes]], msg.headers() or []))
    assert msg.value() is None and headers[DROPPED_HEADER] == b"200000" and source.dead_lettered == 1

async def test_records_skipped_without_a_dead_letter_setting_are_each_logged_and_counted(
        kafka_bootstrap: str, caplog: pytest.LogCaptureFixture) -> None:
    """With no dead-letter topic or file, one line named the first of a batch's skipped records
    and nothing counted them: each is logged (topic, partition, offset, reason; past the first
    ten, a count) and `skipped` counts them (the ingest's /metrics)."""
    topic, group = new_topic(kafka_bootstrap), f"g-{uuid.uuid4().hex[:8]}"
    poison: list[tuple[bytes | None, Headers]] = [(b"not an event", [])] * 12
    poison.append((b"{oops", [("content-type", b"application/cloudevents+json")]))
    publish_raw(kafka_bootstrap, topic, poison)
    await publish(kafka_bootstrap, topic, [event(0)])
    sink = MemorySink()
    source = source_config(kafka_bootstrap, topic, group).build(sink)
    async with running(source):
        await until(lambda: committed(kafka_bootstrap, group, topic) == [14], what="commit")
    assert [e.id for e in sink.events] == ["id-0"]
    assert source.stats() == {"delivered": 1, "dead_lettered": 0, "skipped": 13}
    said = [r.getMessage() for r in caplog.records if r.name == "pipelines.sources.kafka" and "skipped" in r.getMessage()]
    assert sum(f"{topic}[0] offset " in line and "not a CloudEvent" in line for line in said) == 10, said
    assert f"{topic}[0] offset 0 " in said[0] and f"{topic}[0] offset 9 " in said[9]
    assert any("3 more" in line for line in said), said


async def test_a_repeated_ce_header_is_no_cloudevent(kafka_bootstrap: str, tmp_path: Path) -> None:
    """ce_id twice (or ce_ID and ce_id): the last one won, silently; the record is dead-lettered."""
    topic, group = new_topic(kafka_bootstrap), f"g-{uuid.uuid4().hex[:8]}"
    base = [("ce_specversion", b"1.0"), ("ce_source", b"/s"), ("ce_type", b"t")]
    publish_raw(kafka_bootstrap, topic, [(b"{}", [*base, ("ce_id", b"dup-a"), ("ce_id", b"dup-b")]),
                                         (b"{}", [*base, ("ce_ID", b"dup-c"), ("ce_id", b"dup-d")]),
                                         (b"{}", [*base, ("ce_id", b"ok"), ("trace", b"1"), ("trace", b"2")])])
    sink = MemorySink()
    dead = tmp_path / "dead.jsonl"
    source = source_config(kafka_bootstrap, topic, group, dead_letter_file=dead).build(sink)
    async with running(source):
        await until(lambda: committed(kafka_bootstrap, group, topic) == [3], what="commit")
    assert [e.id for e in sink.events] == ["ok"] and source.dead_lettered == 2
    letters = [orjson.loads(line) for line in dead.read_bytes().splitlines()]
    assert [letter["offset"] for letter in letters] == [0, 1]
    assert all("not a CloudEvent" in letter["reason"] and "header ce_id repeated" in letter["reason"]
               for letter in letters), letters


async def test_a_commit_kafka_does_not_answer_is_its_problem_well_before_the_session_timeout(
        caplog: pytest.LogCaptureFixture) -> None:
    """Kafka gone while the subscriber had a batch: the commit after it waited up to
    session.timeout.ms (45 s) in the consumer's only thread, so no poll saw that every broker was
    down: /readyz said ready and nothing was logged all that time."""
    server = NoidaServer("kafka").start()
    topic, group = new_topic(server.address), f"g-{uuid.uuid4().hex[:8]}"
    sink = Gated()
    config = source_config(server.address, topic, group).model_copy(update={"session_timeout_ms": 45_000})
    source = config.build(sink)
    try:
        await publish(server.address, topic, [event(i) for i in range(10)])
        async with running(source):
            await until(lambda: sink.waiting >= 1, 30, what="a batch in hand")
            assert source.problem is None
            server.stop(keep_data=True)
            sink.gate.set()  # taken: its commit cannot reach the broker
            await until(lambda: source.problem is not None, 15, what="not ready, well within the session timeout")
            assert "Kafka" in cast(str, source.problem)
            await until(lambda: "commit not answered" in caplog.text or "no broker reachable" in caplog.text,
                        15, what="a warning")
            server.start(fresh=False)
            await until(lambda: committed(server.address, group, topic) == [10], 60, what="the commit")
            await until(lambda: source.problem is None, 30, what="ready again")
    finally:
        server.stop()
    assert first_seen(sink.events) == [(f"id-{i}", REQUEST) for i in range(10)]  # the failed commit's come again


async def test_a_dead_letter_producer_failed_for_good_is_replaced(kafka_bootstrap: str) -> None:
    """An idempotent producer's fatal error (a restarted broker that lost its sequence state) is
    for good: the same producer was used for ever, the source stuck on the batch."""

    class Fatal:  # a producer in librdkafka's fatal state: every produce refused
        def produce(self, *args: Any, **kwargs: Any) -> None:
            raise KafkaException(KafkaError(KafkaError._FATAL, "out of order sequence number", fatal=True))

        def flush(self, timeout: float) -> int:
            return 0

        def close(self) -> None:
            pass

    topic, group = new_topic(kafka_bootstrap), f"g-{uuid.uuid4().hex[:8]}"
    publish_raw(kafka_bootstrap, topic, [(b"not an event", [])])
    source = source_config(kafka_bootstrap, topic, group, dead_letter_topic=f"{topic}-dead").build(MemorySink())
    async with running(source):
        await until(lambda: source.dead_lettered == 1, what="the first dead letter")
        source._dead_letters = cast(Any, Fatal())
        publish_raw(kafka_bootstrap, topic, [(b"not an event either", [])])
        await until(lambda: source.dead_lettered == 2, what="the second dead letter")
    assert committed(kafka_bootstrap, group, topic) == [2]

class _Logged(MemorySink):
    """Takes `delay` seconds per batch, then notes (id, data) in a log shared with others."""

    def __init__(self, log: list[tuple[str, bytes | None]], delay: float) -> None:
        super().__init__()
        self.log, self.delay = log, delay

    async def send_batch(self, events: Sequence[CloudEvent]) -> None:
        await asyncio.sleep(self.delay)
        await super().send_batch(events)
        self.log.extend((e.id, e.data) for e in events)


@pytest.mark.slow
async def test_a_partition_revoked_mid_delivery_waits_for_it(kafka_bootstrap: str) -> None:
    """A keep-alive poll serves a rebalance while a slow subscriber has a partition's records:
    the partition goes to its next owner only once that delivery ended, so an id's later event
    cannot be overtaken by the older copy still in flight (last write must be the newest)."""
    topic, group = new_topic(kafka_bootstrap, partitions=2), f"g-{uuid.uuid4().hex[:8]}"
    producer = Producer({"bootstrap.servers": kafka_bootstrap, "acks": "all"})

    def send(partition: int, id_: str, data: bytes) -> None:
        headers = [("ce_specversion", b"1.0"), ("ce_id", id_.encode()), ("ce_source", b"/s"), ("ce_type", b"t"),
                   ("content-type", b"text/plain")]
        producer.produce(topic, data, id_.encode(), partition=partition, headers=headers)
        assert producer.flush(10) == 0

    send(1, "id-1", b"v1")
    written: list[tuple[str, bytes | None]] = []
    slow, quick = _Logged(written, 6.0), _Logged(written, 0.0)
    config = {"partition.assignment.strategy": "range"}
    async with running(source_config(kafka_bootstrap, topic, group, config=config).build(slow)):
        await asyncio.sleep(2.0)  # the slow one has v1 in hand
        async with running(source_config(kafka_bootstrap, topic, group, config=config).build(quick)):
            await asyncio.sleep(2.0)  # joined: a rebalance revokes partition 1 or 0 from the slow one
            send(1, "id-1", b"v2")
            await until(lambda: (written[-1:] == [("id-1", b"v2")]) and len(written) >= 2, 30, "v2 written")
            await asyncio.sleep(3.0)  # an older copy still in flight would land now
    assert written[-1] == ("id-1", b"v2"), written
    assert written.index(("id-1", b"v1")) < written.index(("id-1", b"v2"))


_DEAD_LETTERS_SETUP = """
import sys, types
from pathlib import Path
from pipelines.sources.kafka import KafkaSource, _Record

class Message:  # what the records' dead letters read of a consumed record
    def __init__(self, offset): self._offset = offset
    def topic(self): return "t"
    def partition(self): return 0
    def offset(self): return self._offset
    def key(self): return b"k"
    def headers(self): return []
    def value(self): return b"x" * 500

source = types.SimpleNamespace(config=types.SimpleNamespace(dead_letter_file=Path(sys.argv[1])))
records = [_Record(Message(i), None, "not a CloudEvent") for i in range(10)]
"""


def test_dead_letters_cut_short_leave_no_torn_line_for_the_retry_to_follow(tmp_path: Path) -> None:
    """Its own records (what is not a CloudEvent) were appended as they came: a write cut short
    left a torn line, and the retry every record again after it."""
    path = tmp_path / "dead.jsonl"
    out = cut_short_then_again(_DEAD_LETTERS_SETUP, "KafkaSource._write_dead_letters(source, records)", str(path))
    assert out.returncode == 0 and out.stdout.split() == ["failed"], out.stderr
    assert [orjson.loads(line)["offset"] for line in path.read_bytes().splitlines()] == list(range(10))


async def test_stopped_while_a_made_event_is_not_dead_lettered_yet_commits_nothing(
        kafka_bootstrap: str, tmp_path: Path) -> None:
    """The batch was taken, an event the subscriber made of it refused, and its dead letter not
    written yet at the stop: committing what was taken lost that event for good."""
    topic, group = new_topic(kafka_bootstrap), f"g-{uuid.uuid4().hex[:8]}"
    await publish(kafka_bootstrap, topic, [event(0)])
    (tmp_path / "dead").write_text("")  # a file where the dead-letter file's directory goes
    letters = tmp_path / "dead" / "k.jsonl"
    sink = _Explaining()
    async with running(source_config(kafka_bootstrap, topic, group, dead_letter_file=letters).build(sink)):
        await until(lambda: sink.calls == 1, what="the delivery")
    assert committed(kafka_bootstrap, group, topic) == [-1001]
    (tmp_path / "dead").unlink()
    again = _Explaining()
    async with running(source_config(kafka_bootstrap, topic, group, dead_letter_file=letters).build(again)):
        await until(lambda: committed(kafka_bootstrap, group, topic) == [1], what="the commit")
    assert again.calls == 1 and len(letters.read_bytes().splitlines()) == 1

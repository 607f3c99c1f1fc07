"""The kafka sink against a real Kafka-protocol broker, read back with a plain consumer."""

from __future__ import annotations

import asyncio
import logging
import subprocess
import sys
import time
import uuid
from collections.abc import Awaitable, Sequence
from pathlib import Path
from typing import ClassVar, Literal, TypeVar, cast

import orjson
import pytest
from confluent_kafka import Consumer, KafkaError, Message, Producer, TopicPartition
from confluent_kafka.admin import AdminClient, NewTopic  # type: ignore[attr-defined]
from pydantic import ValidationError

from infer_logger.cloudevents.event import CloudEvent, attribute_text
from infer_logger.cloudevents.kafka import KafkaMessage, from_kafka, to_kafka_binary
from infer_logger.dispatch import Backoff, Dispatcher
from infer_logger.errors import ConfigError, RejectedError, SinkError
from infer_logger.events import EXPLANATION, REQUEST, RESPONSE
from infer_logger.metrics import Metrics
from infer_logger.sinks import kafka as kafka_sink
from infer_logger.sinks.halving import Halving
from infer_logger.sinks.kafka import (
    BinaryRecords,
    ClientValue,
    KafkaSink,
    KafkaSinkConfig,
    TopicTemplate,
)
from infer_logger.spool import DiskSpool
from infer_logger.testing import free_port
from tests.services import NoidaServer
from tests.waiting import until


def event(i: int, type_: str = REQUEST, model: str = "iris", data: bytes | None = None) -> CloudEvent:
    return CloudEvent(
        {"specversion": "1.0", "id": f"id-{i}", "source": "http://sidecar/", "type": type_,
         "datacontenttype": "application/json", "modelname": model, "statuscode": 200, "truncated": False},
        # Compact JSON: structured mode embeds JSON data and so re-serializes it.
        b'{"instances":[[%d,1.5]]}' % i if data is None else data,
    )


def new_topic(bootstrap: str, partitions: int = 1, *, name: str | None = None,
              config: dict[str, str] | None = None) -> str:
    name = name or f"sink-{uuid.uuid4().hex[:12]}"
    admin = AdminClient({"bootstrap.servers": bootstrap})  # kept alive until the topic exists
    topic = NewTopic(name, num_partitions=partitions, replication_factor=1, config=config or {})
    admin.create_topics([topic])[name].result(10)
    return name


def read_back(bootstrap: str, topic: str, count: int, timeout: float = 30.0) -> list[Message]:
    """Every record of `topic` from its start, until `count` arrived (a plain consumer, no group)."""
    consumer = Consumer({"bootstrap.servers": bootstrap, "group.id": "reader", "enable.auto.commit": False})
    try:
        deadline = time.monotonic() + timeout
        partitions: list[int] = []
        while not partitions and time.monotonic() < deadline:
            meta = consumer.list_topics(topic, timeout=5).topics[topic]
            partitions = sorted(meta.partitions) if meta.error is None else []
        consumer.assign([TopicPartition(topic, p, 0) for p in partitions])
        got: list[Message] = []
        while len(got) < count and time.monotonic() < deadline:
            msg = consumer.poll(0.2)
            if msg is not None and msg.error() is None:
                got.append(msg)
        assert len(got) >= count, f"{len(got)} of {count} records in {topic}"
        return got
    finally:
        consumer.close()


def decode(msg: Message) -> CloudEvent:
    headers = dict(cast(list[tuple[str, bytes]], msg.headers() or []))  # a list of pairs in practice
    return from_kafka(KafkaMessage(headers, msg.key(), msg.value()))


def as_text(event: CloudEvent) -> tuple[dict[str, str], bytes | None]:
    """What survives every content mode: binary mode carries attributes as text, no data as none."""
    return {k: attribute_text(v) for k, v in event.attributes.items()}, event.data or None


async def send_with_retry(sink: KafkaSink, events: Sequence[CloudEvent], timeout: float = 20.0) -> int:
    """What the sink worker does: retry the whole batch until the sink takes it; returns failures."""
    deadline = time.monotonic() + timeout
    failures = 0
    while True:
        try:
            await sink.send_batch(events)
            return failures
        except SinkError:
            failures += 1
            if time.monotonic() > deadline:
                raise
            await asyncio.sleep(0.2)


T = TypeVar("T")
NEVER = 600.0
"""A delivery timeout no test waits out: a batch failing within the hang guard failed by the grace."""


async def within_grace(pending: Awaitable[T]) -> T:
    """`pending`, or a failure if still waiting after 60 s: a hang guard, not a timing. With
    `delivery_timeout=NEVER`, only the 2 s down grace (`_DOWN_GRACE`) ends a batch that soon."""
    try:
        return await asyncio.wait_for(pending, 60)
    except TimeoutError:
        pytest.fail(f"still waiting after 60 s: the 2 s down grace was not applied (delivery_timeout {NEVER:g} s)")


class TestRoundTrip:
    """Events come back equal through both content modes, keyed by id."""

    @pytest.mark.parametrize(("mode", "compression"), [("binary", "none"), ("structured", "lz4")])
    async def test_modes(self, kafka_bootstrap: str, mode: Literal["binary", "structured"],
                         compression: Literal["none", "lz4"]) -> None:
        topic = new_topic(kafka_bootstrap)
        sent = [event(i) for i in range(5)]
        sent.append(event(5, data=b"").with_attributes(modelname="x"))  # no data at all
        nested = CloudEvent({**event(6).attributes, "datacontenttype": "application/cloudevents+json"},
                            b'{"specversion":"1.0","id":"inner","source":"/i","type":"t"}')
        sent.append(nested)
        # Receivers compare content types in any case: this one too must go structured.
        sent.append(nested.with_attributes(id="id-7", datacontenttype="Application/CloudEvents+JSON"))
        # Without data (a 204's response): binary mode's record would be a tombstone, which a
        # compacted topic takes for the deletion of the id's records (the exchange's request).
        sent.append(CloudEvent({k: v for k, v in event(8).attributes.items() if k != "datacontenttype"}, None))
        sink = KafkaSinkConfig(bootstrap_servers=kafka_bootstrap, topic=topic, mode=mode,
                               compression=compression).build()
        await sink.send_batch(sent)
        await sink.aclose()
        got = read_back(kafka_bootstrap, topic, len(sent))
        by_id = {decode(m).id: m for m in got}
        assert len(got) == len(sent)
        for original in sent:
            msg = by_id[original.id]
            assert msg.key() == original.id.encode()
            assert as_text(decode(msg)) == as_text(original)
        headers = dict(by_id["id-0"].headers() or [])
        if mode == "binary":
            assert headers["ce_id"] == b"id-0" and headers["ce_truncated"] == b"false"
            assert headers["content-type"] == b"application/json"
        else:
            assert headers == {"content-type": b"application/cloudevents+json"}
        # A payload that is itself a CloudEvent goes structured even in binary mode.
        assert dict(by_id["id-6"].headers() or [])["content-type"] == b"application/cloudevents+json"
        assert dict(by_id["id-7"].headers() or [])["content-type"] == b"application/cloudevents+json"
        assert by_id["id-8"].value() is not None and decode(by_id["id-8"]).data is None

    async def test_key_is_the_id_and_an_ids_events_stay_in_order(self, kafka_bootstrap: str) -> None:
        topic = new_topic(kafka_bootstrap, partitions=4)
        sent = [event(i, t) for t in (REQUEST, RESPONSE, EXPLANATION) for i in range(40)]
        sink = KafkaSinkConfig(bootstrap_servers=kafka_bootstrap, topic=topic).build()
        for start in range(0, len(sent), 25):
            await sink.send_batch(sent[start:start + 25])
        await sink.aclose()
        got = read_back(kafka_bootstrap, topic, len(sent))
        by_id: dict[str, list[Message]] = {}
        for msg in got:
            by_id.setdefault(decode(msg).id, []).append(msg)
        assert len(by_id) == 40
        for msgs in by_id.values():
            assert len({m.partition() for m in msgs}) == 1
            in_order = sorted(msgs, key=lambda m: m.offset() or 0)
            assert [decode(m).type for m in in_order] == [REQUEST, RESPONSE, EXPLANATION]
        assert len({m.partition() for m in got}) > 1  # the ids did spread over partitions

    async def test_topic_per_model(self, kafka_bootstrap: str) -> None:
        prefix = f"m{uuid.uuid4().hex[:8]}"
        sink = KafkaSinkConfig(bootstrap_servers=kafka_bootstrap, topic=prefix + "-{modelname}").build()
        await sink.send_batch([event(i, model="iris" if i % 3 else "wine/v2") for i in range(9)])
        await sink.aclose()
        iris = read_back(kafka_bootstrap, f"{prefix}-iris", 6)
        wine = read_back(kafka_bootstrap, f"{prefix}-wine_v2", 3)
        assert {decode(m).get("modelname") for m in iris} == {"iris"}
        assert sorted(decode(m).id for m in wine) == ["id-0", "id-3", "id-6"]


class TestRefusals:
    """Records the broker never takes are rejected alone; the rest of the batch is delivered."""

    async def test_too_large(self, kafka_bootstrap: str) -> None:
        topic = new_topic(kafka_bootstrap)
        # Raising the client's limit lets the record reach the broker, which refuses it there.
        config: dict[str, ClientValue] = {"message.max.bytes": 5_000_000}
        sink = KafkaSinkConfig(bootstrap_servers=kafka_bootstrap, topic=topic, config=config).build()
        batch = [event(0), event(1, data=b'"' + b"x" * 2_000_000 + b'"'), event(2)]
        with pytest.raises(RejectedError) as info:
            await sink.send_batch(batch)
        await sink.aclose()
        assert [e.id for e in info.value.events] == ["id-1"]
        assert "MSG_SIZE_TOO_LARGE" in str(info.value) and info.value.too_large
        assert sorted(decode(m).id for m in read_back(kafka_bootstrap, topic, 2)) == ["id-0", "id-2"]

    @pytest.mark.parametrize("mode", ["binary", "structured"])
    @pytest.mark.parametrize("datasize", [None, 1_048_576 + 1000])
    async def test_data_over_the_clients_limit_is_cut_to_fit(self, kafka_bootstrap: str, mode: Literal[
            "binary", "structured"], datasize: int | None) -> None:
        """As the sidecar cuts a payload over its cap: the sidecar's default cap (1 MiB) is over
        librdkafka's record limit (1,000,000 bytes), and every payload it cut was dead-lettered."""
        topic = new_topic(kafka_bootstrap)
        sink = KafkaSinkConfig(bootstrap_servers=kafka_bootstrap, topic=topic, mode=mode).build()
        big = event(1, data=b"x" * 1_048_576)
        if datasize is not None:  # already cut by the sidecar: the whole payload's size is kept
            big = CloudEvent({**big.attributes, "truncated": True, "datasize": datasize}, big.data)
        await sink.send_batch([event(0), big, event(2)])
        await sink.aclose()
        got = {e.id: e for e in map(decode, read_back(kafka_bootstrap, topic, 3))}
        assert sorted(got) == ["id-0", "id-1", "id-2"]
        attributes, data = as_text(got["id-1"])  # binary mode carries attributes as text
        assert attributes["truncated"] == "true" and attributes["datasize"] == str(datasize or 1_048_576)
        assert set(data or b"") == {ord("x")}
        # Structured mode holds data that is not JSON as base64, 4 bytes for 3.
        room = 1_000_000 if mode == "binary" else 750_000
        assert 0.95 * room < len(data or b"") < room
        assert as_text(got["id-0"])[0]["truncated"] == "false"

    @pytest.mark.parametrize("mode", ["binary", "structured"])
    @pytest.mark.parametrize("size", [1_040_000, 3_000_000])
    async def test_json_data_over_the_clients_limit_is_cut_to_fit(self, kafka_bootstrap: str, mode: Literal[
            "binary", "structured"], size: int) -> None:
        """Structured mode embeds JSON data as JSON, but once cut it is no longer JSON and goes as
        base64 (4 bytes for 3): each cut divided the original data by the last cut's record, the
        sizes went back and forth, and the event was dead-lettered after three cuts."""
        topic = new_topic(kafka_bootstrap)
        sink = KafkaSinkConfig(bootstrap_servers=kafka_bootstrap, topic=topic, mode=mode).build()
        big = event(1, data=b'"' + b"x" * (size - 2) + b'"')  # valid JSON: a string
        await sink.send_batch([event(0), big, event(2)])
        await sink.aclose()
        got = {e.id: e for e in map(decode, read_back(kafka_bootstrap, topic, 3))}
        assert sorted(got) == ["id-0", "id-1", "id-2"]
        attributes, data = as_text(got["id-1"])
        assert attributes["truncated"] == "true" and attributes["datasize"] == str(size)
        assert (data or b"").startswith(b'"xxx') and set((data or b"")[1:]) == {ord("x")}
        room = 1_000_000 if mode == "binary" else 750_000
        assert 0.9 * room < len(data or b"") < room

    @pytest.mark.parametrize("head", [b"\n" * 300_000, b"\x01\"" * 200_000])
    async def test_text_escaped_more_at_its_start_is_cut_to_fit(self, kafka_bootstrap: str, head: bytes) -> None:
        """Structured mode holds text as a JSON string, where a newline takes 2 bytes and a control
        character 6: escapes denser at the start had each proportional cut keep too much, and the
        event was dead-lettered after three cuts still over the limit."""
        topic = new_topic(kafka_bootstrap)
        sink = KafkaSinkConfig(bootstrap_servers=kafka_bootstrap, topic=topic, mode="structured").build()
        text = head + b"a" * 2_000_000
        big = CloudEvent({**event(1).attributes, "datacontenttype": "text/plain"}, text)
        await sink.send_batch([event(0), big, event(2)])
        await sink.aclose()
        got = {e.id: e for e in map(decode, read_back(kafka_bootstrap, topic, 3))}
        assert sorted(got) == ["id-0", "id-1", "id-2"]
        attributes, data = as_text(got["id-1"])
        assert attributes["truncated"] == "true" and attributes["datasize"] == str(len(text))
        assert data and text.startswith(data)

    async def test_a_cut_record_the_broker_refuses_is_refused_alone(self, kafka_bootstrap: str) -> None:
        """Cut to the client's limit, still over the topic's: its report carried the cut value,
        matched no event, and the whole batch was retried for ever (SinkError, none pending)."""
        topic = new_topic(kafka_bootstrap, config={"max.message.bytes": "500000"})
        sink = KafkaSinkConfig(bootstrap_servers=kafka_bootstrap, topic=topic, delivery_timeout=5).build()
        big = event(1, data=b'"' + b"x" * 1_200_000 + b'"')
        with pytest.raises(RejectedError) as info:
            await Halving(sink).send_batch([event(0), big, event(2)])  # as the worker sends
        await sink.aclose()
        assert info.value.events == [big] and info.value.too_large  # the event whole, for its dead letter
        assert sorted(decode(m).id for m in read_back(kafka_bootstrap, topic, 2)) == ["id-0", "id-2"]

    async def test_invalid_topic(self, kafka_bootstrap: str) -> None:
        prefix = f"m{uuid.uuid4().hex[:8]}"
        sink = KafkaSinkConfig(bootstrap_servers=kafka_bootstrap, topic=prefix + "-{modelname}").build()
        with pytest.raises(RejectedError) as info:  # 300 characters: longer than a topic name may be
            await sink.send_batch([event(0, model="m" * 300), event(1, model="ok")])
        await sink.aclose()
        assert [e.id for e in info.value.events] == ["id-0"] and not info.value.too_large
        assert [decode(m).id for m in read_back(kafka_bootstrap, f"{prefix}-ok", 1)] == ["id-1"]


class TestBrokerDown:
    """No broker: fail fast, name the address, recover when it is back, lose nothing."""

    async def test_down_at_start(self) -> None:
        server = NoidaServer("kafka", port=free_port())
        sink = KafkaSinkConfig(bootstrap_servers=server.address, topic="events",
                               delivery_timeout=NEVER).build()  # does not block
        try:
            with pytest.raises(SinkError) as info:
                await within_grace(sink.send_batch([event(0)]))
            assert type(info.value) is SinkError and server.address in str(info.value)
            assert "no broker reachable" in str(info.value)
            server.start()
            await send_with_retry(sink, [event(1)])
            assert [decode(m).id for m in read_back(server.address, "events", 1)] == ["id-1"]
        finally:
            await sink.aclose()
            server.stop()

    async def test_restart_mid_stream(self) -> None:
        server = NoidaServer("kafka").start()
        sink = KafkaSinkConfig(bootstrap_servers=server.address, topic="events").build()
        try:
            await sink.send_batch([event(i) for i in range(50)])
            server.stop(keep_data=True)
            with pytest.raises(SinkError):
                await sink.send_batch([event(i) for i in range(50, 100)])
            server.start(fresh=False)  # noida keeps its data across a restart on the same dir
            await send_with_retry(sink, [event(i) for i in range(50, 100)])
            await sink.send_batch([event(i) for i in range(100, 150)])
            got = read_back(server.address, "events", 150)
            # At least once: every event is there (a retried batch may have left duplicates).
            assert {decode(m).id for m in got} == {f"id-{i}" for i in range(150)}
        finally:
            await sink.aclose()
            server.stop()

    async def test_restart_with_its_data_lost(self) -> None:
        server = NoidaServer("kafka").start()
        sink = KafkaSinkConfig(bootstrap_servers=server.address, topic="events").build()
        try:
            await sink.send_batch([event(i) for i in range(50)])
            server.stop()
            server.start()  # same port, empty: the idempotent producer's state is gone with it
            failures = await send_with_retry(sink, [event(i) for i in range(50, 100)])
            await sink.send_batch([event(i) for i in range(100, 150)])
            got = read_back(server.address, "events", 100)
            assert {decode(m).id for m in got} == {f"id-{i}" for i in range(50, 150)}
            assert failures <= 3
        finally:
            await sink.aclose()
            server.stop()


def end_offset(bootstrap: str, topic: str) -> int:
    """The high watermark of partition 0: every record the broker acknowledged (acks=all)."""
    consumer = Consumer({"bootstrap.servers": bootstrap, "group.id": "watermarks"})
    try:
        return consumer.get_watermark_offsets(TopicPartition(topic, 0), timeout=10)[1]
    finally:
        consumer.close()


class TestStalledBroker:
    """A broker that is up but slow to answer (SIGSTOP) is waited for: its records in flight are
    neither purged nor produced again, whatever happened before."""

    BATCH = 20

    async def stall(self, server: NoidaServer, sink: KafkaSink, seconds: float) -> int:
        """A batch to "events" with the broker frozen for `seconds`, then retried as the worker
        does until delivered; returns how often it failed."""
        server.pause()
        send = asyncio.create_task(sink.send_batch([event(i) for i in range(self.BATCH)]))
        try:
            await asyncio.sleep(seconds)
        finally:
            server.resume()
        try:
            await asyncio.wait_for(send, 60)  # a hang guard
            return 0
        except SinkError:
            return 1 + await send_with_retry(sink, [event(i) for i in range(self.BATCH)])

    def assert_once_each(self, server: NoidaServer, before: int) -> None:
        count = end_offset(server.address, "events")
        got = [decode(m).id for m in read_back(server.address, "events", count)[before:]]
        expected = sorted(f"id-{i}" for i in range(self.BATCH))
        assert sorted(got) == expected, f"{len(got)} records of {self.BATCH}"

    async def test_a_stall_after_a_broker_restart(self, caplog: pytest.LogCaptureFixture) -> None:
        """librdkafka says when the last broker goes, not when one is back: the "no broker" state
        stayed set through later deliveries, a stall of 2 s had the probe time out, and the
        records in flight were purged (the broker wrote them on waking, the retry again: twice)."""
        server = NoidaServer("kafka").start()
        sink = KafkaSinkConfig(bootstrap_servers=server.address, topic="events",
                               delivery_timeout=NEVER).build()
        try:
            await sink.send_batch([event(-1)])
            server.stop(keep_data=True)  # while idle
            await until(lambda: f"no broker reachable at {server.address}" in caplog.text, timeout=30,
                        what="the client saying the broker is gone")
            server.start(fresh=False)
            await send_with_retry(sink, [event(-2)])  # back: delivered
            failures = await self.stall(server, sink, 4.0)  # past the 2 s grace and its 0.5 s probe
            self.assert_once_each(server, 2)
            assert failures == 0
        finally:
            await sink.aclose()
            server.stop()

    async def test_an_outage_is_said_once_not_at_each_reconnect(self, caplog: pytest.LogCaptureFixture,
                                                                 monkeypatch: pytest.MonkeyPatch) -> None:
        """librdkafka says "all brokers down" again at each failed reconnect round (~1 s): each
        was a warning, a line a second for as long as Kafka was away."""
        said: list[KafkaError] = []
        on_error = kafka_sink._Client._on_error

        def counting(client: kafka_sink._Client, error: KafkaError) -> None:
            if error.code() == KafkaError._ALL_BROKERS_DOWN:
                said.append(error)
            on_error(client, error)

        monkeypatch.setattr(kafka_sink._Client, "_on_error", counting)
        server = NoidaServer("kafka").start()
        sink = KafkaSinkConfig(bootstrap_servers=server.address, topic="events").build()
        try:
            await sink.send_batch([event(-1)])
            server.stop(keep_data=True)
            await until(lambda: len(said) >= 3, timeout=60, what="librdkafka saying so at three reconnects")
            assert caplog.text.count(f"no broker reachable at {server.address}") == 1
        finally:
            await sink.aclose()
            server.stop()

    @pytest.mark.parametrize("key", ["message.timeout.ms", "delivery.timeout.ms"])
    async def test_a_message_timeout_given_in_config(self, key: str) -> None:
        """librdkafka's own timeout (or its alias) under `config` is the one librdkafka applies,
        but the sink purged at `delivery_timeout` + 5 s all the same: a longer stall had the batch
        fail, the broker write it on waking, and the retry write it again."""
        server = NoidaServer("kafka").start()
        sink = KafkaSinkConfig(bootstrap_servers=server.address, topic="events", delivery_timeout=1,
                               config={key: 120_000}).build()
        try:
            await sink.send_batch([event(-1)])
            failures = await self.stall(server, sink, 8.0)  # past delivery_timeout + 5 s
            self.assert_once_each(server, 1)
            assert failures == 0
        finally:
            await sink.aclose()
            server.stop()


class TestFullQueue:
    """librdkafka's local queue smaller than a batch: `produce` refuses (BufferError) until the
    poll thread drains it; the event loop waits for room without blocking, and nothing is lost."""

    SMALL: ClassVar[dict[str, ClientValue]] = {"queue.buffering.max.messages": 20}

    async def test_a_batch_larger_than_the_queue(self, kafka_bootstrap: str) -> None:
        topic = new_topic(kafka_bootstrap)
        sink = KafkaSinkConfig(bootstrap_servers=kafka_bootstrap, topic=topic, config=self.SMALL).build()
        batch = [event(i) for i in range(300)]
        ticks = 0

        async def ticking() -> None:  # the loop stays free while the sink waits for room
            nonlocal ticks
            while True:
                await asyncio.sleep(0.001)
                ticks += 1

        ticker = asyncio.create_task(ticking())
        try:
            await sink.send_batch(batch)
        finally:
            ticker.cancel()
            await sink.aclose()
        assert ticks > 0
        assert [decode(m).id for m in read_back(kafka_bootstrap, topic, 300)] == [e.id for e in batch]

    @pytest.mark.parametrize("cut_to_fit", [True, False])
    async def test_a_record_larger_than_the_whole_queue(self, kafka_bootstrap: str, cut_to_fit: bool) -> None:
        """librdkafka refuses a record larger than `queue.buffering.max.kbytes` as "queue full"
        even with the queue empty: the sink waited for room for ever, its batch never done."""
        topic = new_topic(kafka_bootstrap)
        sink = KafkaSinkConfig(bootstrap_servers=kafka_bootstrap, topic=topic, cut_to_fit=cut_to_fit,
                               config={"queue.buffering.max.kbytes": 100}).build()
        batch = [event(0), event(1, data=b"x" * 200_000), event(2)]
        try:
            try:
                await asyncio.wait_for(sink.send_batch(batch), 60)
            except TimeoutError:
                pytest.fail("still waiting after 60 s for room that never comes")
            except RejectedError as exc:
                assert not cut_to_fit, exc
                assert [e.id for e in exc.events] == ["id-1"] and exc.too_large
            else:
                assert cut_to_fit
        finally:
            await sink.aclose()
        got = {e.id: e for e in map(decode, read_back(kafka_bootstrap, topic, 3 if cut_to_fit else 2))}
        assert sorted(got) == (["id-0", "id-1", "id-2"] if cut_to_fit else ["id-0", "id-2"])
        if cut_to_fit:
            attributes, data = as_text(got["id-1"])
            assert attributes["truncated"] == "true" and attributes["datasize"] == "200000"
            assert 0.9 * 102_400 < len(data or b"") < 102_400

    async def filling(self, server: NoidaServer) -> tuple[KafkaSink, asyncio.Task[None]]:
        """A sink with a small queue, connected, and a batch of 100 filling it: the broker frozen."""
        sink = KafkaSinkConfig(bootstrap_servers=server.address, topic="events", config=self.SMALL,
                               delivery_timeout=NEVER).build()
        await sink.send_batch([event(-1)])
        server.pause()  # takes requests, answers none: the queue fills
        return sink, asyncio.create_task(sink.send_batch([event(i) for i in range(100)]))

    async def test_broker_lost_while_the_queue_is_full(self) -> None:
        server = NoidaServer("kafka").start()
        sink = None
        try:
            sink, send = await self.filling(server)
            await asyncio.sleep(0.5)
            assert not send.done()
            server.proc.kill()
            with pytest.raises(SinkError, match="no broker reachable"):
                await within_grace(send)
        finally:
            if sink is not None:
                await sink.aclose()
            server.stop()

    async def test_aclose_while_a_batch_waits_for_room(self) -> None:
        """The waiting batch held the producing lock, so aclose waited with it for the delivery
        timeout before its own brief close (~5 s) began."""
        server = NoidaServer("kafka").start()
        sink = None
        try:
            sink, send = await self.filling(server)
            await until(lambda: len(sink._client.producer) == 20, timeout=30, what="a full queue")
            try:
                await asyncio.wait_for(sink.aclose(), 60)
            except TimeoutError:
                pytest.fail(f"aclose still waiting after 60 s (delivery_timeout {NEVER:g} s, close ~5 s)")
            with pytest.raises(SinkError) as info:  # purged by the close, the rest never produced
                await asyncio.wait_for(send, 60)
            assert len(info.value.pending) == 100
        finally:
            server.resume()
            if sink is not None:
                await sink.aclose()
            server.stop()


class TestSecurity:
    """librdkafka's TLS and SASL settings pass through to a real broker (noida-db speaks SASL/PLAIN)."""

    async def test_sasl_plain(self) -> None:
        server = NoidaServer("kafka").start()
        sasl: dict[str, ClientValue] = {"security.protocol": "SASL_PLAINTEXT", "sasl.mechanism": "PLAIN",
                                        "sasl.username": "logger", "sasl.password": "secret"}
        sink = KafkaSinkConfig(bootstrap_servers=server.address, topic="events", config=sasl).build()
        try:
            await sink.send_batch([event(0)])
            assert [decode(m).id for m in read_back(server.address, "events", 1)] == ["id-0"]
        finally:
            await sink.aclose()
            server.stop()

    async def test_tls_against_a_plaintext_listener_fails_fast_and_says_why(self) -> None:
        server = NoidaServer("kafka").start()
        sink = KafkaSinkConfig(bootstrap_servers=server.address, topic="events",
                               config={"security.protocol": "SSL"}, delivery_timeout=NEVER).build()
        try:
            with pytest.raises(SinkError) as info:
                await within_grace(sink.send_batch([event(0)]))
            # librdkafka words it "SSL handshake failed" or "SSL connection closed ... SSL_HANDSHAKE"
            said = str(info.value)
            assert server.address in said and "ssl" in said.lower() and "handshake" in said.lower()
        finally:
            await sink.aclose()
            server.stop()


async def test_an_idle_sink_reports_a_broker_going_away(caplog: pytest.LogCaptureFixture) -> None:
    """No batch out, and still the client's callbacks are served: the warning comes when the broker
    goes, not in a burst with the next batch."""
    server = NoidaServer("kafka").start()
    sink = KafkaSinkConfig(bootstrap_servers=server.address, topic="events").build()
    try:
        await sink.send_batch([event(0)])
        server.stop()
        deadline = time.monotonic() + 30
        while f"no broker reachable at {server.address}" not in caplog.text:
            assert time.monotonic() < deadline, "no warning while idle"
            await asyncio.sleep(0.1)
    finally:
        await sink.aclose()


class TestConcurrent:
    """Batches overlap in flight: each returns on its own acks and fails with its own records."""

    async def test_each_returns_on_its_own_acks(self, kafka_bootstrap: str) -> None:
        prefix = f"c{uuid.uuid4().hex[:8]}"
        sink = KafkaSinkConfig(bootstrap_servers=kafka_bootstrap, topic=prefix + "-{modelname}").build()
        batches = [[event(b * 1000 + i, model=f"m{b}") for i in range(50 * (b + 1))] for b in range(4)]
        for b in range(4):  # the topics exist before the timing matters
            await sink.send_batch([event(-1 - b, model=f"m{b}")])

        async def send(b: int) -> int:
            await sink.send_batch(batches[b])
            # On return every record of this batch is in the log, whatever the others' state.
            return await asyncio.to_thread(end_offset, kafka_bootstrap, f"{prefix}-m{b}")

        try:
            offsets = await asyncio.gather(*(send(b) for b in range(4)))
        finally:
            await sink.aclose()
        assert offsets == [1 + len(batch) for batch in batches]
        for b, batch in enumerate(batches):
            got = read_back(kafka_bootstrap, f"{prefix}-m{b}", len(batch) + 1)
            assert [decode(m).id for m in got[1:]] == [e.id for e in batch]

    async def test_batches_overlap_in_flight(self) -> None:
        server = NoidaServer("kafka").start()
        sink = KafkaSinkConfig(bootstrap_servers=server.address, topic="events").build()
        batches = [[event(b * 100 + i) for i in range(100)] for b in range(4)]
        try:
            await sink.send_batch([event(-1)])
            server.pause()  # frozen: it takes the requests, acknowledges none
            sends = [asyncio.create_task(sink.send_batch(batch)) for batch in batches]
            # None is acknowledged, yet every batch is produced: none waits for another's acks.
            await until(lambda: len(sink._client.producer) == 400, timeout=30, what="all 400 records produced")
            assert not any(send.done() for send in sends)
            server.resume()
            await asyncio.wait_for(asyncio.gather(*sends), 60)
            assert end_offset(server.address, "events") == 401
        finally:
            await sink.aclose()
            server.stop()

    @pytest.mark.parametrize("where", ["client", "broker"])
    async def test_a_refusal_stays_in_its_batch(self, kafka_bootstrap: str, where: str) -> None:
        topic = new_topic(kafka_bootstrap)
        config: dict[str, ClientValue] = {"message.max.bytes": 5_000_000} if where == "broker" else {}
        sink = KafkaSinkConfig(bootstrap_servers=kafka_bootstrap, topic=topic, config=config).build()
        batches = [[event(b * 100 + i) for i in range(20)] for b in range(4)]
        batches[2][5] = event(205, data=b'"' + b"x" * 2_000_000 + b'"')
        if where == "client":  # data over the client's limit is cut to fit: over it without data
            batches[2][5] = CloudEvent({**event(205).attributes, "big": "x" * 2_000_000}, b"{}")
        try:
            results = await asyncio.gather(*(sink.send_batch(batch) for batch in batches), return_exceptions=True)
            assert [r is None for r in results] == [True, True, False, True]
            refused = results[2]
            if where == "broker":
                # Refused by the broker with other calls in flight: its record batch may have held
                # their records, so it is sent again (the worker starts nothing meanwhile), and
                # refused alone it is refused for good.
                assert isinstance(refused, SinkError) and [e.id for e in refused.pending or []] == ["id-205"]
                [refused] = await asyncio.gather(sink.send_batch(refused.pending or []), return_exceptions=True)
        finally:
            await sink.aclose()
        assert isinstance(refused, RejectedError) and "MSG_SIZE_TOO_LARGE" in str(refused)
        assert [e.id for e in refused.events] == ["id-205"]
        expected = {e.id for batch in batches for e in batch} - {"id-205"}
        assert {decode(m).id for m in read_back(kafka_bootstrap, topic, 79)} == expected

    async def test_broker_lost_with_batches_in_flight(self) -> None:
        server = NoidaServer("kafka").start()
        sink = KafkaSinkConfig(bootstrap_servers=server.address, topic="events", delivery_timeout=NEVER).build()
        batches = [[event(b * 100 + i) for i in range(100)] for b in range(4)]
        try:
            await sink.send_batch([event(-1)])
            server.pause()  # frozen: it takes the requests, acknowledges none
            sends = [asyncio.create_task(sink.send_batch(batch)) for batch in batches]
            await asyncio.sleep(0.5)
            assert not any(send.done() for send in sends)
            server.proc.kill()  # gone: the connection drops, reconnects are refused
            results = await within_grace(asyncio.gather(*sends, return_exceptions=True))
            for result in results:
                assert type(result) is SinkError, result
                assert server.address in str(result) and "no broker reachable" in str(result)
            server.stop()
            server.start()  # same port; whatever it held is gone
            await asyncio.gather(*(send_with_retry(sink, batch) for batch in batches))
            got = read_back(server.address, "events", 400)
            assert {decode(m).id for m in got} == {e.id for batch in batches for e in batch}
        finally:
            await sink.aclose()
            server.stop()

    async def test_fatal_error_with_batches_in_flight(self) -> None:
        server = NoidaServer("kafka").start()
        sink = KafkaSinkConfig(bootstrap_servers=server.address, topic="events").build()
        batches = [[event(b * 100 + i) for i in range(100)] for b in range(4)]
        try:
            await sink.send_batch([event(-1)])
            first = sink._client
            server.stop()
            server.start()  # same port, empty: the idempotent producer's sequence is now fatal
            results = await asyncio.gather(*(sink.send_batch(batch) for batch in batches), return_exceptions=True)
            assert all(r is None or type(r) is SinkError for r in results), results
            failures = await asyncio.gather(*(send_with_retry(sink, batch) for batch in batches))
            assert sum(failures) <= 8
            got = read_back(server.address, "events", 400)
            assert {decode(m).id for m in got} >= {e.id for batch in batches for e in batch}
            if any(results):  # the fatal error came with this round (not with a reconnect before it)
                assert sink._client is not first
        finally:
            await sink.aclose()
            server.stop()

    async def test_a_cancelled_batch_disturbs_no_other(self, kafka_bootstrap: str) -> None:
        topic = new_topic(kafka_bootstrap)
        sink = KafkaSinkConfig(bootstrap_servers=kafka_bootstrap, topic=topic).build()
        batches = [[event(b * 100 + i) for i in range(100)] for b in range(3)]
        sends = [asyncio.create_task(sink.send_batch(batch)) for batch in batches]
        await asyncio.sleep(0)
        sends[1].cancel()
        await asyncio.gather(sends[0], sends[2])
        assert sends[1].cancelled()
        spy = sink._client.producer = PurgeSpy(sink._client.producer)  # type: ignore[assignment]
        try:
            await asyncio.wait_for(sink.aclose(), 60)  # a hang guard: it waits for no batch for ever
        except TimeoutError:
            pytest.fail("aclose still waiting after 60 s: the cancelled batch is never done")
        # Delivered, not purged: a purge comes only once the 5 s close timeout ran out.
        assert spy.purges == 0, "aclose ran out its 5 s: the cancelled batch's records were never reported"
        with pytest.raises(SinkError, match="closed"):
            await sink.send_batch(batches[0])
        assert end_offset(kafka_bootstrap, topic) in (200, 300)


class PurgeSpy:
    """A producer that counts `purge` calls (the sink purges only past a deadline), else itself."""

    def __init__(self, producer: Producer) -> None:
        self.producer, self.purges = producer, 0

    def purge(self, *args: object, **kwargs: object) -> None:
        self.purges += 1
        self.producer.purge(*args, **kwargs)

    def __getattr__(self, name: str) -> object:
        return getattr(self.producer, name)

    def __len__(self) -> int:
        return len(self.producer)


class TestWorker:
    """Behind a sink worker over a real spool, as the sidecar runs it."""

    async def test_in_flight_keeps_spool_order(self, kafka_bootstrap: str, tmp_path: Path) -> None:
        topic = new_topic(kafka_bootstrap)
        config = KafkaSinkConfig(bootstrap_servers=kafka_bootstrap, topic=topic)
        assert config.in_flight == 4
        spool = DiskSpool(tmp_path / "spool")
        for i in range(3000):
            spool.append(event(i))
        d = Dispatcher(spool, {"kafka": config.build()}, Metrics(spool), batch_size=100,
                       backoff=Backoff(initial=0.01, maximum=0.1),
                       overrides={"kafka": (config.batch_size, config.in_flight)})
        assert d.workers[0].in_flight == 4
        d.start()
        try:
            got = await asyncio.to_thread(read_back, kafka_bootstrap, topic, 3000)
        finally:
            await d.stop()  # also closes the sink
            spool.close()
        # One partition, no retries: the idempotent producer keeps spool order across batches.
        assert [decode(m).id for m in got] == [f"id-{i}" for i in range(3000)]

    async def test_a_stalled_broker_keeps_spool_order(self, tmp_path: Path) -> None:
        """Every batch in flight times out while the broker is frozen: their retries go in spool
        order (each on its own backoff, a later batch landed first)."""
        server = NoidaServer("kafka").start()
        # One small request at a time on the wire: the frozen broker holds one (and writes it on
        # waking, in order); the other records time out queued in the client and go again.
        config = KafkaSinkConfig(bootstrap_servers=server.address, topic="events", delivery_timeout=1.5,
                                 config={"max.in.flight.requests.per.connection": 1, "batch.size": 2000})
        spool = DiskSpool(tmp_path / "spool")
        d = Dispatcher(spool, {"kafka": config.build()}, Metrics(spool), batch_size=100,
                       backoff=Backoff(initial=0.5, maximum=0.5),
                       overrides={"kafka": (config.batch_size, config.in_flight)})
        try:
            await d.workers[0].sink.send_batch([event(-1)])  # connected, the topic made
            server.pause()  # takes requests, acknowledges none
            for i in range(1000):
                spool.append(event(i))
            d.start()
            # The batches in flight time out (delivery_timeout 1.5 s), their retries are queued.
            await until(lambda: d.metrics.retried.labels("kafka")._value.get() >= 1, timeout=30, what="a retry")
            server.resume()
            await until(lambda: d.workers[0].reader.lag() == 0, timeout=20)
            got = await asyncio.to_thread(read_back, server.address, "events", end_offset(server.address, "events"))
        finally:
            await d.stop()
            spool.close()
            server.stop()
        ids = list(dict.fromkeys(decode(m).id for m in got))  # first landing of each (a retry may duplicate)
        expected = ["id--1", *(f"id-{i}" for i in range(1000))]
        assert ids == expected

    async def test_a_record_batch_refused_for_its_size_goes_again_in_halves(self, kafka_bootstrap: str,
                                                                             tmp_path: Path) -> None:
        """A topic's max.message.bytes of 100 KB (a standard topic setting): librdkafka packed
        several 30 KB records into one record batch, the broker refused it whole, and the worker
        dead-lettered every record of it, though each alone is taken."""
        prefix = f"l{uuid.uuid4().hex[:8]}"
        limited = new_topic(kafka_bootstrap, name=f"{prefix}-limited", config={"max.message.bytes": "100000"})
        free = new_topic(kafka_bootstrap, name=f"{prefix}-free")
        config = KafkaSinkConfig(bootstrap_servers=kafka_bootstrap, topic=prefix + "-{modelname}")
        # Records for both topics share produce requests; only the limited topic's fail.
        batch = [event(i, model="limited", data=b'"' + b"x" * 30_000 + b'"') if i % 2 else event(i, model="free")
                 for i in range(40)]
        batch.insert(20, event(99, model="limited", data=b'"' + b"x" * 150_000 + b'"'))  # too large alone
        spool = DiskSpool(tmp_path / "spool")
        for e in batch:
            spool.append(e)
        d = Dispatcher(spool, {"kafka": config.build()}, Metrics(spool), batch_size=100,
                       backoff=Backoff(initial=0.01, maximum=0.1), deadletter_dir=tmp_path / "dead",
                       overrides={"kafka": (config.batch_size, config.in_flight)})
        d.start()
        try:
            deadline = time.monotonic() + 30
            while d.workers[0].reader.lag() and time.monotonic() < deadline:
                await asyncio.sleep(0.05)
        finally:
            await d.stop()
            spool.close()
        dead = [orjson.loads(line) for line in (tmp_path / "dead" / "kafka.jsonl").read_bytes().splitlines()]
        assert [d["attributes"]["id"] for d in dead] == ["id-99"] and "MSG_SIZE_TOO_LARGE" in dead[0]["reason"]
        # Each good record once (acknowledged ones were not sent again). Not in spool order: a
        # piece sent again may go in two record batches (librdkafka's timing), the second taken
        # and the first refused again, halved and taken after it.
        assert (end_offset(kafka_bootstrap, limited), end_offset(kafka_bootstrap, free)) == (20, 20)
        assert sorted(decode(m).id for m in read_back(kafka_bootstrap, limited, 20)) == sorted(
            f"id-{i}" for i in range(1, 40, 2))
        assert [decode(m).id for m in read_back(kafka_bootstrap, free, 20)] == [f"id-{i}" for i in range(0, 40, 2)]
        assert d.metrics.delivered.labels("kafka")._value.get() == 40 and spool.stats.dropped["rejected"] == 1


    async def test_a_record_refused_in_a_record_batch_shared_with_another_call_is_not_dead_lettered(
            self, kafka_bootstrap: str) -> None:
        """Calls in flight together share a record batch: each saw one record of it refused for its
        size, took that for the record's own, and it was dead-lettered though it fits the topic."""
        from infer_logger.sinks.halving import Halving

        topic = new_topic(kafka_bootstrap, config={"max.message.bytes": "100000"})
        sink = KafkaSinkConfig(bootstrap_servers=kafka_bootstrap, topic=topic).build()
        halving = Halving(sink)
        batches = [[event(10 * b + i, data=b'"' + b"x" * 20_000 + b'"') for i in range(6)] for b in range(8)]
        try:
            results = await asyncio.gather(*(halving.send_batch(b) for b in batches), return_exceptions=True)
            refused = [r for r in results if isinstance(r, RejectedError)]
            assert not refused, refused[0]
            for batch, result in zip(batches, results, strict=True):  # as the worker retries, alone
                pending = getattr(result, "pending", None) or batch if isinstance(result, SinkError) else []
                if pending:
                    await halving.send_batch(pending)
        finally:
            await sink.aclose()
        ids = [decode(m).id for m in read_back(kafka_bootstrap, topic, 48)]
        assert sorted(ids) == sorted(e.id for b in batches for e in b)


class TestPartialFailures:
    """What a batch's failed delivery reports make of it (pure logic: a partial failure, one topic
    of several unavailable, cannot be staged on the test broker, which creates every topic)."""

    class Report:
        def __init__(self, topic: str, key: bytes, value: bytes | None) -> None:
            self._topic, self._key, self._value = topic, key, value

        def topic(self) -> str:
            return self._topic

        def key(self) -> bytes:
            return self._key

        def value(self) -> bytes | None:
            return self._value

    async def test_only_the_failed_and_the_unproduced_are_pending(self) -> None:
        """One model's topic missing had every other topic's records of the batch produced again
        on each retry: duplicates for as long as the topic stayed missing."""
        from confluent_kafka import KafkaError

        sink = KafkaSinkConfig(bootstrap_servers="127.0.0.1:1", topic="{modelname}").build()
        try:
            batch = [event(i, model="iris" if i % 2 else "gone") for i in range(6)]
            failed = [(KafkaError(KafkaError.UNKNOWN_TOPIC_OR_PART), self.Report("gone", *sink._encode(e)[:2]))
                      for e in batch[:4] if e["modelname"] == "gone"]
            with pytest.raises(SinkError) as info:
                sink._raise_failures(sink._client, batch, {}, cast(list, failed), stopped=5)
            assert info.value.pending == [batch[0], batch[2], batch[5]]  # failed, and never produced
            with pytest.raises(SinkError) as info:  # a report no event matches: all of it again
                sink._raise_failures(sink._client, batch, {}, [(KafkaError(KafkaError.UNKNOWN_TOPIC_OR_PART),
                                                               cast(Message, self.Report("x", b"?", b"?")))])
            assert info.value.pending == []
        finally:
            await sink.aclose()


class TestBinaryRecords:
    """The sink's cached binary encoder equals the binding, record for record."""

    def test_equals_the_binding(self) -> None:
        encode = BinaryRecords(size=8)  # small: the cache also starts over while encoding
        samples = [event(i) for i in range(20)]
        samples += [
            event(1).with_attributes(statuscode="200"),  # the string, after the int was seen
            event(2).with_attributes(truncated=1, statuscode=True),  # True == 1 as dict keys
            event(3).with_attributes(partitionkey="tenant-7"),  # the key comes from it
            event(4).with_attributes(statuscode=1, truncated=True),  # 1 after True
            event(5).with_attributes(statuscode=0, truncated=False),  # False == 0 as keys
            event(6).with_attributes(latencyms=17, statuscode="17"),  # an int kept, then its text
            CloudEvent({"specversion": "1.0", "id": "bare", "source": "/s", "type": "t"}),
            # One attribute order, a repeated text value turning into other types and back.
            event(7).with_attributes(modelversion="1"),
            event(8).with_attributes(modelversion=1),
            event(9).with_attributes(modelversion=True),
            event(10).with_attributes(modelversion="1"),
            event(11).with_attributes(time="2024-05-01T12:00:00Z", latencyms="5"),
        ]
        for e in samples * 2:
            m = to_kafka_binary(e)
            assert encode(e) == (m.key, m.value, list(m.headers.items()))


    def test_a_stream_of_one_layout_equals_the_binding(self) -> None:
        encode = BinaryRecords(size=4)  # small: the templates also start over
        for i in range(50):
            e = event(i).with_attributes(statuscode=200 + i % 3, latencyms=i, endpoint=f"e{i % 6}")
            m = to_kafka_binary(e)
            assert encode(e) == (m.key, m.value, list(m.headers.items()))


class TestConfig:
    """Config is checked when it is read, not when the first event is sent."""

    @pytest.mark.parametrize("value", ["1MB", float("inf"), float("nan"), 1e30, True])
    @pytest.mark.parametrize("key", ["queue.buffering.max.kbytes", "message.max.bytes"])
    def test_a_size_librdkafka_cannot_read_is_a_config_error(self, key: str, value: ClientValue) -> None:
        """Read as an integer before the producer checked it: a ValueError (or, infinite, an
        OverflowError) traceback at start. 1e30 reaches librdkafka as "1e+30", which it reads as 1."""
        with pytest.raises(ConfigError, match=key) as info:
            KafkaSinkConfig(bootstrap_servers="127.0.0.1:9", topic="t", config={key: value}).build()
        assert info.value.field == "config"

    @pytest.mark.parametrize(("field", "value"), [
        ("delivery_timeout", float("inf")), ("delivery_timeout", float("nan")),
        ("delivery_timeout", 1e7),  # over librdkafka's 2^31-1 ms
        ("delivery_timeout", 0.001), ("delivery_timeout", 0.005),  # librdkafka: not over linger.ms (5)
        ("linger_ms", float("inf")), ("linger_ms", float("nan")), ("linger_ms", 1e6),  # over 900000
        ("linger_ms", -1),
    ])
    def test_timings_librdkafka_refuses_name_their_field(self, field: str, value: float) -> None:
        """An infinite delivery_timeout was an OverflowError traceback (a CLI child's too); a
        value librdkafka refuses was reported as the field `config`."""
        with pytest.raises(ValidationError) as info:
            KafkaSinkConfig.model_validate({"bootstrap_servers": "127.0.0.1:9", field: value})
        [error] = info.value.errors()
        # The timeout against linger_ms is checked on the model (`config` may set either instead).
        assert error["loc"] == (field,) or (error["loc"] == () and f"{field}: " in error["msg"]), error

    def test_timings_at_librdkafkas_limits_are_taken(self) -> None:
        for taken in ({"delivery_timeout": 2_147_483.647}, {"linger_ms": 900_000, "delivery_timeout": 901},
                      {"linger_ms": 0, "delivery_timeout": 0.001}, {"delivery_timeout": 0.006},
                      # The timeout that applies is config's: delivery_timeout under linger_ms was refused.
                      {"linger_ms": 200, "delivery_timeout": 0.1, "config": {"message.timeout.ms": 60000}},
                      {"linger_ms": 2000, "delivery_timeout": 1, "config": {"queue.buffering.max.ms": 5}}):
            KafkaSinkConfig.model_validate({"bootstrap_servers": "127.0.0.1:9", **taken}).build()

    @pytest.mark.parametrize("value", [float("inf"), "2min", -1, 2**31])
    @pytest.mark.parametrize("key", ["message.timeout.ms", "delivery.timeout.ms"])
    def test_a_message_timeout_librdkafka_cannot_read_is_a_config_error(self, key: str,
                                                                        value: ClientValue) -> None:
        """The sink reads it too (its backstop follows librdkafka's timeout)."""
        with pytest.raises(ConfigError, match=key):
            KafkaSinkConfig(bootstrap_servers="127.0.0.1:9", config={key: value}).build()

    def test_template(self) -> None:
        template = TopicTemplate("inference-{namespace}-{inferenceservicename}")
        e = event(0).with_attributes(namespace="prod", inferenceservicename="my model")
        assert template.render(e) == "inference-prod-my_model"
        assert template.render(event(0)) == "inference-unknown-unknown"
        assert TopicTemplate("{modelname}").render(event(0)) == "iris"
        assert TopicTemplate("plain").constant == "plain"

    def test_a_template_tells_booleans_from_numbers(self) -> None:
        """As dict keys True == 1: the first seen named the topic of both."""
        template = TopicTemplate("events-{flag}")
        rendered = [template.render(event(0).with_attributes(flag=v)) for v in (True, 1, False, 0, 1, True)]
        assert rendered == ["events-true", "events-1", "events-false", "events-0", "events-1", "events-true"]

    @pytest.mark.parametrize("topic", ["", "bad topic", "x-{model.name}", "x-{modelname!r}", "x-{a:>3}",
                                       "x-{ModelName}", "x-{", "x-{}"])
    def test_bad_topics(self, topic: str) -> None:
        with pytest.raises(ValidationError, match="topic"):
            KafkaSinkConfig(bootstrap_servers="127.0.0.1:9092", topic=topic)

    @pytest.mark.parametrize("topic", [".", "..", "a" * 250, "a" * 300 + "{modelname}", "a" * 249 + "{modelname}"])
    def test_topic_names_kafka_never_accepts(self, topic: str) -> None:
        """They passed, and then every event was dead-lettered (a field renders one character at least)."""
        with pytest.raises(ValidationError, match="topic"):
            KafkaSinkConfig(bootstrap_servers="127.0.0.1:9092", topic=topic)
        for taken in ("a" * 249, "__internal", "a.b", "..{modelname}", "a" * 248 + "{modelname}"):
            assert KafkaSinkConfig(bootstrap_servers="127.0.0.1:9092", topic=taken).topic == taken

    def test_client_config(self) -> None:
        config = KafkaSinkConfig(bootstrap_servers="b:9092", linger_ms=20, compression="zstd",
                                 config={"security.protocol": "SASL_SSL", "linger.ms": 50})
        conf = config.producer_config()
        assert conf["acks"] == "all" and conf["enable.idempotence"] is True
        assert conf["compression.type"] == "zstd" and conf["security.protocol"] == "SASL_SSL"
        assert conf["linger.ms"] == 50  # passed-through properties win
        with pytest.raises(ConfigError, match="no.such.property"):
            KafkaSinkConfig(bootstrap_servers="b:9092", config={"no.such.property": "1"}).build()

    def test_transactions_are_refused_when_read(self) -> None:
        """librdkafka refuses every record of a producer with `transactional.id` until
        `init_transactions()`: the sink retried every batch for ever."""
        with pytest.raises(ValidationError, match=r"config[\s\S]*transactional.id"):
            KafkaSinkConfig(bootstrap_servers="b:9092", config={"transactional.id": "t"})

    @pytest.mark.parametrize("acks", [0, 1, "1", "0"])
    def test_acks_but_all_are_refused_when_read(self, acks: object) -> None:
        """Passed through last, `acks` 1 or 0 took over: events counted delivered (the spool moved
        on) that one broker's loss would take."""
        for key in ("acks", "request.required.acks"):  # and librdkafka's own name for it
            with pytest.raises(ValidationError, match=rf"config[\s\S]*{key}"):
                KafkaSinkConfig(bootstrap_servers="b:9092", config={key: acks})
        for same in ("all", -1, "-1", "ALL"):
            KafkaSinkConfig(bootstrap_servers="b:9092", config={"acks": same})

    @pytest.mark.parametrize("servers", ["", " ", ",", " , "])
    def test_a_bootstrap_list_naming_no_broker_is_refused(self, servers: str) -> None:
        """librdkafka takes an empty list and waits for ever for a broker it was never given."""
        with pytest.raises(ValidationError, match="bootstrap_servers"):
            KafkaSinkConfig(bootstrap_servers=servers)
        for taken in ("b:9092,", "b:9092,,c:9092", " b:9092 , c"):  # librdkafka skips empty entries
            assert KafkaSinkConfig(bootstrap_servers=taken).bootstrap_servers == taken

    def test_in_flight(self) -> None:
        assert KafkaSinkConfig(bootstrap_servers="b:9092").in_flight == 4
        assert KafkaSinkConfig(bootstrap_servers="b:9092", in_flight=None).in_flight is None  # the default's
        with pytest.raises(ValidationError, match="in_flight"):
            KafkaSinkConfig(bootstrap_servers="b:9092", in_flight=0)

    async def test_empty_batch(self) -> None:
        sink = KafkaSinkConfig(bootstrap_servers=f"127.0.0.1:{free_port()}").build()
        await sink.send_batch([])
        await sink.aclose()

    def test_without_the_client_library(self) -> None:
        """The config reads without confluent-kafka (an optional extra); building names the extra."""
        code = ("import sys; sys.modules['confluent_kafka'] = None\n"
                "from infer_logger.errors import ConfigError\n"
                "from infer_logger.sinks.kafka import KafkaSinkConfig as C; c = C(bootstrap_servers='b:1')\ntry: c.build()\nexcept ConfigError as e: print(e)")
        root = Path(__file__).resolve().parents[3]  # the repository: where `import infer_logger` works
        done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60,
                              check=True, cwd=root)
        assert "infer-logger[kafka]" in done.stdout


async def test_a_broker_down_does_not_flood_the_log(caplog: pytest.LogCaptureFixture) -> None:
    """librdkafka logs each failed connect at ERROR, ~20 a second: one of each line gets through."""
    import re

    caplog.set_level(logging.DEBUG, logger="infer_logger.sinks.kafka.librdkafka")
    sink = KafkaSinkConfig(bootstrap_servers=f"127.0.0.1:{free_port()}", topic="t").build()
    try:
        with pytest.raises(SinkError):
            await sink.send_batch([event(0)])  # ~2.5 s of reconnects before it gives up
    finally:
        await sink.aclose()
    lines = [re.sub(r"\d+", "", r.getMessage()) for r in caplog.records
             if r.name == "infer_logger.sinks.kafka.librdkafka" and "Connect to" in r.getMessage()]
    assert lines and len(lines) == len(set(lines)), lines


def test_the_log_filter_holds_back_repeats_only() -> None:
    """Its counters aside a line is the same; another broker or partition is another line."""
    from infer_logger.sinks.kafka import _Repeats

    repeats = _Repeats()

    def passes(text: str, client: str = "rdkafka#producer-1") -> bool:
        return repeats.filter(logging.LogRecord("x", logging.ERROR, "", 0, "%s [%s] %s", ("FAIL", client, text), None))

    fail = "[thrd:127.0.0.1:{port}/bootstrap]: Connect to ipv4#127.0.0.1:{port} failed (after {ms}ms in state CONNECT{n})"
    assert passes(fail.format(port=9092, ms=0, n=""))
    assert not passes(fail.format(port=9092, ms=12, n=""))
    assert not passes(fail.format(port=9092, ms=3, n=", 5 identical error(s) suppressed"))
    assert passes(fail.format(port=9093, ms=0, n=""))  # another broker
    assert passes(fail.format(port=9092, ms=0, n=""), client="rdkafka#consumer-2")  # another client
    assert passes("topic [0]: offset reset (at offset 500)") and passes("topic [1]: offset reset (at offset 700)")

"""`channel: kafka` against a real Kafka-protocol broker (the `kafka_bootstrap` fixture): a topic
per broker, a consumer group per trigger, restarts resuming from committed offsets, new triggers
starting at the end, two broker processes sharing the work, and Kafka refusing or gone."""

from __future__ import annotations

import asyncio
import contextlib
import functools
import itertools
import threading
import time
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import Any

import httpx
import orjson
import pytest
from confluent_kafka import KafkaError, KafkaException
from confluent_kafka.admin import AdminClient, NewTopic  # type: ignore[attr-defined]

from infer_logger.cloudevents.json_format import to_dict
from infer_logger.errors import RejectedError, SinkError
from infer_logger.sinks.halving import Halving
from infer_logger.sinks.kafka import KafkaSinkConfig
from infer_logger.sinks.memory import MemorySink
from infer_logger.testing import free_port
from pipelines.broker import Broker, BrokerThread, kafka_channel
from pipelines.broker.channel import ChannelError
from pipelines.broker.kafka_channel import KafkaChannel
from pipelines.broker.settings import KafkaChannelSettings
from tests.services import NoidaServer

from .helpers import Handler, Subscriber, binary_request, client, event, refused_by, settings, until

pytestmark = pytest.mark.slow
_names = itertools.count()


@pytest.fixture
def kafka_settings(kafka_bootstrap: str, tmp_path: Path) -> dict[str, Any]:
    # A fresh broker name per test: its own topic and groups on the shared server.
    return {"channel": "kafka", "name": f"b{next(_names)}-{uuid.uuid4().hex[:8]}",
            "kafka": {"bootstrap_servers": kafka_bootstrap, "partitions": 4}}


async def _post(broker: Broker, ids: list[str], type_: str = "com.example.someevent") -> None:
    async with client(broker) as c:
        for id_ in ids:
            response = await c.post("/", **binary_request(event(id_, type_)))
            assert response.status_code == 202, response.text


def _channel(broker: Broker) -> KafkaChannel:
    channel = broker.channels[broker.default_key]
    assert isinstance(channel, KafkaChannel)
    return channel


async def test_filters_and_delivery(tmp_path: Path, kafka_settings: dict[str, Any], subscriber: Subscriber,
                                    other_subscriber: Subscriber) -> None:
    broker = Broker(settings(tmp_path, **kafka_settings), triggers=f"""
triggers:
  - {{name: all, subscriber: '{subscriber.url}'}}
  - {{name: cesql, filters: [{{cesql: "type LIKE '%.special'"}}], subscriber: '{other_subscriber.url}'}}
""")
    await broker.startup()
    try:
        assert _channel(broker).topic == f"knative-broker-default-{kafka_settings['name']}"
        await _post(broker, [f"n{i}" for i in range(10)])
        await _post(broker, ["s1"], "x.special")
        received = await asyncio.to_thread(subscriber.wait_for, 11, 30)
        [special] = await asyncio.to_thread(other_subscriber.wait_for, 1, 30)
    finally:
        await broker.shutdown()
    assert {e.id for e in received} == {f"n{i}" for i in range(10)} | {"s1"}
    assert special.id == "s1" and "knativebrokerttl" not in special.attributes


async def test_restart_resumes_and_new_triggers_start_at_the_end(
        tmp_path: Path, kafka_settings: dict[str, Any], subscriber: Subscriber, other_subscriber: Subscriber) -> None:
    one = f"""
triggers:
  - name: t
    subscriber: '{subscriber.url}'
    delivery: {{retry: 1000, backoffPolicy: linear, backoffDelay: PT0.05S}}
"""
    subscriber.fail_with = 503
    first = Broker(settings(tmp_path, drain_timeout=0.2, **kafka_settings), triggers=one)
    await first.startup()
    await _post(first, [f"a{i}" for i in range(10)])
    await until(lambda: subscriber.attempts >= 1, 30, "a first attempt")
    await first.shutdown()

    subscriber.fail_with = None
    two = one + f"  - {{name: late, subscriber: '{other_subscriber.url}'}}\n"
    second = Broker(settings(tmp_path, **kafka_settings), triggers=two)
    await second.startup()
    try:
        await _post(second, ["b0"])
        await asyncio.to_thread(subscriber.wait_for, 11, 30)
        [late] = await asyncio.to_thread(other_subscriber.wait_for, 1, 30)
    finally:
        await second.shutdown()
    assert {e.id for e in subscriber.events} == {f"a{i}" for i in range(10)} | {"b0"}
    assert late.id == "b0"  # the new trigger's group started at the end of the topic


async def test_two_brokers_share_the_topic_and_the_groups(
        tmp_path: Path, kafka_settings: dict[str, Any], subscriber: Subscriber) -> None:
    """Scale-out: each process's ingress produces, and the group splits the partitions between them."""
    triggers = f"triggers: [{{name: t, subscriber: '{subscriber.url}'}}]"
    brokers = [Broker(settings(tmp_path / str(i), **kafka_settings), triggers=triggers) for i in range(2)]
    for broker in brokers:
        await broker.startup()
    try:
        sources = [_channel(b)._sources["t"][0] for b in brokers]
        await until(lambda: all(s.assignment for s in sources) and sum(len(s.assignment) for s in sources) == 4,
                    30, "both consumers assigned")
        await _post(brokers[0], [f"x{i}" for i in range(20)])
        await _post(brokers[1], [f"y{i}" for i in range(20)])
        await asyncio.to_thread(subscriber.wait_for, 40, 30)
        settled = [b.dispatchers[("default", "t")].settled for b in brokers]
    finally:
        for broker in brokers:
            await broker.shutdown()
    assert {e.id for e in subscriber.events} == {f"{p}{i}" for p in "xy" for i in range(20)}
    assert all(n > 0 for n in settled), settled


async def test_ingress_only_role(tmp_path: Path, kafka_settings: dict[str, Any], subscriber: Subscriber) -> None:
    ingress = Broker(settings(tmp_path / "i", role="ingress", **kafka_settings),
                     triggers=f"triggers: [{{name: t, subscriber: '{subscriber.url}'}}]")
    dispatcher = Broker(settings(tmp_path / "d", role="dispatcher", **kafka_settings),
                        triggers=f"triggers: [{{name: t, subscriber: '{subscriber.url}'}}]")
    await ingress.startup()
    await dispatcher.startup()
    try:
        assert not _channel(ingress)._sources  # no consumers in an ingress-only process
        async with client(dispatcher) as c:
            assert (await c.post("/", **binary_request(event()))).status_code == 503
        await _post(ingress, ["i1"])
        [received] = await asyncio.to_thread(subscriber.wait_for, 1, 30)
    finally:
        await ingress.shutdown()
        await dispatcher.shutdown()
    assert received.id == "i1"


async def test_an_event_kafka_refuses_for_good_is_413_and_others_go_on(
        tmp_path: Path, kafka_settings: dict[str, Any], subscriber: Subscriber) -> None:
    """Within the ingress limit (1 MiB) but over the producer's record limit (librdkafka's
    `message.max.bytes`, 1,000,000 by default): retrying cannot help, so no 503."""
    broker = Broker(settings(tmp_path, **kafka_settings),
                    triggers=f"triggers: [{{name: t, subscriber: '{subscriber.url}'}}]")
    await broker.startup()
    try:
        async with client(broker) as c:
            big = event("big", data=b'"' + b"x" * 1_010_000 + b'"')
            refused = await c.post("/", **binary_request(big))
            assert refused.status_code == 413, refused.text
            assert "too large" in refused.json()["error"].lower(), refused.text
        await _post(broker, ["after"])
        [received] = await asyncio.to_thread(subscriber.wait_for, 1, 30)
        assert broker.metrics.refused.labels("oversize")._value.get() == 1
    finally:
        await broker.shutdown()
    assert received.id == "after"



def test_a_batch_post_kafka_took_in_part_reaches_the_trigger_once_each(
        tmp_path: Path, kafka_settings: dict[str, Any], subscriber: Subscriber) -> None:
    """An http sink in batch mode in front of the broker (a sidecar's, or a source's
    subscriber): one event of ten over the producer's record limit was refused, the nine
    others written, and the 413 answered for the whole POST made the sink send them again in
    halves: each of the nine reached the trigger twice. The 413 names the refused event now."""
    broker = Broker(settings(tmp_path, **kafka_settings),
                    triggers=f"triggers: [{{name: t, subscriber: '{subscriber.url}'}}]")
    batch = [event(f"p{i}") for i in range(10)]
    batch[4] = event("p4", data=b'"' + b"x" * 1_010_000 + b'"')
    with BrokerThread(broker, port=free_port()) as running:
        refused = refused_by(running.url, batch)
        subscriber.wait_for(9, 30)
        time.sleep(1.0)  # a duplicate would follow within the trigger's batch timeout
    assert refused.events == [batch[4]] and refused.too_large
    assert sorted(e.id for e in subscriber.events) == sorted(f"p{i}" for i in range(10) if i != 4)

async def test_events_refused_as_one_record_batch_are_taken_in_halves(
        tmp_path: Path, kafka_settings: dict[str, Any], subscriber: Subscriber) -> None:
    """A channel topic's max.message.bytes of 100 KB (a standard topic setting): librdkafka packed
    a batch POST's 30 KB events into one record batch, Kafka refused it whole, and the ingress
    answered 413 for events each of which fits."""
    topic = f"knative-broker-default-{kafka_settings['name']}"
    admin = AdminClient({"bootstrap.servers": kafka_settings["kafka"]["bootstrap_servers"]})
    admin.create_topics([NewTopic(topic, num_partitions=1, replication_factor=1,
                                  config={"max.message.bytes": "100000"})])[topic].result(10)
    broker = Broker(settings(tmp_path, **kafka_settings),
                    triggers=f"triggers: [{{name: t, subscriber: '{subscriber.url}'}}]")
    await broker.startup()
    try:
        batch = [to_dict(event(f"b{i}", data=b'"' + b"x" * 30_000 + b'"')) for i in range(10)]
        async with client(broker) as c:
            response = await c.post("/", content=orjson.dumps(batch),
                                     headers={"content-type": "application/cloudevents-batch+json"})
            assert response.status_code == 202, response.text
        received = await asyncio.to_thread(subscriber.wait_for, 10, 30)
    finally:
        await broker.shutdown()
    assert sorted(e.id for e in received) == sorted(f"b{i}" for i in range(10))


async def test_a_failure_after_halves_were_written_fails_only_the_appends_not_written() -> None:
    """Logic (Kafka cannot be made to fail between two halves): every append flushed with the
    batch was failed, its sender told 503, and the events already in the topic sent again."""
    channel = KafkaChannel(KafkaChannelSettings(bootstrap_servers="127.0.0.1:9"), "default", "b")
    topic = MemorySink()
    topic.fail = lambda batch: (RejectedError("MSG_SIZE_TOO_LARGE", batch, too_large=True, together=True)
                                if len(batch) > 2 else SinkError("down") if batch[0].id.startswith("b") else None)
    channel._sink = Halving(topic)
    a, b = [event(f"a{i}") for i in range(2)], [event(f"b{i}") for i in range(2)]
    written, failed = await asyncio.gather(channel.append(a), channel.append(b), return_exceptions=True)
    assert written is None and isinstance(failed, ChannelError) and failed.pending is None
    assert [e.id for e in topic.events] == ["a0", "a1"]
    # One append written in part: its sender is told which to send again (all: duplicates).
    topic.events.clear()
    with pytest.raises(ChannelError) as info:
        await channel.append([event("a2"), event("a3"), event("b2"), event("b3")])
    assert info.value.pending == [2, 3] and [e.id for e in topic.events] == ["a2", "a3"]

async def test_a_trigger_consumer_that_fails_says_so(caplog: pytest.LogCaptureFixture) -> None:
    """Its task's exception was never retrieved: the trigger stopped delivering, silently."""
    from pipelines.broker.kafka_channel import _said_if_failed

    async def fails() -> None:
        raise RuntimeError("consumer gone")

    task = asyncio.get_running_loop().create_task(fails(), name="trigger:knative-trigger-default-t")
    task.add_done_callback(_said_if_failed)
    with contextlib.suppress(RuntimeError):
        await task
    await asyncio.sleep(0)
    assert "trigger:knative-trigger-default-t stopped: RuntimeError: consumer gone" in caplog.text


async def test_kafka_down_is_503_then_back(tmp_path: Path, subscriber: Subscriber,
                                           monkeypatch: pytest.MonkeyPatch) -> None:
    """Kafka gone: the ingress answers 503 naming it, soon (no 30 s hang), and takes events again,
    delivered by the trigger's consumer, once Kafka is back."""
    # A delivery timeout no test waits out: a 503 within the hang guard came from the down grace.
    monkeypatch.setattr(kafka_channel, "KafkaSinkConfig", functools.partial(KafkaSinkConfig, delivery_timeout=600))
    server = NoidaServer("kafka").start()
    broker = Broker(settings(tmp_path, channel="kafka", name="down",
                             kafka={"bootstrap_servers": server.address, "partitions": 2}),
                    triggers=f"triggers: [{{name: t, subscriber: '{subscriber.url}'}}]")
    await broker.startup()
    try:
        await _post(broker, [f"a{i}" for i in range(5)])
        await asyncio.to_thread(subscriber.wait_for, 5, 30)
        server.stop(keep_data=True)
        async with client(broker) as c:
            try:
                down = await asyncio.wait_for(c.post("/", **binary_request(event("b0"))), 60)  # a hang guard
            except TimeoutError:
                pytest.fail("no answer within 60 s: the sink's 2 s down grace was not applied")
            assert down.status_code == 503, down.text
            assert server.address in down.json()["error"], down.text
            server.start(fresh=False)  # noida keeps its data across a restart on the same dir
            for id_ in ["b0", "c0", "c1"]:  # a sender retries a 503
                deadline = time.monotonic() + 30
                while (await c.post("/", **binary_request(event(id_)))).status_code != 202:
                    assert time.monotonic() < deadline, f"{id_} not taken after the restart"
                    await asyncio.sleep(0.5)
        await until(lambda: {"b0", "c0", "c1"} <= {e.id for e in subscriber.events}, 60, "delivery after the restart")
    finally:
        await broker.shutdown()
        server.stop()
    assert {e.id for e in subscriber.events} == {f"a{i}" for i in range(5)} | {"b0", "c0", "c1"}


async def test_reload_replaces_and_removes_triggers(tmp_path: Path, kafka_settings: dict[str, Any],
                                                    subscriber: Subscriber, other_subscriber: Subscriber) -> None:
    """A changed trigger resumes its group where it was; a removed one leaves and its group goes."""
    path = tmp_path / "triggers.yaml"
    path.write_text(f"""triggers:
  - {{name: a, subscriber: '{subscriber.url}'}}
  - {{name: b, subscriber: '{other_subscriber.url}'}}
""")
    broker = Broker(settings(tmp_path, trigger_files=[path], **kafka_settings))
    await broker.startup()
    channel = _channel(broker)
    try:
        await _post(broker, ["1"])
        await asyncio.to_thread(subscriber.wait_for, 1, 30)
        await asyncio.to_thread(other_subscriber.wait_for, 1, 30)
        path.write_text(f"triggers: [{{name: a, filters: [{{exact: {{type: y}}}}], subscriber: '{subscriber.url}'}}]\n")
        assert await broker.reload()
        assert set(channel._sources) == {"a"}
        await _post(broker, ["2"], "y")
        await _post(broker, ["3"], "x")
        await _post(broker, ["4"], "y")
        await until(lambda: len(subscriber.events) >= 3, 30, "the changed trigger's events")
        groups = await asyncio.to_thread(_groups, kafka_settings["kafka"]["bootstrap_servers"])
    finally:
        await broker.shutdown()
    assert sorted(e.id for e in subscriber.events) == ["1", "2", "4"]  # 4 partitions: no order across ids
    assert [e.id for e in other_subscriber.events] == ["1"]
    assert channel.group("a") in groups and channel.group("b") not in groups


def _groups(bootstrap: str) -> set[str]:
    from confluent_kafka.admin import AdminClient

    admin = AdminClient({"bootstrap.servers": bootstrap})  # alive until the answer: a dropped one cancels it
    listed = admin.list_consumer_groups(request_timeout=10).result()
    assert not listed.errors, listed.errors
    return {g.group_id for g in listed.valid}


async def test_kafka_unreachable_at_start_is_waited_for(tmp_path: Path, subscriber: Subscriber,
                                                       monkeypatch: pytest.MonkeyPatch,
                                                       caplog: pytest.LogCaptureFixture) -> None:
    """The broker starts anyway, not ready (503, naming nothing it cannot know yet), says which
    address it waits for, and attaches its triggers once Kafka answers."""
    from pipelines.broker import kafka_channel

    monkeypatch.setattr(kafka_channel, "_TIMEOUT", 1.0)
    monkeypatch.setattr(kafka_channel, "_RECONNECT_MAX", 1.0)
    server = NoidaServer("kafka")  # its port, not yet listening
    broker = Broker(settings(tmp_path, channel="kafka", name="late",
                             kafka={"bootstrap_servers": server.address, "partitions": 2}),
                    triggers=f"triggers: [{{name: t, subscriber: '{subscriber.url}'}}]")
    await broker.startup()
    try:
        assert not broker.ready
        await until(lambda: f"kafka at {server.address}: no broker answered within 1s" in caplog.text, 30,
                    "the address waited for said")
        async with client(broker) as c:
            assert (await c.get("/readyz")).status_code == 503
            assert (await c.post("/", **binary_request(event("early")))).status_code == 503
        server.start()
        await until(lambda: broker.ready, 30, "ready once Kafka answers")
        await _post(broker, ["k1", "k2"])
        await asyncio.to_thread(subscriber.wait_for, 2, 30)
    finally:
        await broker.shutdown()
        server.stop()
    assert {e.id for e in subscriber.events} == {"k1", "k2"}


async def test_a_kafka_silent_at_start_holds_neither_the_port_nor_the_other_brokers(
        tmp_path: Path, kafka_bootstrap: str, subscriber: Subscriber, other_subscriber: Subscriber,
        monkeypatch: pytest.MonkeyPatch) -> None:
    """A topic's creation not answered: the start waited its 10 s with the port closed (/healthz
    too: a liveness probe restarted the pod), then every broker of the process answered 503 until
    all were ready. Now the port opens, and only the broker without its topic answers 503."""
    create_topic, entered, release = KafkaChannel._create_topic, threading.Event(), threading.Event()

    def silent_for_b1(channel: KafkaChannel) -> None:
        if channel.topic.endswith("-b1"):
            entered.set()
            release.wait(60)  # a bound, in case nothing releases it
        create_topic(channel)

    monkeypatch.setattr(KafkaChannel, "_create_topic", silent_for_b1)
    name = f"s{uuid.uuid4().hex[:8]}"
    triggers = (f"triggers:\n  - {{name: t0, subscriber: '{subscriber.url}'}}\n"
                f"  - {{name: t1, namespace: {name}, broker: b1, subscriber: '{other_subscriber.url}'}}\n")
    broker = Broker(settings(tmp_path, channel="kafka", name=name,
                             kafka={"bootstrap_servers": kafka_bootstrap, "partitions": 1}), triggers=triggers)
    running = BrokerThread(broker, "127.0.0.1", free_port())
    try:
        await asyncio.to_thread(running.start, 15)  # held for the topic, it did not start within this
        assert entered.is_set()
        async with httpx.AsyncClient(base_url=running.url) as c:
            assert (await c.get("/healthz")).status_code == 200
            ready = await c.get("/readyz")
            assert ready.status_code == 503
            assert ready.json()["brokers"] == {f"default/{name}": True, f"{name}/b1": False}
            assert (await c.post("/", **binary_request(event("d1")))).status_code == 202
            held = await c.post(f"/{name}/b1", **binary_request(event("h1")))
            assert held.status_code == 503 and held.json()["pending"] == [0], held.text
            assert "not ready" in held.json()["error"]
            await asyncio.to_thread(subscriber.wait_for, 1, 30)
            release.set()
            await until(lambda: broker.ready, 30, "ready once the topic is created")
            assert (await c.post(f"/{name}/b1", **binary_request(event("h2")))).status_code == 202
            await asyncio.to_thread(other_subscriber.wait_for, 1, 30)
    finally:
        release.set()
        await asyncio.to_thread(running.stop)
    assert [e.id for e in subscriber.events] == ["d1"] and [e.id for e in other_subscriber.events] == ["h2"]


async def test_a_refusal_due_as_the_first_wait_ends_fails_the_start(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The loop held as the wait ended: the first try's refusal and the wait's timeout came in
    one turn, the start went on as for a silent Kafka, and the refusal was neither raised, nor
    logged, nor tried again (503 for good)."""
    monkeypatch.setattr(kafka_channel, "_START_WAIT", 0.3)

    def refused(channel: KafkaChannel) -> None:
        time.sleep(0.2)
        raise ChannelError(f"kafka: topic {channel.topic}: refused (the test's)")

    monkeypatch.setattr(KafkaChannel, "_create_topic", refused)
    loop = asyncio.get_running_loop()
    loop.call_later(0.1, time.sleep, 0.5)  # the loop held from before the refusal to after the wait's end
    broker = Broker(settings(tmp_path, channel="kafka", name=f"r{uuid.uuid4().hex[:8]}",
                             kafka={"bootstrap_servers": "127.0.0.1:9", "partitions": 1}))
    try:
        with pytest.raises(ChannelError, match="refused \\(the test's\\)"):
            await broker.startup()
    finally:
        await broker.shutdown()


async def test_the_brokers_topics_are_created_side_by_side_at_start(tmp_path: Path, subscriber: Subscriber,
                                                                     monkeypatch: pytest.MonkeyPatch) -> None:
    """One after another, a Kafka not answering held the start (the port closed, /healthz too)
    for its timeout once per broker: 3 brokers, 40 s."""
    import threading

    from pipelines.broker import kafka_channel

    monkeypatch.setattr(kafka_channel, "_TIMEOUT", 1.0)
    create_topic, trying, release = KafkaChannel._create_topic, [], threading.Event()

    def held(channel: KafkaChannel) -> None:  # each waits until every one is trying
        trying.append(channel.topic)
        release.wait(60)
        create_topic(channel)

    monkeypatch.setattr(KafkaChannel, "_create_topic", held)
    server = NoidaServer("kafka")  # its port, closed
    triggers = "triggers:\n" + "".join(f"  - {{name: t{i}, namespace: ns, broker: b{i}, subscriber: '{subscriber.url}'}}\n"
                                       for i in range(1, 4))
    broker = Broker(settings(tmp_path, channel="kafka", kafka={"bootstrap_servers": server.address, "partitions": 1}),
                    triggers=triggers)
    starting = asyncio.ensure_future(broker.startup())
    try:
        await until(lambda: len(trying) == 4, 30, "every broker's channel trying Kafka at once")
        release.set()
        await starting
        assert not broker.ready and len(broker.channels) == 4
    finally:
        release.set()
        await asyncio.wait((starting,))
        await broker.shutdown()


async def test_a_broker_whose_topic_kafka_cannot_name_is_a_config_error(
        tmp_path: Path, kafka_settings: dict[str, Any], subscriber: Subscriber) -> None:
    """Names valid alone (up to 253 characters) add up past Kafka's 249 for a topic: `check`
    refuses them, and a reload keeps the running triggers (it left a traceback and a producer)."""
    from infer_logger.errors import ConfigError

    long = "b" * 240
    path = tmp_path / "triggers.yaml"
    path.write_text(f"triggers: [{{name: a, subscriber: '{subscriber.url}'}}]\n")
    broker = Broker(settings(tmp_path, trigger_files=[path], **kafka_settings))
    await broker.startup()
    try:
        path.write_text(f"triggers: [{{name: a, broker: {long}, subscriber: '{subscriber.url}'}}]\n")
        with pytest.raises(ConfigError, match="topic"):
            broker.check()
        assert not await broker.reload()
        assert set(broker.channels) == {broker.default_key} and set(broker.triggers) == {("default", "a")}
        reloads = {s.labels["result"]: s.value for m in broker.metrics.reloads.collect() for s in m.samples
                   if s.name.endswith("_total")}
        assert reloads == {"error": 1.0}
    finally:
        await broker.shutdown()


@pytest.mark.parametrize(("triggers", "shared"), [
    # brokers a-x/c and a/x-c: one topic, and each delivered the other's events
    ("[{name: t1, namespace: a-x, broker: c, subscriber: 'http://s/'},"
     " {name: t2, namespace: a, broker: x-c, subscriber: 'http://s/'}]", "topic 'knative-broker-a-x-c'"),
    # triggers a-b/c and a/b-c: one consumer group (removing one deleted the other's offsets)
    ("[{name: c, namespace: a-b, subscriber: 'http://s/'},"
     " {name: b-c, namespace: a, subscriber: 'http://s/'}]", "consumer group 'knative-trigger-a-b-c'"),
])
def test_names_that_join_into_one_kafka_name_are_refused(tmp_path: Path, triggers: str, shared: str) -> None:
    from infer_logger.errors import ConfigError

    path = tmp_path / "triggers.yaml"
    path.write_text(f"triggers: {triggers}\n")
    broker = Broker(settings(tmp_path, trigger_files=[path], channel="kafka"))
    with pytest.raises(ConfigError, match=f"would share the Kafka {shared}"):
        broker.check()


async def test_a_trigger_stopped_on_a_stuck_event_does_not_deliver_the_settled_again(
        tmp_path: Path, kafka_settings: dict[str, Any], subscriber: Subscriber) -> None:
    """One event of a batch still in retries when the broker stops: it comes again after the
    restart, the nine the subscriber took do not (the whole batch did)."""
    triggers = f"""
triggers:
  - name: t
    subscriber: '{subscriber.url}'
    delivery: {{retry: 1000, backoffPolicy: linear, backoffDelay: PT0.05S}}
"""
    kafka = {**kafka_settings, "kafka": {**kafka_settings["kafka"], "partitions": 1}}  # one batch, in order
    subscriber.answer = lambda e, _: (503 if e is not None and e.id == "stuck" else 202, {}, b"")
    first = Broker(settings(tmp_path, drain_timeout=0.2, **kafka), triggers=triggers)
    await first.startup()
    try:
        batch = [to_dict(event(id_)) for id_ in ["stuck", *(f"e{i}" for i in range(9))]]
        async with client(first) as c:
            response = await c.post("/", content=orjson.dumps(batch),
                                    headers={"content-type": "application/cloudevents-batch+json"})
            assert response.status_code == 202, response.text
        await asyncio.to_thread(subscriber.wait_for, 9, 30)
    finally:
        await first.shutdown()

    subscriber.answer = None
    second = Broker(settings(tmp_path, **kafka), triggers=triggers)
    await second.startup()
    try:
        await until(lambda: "stuck" in {e.id for e in subscriber.events}, 30, "the stuck event")
        await _post(second, ["after"])
        await until(lambda: "after" in {e.id for e in subscriber.events}, 30, "a later event")
    finally:
        await second.shutdown()
    assert sorted(e.id for e in subscriber.events) == sorted(["stuck", "after", *(f"e{i}" for i in range(9))])


async def test_an_append_whose_caller_was_cancelled_leaves_the_others_answered() -> None:
    """Logic: a reply's delivery given up at a reload cancels its append mid-flush; answering it
    raised and ended the flush, and the appends flushed with it were never answered."""
    channel = KafkaChannel(KafkaChannelSettings(bootstrap_servers="127.0.0.1:9"), "default", "b")
    topic, flushing = MemorySink(), asyncio.Event()

    async def slow(events: Any) -> None:
        await flushing.wait()
        topic.events.extend(events)

    topic.send_batch = slow  # type: ignore[method-assign]
    channel._sink = Halving(topic)
    first = asyncio.ensure_future(channel.append([event("a")]))
    second = asyncio.ensure_future(channel.append([event("b")]))
    await asyncio.sleep(0.01)  # both in the flush
    first.cancel()
    flushing.set()
    await asyncio.wait_for(second, 30)
    third = asyncio.ensure_future(channel.append([event("c")]))
    await asyncio.wait_for(third, 30)
    assert [e.id for e in topic.events] == ["a", "b", "c"] and first.cancelled()


@pytest.fixture
def own_kafka(monkeypatch: pytest.MonkeyPatch) -> Any:
    """A Kafka of the test's own, to stop and start; quick timeouts while it is down."""
    monkeypatch.setattr(kafka_channel, "_TIMEOUT", 2.0)
    monkeypatch.setattr(kafka_channel, "_RECONNECT_MAX", 1.0)
    server = NoidaServer("kafka").start()
    yield server
    server.stop()


async def _post_until_taken(broker: Broker, id_: str) -> None:
    async with client(broker) as c:
        deadline = time.monotonic() + 60
        while (await c.post("/", **binary_request(event(id_)))).status_code != 202:  # a sender retries a 503
            assert time.monotonic() < deadline, f"{id_} not taken in 60 s"
            await asyncio.sleep(0.2)


async def test_a_trigger_added_while_kafka_is_down_starts_at_the_events_sent_since(
        tmp_path: Path, own_kafka: NoidaServer, subscriber: Subscriber, other_subscriber: Subscriber) -> None:
    """Its group could not be placed at the topic's end: it started at the topic's start once
    Kafka was back, and the new trigger got every event sent before it existed."""
    path = tmp_path / "triggers.yaml"
    path.write_text(f"triggers: [{{name: old, subscriber: '{subscriber.url}'}}]\n")
    broker = Broker(settings(tmp_path, trigger_files=[path], channel="kafka", name="late",
                             kafka={"bootstrap_servers": own_kafka.address, "partitions": 2}))
    await broker.startup()
    try:
        await _post(broker, [f"before{i}" for i in range(5)])
        await asyncio.to_thread(subscriber.wait_for, 5, 30)
        own_kafka.stop(keep_data=True)
        path.write_text(f"triggers: [{{name: old, subscriber: '{subscriber.url}'}}, "
                        f"{{name: new, subscriber: '{other_subscriber.url}'}}]\n")
        assert await broker.reload()
        own_kafka.start(fresh=False)
        await _post_until_taken(broker, "after")  # taken as soon as Kafka is back, maybe before the group's placing
        await asyncio.to_thread(other_subscriber.wait_for, 1, 60)
        await _post(broker, ["later"])
        await asyncio.to_thread(other_subscriber.wait_for, 2, 30)
    finally:
        await broker.shutdown()
    assert sorted(e.id for e in other_subscriber.events) == ["after", "later"]


async def test_triggers_removed_while_kafka_is_reached_at_start_do_not_run(
        tmp_path: Path, own_kafka: NoidaServer, subscriber: Subscriber) -> None:
    """Kafka down at start, triggers waiting: a reload once it answers removed those the channel
    was attaching (found in no table): they ran on, untracked, past the broker's stop."""
    own_kafka.stop(keep_data=True)
    path = tmp_path / "triggers.yaml"
    path.write_text("triggers:\n" + "".join(f"  - {{name: t{i}, subscriber: '{subscriber.url}'}}\n" for i in range(8)))
    broker = Broker(settings(tmp_path, trigger_files=[path], channel="kafka", name="connecting",
                             kafka={"bootstrap_servers": own_kafka.address, "partitions": 1}))
    await broker.startup()
    channel = _channel(broker)
    try:
        path.write_text(f"triggers: [{{name: t0, subscriber: '{subscriber.url}'}}]\n")
        own_kafka.start(fresh=False)
        await until(lambda: channel._reached, 60, "Kafka answering")
        assert await broker.reload()  # while the channel attaches the eight
        await until(lambda: channel.ready, 60, "the channel ready")
        assert set(channel._sources) == {"t0"}
        await _post(broker, ["e1"])
        await asyncio.to_thread(subscriber.wait_for, 1, 30)
    finally:
        await broker.shutdown()
    assert not [t.get_name() for t in asyncio.all_tasks() if t.get_name().startswith("trigger:")]
    assert [e.id for e in subscriber.events] == ["e1"]


async def test_a_stop_while_kafka_is_unreachable_returns(tmp_path: Path, own_kafka: NoidaServer,
                                                         subscriber: Subscriber) -> None:
    """A commit waits for the coordinator up to session.timeout.ms (5 min here), and the
    consumer's close commits again: the broker's stop waited for that (or for ever, when it
    cancelled the source inside the close, which then never said it was done)."""
    subscriber.delay = 1.5
    broker = Broker(settings(tmp_path, channel="kafka", name="unreachable", drain_timeout=1.0,
                             kafka={"bootstrap_servers": own_kafka.address, "partitions": 1,
                                    "config": {"socket.timeout.ms": 3000, "session.timeout.ms": 300_000}}),
                    triggers=f"triggers: [{{name: t, subscriber: '{subscriber.url}'}}]")
    await broker.startup()
    source = _channel(broker)._sources["t"][0]
    stopped = False
    try:
        await _post(broker, ["e1"])
        await asyncio.to_thread(subscriber.wait_for_requests, 1, 30)
        own_kafka.stop(keep_data=True)  # while e1 is delivered: its commit fails
        await until(lambda: bool(source._uncommitted), 60, "the commit failing")
        try:
            await asyncio.wait_for(broker.shutdown(), 90)  # a hang guard
        except TimeoutError:
            pytest.fail("the broker's stop did not return with Kafka unreachable")
        stopped = True
    finally:
        if not stopped:
            await broker.shutdown()
        # The consumer left closing waits for Kafka (its commit up to the 5 min session timeout),
        # and the process's exit for its thread: Kafka back, it ends.
        if own_kafka.proc is None:  # stopped above (a second start beside a live one would leak it)
            own_kafka.start(fresh=False)
        await asyncio.wait_for(asyncio.to_thread(source._thread.shutdown, True), 60)


def _placing_fails(channel: KafkaChannel, until_: Callable[[int], bool]) -> None:
    """The channel's group placing fails as with Kafka unreachable while `until_(call number)`."""
    placing, calls = channel._start_at_end, itertools.count(1)

    def start_at_end(group: str, since: float | None = None) -> None:
        if until_(next(calls)):
            raise KafkaException(KafkaError(KafkaError._TRANSPORT, "unreachable (the test's)"))
        placing(group, since)

    channel._start_at_end = start_at_end  # type: ignore[method-assign]


@pytest.mark.parametrize("down_at_the_reload", [False, True])
async def test_a_trigger_changed_before_its_group_was_placed_gets_the_events_since_it_was_added(
        kafka_bootstrap: str, down_at_the_reload: bool) -> None:
    """The reload started it afresh: at the topic's end (or at a new time), and the events sent
    since the trigger was first added never reached it."""
    channel = KafkaChannel(KafkaChannelSettings(bootstrap_servers=kafka_bootstrap, partitions=1),
                           "default", f"b{next(_names)}-{uuid.uuid4().hex[:8]}")
    await channel.start()
    down = [True]
    _placing_fails(channel, lambda _: down[0])
    first, second = Handler(), Handler()
    try:
        await channel.attach("t", first)
        assert "t" in channel._starting
        await channel.append([event(f"e{i}") for i in range(5)])
        down[0] = down_at_the_reload
        await channel.replace("t", second, timeout=1.0)
        down[0] = False
        await channel.append([event("after")])
        await until(lambda: "after" in second.got, 60, "the event after")
    finally:
        await channel.aclose(1.0)
    assert sorted(first.got + second.got) == ["after", *(f"e{i}" for i in range(5))]


async def test_a_trigger_removed_while_its_group_is_placed_starts_afresh_when_added_back(
        kafka_bootstrap: str) -> None:
    """The placing in flight committed the group's offsets after the removal, which kept the
    group: the trigger added back got the events sent while it did not exist."""
    channel = KafkaChannel(KafkaChannelSettings(bootstrap_servers=kafka_bootstrap, partitions=1),
                           "default", f"b{next(_names)}-{uuid.uuid4().hex[:8]}")
    await channel.start()
    placing = threading.Event()

    def slow_second(call: int) -> bool:  # the first fails, the second takes a while
        if call == 2:
            placing.set()
            time.sleep(1.5)
        return call == 1

    _placing_fails(channel, slow_second)
    again = Handler()
    try:
        await channel.attach("t", Handler())
        await channel.append([event(f"e{i}") for i in range(3)])
        await asyncio.to_thread(placing.wait, 30)
        await channel.detach("t", forget=True, timeout=1.0)
        await channel.append([event(f"while-removed{i}") for i in range(3)])
        await channel.attach("t", again)
        await channel.append([event("after")])
        await until(lambda: "after" in again.got, 60, "the event after")
    finally:
        await channel.aclose(1.0)
    assert again.got == ["after"]


async def test_a_trigger_removed_before_any_placing_ran_is_removed_at_once(kafka_bootstrap: str) -> None:
    """No group to delete: deleting it anyway took a timeout per trigger with Kafka down (the
    usual reason a trigger is not placed yet), the reload holding the channel meanwhile."""
    channel = KafkaChannel(KafkaChannelSettings(bootstrap_servers=kafka_bootstrap, partitions=1),
                           "default", f"b{next(_names)}-{uuid.uuid4().hex[:8]}")
    await channel.start()
    _placing_fails(channel, lambda _: True)
    deleted: list[str] = []
    channel._delete_group = deleted.append  # type: ignore[method-assign,assignment]
    try:
        for name in ("a", "b"):
            await channel.attach(name, Handler())
        await asyncio.sleep(1.5)  # a placing retried (and failed) meanwhile
        for name in ("a", "b"):
            await channel.detach(name, forget=True, timeout=1.0)
    finally:
        await channel.aclose(1.0)
    assert deleted == [] and not channel._starting


async def test_a_trigger_removed_while_a_placing_fails_deletes_no_group(own_kafka: NoidaServer) -> None:
    """With Kafka down, a placing job runs most of the time (each waits out a timeout): one
    running at the removal had the group deleted after it, a second timeout on the reload."""
    channel = KafkaChannel(KafkaChannelSettings(bootstrap_servers=own_kafka.address, partitions=1),
                           "default", f"b{next(_names)}-{uuid.uuid4().hex[:8]}")
    await channel.start()
    deleted: list[str] = []
    channel._delete_group = deleted.append  # type: ignore[method-assign,assignment]
    own_kafka.stop(keep_data=True)
    try:
        await channel.attach("t", Handler())  # its placing fails: waits
        await until(lambda: "t" in channel._placing and channel._placing["t"].running(), 60, "a placing job running")
        await channel.detach("t", forget=True, timeout=1.0)
    finally:
        await channel.aclose(1.0)
    assert deleted == []


async def test_kafka_stalling_at_a_groups_placing_holds_no_trigger_change(
        own_kafka: NoidaServer, monkeypatch: pytest.MonkeyPatch) -> None:
    """Kafka froze (no reset, no timeout) as a new trigger's group got its start offsets: a
    consumer's commit (how they were written) waits for ever, and with it the attach, every later
    trigger change and the broker's stop (under the triggers lock), then the process's exit."""
    stalled = threading.Event()

    def stall() -> None:  # the step that writes the group's offsets: Kafka freezes just then
        if not stalled.is_set():
            stalled.set()
            own_kafka.pause()

    class StallingAdmin(AdminClient):  # type: ignore[misc]
        def alter_consumer_group_offsets(self, *args: Any, **kwargs: Any) -> Any:
            stall()
            return super().alter_consumer_group_offsets(*args, **kwargs)

    channel = KafkaChannel(KafkaChannelSettings(bootstrap_servers=own_kafka.address, partitions=1),
                           "default", f"b{next(_names)}-{uuid.uuid4().hex[:8]}")
    await channel.start()
    monkeypatch.setattr(kafka_channel, "AdminClient", StallingAdmin)
    handler = Handler()
    try:
        try:
            await asyncio.wait_for(channel.attach("t", handler), 60)  # a hang guard
        except TimeoutError:
            pytest.fail("the attach still waits for the frozen Kafka 60 s on")
        assert stalled.is_set() and "t" in channel._starting  # placed later
        own_kafka.resume()
        await channel.append([event("after")])
        await until(lambda: handler.got == ["after"], 60, "the trigger placed, then the event")
    finally:
        own_kafka.resume()
        try:
            await asyncio.wait_for(channel.aclose(1.0), 60)
        except TimeoutError:
            pytest.fail("the channel's close still waits for the frozen Kafka 60 s on")


async def test_a_broker_removed_while_its_channel_waits_for_kafka_is_closed_without_waiting(
        tmp_path: Path, kafka_bootstrap: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """The reload closed its channel, whose executor's shutdown waited, on the event loop, for the
    job in hand (up to its Kafka timeouts): every broker's ingress and deliveries stood still."""
    entered, release, ended = threading.Event(), threading.Event(), threading.Event()
    create_topic, calls = KafkaChannel._create_topic, itertools.count()

    def stuck_for_b2(channel: KafkaChannel) -> None:
        # Its topic only: the default broker's random name held "b2" in one run of 40, its channel
        # then took the first call, b2's startup the stuck second, and the reload looked slow.
        if not channel.topic.endswith("-b2"):
            return create_topic(channel)
        if next(calls):  # the second try waits for a Kafka that does not answer
            entered.set()
            release.wait(30)  # a bound, in case the loop waits for it
            ended.set()
        raise kafka_channel._UnreachableError("unreachable (the test's)")

    monkeypatch.setattr(KafkaChannel, "_create_topic", stuck_for_b2)
    path = tmp_path / "triggers.yaml"
    path.write_text("triggers: []\nbrokers: [{name: b2}]\n")
    broker = Broker(settings(tmp_path, trigger_files=[path], channel="kafka", name=f"r{uuid.uuid4().hex[:8]}",
                             kafka={"bootstrap_servers": kafka_bootstrap, "partitions": 1}))
    await broker.startup()
    try:
        assert len(broker.channels) == 2
        assert await asyncio.to_thread(entered.wait, 30), "b2's channel never tried again"
        path.write_text("triggers: []\n")
        assert await broker.reload()
        assert not ended.is_set(), "the reload waited for the channel's job"
        assert len(broker.channels) == 1
    finally:
        release.set()
        await broker.shutdown()


async def test_a_trigger_detached_does_not_wait_for_another_ones_drain(kafka_bootstrap: str) -> None:
    """One lock for every trigger: a reload removing triggers side by side still removed them one
    after another, each waiting for its deliveries in flight (or, Kafka down, its timeouts)."""

    class Gated(Handler):
        def __init__(self) -> None:
            super().__init__()
            self.gate = asyncio.Event()

        async def deliver(self, event: Any) -> None:
            self.got.append(event.id)
            await self.gate.wait()

    channel = KafkaChannel(KafkaChannelSettings(bootstrap_servers=kafka_bootstrap, partitions=1),
                           "default", f"b{next(_names)}-{uuid.uuid4().hex[:8]}")
    await channel.start()
    slow, quick = Gated(), Handler()
    slow_detach = None
    try:
        await channel.attach("slow", slow)
        await channel.attach("quick", quick)
        await channel.append([event("e1")])
        await until(lambda: slow.got == ["e1"] and quick.got == ["e1"], 60, "both triggers delivering")
        slow_detach = asyncio.create_task(channel.detach("slow", forget=True, timeout=120.0))
        await asyncio.sleep(0)  # it holds its trigger's lock, waiting for the delivery held
        try:
            await asyncio.wait_for(channel.detach("quick", forget=True, timeout=120.0), 60)  # a hang guard
        except TimeoutError:
            pytest.fail("the quick trigger's detach waited for the slow one's")
        assert not slow_detach.done()
        slow.gate.set()
        await asyncio.wait_for(slow_detach, 60)
        assert set(channel._sources) == set()
    finally:
        slow.gate.set()
        if slow_detach is not None:
            await asyncio.gather(slow_detach, return_exceptions=True)
        await channel.aclose(1.0)


async def test_a_records_other_headers_are_not_sent_to_the_subscriber(
        tmp_path: Path, kafka_settings: dict[str, Any], subscriber: Subscriber) -> None:
    """A record's headers other than the binding's went to the subscriber as HTTP headers: a
    second content-length, an authorization, a `ce-type` over the event's; one holding a line
    break or a character past Latin-1 failed every attempt, the event given up."""
    from confluent_kafka import Producer

    broker = Broker(settings(tmp_path, **{**kafka_settings, "kafka": {**kafka_settings["kafka"], "partitions": 1}}),
                    triggers=f"triggers: [{{name: t, subscriber: '{subscriber.url}'}}]")
    await broker.startup()
    try:
        binding = [("ce_specversion", b"1.0"), ("ce_source", b"/s"), ("ce_type", b"real.type"),
                   ("content-type", b"application/json")]
        foreign = {"spoofed": [("ce-type", b"spoofed.type"), ("content-length", b"0"), ("authorization", b"Bearer x")],
                   "euro": [("x-note", "price \u20ac5".encode())], "crlf": [("x-note", b"a\r\nb")], "plain": []}
        producer = Producer({"bootstrap.servers": kafka_settings["kafka"]["bootstrap_servers"]})
        for id_, extra in foreign.items():
            producer.produce(_channel(broker).topic, b'{"a":1}', id_.encode(),
                             headers=[*binding, ("ce_id", id_.encode()), *extra])
        assert producer.flush(30) == 0
        await asyncio.to_thread(subscriber.wait_for, 4, 30)
    finally:
        await broker.shutdown()
    assert sorted(e.id for e in subscriber.events) == sorted(foreign)
    assert {e.type for e in subscriber.events} == {"real.type"}
    assert not [h for h, _ in subscriber.requests if "authorization" in h or "x-note" in h]

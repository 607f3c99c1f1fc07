"""The ingress: content modes, errors (400 with the reason, 413, 404, 405, 503), the TTL it stamps
and enforces, pass-through headers, and the CloudEvents conformance events delivered unchanged."""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Any

import orjson
import pytest
import yaml

from infer_logger.cloudevents.event import CloudEvent
from infer_logger.cloudevents.http import to_batch, to_binary, to_structured
from infer_logger.testing import free_port
from pipelines.broker import Broker, BrokerThread
from tests.conformance import ROOT, reason

from .conftest import MakeBroker
from .helpers import Subscriber, binary_request, client, event, refused_by, settings, settle

CATCH_ALL = "triggers: [{{name: all, subscriber: '{url}'}}]"


class TestModes:
    """Binary, structured and batch mode are taken and delivered (as binary) unchanged."""

    async def test_three_modes(self, make_broker: MakeBroker, subscriber: Subscriber) -> None:
        broker = await make_broker(CATCH_ALL.format(url=subscriber.url))
        sent = [event("b"), event("s", data=b'"text"'), event("x1"), event("x2", data=None)]
        async with client(broker) as c:
            for headers, body in (to_binary(sent[0]), to_structured(sent[1]), to_batch(sent[2:])):
                assert (await c.post("/", headers=headers, content=body)).status_code == 202
        received = await asyncio.to_thread(subscriber.wait_for, 4)
        assert sorted((e.attributes["id"], e.attributes, e.data) for e in received) == sorted(
            (e.attributes["id"], e.attributes, e.data) for e in sent)

    async def test_named_broker_path(self, make_broker: MakeBroker, subscriber: Subscriber) -> None:
        triggers = f"triggers: [{{name: a, namespace: ml, broker: b1, subscriber: '{subscriber.url}'}}]"
        broker = await make_broker(triggers)
        async with client(broker) as c:
            assert (await c.post("/ml/b1", **binary_request(event()))).status_code == 202
            assert (await c.post("/", **binary_request(event("2")))).status_code == 202  # the default broker
            response = await c.post("/ml/nope", **binary_request(event()))
        assert response.status_code == 404 and "no broker ml/nope" in response.json()["error"]
        await asyncio.to_thread(subscriber.wait_for, 1)
        await settle(broker, "a", 1, namespace="ml")
        assert [e.id for e in subscriber.events] == ["1"]


class TestRefusals:
    async def test_invalid_event_names_the_attribute(self, make_broker: MakeBroker) -> None:
        broker = await make_broker()
        async with client(broker) as c:
            response = await c.post("/", headers={"ce-specversion": "1.0", "ce-id": "1", "ce-type": "t"})
            bad_time = await c.post("/", **binary_request(event(time="yesterday")))
            batch = await c.post("/", headers={"content-type": "application/cloudevents-batch+json"},
                                 content=orjson.dumps([{"specversion": "1.0", "id": "1", "source": "/s", "type": "t"},
                                                       {"specversion": "1.0", "id": "2", "type": "t"}]))
        assert response.status_code == 400 and response.json()["attribute"] == "source"
        assert bad_time.status_code == 400 and bad_time.json()["attribute"] == "time"
        assert batch.status_code == 400 and batch.json()["attribute"] == "source"
        # Which of the batch's events (nothing of it stored: no `refused`, no positions header)
        assert batch.json()["item"] == 1 and "batch item 1" in batch.json()["error"]
        assert "refused" not in batch.json() and "infer-logger-positions" not in batch.headers
        assert "item" not in response.json()
        assert broker.metrics.accepted.labels("default/default")._value.get() == 0

    @pytest.mark.parametrize(("second", "attribute"), [
        ({"specversion": "1.0", "id": "2", "source": "/s", "type": "t", "knativebrokerttl": "abc"},
         "knativebrokerttl"),  # read as the broker admits it, after the batch was decoded
        (7, None),  # no event at all: no attribute to name
    ], ids=["bad-ttl", "not-an-object"])
    async def test_a_batch_refused_for_one_event_names_its_position(self, make_broker: MakeBroker,
                                                                   second: object, attribute: str | None) -> None:
        broker = await make_broker()
        first = {"specversion": "1.0", "id": "1", "source": "/s", "type": "t"}
        async with client(broker) as c:
            batch = await c.post("/", headers={"content-type": "application/cloudevents-batch+json"},
                                 content=orjson.dumps([first, second]))
            single = await c.post("/", headers={"content-type": "application/cloudevents+json"},
                                  content=orjson.dumps(second))
        assert batch.status_code == 400 and batch.json()["item"] == 1, batch.text
        assert batch.json().get("attribute") == attribute and "batch item 1" in batch.json()["error"]
        assert ": :" not in batch.json()["error"]
        assert single.status_code == 400 and "item" not in single.json() and single.json().get("attribute") == attribute
        assert broker.metrics.accepted.labels("default/default")._value.get() == 0

    async def test_oversize(self, make_broker: MakeBroker) -> None:
        broker = await make_broker(max_event_bytes=1000, max_request_bytes=5000)
        big = event(data=b'"' + b"x" * 2000 + b'"')
        async with client(broker) as c:
            binary = await c.post("/", **binary_request(big))
            structured = await c.post("/", headers=to_structured(big)[0], content=to_structured(big)[1])
            batch = await c.post("/", headers=to_batch([event(), big])[0], content=to_batch([event(), big])[1])
            small_batch = await c.post("/", headers=to_batch([event()])[0], content=to_batch([event()])[1])
        assert (binary.status_code, structured.status_code, batch.status_code) == (413, 413, 413)
        assert small_batch.status_code == 202

    async def test_a_batch_with_an_event_over_the_limit_stores_the_others_and_names_it(
            self, make_broker: MakeBroker, subscriber: Subscriber) -> None:
        """One event over max_event_bytes refused its whole batch with a bare 413: our http sink
        then halved the batch down to the event alone, a POST per halving for one event."""
        broker = await make_broker(CATCH_ALL.format(url=subscriber.url), max_event_bytes=1000,
                                   max_request_bytes=10_000)
        huge = b'"' + b"x" * 2000 + b'"'
        sent = [event("a"), event("big1", data=huge), event("b"), event("big2", data=huge)]
        async with client(broker) as c:
            mixed = await c.post("/", headers=to_batch(sent)[0], content=to_batch(sent)[1])
            alone = await c.post("/", headers=to_batch(sent[1:2])[0], content=to_batch(sent[1:2])[1])
            # Looked up only where events were published: an empty batch to no broker was a 202, this one a 413.
            nowhere = [await c.post("/ml/nope", headers=to_batch(batch)[0], content=to_batch(batch)[1])
                       for batch in ([], sent[1:2])]
            # One event (binary, structured) over the limit to no broker was a 413: dead-lettered by its sender.
            nowhere += [await c.post("/ml/nope", **binary_request(sent[1])),
                        await c.post("/ml/nope", headers=to_structured(sent[1])[0], content=to_structured(sent[1])[1])]
            past = [event(f"p{i}", data=huge) for i in range(6)]  # a batch over max_request_bytes
            nowhere.append(await c.post("/ml/nope", headers=to_batch(past)[0], content=to_batch(past)[1]))
            nowhere.append(await c.post("/ml/nope", headers={"content-type": "application/cloudevents-batch+json"},
                                        content=b'[{"specversion": "1.0", "source": "/s", "type": "t"}]'))  # no id
        assert [r.status_code for r in nowhere] == [404, 404, 404, 404, 404, 404]
        assert mixed.status_code == 413 and mixed.json()["refused"] == [1, 3], mixed.text
        assert mixed.headers["infer-logger-positions"] == "1"
        assert alone.status_code == 413 and alone.json()["refused"] == [0], alone.text
        await asyncio.to_thread(subscriber.wait_for, 2)
        await settle(broker, "all", 2)
        assert [e.id for e in subscriber.events] == ["a", "b"]
        assert broker.metrics.refused.labels("oversize")._value.get() == 3
        assert broker.metrics.refused.labels("unknown_broker")._value.get() == 5
        assert broker.metrics.accepted.labels("default/default")._value.get() == 2

    def test_an_http_sink_sends_a_batch_with_an_event_over_the_limit_once(
            self, tmp_path: Path, subscriber: Subscriber) -> None:
        """The sink in batch mode in front of the broker: the oversized event is refused by the
        one POST (counted once), not by each POST of the halves that found it."""
        broker = Broker(settings(tmp_path, max_event_bytes=1000),
                        triggers=CATCH_ALL.format(url=subscriber.url))
        batch = [event(f"p{i}") for i in range(10)]
        batch[4] = event("p4", data=b'"' + b"x" * 2000 + b'"')
        with BrokerThread(broker, port=free_port()) as running:
            refused = refused_by(running.url, batch)
            subscriber.wait_for(9, 30)
        assert refused.events == [batch[4]] and refused.too_large
        assert sorted(e.id for e in subscriber.events) == sorted(f"p{i}" for i in range(10) if i != 4)
        assert broker.metrics.refused.labels("oversize")._value.get() == 1

    async def test_a_batch_with_an_event_over_the_limit_and_a_full_log_asks_for_both_again(
            self, make_broker: MakeBroker, subscriber: Subscriber) -> None:
        """The log refusing the others for now (503) names the oversized one pending too: named
        neither way, a sender reading the positions takes it as stored."""
        subscriber.fail_with = 503  # nothing is delivered: the log holds what it took
        triggers = f"triggers: [{{name: t, subscriber: '{subscriber.url}', delivery: {{retry: 100}}}}]"
        broker = await make_broker(triggers, channel="memory", spool={"memory_max_events": 1},
                                   max_event_bytes=1000, max_request_bytes=10_000)
        sent = [event("a"), event("big", data=b'"' + b"x" * 2000 + b'"'), event("b")]
        async with client(broker) as c:
            answer = await c.post("/", headers=to_batch(sent)[0], content=to_batch(sent)[1])
        assert answer.status_code == 503 and answer.json()["pending"] == [1, 2], answer.text
        # Each is counted for what the answer says: the oversized one when it is refused.
        refused = broker.metrics.refused
        assert (refused.labels("unavailable")._value.get(), refused.labels("oversize")._value.get()) == (2, 0)

    async def test_an_event_over_the_limit_by_its_attributes_is_413_in_every_mode(
            self, make_broker: MakeBroker, subscriber: Subscriber) -> None:
        """Binary mode weighed only the body: an event over max_event_bytes by an extension
        attribute (its headers) was stored, the same event in structured mode a 413."""
        broker = await make_broker(CATCH_ALL.format(url=subscriber.url), max_event_bytes=16 * 1024)
        big = event("big", bigext="x" * (20 * 1024))
        async with client(broker) as c:
            binary = await c.post("/", **binary_request(big))
            structured = await c.post("/", headers=to_structured(big)[0], content=to_structured(big)[1])
            fits = await c.post("/", **binary_request(event("fits", bigext="x" * (15 * 1024))))
        assert (binary.status_code, structured.status_code, fits.status_code) == (413, 413, 202), binary.text
        assert "16384 bytes" in binary.json()["error"]
        await asyncio.to_thread(subscriber.wait_for, 1)
        await settle(broker, "all", 1)
        assert [e.id for e in subscriber.events] == ["fits"]

    @pytest.mark.parametrize("coding", ["gzip", "br", "GZIP", "identity, gzip"])
    async def test_a_content_encoding_is_415_in_every_mode(self, make_broker: MakeBroker, subscriber: Subscriber,
                                                            coding: str) -> None:
        """A gzip-coded binary body was stored as the event's data (a subscriber got gzip bytes
        labelled application/json), a structured one was a 400 "not valid JSON": no coding is decoded."""
        import gzip

        broker = await make_broker(CATCH_ALL.format(url=subscriber.url))
        coded = {"content-encoding": coding}
        async with client(broker) as c:
            answers = []
            for headers, body in (to_binary(event("b")), to_structured(event("s")), to_batch([event("x")])):
                answers.append(await c.post("/", headers={**headers, **coded}, content=gzip.compress(body)))
            plain = await c.post("/", **binary_request(event("plain"), **{"content-encoding": "identity"}))
        for answer in answers:
            assert answer.status_code == 415, answer.text
            assert "Content-Encoding" in answer.json()["error"] and answer.json()["status"] == 415
        assert plain.status_code == 202
        await asyncio.to_thread(subscriber.wait_for, 1)
        await settle(broker, "all", 1)
        assert [e.id for e in subscriber.events] == ["plain"]
        assert broker.metrics.accepted.labels("default/default")._value.get() == 1

    async def test_methods(self, make_broker: MakeBroker) -> None:
        broker = await make_broker()
        async with client(broker) as c:
            get = await c.get("/")
            options = await c.options("/default/default")
            nowhere = await c.post("/a/b/c", **binary_request(event()))
        assert get.status_code == 405 and "POST" in get.headers["allow"]
        assert options.status_code == 200 and "POST" in options.headers["allow"]
        assert nowhere.status_code == 404

    async def test_full_log_is_503(self, make_broker: MakeBroker, subscriber: Subscriber) -> None:
        subscriber.fail_with = 503  # its trigger keeps retrying: the log keeps what it has not delivered
        triggers = f"triggers: [{{name: t, subscriber: '{subscriber.url}', delivery: {{retry: 100}}}}]"
        broker = await make_broker(triggers, channel="memory", spool={"memory_max_events": 2})
        async with client(broker) as c:
            statuses = [(await c.post("/", **binary_request(event(str(i))))).status_code for i in range(3)]
        assert statuses == [202, 202, 503]

    async def test_a_memory_log_past_max_bytes_is_503(self, make_broker: MakeBroker, subscriber: Subscriber) -> None:
        subscriber.fail_with = 503  # nothing is delivered: the log holds all it took, in memory
        triggers = f"triggers: [{{name: t, subscriber: '{subscriber.url}', delivery: {{retry: 100}}}}]"
        # The smallest log there may be: 4 events of the largest size.
        broker = await make_broker(triggers, channel="memory", spool={"max_bytes": 4000}, max_event_bytes=1000)
        big = b'"' + b"x" * 900 + b'"'
        async with client(broker) as c:
            statuses = [(await c.post("/", **binary_request(event(str(i), data=big)))).status_code for i in range(5)]
        assert statuses == [202, 202, 202, 503, 503]

    async def test_a_batch_the_log_took_in_part_names_the_events_to_send_again(
            self, make_broker: MakeBroker, subscriber: Subscriber) -> None:
        """A log full after two events of a batch of five: the 503 did not say that two were
        stored, and a sender that sent the batch again made duplicates of those two. An event
        whose TTL ran out (not stored, not to be sent again) keeps its position."""
        subscriber.fail_with = 503
        triggers = f"triggers: [{{name: t, subscriber: '{subscriber.url}', delivery: {{retry: 100}}}}]"
        broker = await make_broker(triggers, channel="memory", spool={"memory_max_events": 2})
        batch = [event("0"), event("expired", knativebrokerttl=1), *(event(str(i)) for i in range(1, 4))]
        async with client(broker) as c:
            response = await c.post("/", headers=to_batch(batch)[0], content=to_batch(batch)[1])
        assert response.status_code == 503 and response.json()["pending"] == [3, 4], response.text
        assert response.headers["infer-logger-positions"] == "1"
        metrics = broker.metrics
        assert metrics.accepted.labels("default/default")._value.get() == 2
        assert [metrics.refused.labels(r)._value.get() for r in ("ttl_expired", "unavailable")] == [1, 2]
        async with client(broker) as c:  # nothing stored: all admitted pending (the expired one counted once)
            response = await c.post("/", headers=to_batch(batch)[0], content=to_batch(batch)[1])
        assert response.status_code == 503 and response.json()["pending"] == [0, 2, 3, 4], response.text
        assert [metrics.refused.labels(r)._value.get() for r in ("ttl_expired", "unavailable")] == [2, 6]

    async def test_a_broker_without_triggers_keeps_nothing(self, make_broker: MakeBroker) -> None:
        broker = await make_broker(channel="memory", spool={"memory_max_events": 2})
        async with client(broker) as c:
            statuses = [(await c.post("/", **binary_request(event(str(i))))).status_code for i in range(5)]
        assert statuses == [202] * 5


class TestTtl:
    """`knativebrokerttl`: stamped, taken one off per pass through a broker, never shown to subscribers."""

    async def test_stamped_and_hidden(self, make_broker: MakeBroker, subscriber: Subscriber) -> None:
        broker = await make_broker(CATCH_ALL.format(url=subscriber.url) + "\n", default_ttl=7)
        seen: list[Any] = []
        original = broker.channels[("default", "default")].append

        async def spy(events: Any) -> None:
            seen.extend(e.attributes["knativebrokerttl"] for e in events)
            await original(events)

        broker.channels[("default", "default")].append = spy  # type: ignore[method-assign]
        async with client(broker) as c:
            await c.post("/", **binary_request(event("a")))
            await c.post("/", **binary_request(event("b", knativebrokerttl=5)))
            dropped = await c.post("/", **binary_request(event("c", knativebrokerttl=1)))
            bad = await c.post("/", **binary_request(event("d", knativebrokerttl="many")))
        assert seen == [7, 4] and dropped.status_code == 202 and bad.status_code == 400
        received = await asyncio.to_thread(subscriber.wait_for, 2)
        assert all("knativebrokerttl" not in e.attributes for e in received)
        assert broker.metrics.refused.labels("ttl_expired")._value.get() == 1

    async def test_out_of_range_is_400_and_a_batch_is_taken_whole_or_not(self, make_broker: MakeBroker,
                                                                          subscriber: Subscriber) -> None:
        """A TTL over 64 bits was a 500 (the log could not encode it), after the batch's first
        events had been stored; over 32 bits is no CloudEvents Integer; a boolean is no integer."""
        broker = await make_broker(CATCH_ALL.format(url=subscriber.url))
        async with client(broker) as c:
            for ttl in ("18446744073709551617", "2147483648", "1_0", " +5 ", "\u0663", "9" * 5000):
                r = await c.post("/", **binary_request(event("big", knativebrokerttl=ttl)))
                assert r.status_code == 400 and r.json()["attribute"] == "knativebrokerttl", r.text
            batch = [{"specversion": "1.0", "id": "b1", "source": "/s", "type": "t"},
                     {"specversion": "1.0", "id": "b2", "source": "/s", "type": "t", "knativebrokerttl": True}]
            r = await c.post("/", headers={"content-type": "application/cloudevents-batch+json"},
                             content=orjson.dumps(batch))
            assert r.status_code == 400 and r.json()["attribute"] == "knativebrokerttl", r.text
            # An expired event ahead of a bad TTL: the batch is refused, each event counted once
            # (the expired one was counted ttl_expired too).
            batch[0]["knativebrokerttl"] = 1
            r = await c.post("/", headers={"content-type": "application/cloudevents-batch+json"},
                             content=orjson.dumps(batch))
            assert r.status_code == 400
            assert broker.metrics.refused.labels("ttl_expired")._value.get() == 0
            long_five = binary_request(event("long", knativebrokerttl="0" * 5000 + "5"))  # int() alone raised
            assert (await c.post("/", **long_five)).status_code == 202
            assert (await c.post("/", **binary_request(event("fence")))).status_code == 202
        await asyncio.to_thread(subscriber.wait_for, 2)
        await asyncio.sleep(0.2)
        assert [e.id for e in subscriber.events] == ["long", "fence"]


class TestHeaders:
    async def test_pass_through_allow_list(self, make_broker: MakeBroker, subscriber: Subscriber) -> None:
        broker = await make_broker(CATCH_ALL.format(url=subscriber.url))
        async with client(broker) as c:
            await c.post("/", **binary_request(event(), **{
                "X-Request-Id": "r1", "Knative-Foo": "k", "X-B3-TraceId": "b3", "Foo": "no", "Traceparent": "0"}))
        headers, _ = (await asyncio.to_thread(subscriber.wait_for_requests, 1))[0]
        assert (headers["x-request-id"], headers["knative-foo"], headers["x-b3-traceid"]) == ("r1", "k", "b3")
        assert "foo" not in headers and "traceparent" not in headers and headers["prefer"] == "reply"


class TestAdmin:
    async def test_health_ready_metrics(self, make_broker: MakeBroker, subscriber: Subscriber) -> None:
        broker = await make_broker(CATCH_ALL.format(url=subscriber.url))
        async with client(broker) as c:
            await c.post("/", **binary_request(event()))
            await asyncio.to_thread(subscriber.wait_for, 1)
            await settle(broker, "all", 1)
            health, ready, metrics = await c.get("/healthz"), await c.get("/readyz"), await c.get("/metrics")
        assert health.status_code == 200
        assert ready.json()["ready"] is True and ready.json()["triggers"]["default/all"]["settled"] == 1
        text = metrics.text
        assert 'infer_logger_broker_events_accepted_total{broker="default/default"} 1.0' in text
        assert 'infer_logger_trigger_events_delivered_total{trigger="default/all"} 1.0' in text
        assert 'infer_logger_trigger_lag_bytes{trigger="default/all"} 0.0' in text


# -- the CloudEvents conformance events, through the broker unchanged ------------------------------

CONFORMANCE = ROOT / "cloudevents-conformance" / "yaml"


def _conformance_docs() -> list[Any]:
    files = [CONFORMANCE / "v1.yaml", CONFORMANCE / "v1.0" / "v1_minimum.yaml"]
    if not all(f.is_file() for f in files):
        return [pytest.param(None, id="missing", marks=pytest.mark.skip(reason=reason("cloudevents-conformance")))]
    docs = []
    for path in files:
        for index, doc in enumerate(yaml.load_all(path.read_text(encoding="utf-8"), Loader=yaml.BaseLoader)):
            docs.append(pytest.param(doc, id=f"{path.name}[{index}]"))
    return docs


def _conformance_request(doc: dict[str, Any]) -> tuple[dict[str, str], bytes, CloudEvent]:
    """As cloudevents/conformance sends it: binary = ce- headers + Data as is; structured = JSON."""
    attributes = {k: v for k, v in doc["ContextAttributes"].items() if k != "Extensions"}
    attributes.update({k: v.strip() for k, v in (doc["ContextAttributes"].get("Extensions") or {}).items()})
    data = doc["Data"].encode()
    transport = doc.get("TransportExtensions") or {}
    if doc.get("Mode") == "structured":
        attributes.setdefault("datacontenttype", "application/json")
        body = orjson.dumps({**attributes, "data": orjson.loads(data)})
        expected = CloudEvent(attributes, orjson.dumps(orjson.loads(data)))
        return {"content-type": "application/cloudevents+json; charset=UTF-8", **transport}, body, expected
    headers, _ = to_binary(CloudEvent(attributes))
    return {**headers, **transport}, data, CloudEvent(attributes, data)


@pytest.mark.parametrize("doc", _conformance_docs())
async def test_conformance_event_passes_untouched(doc: dict[str, Any], make_broker: MakeBroker,
                                                  subscriber: Subscriber, tmp_path: Path) -> None:
    """Unknown extensions, charsets, multi-line values: the subscriber gets the same event."""
    broker = await make_broker(CATCH_ALL.format(url=subscriber.url))
    headers, body, expected = _conformance_request(doc)
    async with client(broker) as c:
        assert (await c.post("/", headers=headers, content=body)).status_code == 202
    [received] = await asyncio.to_thread(subscriber.wait_for, 1)
    assert received.attributes == expected.attributes
    assert received.data == expected.data


def test_served_on_a_thread_over_real_sockets(tmp_path: Path, subscriber: Subscriber) -> None:
    """`BrokerThread`: a broker served by uvicorn in-process (how a quickstart runs one)."""
    import httpx

    from infer_logger.testing import free_port
    from pipelines.broker import Broker, BrokerThread

    from .helpers import settings

    broker = Broker(settings(tmp_path), triggers=CATCH_ALL.format(url=subscriber.url))
    with BrokerThread(broker, port=free_port()) as running:
        headers, body = to_binary(event("thread-1"))
        assert httpx.post(running.url, headers=headers, content=body).status_code == 202
        [received] = subscriber.wait_for(1)
        assert httpx.get(running.url + "readyz").json()["ready"] is True
    assert received.id == "thread-1" and not broker.started


def test_a_body_cut_short_by_the_client_is_no_event(tmp_path: Path, subscriber: Subscriber) -> None:
    """A client that declares 83 bytes, sends 20 and leaves: the partial body was stored as an
    event (and the sender, never answered, would send it again)."""
    import socket
    import time

    import httpx

    from infer_logger.testing import free_port
    from pipelines.broker import Broker, BrokerThread

    from .helpers import settings

    broker = Broker(settings(tmp_path), triggers=CATCH_ALL.format(url=subscriber.url))
    with BrokerThread(broker, port=free_port()) as running:
        port = int(running.url.rstrip("/").rsplit(":", 1)[1])
        with socket.create_connection(("127.0.0.1", port)) as sock:
            sock.sendall(b"POST / HTTP/1.1\r\nhost: x\r\nce-specversion: 1.0\r\nce-id: partial\r\n"
                         b"ce-source: /s\r\nce-type: t\r\ncontent-type: application/json\r\n"
                         b"content-length: 83\r\n\r\n" + b'{"hello": "world", "')
        headers, body = to_binary(event("whole"))
        assert httpx.post(running.url, headers=headers, content=body).status_code == 202
        subscriber.wait_for(1)
        # Counted once the server has read the client's close: polled (30 s, a bound).
        deadline = time.monotonic() + 30
        while 'reason="disconnected"' not in httpx.get(running.url + "metrics").text:
            assert time.monotonic() < deadline, 'no reason="disconnected" in /metrics within 30 s'
            time.sleep(0.05)
    assert [e.id for e in subscriber.events] == ["whole"]


def test_a_dribbled_body_is_408_and_no_event(tmp_path: Path, subscriber: Subscriber) -> None:
    """A sender dribbling its body held the connection (and the bytes read so far) for ever: a 408
    past `request_read_timeout`, the connection closed, nothing stored; whole events still go in."""
    import httpx

    from infer_logger.testing import free_port
    from pipelines.broker import Broker, BrokerThread
    from tests.servers import dribble

    from .helpers import settings

    broker = Broker(settings(tmp_path, request_read_timeout=0.5), triggers=CATCH_ALL.format(url=subscriber.url))
    with BrokerThread(broker, port=free_port()) as running:
        port = int(running.url.rstrip("/").rsplit(":", 1)[1])
        raw = dribble(port, b"POST / HTTP/1.1\r\nhost: x\r\nce-specversion: 1.0\r\nce-id: slow\r\nce-source: /s\r\n"
                            b"ce-type: t\r\ncontent-type: application/json\r\ncontent-length: 500\r\n\r\n", b" ")
        head, _, body = raw.partition(b"\r\n\r\n")
        assert head.startswith(b"HTTP/1.1 408") and b"connection: close" in head
        assert orjson.loads(body) == {"error": "the request body did not arrive whole within 0.5 seconds "
                                               "(request_read_timeout)", "status": 408}
        headers, whole = to_binary(event("whole"))
        assert httpx.post(running.url, headers=headers, content=whole).status_code == 202
        subscriber.wait_for(1)
        assert 'reason="timeout"' in httpx.get(running.url + "metrics").text
    assert [e.id for e in subscriber.events] == ["whole"]


@pytest.mark.parametrize("mode", ["binary", "structured", "batch"])  # structured: data as base64
def test_a_payload_the_sidecar_cut_enters_a_broker_of_default_settings(
        tmp_path: Path, subscriber: Subscriber, iris_predictor: Any, mode: str) -> None:
    """The sidecar cut payloads at 1 MiB, and the broker refuses events over 1 MiB (their data
    and attributes): every cut payload was answered 413 and dead-lettered on the way in (as
    the Kafka record limit, 1,000,000 bytes, refused them). Both defaults, end to end."""
    import httpx

    from infer_logger.events import REQUEST
    from infer_logger.testing import free_port
    from pipelines.broker.broker import Broker
    from pipelines.broker.server import BrokerThread
    from pipelines.broker.settings import BrokerSettings
    from tests.servers import sidecar_process

    broker = Broker(BrokerSettings(dir=tmp_path / "broker"), triggers=CATCH_ALL.format(url=subscriber.url))
    with BrokerThread(broker, port=free_port()) as running:
        config = tmp_path / "sidecar.yaml"
        config.write_text(f"sinks: [{{type: http, url: '{running.url}', mode: {mode}}}]\n")
        sidecar = sidecar_process(iris_predictor.url, tmp_path, "-c", str(config)).start()
        try:
            body = b'{"instances": [' + b"[5.1, 3.5, 1.4, 0.2], " * 100_000 + b"[5.1, 3.5, 1.4, 0.2]]}"
            answer = httpx.post(sidecar.url + "/v1/models/iris:predict", content=body,
                                headers={"x-request-id": "big-1", "content-type": "application/json"}, timeout=60)
            assert answer.status_code == 200
            received = subscriber.wait_for(2, timeout=30)
        finally:
            sidecar.stop()
    [request] = [e for e in received if e.id == "big-1" and e.type == REQUEST]
    assert request.get("truncated") in (True, "true") and int(request.get("datasize")) == len(body)


@pytest.mark.parametrize("body", [b"[]", b'[{"specversion": "1.0", "id": "1", "source": "/s", "type": "t", "data": "'
                                  + b"x" * 2000 + b'"}]'])
async def test_a_broker_a_reload_removes_as_its_batch_comes_is_404(tmp_path: Path, body: bytes) -> None:
    """Looked up once before the body was read: a batch with nothing to publish (none, or all too
    large) to a broker removed meanwhile was a 202 or a 413."""
    triggers = tmp_path / "t.yaml"
    triggers.write_text("triggers: [{name: a, namespace: ml, broker: b1, subscriber: 'http://127.0.0.1:9/'}]\n")
    broker = Broker(settings(tmp_path, trigger_files=[triggers], max_event_bytes=1000))
    await broker.startup()
    sent: list[dict[str, Any]] = []

    async def receive() -> dict[str, Any]:  # the reload comes as the body does
        triggers.write_text("triggers: []\n")
        assert await broker.reload() and ("ml", "b1") not in broker.channels
        return {"type": "http.request", "body": body, "more_body": False}

    async def send(message: dict[str, Any]) -> None:
        sent.append(message)

    headers = [(b"content-type", b"application/cloudevents-batch+json"), (b"content-length", str(len(body)).encode())]
    try:
        await broker({"type": "http", "method": "POST", "path": "/ml/b1", "raw_path": b"/ml/b1", "query_string": b"",
                      "headers": headers}, receive, send)
    finally:
        await broker.shutdown()
    assert next(m for m in sent if m["type"] == "http.response.start")["status"] == 404

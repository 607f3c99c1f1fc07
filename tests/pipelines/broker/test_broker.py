"""The broker at work: replies re-entering, the TTL ending a reply loop, triggers isolated from a
hanging subscriber, in-process components, reloads, and a restart that loses nothing accepted."""

from __future__ import annotations

import asyncio
import errno
import json
import os
import threading
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import orjson
import pytest

from infer_logger.cloudevents.event import CloudEvent
from infer_logger.cloudevents.http import to_structured
from infer_logger.errors import SinkError
from infer_logger.events import REQUEST
from infer_logger.store import AuditStore
from pipelines.broker import Broker
from pipelines.broker.filters import FilterResult

from .conftest import MakeBroker
from .helpers import (
    Handler,
    Subscriber,
    binary_request,
    client,
    event,
    reply_with,
    settings,
    settle,
    until,
)


async def _post(broker: Broker, *events: CloudEvent, path: str = "/") -> None:
    async with client(broker) as c:
        for e in events:
            response = await c.post(path, **binary_request(e))
            assert response.status_code == 202, response.text


class TestReplies:
    """A subscriber's CloudEvent reply goes back into the broker, through every trigger."""

    async def test_reply_reaches_another_trigger(self, make_broker: MakeBroker, subscriber: Subscriber,
                                                 other_subscriber: Subscriber) -> None:
        subscriber.answer = reply_with(event("r1", "com.example.reply"), structured=True)
        broker = await make_broker(f"""
triggers:
  - {{name: requests, filters: [{{exact: {{type: com.example.someevent}}}}], subscriber: '{subscriber.url}'}}
  - {{name: replies, filters: [{{suffix: {{type: .reply}}}}], subscriber: '{other_subscriber.url}'}}
""")
        await _post(broker, event("e1"))
        [reply] = await asyncio.to_thread(other_subscriber.wait_for, 1)
        assert reply.id == "r1" and "knativebrokerttl" not in reply.attributes
        assert broker.metrics.replies.labels("default/requests")._value.get() == 1

    async def test_ttl_ends_a_reply_loop(self, make_broker: MakeBroker, subscriber: Subscriber) -> None:
        """A subscriber answering every event with an event its own trigger takes: default_ttl deliveries."""
        subscriber.answer = reply_with(event("echo"))
        broker = await make_broker(f"triggers: [{{name: loop, subscriber: '{subscriber.url}'}}]", default_ttl=5)
        await _post(broker, event("start"))
        await until(lambda: broker.metrics.refused.labels("ttl_expired")._value.get() == 1, what="the loop ending")
        await settle(broker, "loop", 5)
        assert subscriber.attempts == 5

    async def test_a_202_with_an_event_is_a_reply(self, make_broker: MakeBroker, subscriber: Subscriber,
                                                  other_subscriber: Subscriber) -> None:
        """knative/eventing takes it as a reply (its handler and dispatcher cases do), though the
        data-plane spec says a 202's body MUST NOT be: Knative's behaviour is followed."""
        subscriber.answer = reply_with(event("r202", "com.example.reply"), 202)
        broker = await make_broker(f"""
triggers:
  - {{name: requests, filters: [{{exact: {{type: com.example.someevent}}}}], subscriber: '{subscriber.url}'}}
  - {{name: replies, filters: [{{exact: {{type: com.example.reply}}}}], subscriber: '{other_subscriber.url}'}}
""")
        await _post(broker, event("e1"))
        [reply] = await asyncio.to_thread(other_subscriber.wait_for, 1)
        assert reply.id == "r202"

    async def test_a_reply_over_the_limit_by_its_attributes_is_refused_as_at_the_ingress(
            self, make_broker: MakeBroker, subscriber: Subscriber, other_subscriber: Subscriber) -> None:
        """A reply was weighed by its data only: one over max_event_bytes by an extension attribute
        entered the log, where the same event from a sender was a 413."""
        big = event("big-reply", "com.example.reply", bigext="x" * (20 * 1024))
        small = event("small-reply", "com.example.reply")

        def answer(received: CloudEvent | None, request: dict[str, str]) -> tuple[int, dict[str, str], bytes]:
            headers, body = to_structured(big if received is not None and received.id == "e1" else small)
            return 200, headers, body

        subscriber.answer = answer
        broker = await make_broker(f"""
triggers:
  - {{name: requests, filters: [{{exact: {{type: com.example.someevent}}}}], subscriber: '{subscriber.url}'}}
  - {{name: replies, filters: [{{suffix: {{type: .reply}}}}], subscriber: '{other_subscriber.url}'}}
""", max_event_bytes=16 * 1024)
        async with client(broker) as c:  # the same event from a sender
            assert (await c.post("/", **binary_request(big))).status_code == 413
        await _post(broker, event("e1"), event("e2"))
        await asyncio.to_thread(other_subscriber.wait_for, 1)
        await settle(broker, "requests", 2)
        await settle(broker, "replies", 1)
        assert [e.id for e in other_subscriber.events] == ["small-reply"]
        assert broker.metrics.lost.labels("default/requests")._value.get() == 1

    async def test_non_event_reply_is_an_error(self, make_broker: MakeBroker, subscriber: Subscriber,
                                               other_subscriber: Subscriber) -> None:
        subscriber.answer = lambda e, h: (200, {"content-type": "text/plain"}, b"thanks!")
        broker = await make_broker(f"""
triggers:
  - name: t
    subscriber: '{subscriber.url}'
    delivery: {{retry: 1, backoffDelay: PT0.01S, deadLetterSink: '{other_subscriber.url}'}}
""")
        await _post(broker, event())
        [letter] = await asyncio.to_thread(other_subscriber.wait_for, 1)
        assert letter.attributes["knativeerrorcode"] == "502" and subscriber.attempts == 2


class TestFilters:
    """Filters see an event as its subscriber gets it, whatever the channel, and never stop a trigger."""

    async def test_filters_see_the_delivered_event(self, make_broker: MakeBroker, subscriber: Subscriber) -> None:
        broker = await make_broker(f"""
triggers:
  - {{name: big, filters: [{{cesql: "big > 5"}}], subscriber: '{subscriber.url}'}}
  - {{name: text, filters: [{{cesql: "sampled IN ('yes', 'true')"}}], subscriber: '{subscriber.url}'}}
  - {{name: nottl, filters: [{{cesql: "NOT EXISTS knativebrokerttl"}}], subscriber: '{subscriber.url}'}}
  - {{name: ttl, filters: [{{exact: {{knativebrokerttl: "255"}}}}], subscriber: '{subscriber.url}'}}
""")
        bodies = [{"specversion": "1.0", "id": str(i), "source": "/s", "type": "t", "big": big, "sampled": True,
                   "knativebrokerttl": 255} for i, big in enumerate(["10", "1" * 5000, "20"])]
        async with client(broker) as c:
            for body in bodies:  # structured: the disk channel keeps JSON types (a Kafka channel would not)
                r = await c.post("/", headers={"content-type": "application/cloudevents+json"},
                                 content=orjson.dumps(body))
                assert r.status_code == 202, r.text
        for name in ("big", "text", "nottl", "ttl"):
            await settle(broker, name, 3)

        def delivered(name: str) -> float:
            return broker.metrics.delivered.labels(f"default/{name}")._value.get()

        # A 5000-digit value raised ValueError out of the filter and ended the trigger's runner:
        # the events after it were never delivered (nor after a restart).
        assert delivered("big") == 2
        # The subscriber gets `sampled` as the text "true" and no TTL (Knative drops it before filtering).
        assert (delivered("text"), delivered("nottl"), delivered("ttl")) == (3, 3, 0)

    async def test_a_filter_raising_filters_out_and_goes_on(self, make_broker: MakeBroker,
                                                            subscriber: Subscriber) -> None:
        broker = await make_broker(f"triggers: [{{name: t, subscriber: '{subscriber.url}'}}]")

        def bug(attributes: Mapping[str, str]) -> FilterResult:
            if attributes["id"] == "bad":
                raise RuntimeError("a bug in a filter")
            return FilterResult.PASS

        broker.dispatchers[("default", "t")]._filter = bug
        await _post(broker, event("bad"), event("good"))
        await settle(broker, "t", 2)
        assert [e.id for e in subscriber.events] == ["good"]


class TestIsolation:
    """A hanging subscriber times out, is retried and dead-lettered; the other triggers keep flowing."""

    async def test_hanging_subscriber(self, make_broker: MakeBroker, subscriber: Subscriber,
                                      other_subscriber: Subscriber, tmp_path: Path) -> None:
        subscriber.delay = 2.0
        dead_letters = tmp_path / "dead.jsonl"
        broker = await make_broker(f"""
triggers:
  - name: hanging
    subscriber: '{subscriber.url}'
    delivery:
      retry: 1
      timeout: PT0.2S
      backoffDelay: PT0.05S
      deadLetterSink: {{component: {{type: file, path: '{dead_letters}'}}}}
  - name: healthy
    subscriber: '{other_subscriber.url}'
""", parallelism=4)
        events = [event(str(i)) for i in range(20)]
        await _post(broker, *events)
        received = await asyncio.to_thread(other_subscriber.wait_for, 20)
        assert sorted(e.id for e in received) == sorted(e.id for e in events)
        await settle(broker, "hanging", 20, timeout=30)
        letters = [orjson.loads(line) for line in dead_letters.read_bytes().splitlines()]
        # Each at least once: a dead letter written past its 0.2 s timeout (a busy machine) is
        # tried again, as at-least-once allows.
        assert {x["id"] for x in letters} == {e.id for e in events}
        assert {x["knativeerrorcode"] for x in letters} == {"500"}
        assert all(x["knativeerrordest"] == subscriber.url for x in letters)


class _Uppercase:
    """A Replier component: answers every event with an `...upper` event."""

    def __init__(self) -> None:
        self.seen: list[CloudEvent] = []
        self.fail_first = True

    async def handle(self, e: CloudEvent) -> CloudEvent | None:
        if self.fail_first:
            self.fail_first = False
            raise SinkError("warming up")  # retried like any SinkError
        self.seen.append(e)
        if e.type.endswith(".upper"):
            return None
        return CloudEvent({**e.attributes, "id": e.id + "-up", "type": e.type + ".upper"}, (e.data or b"").upper())

    async def aclose(self) -> None:
        pass


class TestComponents:
    """In-process subscribers: a declared store by `ref`, an inline file sink, a Replier."""

    async def test_store_file_and_replier(self, tmp_path: Path, subscriber: Subscriber) -> None:
        store_path, file_path = tmp_path / "audit.db", tmp_path / "events.jsonl"
        upper = _Uppercase()
        s = settings(tmp_path, components=[{"type": "store", "name": "audit", "path": str(store_path)}])
        broker = Broker(s, components={"upper": upper}, triggers=f"""
triggers:
  - {{name: audit, filters: [{{prefix: {{type: org.kubeflow.}}}}], subscriber: {{ref: {{name: audit}}}}}}
  - name: file
    subscriber: {{component: {{type: file, path: '{file_path}'}}}}
  - {{name: upper, filters: [{{cesql: "type = 'x.text'"}}], subscriber: {{ref: {{name: upper}}}}}}
  - {{name: shout, filters: [{{exact: {{type: x.text.upper}}}}], subscriber: '{subscriber.url}'}}
""")
        await broker.startup()
        try:
            request = event("p1", "org.kubeflow.serving.inference.request", b'{"instances": [[1, 2]]}',
                            modelname="iris")
            await _post(broker, request, event("t1", "x.text", b"hello", datacontenttype="text/plain"))
            [shout] = await asyncio.to_thread(subscriber.wait_for, 1)
            assert (shout.id, shout.data) == ("t1-up", b"HELLO")
            await settle(broker, "audit", 3)
            await settle(broker, "file", 3)
        finally:
            await broker.shutdown()
        with AuditStore(store_path, readonly=True) as store:
            [record] = store.query(id="p1")
        assert record.model == "iris" and record.request == [1, 2]
        ids = [json.loads(line)["id"] for line in file_path.read_text().splitlines()]
        assert sorted(ids) == ["p1", "t1", "t1-up"]

    async def test_unknown_ref_is_refused_with_its_line(self, tmp_path: Path) -> None:
        broker = Broker(settings(tmp_path), triggers="triggers:\n  - name: a\n    subscriber: {ref: {name: nope}}\n")
        try:
            await broker.startup()
        except Exception as exc:
            assert "<inline>:3:17: subscriber.ref.name" in str(exc) and "nope" in str(exc)
        else:
            raise AssertionError("startup should fail")
        finally:
            await broker.shutdown()


class TestReload:
    """Reload: good files take effect trigger by trigger; a bad one changes nothing."""

    async def test_reload(self, tmp_path: Path, subscriber: Subscriber, other_subscriber: Subscriber) -> None:
        path = tmp_path / "triggers.yaml"
        path.write_text(f"triggers: [{{name: a, subscriber: '{subscriber.url}'}}]\n")
        broker = Broker(settings(tmp_path, trigger_files=[path]))
        await broker.startup()
        try:
            await _post(broker, event("1"))
            await asyncio.to_thread(subscriber.wait_for, 1)
            kept = broker.dispatchers[("default", "a")]

            path.write_text(f"""triggers:
  - {{name: a, subscriber: '{subscriber.url}'}}
  - {{name: b, filters: [{{exact: {{type: x}}}}], subscriber: '{other_subscriber.url}'}}
""")
            assert await broker.reload()
            assert broker.dispatchers[("default", "a")] is kept  # unchanged: not restarted
            await _post(broker, event("2", "x"))
            await asyncio.to_thread(other_subscriber.wait_for, 1)  # b starts at the end: only "2"

            path.write_text("triggers:\n  - {name: c, subscriber: 'http://h/', filters: [{cesql: 'type ='}]}\n")
            assert not await broker.reload()
            assert set(broker.triggers) == {("default", "a"), ("default", "b")}
            assert broker.metrics.reloads.labels("error")._value.get() == 1

            broker.metrics.lag.labels("default/b").set(411)  # as a scrape leaves it
            changed = f"triggers: [{{name: a, filters: [{{exact: {{type: y}}}}], subscriber: '{subscriber.url}'}}]\n"
            path.write_text(changed)
            assert await broker.reload()
            # A removed trigger's lag was scraped for good (a lag alert for a trigger that is gone).
            assert broker.metrics.registry.get_sample_value("infer_logger_trigger_lag_bytes",
                                                            {"trigger": "default/b"}) is None
            assert broker.dispatchers[("default", "a")] is not kept
            await _post(broker, event("3", "y"), event("4", "x"))
            await settle(broker, "a", 2)
            checkpoints = tmp_path / "broker" / "default" / "default" / "checkpoints"
            assert not (checkpoints / "b.json").exists() and (checkpoints / "a.json").exists()
        finally:
            await broker.shutdown()
        assert [e.id for e in subscriber.events] == ["1", "2", "3"]
        assert [e.id for e in other_subscriber.events] == ["2"]

    @pytest.mark.parametrize("by", ["reload", "restart"])
    async def test_the_runner_taking_over_goes_on_past_what_was_settled(self, tmp_path: Path, by: str) -> None:
        """The checkpoint waits for the oldest event in flight: a reload, or the next run (it is
        kept with the checkpoint), delivered again everything settled after it (a stuck event
        held back 50 deliveries, all sent twice)."""
        from infer_logger.spool import DiskSpool
        from pipelines.broker.channel import SpoolChannel

        channel = await _stuck_at_3(tmp_path)  # "3" is cancelled: the runner taking over delivers it
        assert await _taken_over(channel, by, lambda: SpoolChannel(DiskSpool(tmp_path))) == ["3", "last"]
        # All delivered: nothing is kept (what lay behind the checkpoint was written back at every stop).
        assert "ahead" not in orjson.loads((tmp_path / "checkpoints" / "t.json").read_bytes())

    @pytest.mark.parametrize("by", ["restart", "reload"])
    @pytest.mark.parametrize("alone", [False, True], ids=["stuck-with-the-next", "stuck-alone"])
    async def test_what_was_settled_in_small_batches_is_known_again(self, tmp_path: Path, by: str,
                                                                    alone: bool) -> None:
        """Live traffic reads one event a batch: read again from the checkpoint `batch_size` at a
        time (or past the shared cache's 64 batches), only the first was known: 19 of 20
        settled events (98 of 100 at a reload) went again; and with no record of the stuck
        event's own batch (it settled nothing), 99 of 100."""
        from infer_logger.spool import DiskSpool
        from pipelines.broker.channel import SpoolChannel

        channel = SpoolChannel(DiskSpool(tmp_path))
        old = Handler(lambda e: e.id == "0")
        await channel.attach("t", old)
        first = [event("0")] if alone else [event("0"), event("1")]
        await channel.append(first)
        await asyncio.sleep(0.1)  # read as one batch
        for i in range(len(first), 100):
            await channel.append([event(str(i))])
            await until(lambda: len(old.got) == i, what=f"event {i}")
        assert await _taken_over(channel, by, lambda: SpoolChannel(DiskSpool(tmp_path))) == ["0", "last"]

    async def test_what_was_settled_where_an_overflow_dropped_it_is_not_applied(self) -> None:
        """A read from a dropped place goes on with the oldest events left: a response there,
        sharing its settled request's id, was skipped as settled and lost."""
        from infer_logger.spool import MemorySpool, Position
        from pipelines.broker.channel import Settled, SpoolChannel, _digest, _Runner

        spool = MemorySpool(max_events=3, overflow="drop_oldest")
        channel = SpoolChannel(spool)
        reader = spool.reader("t")
        for e in (event("x"), event("a", REQUEST), event("a"), event("b"), event("c")):
            spool.append(e)  # x and the request are dropped: the log holds the response, b, c
        reader.commit(Position(0, 1))  # where the request was
        runner = _Runner(channel, reader, Handler(),
                         settled={Position(0, 1): Settled(1, _digest(["a"]), frozenset({0}), Position(0, 2))})
        runner.start()
        await until(lambda: len(runner.handler.got) == 3, what="the events left")
        await runner.stop(0.1)
        assert runner.handler.got == ["a", "b", "c"]

    @pytest.mark.parametrize("by", ["restart", "reload"])
    @pytest.mark.parametrize(("stuck", "half"), [(5, False), (6, False), (5, True)],
                             ids=["first-of-segment", "second-of-segment", "segment-rolled-before"])
    async def test_what_was_settled_across_segments_is_known_again(
            self, tmp_path: Path, by: str, stuck: int, half: bool) -> None:
        """Segments roll under live traffic: a batch read on across a segment's end (re-read, it
        stops short of it), or a checkpoint at the end of a segment its save deletes, lost the
        record of everything settled after it (30 of 33, 34 of 34 sent again)."""
        from infer_logger.spool import DiskSpool, encode_record
        from pipelines.broker.channel import SpoolChannel, pack

        record = len(encode_record(pack(event("e000"))))
        segment_bytes = record * 5 + (record // 2 if half else 0)  # 5 records; half: rolls before the 6th
        channel = SpoolChannel(DiskSpool(tmp_path, segment_bytes=segment_bytes))
        old = Handler(lambda e: e.id == f"e{stuck:03d}")
        await channel.attach("t", old)
        for i in range(100):  # more batches than the shared cache keeps: a reload reads them again
            await channel.append([event(f"e{i:03d}")])
            if i == stuck:
                await asyncio.sleep(0.05)
            else:
                await until(lambda: len(old.got) == (i + 1 if i < stuck else i), what=f"event {i}")
        reopened = await _taken_over(channel, by, lambda: SpoolChannel(DiskSpool(tmp_path, segment_bytes=segment_bytes)))
        assert reopened == [f"e{stuck:03d}", "last"]

    @pytest.mark.parametrize("by", ["restart", "reload"])
    async def test_a_batch_read_only_past_a_segment_end_is_known_again(self, tmp_path: Path, by: str) -> None:
        """A read that ended on its count at a segment's end is followed by one that only moves
        on to the next segment: recorded as a batch of 0 events, it was read again as a full
        batch that matched nothing (10 settled events sent again)."""
        from infer_logger.spool import DiskSpool, encode_record
        from pipelines.broker.channel import SpoolChannel, pack

        segment_bytes = len(encode_record(pack(event("e00")))) * 20

        def reopen() -> SpoolChannel:
            return SpoolChannel(DiskSpool(tmp_path, segment_bytes=segment_bytes), batch_size=10)

        channel = reopen()
        old = Handler(lambda e: e.id == "e20")
        await channel.attach("t", old)
        for b in range(5):
            await channel.append([event(f"e{i:02d}") for i in range(b * 10, b * 10 + 10)])
            await until(lambda: len(old.got) == (b * 10 + 10 if b < 2 else b * 10 + 9), what=f"batch {b}")
        assert await _taken_over(channel, by, reopen) == ["e20", "last"]

    @pytest.mark.parametrize("by", ["restart", "reload", "restart, reload"])
    async def test_a_batch_that_began_at_the_end_of_a_deleted_segment_is_known_again(
            self, tmp_path: Path, by: str) -> None:
        """A batch read as its segment rolled starts at that segment's end, and so does the
        checkpoint stuck on it: its save deletes the segment, and the record of the batch was
        thrown away (its place "not held"), its settled events sent again. A runner stopped
        before its first read (a reload right after a restart) kept only the records starting
        from its checkpoint on, the next segment's start: that one went too."""
        from infer_logger.spool import DiskSpool, encode_record
        from pipelines.broker.channel import SpoolChannel, pack

        record = len(encode_record(pack(event("e00"))))

        def reopen() -> SpoolChannel:
            return SpoolChannel(DiskSpool(tmp_path, segment_bytes=record * 5 + record // 2))  # rolls before the 6th

        channel = reopen()
        old = Handler(lambda e: e.id == "e05")
        await channel.attach("t", old)
        for i in range(5):
            await channel.append([event(f"e{i:02d}")])
            await until(lambda: len(old.got) == i + 1, what=f"e{i:02d}")
        await channel.append([event("e05"), event("e06")])  # e05 stuck, e06 settled in its batch
        await until(lambda: len(old.got) == 6, what="e06")
        for i in range(7, 12):
            await channel.append([event(f"e{i:02d}")])
            await until(lambda: len(old.got) == i, what=f"e{i:02d}")
        assert await _taken_over(channel, by, reopen) == ["e05", "last"]

    async def test_what_was_settled_past_a_segment_cut_short_leaves_new_events_flowing(self, tmp_path: Path) -> None:
        """A record beyond where a crash cut a segment was the next read's stop: the read stopped
        short of it for good, and no new event was delivered again."""
        from infer_logger.spool import DiskSpool
        from pipelines.broker.channel import SpoolChannel

        channel = SpoolChannel(DiskSpool(tmp_path))
        old = Handler(lambda e: e.id == "e3")
        await channel.attach("t", old)
        starts = []
        for i in range(6):
            starts.append(channel.spool.tail())
            await channel.append([event(f"e{i}")])
            await until(lambda: len(old.got) == (i + 1 if i < 3 else i), what=f"e{i}")
        await channel.aclose(0.1)
        with open(tmp_path / f"{starts[0].segment:020d}.seg", "r+b") as segment:
            segment.truncate(starts[1].offset)  # a crash kept e0 only; the checkpoint (at e3) and its record survive
        channel = SpoolChannel(DiskSpool(tmp_path))
        new = Handler()
        await channel.attach("t", new)
        await channel.append([event(f"n{i}") for i in range(5)])
        await until(lambda: len(new.got) == 5, what="the new events")
        await channel.aclose(0.1)
        assert new.got == [f"n{i}" for i in range(5)]

    async def test_what_was_settled_in_a_segment_that_lost_its_tail_is_not_applied(self, tmp_path: Path) -> None:
        """Read from where a crash cut a segment short, the events came from the next segment (a
        response sharing its settled request's id): skipped as settled, lost."""
        from infer_logger.spool import DiskSpool
        from pipelines.broker.channel import Settled, SpoolChannel, _digest, _Runner, pack

        spool = DiskSpool(tmp_path)
        spool.append(pack(event("x")))
        start = spool.tail()
        spool.append(pack(event("a", REQUEST)))
        end = spool.tail()
        spool.close()
        with open(tmp_path / f"{start.segment:020d}.seg", "r+b") as segment:
            segment.truncate(start.offset)  # the request's record lost, the checkpoint kept
        spool = DiskSpool(tmp_path)
        spool.append(pack(event("a")))  # its response, in the next run's segment
        reader = spool.reader("t")
        reader.commit(start)
        runner = _Runner(SpoolChannel(spool), reader, Handler(),
                         settled={start: Settled(1, _digest(["a"]), frozenset({0}), end)})
        runner.start()
        await until(lambda: runner.handler.got == ["a"], what="the response")
        await runner.stop(0.1)
        spool.close()

    @pytest.mark.parametrize("ahead", [
        "not a list", [[0, 0, 10]], [["a", 0, 10, "d", [], 1, 0]],
        # Edited or damaged: a size that would take all memory (a MemoryError at attach), an end
        # before the start, a negative place; a 0-event batch ending far away is read anyway
        # (the runner jumped there: the events before it never went).
        [[1, 0, 10**9, "d", [0], 1, 1]], [[1, 100, 1, "d", [], 1, 50]], [[-1, 0, 1, "d", [], 1, 0]],
        [[1, 0, 0, "", [], 10**6, 0]],
    ], ids=["not-a-list", "short", "not-a-number", "huge", "backwards", "negative", "empty-far"])
    async def test_an_unreadable_record_of_what_was_settled_sends_all_again(self, tmp_path: Path, ahead: object) -> None:
        from infer_logger.spool import DiskSpool
        from pipelines.broker.channel import SpoolChannel

        channel = await _stuck_at_3(tmp_path)
        await channel.aclose(0.1)
        path = tmp_path / "checkpoints" / "t.json"
        path.write_bytes(orjson.dumps({**orjson.loads(path.read_bytes()), "ahead": ahead}))

        again = SpoolChannel(DiskSpool(tmp_path))
        new = Handler()
        await again.attach("t", new)
        await until(lambda: len(new.got) == 10, what="every event again")
        await again.aclose(0.1)

    async def test_a_record_read_again_is_not_taken_from_the_shared_cache(self, tmp_path: Path) -> None:
        """Another trigger's read of the same place, cached, went on past the end of a segment
        finished since: taken for a record's batch, it ended too late to match, and the events
        settled in it went again."""
        from infer_logger.spool import DiskSpool
        from pipelines.broker.channel import SpoolChannel

        channel = SpoolChannel(DiskSpool(tmp_path), batch_size=10, parallelism=2)
        one, other = Handler(lambda e: e.id == "e0"), Handler(lambda e: e.id in ("e0", "e1"))
        await channel.attach("t1", one)
        await channel.attach("t2", other)  # its 2 slots held: it never reads the second batch
        await channel.append([event(f"e{i}") for i in range(5)])
        await until(lambda: len(one.got) == 4, what="the first batch")
        await channel.append([event(f"e{i}") for i in range(5, 10)])
        await until(lambda: len(one.got) == 9, what="the second batch")
        await channel.aclose(0.1)
        channel = SpoolChannel(DiskSpool(tmp_path), batch_size=10)  # a new segment is the current one
        first, second = Handler(), Handler()
        await channel.attach("t2", second)  # the first to reach the second batch fills the cache
        await channel.attach("t1", first)
        await channel.append([event("last")])
        await until(lambda: "last" in first.got and "last" in second.got, what="the next run's deliveries")
        await channel.aclose(0.1)
        assert first.got == ["e0", "last"]

    async def test_settled_events_are_not_taken_for_others(
            self, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
        """What the old runner settled counts only where the batch read again holds the same
        events (an overflow may have dropped them): else every event goes again, none is lost."""
        from pipelines.broker.channel import Settled, _Runner

        monkeypatch.setattr(_Runner, "settled_ahead",
                            lambda self: {b.start: Settled(10, "another digest", frozenset(range(10)), b.end)
                                          for b in self._window})
        channel = await _stuck_at_3(tmp_path)
        new = Handler()
        await channel.replace("t", new, timeout=0.1)
        await until(lambda: len(new.got) == 10, what="every event again")
        await channel.aclose(0.1)

    async def test_a_broker_removed_by_a_reload_is_404_and_its_log_closed(
            self, tmp_path: Path, subscriber: Subscriber) -> None:
        """Its channel stayed open: POST /<ns>/<broker> answered 202 and nothing was kept or
        delivered (after a restart, 404). Declared again, its log opens again (the old one let go)."""
        path = tmp_path / "triggers.yaml"
        declared = f"triggers: [{{name: t2, broker: b2, subscriber: '{subscriber.url}'}}]\nbrokers: [{{name: b2}}]\n"
        path.write_text(declared)
        broker = Broker(settings(tmp_path, trigger_files=[path]))
        await broker.startup()
        try:
            await _post(broker, event("before"), path="/default/b2")
            await until(lambda: len(subscriber.events) == 1, what="the event before the removal")
            path.write_text("triggers: []\n")
            assert await broker.reload()
            async with client(broker) as c:
                removed = await c.post("/default/b2", **binary_request(event("after")))
            assert removed.status_code == 404 and "no broker default/b2" in removed.json()["error"], removed.text
            assert ("default", "b2") not in broker.channels
            path.write_text(declared)
            assert await broker.reload()
            await _post(broker, event("again"), path="/default/b2")
            await until(lambda: len(subscriber.events) == 2, what="the event after it was declared again")
        finally:
            await broker.shutdown()
        assert [e.id for e in subscriber.events] == ["before", "again"]

    async def test_a_broker_a_failed_reload_opened_is_closed_again(
            self, tmp_path: Path, subscriber: Subscriber, monkeypatch: pytest.MonkeyPatch) -> None:
        """A reload declaring a new broker that failed after opening its channel left it open: the
        ingress answered 202 for a broker the running triggers do not declare (404 after a restart)."""
        from pipelines.broker.channel import ChannelError, SpoolChannel

        path = tmp_path / "triggers.yaml"
        path.write_text(f"triggers: [{{name: t, subscriber: '{subscriber.url}'}}]\n")
        broker = Broker(settings(tmp_path, trigger_files=[path]))
        await broker.startup()
        attach = SpoolChannel.attach

        async def failing(self: SpoolChannel, trigger: str, handler: object) -> None:
            raise ChannelError("cannot attach")

        try:
            monkeypatch.setattr(SpoolChannel, "attach", failing)
            path.write_text(f"triggers:\n  - {{name: t, subscriber: '{subscriber.url}'}}\n"
                            f"  - {{name: t3, broker: b3, subscriber: '{subscriber.url}'}}\n")
            assert not await broker.reload()
            async with client(broker) as c:
                answer = await c.post("/default/b3", **binary_request(event("lost")))
            assert answer.status_code == 404, answer.text
            assert ("default", "b3") not in broker.channels
            await _post(broker, event("kept"))  # the running triggers still run
            await until(lambda: len(subscriber.events) == 1, what="the default broker's event")
            monkeypatch.setattr(SpoolChannel, "attach", attach)
            assert await broker.reload()
            await _post(broker, event("b3"), path="/default/b3")
            await until(lambda: len(subscriber.events) == 2, what="the event of the broker declared at last")
        finally:
            await broker.shutdown()

    async def test_events_flow_while_a_reload_reads(self, tmp_path: Path, subscriber: Subscriber) -> None:
        """The files are read off the event loop: a reload stuck on a FIFO nobody writes yet (any
        slow file, or one that takes long to check) leaves the broker serving."""
        path = tmp_path / "triggers.yaml"
        path.write_text(f"triggers: [{{name: a, subscriber: '{subscriber.url}'}}]\n")
        broker = Broker(settings(tmp_path, trigger_files=[path]))
        await broker.startup()
        path.unlink()
        os.mkfifo(path)
        reloading = asyncio.create_task(broker.reload())
        try:
            await _post(broker, event("1"))
            await asyncio.to_thread(subscriber.wait_for, 1)
            assert not reloading.done()
            await asyncio.to_thread(path.write_text, "x: &a [*a, *a]\n")  # 15 bytes, 2**64 paths
            assert not await reloading
            assert set(broker.triggers) == {("default", "a")}
        finally:
            if not reloading.done():  # let the reading thread go
                await asyncio.to_thread(path.write_text, "")
                await reloading
            await broker.shutdown()


class TestRestart:
    """Everything accepted survives a restart (disk channel); a new broker object picks it up."""

    async def test_restart_loses_nothing(self, tmp_path: Path, subscriber: Subscriber) -> None:
        sent = await _backlog_then_restart(tmp_path, subscriber, "")
        assert {e.id for e in subscriber.events} == {e.id for e in sent}

    async def test_a_trigger_added_before_one_with_a_backlog_leaves_it(
            self, tmp_path: Path, subscriber: Subscriber, other_subscriber: Subscriber) -> None:
        """A new trigger starts at the log's end and saves that at once: listed before an old
        trigger with undelivered events, its save deleted every segment the old one had not yet
        been attached to claim (a restart never appends to an old segment): its backlog lost."""
        new = f"  - {{name: a-new-one, subscriber: '{other_subscriber.url}'}}\n"
        sent = await _backlog_then_restart(tmp_path, subscriber, new)
        assert {e.id for e in subscriber.events} == {e.id for e in sent} and not other_subscriber.events

    async def test_a_trigger_stopped_first_at_shutdown_keeps_its_backlog(self, tmp_path: Path) -> None:
        """Shutdown stops the triggers together: one removed first (its subscriber down) had
        its segments collected by another still finishing a delivery, past its checkpoint."""
        from infer_logger.spool import DiskSpool
        from pipelines.broker.channel import SpoolChannel

        channel = SpoolChannel(DiskSpool(tmp_path, segment_bytes=1000))
        down, busy = Handler(lambda e: True), Handler(lambda e: e.id == "late")
        await channel.attach("down", down)
        await channel.attach("busy", busy)
        await channel.append([event(str(i), data=b'"' + b"x" * 100 + b'"') for i in range(30)])
        await until(lambda: len(busy.got) == 30, what="the busy trigger's deliveries")
        await channel.append([event("late")])
        await asyncio.sleep(0.2)
        await channel.aclose(0.2)  # Broker.shutdown's drain_timeout

        again = SpoolChannel(DiskSpool(tmp_path, segment_bytes=1000))
        back = Handler(lambda e: False)
        await again.attach("down", back)
        await until(lambda: len(back.got) == 31, what="the backlog after the restart")
        await again.aclose(0.2)
        assert back.got == [*(str(i) for i in range(30)), "late"]


    @pytest.mark.parametrize("back_by", ["restart", "reload"])
    async def test_a_trigger_removed_while_down_and_added_back_starts_anew(
            self, tmp_path: Path, subscriber: Subscriber, other_subscriber: Subscriber, back_by: str) -> None:
        """Its checkpoint stayed: added back, it got every event sent while it did not exist
        (removed by a reload, its checkpoint goes at once). Knative: a new trigger sees new events."""
        path = tmp_path / "triggers.yaml"

        async def start(*names: str) -> Broker:
            urls = {"a": subscriber.url, "b": other_subscriber.url}
            path.write_text("triggers:\n" + "".join(f"  - {{name: {n}, subscriber: '{urls[n]}'}}\n" for n in names))
            broker = Broker(settings(tmp_path, trigger_files=[path]))
            await broker.startup()
            return broker

        broker = await start("a", "b")
        await _post(broker, event("1"))
        await until(lambda: len(subscriber.events) == 1 and len(other_subscriber.events) == 1, what="1")
        await broker.shutdown()
        broker = await start("a")  # b removed while the broker was down
        await _post(broker, event("gone0"), event("gone1"))
        await until(lambda: len(subscriber.events) == 3, what="the events while b is gone")
        if back_by == "restart":
            await broker.shutdown()
            broker = await start("a", "b")
        else:
            path.write_text(path.read_text() + f"  - {{name: b, subscriber: '{other_subscriber.url}'}}\n")
            assert await broker.reload()
        await _post(broker, event("2"))
        await until(lambda: len(subscriber.events) == 4 and len(other_subscriber.events) >= 2, what="2")
        await broker.shutdown()
        assert [e.id for e in other_subscriber.events] == ["1", "2"]


    async def test_a_channel_a_failed_reload_opened_forgets_removed_triggers_later(
            self, tmp_path: Path, subscriber: Subscriber, monkeypatch: pytest.MonkeyPatch) -> None:
        """A reload that failed after opening a broker's channel left it open: the next one did not
        open it, so it kept the checkpoints of triggers removed while the broker was down."""
        from pipelines.broker.channel import ChannelError, SpoolChannel

        path = tmp_path / "triggers.yaml"
        other = f"  - {{name: old, broker: other, subscriber: '{subscriber.url}'}}\n"
        path.write_text("triggers:\n" + other)
        broker = Broker(settings(tmp_path, trigger_files=[path]))
        await broker.startup()
        await broker.shutdown()
        checkpoint = tmp_path / "broker" / "default" / "other" / "checkpoints" / "old.json"
        assert checkpoint.exists()

        path.write_text(f"triggers:\n  - {{name: a, subscriber: '{subscriber.url}'}}\n")  # `old` removed while down
        broker = Broker(settings(tmp_path, trigger_files=[path]))
        await broker.startup()
        attach = SpoolChannel.attach

        async def failing(self: SpoolChannel, trigger: str, handler: object) -> None:
            raise ChannelError("cannot attach")

        monkeypatch.setattr(SpoolChannel, "attach", failing)
        path.write_text(path.read_text() + f"  - {{name: new, broker: other, subscriber: '{subscriber.url}'}}\n")
        assert not await broker.reload()
        monkeypatch.setattr(SpoolChannel, "attach", attach)
        assert await broker.reload()
        await broker.shutdown()
        assert not checkpoint.exists()


async def _stuck_at_3(tmp_path: Path) -> Any:
    """A disk channel whose trigger `t` delivered events 0 to 9 but 3, which hangs."""
    from infer_logger.spool import DiskSpool
    from pipelines.broker.channel import SpoolChannel

    channel = SpoolChannel(DiskSpool(tmp_path))
    await channel.attach("t", Handler(lambda e: e.id == "3"))
    await channel.append([event(str(i)) for i in range(10)])
    await until(lambda: len(channel._runners["t"].handler.got) == 9, what="the first deliveries")
    return channel


async def _taken_over(channel: Any, by: str, reopen: Callable[[], Any]) -> list[str]:
    """What the runners taking trigger `t` over deliver, up to a new event "last": a changed
    trigger's (`by` "reload"), the next run's after a stop (`reopen` makes its channel), or a
    changed trigger's at once after a restart (the restarted runner stopped before its first read)."""
    new, restarted = Handler(), Handler()
    if by == "reload":
        await channel.replace("t", new, timeout=0.1)
    else:
        await channel.aclose(0.1)
        channel = reopen()
        if by == "restart, reload":
            await channel.attach("t", restarted)
            await channel.replace("t", new, timeout=0.1)
        else:
            await channel.attach("t", new)
    await channel.append([event("last")])
    await until(lambda: "last" in new.got, what="the new runner's deliveries")
    await channel.aclose(0.1)
    return restarted.got + new.got


async def _backlog_then_restart(tmp_path: Path, subscriber: Subscriber, listed_first: str) -> list[CloudEvent]:
    """30 events a trigger's subscriber refused until a stop, then a broker restarted with
    `listed_first` before that trigger; returns them once the subscriber got them again."""
    old = f"  - {{name: t, subscriber: '{subscriber.url}', delivery: {{retry: 1000, backoffDelay: PT0.05S}}}}\n"
    subscriber.fail_with = 503
    first = Broker(settings(tmp_path, drain_timeout=0.2), triggers="triggers:\n" + old)
    await first.startup()
    sent = [event(str(i)) for i in range(30)]
    await _post(first, *sent)
    await until(lambda: subscriber.attempts >= 30, what="first attempts")
    await first.shutdown()

    subscriber.fail_with = None
    second = Broker(settings(tmp_path), triggers="triggers:\n" + listed_first + old)
    await second.startup()
    try:
        await asyncio.to_thread(subscriber.wait_for, 30)
    finally:
        await second.shutdown()
    return sent


async def test_a_reload_still_reading_at_shutdown_opens_nothing(tmp_path: Path, subscriber: Subscriber) -> None:
    """Its files are read on a thread: one that finished after shutdown opened channels (and
    their Kafka clients) that nothing closed."""
    import threading

    path = tmp_path / "triggers.yaml"
    path.write_text(f"triggers: [{{name: a, subscriber: '{subscriber.url}'}}]\n")
    broker = Broker(settings(tmp_path, trigger_files=[path]))
    await broker.startup()
    load, release = broker._load, threading.Event()

    def slow_load():  # type: ignore[no-untyped-def]
        release.wait(10)
        return load()

    broker._load = slow_load  # type: ignore[method-assign]
    path.write_text(f"triggers: [{{name: a, broker: other, subscriber: '{subscriber.url}'}}]\n")
    reload = asyncio.create_task(broker.reload())
    await asyncio.sleep(0.1)
    await broker.shutdown()
    release.set()
    assert not await reload
    assert broker.channels == {}


async def test_a_reload_closes_the_inline_components_no_trigger_uses(tmp_path: Path) -> None:
    """`subscriber: {component: {...}}` changed or removed by a reload stayed open until the
    broker exited: each SIGHUP kept another SQLite connection (an explainer's model and threads)."""
    triggers = tmp_path / "t.yaml"

    def write(i: int, dead_letter: int | None = None) -> None:
        delivery = "" if dead_letter is None else (
            f"\n    delivery: {{deadLetterSink: {{component: {{type: store, path: '{tmp_path}/dl{dead_letter}.db'}}}}}}")
        triggers.write_text(f"triggers:\n  - name: audit\n    subscriber: {{component: {{type: store, "
                            f"path: '{tmp_path}/audit{i}.db'}}}}{delivery}\n"
                            f"  - name: kept\n    subscriber: {{component: {{type: store, path: '{tmp_path}/kept.db'}}}}\n")

    def stores(broker: Broker) -> list[str]:
        return sorted(Path(c.store.path).name for c in broker.components._live.values())  # type: ignore[attr-defined]

    write(0, dead_letter=0)
    broker = Broker(settings(tmp_path, trigger_files=[triggers]))
    await broker.startup()
    try:
        for i in range(1, 4):
            write(i, dead_letter=0)
            assert await broker.reload()
        assert stores(broker) == ["audit3.db", "dl0.db", "kept.db"]
        triggers.write_text("triggers:\n  - name: audit\n    subscriber: {component: {type: nope}}\n")
        assert not await broker.reload()  # a bad file changes nothing
        assert stores(broker) == ["audit3.db", "dl0.db", "kept.db"]
        triggers.write_text("triggers: []\n")
        assert await broker.reload()
        assert stores(broker) == []
    finally:
        await broker.shutdown()


async def test_a_reload_failing_within_the_switch_closes_no_component_a_trigger_runs(tmp_path: Path) -> None:
    """Trigger a switched to its new inline store, then attaching b failed: the prune, judging by
    the dispatchers of before, closed a's new store, and a's events were given up."""
    triggers = tmp_path / "t.yaml"
    line = "  - name: {}\n    subscriber: {{component: {{type: store, path: '{}'}}}}\n"
    triggers.write_text("triggers:\n" + line.format("a", tmp_path / "a1.db"))
    broker = Broker(settings(tmp_path, trigger_files=[triggers]))
    await broker.startup()
    try:
        spool = broker.channels[broker.default_key].spool  # type: ignore[attr-defined]
        reader = spool.reader

        def failing(name: str) -> Any:  # b's attach fails: an I/O error
            if name == "b":
                raise OSError(errno.EIO, "Input/output error")
            return reader(name)

        spool.reader = failing
        triggers.write_text("triggers:\n" + line.format("a", tmp_path / "a2.db") + line.format("b", tmp_path / "b.db"))
        assert not await broker.reload()
        await _post(broker, *(event(f"e{i}", REQUEST, b'{"instances": [1]}') for i in range(3)))
        await until(lambda: (tmp_path / "a2.db").exists() and len(AuditStore(tmp_path / "a2.db", readonly=True)
                                                                    .query(limit=10)) == 3, timeout=10)
        # Back to the file of before: a runs its first store again (it replaced nothing, taking
        # its old runner for the one running, and closed the store it ran).
        triggers.write_text("triggers:\n" + line.format("a", tmp_path / "a1.db"))
        assert await broker.reload()
        await _post(broker, *(event(f"f{i}", REQUEST, b'{"instances": [1]}') for i in range(3)))
        await until(lambda: (tmp_path / "a1.db").exists() and len(AuditStore(tmp_path / "a1.db", readonly=True)
                                                                    .query(limit=10)) == 3, timeout=10)
    finally:
        await broker.shutdown()


class _Held(Subscriber):
    """Holds every request until `gate` is set (its server's loop goes on meanwhile)."""

    def __init__(self) -> None:
        super().__init__()
        self.gate, self.held = threading.Event(), 0

    async def __call__(self, scope: dict[str, Any], receive: Any, send: Any) -> None:
        if scope["type"] == "http":
            with self._cond:
                self.held += 1
            await asyncio.to_thread(self.gate.wait, 60)  # a bound, in case the test fails first
        await super().__call__(scope, receive, send)


async def test_a_reload_removes_its_triggers_side_by_side(tmp_path: Path) -> None:
    """Each removed trigger waits for its deliveries in flight (up to the drain timeout): one after
    another, a reload removing n triggers of a slow subscriber took n drain timeouts."""
    held = _Held()
    held.start()
    path = tmp_path / "triggers.yaml"
    path.write_text("triggers:\n" + "".join(f"  - {{name: t{i}, subscriber: '{held.url}'}}\n" for i in range(3)))
    broker = Broker(settings(tmp_path, trigger_files=[path], drain_timeout=60.0,
                             delivery={"retry": 0, "timeout": "PT60S"}))
    await broker.startup()
    reload = None
    try:
        await _post(broker, event("e1"))
        await until(lambda: held.held == 3, 10, "each trigger's delivery held")
        path.write_text(f"triggers: [{{name: t0, subscriber: '{held.url}'}}]\n")
        reload = asyncio.create_task(broker.reload())
        runners = broker.channels[broker.default_key]._runners  # type: ignore[attr-defined]
        await until(lambda: set(runners) == {"t0"}, 20, "both removed triggers stopping together")
        held.gate.set()
        assert await reload
        assert set(broker.triggers) == {("default", "t0")}
    finally:
        held.gate.set()
        if reload is not None:
            await asyncio.gather(reload, return_exceptions=True)
        await broker.shutdown()
        held.stop()


async def test_the_logs_batches_are_held_to_a_byte_budget_and_so_is_their_cache(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A batch was `batch_size` events whatever their size (up to max_event_bytes each: 100 MiB),
    and 64 such batches were kept decoded for the other triggers."""
    from infer_logger.spool import DiskSpool
    from pipelines.broker import channel as channel_module
    from pipelines.broker.channel import SpoolChannel

    monkeypatch.setattr(channel_module, "BATCH_BYTES", 1 << 20)
    monkeypatch.setattr(channel_module, "_CACHE_BYTES", 3 << 20)
    channel = SpoolChannel(DiskSpool(tmp_path))
    handler = Handler()
    await channel.attach("t", handler)
    sent = [event(str(i), data=b'"' + b"x" * (200 << 10) + b'"') for i in range(40)]  # 8 MiB in all
    await channel.append(sent)
    reader = channel.spool.reader("other")  # type: ignore[union-attr]
    position, batches = reader.position, []
    while True:
        events, position = channel.read(reader, position)
        if not events:
            break
        batches.append(sum(len(e.data or b"") for e in events))
        assert channel._cached_bytes <= 3 << 20
    await until(lambda: len(handler.got) == 40, what="every event")
    await channel.aclose(1.0)
    assert handler.got == [e.id for e in sent]
    assert len(batches) > 1 and max(batches) <= 1 << 20


async def test_the_logs_cached_batches_weigh_their_attributes_too(tmp_path: Path,
                                                                   monkeypatch: pytest.MonkeyPatch) -> None:
    """Weighed by their data alone, events whose weight is an extension were cached as nothing:
    64 batches of them whatever their size."""
    from infer_logger.spool import DiskSpool
    from pipelines.broker import channel as channel_module
    from pipelines.broker.channel import SpoolChannel, pack

    monkeypatch.setattr(channel_module, "BATCH_BYTES", 1 << 20)
    monkeypatch.setattr(channel_module, "_CACHE_BYTES", 1 << 20)
    spool = DiskSpool(tmp_path)
    channel = SpoolChannel(spool)
    reader = spool.reader("t")
    for i in range(20):
        spool.append(pack(event(str(i), data=None, note="x" * (200 << 10))))
    position, held = reader.position, []
    while True:
        events, position = channel.read(reader, position)
        if not events:
            break
        held.append(sum(channel_module.event_size(e) for batch in channel._cache.values() for e in batch[0]))
    await channel.aclose(1.0)
    assert len(held) > 1 and max(held) <= 1 << 20


async def test_a_reload_whose_trigger_changes_fail_side_by_side_logs_each(
        tmp_path: Path, subscriber: Subscriber, caplog: pytest.LogCaptureFixture) -> None:
    """Run side by side, the failures after the first one raised were dropped unsaid."""
    triggers = tmp_path / "t.yaml"
    triggers.write_text("triggers: []\n")
    broker = Broker(settings(tmp_path, trigger_files=[triggers]))
    await broker.startup()
    try:
        spool = broker.channels[broker.default_key].spool  # type: ignore[attr-defined]

        def failing(name: str) -> Any:
            raise OSError(errno.EIO, f"Input/output error ({name})")

        spool.reader = failing
        triggers.write_text("triggers:\n" + "".join(f"  - {{name: {n}, subscriber: '{subscriber.url}'}}\n"
                                                    for n in ("b", "c")))
        assert not await broker.reload()
        assert "a trigger change failed too" in caplog.text
        assert "(b)" in caplog.text and "(c)" in caplog.text
    finally:
        await broker.shutdown()

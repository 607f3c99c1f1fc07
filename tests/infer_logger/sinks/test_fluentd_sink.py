"""The fluentd sink against the forward source over real loopback sockets: round trips, acks,
outages, auth; and fluentd/fluent.conf checked structurally (no Fluentd runs here)."""

from __future__ import annotations

import asyncio
import re
from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import msgpack
import pytest

from infer_logger import events as ev
from infer_logger.cloudevents.event import CloudEvent
from infer_logger.dispatch import Backoff, Dispatcher
from infer_logger.errors import RejectedError, SinkError
from infer_logger.metrics import Metrics
from infer_logger.sinks.fluentd import FluentdSink, FluentdSinkConfig, event_ns, tag_for
from infer_logger.sinks.memory import MemorySink
from infer_logger.spool import DiskSpool
from infer_logger.testing import free_port
from pipelines.sources.forward import ForwardSource, ForwardSourceConfig
from tests.waiting import until

NS = 1_000_000_000
CONF = Path(__file__).resolve().parents[3] / "fluentd" / "fluent.conf"


def exchange(i: int, service: str = "iris") -> list[CloudEvent]:
    """The request, response and explanation events of one prediction (one id)."""
    base = {"specversion": "1.0", "id": f"id-{i}", "source": "http://logger:8080",
            "inferenceservicename": service, "namespace": "ns1", "component": "predictor",
            "endpoint": "default", "modelname": "iris", "protocol": "v1",
            "datacontenttype": "application/json"}
    return [
        CloudEvent({**base, "type": ev.REQUEST, "time": "2026-01-02T03:04:05.123456Z"},
                   b'{"instances":[[5.1,3.5,1.4,0.2]]}'),
        CloudEvent({**base, "type": ev.RESPONSE, "time": "2026-01-02T03:04:05.234567891Z",
                    "statuscode": 200, "latencyms": 12, "truncated": False}, b'{"predictions":[%d]}' % i),
        CloudEvent({**base, "type": ev.EXPLANATION, "datacontenttype": "application/octet-stream"},
                   b"\x00\xffraw"),
    ]


@pytest.fixture
async def memory() -> MemorySink:
    return MemorySink()


@pytest.fixture
async def source(memory: MemorySink) -> AsyncIterator[ForwardSource]:
    async with ForwardSourceConfig(port=0).build(memory) as src:
        yield src


@pytest.fixture
async def sink(source: ForwardSource) -> AsyncIterator[FluentdSink]:
    s = FluentdSinkConfig(port=source.port, timeout=2).build()
    yield s
    await s.aclose()


class Slow:
    """A subscriber taking `delay` seconds over every batch, then handing it on."""

    def __init__(self, memory: MemorySink, delay: float) -> None:
        self.memory, self.delay = memory, delay

    async def send_batch(self, events: Sequence[CloudEvent]) -> None:
        await asyncio.sleep(self.delay)
        await self.memory.send_batch(events)

    async def aclose(self) -> None:
        pass


class TestRoundTrip:
    """Events sent by the sink come out of the source equal, tagged and timed as specified."""

    async def test_events_come_back_equal(self, sink: FluentdSink, memory: MemorySink) -> None:
        sent = exchange(1) + exchange(2, service="wine")
        await sink.send_batch(sent)
        assert sorted(memory.events, key=repr) == sorted(sent, key=repr)
        tags = {(e.id, e.type): e.meta["fluentd-tag"] for e in memory.events}
        assert tags[("id-1", ev.REQUEST)] == "inference.iris.request"
        assert tags[("id-2", ev.RESPONSE)] == "inference.wine.response"
        assert tags[("id-1", ev.EXPLANATION)] == "inference.iris.explanation"
        assert (sink.records, sink.frames, sink.errors) == (6, 6, 0)  # one frame per tag

    async def test_nanosecond_event_time(self, sink: FluentdSink, memory: MemorySink) -> None:
        await sink.send_batch(exchange(1)[:2])
        times = {e.type: int(e.meta["fluentd-time"]) for e in memory.events}
        assert times[ev.REQUEST] == 1767323045_123456000
        assert times[ev.RESPONSE] == 1767323045_234567891

    @pytest.mark.parametrize(("time", "ns"), [
        ("1969-12-31T23:59:59.5Z", -1 * NS),  # before EventTime's unsigned seconds begin...
        ("2107-01-01T00:00:00Z", 4323283200 * NS),  # ... and past their end: integer seconds
    ])
    async def test_time_eventtime_cannot_hold(
            self, sink: FluentdSink, memory: MemorySink, time: str, ns: int) -> None:
        [request] = [CloudEvent({**e.attributes, "time": time}, e.data) for e in exchange(1)[:1]]
        await sink.send_batch([request])
        assert memory.events == [request] and memory.events[0].meta["fluentd-time"] == str(ns)

    async def test_event_that_cannot_be_packed_is_rejected(
            self, sink: FluentdSink, memory: MemorySink) -> None:
        good, _, _ = exchange(1)
        bad = CloudEvent({**good.attributes, "id": "lone \udc80 surrogate"}, good.data)
        with pytest.raises(RejectedError, match="1 event.* cannot be packed") as caught:
            await sink.send_batch([good, bad])
        assert caught.value.events == [bad] and memory.events == [good]
        assert sink.errors == 0 and sink.records == 1

    @pytest.mark.parametrize("depth", [255, 600, 1023, 1024])
    async def test_json_data_nested_deeper_than_orjson_writes_comes_back_equal(
            self, sink: FluentdSink, memory: MemorySink, depth: int) -> None:
        """Valid JSON (orjson reads 1024 levels, writes 254) goes as data_base64: 1023 deep, the
        entry nested past what msgpack reads and the source refused the frame for ever; 1024 deep,
        the sink could not pack it and dead-lettered it."""
        request = exchange(1)[0]
        deep = CloudEvent({**request.attributes, "id": "deep"}, b"[" * depth + b"]" * depth)
        await sink.send_batch([deep, request])
        assert memory.events == [deep, request] and memory.events[0].data == deep.data

    async def test_integers_past_64_bits_come_back_equal(self, sink: FluentdSink, memory: MemorySink) -> None:
        """orjson reads them as floats: the record carried 1.2345678901234568e+29 for the
        client's 123456789012345678901234567890. Such data goes as data_base64."""
        request = exchange(1)[0]
        big = CloudEvent({**request.attributes, "id": "big"},
                         b'{"instances":[[123456789012345678901234567890,-9223372036854775809]]}')
        near = CloudEvent({**request.attributes, "id": "near"}, b'[9223372036854775807,-9223372036854775808,18446744073709551615]')
        await sink.send_batch([big, near])
        assert memory.events == [big, near]

    @pytest.mark.parametrize("compress", [False, True])
    async def test_a_big_batch_goes_in_frames_the_source_takes(
            self, memory: MemorySink, compress: bool) -> None:
        """max_frame_bytes of entries per frame, each acked; an event bigger than that alone."""
        request = exchange(1)[0]
        sizes = [5000] * 20 + [40_000, 10]
        sent = [CloudEvent({**request.attributes, "id": f"e{i}"}, b'"%s"' % (b"x" * n))
                for i, n in enumerate(sizes)]
        async with ForwardSourceConfig(port=0, max_frame_bytes=65536).build(memory) as src:
            sink = FluentdSinkConfig(port=src.port, max_frame_bytes=32768, compress=compress).build()
            await sink.send_batch(sent)
            await sink.aclose()
            assert src.acks == sink.frames == 6  # 6 + 6 + 6 + 2 of 5 KB, the 40 KB one alone, the last
        assert memory.events == sent

    async def test_frames_hold_at_most_max_frame_events(
            self, sink: FluentdSink, source: ForwardSource, memory: MemorySink) -> None:
        attributes = exchange(1)[0].attributes
        sent = [CloudEvent({**attributes, "id": f"e{i}"}, b"1") for i in range(250)]
        await sink.send_batch(sent)
        assert sink.frames == source.acks == 3 and memory.events == sent  # 100 + 100 + 50

    async def test_compressed(self, source: ForwardSource, memory: MemorySink) -> None:
        sink = FluentdSinkConfig(port=source.port, compress=True).build()
        await sink.send_batch(exchange(1))
        await sink.aclose()
        assert sorted(memory.events, key=repr) == sorted(exchange(1), key=repr)

    async def test_ack_off_still_delivers(self, source: ForwardSource, memory: MemorySink) -> None:
        sink = FluentdSinkConfig(port=source.port, ack=False).build()
        await sink.send_batch(exchange(1))
        await sink.aclose()
        deadline = asyncio.get_running_loop().time() + 5
        while len(memory.events) < 3 and asyncio.get_running_loop().time() < deadline:
            await asyncio.sleep(0.01)
        assert len(memory.events) == 3 and source.acks == 0

    async def test_connection_is_reused(self, sink: FluentdSink, source: ForwardSource) -> None:
        for i in range(5):
            await sink.send_batch(exchange(i))
        assert (sink.connects, sink.reconnects, source.connections) == (1, 0, 1)


class TestFailures:
    """Nothing unacked counts as sent: SinkError keeps it in the spool until it is delivered."""

    async def test_refused_at_start(self) -> None:
        port = free_port()
        sink = FluentdSinkConfig(port=port, timeout=2).build()
        with pytest.raises(SinkError, match=f"cannot connect to fluentd at 127.0.0.1:{port}"):
            await sink.send_batch(exchange(1))
        assert sink.errors == 1
        await sink.aclose()

    async def test_server_restart_loses_nothing(self, memory: MemorySink) -> None:
        """Stopped between batches, restarted on the same port: errors while down, then all arrives."""
        src = ForwardSourceConfig(port=0).build(memory)
        await src.start()
        port = src.port
        sink = FluentdSinkConfig(port=port, timeout=2).build()
        batches = [exchange(i) for i in range(6)]
        failures = 0
        for n, batch in enumerate(batches):
            if n == 2:
                await src.aclose()
            if n == 4:
                src = ForwardSourceConfig(port=port).build(memory)
                await src.start()
            for _attempt in range(3):  # what the spool's worker does: retry the same batch
                try:
                    await sink.send_batch(batch)
                    break
                except SinkError:
                    failures += 1
                    if n >= 4:
                        await asyncio.sleep(0.05)
        await sink.aclose()
        await src.aclose()
        assert failures == 6  # batches 2 and 3, three attempts each
        delivered = {(e.id, e.type) for e in memory.events}
        assert {(e.id, e.type) for e in (batches[0] + batches[1] + batches[4] + batches[5])} <= delivered
        assert not {e.id for e in batches[2] + batches[3]} & {e.id for e in memory.events}
        # The spool would now resend batches 2 and 3: they go through.
        sink = FluentdSinkConfig(port=port, timeout=2).build()
        async with ForwardSourceConfig(port=port).build(memory):
            await sink.send_batch(batches[2] + batches[3])
        await sink.aclose()
        assert {(e.id, e.type) for b in batches for e in b} == {(e.id, e.type) for e in memory.events}

    async def test_reconnects_and_errors_reach_the_metrics(self, memory: MemorySink, tmp_path: Path) -> None:
        """Counted by the sink (fluent-logger would not tell) but shown nowhere: issue 3 asks for
        them counted. On /metrics, and in what a delivery process reports to the sidecar."""
        from prometheus_client import generate_latest

        from infer_logger.metrics import export

        src = ForwardSourceConfig(port=0).build(memory)
        await src.start()
        port = src.port
        spool = DiskSpool(tmp_path / "spool")
        metrics = Metrics(spool)
        d = Dispatcher(spool, {"fluentd": FluentdSinkConfig(port=port, timeout=2).build()}, metrics,
                       batch_size=10, backoff=Backoff(initial=0.01, maximum=0.05))
        d.start()
        try:
            for event in exchange(1):
                spool.append(event)
            await until(lambda: len(memory.events) == 3)
            await src.aclose()  # the sink's connection goes with it
            src = ForwardSourceConfig(port=port).build(memory)
            await src.start()
            for event in exchange(2):
                spool.append(event)
            await until(lambda: len(memory.events) == 6)
        finally:
            await d.stop()
            await src.aclose()
            spool.close()
        text = generate_latest(metrics.registry).decode()
        counts = {event: float(n) for event, n in re.findall(
            r'infer_logger_sink_client_events_total\{event="(\w+)",sink="fluentd"\} (\S+)', text)}
        assert counts["records"] == 6 and counts["connects"] == 2 and counts["reconnects"] == 1, text
        names = [family[0] for family in export(metrics)["families"]]
        assert "infer_logger_sink_client_events" in names
        # A sidecar started again builds its sinks anew: the counters go on from where they were.
        spool = DiskSpool(tmp_path / "spool2")
        Dispatcher(spool, {"fluentd": FluentdSinkConfig(port=port).build()}, metrics)
        spool.close()
        again = generate_latest(metrics.registry).decode()
        assert 'infer_logger_sink_client_events_total{event="records",sink="fluentd"} 6.0' in again

    async def test_server_stops_while_waiting_for_the_ack(self) -> None:
        started = asyncio.Event()
        got: list[CloudEvent] = []

        class SlowThenFast:
            slow = True

            async def send_batch(self, events: Sequence[CloudEvent]) -> None:
                if self.slow:
                    started.set()
                    await asyncio.sleep(30)
                got.extend(events)

        subscriber = SlowThenFast()
        src = ForwardSourceConfig(port=0).build(subscriber)
        await src.start()
        sink = FluentdSinkConfig(port=src.port, timeout=5).build()
        pending = asyncio.create_task(sink.send_batch(exchange(1)))
        await asyncio.wait_for(started.wait(), 5)
        await src.aclose()
        with pytest.raises(SinkError, match="closed by fluentd"):
            await pending
        subscriber.slow = False
        async with ForwardSourceConfig(port=src.port).build(subscriber):
            await sink.send_batch(exchange(1))
        assert len(got) == 3 and sink.reconnects == 1 and sink.errors == 1
        await sink.aclose()

    async def test_a_slow_but_steady_receiver_is_waited_for(self, memory: MemorySink) -> None:
        """Each frame is acked well within `timeout`, the whole batch is not: one timeout for the
        batch had every attempt time out, and the same batch was sent again for ever."""
        async with ForwardSourceConfig(port=0, max_frame_entries=10).build(Slow(memory, 0.1)) as src:
            sink = FluentdSinkConfig(port=src.port, timeout=2.0, max_frame_events=20).build()
            sent = [CloudEvent({**exchange(1)[0].attributes, "id": f"e{i}"}, b"1") for i in range(400)]
            # 40 slices of 10 events, 0.1 s each: a frame acked every 0.2 s, the batch 4 s or more.
            await sink.send_batch(sent)
            await sink.aclose()
        assert memory.events == sent and (sink.errors, src.acks) == (0, 20)

    async def test_a_receiver_reading_one_big_frame_slowly_but_steadily_is_waited_for(self) -> None:
        """The kernel took the frame's bytes at once (loopback's socket buffers hold megabytes),
        the receiver read them for longer than `timeout`, and then acked: progress was only what
        the kernel took, every try timed out, and the same frame went again for ever."""
        frames: list[Any] = []

        async def serve(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
            unpacker = msgpack.Unpacker(raw=False, max_buffer_size=64 << 20)
            while data := await reader.read(16384):
                unpacker.feed(data)
                for frame in unpacker:
                    frames.append(frame)
                    writer.write(msgpack.packb({"ack": frame[2]["chunk"]}))
                await asyncio.sleep(0.01)  # ~1.6 MB/s
            writer.close()

        server = await asyncio.start_server(serve, "127.0.0.1", 0)
        sink = FluentdSinkConfig(port=server.sockets[0].getsockname()[1], timeout=1.0).build()
        try:
            big = b'"%s"' % (b"x" * 60_000)
            sent = [CloudEvent({**exchange(1)[0].attributes, "id": f"e{i}"}, big) for i in range(100)]
            await sink.send_batch(sent)  # one 6 MB frame, seconds to read
        finally:
            await sink.aclose()
            server.close()
        assert sink.errors == 0 and len(frames) == 1

    async def test_a_slow_reader_is_waited_for(self, memory: MemorySink) -> None:
        """Without acks, the wait is for the receiver to take the bytes: a big batch on a slow link
        timed out while the receiver was still reading it."""
        async with ForwardSourceConfig(port=0).build(Slow(memory, 0.25)) as src:
            sink = FluentdSinkConfig(port=src.port, timeout=1.5, ack=False, max_frame_bytes=1 << 20).build()
            big = b'"%s"' % (b"x" * (1 << 20))
            sent = [CloudEvent({**exchange(1)[0].attributes, "id": f"e{i}"}, big) for i in range(20)]
            # 20 MiB, frames of 1 MiB the receiver reads one per 0.25 s: seconds past the 1.5 s
            # timeout, less what the socket buffers hold.
            await sink.send_batch(sent)
            await until(lambda: len(memory.events) == 20, timeout=30)
            await sink.aclose()
        assert memory.events == sent and sink.errors == 0

    async def test_slow_server_times_out(self, memory: MemorySink) -> None:
        slow = Slow(memory, 10.0)  # far past the timeout (the source's close cancels it)
        async with ForwardSourceConfig(port=0).build(slow) as src:
            # 2 s: the second send's connect, frame and ack must fit in it on a loaded machine.
            sink = FluentdSinkConfig(port=src.port, timeout=2.0).build()
            with pytest.raises(SinkError, match="took no bytes and acked nothing for 2.0 s"):
                await sink.send_batch(exchange(1))
            slow.delay = 0.0
            await sink.send_batch(exchange(2))  # on a new connection: late acks cannot confuse it
            assert (sink.errors, sink.reconnects) == (1, 1)
            await sink.aclose()
        assert {e.id for e in memory.events} >= {"id-2"}


def numbered(n: int) -> list[CloudEvent]:
    return [CloudEvent({**exchange(1)[0].attributes, "id": f"e{i}"}, b"1") for i in range(n)]


async def through_a_worker(tmp_path: Path, source: ForwardSourceConfig, subscriber: Any,
                           sent: list[CloudEvent], *, batch_size: int, **sink: Any) -> tuple[Dispatcher, FluentdSink]:
    """`sent` through a spool and a sink worker to a Forward source handing them to `subscriber`,
    until the worker caught up; the dispatcher and the sink, stopped."""
    spool = DiskSpool(tmp_path / "spool")
    async with source.build(subscriber) as src:
        fluentd = FluentdSinkConfig(port=src.port, **sink).build()
        d = Dispatcher(spool, {"fluentd": fluentd}, Metrics(spool), batch_size=batch_size,
                       backoff=Backoff(initial=0.01, maximum=0.1), deadletter_dir=tmp_path / "dead")
        for event in sent:
            spool.append(event)
        d.start()
        await until(lambda: d.workers[0].reader.lag() == 0)
        await d.stop()
        await fluentd.aclose()
    spool.close()
    return d, fluentd


async def until_refused(sink: FluentdSink, event: CloudEvent, tries: int) -> RejectedError | None:
    """`event` sent as the worker sends it again, until refused for good (at most `tries` times)."""
    for _ in range(tries):
        try:
            await sink.send_batch([event])
        except RejectedError as exc:
            return exc
        except SinkError:
            pass
    return None


class TestBehindTheWorker:
    """The sink behind a real spool and worker, the source its receiver."""

    @pytest.mark.parametrize("depth", [300, 600, 1023])
    async def test_deeply_nested_json_data_blocks_nothing(
            self, source: ForwardSource, memory: MemorySink, tmp_path: Path, depth: int) -> None:
        """One such event had its batch resent for ever, and nothing behind it was delivered."""
        spool = DiskSpool(tmp_path / "spool")
        sink = FluentdSinkConfig(port=source.port, timeout=2).build()
        d = Dispatcher(spool, {"fluentd": sink}, Metrics(spool), batch_size=10,
                       backoff=Backoff(initial=0.01, maximum=0.1), deadletter_dir=tmp_path / "dead")
        request = exchange(0)[0]
        sent = [CloudEvent({**request.attributes, "id": "deep"}, b"[" * depth + b"]" * depth)]
        sent += [CloudEvent({**request.attributes, "id": f"e{i}"}, request.data) for i in range(30)]
        for event in sent:
            spool.append(event)
        d.start()
        await until(lambda: len(memory.events) >= len(sent))
        await d.stop()
        await sink.aclose()
        assert memory.events == sent and d.metrics.retried.labels("fluentd")._value.get() == 0
        assert d.workers[0].reader.read(100)[0] == [] and not (tmp_path / "dead").exists()
        spool.close()

    async def test_a_slow_but_steady_receiver_gets_every_event_once(
            self, memory: MemorySink, tmp_path: Path) -> None:
        """A batch the receiver took longer than `timeout` over timed out every time: the spool
        never moved and the receiver got the same events again and again."""
        sent = numbered(400)
        d, _ = await through_a_worker(tmp_path, ForwardSourceConfig(port=0, max_frame_entries=10),
                                      Slow(memory, 0.05), sent, batch_size=200, timeout=0.5,
                                      max_frame_events=10)
        assert memory.events == sent and d.metrics.retried.labels("fluentd")._value.get() == 0

    async def test_a_failed_batch_sends_again_only_its_frames_not_acked(
            self, memory: MemorySink, tmp_path: Path) -> None:
        """Frames are acked one by one, yet a failure had every frame of the batch sent again:
        the receiver got the acked ones twice."""

        class RefusesOnce:
            refused = False

            async def send_batch(self, events: Sequence[CloudEvent]) -> None:
                if events[0].id == "e10" and not self.refused:  # the second frame, once
                    self.refused = True
                    raise SinkError("not now")
                await memory.send_batch(events)

            async def aclose(self) -> None:
                pass

        sent = numbered(30)
        d, sink = await through_a_worker(tmp_path, ForwardSourceConfig(port=0), RefusesOnce(), sent,
                                         batch_size=30, timeout=2, max_frame_events=10)
        assert sorted(e.id for e in memory.events) == sorted(e.id for e in sent)  # each once
        assert d.metrics.retried.labels("fluentd")._value.get() == 1
        assert (sink.records, sink.frames) == (30, 3)  # the frame acked in the failed try too


class TestSharedKey:
    """The client side of the handshake against the source's server side."""

    async def test_right_key(self, memory: MemorySink) -> None:
        async with ForwardSourceConfig(port=0, shared_key="k", users={"bob": "pw"}).build(memory) as src:
            sink = FluentdSinkConfig(port=src.port, shared_key="k", username="bob", password="pw").build()
            await sink.send_batch(exchange(1))
            await sink.aclose()
        assert len(memory.events) == 3

    @pytest.mark.parametrize(("key", "user", "message"), [
        ("wrong", "bob", "refused the handshake: shared_key mismatch"),
        ("k", "eve", "refused the handshake: username/password mismatch"),
        (None, "", "wants the shared-key handshake"),
    ])
    async def test_refused(self, memory: MemorySink, key: str | None, user: str, message: str) -> None:
        async with ForwardSourceConfig(port=0, shared_key="k", users={"bob": "pw"}).build(memory) as src:
            sink = FluentdSinkConfig(port=src.port, shared_key=key, username=user, password="pw", timeout=2).build()
            with pytest.raises(SinkError, match=message):
                await sink.send_batch(exchange(1))
            await sink.aclose()
        assert memory.events == []

    async def test_server_without_security(self, source: ForwardSource) -> None:
        sink = FluentdSinkConfig(port=source.port, shared_key="k", timeout=0.5).build()
        # Connected: said so, not "cannot connect ... timed out"
        with pytest.raises(SinkError, match=r"sent no HELO or PONG within 0.5 s \(is `<security>` configured there\?\)"):
            await sink.send_batch(exchange(1))
        await sink.aclose()


class TestPieces:
    def test_tags(self) -> None:
        request, _response, explanation = exchange(1, service="My.svc")
        assert tag_for(request, "inference") == "inference.my-svc.request"
        assert tag_for(explanation, "a.b") == "a.b.my-svc.explanation"
        other = CloudEvent({"specversion": "1.0", "id": "x", "source": "/", "type": "com.example.Thing"})
        assert tag_for(other, "inference") == "inference.unknown.thing"

    def test_event_time_with_offset(self) -> None:
        event = CloudEvent({"time": "2026-01-02T05:04:05.5+02:00", "id": "x", "type": "t", "source": "/"})
        assert event_ns(event) == 1767323045_500000000

    def test_config(self) -> None:
        config = FluentdSinkConfig.model_validate({"type": "fluentd", "port": 24225, "shared_key": "s3cr3t"})
        assert config.sink_name == "fluentd" and "s3cr3t" not in repr(config)
        with pytest.raises(ValueError):
            FluentdSinkConfig.model_validate({"type": "fluentd", "tag_prefix": "bad prefix"})


@dataclass
class Directive:
    name: str
    arg: str
    params: dict[str, str] = field(default_factory=dict)
    children: list[Directive] = field(default_factory=list)


def parse_conf(text: str) -> list[Directive]:
    """Fluentd's config as nested directives; AssertionError on imbalance or a stray parameter."""
    stack = [Directive("", "")]
    for number, raw in enumerate(text.splitlines(), 1):
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        if close := re.fullmatch(r"</(\w+)>", line):
            opened = stack.pop()
            assert close.group(1) == opened.name, f"line {number}: </{close.group(1)}> closes <{opened.name}>"
        elif open_ := re.fullmatch(r"<(\w+)\s*([^>]*)>", line):
            directive = Directive(open_.group(1), open_.group(2))
            stack[-1].children.append(directive)
            stack.append(directive)
        else:
            assert len(stack) > 1, f"line {number}: parameter outside a directive"
            key, _, value = line.partition(" ")
            stack[-1].params[key] = value.strip()
    assert len(stack) == 1, f"unclosed <{stack[-1].name}>"
    return stack[0].children


class TestFluentConf:
    """fluentd/fluent.conf: balanced, forward in, per-kind reshaping, Elasticsearch upsert by id out."""

    def test_structure(self) -> None:
        tree = parse_conf(CONF.read_text())
        sources = [d for d in tree if d.name == "source"]
        assert [s.params["@type"] for s in sources] == ["forward"] and sources[0].params["port"] == "24224"
        filters = {d.arg: d for d in tree if d.name == "filter"}
        for kind in ("request", "response", "explanation"):
            reshape = filters[f"inference.*.{kind}"]
            assert reshape.params["@type"] == "record_transformer" and reshape.params["renew_record"] == "true"
            [record] = [c for c in reshape.children if c.name == "record"]
            # The audit document's fields (infer_logger/audit.py), this kind's part of them.
            assert {"id", "namespace", kind, f"{kind}_time", f"{kind}_attributes"} <= set(record.params)
        shared = {"model", "model_version", "service", "component", "endpoint", "protocol", "path", "metadata"}
        request, response = (filters[f"inference.*.{k}"].children[0].params for k in ("request", "response"))
        assert shared <= set(request) and shared | {"status", "latency_ms"} <= set(response)
        assert not shared & set(filters["inference.*.explanation"].children[0].params)
        [match] = [d for d in tree if d.name == "match" and d.arg == "inference.**"]
        assert match.params["@type"] == "elasticsearch"
        assert match.params["id_key"] == "id" and match.params["write_operation"] == "upsert"
        # The elasticsearch sink's default index, the service from the tag the sink wrote.
        assert match.params["index_name"] == "inference-log-${namespace}-${tag[1]}"
        [buffer] = [c for c in match.children if c.name == "buffer"]
        assert {"tag", "namespace"} <= set(buffer.arg.replace(" ", "").split(","))
        assert buffer.params["flush_interval"] == "0.1" and buffer.params["retry_forever"] == "true"

    def test_payloads_go_under_payload_which_the_template_flattens(self) -> None:
        from infer_logger.elasticsearch_template import MAPPINGS

        filters = {d.arg: d for d in parse_conf(CONF.read_text()) if d.name == "filter"}
        for kind in ("request", "response", "explanation"):
            [record] = [c for c in filters[f"inference.*.{kind}"].children if c.name == "record"]
            assert record.params[kind].startswith('${Hash["payload", record["data"].is_a?(Hash) ? record["data"] :')
            assert MAPPINGS["properties"][kind]["properties"]["payload"]["type"] == "flattened"

    def test_its_documents_are_taken_whatever_the_payloads_types(self, es_url: str) -> None:
        """The payload whole under <kind> was mapped field by field: numbers and strings in one
        field (a mixed row, a V2 request with FP32 and BYTES inputs) were a mapping conflict,
        and Fluentd's Elasticsearch output dropped that part (400). What the conf's
        record_transformer writes (Fluentd cannot run here), upserted as its output does."""
        import uuid

        import httpx
        import orjson

        from infer_logger.sinks.elasticsearch import ElasticsearchSinkConfig, setup_elasticsearch

        prefix = f"fluentd-{uuid.uuid4().hex[:8]}"
        setup_elasticsearch(ElasticsearchSinkConfig(url=es_url, index=prefix + "-{namespace}"))
        index = f"{prefix}-ns1"
        payloads = {
            "a": {"request": {"instances": [[5.1, 2.0, 3]]}, "response": {"predictions": [1]}},
            "b": {"request": {"instances": [[5.1, "red", 3]]}, "response": {"value": "setosa"}},
            "c": {"request": {"inputs": [{"name": "age", "shape": [1], "datatype": "FP32", "data": [42.0]},
                                         {"name": "text", "shape": [1], "datatype": "BYTES", "data": ["hi"]}]},
                  "explanation": {"explanations": [{"attributions": {"age": 0.1}}]}},
        }
        lines = b""
        for id_, parts in payloads.items():
            for kind, data in parts.items():
                doc = {"id": id_, "namespace": "ns1", kind: {"payload": data}, f"{kind}_attributes": {"id": id_}}
                lines += orjson.dumps({"update": {"_index": index, "_id": id_}}) + b"\n"
                lines += orjson.dumps({"doc": doc, "doc_as_upsert": True}) + b"\n"
        try:
            answer = httpx.post(f"{es_url}/_bulk?refresh=true", content=lines,
                                headers={"content-type": "application/x-ndjson"}, timeout=30).json()
            assert not answer["errors"], [i["update"].get("error") for i in answer["items"]]
            hits = httpx.post(f"{es_url}/{index}/_search", json={"query": {"term": {"request.payload": "red"}}},
                              timeout=30).json()["hits"]["hits"]
            assert [h["_id"] for h in hits] == ["b"]
        finally:
            httpx.delete(f"{es_url}/{index}", timeout=30)
            httpx.delete(f"{es_url}/_index_template/{prefix}", timeout=30)

    def test_durations_carry_no_unit_on_fractions(self) -> None:
        # `0.2s` was seen read as 2 s: fractional durations must be bare seconds.
        settings = [line for line in CONF.read_text().splitlines() if not line.strip().startswith("#")]
        assert not [line for line in settings if re.search(r"\b\d*\.\d+[smhd]\b", line)]

    def test_imbalance_is_caught(self) -> None:
        with pytest.raises(AssertionError):
            parse_conf("<match a>\n  @type null\n</filter>\n")
        with pytest.raises(AssertionError):
            parse_conf("<source>\n  @type forward\n")

    def test_dockerfile(self) -> None:
        text = (CONF.parent / "Dockerfile").read_text()
        assert re.search(r"^FROM fluent/fluentd:v1\.", text, re.MULTILINE)
        assert "fluent-plugin-elasticsearch" in text and "COPY fluent.conf /fluentd/etc/fluent.conf" in text


def sized(i: int, size: int) -> CloudEvent:
    return CloudEvent({**exchange(1)[0].attributes, "id": f"e{i}"}, b'"%s"' % (b"x" * size))


class TestReceiverLimits:
    """A receiver that will not take a frame says so only by silence or a closed connection."""

    async def test_frames_over_the_receivers_limit_go_again_smaller(
            self, memory: MemorySink, tmp_path: Path) -> None:
        """A 2 MB frame to a receiver taking 1 MiB was resent whole for ever: the spool stood."""
        sent = [sized(i, 100_000) for i in range(20)]
        d, _ = await through_a_worker(tmp_path, ForwardSourceConfig(port=0, max_frame_bytes=1 << 20), memory,
                                      sent, batch_size=100, timeout=2)
        assert sorted(e.id for e in memory.events) == sorted(e.id for e in sent)
        assert not (tmp_path / "dead").exists()

    async def test_an_event_too_large_for_the_receiver_alone_is_dead_lettered(
            self, memory: MemorySink, tmp_path: Path) -> None:
        """Cut off alone again and again, it blocked every event behind it. Struck only when the
        receiver took the frames before it: e2 first, then (e1 alone) e2 again as the witness."""
        import orjson

        sent = [sized(0, 10), sized(1, 1_200_000), sized(2, 10)]
        await through_a_worker(tmp_path, ForwardSourceConfig(port=0, max_frame_bytes=1 << 20), memory,
                               sent, batch_size=100, timeout=2, max_frame_events=1)
        assert {e.id for e in memory.events} == {"e0", "e2"}
        [dead] = [orjson.loads(line) for line in (tmp_path / "dead" / "fluentd.jsonl").read_bytes().splitlines()]
        assert "e1" in str(dead) and "too large" in str(dead)

    async def test_a_witness_goes_only_where_a_close_is_to_be_tested(self) -> None:
        """A receiver that closed once on a big event (a restart), then drops it without a word
        (Fluentd past chunk_size_limit: sent again until its limit is raised): the small event
        acked before went again as the witness on every retry, a duplicate each."""
        import io

        silent, taken = False, []

        async def serve(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
            unpacker = msgpack.Unpacker(raw=False, max_buffer_size=64 << 20)
            while data := await reader.read(1 << 16):
                unpacker.feed(data)
                for _tag, entries, option in unpacker:
                    if len(entries) > 1 << 20:
                        if not silent:
                            writer.transport.abort()
                            return
                        continue  # dropped, no ack
                    taken.extend(r["id"] for _, r in msgpack.Unpacker(io.BytesIO(entries), raw=False))
                    writer.write(msgpack.packb({"ack": option["chunk"]}))

        server = await asyncio.start_server(serve, "127.0.0.1", 0)
        sink = FluentdSinkConfig(port=server.sockets[0].getsockname()[1], timeout=0.3).build()
        try:
            await sink.send_batch([sized(0, 10)])
            with pytest.raises(SinkError):
                await sink.send_batch([sized(1, 2_000_000)])  # closed on: a suspect
            silent = True
            for _ in range(6):  # the worker's retries
                with pytest.raises(SinkError):
                    await sink.send_batch([sized(1, 2_000_000)])
        finally:
            await sink.aclose()
            server.close()
        assert taken.count("e0") == 2  # sent, then the one witness after the close

    async def test_a_witness_is_one_the_receiver_still_takes(self, memory: MemorySink,
                                                             monkeypatch: pytest.MonkeyPatch) -> None:
        """Every event big (images): the witness was one the restarted receiver no longer took,
        each try was cut off on it, striking nothing: the suspect was sent again for ever. (No
        small one to vouch with: closes a minute apart strike; here at once.)"""
        from infer_logger.sinks import fluentd

        monkeypatch.setattr(fluentd, "_UNVOUCHED_APART", 0.0)
        port = free_port()
        sink = FluentdSinkConfig(port=port, timeout=2).build()
        try:
            async with ForwardSourceConfig(port=port).build(memory):
                await sink.send_batch([sized(0, 1_200_000)])  # acked: too big to be the witness
            async with ForwardSourceConfig(port=port, max_frame_bytes=1 << 20).build(memory):  # restarted
                refused = await until_refused(sink, sized(1, 2_000_000), 12)  # 1 + 3 closes
        finally:
            await sink.aclose()
        assert refused is not None and refused.too_large, "the lone big event was never refused"
        assert [e.id for e in memory.events] == ["e0"]

    async def test_a_witness_closed_on_goes_a_bounded_number_of_times(
            self, memory: MemorySink, monkeypatch: pytest.MonkeyPatch) -> None:
        """The receiver restarted with a limit below even the witness's size: each try was closed
        on at the witness, striking nothing: the lone big event was sent again for ever."""
        from infer_logger.sinks import fluentd

        monkeypatch.setattr(fluentd, "_WITNESS_CUTS", 3, raising=False)  # 100: a long outage's worth
        monkeypatch.setattr(fluentd, "_UNVOUCHED_APART", 0.0)  # then closes a minute apart strike
        port = free_port()
        sink = FluentdSinkConfig(port=port, timeout=2).build()
        try:
            async with ForwardSourceConfig(port=port).build(memory):
                await sink.send_batch([sized(0, 40_000)])  # the witness
            async with ForwardSourceConfig(port=port, max_frame_bytes=16 << 10).build(memory):
                # 1 close makes the suspect, 3 on the witness, 3 strikes.
                refused = await until_refused(sink, sized(1, 2_000_000), 20)
        finally:
            await sink.aclose()
        assert refused is not None and refused.too_large, "the lone big event was never refused"

    async def test_a_first_event_too_large_for_the_receiver_alone_is_dead_lettered(
            self, memory: MemorySink, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
        """Alone in its batch, with nothing acked before to vouch for the receiver: its closes
        strike it (a minute apart; here at once), or it blocked the spool for ever."""
        from infer_logger.sinks import fluentd

        monkeypatch.setattr(fluentd, "_UNVOUCHED_APART", 0.0)
        sent = [sized(0, 1_200_000), sized(1, 10)]
        await through_a_worker(tmp_path, ForwardSourceConfig(port=0, max_frame_bytes=1 << 20), memory,
                               sent, batch_size=1, timeout=2)
        assert [e.id for e in memory.events] == ["e1"]
        assert "e0" in (tmp_path / "dead" / "fluentd.jsonl").read_text()

    @pytest.mark.parametrize(("sizes", "from_big", "sink", "batch_size"), [
        ([1_200_000, 10], False, {}, 100),  # down from the start, the big event first in its batch
        ([10, 1_200_000], True, {"max_frame_events": 1}, 100),  # down from the big one: the small one went before
        ([10, 1_200_000], True, {}, 1),  # alone in its batch, after one acked
        # Alone and first, nothing acked to vouch for the receiver: struck 3 times within a second
        ([2_000_000], False, {}, 1),
    ], ids=["from-start", "from-the-big-one", "alone", "first-alone"])
    async def test_a_downstream_outage_dead_letters_no_big_event(
            self, memory: MemorySink, tmp_path: Path, sizes: list[int], from_big: bool, sink: dict[str, Any],
            batch_size: int) -> None:
        """The forward source closes the connection on a batch its subscriber failed to take
        (Elasticsearch behind it down): each close counted as "too large" against the big event,
        dead-lettered though the receiver took it once its subscriber was back."""
        sent = [sized(i, size) for i, size in enumerate(sizes)]

        class DownFor:
            """Fails `n` batches, from the first (or, `from_big`, the first with a big event) on."""
            n, down = 6, not from_big

            async def send_batch(self, events: Sequence[CloudEvent]) -> None:
                self.down = self.down or any(len(e.data or b"") > 1 << 20 for e in events)
                if self.down and self.n:
                    self.n -= 1
                    raise SinkError("elasticsearch down")
                await memory.send_batch(events)

            async def aclose(self) -> None:
                pass

        subscriber = DownFor()
        await through_a_worker(tmp_path, ForwardSourceConfig(port=0), subscriber, sent, batch_size=batch_size,
                               timeout=2, **sink)
        assert subscriber.n == 0 and not (tmp_path / "dead").exists()
        assert {e.id for e in memory.events} == {e.id for e in sent}

    async def test_a_receiver_stalled_a_while_loses_no_big_event(self, memory: MemorySink, tmp_path: Path) -> None:
        """Fluentd under backpressure (overflow_action block) acks nothing for a while: each
        timeout struck the big event at the head of the spool, and it was dead-lettered though
        the receiver took it later (and frames shrank on every try, for 5 minutes)."""
        sent = [sized(0, 1_200_000), sized(1, 10), sized(2, 10)]
        release = asyncio.Event()

        class Stalled:
            async def send_batch(self, events: list[CloudEvent]) -> None:
                await release.wait()
                await memory.send_batch(events)

            async def aclose(self) -> None:
                pass

        spool = DiskSpool(tmp_path / "spool")
        async with ForwardSourceConfig(port=0).build(Stalled()) as src:  # type: ignore[arg-type]
            sink = FluentdSinkConfig(port=src.port, timeout=0.5).build()
            d = Dispatcher(spool, {"fluentd": sink}, Metrics(spool), batch_size=100,
                           backoff=Backoff(initial=0.01, maximum=0.1), deadletter_dir=tmp_path / "dead")
            for event in sent:
                spool.append(event)
            d.start()
            await until(lambda: sink.errors >= 5, 60, "five timeouts of the stalled receiver")
            release.set()
            await until(lambda: d.workers[0].reader.lag() == 0, 60, "the spool delivered")
            await d.stop()
            await sink.aclose()
        spool.close()
        assert {e.id for e in memory.events} == {"e0", "e1", "e2"} and not (tmp_path / "dead").exists()
        assert (sink._max_bytes, sink._max_events) == (6_144_000, 100)  # a silence shrank nothing

    def test_default_frames_fit_fluent_bits_default_buffer(self) -> None:
        assert FluentdSinkConfig().max_frame_bytes <= 6_144_000  # in_forward's Buffer_Max_Size


class TestAckOff:
    """Without acks the sink still reads what the server says."""

    @pytest.mark.parametrize("batches", [1, 3])
    async def test_a_server_wanting_the_handshake_is_named_not_fed(self, memory: MemorySink, batches: int) -> None:
        """Its HELO went unread: the frames were discarded and every event counted delivered."""
        async with ForwardSourceConfig(port=0, shared_key="k").build(memory) as src:
            sink = FluentdSinkConfig(port=src.port, ack=False, timeout=2).build()
            for i in range(batches):
                with pytest.raises(SinkError, match="shared_key"):
                    await sink.send_batch(exchange(i))
            await sink.aclose()
        assert memory.events == [] and sink.records == 0

    async def test_a_late_helo_fails_every_batch_after_it(self) -> None:
        """A HELO later than the 100 ms wait (a remote or busy server): the batch before it went
        unread and counted, then each reconnect raced the same way, every other batch "delivered"."""
        helo_sent = asyncio.Event()

        async def late_helo(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
            await asyncio.sleep(0.3)
            writer.write(msgpack.packb(["HELO", {"nonce": b"n" * 16, "auth": b"", "keepalive": True}]))
            await writer.drain()
            helo_sent.set()
            await asyncio.sleep(0.2)
            writer.close()  # as in_forward does with a client that sends no PING

        server = await asyncio.start_server(late_helo, "127.0.0.1", 0)
        sink = FluentdSinkConfig(port=server.sockets[0].getsockname()[1], ack=False, timeout=2).build()
        try:
            await sink.send_batch(exchange(0))  # before the HELO: nothing tells it apart
            await asyncio.wait_for(helo_sent.wait(), 30)
            await until(lambda: sink._wants_handshake is not None, 30, "the HELO read")
            for i in range(1, 4):  # each on a new connection, its HELO late again
                with pytest.raises(SinkError, match="shared_key"):
                    await sink.send_batch(exchange(i))
        finally:
            await sink.aclose()
            server.close()

"""The forward source against the Forward protocol v1 spec, with frames built by msgpack, and
against fluent-logger's sender as a third-party peer."""

from __future__ import annotations

import asyncio
import base64
import contextlib
import gzip
import hashlib
import os
import socket
import struct
import time
import tracemalloc
from collections.abc import AsyncIterator, Sequence
from functools import reduce
from pathlib import Path
from typing import Any

import msgpack
import orjson
import pytest
from fluent.sender import FluentSender
from pydantic import ValidationError

from infer_logger.cloudevents.event import CloudEvent
from infer_logger.cloudevents.json_format import to_dict
from infer_logger.cloudevents.validation import validate
from infer_logger.errors import RejectedError, SinkError
from infer_logger.sinks.http import HttpSinkConfig
from infer_logger.sinks.memory import MemorySink, failing
from infer_logger.testing import EventCollector
from pipelines.sources.forward import (
    ForwardSource,
    ForwardSourceConfig,
    _Turns,
    parse_frame,
    rfc3339,
)
from tests.waiting import until

NS = 1_000_000_000
T_NS = 1_700_000_000_123_456_789


def event_time(ns: int) -> msgpack.ExtType:
    return msgpack.ExtType(0, struct.pack(">II", ns // NS, ns % NS))


def pack(obj: object, *, bin_type: bool = True) -> bytes:
    packed: bytes = msgpack.packb(obj, use_bin_type=bin_type)
    return packed


class Client:
    """A raw Forward client: writes frames, reads what the server answers."""

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.reader, self.writer = reader, writer
        self.unpacker = msgpack.Unpacker(raw=False)

    @classmethod
    async def connect(cls, port: int, host: str = "127.0.0.1") -> Client:
        return cls(*await asyncio.open_connection(host, port))

    async def send(self, *frames: object) -> None:
        for frame in frames:
            self.writer.write(frame if isinstance(frame, bytes) else pack(frame))
        await self.writer.drain()

    async def reply(self, timeout: float = 5.0) -> Any:
        async with asyncio.timeout(timeout):
            while True:
                try:
                    return next(self.unpacker)
                except StopIteration:
                    pass
                data = await self.reader.read(65536)
                if not data:
                    raise EOFError("closed by the server")
                self.unpacker.feed(data)

    async def closed(self, timeout: float = 5.0) -> bool:
        """True when the server closed the connection (it sent nothing but, maybe, a PONG)."""
        try:
            async with asyncio.timeout(timeout):
                while await self.reader.read(65536):
                    pass
        except ConnectionResetError:
            pass
        finally:
            self.writer.close()
        return True

    async def aclose(self) -> None:
        self.writer.close()

    def reset(self) -> None:
        """Closes with a reset, as a socket closed with unread bytes does (a plain close is a FIN,
        which a sender that half-closes sends too)."""
        linger = struct.pack("ii", 1, 0)
        self.writer.get_extra_info("socket").setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, linger)
        self.writer.transport.abort()


class Batches:
    """A subscriber that keeps the size of every batch it was handed."""

    def __init__(self) -> None:
        self.sizes: list[int] = []
        self.events: list[CloudEvent] = []

    async def send_batch(self, events: Sequence[CloudEvent]) -> None:
        self.sizes.append(len(events))
        self.events.extend(events)

    async def aclose(self) -> None:
        pass


class Counted:
    """A subscriber that only counts what it was handed (holding the events would dwarf a frame)."""

    def __init__(self) -> None:
        self.records = 0

    async def send_batch(self, events: Sequence[CloudEvent]) -> None:
        self.records += len(events)

    async def aclose(self) -> None:
        pass


class Held:
    """A subscriber that holds every batch until `release` is set, counting the batches it holds."""

    def __init__(self) -> None:
        self.release = asyncio.Event()
        self.held = self.most = 0
        self.events: list[CloudEvent] = []

    async def send_batch(self, events: Sequence[CloudEvent]) -> None:
        self.held += 1
        self.most = max(self.most, self.held)
        try:
            await self.release.wait()
        finally:
            self.held -= 1
        self.events.extend(events)

    async def aclose(self) -> None:
        pass


@pytest.fixture
async def memory() -> MemorySink:
    return MemorySink()


@pytest.fixture
async def source(memory: MemorySink) -> AsyncIterator[ForwardSource]:
    async with ForwardSourceConfig(port=0).build(memory) as src:
        yield src


async def roundtrip(source: ForwardSource, *frames: object, acks: int = 1) -> list[Any]:
    client = await Client.connect(source.port)
    await client.send(*frames)
    replies = [await client.reply() for _ in range(acks)]
    await client.aclose()
    return replies


class TestModes:
    """Every carrier mode of the spec delivers its records and acks its chunk."""

    @pytest.mark.parametrize(("wire_time", "ns"), [
        (event_time(T_NS), T_NS),
        (1_700_000_000, 1_700_000_000 * NS),
        (1_700_000_000.5, 1_700_000_000 * NS + NS // 2),
    ], ids=["EventTime", "int", "float"])
    async def test_message_mode(self, source: ForwardSource, memory: MemorySink, wire_time: object, ns: int) -> None:
        replies = await roundtrip(source, ["app.web", wire_time, {"msg": "hi"}, {"chunk": "c1"}])
        assert replies == [{"ack": "c1"}]
        [event] = memory.events
        assert event.meta == {"fluentd-tag": "app.web", "fluentd-time": str(ns)}
        assert event["time"] == rfc3339(ns) and event["subject"] == "app.web"
        assert event.json() == {"msg": "hi"}

    async def test_forward_mode(self, source: ForwardSource, memory: MemorySink) -> None:
        entries = [[event_time(T_NS + i), {"n": i}] for i in range(3)]
        assert await roundtrip(source, ["app", entries, {"chunk": "fw", "size": 3}]) == [{"ack": "fw"}]
        assert [e.json()["n"] for e in memory.events] == [0, 1, 2]
        assert memory.calls == 1  # one frame, one batch

    @pytest.mark.parametrize("bin_type", [True, False], ids=["bin", "str"])
    async def test_packed_forward(self, source: ForwardSource, memory: MemorySink, bin_type: bool) -> None:
        # Old senders carry the entries as a msgpack str holding binary msgpack.
        entries = b"".join(pack([event_time(T_NS + i), {"n": i, "b": b"\x00\xff"}]) for i in range(4))
        frame = pack(["app", entries, {"chunk": "pf"}], bin_type=bin_type)
        assert await roundtrip(source, frame) == [{"ack": "pf"}]
        assert [e.json()["n"] for e in memory.events] == [0, 1, 2, 3]
        assert memory.events[0].json()["b"] == "AP8="  # bin values are base64 in JSON

    async def test_compressed_packed_forward_with_several_gzip_members(
            self, source: ForwardSource, memory: MemorySink) -> None:
        members = [gzip.compress(b"".join(pack([T_NS // NS, {"m": m, "i": i}]) for i in range(3))) for m in range(3)]
        frame = ["app", b"".join(members), {"compressed": "gzip", "chunk": "gz", "size": 9}]
        assert await roundtrip(source, frame) == [{"ack": "gz"}]
        assert [(e.json()["m"], e.json()["i"]) for e in memory.events] == [(m, i) for m in range(3) for i in range(3)]

    async def test_gzip_members_of_every_size(self, source: ForwardSource, memory: MemorySink) -> None:
        """Empty members, and one larger than any slice the source feeds zlib at once."""
        blob = os.urandom(300_000)  # incompressible: a member of ~300 KB
        members = [gzip.compress(b"")] * 50 + [gzip.compress(pack([1, r])) for r in ({"b": blob}, {"n": 2})]
        frame = ["app", b"".join(members), {"compressed": "gzip", "chunk": "gz"}]
        assert await roundtrip(source, frame) == [{"ack": "gz"}]
        assert [e.json() for e in memory.events] == [{"b": base64.b64encode(blob).decode()}, {"n": 2}]

    @pytest.mark.parametrize("mode", ["Forward", "PackedForward", "CompressedPackedForward"])
    async def test_times_with_metadata(self, source: ForwardSource, memory: MemorySink, mode: str) -> None:
        """v1.5: Event ::= [Metadata, Record], Metadata ::= integer | EventTime | [EventTime, Hash*]
        (Fluent Bit 2.1.x and >= 5.0.5 send [[EventTime, {...}], record]): the time is taken, the
        maps dropped (as Fluentd does)."""
        entries = [[[event_time(T_NS), {}], {"n": 0}],
                   [[event_time(T_NS + 1), {"k8s": {"pod": "p"}}, {"more": 1}], {"n": 1}],
                   [[T_NS // NS], {"n": 2}],
                   [event_time(T_NS + 3), {"n": 3}]]  # a plain one among them
        packed = b"".join(pack(e) for e in entries)
        option: dict[str, object] = {"chunk": mode, "size": 4}
        if mode == "Forward":
            frame: list[object] = ["app", entries, option]
        elif mode == "PackedForward":
            frame = ["app", packed, option]
        else:
            frame = ["app", gzip.compress(packed), {**option, "compressed": "gzip"}]
        assert await roundtrip(source, frame) == [{"ack": mode}]
        assert [(e.json()["n"], e.meta["fluentd-time"]) for e in memory.events] == [
            (0, str(T_NS)), (1, str(T_NS + 1)), (2, str(T_NS // NS * NS)), (3, str(T_NS + 3))]
        assert source.errors == 0

    @pytest.mark.parametrize("signal", [1, 2, 3], ids=["metrics", "traces", "a later signal"])
    async def test_fluent_signal_frames_are_acked_and_skipped(
            self, source: ForwardSource, memory: MemorySink, caplog: pytest.LogCaptureFixture, signal: int) -> None:
        """v1.5's `fluent_signal` 1 and 2 carry metrics and traces (Fluent Bit's cmetrics/ctraces),
        not log records: acked (or the sender resends them for ever) and skipped, logged once per
        connection; the connection goes on."""
        payload = pack({"meta": {"cmetrics": {}}, "metrics": []})
        client = await Client.connect(source.port)
        for chunk in ("s1", "s2"):
            await client.send(["fb.metrics", payload, {"fluent_signal": signal, "chunk": chunk}])
            assert await client.reply() == {"ack": chunk}
        await client.send(["fb.traces", [[1, {"not": "a log"}]], {"fluent_signal": signal}])  # no chunk: no ack
        await client.send(["app", pack([1, {"ok": True}]), {"fluent_signal": 0, "chunk": "logs"}])
        assert await client.reply() == {"ack": "logs"}
        assert [e.json() for e in memory.events] == [{"ok": True}]
        assert (source.errors, source.frames, source.records, source.acks) == (0, 4, 1, 3)
        assert caplog.text.count("fluent_signal") == 1
        await client.aclose()

    async def test_no_chunk_no_reply(self, source: ForwardSource, memory: MemorySink) -> None:
        client = await Client.connect(source.port)
        await client.send(["app", T_NS // NS, {"a": 1}])
        await until(lambda: len(memory.events) == 1)
        with pytest.raises(TimeoutError):
            await client.reply(timeout=0.2)
        assert source.acks == 0
        await client.aclose()

    async def test_several_frames_on_one_connection_are_acked_in_order(
            self, source: ForwardSource, memory: MemorySink) -> None:
        frames = [["app", T_NS // NS, {"i": i}, {"chunk": f"c{i}"}] for i in range(5)]
        assert await roundtrip(source, *frames, acks=5) == [{"ack": f"c{i}"} for i in range(5)]
        assert (source.frames, source.records, source.acks) == (5, 5, 5)

    async def test_ack_waits_for_the_subscriber(self) -> None:
        release = asyncio.Event()

        class Gate:
            def __init__(self) -> None:
                self.events: list[CloudEvent] = []

            async def send_batch(self, events: Sequence[CloudEvent]) -> None:
                await release.wait()
                self.events.extend(events)

        async with ForwardSourceConfig(port=0).build(Gate()) as src:
            client = await Client.connect(src.port)
            await client.send(["app", T_NS // NS, {"a": 1}, {"chunk": "late"}])
            with pytest.raises(TimeoutError):
                await client.reply(timeout=0.2)
            release.set()
            assert await client.reply() == {"ack": "late"}
            await client.aclose()


class TestSlices:
    """A frame of any number of entries goes to the subscriber max_frame_entries at a time, and
    its chunk is acked after the last."""

    @pytest.mark.parametrize("compressed", [False, True], ids=["packed", "gzip"])
    async def test_fluentd_chunk_of_200k_short_lines(self, memory: MemorySink, compressed: bool) -> None:
        """Fluentd's default 8 MiB chunk of short log lines: ~200k entries, far under max_frame_bytes
        (gzip: one member per 1,000, as Fluentd writes one per append)."""
        runs = [b"".join(pack([event_time(T_NS + i), {"log": f"GET /healthz 200 {i}"}])
                         for i in range(start, start + 1000)) for start in range(0, 200_000, 1000)]
        entries = b"".join(gzip.compress(run, 1) for run in runs) if compressed else b"".join(runs)
        option = {"chunk": "Y2h1bmsx", "size": 200_000, **({"compressed": "gzip"} if compressed else {})}
        async with ForwardSourceConfig(port=0).build(memory) as src:
            client = await Client.connect(src.port)
            await client.send(["kube.var.log", entries, option])
            assert await client.reply(timeout=120) == {"ack": "Y2h1bmsx"}  # 200k conversions: seconds
            await client.aclose()
            assert (src.records, src.errors) == (200_000, 0)
        assert len(memory.events) == 200_000
        assert memory.calls == 200_000 // src.config.max_frame_entries
        assert memory.events[-1].id == "Y2h1bmsx-199999"
        assert memory.events[-1].json() == {"log": "GET /healthz 200 199999"}

    @pytest.mark.parametrize("mode", ["message", "forward", "packed", "compressed"])
    async def test_slices_are_at_most_max_frame_entries(self, mode: str) -> None:
        entries = [[T_NS // NS, {"i": i}] for i in range(25)]
        packed = b"".join(pack(e) for e in entries)
        frame = {"message": ["app", T_NS // NS, {"i": 0}, {"chunk": "c"}],
                 "forward": ["app", entries, {"chunk": "c"}], "packed": ["app", packed, {"chunk": "c"}],
                 "compressed": ["app", gzip.compress(packed), {"chunk": "c", "compressed": "gzip"}]}[mode]
        subscriber = Batches()
        async with ForwardSourceConfig(port=0, max_frame_entries=10).build(subscriber) as src:
            assert await roundtrip(src, frame) == [{"ack": "c"}]
        assert subscriber.sizes == ([1] if mode == "message" else [10, 10, 5])
        assert [e.id for e in subscriber.events] == [f"c-{i}" for i in range(sum(subscriber.sizes))]

    async def test_forward_mode_frame_holds_its_bytes_not_its_entries(self) -> None:
        """A Forward-mode frame (entries as an array) is walked like a PackedForward one, not
        decoded whole: decoded, a 3-byte entry is a list and a dict of ~200 bytes (a 16 MiB frame
        of them held ~900 MB)."""
        frame = pack(["app", [[1, {}]] * 100_000, {"chunk": "c"}])
        subscriber = Counted()
        async with ForwardSourceConfig(port=0, max_frame_entries=100).build(subscriber) as src:
            client = await Client.connect(src.port)
            tracemalloc.start()
            try:
                await client.send(frame)
                assert await client.reply(timeout=120) == {"ack": "c"}
                peak = tracemalloc.get_traced_memory()[1]
            finally:
                tracemalloc.stop()
            await client.aclose()
        assert subscriber.records == 100_000
        # The frame as sent, as read and as joined, and the two unpackers' 256 KiB buffers; decoded
        # whole it was ~15 MB.
        assert peak < 3 * len(frame) + (1 << 20), f"peak {peak} bytes for a frame of {len(frame)}"

    async def test_ack_waits_for_the_last_slice(self) -> None:
        release = asyncio.Event()

        class SecondWaits(Batches):
            async def send_batch(self, events: Sequence[CloudEvent]) -> None:
                if self.sizes:
                    await release.wait()
                await super().send_batch(events)

        subscriber = SecondWaits()
        async with ForwardSourceConfig(port=0, max_frame_entries=10).build(subscriber) as src:
            client = await Client.connect(src.port)
            await client.send(["app", [[1, {}]] * 15, {"chunk": "late"}])
            await until(lambda: subscriber.sizes == [10], timeout=30, what="the first slice handed on")
            with pytest.raises(TimeoutError):  # the second slice is held: no ack yet
                await client.reply(timeout=0.2)
            release.set()
            assert await client.reply() == {"ack": "late"}
            await client.aclose()
        assert subscriber.sizes == [10, 5]

    @pytest.mark.parametrize("chunk", ["c", None])
    async def test_a_chunk_whose_sender_went_away_is_handed_on_no_further(self, chunk: str | None) -> None:
        """Its sender (the fluentd sink past its timeout) sends it again: the rest of it went on to
        the subscriber all the same, and every resend was delivered once more. Without a chunk
        nothing is sent again: it all goes on."""
        release = asyncio.Event()

        class FirstWaits(Batches):
            async def send_batch(self, events: Sequence[CloudEvent]) -> None:
                if not self.sizes:
                    await release.wait()
                await super().send_batch(events)

        subscriber = FirstWaits()
        async with ForwardSourceConfig(port=0, max_frame_entries=1).build(subscriber) as src:
            client = await Client.connect(src.port)
            await client.send(["app", [[1, {}]] * 10, {"chunk": chunk}])
            await until(lambda: src.frames == 1)
            client.reset()  # a FIN is no such sign: see the next test
            await asyncio.sleep(0.1)  # for the reset to reach the source's socket
            release.set()
            await until(lambda: len(subscriber.sizes) == (1 if chunk else 10) and not src._tasks)
        assert src.abandoned == (1 if chunk else 0) and src.errors == 0

    @pytest.mark.parametrize("turn", ["in its turn", "waiting for its turn"])
    async def test_a_sender_that_half_closes_gets_its_chunk_taken_and_acked(self, turn: str) -> None:
        """A FIN (shutdown(SHUT_WR)) says the sender sends no more, not that it left: its chunk was
        counted abandoned and never acked, and each resend delivered its first batch again."""
        subscriber = Held()
        async with ForwardSourceConfig(port=0, max_frame_entries=1, in_flight=1).build(subscriber) as src:
            other = None
            if turn == "waiting for its turn":
                other = await Client.connect(src.port)
                await other.send(["busy", 1, {}, {"chunk": "busy"}])
                await until(lambda: subscriber.held == 1)
            client = await Client.connect(src.port)
            await client.send(["app", [[1, {"i": i}] for i in range(3)], {"chunk": "hc"}])
            client.writer.write_eof()
            await until(lambda: src._taking == 1 + (other is not None) and subscriber.held == 1)
            await asyncio.sleep(0.1)  # for the FIN to reach the source's socket
            subscriber.release.set()
            assert await client.reply() == {"ack": "hc"}
            assert await client.closed()  # then closed: it sends no more
            if other is not None:
                await other.aclose()
            assert (src.abandoned, src.errors) == (0, 0)
        assert [e.id for e in subscriber.events if e.id.startswith("hc")] == ["hc-0", "hc-1", "hc-2"]


class TestRecords:
    """Records become CloudEvents: the sink's shape back to the same event, others wrapped."""

    async def test_plain_record(self, source: ForwardSource, memory: MemorySink) -> None:
        await roundtrip(source, ["app.web", event_time(T_NS), {"k": [1, 2.5, None], 3: True}, {"chunk": "abc"}])
        [event] = memory.events
        assert event.attributes == {
            "specversion": "1.0", "id": "abc-0", "source": f"fluent-forward://127.0.0.1:{source.port}",
            "type": "io.fluentd.record", "subject": "app.web", "time": "2023-11-14T22:13:20.123456789Z",
            "datacontenttype": "application/json",
        }
        assert event.json() == {"k": [1, 2.5, None], "3": True}

    async def test_an_ipv6_host_makes_a_uri_source(self, memory: MemorySink) -> None:
        """RFC 3986 brackets an IPv6 host: `fluent-forward://::1:<port>` was no URI, which a receiver
        stricter than ours (it checks characters and the scheme) refuses."""
        async with ForwardSourceConfig(host="::1", port=0).build(memory) as src:
            client = await Client.connect(src.port, "::1")
            await client.send(["app", event_time(T_NS), {"k": 1}, {"chunk": "v6"}])
            assert await client.reply() == {"ack": "v6"}
            await client.aclose()
        [event] = memory.events
        assert event["source"] == f"fluent-forward://[::1]:{src.port}"
        validate(event)

    @pytest.mark.parametrize("uri", ["my source", "fluent forward://x", "a\tb", "1x:y"])
    def test_a_source_uri_that_is_no_uri_reference_is_refused(self, uri: str) -> None:
        """Every record's event carries it: each frame was refused, and its sender retried for ever."""
        with pytest.raises(ValidationError, match="source_uri") as info:
            ForwardSourceConfig(source_uri=uri)
        assert "is not a URI reference" in str(info.value) or "invalid URI scheme" in str(info.value)
        assert ForwardSourceConfig(source_uri="/fluentd").source_uri == "/fluentd"

    @pytest.mark.parametrize("record_type", ["", "a\tb", "log\n", "x\ufdd0"])
    def test_a_record_type_no_event_can_carry_is_refused(self, record_type: str) -> None:
        """Every plain record's event has it as `type`: each frame was refused, and its sender
        resent it for ever."""
        with pytest.raises(ValidationError, match="record_type"):
            ForwardSourceConfig(record_type=record_type)
        assert ForwardSourceConfig(record_type="com.example.log ü").record_type == "com.example.log ü"

    async def test_values_json_lacks(self, source: ForwardSource, memory: MemorySink) -> None:
        """bin as base64, an EventTime as RFC 3339, another ext as code + base64, invalid UTF-8
        with U+FFFD: the record is kept, not refused."""
        record = {"b": b"\x00\xff", "t": event_time(T_NS), "x": msgpack.ExtType(5, b"\x01\x02"),
                  "s": "caf\udcc3"}  # a lone surrogate escape: what invalid UTF-8 reads as
        frame = msgpack.packb(["app", event_time(T_NS), record, {"chunk": "v"}], use_bin_type=True,
                              unicode_errors="surrogateescape")
        client = await Client.connect(source.port)
        await client.send(frame)
        assert await client.reply() == {"ack": "v"}
        await client.aclose()
        [event] = memory.events
        assert event.json() == {"b": "AP8=", "t": "2023-11-14T22:13:20.123456789Z",
                                "x": {"ext": 5, "base64": "AQI="}, "s": "caf\ufffd"}

    async def test_map_keys_json_lacks(self, source: ForwardSource, memory: MemorySink) -> None:
        """bin keys (msgpack-ruby writes ASCII-8BIT strings so) as text, EventTime and msgpack
        Timestamp keys as RFC 3339; a Timestamp value too."""
        record = {b"host": "a", "nested": {b"bin-key": 1}, event_time(T_NS): "et",
                  msgpack.Timestamp(1, 5): "ts", "t": msgpack.Timestamp(1, 5)}
        assert await roundtrip(source, ["app", 1, record, {"chunk": "k"}]) == [{"ack": "k"}]
        [event] = memory.events
        assert event.json() == {"host": "a", "nested": {"bin-key": 1}, "2023-11-14T22:13:20.123456789Z": "et",
                                "1970-01-01T00:00:01.000000005Z": "ts", "t": "1970-01-01T00:00:01.000000005Z"}

    async def test_a_tag_or_chunk_no_attribute_may_hold_is_kept_escaped(
            self, source: ForwardSource, memory: MemorySink) -> None:
        """A control character in the tag (the subject) or the chunk (in the ids) made every record
        an invalid event: the frame was refused and the sender resent it for ever."""
        replies = await roundtrip(source, ["app\x01web\u0085", [[1, {}], [2, {}]], {"chunk": "c\tk"}])
        assert replies == [{"ack": "c\tk"}]  # acked as sent
        assert [(e.id, e["subject"]) for e in memory.events] == [("c%09k-0", "app%01web%C2%85"),
                                                                 ("c%09k-1", "app%01web%C2%85")]
        assert memory.events[0].meta["fluentd-tag"] == "app\x01web\u0085"

    async def test_without_chunk_ids_are_unique(self, source: ForwardSource, memory: MemorySink) -> None:
        client = await Client.connect(source.port)
        await client.send(["app", [[T_NS // NS, {}], [T_NS // NS, {}]]])
        await until(lambda: len(memory.events) == 2)
        assert memory.events[0].id != memory.events[1].id
        await client.aclose()

    @pytest.mark.parametrize("data", [b'{"instances":[[1,2]]}', b"\x00\x01binary", b"plain text"])
    async def test_cloudevent_record_comes_back_equal(
            self, source: ForwardSource, memory: MemorySink, data: bytes) -> None:
        ctype = {b"{": "application/json", b"\x00": "application/octet-stream"}.get(data[:1], "text/plain")
        original = CloudEvent({"specversion": "1.0", "id": "r1", "source": "/logger", "type": "x.request",
                               "datacontenttype": ctype, "statuscode": 200, "truncated": False}, data)
        await roundtrip(source, ["inference.iris.request", event_time(T_NS), to_dict(original), {"chunk": "c"}])
        assert memory.events == [original]
        assert memory.events[0].data == data

    async def test_an_invalid_cloudevent_record_is_dead_lettered(
            self, memory: MemorySink, tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
        """One that claims to be a CloudEvent (`specversion`) and is none (a `time` not RFC 3339)
        was wrapped as an io.fluentd.record and acked: the store (ingest's default subscriber)
        keeps no such type, so it was lost without a word. Plain records are still wrapped."""
        dead = tmp_path / "dead.jsonl"
        bad = {"specversion": "1.0", "id": "req-1", "source": "/m", "type": "x.request", "time": "yesterday",
               "datacontenttype": "application/json", "data": {"instances": [[1, 2]]}}
        good = {**bad, "id": "req-2", "time": "2024-01-01T00:00:00Z"}
        frame = ["inference.m.request", [[1, bad], [1, good], [1, {"log": "plain"}]], {"chunk": "c"}]
        async with ForwardSourceConfig(port=0, dead_letter_file=dead).build(memory) as src:
            assert await roundtrip(src, frame) == [{"ack": "c"}]
            assert (src.records, src.invalid_events, src.refused, src.errors) == (2, 1, 0, 0)
        assert [(e.id, e.type) for e in memory.events] == [("req-2", "x.request"),
                                                            ("c-2", "io.fluentd.record")]
        (line,) = dead.read_bytes().splitlines()
        letter = orjson.loads(line)
        assert letter["data"] == bad and "no valid CloudEvent: time:" in letter["reason"]
        assert [r.levelname for r in caplog.records if "req-1" in r.getMessage()] == ["WARNING"]

    async def test_an_invalid_cloudevent_record_without_a_dead_letter_file_is_logged(
            self, source: ForwardSource, memory: MemorySink, caplog: pytest.LogCaptureFixture) -> None:
        frame = ["app", T_NS // NS, {"specversion": "1.0", "id": "r7"}, {"chunk": "c"}]
        assert await roundtrip(source, frame) == [{"ack": "c"}]
        assert memory.events == [] and (source.invalid_events, source.records) == (1, 0)
        [warning] = [r for r in caplog.records if r.levelname == "WARNING"]
        assert "(not dead-lettered: no dead_letter_file)" in warning.getMessage()
        assert "id 'r7' is no valid CloudEvent" in warning.getMessage()

    async def test_an_invalid_cloudevent_record_not_dead_lettered_is_not_acked(
            self, memory: MemorySink, tmp_path: Path) -> None:
        (tmp_path / "file").write_text("")  # no directory: the file cannot be written
        config = ForwardSourceConfig(port=0, dead_letter_file=tmp_path / "file" / "dead.jsonl")
        async with config.build(memory) as src:
            client = await Client.connect(src.port)
            await client.send(["app", 1, {"specversion": "1.0", "id": ""}, {"chunk": "c"}])
            assert await client.closed()  # the sender sends it again
            assert (src.acks, src.invalid_events, src.errors) == (0, 0, 1)

    async def test_a_record_whose_time_no_event_holds_is_dead_lettered(
            self, memory: MemorySink, tmp_path: Path) -> None:
        """A valid Forward time outside years 1..9999 (milliseconds sent as seconds) closed the
        connection: a chunk was never acked, its sender resending it (and the batches before the
        record) for ever; without a chunk the frames sent after it were lost."""
        dead = tmp_path / "dead.jsonl"
        chunked = ["app", [[1, {"i": 0}], [1_700_000_000_000, {"i": 1}], [2, {"i": 2}]], {"chunk": "c"}]
        async with ForwardSourceConfig(port=0, dead_letter_file=dead, max_frame_entries=1).build(memory) as src:
            assert await roundtrip(src, chunked) == [{"ack": "c"}]
            client = await Client.connect(src.port)  # no chunk: what follows still arrives
            await client.send(["app", 10**15, {"i": 3}], ["app", 4, {"i": 4}, {"chunk": "d"}])
            assert await client.reply() == {"ack": "d"}
            await client.aclose()
            assert (src.records, src.invalid_events, src.errors) == (3, 2, 0)
        assert [e.json() for e in memory.events] == [{"i": 0}, {"i": 2}, {"i": 4}]
        letters = [orjson.loads(line) for line in dead.read_bytes().splitlines()]
        assert [letter["data"] for letter in letters] == [{"i": 1}, {"i": 3}]
        assert "outside years 1..9999" in letters[0]["reason"] and "time" not in letters[0]["attributes"]
        assert letters[0]["attributes"]["id"] == "c-1"

    @pytest.mark.parametrize(("data", "as_json"), [
        ({"blob": b"\x00\x01"}, {"blob": "AAE="}),
        ({"t": event_time(T_NS)}, {"t": "2023-11-14T22:13:20.123456789Z"}),
        ({1: "a"}, {"1": "a"}),
    ], ids=["bin", "EventTime", "int-key"])
    async def test_cloudevent_record_with_data_json_lacks_is_dead_lettered(
            self, memory: MemorySink, tmp_path: Path, data: dict[Any, Any], as_json: object) -> None:
        dead = tmp_path / "dead.jsonl"
        record = {"specversion": "1.0", "id": "x", "source": "s", "type": "t", "data": data}
        async with ForwardSourceConfig(port=0, dead_letter_file=dead).build(memory) as src:
            assert await roundtrip(src, ["app", 1, record, {"chunk": "c"}]) == [{"ack": "c"}]
            assert (src.invalid_events, src.errors) == (1, 0)
        assert memory.events == [] and orjson.loads(dead.read_bytes())["data"]["data"] == as_json

    @pytest.mark.parametrize("depth", [300, 600, 1000])
    async def test_a_record_nested_deeper_than_orjson_writes_is_kept(
            self, source: ForwardSource, memory: MemorySink, depth: int) -> None:
        """msgpack reads 1024 levels, orjson writes 254: the frame was refused (600 deep, a
        RecursionError escaped the handler) and the sender resent it for ever."""
        deep: Any = "caf\udcc3"  # invalid UTF-8 at the bottom: the record is scrubbed first
        text = b'"caf\xef\xbf\xbd"'  # its JSON, built alongside
        for level in range(depth - 1):
            if level % 2:
                deep, text = {"a": deep, 1: None}, b'{"a":' + text + b',"1":null}'
            else:
                deep, text = [deep, 2.5], b"[" + text + b",2.5]"
        frame = msgpack.packb(["app", [[1, {"deep": deep}], [2, {"ok": True}]], {"chunk": "c"}],
                              use_bin_type=True, unicode_errors="surrogateescape")
        assert await roundtrip(source, frame) == [{"ack": "c"}]
        kept, after = memory.events
        assert kept.data == b'{"deep":' + text + b"}" and after.json() == {"ok": True}
        assert source.errors == 0

    @pytest.mark.parametrize("depth", [255, 600, 1020])
    async def test_cloudevent_record_with_json_data_nested_deeper_than_orjson_writes(
            self, source: ForwardSource, memory: MemorySink, depth: int) -> None:
        """What the fluentd sink sent for such data before it sent it as data_base64: the event
        (from_dict writes data again), and not a refused frame the sender resent for ever."""
        data = b"[" * depth + b"]" * depth
        original = CloudEvent({"specversion": "1.0", "id": "r1", "source": "/logger", "type": "x.request",
                               "datacontenttype": "application/json"}, data)
        implied = CloudEvent({"specversion": "1.0", "id": "r2", "source": "/logger", "type": "x.request"}, data)
        frame = ["inference.iris.request", [[1, to_dict(original)], [2, to_dict(implied)]], {"chunk": "c"}]
        assert await roundtrip(source, frame) == [{"ack": "c"}]
        assert memory.events == [original, implied]  # untyped bytes stay untyped (data_base64)
        assert (source.invalid_events, source.errors) == (0, 0)


class TestHandshake:
    """Shared-key auth per the spec: HELO, PING with sha512 digests, PONG proving the server knows the key."""

    KEY = "s3cret"

    @staticmethod
    def digest(*parts: bytes | str) -> str:
        return hashlib.sha512(b"".join(p.encode() if isinstance(p, str) else p for p in parts)).hexdigest()

    async def ping(self, port: int, key: str, user: str = "", password: str = "") -> tuple[Client, list[Any]]:
        client = await Client.connect(port)
        helo = await client.reply()
        assert helo[0] == "HELO" and len(helo[1]["nonce"]) == 16 and helo[1]["keepalive"] is True
        nonce, auth = helo[1]["nonce"], helo[1]["auth"]
        salt = os.urandom(16)
        proof = self.digest(auth, user, password) if auth else ""
        await client.send(["PING", "client.example", salt, self.digest(salt, "client.example", nonce, key), user, proof])
        pong = await client.reply()
        if pong[1]:
            assert pong[4] == self.digest(salt, pong[3], nonce, self.KEY)
        return client, pong

    async def test_right_key(self, memory: MemorySink) -> None:
        config = ForwardSourceConfig(port=0, shared_key=self.KEY, self_hostname="fluentd.example")
        async with config.build(memory) as src:
            client, pong = await self.ping(src.port, self.KEY)
            assert pong[:4] == ["PONG", True, "", "fluentd.example"]
            await client.send(["app", T_NS // NS, {"a": 1}, {"chunk": "k"}])
            assert await client.reply() == {"ack": "k"}
            await client.aclose()
        assert len(memory.events) == 1

    async def test_a_frame_in_the_pings_read_is_served(self, memory: MemorySink) -> None:
        """A client that sends PING and its first frame at once, then waits for the ack: the frame
        sat in the buffer until more bytes came (never, for this client)."""
        async with ForwardSourceConfig(port=0, shared_key=self.KEY).build(memory) as src:
            client = await Client.connect(src.port)
            nonce = (await client.reply())[1]["nonce"]
            salt = os.urandom(16)
            ping = ["PING", "client.example", salt, self.digest(salt, "client.example", nonce, self.KEY), "", ""]
            await client.send(pack(ping) + pack(["app", T_NS // NS, {"a": 1}, {"chunk": "k"}]))
            assert (await client.reply())[:2] == ["PONG", True]
            assert await client.reply() == {"ack": "k"}
            await client.aclose()
        assert len(memory.events) == 1

    @pytest.mark.parametrize(("key", "ok"), [(KEY, True), ("guess", False)])
    async def test_a_hostname_that_is_not_utf8(self, memory: MemorySink, key: str, ok: bool) -> None:
        """The digests are over the bytes as sent, as Fluentd computes them: encoded strictly, the
        hostname raised, and its PING got no PONG (a bad frame, not an auth failure)."""
        async with ForwardSourceConfig(port=0, shared_key=self.KEY).build(memory) as src:
            client = await Client.connect(src.port)
            nonce = (await client.reply())[1]["nonce"]
            salt, hostname = os.urandom(16), b"h\xe9st"  # Latin-1
            ping = b"\x96" + pack("PING") + b"\xa4" + hostname + pack(salt)
            await client.send(ping + pack(self.digest(salt, hostname, nonce, key)) + pack("") + pack(""))
            pong = await client.reply()
            assert pong[:3] == ["PONG", ok, "" if ok else "shared_key mismatch"]
            assert (src.auth_failures, src.errors) == ((0, 0) if ok else (1, 1))
            await client.aclose()

    async def test_wrong_key_is_refused_and_closed(self, memory: MemorySink) -> None:
        async with ForwardSourceConfig(port=0, shared_key=self.KEY).build(memory) as src:
            client, pong = await self.ping(src.port, "guess")
            assert pong[1] is False and pong[2] == "shared_key mismatch"
            await client.send(["app", T_NS // NS, {"a": 1}, {"chunk": "k"}])
            assert await client.closed()
            assert (src.auth_failures, src.errors) == (1, 1)
        assert memory.events == []

    @pytest.mark.parametrize(("password", "ok"), [("pw", True), ("nope", False)])
    async def test_user_auth(self, memory: MemorySink, password: str, ok: bool) -> None:
        config = ForwardSourceConfig(port=0, shared_key=self.KEY, users={"alice": "pw"})
        async with config.build(memory) as src:
            client, pong = await self.ping(src.port, self.KEY, "alice", password)
            assert pong[1] is ok
            await client.aclose()

    async def test_data_before_handshake_is_refused(self, memory: MemorySink) -> None:
        async with ForwardSourceConfig(port=0, shared_key=self.KEY).build(memory) as src:
            client = await Client.connect(src.port)
            await client.send(["app", T_NS // NS, {"a": 1}, {"chunk": "k"}])
            assert (await client.reply())[0] == "HELO"
            assert (await client.reply())[:3] == ["PONG", False, "invalid PING"]
            assert await client.closed()
        assert memory.events == []

    async def test_connections_that_never_authenticate_hold_back_no_sender(self, memory: MemorySink) -> None:
        """The handshake read up to max_frame_bytes a connection: a few connections that sent most
        of a big message after HELO and no more held that much each until their handshake_timeout.
        What is too big for a PING (4 KiB) is none."""
        config = ForwardSourceConfig(port=0, shared_key=self.KEY, max_frame_bytes=1 << 20, in_flight=1,
                                     handshake_timeout=60)
        async with config.build(memory) as src:
            client, pong = await self.ping(src.port, self.KEY)
            assert pong[1] is True
            junk = pack(["PING", "x" * ((1 << 20) - 100)])[:(1 << 20) - 200]  # never finished
            strangers = [await Client.connect(src.port) for _ in range(3)]
            for stranger in strangers:
                assert (await stranger.reply())[0] == "HELO"
                await stranger.send(junk)
            for i in range(2):
                await client.send(["app", T_NS // NS, {"i": i}, {"chunk": f"k{i}"}])
                assert await client.reply(timeout=20) == {"ack": f"k{i}"}  # hang guard
            for stranger in strangers:  # what is too big for a PING is none
                assert (await stranger.reply())[:3] == ["PONG", False, "invalid PING"]
                await stranger.aclose()
            await client.aclose()
        assert src.auth_failures == 3 and len(memory.events) == 2

    def test_users_need_a_shared_key(self) -> None:
        with pytest.raises(ValidationError, match="shared_key"):
            ForwardSourceConfig(users={"a": "b"})


class TestFailures:
    """A bad frame or a refused batch closes that connection only, and nothing is acked."""

    @pytest.mark.parametrize("frame", [
        b"\xc1",  # a byte msgpack never uses
        pack(42),
        pack(["only-tag"]),
        pack(["", 1, {}]),
        pack(["app", 1, "not a map"]),
        pack(["app", "not a time", {}]),
        pack(["app", [[1]], {}]),
        pack(["app", [[1, {}]], "not a map"]),
        pack(["app", pack([1, {}]) + b"\x92", {}]),  # a cut-off packed entry
        pack(["app", b"not gzip", {"compressed": "gzip"}]),
        pack(["app", pack([1, {}]), {"compressed": "zstd"}]),
        pack(["app", 1, {}, {"chunk": 7}]),
        pack(["app", msgpack.ExtType(5, b"12345678"), {}]),
        pack(["app", msgpack.ExtType(0, struct.pack(">II", 1, NS)), {}]),  # nanoseconds past a second
        pack(["app", [[[1, 5, "x"], {}]], {}]),  # v1.5 metadata: [time, map...], not other items
        pack(["app", [[[1, None], {}]], {}]),
        b"\x94\xa3app\x01\x81\x91\x01\x01\x81\xa5chunk\xa1c",  # a map keyed by an array: {[1]: 1}
    ], ids=lambda f: f.hex()[:24])
    async def test_malformed_frame_closes_only_its_connection(
            self, source: ForwardSource, memory: MemorySink, frame: bytes) -> None:
        good = await Client.connect(source.port)
        bad = await Client.connect(source.port)
        await bad.send(frame)
        assert await bad.closed()
        await good.send(["app", 1, {"ok": True}, {"chunk": "still-here"}])
        assert await good.reply() == {"ack": "still-here"}
        assert source.errors == 1 and [e.json() for e in memory.events] == [{"ok": True}]
        await good.aclose()

    async def test_acks_sent_before_a_bad_frame_reach_the_sender(self, source: ForwardSource,
                                                                  memory: MemorySink) -> None:
        """Closed at once with bytes unread, the connection was reset: the acks of chunks taken
        before the bad frame, still on their way, were lost (647 of 1000), and the sender sent
        those chunks again."""
        good = b"".join(pack(["app", 1, {"i": i}, {"chunk": f"c{i}"}]) for i in range(1000))

        def client() -> tuple[list[Any], str]:
            with socket.create_connection(("127.0.0.1", source.port)) as sock:
                sock.settimeout(10)
                sock.sendall(good + b"\xc1" + b"\x00" * (4 << 20))  # a bad frame, and more behind it
                time.sleep(0.3)  # not reading at once, as a sender busy sending is not
                unpacker, replies = msgpack.Unpacker(raw=False), []
                while data := sock.recv(65536):
                    unpacker.feed(data)
                    replies.extend(unpacker)
                return replies, "EOF"

        replies, end = await asyncio.to_thread(client)
        assert len(memory.events) == 1000 and source.errors == 1
        assert (replies, end) == ([{"ack": f"c{i}"} for i in range(1000)], "EOF")

    @pytest.mark.parametrize("frame", [
        ["app", 1, {"big": "x" * 10_000}, {"chunk": "c"}],  # one big item
        ["app", [[1, {"i": i}] for i in range(2000)], {"chunk": "c"}],  # many small ones
    ], ids=["one-item", "many-items"])
    async def test_oversized_frame_closes_the_connection(
            self, memory: MemorySink, caplog: pytest.LogCaptureFixture, frame: object) -> None:
        async with ForwardSourceConfig(port=0, max_frame_bytes=4096).build(memory) as src:
            client = await Client.connect(src.port)
            await client.send(frame)
            assert await client.closed()
            assert src.errors == 1 and memory.events == []
        assert "bad frame: frame exceeds max_frame_bytes" in caplog.text

    async def test_frame_at_the_limit_followed_by_the_next(self, memory: MemorySink) -> None:
        """The limit is per frame: what follows in the same read does not count against it."""
        async with ForwardSourceConfig(port=0, max_frame_bytes=65536).build(memory) as src:
            overhead = len(pack(["app", pack([1, {"pad": "x" * 60_000}]), {"chunk": "big"}])) - 60_000
            big = pack(["app", pack([1, {"pad": "x" * (65536 - overhead)}]), {"chunk": "big"}])
            assert len(big) == 65536
            assert await roundtrip(src, big + pack(["app", 1, {}, {"chunk": "next"}]), acks=2) == [
                {"ack": "big"}, {"ack": "next"}]

    async def test_refused_slice_is_not_acked_and_the_chunk_is_resent_whole(
            self, memory: MemorySink, caplog: pytest.LogCaptureFixture) -> None:
        """At-least-once: the slices before a refused one were delivered, and come again with the
        same ids when the client resends the chunk."""
        calls = [0]

        def second_fails(batch: Sequence[CloudEvent]) -> Exception | None:
            calls[0] += 1
            return SinkError("down") if calls[0] == 2 else None

        memory.fail = second_fails
        frame = ["app", b"".join(pack([1, {"i": i}]) for i in range(25)), {"chunk": "c"}]
        async with ForwardSourceConfig(port=0, max_frame_entries=10).build(memory) as src:
            client = await Client.connect(src.port)
            await client.send(frame)
            assert await client.closed()
            assert [e.id for e in memory.events] == [f"c-{i}" for i in range(10)]
            assert (src.acks, src.errors) == (0, 1)
            assert await roundtrip(src, frame) == [{"ack": "c"}]
        assert [e.id for e in memory.events[10:]] == [f"c-{i}" for i in range(25)]
        assert "subscriber refused the batch, not acked" in caplog.text

    async def test_bad_entry_in_a_later_slice_is_not_acked(self, memory: MemorySink) -> None:
        entries = [pack([1, {"i": i}]) for i in range(25)]
        entries[15] = pack([1, "not a map"])
        async with ForwardSourceConfig(port=0, max_frame_entries=10).build(memory) as src:
            client = await Client.connect(src.port)
            await client.send(["app", b"".join(entries), {"chunk": "c"}])
            assert await client.closed()
            assert (src.acks, src.errors, len(memory.events)) == (0, 1, 10)

    @pytest.mark.parametrize(("empty", "refused"), [(10, False), (11, True)])
    async def test_gzip_members_ending_no_entry(self, memory: MemorySink, caplog: pytest.LogCaptureFixture,
                                                empty: int, refused: bool) -> None:
        """Up to max_frame_entries of them (empty members cost work and carry nothing); members
        with entries are not counted."""
        with_entries = [gzip.compress(pack([1, {"i": i}])) for i in range(25)]
        packed = b"".join(with_entries[:5]) + gzip.compress(b"", mtime=0) * empty + b"".join(with_entries[5:])
        frame = ["app", packed, {"chunk": "c", "compressed": "gzip"}]
        async with ForwardSourceConfig(port=0, max_frame_entries=10).build(memory) as src:
            if not refused:
                assert await roundtrip(src, frame) == [{"ack": "c"}]
                assert [e.json()["i"] for e in memory.events] == list(range(25))
                return
            client = await Client.connect(src.port)
            await client.send(frame)
            assert await client.closed()
            assert src.acks == 0 and src.errors == 1
        assert "bad frame: more gzip members ending no entry than max_frame_entries (10)" in caplog.text

    async def test_gzip_bomb_is_bounded(self, memory: MemorySink) -> None:
        async with ForwardSourceConfig(port=0, max_frame_bytes=4096).build(memory) as src:
            entries = gzip.compress(pack([1, {"z": "0" * 100_000}]))
            client = await Client.connect(src.port)
            await client.send(["app", entries, {"compressed": "gzip", "chunk": "c"}])
            assert await client.closed()

    @pytest.mark.parametrize("mode", ["message", "compressed"])
    async def test_entries_that_decode_into_millions_of_values_are_refused(
            self, memory: MemorySink, caplog: pytest.LogCaptureFixture, mode: str) -> None:
        """max_frame_bytes bounds bytes, not what they become: a one-byte empty map is a 64-byte
        dict, so a 29 KB gzip frame of one record (30 million of them) took 2.2 GB."""
        n = 1_000_000
        record = pack({"a": None})[:-1] + b"\xdd" + struct.pack(">I", n) + b"\x80" * n  # {"a": [{} x n]}
        if mode == "message":
            frame = b"\x94" + pack("app") + pack(1) + record + pack({"chunk": "c"})
        else:
            frame = pack(["app", gzip.compress(b"\x92\x01" + record), {"compressed": "gzip", "chunk": "c"}])
        async with ForwardSourceConfig(port=0, max_frame_bytes=(1 << 20) + 4096).build(memory) as src:
            client = await Client.connect(src.port)
            tracemalloc.start()
            try:
                await client.send(frame)
                assert await client.closed()
                peak = tracemalloc.get_traced_memory()[1]
            finally:
                tracemalloc.stop()
            assert (src.acks, src.errors, memory.events) == (0, 1, [])
        assert "decode into more than 65792 maps and arrays" in caplog.text and peak < 24 << 20

    async def test_records_of_many_small_values_are_no_bomb(self, memory: MemorySink) -> None:
        """Counting every item, 10,000 records of 250 small integers (a 4 MB frame) were refused,
        and each resend delivered the first batch again."""
        entries = b"".join(pack([1, {"v": list(range(250))}]) for _ in range(10_000))
        async with ForwardSourceConfig(port=0).build(memory) as src:
            assert await roundtrip(src, ["app", entries, {"chunk": "c"}]) == [{"ack": "c"}]
            assert len(memory.events) == 10_000 and src.errors == 0

    @pytest.mark.parametrize("frame", [pack(["app", [reduce(lambda v, _: [v], range(1000), [])]]),
                                       pack(["app", [[1, reduce(lambda v, _: [v], range(1000), [])]]])],
                             ids=["entry", "record"])
    async def test_a_deep_entry_or_record_closes_with_its_reason(
            self, memory: MemorySink, caplog: pytest.LogCaptureFixture, frame: bytes) -> None:
        """Describing it for the reason repr()ed it: a RecursionError, asyncio's traceback, no reason."""
        async with ForwardSourceConfig(port=0).build(memory) as src:
            client = await Client.connect(src.port)
            await client.send(frame)
            assert await client.closed()
            assert src.errors == 1
        assert "an array of 1 items" in caplog.text and not [r for r in caplog.records if r.exc_info]

    async def test_a_chunk_that_is_not_utf8_is_acked_as_sent(self, memory: MemorySink) -> None:
        """Its ack could not be packed once the records were handed on: the connection closed
        unacked, and every resend delivered them again."""
        frame = b"\x93" + pack("app") + pack(pack([1, {"k": "v"}])) + b"\x81" + pack("chunk") + b"\xa2a\xff"
        async with ForwardSourceConfig(port=0).build(memory) as src:
            client = await Client.connect(src.port)
            await client.send(frame)
            async with asyncio.timeout(5):
                ack = await client.reader.read(100)
            await client.aclose()
            assert ack == b"\x81\xa3ack\xa2a\xff" and src.acks == 1 and len(memory.events) == 1

    async def test_a_frame_stopped_midway_closes_the_connection(
            self, memory: MemorySink, caplog: pytest.LogCaptureFixture) -> None:
        """A client that stopped mid-frame held its bytes (up to max_frame_bytes) for as long as it
        stayed; one idle between frames stays."""
        frame = pack(["app", 1, {"a": 1}, {"chunk": "c"}])
        async with ForwardSourceConfig(port=0, frame_timeout=0.3).build(memory) as src:
            idle, stalled = await Client.connect(src.port), await Client.connect(src.port)
            await stalled.send(frame[:5])
            assert await stalled.closed()
            assert await roundtrip(src, frame) == [{"ack": "c"}]
            await asyncio.sleep(0.5)
            await idle.send(frame)
            assert await idle.reply() == {"ack": "c"} and src.errors == 1
            await idle.aclose()
        assert "a frame begun did not arrive whole within 0.3s (frame_timeout)" in caplog.text

    async def test_a_big_frame_on_a_slow_link_has_time_for_its_size(self, memory: MemorySink) -> None:
        """One deadline for the frame, whatever its size: a 2 MB frame over a link slower than
        frame_timeout allowed was refused, and every resend too."""
        frame = pack(["app", 1, {"pad": "x" * (2 << 20)}, {"chunk": "c"}])
        async with ForwardSourceConfig(port=0, frame_timeout=0.3).build(memory) as src:
            client = await Client.connect(src.port)
            for start in range(0, len(frame), 256 << 10):  # ~1 s in all: over 0.3 s, under 0.3 + 2 s
                await client.send(frame[start:start + (256 << 10)])
                await asyncio.sleep(0.12)
            assert await client.reply() == {"ack": "c"} and src.errors == 0
            await client.aclose()

    @pytest.mark.parametrize("behind", ["its own frame", "another connection's frame"])
    async def test_time_the_source_was_not_reading_is_not_frame_time(self, behind: str) -> None:
        """frame_timeout ran from a frame's first byte: one that came behind a frame the subscriber
        held longer than that (or behind one waiting for its turn) was past it when reading resumed,
        and its connection was closed; a sender that does not wait for acks lost it."""
        subscriber = Held()
        rest = pack(["app", 1, {"n": "b"}, {"chunk": "b"}])
        async with ForwardSourceConfig(port=0, frame_timeout=1.0, in_flight=1).build(subscriber) as src:
            if behind == "another connection's frame":
                other = await Client.connect(src.port)
                await other.send(["app", 1, {"n": "x"}, {"chunk": "x"}])
                await until(lambda: subscriber.held == 1)
            client = await Client.connect(src.port)
            await client.send(pack(["app", 1, {"n": "a"}, {"chunk": "a"}]) + rest[:5])  # "b" begun
            await until(lambda: src._taking == 1 + (behind != "its own frame"))
            await asyncio.sleep(1.5)  # past frame_timeout: the rest of "b" is not read meanwhile
            subscriber.release.set()
            assert await client.reply() == {"ack": "a"}
            await client.send(rest[5:])
            assert await client.reply() == {"ack": "b"} and src.errors == 0
            await client.aclose()

    async def test_a_frame_dripped_past_frame_timeout_closes_the_connection(self, memory: MemorySink) -> None:
        """The deadline was per read: a byte every 0.4 s held a frame for ever under a 0.5 s timeout."""
        frame = pack(["app", 1, {"a": "x" * 100}, {"chunk": "c"}])
        async with ForwardSourceConfig(port=0, frame_timeout=0.5).build(memory) as src:
            client = await Client.connect(src.port)
            sent = 0
            with contextlib.suppress(ConnectionError):
                while sent < 20 and not src.errors:  # 4 s of drip, a byte every 0.2 s
                    await client.send(frame[sent:sent + 1])
                    sent += 1
                    await asyncio.sleep(0.2)
            assert src.errors == 1 and sent < 8 and memory.events == []  # closed ~0.5 s in
            await client.aclose()

    async def test_subscriber_failure_is_not_acked(self, source: ForwardSource, memory: MemorySink) -> None:
        memory.fail = failing(1)
        frame = ["app", T_NS // NS, {"a": 1}, {"chunk": "retry-me"}]
        client = await Client.connect(source.port)
        await client.send(frame)
        assert await client.closed()  # a real client sees the cut and resends
        assert memory.events == [] and source.acks == 0 and source.errors == 1
        assert await roundtrip(source, frame) == [{"ack": "retry-me"}]
        assert len(memory.events) == 1

    async def test_close_while_subscriber_busy_acks_nothing(self) -> None:
        started = asyncio.Event()

        class Stuck:
            async def send_batch(self, events: Sequence[CloudEvent]) -> None:
                started.set()
                await asyncio.sleep(30)

        src = ForwardSourceConfig(port=0).build(Stuck())
        await src.start()
        client = await Client.connect(src.port)
        await client.send(["app", 1, {}, {"chunk": "c"}])
        await asyncio.wait_for(started.wait(), 5)
        await asyncio.wait_for(src.aclose(), 5)
        assert await client.closed() and src.acks == 0

    async def test_run_serves_until_closed(self, memory: MemorySink) -> None:
        src = ForwardSourceConfig(port=0).build(memory)
        runner = asyncio.create_task(src.run())
        await until(lambda: src.port != 0)
        assert await roundtrip(src, ["app", 1, {}, {"chunk": "r"}]) == [{"ack": "r"}]
        await src.aclose()
        await asyncio.wait_for(runner, 5)


class TestInFlight:
    """At most `in_flight` frames, across connections, are converted and with the subscriber at
    once: each held a batch of up to max_frame_entries events (~12 MB), and 30 connections 30."""

    async def test_connections_beyond_it_wait_their_turn(self) -> None:
        subscriber = Held()
        async with ForwardSourceConfig(port=0, in_flight=2).build(subscriber) as src:
            clients = [await Client.connect(src.port) for _ in range(5)]
            for i, client in enumerate(clients):
                await client.send(["app", [[1, {"i": i}]] * 3, {"chunk": f"c{i}"}])
            await until(lambda: src._taking == 5 and subscriber.held >= 2)  # every frame read
            assert subscriber.held == 2
            subscriber.release.set()
            assert [await client.reply() for client in clients] == [{"ack": f"c{i}"} for i in range(5)]
            for client in clients:
                await client.aclose()
        assert subscriber.most == 2
        assert sorted(e.json()["i"] for e in subscriber.events) == sorted(list(range(5)) * 3)

    @pytest.mark.parametrize("stop", ["drain", "aclose"])
    async def test_a_stop_takes_no_frame_waiting_for_its_turn(self, stop: str) -> None:
        """A drain lets the frame in hand finish, not those waiting (they are not acked: their
        senders send them again), and waits for none of them; aclose ends them all."""
        subscriber = Held()
        src = ForwardSourceConfig(port=0, in_flight=1).build(subscriber)
        await src.start()
        try:
            first, waiting = await Client.connect(src.port), await Client.connect(src.port)
            await first.send(["app", 1, {"n": 1}, {"chunk": "first"}])
            await until(lambda: subscriber.held == 1)
            await waiting.send(["app", 1, {"n": 2}, {"chunk": "waiting"}])
            await until(lambda: src._taking == 2)
            if stop == "drain":
                drained = asyncio.create_task(src.drain(30))
                await until(lambda: src._draining)
                subscriber.release.set()
                assert await asyncio.wait_for(drained, 10)
                assert await first.reply() == {"ack": "first"}
            else:
                await asyncio.wait_for(src.aclose(), 10)
                subscriber.release.set()
        finally:
            await src.aclose()
        assert await first.closed() and await waiting.closed()
        assert src.acks == (stop == "drain") and [e.json() for e in subscriber.events] == (
            [{"n": 1}] if stop == "drain" else [])


    async def test_a_frame_waiting_for_its_turn_is_dropped_when_its_sender_goes(self) -> None:
        """It was held, read whole, until its turn came, then handed on for no one to ack: a sender
        that resends on a new connection piled them up (40 tries of a 4 MiB chunk held 280 MB)."""
        subscriber = Held()
        async with ForwardSourceConfig(port=0, in_flight=1).build(subscriber) as src:
            first = await Client.connect(src.port)
            await first.send(["app", 1, {"n": 1}, {"chunk": "first"}])
            await until(lambda: subscriber.held == 1)
            gone = await Client.connect(src.port)
            await gone.send(["app", 1, {"n": 2}, {"chunk": "gone"}])
            await until(lambda: src._taking == 2)
            gone.reset()
            await until(lambda: src.abandoned == 1 and len(src._tasks) == 1, what="the waiting frame dropped")
            subscriber.release.set()
            assert await first.reply() == {"ack": "first"}
            await first.aclose()
        assert [e.json() for e in subscriber.events] == [{"n": 1}] and src.acks == 1

    async def test_a_stop_does_not_wait_for_an_ack_the_sender_does_not_read(self) -> None:
        """The batch is taken once the subscriber returned: a drain waited for the ack to be
        written (drain_timeout, to a sender not reading), then said it was not taken."""
        memory = MemorySink()
        chunk = "k" * (8 << 20)  # an ack no socket buffer holds
        src = ForwardSourceConfig(port=0).build(memory)
        await src.start()
        try:
            sock = socket.socket()
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
            sock.setblocking(False)
            await asyncio.get_running_loop().sock_connect(sock, ("127.0.0.1", src.port))
            client = Client(*await asyncio.open_connection(sock=sock))
            await client.send(["app", 1, {"a": 1}, {"chunk": chunk}])  # and reads nothing
            await until(lambda: len(memory.events) == 1, timeout=30)
            assert await asyncio.wait_for(src.drain(10), 20)  # hang guard
            await client.aclose()
        finally:
            await src.aclose()


async def test_turns_pass_over_waiters_lost_or_cancelled() -> None:
    """A turn is never kept by a waiter that left: its connection lost, or its task cancelled
    (aclose) as the turn came."""
    turns = _Turns(1)
    assert await turns.take()
    loop = asyncio.get_running_loop()
    lost, gone = loop.create_future(), loop.create_future()
    waiters = [asyncio.create_task(turns.take(g)) for g in (lost, None, None)]
    await asyncio.sleep(0)
    lost.set_result(None)
    assert await waiters[0] is False
    turns.release()  # to the second
    waiters[2].cancel()  # the third leaves the line
    assert await waiters[1] is True
    assert (await asyncio.gather(waiters[2], return_exceptions=True))[0].__class__ is asyncio.CancelledError
    late = asyncio.create_task(turns.take(gone))
    await asyncio.sleep(0)
    turns.release()  # given to `late`...
    late.cancel()  # ...as it is cancelled: it goes back
    await asyncio.gather(late, return_exceptions=True)
    assert await asyncio.wait_for(turns.take(), 5)


class TestLifecycle:
    async def test_a_heartbeat_between_frames_is_ignored(self, source: ForwardSource, memory: MemorySink) -> None:
        """A msgpack nil is the protocol's TCP heartbeat (Fluentd's in_forward skips it): it closed
        the connection as a bad frame, and what was sent behind it had to come again."""
        acks = await roundtrip(source, ["app", 1, {"a": 1}, {"chunk": "c1"}], None,
                               ["app", 2, {"a": 2}, {"chunk": "c2"}], acks=2)
        assert acks == [{"ack": "c1"}, {"ack": "c2"}]
        assert (len(memory.events), source.frames, source.errors) == (2, 2, 0)

    async def test_run_returns_after_stop(self, memory: MemorySink) -> None:
        """The Source contract; `run` waited for `aclose`."""
        src = ForwardSourceConfig(port=0).build(memory)
        task = asyncio.create_task(src.run())
        await until(lambda: src.port != 0)
        src.stop()
        await asyncio.wait_for(task, 5)
        await src.aclose()

    @pytest.mark.parametrize("steps", range(6))
    async def test_a_connection_accepted_as_it_closes_is_ended_too(self, memory: MemorySink, steps: int) -> None:
        """One accepted before `aclose` whose task had not begun was not among those ended: it was
        served after `aclose` returned (events into a closed subscriber), or, on Python 3.12,
        held `aclose` until the client left."""
        src = ForwardSourceConfig(port=0).build(memory)
        await src.start()
        sock = socket.create_connection(("127.0.0.1", src.port))  # accepted by the kernel at once
        for _ in range(steps):
            await asyncio.sleep(0)
        await asyncio.wait_for(src.aclose(), 5)
        client = Client(*await asyncio.open_connection(sock=sock))
        reply = None
        # Ended (reset), or, when asyncio's accept met the closed server (Python 3.11 drops such
        # a connection silently, its socket left to the GC), never answered: not served either way.
        with contextlib.suppress(OSError, EOFError, TimeoutError):
            await client.send(["app", 1, {"a": 1}, {"chunk": "after"}])
            reply = await client.reply(timeout=0.5)
        await client.aclose()
        assert (reply, memory.events) == (None, [])


class TestRefusedForGood:
    """Events the subscriber refuses for good are dead-lettered and the chunk acked: resent, the
    chunk was refused again, for ever (the sender stuck on it, the records behind the refused one
    never delivered). A batch refused together for its size goes in halves first."""

    async def test_a_batch_refused_for_its_size_goes_in_halves(self, tmp_path: Path) -> None:
        dead = tmp_path / "dead" / "forward.jsonl"
        records = [[1, {"i": i, "pad": "x" * (50_000 if i == 25 else 2000)}] for i in range(60)]
        with EventCollector() as receiver:
            receiver.max_body = 40_000  # a receiver's request limit: the batch POST answered 413
            sink = HttpSinkConfig(url=receiver.url, mode="batch").build()
            async with ForwardSourceConfig(port=0, dead_letter_file=dead).build(sink) as src:
                assert await roundtrip(src, ["app", records, {"chunk": "c"}]) == [{"ack": "c"}]
                assert (src.records, src.refused, src.errors) == (59, 1, 0)
            await sink.aclose()
            assert [e.id for e in receiver.events] == [f"c-{i}" for i in range(60) if i != 25]  # in order, once
        (line,) = dead.read_bytes().splitlines()
        assert orjson.loads(line)["attributes"]["id"] == "c-25" and "413" in orjson.loads(line)["reason"]

    async def test_without_a_dead_letter_file_they_are_logged(
            self, memory: MemorySink, caplog: pytest.LogCaptureFixture) -> None:
        memory.fail = lambda batch: RejectedError("invalid for the receiver", [e for e in batch if e.id == "c-1"])
        memory.events.clear()
        async with ForwardSourceConfig(port=0).build(memory) as src:
            frame = ["app", [[1, {"i": i}] for i in range(3)], {"chunk": "c"}]
            assert await roundtrip(src, frame) == [{"ack": "c"}]
            assert (src.records, src.refused, src.acks) == (2, 1, 1)
        assert "refused 1 events (not dead-lettered: no dead_letter_file): invalid for the receiver; ids c-1" in caplog.text

    async def test_a_frame_without_chunk_goes_on_when_its_dead_letters_cannot_be_written(
            self, tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
        """No chunk, no resend: the connection was closed, the rest of the frame lost and the
        refused events' ids never said."""
        class RefusesOne(MemorySink):  # takes the others, as a RejectedError says
            async def send_batch(self, events: Sequence[CloudEvent]) -> None:
                self.events.extend(e for e in events if e.json() != {"i": 1})
                if bad := [e for e in events if e.json() == {"i": 1}]:
                    raise RejectedError("no", bad)

        memory = RefusesOne()
        (tmp_path / "file").write_text("")
        async with ForwardSourceConfig(port=0, max_frame_entries=2,
                                       dead_letter_file=tmp_path / "file" / "dead.jsonl").build(memory) as src:
            client = await Client.connect(src.port)
            await client.send(["app", [[1, {"i": i}] for i in range(5)]])
            await until(lambda: src.records == 4)
            await client.aclose()
        assert [e.json()["i"] for e in memory.events] == [0, 2, 3, 4] and src.refused == 1
        assert "(not dead-lettered (" in caplog.text and src.errors == 0

    async def test_a_dead_letter_file_that_cannot_be_written_is_not_acked(
            self, memory: MemorySink, tmp_path: Path) -> None:
        memory.fail = lambda batch: RejectedError("no")
        (tmp_path / "file").write_text("")
        async with ForwardSourceConfig(port=0, dead_letter_file=tmp_path / "file" / "dead.jsonl").build(memory) as src:
            client = await Client.connect(src.port)
            await client.send(["app", 1, {}, {"chunk": "c"}])
            assert await client.closed()  # the sender sends it again
            assert (src.acks, src.refused, src.errors) == (0, 0, 1)


class TestFluentLogger:
    """fluent-logger's synchronous sender (Message mode, EventTime) as a real third-party client."""

    async def test_sender_records_arrive(self, source: ForwardSource, memory: MemorySink) -> None:
        sender = FluentSender("app", host="127.0.0.1", port=source.port, nanosecond_precision=True)
        before = time.time_ns()
        try:
            assert await asyncio.to_thread(sender.emit, "web", {"user": "u1", "latency": 1.5})
            assert await asyncio.to_thread(sender.emit_with_time, "web", 1_700_000_000.25, {"n": 2})
        finally:
            await asyncio.to_thread(sender.close)
        await until(lambda: len(memory.events) == 2)
        first, second = memory.events
        assert first["subject"] == "app.web" and first.json() == {"user": "u1", "latency": 1.5}
        assert before <= int(first.meta["fluentd-time"]) <= time.time_ns()
        assert second.meta["fluentd-time"] == str(1_700_000_000 * NS + NS // 4)  # EventTime kept the .25
        assert second["time"] == "2023-11-14T22:13:20.250000000Z"


def test_small_records_hold_little_memory() -> None:
    """A record's JSON holds its own size, not orjson's 4 KiB starting buffer (x5 what an event holds)."""
    source = ForwardSourceConfig(port=0).build(MemorySink())
    frame = parse_frame(pack(["app", pack([1, {}]) * 10_000, {"chunk": "c"}]), 1 << 20)
    tracemalloc.start()
    try:
        events = source.to_events(frame)
        held = tracemalloc.get_traced_memory()[0]
    finally:
        tracemalloc.stop()
    assert len(events) == 10_000 and held < 10_000 * 2048


def test_parse_frame_modes_agree() -> None:
    """The three uncompressed modes carrying the same entries parse to the same frame."""
    entries = [[event_time(T_NS), {"a": 1}]]
    message = parse_frame(pack(["t", event_time(T_NS), {"a": 1}, {"chunk": "c"}]), 1 << 20)
    forward = parse_frame(pack(["t", entries, {"chunk": "c"}]), 1 << 20)
    packed = parse_frame(pack(["t", b"".join(pack(e) for e in entries), {"chunk": "c"}]), 1 << 20)
    frames = [(f.tag, list(f.entries), f.chunk) for f in (message, forward, packed)]
    assert frames[0] == frames[1] == frames[2] == ("t", [(T_NS, {"a": 1})], "c")
    assert orjson.dumps(frames[0][1][0][1]) == b'{"a":1}'

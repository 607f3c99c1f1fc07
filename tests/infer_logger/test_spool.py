"""The spool: appends, cursors, checkpoints, rotation, overflow and corruption."""

from __future__ import annotations

import asyncio
import errno
import os
import zlib
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest

from infer_logger import spool as spool_module
from infer_logger.cloudevents.event import CloudEvent
from infer_logger.errors import SpoolError
from infer_logger.spool import DiskSpool, MemorySpool, Position, SpoolFollower, encode_record, iter_records
from tests.waiting import until


def event(i: int, size: int = 10) -> CloudEvent:
    return CloudEvent({"id": str(i), "type": "t", "source": "s", "specversion": "1.0"}, b"x" * size)


def _a_and_b_delivered(directory: Path) -> None:
    """A spool of 10 events, `--log-url A --log-url B`: http (to A) took 8, http2 (to B) 2."""
    spool = DiskSpool(directory)
    for i in range(10):
        spool.append(event(i))
    a, b = spool.reader("http", destination="A"), spool.reader("http2", destination="B")
    a.commit(a.read(8)[1], force=True)
    b.commit(b.read(2)[1], force=True)
    spool.close()


def drain(reader, batch: int = 1000) -> list[str]:
    ids = []
    while True:
        events, end = reader.read(batch)
        if not events and end == reader.position:
            return ids
        ids += [e.id for e in events]
        reader.commit(end)
        reader.flush()


def _with_record_5_flipped(path: Path, n: int) -> None:
    """A spool of `n` events whose record 5 has a byte of its data flipped: its checksum fails."""
    spool = DiskSpool(path, segment_bytes=1 << 20)
    for i in range(n):
        spool.append(event(i, 100))
    spool.close()
    seg = sorted(path.glob("*.seg"))[0]
    raw = bytearray(seg.read_bytes())
    record = len(encode_record(event(0, 100)))
    raw[5 * record + record - 10] ^= 0xFF
    seg.write_bytes(bytes(raw))


def failing_reads(monkeypatch: pytest.MonkeyPatch, path: Path | None, code: int = errno.EIO, *,
                  at: str = "read") -> None:
    """Reads of `path` (None: of every file) through the spool module fail with `code` (EIO: as
    from a bad sector), or with `at="open"` its opening does."""
    real = open

    class Unreadable:
        def __init__(self, fh: Any) -> None:
            self._fh = fh

        def read(self, *args: object) -> bytes:
            raise OSError(code, os.strerror(code))

        def __getattr__(self, name: str) -> Any:
            return getattr(self._fh, name)

        def __enter__(self) -> Unreadable:
            return self

        def __exit__(self, *exc: object) -> None:
            self._fh.close()

    def opened(file: Any, *args: Any, **kwargs: Any) -> Any:
        failing = path is None or Path(file) == path
        if failing and at == "open":
            raise OSError(code, os.strerror(code))
        fh = real(file, *args, **kwargs)
        return Unreadable(fh) if failing else fh

    monkeypatch.setattr(spool_module, "open", opened, raising=False)


class TestRecord:
    """The frame round-trips and detects damage."""

    def test_round_trip_with_and_without_data(self) -> None:
        a, b = event(1), CloudEvent({"id": "2"}, None)
        buf = encode_record(a) + encode_record(b)
        out = [e for e, _ in iter_records(buf)]
        assert out == [a, b]
        assert out[1].data is None

    def test_partial_trailing_frame_is_not_an_error(self) -> None:
        buf = encode_record(event(1)) + encode_record(event(2))[:-3]
        assert [e.id for e, _ in iter_records(buf)] == ["1"]

    @pytest.mark.parametrize("flags", [1, 2, 0x8000], ids=["no-data-with-data", "unknown", "high"])
    def test_flags_the_checksum_does_not_cover_are_checked(self, flags: int) -> None:
        """The flags are outside the checksum: a flipped bit 0 (data is None) delivered the
        event without its data, uncounted."""
        from infer_logger.errors import CorruptRecordError

        raw = bytearray(encode_record(event(1)) + encode_record(event(2)))
        raw[2:4] = flags.to_bytes(2, "little")
        with pytest.raises(CorruptRecordError, match="flags") as caught:
            list(iter_records(bytes(raw)))
        assert [e.id for e, _ in iter_records(bytes(raw), caught.value.resume or 0)] == ["2"]


class TestDiskSpool:
    """Durable spool behaviour across readers and restarts."""

    def test_each_reader_sees_everything_once(self, tmp_path: Path) -> None:
        spool = DiskSpool(tmp_path)
        for i in range(100):
            assert spool.append(event(i))
        a, b = spool.reader("a"), spool.reader("b")
        assert drain(a, 7) == [str(i) for i in range(100)]
        assert drain(b) == [str(i) for i in range(100)]
        assert drain(a) == []

    def test_checkpoint_survives_restart(self, tmp_path: Path) -> None:
        spool = DiskSpool(tmp_path)
        for i in range(10):
            spool.append(event(i))
        reader = spool.reader("s")
        events, end = reader.read(4)
        reader.commit(end)
        reader.read(3)  # read but not committed: must come again
        spool.close()
        again = DiskSpool(tmp_path)
        for i in range(10, 12):
            again.append(event(i))
        assert drain(again.reader("s")) == [str(i) for i in range(4, 12)]

    def test_a_checkpoint_saved_for_another_destination_is_not_taken(self, tmp_path: Path) -> None:
        """--log-url sinks are named by place: dropping the first URL gave the second its name and
        checkpoint, and it skipped what the first had delivered and it had not."""
        spool = DiskSpool(tmp_path)
        for i in range(10):
            spool.append(event(i))
        first = spool.reader("http", destination="http://a/")
        first.commit(first.read(6)[1], force=True)
        spool.reader("http2", destination="http://user:secret@b/")  # down: took nothing
        spool.close()
        assert "secret" not in "".join(p.read_text() for p in (tmp_path / "checkpoints").glob("*.json"))
        again = DiskSpool(tmp_path)
        assert drain(again.reader("http", destination="http://user:secret@b/")) == [str(i) for i in range(10)]
        again.close()
        again = DiskSpool(tmp_path)  # the same destination again: its checkpoint is taken
        assert drain(again.reader("http", destination="http://user:secret@b/")) == []
        again.close()
        other = DiskSpool(tmp_path / "other")  # a checkpoint from before destinations: taken
        for i in range(10):
            other.append(event(i))
        end = (tmp_path / "other" / f"{1:020d}.seg").stat().st_size
        (tmp_path / "other" / "checkpoints" / "old.json").write_text(f'{{"segment": 1, "offset": {end}}}')
        assert drain(other.reader("old", destination="http://c/")) == []
        other.close()

    def test_a_renamed_sink_finds_its_checkpoint_and_another_given_its_name_does_not(self, tmp_path: Path) -> None:
        """`--log-url A --log-url B`, then only B: B (http2 -> http) re-sent all it had delivered;
        a YAML sink's checkpoint (no destination then) was taken by a --log-url sink given its name."""
        _a_and_b_delivered(tmp_path)
        again = DiskSpool(tmp_path)
        again.set_aside_unread({"http": "B"})  # as the workers start: http2 is no sink now
        renamed = again.reader("http", destination="B")  # B's own place, under its old name
        assert drain(renamed) == [str(i) for i in range(2, 10)]
        assert "http2" not in [p.stem for p in (tmp_path / "checkpoints").glob("*.json")]  # it went
        again.close()

    def test_sinks_swapped_find_their_checkpoints(self, tmp_path: Path) -> None:
        """`--log-url A --log-url B`, then `--log-url B --log-url A`: http (now to B) found its file
        saved for A, and B's, still under http2 (not set aside yet), was found by nothing: it re-sent
        everything."""
        from infer_logger.dispatch import Dispatcher
        from infer_logger.metrics import Metrics
        from infer_logger.sinks.memory import MemorySink

        _a_and_b_delivered(tmp_path)
        again = DiskSpool(tmp_path)
        d = Dispatcher(again, {"http": MemorySink(), "http2": MemorySink()}, Metrics(again),
                       destinations={"http": "B", "http2": "A"})
        by_name = {w.name: w.reader for w in d.workers}
        assert drain(by_name["http"]) == [str(i) for i in range(2, 10)]
        assert drain(by_name["http2"]) == ["8", "9"]
        assert not [p for p in (tmp_path / "checkpoints").iterdir() if p.name.startswith(".")]  # both taken
        again.close()

    def test_a_sink_put_before_another_leaves_it_its_checkpoint(self, tmp_path: Path) -> None:
        """`--log-url A`, then `--log-url B --log-url A`: B, given A's old name, saved over A's
        checkpoint before A (now http2) looked for it, and A re-sent all it had delivered."""
        spool = DiskSpool(tmp_path)
        for i in range(10):
            spool.append(event(i))
        a = spool.reader("http", destination="A")
        a.commit(a.read(7)[1], force=True)
        spool.close()
        again = DiskSpool(tmp_path)
        b, a = again.reader("http", destination="B"), again.reader("http2", destination="A")
        assert drain(a) == ["7", "8", "9"]
        assert drain(b) == [str(i) for i in range(10)]
        for i in range(10, 12):
            again.append(event(i))
        b.commit(b.read(1)[1], force=True)  # B took one more, A none
        again.close()
        swapped = DiskSpool(tmp_path)  # `--log-url A --log-url B`: each finds its own
        a, b = swapped.reader("http", destination="A"), swapped.reader("http2", destination="B")
        assert (drain(a), drain(b)) == (["10", "11"], ["11"])
        swapped.close()

    def test_segments_roll_and_finished_ones_are_deleted(self, tmp_path: Path) -> None:
        spool = DiskSpool(tmp_path, segment_bytes=1000)
        for i in range(100):
            spool.append(event(i, 50))
        assert len(list(tmp_path.glob("*.seg"))) > 5
        reader = spool.reader("s")
        assert drain(reader) == [str(i) for i in range(100)]
        assert len(list(tmp_path.glob("*.seg"))) == 1

    def test_slowest_reader_holds_segments(self, tmp_path: Path) -> None:
        spool = DiskSpool(tmp_path, segment_bytes=1000)
        fast, slow = spool.reader("fast"), spool.reader("slow")
        for i in range(100):
            spool.append(event(i, 50))
        drain(fast)
        assert len(list(tmp_path.glob("*.seg"))) > 5
        assert drain(slow) == [str(i) for i in range(100)]

    def test_drop_newest_counts_refusals(self, tmp_path: Path) -> None:
        spool = DiskSpool(tmp_path, segment_bytes=1000, max_bytes=3000)
        accepted = sum(spool.append(event(i, 50)) for i in range(100))
        assert accepted < 100
        assert spool.stats.dropped["spool_full"] == 100 - accepted
        assert spool.size_bytes() <= 3000

    def test_drop_newest_takes_events_as_soon_as_a_delivery_process_freed_room(self, tmp_path: Path) -> None:
        """The writer's view of the segments was refreshed at most every 0.5 s: after an outage it
        refused ~0.5 s of traffic into a spool the delivery process had just emptied."""
        spool = DiskSpool(tmp_path, segment_bytes=1000, max_bytes=4000)
        follower = SpoolFollower(tmp_path)
        try:
            reader = follower.reader("http")
            i = 0
            while spool.append(event(i, 50)):
                i += 1
            assert not spool.append(event(i, 50))  # full, and just looked
            follower.refresh()
            assert len(drain(reader)) == i  # the sink is back: the child delivers, and frees
            assert spool.append(event(i, 50))
            assert spool.stats.dropped["spool_full"] == 2
        finally:
            follower.close()
            spool.close()

    def test_drop_oldest_counts_past_the_sinks_checkpoints_not_a_set_aside_one(self, tmp_path: Path) -> None:
        """A checkpoint set aside for a destination no sink has now was read as a sink's (the
        writer, its sinks in the delivery process, looks at the files): all 10 counted lost."""
        import orjson

        size = len(encode_record(event(0, 50)))
        spool = DiskSpool(tmp_path, segment_bytes=size * 10, max_bytes=size * 40, overflow="drop_oldest")
        for i in range(30):
            assert spool.append(event(i, 50))
        checkpoints = tmp_path / "checkpoints"
        checkpoints.joinpath("http.json").write_bytes(
            orjson.dumps({"segment": min(spool._sizes), "offset": size * 9, "destination": "b" * 16}))
        checkpoints.joinpath(f".{'a' * 16}.json").write_bytes(
            orjson.dumps({"segment": 0, "offset": 0, "destination": "a" * 16}))
        for i in range(30, 45):
            spool.append(event(i, 50))
        assert spool.stats.dropped["spool_overflow"] == 1  # the one event the sink had not taken
        spool.close()

    def test_drop_oldest_counts_past_the_configured_sinks_not_a_removed_ones(self, tmp_path: Path) -> None:
        """A sink removed from the config left its checkpoint file behind, the writer counted from
        the lowest file, and the events every configured sink had delivered were counted lost."""
        from infer_logger.dispatch import Dispatcher
        from infer_logger.metrics import Metrics
        from infer_logger.sinks.memory import MemorySink

        size = len(encode_record(event(0, 50)))
        spool = DiskSpool(tmp_path, segment_bytes=size * 10, max_bytes=size * 40, overflow="drop_oldest")
        follower = SpoolFollower(tmp_path)
        try:
            for i in range(5):
                assert spool.append(event(i, 50))
            follower.refresh()
            for name in ("a", "removed"):  # both delivered the first 5 events
                reader = follower.reader(name, destination=f"memory:{name}")
                reader.commit(reader.read(5)[1], force=True)
                follower.remove_reader(name)
            follower.close()
            follower = SpoolFollower(tmp_path)  # the delivery process again, without `removed`
            Dispatcher(follower, {"a": MemorySink()}, Metrics(follower), destinations={"a": "memory:a"})
            reader = follower._readers["a"]
            for i in range(5, 10):
                assert spool.append(event(i, 50))
            follower.refresh()
            reader.commit(reader.read(2)[1], force=True)  # `a` took 7 of the first segment's 10
            for i in range(10, 45):  # past max_bytes: the first segment is dropped
                spool.append(event(i, 50))
            assert spool.stats.dropped["spool_overflow"] == 3  # the 3 `a` had not taken (not 5)
            checkpoints = tmp_path / "checkpoints"
            [aside] = [p for p in checkpoints.iterdir() if p.name.startswith(".")]
            assert not (checkpoints / "removed.json").exists()
            # Added back, it takes its checkpoint, found by its destination (the file set aside goes)
            follower.reader("removed", destination="memory:removed")
            assert (checkpoints / "removed.json").exists() and not aside.exists()
        finally:
            follower.close()
            spool.close()

    def test_a_new_sink_to_the_same_place_takes_no_configured_sinks_checkpoint(self, tmp_path: Path) -> None:
        """Sink `a` delivered everything; a new sink `b` to the same place, listed first, took a's
        checkpoint as a renamed sink's: b skipped all, a re-sent all."""
        from infer_logger.dispatch import Dispatcher
        from infer_logger.metrics import Metrics
        from infer_logger.sinks.memory import MemorySink

        spool = DiskSpool(tmp_path)
        for i in range(10):
            spool.append(event(i))
        a = spool.reader("a", destination="X")
        a.commit(a.read(10)[1], force=True)
        spool.close()
        again = DiskSpool(tmp_path)
        d = Dispatcher(again, {"b": MemorySink(), "a": MemorySink()}, Metrics(again), destinations={"a": "X", "b": "X"})
        by_name = {w.name: w.reader for w in d.workers}
        assert drain(by_name["a"]) == [] and drain(by_name["b"]) == [str(i) for i in range(10)]
        again.close()

    def test_a_checkpoint_of_no_destination_is_left_for_its_sink_added_back(self, tmp_path: Path) -> None:
        """Saved before destinations were kept, set aside it was found by nothing: the sink,
        removed for one start and added back, re-sent everything."""
        import orjson

        spool = DiskSpool(tmp_path)
        for i in range(10):
            spool.append(event(i))
        c = spool.reader("c")
        c.commit(c.read(10)[1], force=True)
        path = tmp_path / "checkpoints" / "c.json"
        saved = orjson.loads(path.read_bytes())
        saved.pop("destination", None)
        path.write_bytes(orjson.dumps(saved))  # as saved before
        spool.close()
        again = DiskSpool(tmp_path)
        again.set_aside_unread({})  # a start without c
        assert path.exists()
        assert drain(again.reader("c", destination="Y")) == []  # added back
        again.close()

    def test_drop_oldest_keeps_newest_and_counts(self, tmp_path: Path) -> None:
        spool = DiskSpool(tmp_path, segment_bytes=1000, max_bytes=3000, overflow="drop_oldest")
        reader = spool.reader("s")
        for i in range(100):
            assert spool.append(event(i, 50))
        ids = drain(reader)
        assert ids[-1] == "99"
        assert len(ids) + spool.stats.dropped["spool_overflow"] == 100

    @pytest.mark.parametrize("overflow", ["drop_newest", "drop_oldest"])
    def test_a_cap_below_the_segment_size_still_takes_every_event_a_sink_keeps_up_with(
        self, tmp_path: Path, overflow: str
    ) -> None:
        # The segment being written is never deleted: were it as big as the cap, a spool the
        # sink has caught up with would fill up and refuse every event from then on.
        spool = DiskSpool(tmp_path, segment_bytes=16 << 20, max_bytes=20_000, overflow=overflow)
        reader = spool.reader("s")
        for i in range(1000):
            assert spool.append(event(i, 200))
            _, end = reader.read(100)
            reader.commit(end, force=True)
        assert not spool.stats.dropped
        assert spool.size_bytes() <= 20_000

    def test_drop_oldest_counts_only_what_a_sink_had_not_taken(self, tmp_path: Path) -> None:
        spool = DiskSpool(tmp_path, segment_bytes=1000, max_bytes=4000, overflow="drop_oldest")
        reader = spool.reader("s")
        reader.checkpoint_interval = float("inf")  # taken, but no checkpoint saved: nothing collected
        for i in range(20):
            spool.append(event(i, 50))
        events, end = reader.read(100)
        reader.commit(end)
        assert len(events) == 20 and reader.lag() == 0
        for i in range(20, 60):
            assert spool.append(event(i, 50))
        ids = drain(reader)
        assert ids[-1] == "59"
        assert len(ids) + spool.stats.dropped["spool_overflow"] == 40

    def test_drop_oldest_counts_a_dropped_segment_by_its_frames_without_decoding_them(
            self, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
        """The append that overflowed decoded the dropped segment to count its events (checksums,
        JSON, a CloudEvent each: ~100 ms a 16 MiB segment, on the proxy's event loop); the frame
        headers tell as much. Those a reader took are not counted, nor a torn tail."""
        size = len(encode_record(event(0, 100)))
        spool = DiskSpool(tmp_path, segment_bytes=size * 10, max_bytes=size * 40, overflow="drop_oldest")
        for i in range(10):
            spool.append(event(i, 100))
        spool.close()
        first = sorted(tmp_path.glob("*.seg"))[0]
        os.truncate(first, size * 10 - 5)  # the last record torn by a crash
        again = DiskSpool(tmp_path, segment_bytes=size * 10, max_bytes=size * 40, overflow="drop_oldest")
        reader = again.reader("s")
        events, end = reader.read(3)
        reader.commit(end)
        assert len(events) == 3

        def decoded(*args: object) -> None:
            raise AssertionError("records decoded to count them")

        monkeypatch.setattr(spool_module, "iter_records", decoded)
        for i in range(10, 41):  # the 31st fills the cap: the first segment goes
            assert again.append(event(i, 100))
        assert not first.exists() and again.stats.dropped["spool_overflow"] == 6  # 10 - 3 taken - 1 torn
        again.close()

    @pytest.mark.parametrize(("damaged", "left"), [
        (20, range(1, 30)),  # inside the first record's body: its checksum fails, its frame holds
        (0, None),  # the first record's magic: where the next starts is unknown, the segment's rest goes
    ], ids=["checksum", "frame"])
    def test_corrupt_segment_is_skipped_and_counted(self, tmp_path: Path, damaged: int, left: range | None) -> None:
        spool = DiskSpool(tmp_path, segment_bytes=500)
        for i in range(30):
            spool.append(event(i, 50))
        spool.close()
        first = sorted(tmp_path.glob("*.seg"))[0]
        raw = bytearray(first.read_bytes())
        raw[damaged] ^= 0xFF
        first.write_bytes(bytes(raw))
        again = DiskSpool(tmp_path)
        ids = drain(again.reader("s"))
        assert again.stats.corrupt == 30 - len(ids)  # the events lost, not the stretches
        if left is not None:
            assert ids == [str(i) for i in left]
        else:
            assert ids and "0" not in ids and "1" not in ids and ids[-1] == "29"

    def test_one_bad_checksum_costs_that_record_only(self, tmp_path: Path) -> None:
        """One flipped byte in a record's payload skipped every good record after it in its
        segment (up to 16 MiB of events)."""
        _with_record_5_flipped(tmp_path, 1000)
        again = DiskSpool(tmp_path)
        first, second = again.reader("s"), again.reader("t")
        ids = drain(first, batch=100)
        assert ids == [str(i) for i in range(1000) if i != 5] and again.stats.corrupt == 1
        # Another sink's reader skips it too: one event lost, counted once (it was once per sink).
        assert len(drain(second, batch=100)) == 999 and again.stats.corrupt == 1

    @pytest.mark.parametrize("attributes", [b"", b"[]", b"not json"], ids=["zeroed-header", "array", "garbage"])
    def test_a_record_whose_checksum_holds_but_attributes_do_not_is_skipped(
            self, tmp_path: Path, attributes: bytes) -> None:
        """A tail zeroed from 2 bytes into a header keeps the magic: lengths 0 and CRC 0 pass the
        check (crc32(b"") is 0), and orjson's error on the empty attributes killed every reader."""
        import zlib

        from infer_logger.spool import _HEADER, _MAGIC

        spool = DiskSpool(tmp_path)
        spool.append(event(0))
        os.write(spool._fd, _HEADER.pack(_MAGIC, 0, zlib.crc32(attributes), len(attributes), 0) + attributes)
        spool.close()
        again = DiskSpool(tmp_path)
        again.append(event(1))
        assert drain(again.reader("s")) == ["0", "1"] and again.stats.corrupt == 1

    def test_a_read_held_short_of_a_stop_skips_a_frame_running_past_it(self, tmp_path: Path) -> None:
        """A length's flipped bit made a frame run past `stop`: read as a partial frame (the
        writer mid-append), the read returned nothing at the same place for good."""
        spool = DiskSpool(tmp_path)
        starts = []
        for i in range(10):
            starts.append(spool.tail())
            spool.append(event(i))
        spool.close()
        segment = tmp_path / f"{starts[0].segment:020d}.seg"
        raw = bytearray(segment.read_bytes())
        raw[starts[2].offset + 12 + 3] ^= 0x40  # record 2's data length, past the next records
        segment.write_bytes(bytes(raw))
        again = DiskSpool(tmp_path)
        reader = again.reader("s")
        events, end = reader.read(100, starts[0], stop=starts[5])
        assert [e.id for e in events] == ["0", "1"] and end == starts[5]
        assert again.stats.corrupt == 3  # records 2 to 4: the events lost
        assert [e.id for e in reader.read(100, end)[0]] == ["5", "6", "7", "8", "9"]

    def test_torn_tail_after_crash(self, tmp_path: Path) -> None:
        spool = DiskSpool(tmp_path)
        for i in range(5):
            spool.append(event(i))
        os.write(spool._fd, encode_record(event(5))[:-4])  # what a kill -9 mid-write leaves
        spool.close()
        again = DiskSpool(tmp_path)
        again.append(event(6))
        assert drain(again.reader("s")) == ["0", "1", "2", "3", "4", "6"]
        assert again.stats.corrupt == 1

    def test_big_record_larger_than_read_chunk(self, tmp_path: Path) -> None:
        spool = DiskSpool(tmp_path)
        spool.append(event(1, 3 << 20))
        spool.append(event(2))
        events, _ = spool.reader("s").read(10)
        assert [len(e.data or b"") for e in events] == [3 << 20, 10]

    @pytest.mark.parametrize("how", ["eio", "directory"])
    def test_an_unreadable_segment_is_skipped_and_counted(self, tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                          caplog: pytest.LogCaptureFixture, how: str) -> None:
        """EIO from a bad sector, or a directory where a segment should be: the OSError escaped
        every read, and the sink worker restarted at it for ever, delivering nothing more."""
        spool = DiskSpool(tmp_path, segment_bytes=500)
        for i in range(30):
            spool.append(event(i, 50))
        spool.close()
        bad = sorted(tmp_path.glob("*.seg"))[1]
        lost = {e.id for e, _ in iter_records(bad.read_bytes())}
        if how == "eio":
            failing_reads(monkeypatch, bad)
        else:
            bad.unlink()
            bad.mkdir()
        again = DiskSpool(tmp_path)
        events, _ = again.reader("s").read(1000)  # the segment before it comes in the same read
        assert [e.id for e in events] == [str(i) for i in range(30) if str(i) not in lost]
        assert again.stats.corrupt >= 1
        assert ("Input/output error" if how == "eio" else "Is a directory") in caplog.text

    @pytest.mark.parametrize("code", [errno.EMFILE, errno.EACCES, errno.ESTALE])
    @pytest.mark.parametrize("at", ["open", "read"])
    def test_a_segment_failing_for_a_reason_that_may_pass_is_read_again_not_skipped(
            self, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, at: str, code: int) -> None:
        """Out of descriptors, permissions changed, an NFS handle gone stale: skipped as damaged,
        the segment's events were lost for good (deleted once every reader passed)."""
        spool = DiskSpool(tmp_path, segment_bytes=500)
        for i in range(30):
            spool.append(event(i, 50))
        spool.close()
        again = DiskSpool(tmp_path)
        reader = again.reader("s")
        failing_reads(monkeypatch, None, code, at=at)
        with pytest.raises(OSError):
            reader.read(1000)
        monkeypatch.undo()
        events, _ = reader.read(1000)
        assert [e.id for e in events] == [str(i) for i in range(30)]
        assert again.stats.corrupt == 0

    def test_a_checkpoint_out_of_descriptors_for_now_is_not_read_from_the_oldest(
            self, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
        """Read from the oldest segment, every event delivered before was sent again."""
        spool = DiskSpool(tmp_path, segment_bytes=500)
        for i in range(30):
            spool.append(event(i, 50))
        reader = spool.reader("s")
        _, end = reader.read(1000)
        reader.commit(end, force=True)
        spool.close()

        def unreadable(path: Path) -> Any:
            raise OSError(errno.EMFILE, "Too many open files")

        again = DiskSpool(tmp_path)
        monkeypatch.setattr(spool_module, "_read_checkpoint", unreadable)
        with pytest.raises(OSError):
            again.reader("s")

    def test_the_segment_being_written_is_read_again_after_an_eio_in_the_delivery_process(
            self, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
        """Its size there is a stat's, which may fall inside a record being appended: skipped to
        it, the next read found no frame there and skipped the rest, the whole records written
        after it too."""
        spool = DiskSpool(tmp_path)
        follower = SpoolFollower(tmp_path)
        try:
            reader = follower.reader("s")
            for i in range(5):
                spool.append(event(i))
            follower.refresh()
            [current] = tmp_path.glob("*.seg")
            failing_reads(monkeypatch, current)
            with pytest.raises(OSError):
                reader.read(100)
            monkeypatch.undo()
            for i in range(5, 10):
                spool.append(event(i))
            follower.refresh()
            events, _ = reader.read(100)
            assert [e.id for e in events] == [str(i) for i in range(10)] and follower.stats.corrupt == 0
        finally:
            follower.close()
            spool.close()

    def test_the_segment_being_written_skips_only_what_it_holds_after_an_eio_in_the_writers_process(
            self, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
        """The broker's log, inline delivery: the writer's sizes end whole records. Raised while
        the segment was being written, its events after the damage were held back, then lost
        with the rest of the segment once it was not."""
        spool = DiskSpool(tmp_path)
        reader = spool.reader("s")
        for i in range(5):
            spool.append(event(i))
        [current] = tmp_path.glob("*.seg")
        failing_reads(monkeypatch, current)
        skipped, end = reader.read(100)
        assert skipped == [] and end.offset == current.stat().st_size
        monkeypatch.undo()
        for i in range(5, 10):
            spool.append(event(i))
        events, _ = reader.read(100, end)
        assert [e.id for e in events] == [str(i) for i in range(5, 10)] and spool.stats.corrupt == 1

    def test_the_segment_being_written_still_damaged_counts_each_stretch_skipped(
            self, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
        """Counted once per segment, the events appended after the first skip were skipped with
        no count and no log line."""
        spool = DiskSpool(tmp_path)
        reader = spool.reader("s")
        spool.append(event(0))
        [current] = tmp_path.glob("*.seg")
        failing_reads(monkeypatch, current)
        _, end = reader.read(100)
        spool.append(event(1))
        reader.read(100, end)
        assert spool.stats.corrupt == 2

    def test_an_unreadable_segment_is_counted_once_not_per_sink(self, tmp_path: Path,
                                                                monkeypatch: pytest.MonkeyPatch) -> None:
        spool = DiskSpool(tmp_path, segment_bytes=500)
        for i in range(30):
            spool.append(event(i, 50))
        before = spool.reader("b")
        _, end = before.read(2)  # the two meet the segment at different offsets
        before.commit(end, force=True)
        spool.close()
        again = DiskSpool(tmp_path)
        first, second = again.reader("a"), again.reader("b")
        failing_reads(monkeypatch, sorted(tmp_path.glob("*.seg"))[0])
        segment = min(again._sizes)
        first.read(1000, stop=Position(segment, 300))  # held short, as a broker's trigger reads a recorded batch
        second.read(1000)
        assert again.stats.corrupt == 1

    def test_counting_a_stretch_checksums_a_bounded_amount(self, monkeypatch: pytest.MonkeyPatch) -> None:
        """A damaged record whose data is full of frames (lengths pointing far into the stretch)
        had each one checksummed to the stretch's end: minutes on the delivery loop."""
        fake = spool_module._HEADER.pack(spool_module._MAGIC, 0, 0, 1000, 200_000) + b"{"
        stretch = b"\0" + encode_record(CloudEvent({"id": "x", "source": "s", "type": "t", "specversion": "1.0"},
                                                   fake * 20_000))[1:] + encode_record(event(1))
        summed = [0]
        crc32 = zlib.crc32

        def counted(data: Any, *args: Any) -> int:
            summed[0] += len(data)
            return crc32(data, *args)

        monkeypatch.setattr(spool_module.zlib, "crc32", counted)
        assert spool_module._records_lost(stretch) >= 1
        assert summed[0] <= 4 * len(stretch)

    def test_drop_oldest_keeps_a_segment_it_cannot_count_for_now(self, tmp_path: Path,
                                                                 monkeypatch: pytest.MonkeyPatch) -> None:
        """Out of descriptors (it may pass): the segment is kept and the append fails (spool_error);
        dropped, a segment of thousands of events was counted as one."""
        spool = DiskSpool(tmp_path, segment_bytes=1000, max_bytes=4000, overflow="drop_oldest")
        spool.reader("down")
        for i in range(5):
            spool.append(event(i, 100))
        first = sorted(tmp_path.glob("*.seg"))[0]
        failing_reads(monkeypatch, first, errno.EMFILE)
        appended = [spool.append(event(i, 100)) for i in range(5, 25)]
        assert not all(appended) and first.exists()
        assert spool.stats.dropped["spool_error"] >= 1 and not spool.stats.dropped["spool_overflow"]

    def test_drop_oldest_drops_a_segment_it_cannot_read(self, tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                        caplog: pytest.LogCaptureFixture) -> None:
        """Counting its undelivered events read it: its EIO failed every append (spool_error), and the
        full spool never made room."""
        spool = DiskSpool(tmp_path, segment_bytes=1000, max_bytes=4000, overflow="drop_oldest")
        spool.reader("down")  # never reads: the dropped events are its loss
        for i in range(5):
            spool.append(event(i, 100))
        first = sorted(tmp_path.glob("*.seg"))[0]
        failing_reads(monkeypatch, first)
        assert all(spool.append(event(i, 100)) for i in range(5, 25))
        assert not first.exists() and not spool.stats.dropped["spool_error"]
        assert spool.stats.dropped["spool_overflow"] >= 1 and "Input/output error" in caplog.text

    def test_a_checkpoint_that_cannot_be_read_reads_from_the_oldest_segment(
            self, tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
        """A directory in its place (as EIO or EACCES would have it): the OSError escaped making the
        reader, and the delivery process died at every start, stopping every sink."""
        spool = DiskSpool(tmp_path)
        for i in range(5):
            spool.append(event(i))
        spool.close()
        spool.checkpoint_path("s").mkdir()
        again = DiskSpool(tmp_path)
        reader = again.reader("s")
        # drain() commits and flushes: saving fails too (a directory in the way), logged, and reading goes on.
        assert drain(reader) == [str(i) for i in range(5)]
        again.append(event(5))
        assert drain(reader) == ["5"]
        assert "unreadable checkpoint" in caplog.text and "not saved" in caplog.text
        again.close()

    @pytest.mark.parametrize("durability", ["disk", "memory"])
    def test_a_read_is_held_to_max_bytes_and_takes_at_least_one_event(self, tmp_path: Path,
                                                                       durability: str) -> None:
        """Capped by count only, a sink's batch of 500 events of 800 KiB took the delivery process
        past 450 MiB."""
        spool = DiskSpool(tmp_path, segment_bytes=3000) if durability == "disk" else MemorySpool()
        reader = spool.reader("s")
        for i in range(10):
            spool.append(event(i, 1000))
        spool.append(event(10, 5000))  # bigger than the budget: alone
        spool.append(event(11))
        budget = 3 * len(encode_record(event(0, 1000)))
        batches, position = [], reader.position
        while True:
            events, position = reader.read(100, position, max_bytes=budget)
            if not events:
                break
            batches.append([e.id for e in events])
        assert batches == [["0", "1", "2"], ["3", "4", "5"], ["6", "7", "8"], ["9"], ["10"], ["11"]]

    def test_a_skipped_stretch_counts_the_events_in_it(self, tmp_path: Path) -> None:
        """The counter went up by one per stretch skipped: the rest of a segment after a broken
        frame (up to 16 MiB of events) counted as one event."""
        spool = DiskSpool(tmp_path)
        for i in range(10):
            spool.append(event(i, 50))
        spool.close()
        seg = sorted(tmp_path.glob("*.seg"))[0]
        raw = bytearray(seg.read_bytes())
        raw[2 * len(encode_record(event(0, 50)))] ^= 0xFF  # record 2's magic: the segment's rest goes
        seg.write_bytes(bytes(raw))
        again = DiskSpool(tmp_path)
        assert drain(again.reader("s")) == ["0", "1"]
        assert again.stats.corrupt == 8

    def test_a_record_with_a_flag_its_data_contradicts_is_skipped_and_counted(self, tmp_path: Path) -> None:
        spool = DiskSpool(tmp_path)
        for i in range(3):
            spool.append(event(i))
        spool.close()
        seg = sorted(tmp_path.glob("*.seg"))[0]
        raw = bytearray(seg.read_bytes())
        raw[len(encode_record(event(0))) + 2] ^= 1  # record 1's flags: "data is None"
        seg.write_bytes(bytes(raw))
        again = DiskSpool(tmp_path)
        assert drain(again.reader("s")) == ["0", "2"] and again.stats.corrupt == 1

    async def test_wait_wakes_on_append(self, tmp_path: Path) -> None:
        spool = DiskSpool(tmp_path)
        reader = spool.reader("s")
        waiter = asyncio.create_task(reader.wait(5))
        await asyncio.sleep(0)
        spool.append(event(1))
        await asyncio.wait_for(waiter, 1)

    async def test_fsync_interval_syncs_batches_not_appends(self, tmp_path: Path,
                                                           monkeypatch: pytest.MonkeyPatch) -> None:
        synced: list[int] = []
        real = os.fsync
        monkeypatch.setattr(os, "fsync", lambda fd: (synced.append(fd), real(fd))[1])
        spool = DiskSpool(tmp_path, fsync_interval=0.05, segment_bytes=4096)
        spool.start_fsync()
        for i in range(20):
            spool.append(event(i))
        await asyncio.sleep(0.2)
        batched = len(synced)
        assert 1 <= batched <= 2  # the appends so far, at once: not one per event
        await asyncio.sleep(0.2)
        assert len(synced) == batched  # nothing new: no fsync
        for i in range(20, 200):  # ~8 segments: each one is synced as it is rolled over
            spool.append(event(i, size=200))
        assert len(synced) - batched >= 7
        spool.close()
        assert drain(DiskSpool(tmp_path).reader("r")) == [str(i) for i in range(200)]

    def test_no_fsync_by_default(self, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
        synced: list[int] = []
        monkeypatch.setattr(os, "fsync", synced.append)
        spool = DiskSpool(tmp_path, segment_bytes=4096)
        for i in range(200):
            spool.append(event(i, size=200))
        assert synced == []
        spool.close()  # a clean stop syncs what is written
        assert len(synced) == 1

    @pytest.mark.parametrize("content", [
        b"{not json", b'{"segment": 1}', b'{"segment": "x", "offset": 0}',
        # A seek to -1 failed every read: the worker restarted from there for ever.
        b'{"segment": 1, "offset": -1}', b'{"segment": -1, "offset": 0}',
    ])
    def test_an_unreadable_checkpoint_reads_from_the_oldest_segment(self, tmp_path: Path, content: bytes,
                                                                    caplog: pytest.LogCaptureFixture) -> None:
        spool = DiskSpool(tmp_path)
        for i in range(5):
            spool.append(event(i))
        reader = spool.reader("s")
        reader.commit(reader.read(3)[1], force=True)
        spool.close()
        spool.checkpoint_path("s").write_bytes(content)
        again = DiskSpool(tmp_path)
        # At least once: what it cannot tell was delivered comes again, never skipped.
        assert drain(again.reader("s")) == [str(i) for i in range(5)]
        assert "unreadable checkpoint" in caplog.text

    def test_stray_files_named_like_segments_are_ignored_and_logged_once(
        self, tmp_path: Path, caplog: pytest.LogCaptureFixture
    ) -> None:
        (tmp_path / "spool").mkdir()
        strays = ["\u00b2.seg", "x.seg", "7.seg", "\u0661.seg"]  # superscript two, a letter, unpadded, Arabic-Indic one
        for name in strays:
            (tmp_path / "spool" / name).write_bytes(b"not a segment")
        spool = DiskSpool(tmp_path / "spool")
        follower = SpoolFollower(tmp_path / "spool")
        reader = follower.reader("r")
        for i in range(3):
            spool.append(event(i))
        follower.refresh()
        follower.refresh()
        assert drain(reader) == ["0", "1", "2"]
        for name in strays:  # each logged once per spool and follower, not on every look
            assert sum(name in r.getMessage() for r in caplog.records) == 2
            assert (tmp_path / "spool" / name).exists()  # someone else's file: left alone
        follower.close()
        spool.close()

    def test_a_segment_that_cannot_be_deleted_on_overflow_costs_the_event_never_the_request(
        self, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
    ) -> None:
        # Inline delivery: the append that finds the spool full deletes the oldest segment.
        spool = DiskSpool(tmp_path, segment_bytes=1000, max_bytes=3000, overflow="drop_oldest")
        reader = spool.reader("s")
        taken = [i for i in range(40) if spool.append(event(i, 50))]
        assert taken == list(range(40))
        unlink = os.unlink

        def refused(path: object, *args: object, **kwargs: object) -> None:
            if str(path).endswith(".seg"):
                raise PermissionError(13, "Permission denied", str(path))
            unlink(path, *args, **kwargs)

        monkeypatch.setattr(os, "unlink", refused)
        refusals = [i for i in range(40, 50) if not spool.append(event(i, 50))]
        assert refusals and spool.stats.dropped["spool_error"] == len(refusals)
        assert sum("Permission denied" in r.getMessage() for r in caplog.records) == 1  # once per stretch
        monkeypatch.setattr(os, "unlink", unlink)
        assert spool.append(event(50, 50))
        ids = drain(reader)
        assert ids[-1] == "50" and not set(ids) & set(map(str, refusals))
        spool.close()

    def test_a_finished_segment_that_cannot_be_deleted_stays_and_goes_later(
        self, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
    ) -> None:
        # A sink worker's commit deletes what every reader finished: a failure must not reach it.
        spool = DiskSpool(tmp_path, segment_bytes=1000, max_bytes=100_000)
        reader = spool.reader("s")
        for i in range(40):
            spool.append(event(i, 50))
        monkeypatch.setattr(os, "unlink", lambda *a, **k: (_ for _ in ()).throw(OSError(5, "Input/output error")))
        events, end = reader.read(100)
        reader.commit(end, force=True)
        assert len(events) == 40 and len(spool._segments()) > 1
        assert spool.size_bytes() == sum(p.stat().st_size for p in tmp_path.glob("*.seg"))  # still counted
        monkeypatch.undo()
        spool.append(event(40, 50))
        events, end = reader.read(100)
        reader.commit(end, force=True)
        assert [e.id for e in events] == ["40"] and len(spool._segments()) == 1
        spool.close()

    def test_a_checkpoint_that_cannot_be_saved_frees_the_segments_delivered_all_the_same(
        self, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
    ) -> None:
        """A full disk refuses the checkpoint's save (a new file): were segments deleted only past
        saved checkpoints, none would free the room a save needs, and the spool stayed full for
        good, across restarts."""
        spool = DiskSpool(tmp_path, segment_bytes=1000, max_bytes=100_000)
        reader = spool.reader("s")
        for i in range(40):
            spool.append(event(i, 50))
        segments = spool._segments()

        def full(*args: object, **kwargs: object) -> None:
            raise OSError(errno.ENOSPC, "No space left on device")

        monkeypatch.setattr(os, "replace", full)
        events, end = reader.read(25)
        reader.commit(end, force=True)
        assert [e.id for e in events] == [str(i) for i in range(25)]
        assert spool._segments()[0] > segments[0]  # those delivered went
        assert spool.size_bytes() == sum(p.stat().st_size for p in tmp_path.glob("*.seg"))
        spool.close()  # its last save fails too
        monkeypatch.undo()
        # The checkpoint names a segment deleted since: the next run resumes at the oldest one
        # left, which holds nothing past the delivered position; every event not delivered comes.
        ids = drain(DiskSpool(tmp_path).reader("s"))
        assert ids[-1] == "39" and 0 < int(ids[0]) <= 25 and ids == [str(i) for i in range(int(ids[0]), 40)]

    def test_a_reader_removed_while_saves_fail_keeps_its_backlog(
        self, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
    ) -> None:
        """A broker stopping on a full disk: a lagging trigger's last save failed and collected
        by the triggers still attached (it was taken out of them first), deleting its backlog."""
        spool = DiskSpool(tmp_path, segment_bytes=1000, max_bytes=100_000)
        fast, slow = spool.reader("fast"), spool.reader("slow")
        for i in range(40):
            spool.append(event(i, 50))
        assert drain(fast) == [str(i) for i in range(40)]
        events, end = slow.read(5)
        slow.commit(end, force=True)

        def full(*args: object, **kwargs: object) -> None:
            raise OSError(errno.ENOSPC, "No space left on device")

        monkeypatch.setattr(os, "replace", full)
        events, end = slow.read(5)
        slow.commit(end)  # not saved: the save interval, or the disk
        spool.remove_reader("slow")  # its flush fails too
        spool.remove_reader("fast")
        spool.close()
        monkeypatch.undo()
        assert drain(DiskSpool(tmp_path).reader("slow")) == [str(i) for i in range(5, 40)]

    def test_a_delivered_segment_that_filled_the_disk_is_closed_and_deleted(
        self, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
    ) -> None:
        """The disk filled up well short of segment_bytes: the segment being written, though every
        sink is past it, never rolled and was never deleted, and every append failed for good."""
        spool = DiskSpool(tmp_path)
        reader = spool.reader("s")
        for i in range(10):
            assert spool.append(event(i))
        assert drain(reader) == [str(i) for i in range(10)]  # no commit comes after this
        first, write, full_for_good = spool._path(spool._current), os.write, False

        def full(fd: int, data: bytes) -> int:  # the disk has room once that segment is gone
            if first.exists() or full_for_good:
                raise OSError(errno.ENOSPC, "No space left on device")
            return write(fd, data)

        monkeypatch.setattr(os, "write", full)
        assert not spool.append(event(10))  # counted, and its segment closed and deleted
        assert spool.stats.dropped["spool_error"] == 1 and not first.exists()
        assert spool.append(event(11))
        full_for_good = True  # "11" is not delivered: this roll frees nothing
        assert not any(spool.append(event(i)) for i in range(12, 20))
        assert spool.stats.dropped["spool_error"] == 9 and len(spool._segments()) == 2  # an empty one stays
        assert sum("cannot append" in r.getMessage() for r in caplog.records) == 2  # once per stretch
        monkeypatch.undo()
        assert drain(reader) == ["11"]
        spool.close()

    def test_duplicate_reader_name_is_refused(self, tmp_path: Path) -> None:
        spool = DiskSpool(tmp_path)
        spool.reader("s")
        with pytest.raises(Exception, match="already exists"):
            spool.reader("s")


_FULL_DISK = """
import resource, sys
from infer_logger.cloudevents.event import CloudEvent
from infer_logger.spool import DiskSpool

spool = DiskSpool(sys.argv[1])
def event(i):
    return CloudEvent({"specversion": "1.0", "id": str(i), "source": "/s", "type": "t"}, b"x" * 100)
taken = [i for i in range(20) if spool.append(event(i))]
# Every file this process writes may now grow to 8000 bytes: the kernel refuses the rest (EFBIG),
# as a full disk would (ENOSPC). Python ignores SIGXFSZ, so writes fail instead of killing us.
resource.setrlimit(resource.RLIMIT_FSIZE, (8000, 8000))
taken += [i for i in range(20, 200) if spool.append(event(i))]
print(",".join(map(str, taken)), spool.stats.dropped["spool_error"])
"""


def test_a_full_disk_drops_and_counts_events_and_keeps_the_spool_readable(tmp_path: Path) -> None:
    import subprocess
    import sys

    out = subprocess.run([sys.executable, "-c", _FULL_DISK, str(tmp_path / "spool")], capture_output=True,
                         text=True, timeout=60, cwd=Path(__file__).parents[2])
    assert out.returncode == 0, out.stderr
    taken_text, dropped = out.stdout.split()
    taken = taken_text.split(",")
    assert 20 < len(taken) < 200 and int(dropped) == 200 - len(taken)  # each one counted
    # Logged as each stretch starts: a file size limit (unlike a full disk) lets the segment each
    # failure rolls to take events again, so each stretch costs one event here.
    assert "cannot append" in out.stderr and out.stderr.count("cannot append") == int(dropped)
    # Whatever was taken reads back whole, in order: no partial record was left behind.
    assert drain(DiskSpool(tmp_path / "spool").reader("r")) == taken


_FILE_SIZE_LIMIT = """
import resource, sys
from infer_logger.cloudevents.event import CloudEvent
from infer_logger.spool import DiskSpool

spool = DiskSpool(sys.argv[1])  # 16 MiB segments: far past the limit below
reader = spool.reader("s")
def event(i):
    return CloudEvent({"specversion": "1.0", "id": str(i), "source": "/s", "type": "t"}, b"x" * 100)
resource.setrlimit(resource.RLIMIT_FSIZE, (8000, 8000))  # EFBIG past it (SIGXFSZ is ignored)
taken, got = [], []
for i in range(300):
    taken += [i] * spool.append(event(i))
    events, end = reader.read(100)  # a sink keeping up
    got += [int(e.id) for e in events]
    reader.commit(end, force=True)
print(len(taken), spool.stats.dropped["spool_error"], int(got == taken), len(spool._segments()))
"""


def test_a_file_size_limit_below_segment_bytes_costs_an_event_per_segment_not_all(tmp_path: Path) -> None:
    """A segment reaching RLIMIT_FSIZE failed every append after it for good, all of it delivered."""
    import subprocess
    import sys

    out = subprocess.run([sys.executable, "-c", _FILE_SIZE_LIMIT, str(tmp_path / "spool")], capture_output=True,
                         text=True, timeout=60, cwd=Path(__file__).parents[2])
    assert out.returncode == 0, out.stderr
    taken, dropped, delivered, segments = map(int, out.stdout.split())
    # The append that meets the limit is lost (counted); its segment rolls and goes once delivered.
    assert taken > 250 and dropped == 300 - taken and delivered and segments <= 2


def _open_fds() -> int:
    return len(os.listdir("/proc/self/fd"))


def test_an_append_to_a_closed_spool_is_refused_and_counted(tmp_path: Path) -> None:
    """A request finishing after the logger stopped: the failed write rolled to a new segment
    file, in a directory whose lock was let go, and leaked its fd, on every append."""
    spool = DiskSpool(tmp_path)
    assert spool.append(event(0))
    spool.close()
    files, fds = sorted(os.listdir(tmp_path)), _open_fds()
    assert not any(spool.append(event(i)) for i in range(20))
    assert spool.stats.dropped["spool_error"] == 20
    assert sorted(os.listdir(tmp_path)) == files and _open_fds() == fds


def test_a_roll_whose_close_fails_goes_on_in_the_new_segment(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Linux lets a descriptor go even when close() fails (EIO): closing it again at the next roll
    closed whatever had taken its number since, and the spool wrote into that file (a client's
    socket in the sidecar)."""
    spool = DiskSpool(tmp_path / "spool")
    spool.append(event(0))
    old, close = spool._fd, os.close

    def failing_close(fd: int) -> None:
        close(fd)
        if fd == old:
            raise OSError(errno.EIO, "I/O error")

    monkeypatch.setattr(os, "close", failing_close)
    spool._roll()
    monkeypatch.undo()
    other = os.open(tmp_path / "unrelated", os.O_RDWR | os.O_CREAT)  # most likely the number let go
    try:
        for i in range(1, 4):
            assert spool.append(event(i))
        spool._roll()
        spool.append(event(4))
        assert os.fstat(other).st_size == 0
    finally:
        os.close(other)
    events, _ = spool.reader("r").read(10)
    assert [e.id for e in events] == [str(i) for i in range(5)]
    spool.close()


class TestMemorySpool:
    """The in-memory log keeps the same contract, without durability."""

    def test_an_append_after_close_is_refused_and_counted(self) -> None:
        """As the disk spool's: it was taken and counted appended, and no one would deliver it."""
        spool = MemorySpool()
        assert spool.append(event(0))
        spool.close()
        assert not spool.append(event(1))
        assert spool.stats.dropped["spool_error"] == 1 and spool.stats.appended == 1

    def test_readers_and_collection(self) -> None:
        spool = MemorySpool(max_events=1000)
        a, b = spool.reader("a"), spool.reader("b")
        for i in range(10):
            spool.append(event(i))
        assert drain(a, 3) == [str(i) for i in range(10)]
        assert len(spool._log) == 10  # b has not read yet
        assert drain(b) == [str(i) for i in range(10)]
        assert len(spool._log) == 0

    def test_bounded(self) -> None:
        spool = MemorySpool(max_events=5)
        spool.reader("a")
        assert sum(spool.append(event(i)) for i in range(8)) == 5
        assert spool.stats.dropped["spool_full"] == 3

    def test_drop_oldest(self) -> None:
        spool = MemorySpool(max_events=5, overflow="drop_oldest")
        reader = spool.reader("a")
        for i in range(8):
            spool.append(event(i))
        assert drain(reader) == ["3", "4", "5", "6", "7"]
        assert reader.position == Position(0, 8)

    def test_max_bytes_refuses_newest_and_counts(self) -> None:
        spool = MemorySpool(max_bytes=10_000)
        reader = spool.reader("a")
        taken = sum(spool.append(event(i, 1000)) for i in range(30))
        assert 5 <= taken < 10 and spool.size_bytes() <= 10_000
        assert spool.stats.dropped["spool_full"] == 30 - taken
        assert drain(reader) == [str(i) for i in range(taken)]
        assert spool.size_bytes() == 0 and spool.append(event(30, 1000))  # room again once taken

    def test_max_bytes_drops_oldest_and_counts(self) -> None:
        spool = MemorySpool(max_bytes=10_000, overflow="drop_oldest")
        reader = spool.reader("a")
        assert all(spool.append(event(i, 1000)) for i in range(30))
        assert spool.size_bytes() <= 10_000
        ids = drain(reader)
        assert ids == [str(i) for i in range(30 - len(ids), 30)]
        assert spool.stats.dropped["spool_overflow"] == 30 - len(ids)

    @pytest.mark.parametrize("overflow", ["drop_newest", "drop_oldest"])
    def test_an_event_over_max_bytes_is_refused_and_keeps_the_others(self, overflow: str) -> None:
        spool = MemorySpool(max_bytes=10_000, overflow=overflow)
        reader = spool.reader("a")
        spool.append(event(0, 1000))
        assert not spool.append(event(1, 20_000))
        assert spool.stats.dropped["spool_full"] == 1
        assert drain(reader) == ["0"]

    def test_the_attributes_count_towards_max_bytes(self) -> None:
        spool = MemorySpool(max_bytes=10_000)
        spool.reader("a")
        big = CloudEvent({"id": "1", "type": "t", "source": "s", "specversion": "1.0", "metadata": "m" * 4000}, b"")
        assert sum(spool.append(big) for _ in range(5)) == 2


def test_a_second_process_cannot_open_the_same_spool(tmp_path: Path) -> None:
    import subprocess
    import sys

    spool = DiskSpool(tmp_path)
    code = "from infer_logger.spool import DiskSpool; import sys; DiskSpool(sys.argv[1])"
    done = subprocess.run([sys.executable, "-c", code, str(tmp_path)], capture_output=True, text=True)
    assert done.returncode != 0 and "in use by another process" in done.stderr
    spool.close()
    done = subprocess.run([sys.executable, "-c", code, str(tmp_path)], capture_output=True, text=True)
    assert done.returncode == 0


class TestSpoolFollower:
    """The delivery process's view of a spool another process writes."""

    def test_a_sidecar_opening_the_spool_while_its_old_delivery_child_deletes(
            self, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
        """After a kill -9 the orphaned delivery child keeps delivering, deleting finished
        segments: one deleted between the new writer's listing and its stat stopped the sidecar
        at start with a FileNotFoundError traceback."""
        from infer_logger.spool import _Segments

        writer = DiskSpool(tmp_path, segment_bytes=1000)
        for i in range(30):
            writer.append(event(i, 100))
        writer.close()  # the killed sidecar
        child = SpoolFollower(tmp_path).reader("store")
        events, end = child.read(1000)
        listed = _Segments._segments

        def listed_then_deleted(self: _Segments) -> list[int]:
            numbers = listed(self)
            if isinstance(self, DiskSpool):
                child.commit(end, force=True)  # the child's checkpoint lands here: it deletes
            return numbers

        monkeypatch.setattr(_Segments, "_segments", listed_then_deleted)
        again = DiskSpool(tmp_path, segment_bytes=1000)
        again.append(event(30))
        assert len(events) == 30 and drain(again.reader("store")) == ["30"]

    def test_overflow_counts_what_a_sink_failing_from_its_start_never_took(self, tmp_path: Path) -> None:
        """A sink that never delivered had no checkpoint file: the writer's count went by the
        healthy sink's, and a dropped segment's events it never got were counted as none."""
        writer = DiskSpool(tmp_path, segment_bytes=1000, max_bytes=4000, overflow="drop_oldest")
        follower = SpoolFollower(tmp_path)
        healthy, failing = follower.reader("healthy"), follower.reader("failing")
        for i in range(20):
            writer.append(event(i, 100))
        follower.refresh()
        drain(healthy)
        for i in range(20, 25):  # full: segment 1 dropped, none of it taken by `failing`
            writer.append(event(i, 100))
        assert writer.stats.dropped["spool_overflow"] == 5 and failing.position.segment == 1

    def test_overflow_counts_the_records_after_a_bad_checksum(self, tmp_path: Path) -> None:
        """Readers go on past a record that fails its checksum: so does the count of a dropped segment,
        which goes by the frames (their checksums are not checked on the request path)."""
        writer = DiskSpool(tmp_path, segment_bytes=1000, max_bytes=4000, overflow="drop_oldest")
        writer.reader("down")  # never reads: every dropped event is its loss
        for i in range(5):
            writer.append(event(i, 100))
        seg = sorted(tmp_path.glob("*.seg"))[0]
        raw = bytearray(seg.read_bytes())
        raw[len(encode_record(event(0, 100))) - 10] ^= 0xFF  # inside record 0's data
        seg.write_bytes(bytes(raw))
        for i in range(5, 25):
            writer.append(event(i, 100))
        # The damaged one too: dropped unread, no reader counts it as corrupt.
        assert writer.stats.dropped["spool_overflow"] == 5

    def test_overflow_counts_what_a_stopped_reader_had_not_taken(self, tmp_path: Path) -> None:
        """A reader removed without being forgotten (the broker's shutdown) keeps its place: what
        an overflow drops of it is counted too."""
        writer = DiskSpool(tmp_path, segment_bytes=1000, max_bytes=4000, overflow="drop_oldest")
        writer.reader("stopped")
        writer.remove_reader("stopped")
        ahead = writer.reader("ahead")
        for i in range(25):
            writer.append(event(i, 100))
            drain(ahead)
        assert writer.stats.dropped["spool_overflow"] == 5

    def test_a_segment_the_writer_dropped_on_overflow_is_no_corruption(
            self, tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
        """The follower, still listing it until its next poll, read it as a truncated record:
        an error and a corrupt-segment count for every drop; and the writer, with the readers in
        the other process, counted as lost the events a sink had already taken."""
        writer = DiskSpool(tmp_path, segment_bytes=1000, max_bytes=4000, overflow="drop_oldest")
        follower = SpoolFollower(tmp_path)
        reader = follower.reader("store")
        for i in range(20):  # 5 records a segment: segments 1-4
            writer.append(event(i, 100))
        follower.refresh()
        taken, end = reader.read(4)  # the sink took 4 of segment 1's 5
        reader.commit(end, force=True)
        for i in range(20, 30):  # full: the oldest segments dropped
            writer.append(event(i, 100))
        rest = drain(reader)
        follower.refresh()
        rest += drain(reader)
        assert follower.stats.corrupt == 0 and "truncated record" not in caplog.text
        # Segment 1's fifth event and segment 2's five were not taken: 6 counted lost, not 10
        # (the fifth still came, from the file the reader had open).
        assert writer.stats.dropped["spool_overflow"] == 6
        missing = {str(i) for i in range(30)} - {e.id for e in taken} - set(rest)
        assert missing == {str(i) for i in range(5, 10)}

    def test_reads_what_the_writer_appends_across_segments(self, tmp_path: Path) -> None:
        writer = DiskSpool(tmp_path, segment_bytes=500)
        follower = SpoolFollower(tmp_path)
        reader = follower.reader("s")
        for i in range(10):
            writer.append(event(i))
        assert drain(reader) == []  # nothing until it looks again
        follower.refresh()
        assert drain(reader) == [str(i) for i in range(10)]
        for i in range(10, 20):
            writer.append(event(i))
        follower.refresh()
        assert drain(reader) == [str(i) for i in range(10, 20)]
        writer.close()
        follower.close()

    def test_deletes_finished_segments_but_never_the_newest(self, tmp_path: Path) -> None:
        writer = DiskSpool(tmp_path, segment_bytes=300)
        follower = SpoolFollower(tmp_path)
        reader = follower.reader("s")
        for i in range(30):
            writer.append(event(i))
        segments = sorted(tmp_path.glob("*.seg"))
        assert len(segments) > 3
        follower.refresh()
        assert len(drain(reader)) == 30
        assert sorted(tmp_path.glob("*.seg")) == segments[-1:]  # only the one being written is left
        # The writer learns of it: its size cap counts only what is there.
        writer.refresh()
        assert writer.size_bytes() == segments[-1].stat().st_size
        writer.append(event(30))
        follower.refresh()
        assert drain(reader) == ["30"]
        writer.close()
        follower.close()

    def test_a_writers_full_spool_frees_up_when_the_follower_deletes(self, tmp_path: Path) -> None:
        record = len(encode_record(event(0)))
        writer = DiskSpool(tmp_path, segment_bytes=record * 2, max_bytes=record * 6)
        follower = SpoolFollower(tmp_path)
        reader = follower.reader("s")
        assert all(writer.append(event(i)) for i in range(6))
        assert not writer.append(event(6))  # full
        follower.refresh()
        assert len(drain(reader)) == 6
        writer._refreshed = 0.0  # its next look at the directory is due
        assert writer.append(event(7))
        assert writer.stats.dropped["spool_full"] == 1
        writer.close()
        follower.close()

    def test_resumes_from_the_checkpoint(self, tmp_path: Path) -> None:
        writer = DiskSpool(tmp_path)
        for i in range(5):
            writer.append(event(i))
        follower = SpoolFollower(tmp_path)
        reader = follower.reader("s")
        events, end = reader.read(3)
        reader.commit(end, force=True)
        follower.close()
        follower = SpoolFollower(tmp_path)
        assert drain(follower.reader("s")) == ["3", "4"]
        writer.close()
        follower.close()

    def test_a_torn_tail_of_a_finished_segment_is_skipped(self, tmp_path: Path) -> None:
        writer = DiskSpool(tmp_path)
        writer.append(event(1))
        writer.close()
        first = sorted(tmp_path.glob("*.seg"))[0]
        with first.open("ab") as fh:
            fh.write(encode_record(event(2))[:-4])  # a crash mid-append
        writer = DiskSpool(tmp_path)  # a restarted writer starts a new segment
        writer.append(event(3))
        follower = SpoolFollower(tmp_path)
        assert drain(follower.reader("s")) == ["1", "3"]
        assert follower.stats.corrupt == 1
        writer.close()
        follower.close()

    def test_a_lock_file_it_cannot_open_is_a_spool_error(self, tmp_path: Path) -> None:
        """Another user's lock file (a pod's new runAsUser), or here a directory: a traceback."""
        (tmp_path / "checkpoints").mkdir()
        for name in ("lock", "follower.lock"):
            (tmp_path / name).mkdir()
        with pytest.raises(SpoolError, match="cannot use lock"):
            DiskSpool(tmp_path)
        with pytest.raises(SpoolError, match="cannot use follower.lock"):
            SpoolFollower(tmp_path)

    def test_one_follower_per_spool(self, tmp_path: Path) -> None:
        follower = SpoolFollower(tmp_path)
        with pytest.raises(SpoolError, match="another delivery process"):
            SpoolFollower(tmp_path)
        follower.close()
        SpoolFollower(tmp_path).close()

    async def test_polling_wakes_a_waiting_reader(self, tmp_path: Path) -> None:
        writer = DiskSpool(tmp_path)
        follower = SpoolFollower(tmp_path, poll_interval=0.01)
        reader = follower.reader("s")
        follower.start_polling()
        reader.read(10)
        waiting = asyncio.ensure_future(reader.wait(5.0))
        await asyncio.sleep(0.05)
        assert not waiting.done()
        writer.append(event(1))
        await asyncio.wait_for(waiting, 1.0)
        assert [e.id for e in reader.read(10)[0]] == ["1"]
        writer.close()
        follower.close()

    async def test_a_failed_look_at_the_directory_is_retried_and_delivery_goes_on(
            self, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture) -> None:
        from infer_logger.dispatch import Dispatcher
        from infer_logger.metrics import Metrics
        from infer_logger.sinks.memory import MemorySink

        writer = DiskSpool(tmp_path)
        follower = SpoolFollower(tmp_path)
        sink = MemorySink()
        dispatcher = Dispatcher(follower, {"s": sink}, Metrics(follower), linger=0)
        follower.start_polling()
        dispatcher.start()
        for i in range(10):
            writer.append(event(i))
        await until(lambda: len(sink.events) == 10)
        listdir = os.listdir
        failed: list[bool] = []

        def out_of_fds(path: object = ".") -> list[str]:
            if not failed:  # once, as when the process briefly ran out of file descriptors
                failed.append(True)
                raise OSError(errno.EMFILE, "Too many open files")
            return listdir(path)

        monkeypatch.setattr(os, "listdir", out_of_fds)
        os.utime(tmp_path)  # the directory changed: the next poll lists it
        await until(lambda: bool(failed))
        for i in range(10, 20):
            writer.append(event(i))
        await until(lambda: len(sink.events) == 20)
        assert [e.id for e in sink.events] == [str(i) for i in range(20)]
        follower.check_polling()  # still polling
        messages = [r.getMessage() for r in caplog.records if r.name == "infer_logger.spool"]
        assert sum("Too many open files" in m for m in messages) == 1
        assert any("looking for new events again" in m for m in messages)
        await dispatcher.stop(1.0)
        follower.close()
        writer.close()

    async def test_a_poll_task_ended_by_a_bug_is_reported(
            self, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
        follower = SpoolFollower(tmp_path)
        follower.check_polling()  # not started: nothing to report
        monkeypatch.setattr(follower, "refresh", lambda: 1 / 0)
        follower.start_polling()
        os.utime(tmp_path)
        assert follower._poll_task is not None
        await until(follower._poll_task.done)
        with pytest.raises(SpoolError, match="polling stopped.*ZeroDivisionError"):
            follower.check_polling()
        follower.close()

    async def test_an_idle_follower_polls_less_and_still_wakes_its_reader(
            self, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
        writer = DiskSpool(tmp_path)
        follower = SpoolFollower(tmp_path, poll_interval=0.01, idle_poll_interval=0.2)
        reader = follower.reader("s")
        polls = 0
        real_stat = os.stat

        def counting_stat(path: object, *args: object, **kwargs: object) -> os.stat_result:
            nonlocal polls
            if str(path) == str(follower.dir):
                polls += 1  # one look at the directory per poll
            return real_stat(path, *args, **kwargs)  # type: ignore[arg-type]

        monkeypatch.setattr(os, "stat", counting_stat)
        slept: list[float] = []  # the poller's intervals: the cap on them, not a clock, bounds a wake's delay

        async def recorded_sleep(delay: float, *args: object) -> None:
            slept.append(delay)
            await asyncio.sleep(delay, *args)

        monkeypatch.setattr(spool_module, "asyncio", SimpleNamespace(**{**vars(asyncio), "sleep": recorded_sleep}))
        try:
            follower.start_polling()
            await asyncio.sleep(1.0)
            assert polls <= 12  # backed off towards 0.2 s, not 100 polls
            waiting = asyncio.ensure_future(reader.wait(600))
            writer.append(event(1))
            try:  # a hang guard: with a 600 s wait, only a poll's wake returns in time
                await asyncio.wait_for(waiting, 60)
            except TimeoutError:
                pytest.fail("the reader was not woken: the poll did not see the append")
            assert slept and max(slept) <= 0.2  # never backed off past idle_poll_interval
        finally:
            writer.close()
            follower.close()

    def test_follows_a_writer_in_another_process(self, tmp_path: Path) -> None:
        import subprocess
        import sys

        code = (
            "import sys; from infer_logger.spool import DiskSpool; from infer_logger.cloudevents.event import CloudEvent\n"
            "s = DiskSpool(sys.argv[1], segment_bytes=2000)\n"
            "for i in range(200): s.append(CloudEvent({'id': str(i), 'type': 't'}, b'x' * 20))\n"
            "s.close()"
        )
        follower = SpoolFollower(tmp_path)
        reader = follower.reader("s")
        subprocess.run([sys.executable, "-c", code, str(tmp_path)], check=True)
        follower.refresh()
        assert drain(reader) == [str(i) for i in range(200)]
        assert len(list(tmp_path.glob("*.seg"))) == 1
        follower.close()


class TestRecordsOverHalfTheCap:
    """A 2 MiB cap with the default 1 MiB max_payload_bytes: each event fits alone. The segment
    being written is never deleted; it held the last event, delivered or not, so every later
    event was refused for good."""

    def test_every_event_a_sink_keeps_up_with_is_taken(self, tmp_path: Path) -> None:
        spool = DiskSpool(tmp_path, max_bytes=2 << 20)
        reader = spool.reader("s")
        reader.checkpoint_interval = float("inf")  # taken, but no checkpoint saved by the commit
        for i in range(6):
            assert spool.append(event(i, 1 << 20)), i
            events, end = reader.read(100)
            reader.commit(end)
            assert [e.id for e in events] == [str(i)]
        assert not spool.stats.dropped
        spool.close()

    def test_the_delivery_process_frees_what_it_took(self, tmp_path: Path) -> None:
        writer = DiskSpool(tmp_path, max_bytes=2 << 20)
        follower = SpoolFollower(tmp_path)
        reader = follower.reader("s")
        reader.checkpoint_interval = float("inf")
        for i in range(6):
            writer._refreshed = 0.0  # its next look at the directory is due
            assert writer.append(event(i, 1 << 20)), i
            follower.refresh()  # what its poll does when the directory changed
            events, end = reader.read(100)
            reader.commit(end)
            assert [e.id for e in events] == [str(i)]
            follower.refresh()
        assert not writer.stats.dropped
        writer.close()
        follower.close()

"""The spool: an append-only, segmented event log on disk, read by one cursor per sink.

The request path only appends: one `os.write` of a framed record to the current segment, which
lands in the page cache, so a `kill -9` of the sidecar loses nothing already written (only a crash
of the machine can, unless `fsync` is on). Sink workers read the segments behind it, each from its
own checkpoint, and segments every sink has passed are deleted.

Record frame (little-endian): magic u16, flags u16, crc32 u32, attrs_len u32, data_len u32, then
the attributes as JSON and the raw data bytes. The CRC covers both bodies; flags bit 0 marks "data
is None" (outside the CRC: a record with it set and data, or with another bit set, is corrupt). A
record that fails its CRC is skipped alone (its lengths say where the next starts); a broken frame
(a bad magic) or one cut short by a crash ends its segment for the reader: the rest of that segment
is skipped, as is a segment that cannot be read (EIO). All are logged and counted (the events lost:
the damaged one and the whole records found after it by magic and checksum), never a crash.

`MemorySpool` has the same interface and keeps events in a deque bounded by count and by bytes
(the same `max_bytes` and overflow policy): faster, but a restart or a crash loses whatever the
sinks had not taken yet.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import errno
import fcntl
import hashlib
import itertools
import logging
import math
import os
import struct
import time
import zlib
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, BinaryIO, Literal, Protocol

import orjson

from infer_logger.cloudevents.event import CloudEvent
from infer_logger.errors import CorruptRecordError, SpoolBusyError, SpoolError

log = logging.getLogger(__name__)

BATCH_BYTES = 8 << 20
"""The most a batch reads of a spool, by its records' bytes (an event bigger comes alone), for the
sink workers and the broker's triggers: by count only, 500 events of 800 KiB after an outage took
the delivery process to 455-781 MiB (each sink holds its encoding of a batch too). The http sink's
default `max_batch_bytes`."""

# Errors saying a segment is damaged (a bad sector, a directory in its place, a file system's
# check failing): it is skipped, counted. Any other may pass (out of descriptors or memory,
# permissions changed, an NFS handle gone stale): raised, the read tried again, nothing lost.
_DAMAGE = frozenset({errno.EIO, errno.EISDIR, errno.EBADMSG, errno.EUCLEAN})
# Errors a checkpoint's next read may not meet: raised (the delivery process starts again), not
# read from the oldest segment (everything delivered sent again).
_PASSING = frozenset({errno.EMFILE, errno.ENFILE, errno.ENOMEM, errno.ENOBUFS, errno.EAGAIN, errno.EINTR})

_HEADER = struct.Struct("<HHIII")
_MAGIC = 0xCE01
_NO_DATA = 1
_SUFFIX = ".seg"
_CHUNK = 1 << 20

Overflow = Literal["drop_newest", "drop_oldest"]


@dataclass(frozen=True, order=True, slots=True)
class Position:
    """Where a reader is: a segment number and a byte offset (or an index, in memory)."""

    segment: int = 0
    offset: int = 0


@dataclass(slots=True)
class SpoolStats:
    """Counters the metrics endpoint reads; the spool only ever adds to them."""

    appended: int = 0
    dropped: dict[str, int] = field(default_factory=lambda: collections.defaultdict(int))
    corrupt: int = 0  # events lost in corrupt stretches skipped (at least: see `_records_lost`)


class SpoolView(Protocol):
    """What sink workers and metrics need of a spool: its readers and its size."""

    stats: SpoolStats

    def reader(self, name: str, *, destination: str | None = None) -> SpoolReader: ...

    def remove_reader(self, name: str, *, forget: bool = False) -> None: ...

    def set_aside_unread(self, keep: Mapping[str, str | None]) -> None: ...

    def tail(self) -> Position: ...

    def size_bytes(self) -> int: ...

    def refresh(self) -> None: ...

    def close(self) -> None: ...


class Spool(SpoolView, Protocol):
    def append(self, event: CloudEvent) -> bool: ...

    def start_fsync(self) -> None: ...


class SpoolReader(Protocol):
    position: Position
    ahead: Any
    """What its consumer settled past `position` (JSON data of its own), kept with the checkpoint
    on disk: a consumer settling out of order (the broker's triggers) tells its next run what not
    to deliver again. None when there is none (or the spool keeps no checkpoints)."""

    def read(self, max_events: int, start: Position | None = None, stop: Position | None = None,
             *, max_bytes: int | None = None) -> tuple[list[CloudEvent], Position]: ...

    def holds(self, position: Position) -> bool:
        """Whether the log still holds what was written at `position`: a read from a place an
        overflow dropped goes on with the oldest events left, other events than were there."""

    async def wait(self, timeout: float) -> None: ...

    def wake(self) -> None: ...

    def commit(self, position: Position, *, force: bool = False, collect: bool = True) -> None: ...

    def flush(self) -> None: ...

    def lag(self, start: Position | None = None) -> int: ...


def encode_record(event: CloudEvent) -> bytes:
    attrs = orjson.dumps(event.attributes)
    data = event.data if event.data is not None else b""
    flags = _NO_DATA if event.data is None else 0
    crc = zlib.crc32(data, zlib.crc32(attrs))
    return _HEADER.pack(_MAGIC, flags, crc, len(attrs), len(data)) + attrs + data


def iter_records(buf: bytes | memoryview, start: int = 0) -> Iterator[tuple[CloudEvent, int]]:
    """Decode records from `start`, yielding each with the offset just past it.

    Stops quietly at a clean end or a partial trailing frame (the writer may be mid-append);
    raises CorruptRecordError when a complete frame is wrong (with `resume`, the offset past it,
    when only its checksum is: the frame's lengths hold, and the records after it are whole).
    """
    # The sink workers' per-event cost: attributes parse from a view (no copy), and one CRC
    # runs over attributes and data at once (crc32(data, crc32(attrs)) is the CRC of both).
    view = memoryview(buf)
    raw = buf if isinstance(buf, bytes) else None
    pos, end = start, len(view)
    unpack, size, loads, crc32 = _HEADER.unpack_from, _HEADER.size, orjson.loads, zlib.crc32
    while end - pos >= size:
        magic, flags, crc, alen, dlen = unpack(view, pos)
        if magic != _MAGIC or alen == 0:  # attributes are never empty: a header zeroed after its magic
            raise CorruptRecordError(f"bad record magic at offset {pos}" if magic != _MAGIC
                                     else f"a record without attributes at offset {pos}")
        body = pos + size
        mid = body + alen
        stop = mid + dlen
        if stop > end:
            return
        if crc32(view[body:stop]) != crc:
            raise CorruptRecordError(f"checksum mismatch at offset {pos}", resume=stop)
        # The flags are outside the CRC (the frame has no version to change that by): a flipped
        # "data is None" bit delivered the event without its data. What can be checked is.
        if flags & ~_NO_DATA or (flags & _NO_DATA and dlen):
            raise CorruptRecordError(f"a record with flags {flags:#x} and {dlen} bytes of data at offset {pos}",
                                     resume=stop)
        if flags & _NO_DATA:
            data = None
        else:
            data = raw[mid:stop] if raw is not None else bytes(view[mid:stop])
        try:
            attributes = loads(view[body:mid])
        except orjson.JSONDecodeError:  # its checksum held (a zeroed stretch's does): not a record
            attributes = None
        if type(attributes) is not dict:
            raise CorruptRecordError(f"a record whose attributes are no JSON object at offset {pos}", resume=stop)
        event = CloudEvent(attributes, data)
        pos = stop
        yield event, pos


def _records_lost(buf: bytes) -> int:
    """The events a skipped stretch held: the damaged record at its start, and the whole records
    found after it by their magic and checksum (the damaged frame's lengths cannot say where
    they start). A record damaged past recognition is not counted: at least, not exactly."""
    view, size, count, pos = memoryview(buf), _HEADER.size, 1, 1
    magic = _HEADER.pack(_MAGIC, 0, 0, 0, 0)[:2]
    # Checksums over a few times the stretch at most: a damaged record's data full of fake
    # frames had each checksum run to the stretch's end, minutes on the delivery loop.
    budget = 4 * len(buf)
    while (pos := buf.find(magic, pos)) >= 0 and pos + size <= len(buf):
        _, _, crc, alen, dlen = _HEADER.unpack_from(view, pos)
        stop = pos + size + alen + dlen
        if alen and stop <= len(buf) and buf[pos + size:pos + size + 1] == b"{":  # attributes are an object
            budget -= alen + dlen
            if budget < 0:
                break
            if zlib.crc32(view[pos + size:stop]) == crc:
                count, pos = count + 1, stop
                continue
        pos += 1
    return count


def _lock(path: Path, what: str) -> int:
    """An exclusive flock on `path`, held while the fd is open; SpoolError when another has it."""
    try:
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    except OSError as exc:  # another user's lock file (a pod's new runAsUser), a directory in the way
        raise SpoolError(f"spool directory {path.parent}: cannot use {path.name}: {exc.strerror or exc}") from None
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        os.close(fd)
        raise SpoolBusyError(f"spool {path.parent}: {what}") from None
    return fd


class _Segments:
    """What readers need of a spool directory: its segments, their sizes, the readers' checkpoints."""

    dir: Path
    stats: SpoolStats
    _current: int  # the segment being written
    _sizes: dict[int, int]
    before_save: Callable[[], object] | None = None
    """Called before a reader saves its checkpoint: the delivery process reports its counts
    there, so that a checkpoint never covers events no report counted."""

    def _open_dir(self, directory: str | os.PathLike[str], lock: str, busy: str) -> None:
        """Make the directory, take `lock` in it (SpoolError saying `busy` if held), no readers yet."""
        self.dir = Path(directory)
        try:
            self.dir.mkdir(parents=True, exist_ok=True)
            (self.dir / "checkpoints").mkdir(exist_ok=True)
        except OSError as exc:  # a file in the way, no permission, a read-only file system
            raise SpoolError(f"spool directory {self.dir}: cannot use it: {exc.strerror or exc}") from None
        self._lock = _lock(self.dir / lock, busy)
        self.stats = SpoolStats()
        self._readers: dict[str, DiskReader] = {}
        self._parked: dict[str, Position] = {}  # readers removed but not forgotten: their saved positions
        self._waiters: set[asyncio.Event] = set()
        self._strays: set[str] = set()  # files that look like segments and are not: logged once
        self._collect_failing = False  # finished segments cannot be deleted: logged once per stretch
        # (segment, offset) of the stretches skipped; (segment, -1 - end) of an unreadable one
        self._corrupt_seen: set[tuple[int, int]] = set()

    def refresh(self) -> None:
        """Bring the view of the segments up to date (another process may change them)."""

    def reader(self, name: str, *, destination: str | None = None) -> DiskReader:
        """`destination`: what the reader delivers to, saved (as a digest) with its checkpoint; a
        checkpoint saved for another destination is not taken, and one saved for this destination
        under another name is (a renamed sink's)."""
        if name in self._readers:
            raise SpoolError(f"a reader named {name!r} already exists")
        reader = DiskReader(self, name, destination=destination)
        self._readers[name] = reader
        self._parked.pop(name, None)
        return reader

    def remove_reader(self, name: str, *, forget: bool = False) -> None:
        """Stop reading for `name`; `forget` also deletes its checkpoint and stops keeping its
        segments. Without it they are kept (`_parked`): the other readers, still delivering as
        the broker closes, collected them past its saved checkpoint (its backlog, lost)."""
        reader = self._readers.pop(name, None)
        if reader is not None:
            if not forget:  # parked before its last save, which collects (also when it fails)
                self._parked[name] = reader._saved
            reader.flush()
            self._waiters.discard(reader._event)
            if not forget:
                self._parked[name] = reader._saved
        if forget:
            self._parked.pop(name, None)
            self.checkpoint_path(name).unlink(missing_ok=True)
        self.collect()

    def tail(self) -> Position:
        """The end of the log now: where a reader that wants only new events starts."""
        return Position(self._current, self._sizes.get(self._current, 0))

    def _next_segment(self, number: int) -> int | None:
        later = [n for n in self._sizes if n > number]
        return min(later) if later else None

    def collect(self) -> None:
        """Delete segments that every reader has finished (by its committed position, a parked
        one's by its saved checkpoint)."""
        if not self._readers:
            return
        # Not by the saved checkpoints: on a full disk no save succeeds until a segment goes, and
        # none would go. A restart from a checkpoint in a segment deleted past it resumes at the
        # next one left (`_load`): one at or before the committed position, so only re-sends.
        floor = min(self._past(position) for position in [*(r.position for r in self._readers.values()),
                                                           *self._parked.values()])
        try:
            for number in [n for n in self._sizes if n < floor and n != self._current]:
                self._delete(number)
        except OSError as exc:
            # Its callers are a sink worker's commit, an append, the follower's poll: none may
            # fail for it. The segment stays counted, and the next collect tries again.
            if not self._collect_failing:
                log.error("spool %s: cannot delete a finished segment (%s): retried", self.dir, exc)
                self._collect_failing = True
            return
        if self._collect_failing:
            log.warning("spool %s: finished segments are deleted again", self.dir)
            self._collect_failing = False

    def _past(self, position: Position) -> int:
        """The first segment a reader at `position` still needs: at the end of a segment no
        longer written, the next one (so the segment a roll just closed can go at once)."""
        if position.segment != self._current and position.offset >= self._sizes.get(position.segment, 0):
            return position.segment + 1
        return position.segment

    def _save_held_back(self) -> None:
        """Save the checkpoints the save interval held back: with nothing new to deliver no
        commit would, and a restart would re-send from older ones (a writer in another process
        counts what an overflow drops by them too)."""
        for reader in self._readers.values():
            if reader.position != reader._saved:
                reader.commit(reader.position, force=True)

    def _delete(self, number: int) -> None:
        self._path(number).unlink(missing_ok=True)  # first: one that stays stays counted
        self._sizes.pop(number, None)

    def size_bytes(self) -> int:
        return sum(self._sizes.values())

    def bytes_after(self, position: Position) -> int:
        """Bytes appended after `position`, as this process sees the segments."""
        return sum(size for n, size in self._sizes.items() if n > position.segment) + max(
            0, self._sizes.get(position.segment, 0) - position.offset
        )

    def _path(self, number: int) -> Path:
        return self.dir / f"{number:020d}{_SUFFIX}"

    def _segments(self) -> list[int]:
        """The numbers of the segment files in the directory, oldest first; any other `*.seg`
        (a stray `x.seg`, `².seg`, `7.seg`) is ignored, logged once."""
        numbers = []
        for name in os.listdir(self.dir):
            if not name.endswith(_SUFFIX):
                continue
            stem = name[: -len(_SUFFIX)]
            # Only the names _path() writes: str.isdigit() also takes "²", which int() refuses,
            # and "7.seg" is not the file _path(7) opens.
            if stem.isascii() and stem.isdigit() and self._path(int(stem)).name == name:
                numbers.append(int(stem))
            elif name not in self._strays:
                self._strays.add(name)
                log.warning("spool %s: ignoring %r, not a segment name", self.dir, name)
        return sorted(numbers)

    def checkpoint_path(self, name: str) -> Path:
        return self.dir / "checkpoints" / f"{name}.json"

    def set_aside_unread(self, keep: Mapping[str, str | None]) -> None:
        """Before the readers are made: set aside the checkpoints of names not in `keep` (sinks no
        longer configured), and of names in it saved for another destination than theirs now
        (`--log-url B --log-url A` after `--log-url A --log-url B`), as `.<digest>.json`, where a
        sink delivering there finds it (`_renamed`). Left, a writer with no readers of its own
        counted what an overflow drops from the lowest file, a removed sink's, and so events every
        sink had delivered. One saved with no destination (before they were kept) stays: nothing
        could find it set aside."""
        for path in (self.dir / "checkpoints").glob("*.json"):
            if path.name.startswith("."):
                continue
            try:
                _, destination, _ = _read_checkpoint(path)
            except (OSError, ValueError, KeyError, TypeError):
                continue
            if destination is None:
                continue
            if path.stem in keep and ((now := keep[path.stem]) is None or digest(now) == destination):
                continue  # its sink's own
            aside = path.with_name(f".{destination}.json")
            try:
                os.replace(path, aside)
            except OSError as exc:
                log.error("checkpoint %s not set aside (%s): no sink of its name delivers there now", path, exc)
            else:
                log.info("checkpoint %s set aside as %s: no sink of its name delivers there now", path, aside.name)

    def checkpointed(self) -> list[str]:
        """The names with a saved checkpoint (not those set aside for another destination)."""
        return sorted(path.stem for path in (self.dir / "checkpoints").glob("*.json") if not path.name.startswith("."))

    def _flush_readers(self) -> None:
        for reader in self._readers.values():
            reader.flush()


class DiskSpool(_Segments):
    """The durable spool. One writer (the event loop thread); readers in the same loop."""

    def __init__(
        self,
        directory: str | os.PathLike[str],
        *,
        segment_bytes: int = 16 << 20,
        max_bytes: int = 1 << 30,
        overflow: Overflow = "drop_newest",
        fsync_interval: float | None = None,
    ) -> None:
        # Two writers on one spool would interleave segments and checkpoints: refuse the second.
        self._open_dir(directory, "lock", "in use by another process")
        # The segment being written is never deleted, so it must stay well below the cap: else a
        # spool every sink has caught up with could still be full, and refuse every event.
        self.segment_bytes = max(1, min(segment_bytes, max_bytes // 4))
        self.max_bytes = max_bytes
        self.overflow = overflow
        self.fsync_interval = fsync_interval
        self._sizes: dict[int, int] = {}
        for n in self._segments():
            try:
                self._sizes[n] = self._path(n).stat().st_size
            except FileNotFoundError:  # finished meanwhile by a delivery process still running
                continue
        # Never append to a segment a previous process wrote: its tail may be torn.
        self._current = max(self._sizes, default=0) + 1
        self._fd = self._open(self._current)
        self._dirty = False
        self._failing = False  # appends fail (a full disk...): logged once per stretch
        self._refreshed = 0.0
        self._fsync_task: asyncio.Task[None] | None = None

    # -- writing ---------------------------------------------------------------------------

    def append(self, event: CloudEvent) -> bool:
        """Append one event; False (and counted) when the size cap refuses it."""
        if self._fd < 0:  # closed (a request finishing after the stop): the lock is let go, write nothing
            self.stats.dropped["spool_error"] += 1
            return False
        record = encode_record(event)
        try:
            # Making room reads and deletes segments: its OSErrors cost the event, as a write's do.
            if self.size_bytes() + len(record) > self.max_bytes and not self._room(len(record)):
                self.stats.dropped["spool_full"] += 1
                return False
            if self._sizes[self._current] + len(record) > self.segment_bytes and self._sizes[self._current]:
                self._roll()
            written = os.write(self._fd, record)
        except OSError as exc:  # a full disk, a file size limit, an I/O error
            return self._write_failed(exc)
        if written != len(record):  # cut short (the disk filled up mid-record)
            return self._write_failed(OSError(f"{written} of {len(record)} bytes written"))
        if self._failing:
            log.warning("spool %s: appending again", self.dir)
            self._failing = False
        self._sizes[self._current] += len(record)
        self.stats.appended += 1
        self._dirty = True
        if self._sizes[self._current] >= self.segment_bytes:
            # Closed now, not before the next append: the segment being written is never deleted,
            # so one holding a record over half the cap would keep the spool full for good.
            # If this roll fails, the next append's tries again.
            with contextlib.suppress(OSError):
                self._roll()
        for waiter in self._waiters:
            waiter.set()
        return True

    def _write_failed(self, exc: OSError) -> bool:
        """The event is dropped and counted, never the request failed; a partial record is cut
        off again, so that the segment stays readable past it."""
        self.stats.dropped["spool_error"] += 1
        if not self._failing:  # logged when it starts, not for every event
            log.error("spool %s: cannot append (%s): events are dropped and counted until it can", self.dir, exc)
            self._failing = True
        with contextlib.suppress(OSError):
            os.ftruncate(self._fd, self._sizes[self._current])
        if self._sizes[self._current]:
            # The segment being written is never deleted: on a disk (or under a file size limit,
            # EFBIG) smaller than segment_bytes it would never fill up to roll, and stay, all of
            # it delivered, failing every append for good. Closed, it goes once the readers are
            # past it: collected here, as no commit may come (they may be past it already).
            with contextlib.suppress(OSError):
                self._roll()
                self.collect()
        return False

    def start_fsync(self) -> None:
        """Fsync in the background every `fsync_interval` seconds (one fsync per batch of appends)."""
        if self.fsync_interval and self._fsync_task is None:
            self._fsync_task = asyncio.get_running_loop().create_task(self._fsync_loop())

    async def _fsync_loop(self) -> None:
        assert self.fsync_interval
        while True:
            await asyncio.sleep(self.fsync_interval)
            try:
                self.sync()
            except OSError as exc:  # EIO: the data may not be on disk; keep appending regardless
                log.error("spool %s: fsync failed: %s", self.dir, exc)

    def sync(self) -> None:
        if self._dirty:
            self._dirty = False
            os.fsync(self._fd)

    def _open(self, number: int) -> int:
        fd = os.open(self._path(number), os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
        self._sizes.setdefault(number, 0)
        return fd

    def _roll(self) -> None:
        if self.fsync_interval:
            os.fsync(self._fd)
        # The next segment opens before the current one closes: if it cannot, nothing changed.
        fd = self._open(self._current + 1)
        try:
            os.close(self._fd)
        except OSError as exc:  # Linux has let the descriptor go all the same: never closed again
            log.error("spool %s: closing segment %d failed: %s", self.dir, self._current, exc)
        self._fd = fd
        self._current += 1
        self.refresh()

    def _room(self, needed: int) -> bool:
        now = time.monotonic()
        # A follower (the delivery process) may have deleted finished segments meanwhile, the
        # oldest first: one stat tells, so a spool it just emptied takes the next event, not
        # one 0.5 s later (the whole refresh, a stat per segment, waits that long otherwise).
        if now - self._refreshed >= 0.5 or not self._path(min(self._sizes)).exists():
            self._refreshed = now
            self.refresh()
        if self.size_bytes() + needed <= self.max_bytes:
            return True
        self._save_held_back()  # a checkpoint the save interval held back may free a segment
        self.collect()
        return self.size_bytes() + needed <= self.max_bytes or self._make_room(needed)

    def _make_room(self, needed: int) -> bool:
        if self.overflow != "drop_oldest":
            return False
        while self.size_bytes() + needed > self.max_bytes:
            oldest = min(self._sizes)
            if oldest == self._current:
                return False
            lost = self._undelivered(oldest)
            self._delete(oldest)  # an OSError: the append fails, nothing was dropped
            self.stats.dropped["spool_overflow"] += 1 if lost is None else lost
            log.error("spool full: dropped segment %d with %s undelivered events", oldest,
                      "an unknown number of" if lost is None else lost)
        return True

    def _saved_floor(self, number: int) -> Position:
        """The lowest position the readers' checkpoint files hold (segment `number`'s start
        when there is none or one cannot be read); not those set aside (`.<digest>.json`), of
        destinations no sink delivers to now."""
        try:
            saved = [_read_checkpoint(path)[0] for path in (self.dir / "checkpoints").glob("*.json")
                     if not path.name.startswith(".")]
        except (OSError, ValueError, KeyError, TypeError):
            return Position(number, 0)
        return min(saved, default=Position(number, 0))

    def _undelivered(self, number: int) -> int | None:
        """Events of segment `number` that some sink has not taken yet: past the readers in this
        process (those stopped too) or, with none here (they are in the delivery process), their
        saved checkpoints (which trail a little: an upper bound); with neither, every event counts.
        None when some are and the segment cannot be read to count them (EIO): dropped all the same."""
        positions = [*(r.position for r in self._readers.values()), *self._parked.values()]
        floor = min(positions, default=None) or self._saved_floor(number)
        if floor.segment > number:
            return 0
        start = floor.offset if floor.segment == number else 0
        try:
            return self._count_frames(number, start)
        except FileNotFoundError:
            return 0
        except OSError as exc:  # EIO: dropped all the same, counted as one (raised, it failed every append for good)
            if exc.errno not in _DAMAGE:  # may pass: this append fails (spool_error), nothing dropped
                raise
            log.error("spool %s: cannot count the undelivered events of segment %d (%s)", self.dir, number, exc)
            return None if start < self._sizes.get(number, 0) else 0

    def _count_frames(self, number: int, start: int) -> int:
        """The records of segment `number` that end past `start`, by their frames."""
        fh = open(self._path(number), "rb")  # noqa: SIM115 - closed below
        # By the frame headers alone: this runs in an append, on the proxy's event loop, and
        # decoding a 16 MiB segment (checksums, JSON) took ~100 ms. A record whose checksum
        # fails counts too: dropped, no reader ever counts it as corrupt.
        with fh:
            size = os.fstat(fh.fileno()).st_size
            count = offset = 0
            while True:
                header = fh.read(_HEADER.size)
                if len(header) < _HEADER.size:
                    return count
                magic, _, _, alen, dlen = _HEADER.unpack(header)
                if magic != _MAGIC or alen == 0:  # a broken frame: readers skip the segment's rest
                    return count
                offset += _HEADER.size + alen + dlen
                if offset > size:  # a torn tail
                    return count
                count += offset > start
                fh.seek(offset)

    def refresh(self) -> None:
        """Forget segments deleted behind our back: by a `SpoolFollower` in the delivery process."""
        for number in [n for n in self._sizes if n != self._current]:
            if not self._path(number).exists():
                del self._sizes[number]

    def close(self) -> None:
        self._flush_readers()
        if self._fsync_task is not None:
            self._fsync_task.cancel()
        if self._fd >= 0:
            self.sync()
            os.close(self._fd)
            self._fd = -1
            os.close(self._lock)  # releases the flock


class SpoolFollower(_Segments):
    """The read side of a `DiskSpool` that another process writes: the delivery process's view.

    It learns the segments and their sizes from the directory every `poll_interval` seconds
    (the writer only ever appends to its newest segment, so the others' sizes are final), wakes
    its readers when the log grew, and deletes the segments every reader has finished, never the
    newest. One follower per spool: a second one is refused.
    """

    def __init__(self, directory: str | os.PathLike[str], *, poll_interval: float = 0.01,
                 idle_poll_interval: float = 0.1) -> None:
        self._open_dir(directory, "follower.lock", "another delivery process reads it")
        self.poll_interval = poll_interval
        # While nothing is appended the interval doubles up to this: an idle sidecar's child
        # wakes 10 times a second, not 100 (the first event after a pause waits <= this long).
        self.idle_poll_interval = max(idle_poll_interval, poll_interval)
        self._sizes = {}
        self._current = 0
        self.refresh()
        self._poll_task: asyncio.Task[None] | None = None

    def refresh(self) -> None:
        # List first, then stat: a segment listed before a newer one appeared may still grow,
        # but one seen with a newer one beside it is complete.
        numbers = self._segments()
        newest = numbers[-1] if numbers else self._current
        sizes: dict[int, int] = {}
        for number in numbers:
            known = self._sizes.get(number)
            if known is None or number >= self._current:
                try:
                    known = self._path(number).stat().st_size
                except FileNotFoundError:  # deleted meanwhile (the writer dropped it on overflow)
                    continue
            sizes[number] = known
        self._sizes, self._current = sizes, newest
        # The newest segment is never deleted: once the writer has closed it, it can go.
        self._save_held_back()
        self.collect()

    def start_polling(self) -> None:
        if self._poll_task is None:
            self._poll_task = asyncio.get_running_loop().create_task(self._poll())

    async def _poll(self) -> None:
        # Between full looks (every 20th poll, or when the directory changed), a stat of the
        # newest segment: the common case is that the writer only appended to it.
        polls = 0
        seen: int | None = None  # the directory's mtime at the last full look
        interval = self.poll_interval
        failing = False
        while True:
            await asyncio.sleep(interval)
            before = self.tail(), len(self._sizes)
            polls += 1
            try:
                changed = os.stat(self.dir).st_mtime_ns
                if changed != seen or polls % 20 == 0:
                    self.refresh()
                    seen = changed
                else:
                    with contextlib.suppress(FileNotFoundError):
                        self._sizes[self._current] = self._path(self._current).stat().st_size
            except OSError as exc:
                # EMFILE, EIO: the next poll looks again. Were the task to end, nothing more would
                # be delivered, with every sink reporting ok.
                if not failing:
                    log.error("spool %s: cannot look for new events (%s): retrying", self.dir, exc)
                    failing = True
                seen = None  # a full look once it works again
                interval = min(interval * 2, self.idle_poll_interval)
                continue
            if failing:
                log.warning("spool %s: looking for new events again", self.dir)
                failing = False
            if (self.tail(), len(self._sizes)) != before:
                interval = self.poll_interval
                for waiter in self._waiters:
                    waiter.set()
            else:
                interval = min(interval * 2, self.idle_poll_interval)

    def check_polling(self) -> None:
        """SpoolError if the poll task ended (only a bug ends it): its readers would never see
        another event. The delivery process exits on it, and the sidecar starts a new one."""
        task = self._poll_task
        if task is not None and task.done() and not task.cancelled():
            exc = task.exception()
            log.critical("spool %s: polling stopped", self.dir, exc_info=exc)
            raise SpoolError(f"spool {self.dir}: polling stopped ({exc!r})")

    def close(self) -> None:
        if self._poll_task is not None:
            self._poll_task.cancel()
            self._poll_task = None
        self._flush_readers()
        if self._lock >= 0:
            os.close(self._lock)
            self._lock = -1


def _read_checkpoint(path: Path) -> tuple[Position, str | None, Any]:
    """A checkpoint file's position, destination digest (None in files from before them) and
    `ahead` (None when absent): OSError, ValueError, KeyError or TypeError if it has no position."""
    saved = orjson.loads(path.read_bytes())
    if not isinstance(saved, dict):
        raise TypeError(f"not a JSON object: {type(saved).__name__}")
    destination = saved.get("destination")
    position = Position(int(saved["segment"]), int(saved["offset"]))
    if position.segment < 0 or position.offset < 0:  # damaged or edited: a read would seek to it
        raise ValueError(f"a negative position: {position}")
    return position, str(destination) if destination else None, saved.get("ahead")


def digest(destination: str) -> str:
    """How a checkpoint keeps its sink's destination: a URL may hold a password, and checkpoint
    files are no place for it."""
    return hashlib.sha256(destination.encode()).hexdigest()[:16]


class DiskReader:
    """One sink's cursor over the spool, with a checkpoint file that survives restarts."""

    def __init__(self, spool: _Segments, name: str, *, checkpoint_interval: float = 0.2,
                 destination: str | None = None) -> None:
        self.spool = spool
        self.name = name
        self.destination = None if destination is None else digest(destination)
        self._event = asyncio.Event()
        spool._waiters.add(self._event)
        self._old_name: Path | None = None  # its checkpoint under an earlier name, taken over (`_renamed`)
        self.position = self._load()
        self._saved = self.position
        self._saved_at = 0.0
        self._save_failing = False
        self.checkpoint_interval = checkpoint_interval
        self._file: tuple[int, BinaryIO] | None = None  # the segment being read, kept open
        if self._unsaved:
            # Saved at once: a writer in another process counts what an overflow drops past the
            # checkpoints it finds, and a sink failing from its start would have none.
            self._save(time.monotonic(), collect=False)

    def _load(self) -> Position:
        path = self.spool.checkpoint_path(self.name)
        first = min(self.spool._sizes, default=self.spool._current)
        self._unsaved = False
        self.ahead: Any = None
        position: Position | None
        try:
            position, was, ahead = _read_checkpoint(path)
        except FileNotFoundError:
            position, was, ahead = None, None, None
        except (ValueError, KeyError, TypeError):
            log.error("unreadable checkpoint %s: reading %s from the oldest segment", path, self.name)
            return Position(first, 0)
        # EIO, a directory in its place; EACCES, ESTALE too, unlike a segment's: everything sent
        # again rather than a delivery process dying at each start, which stopped every sink.
        except OSError as exc:
            if exc.errno in _PASSING:  # tried again at the next start, not everything sent again
                raise
            log.error("unreadable checkpoint %s (%s): reading %s from the oldest segment", path, exc, self.name)
            return Position(first, 0)
        if position is None or (self.destination is not None and was is not None and was != self.destination):
            # Sinks from --log-url are named by place: dropping the first URL gave the second the
            # first's name, and it skipped what the first had delivered and it had not. Its own
            # checkpoint is under its old name, found by its destination.
            missing = position is None
            if not missing:
                self._set_aside(path, was)
            position = self._renamed()
            self._unsaved = True  # saved under this name at once (the old name's file goes then)
            if position is None:
                if not missing:
                    log.warning("checkpoint %s was saved for another destination: reading %s from the oldest "
                                "segment", path, self.name)
                return Position(first, 0)
        assert position is not None
        self.ahead = ahead  # its own checkpoint's: what its consumer knows to be where
        if position.segment not in self.spool._sizes:
            # Its segment is gone (dropped on overflow, or finished): go on from the next one.
            following = self.spool._next_segment(position.segment)
            return Position(following if following is not None else self.spool._current, 0)
        return position

    def _set_aside(self, path: Path, destination: str | None) -> None:
        """Keep another destination's checkpoint from this name's first save: under a name no sink
        may have (a leading dot), where that sink, renamed, finds it (`--log-url B --log-url A`
        after `--log-url A`: A, now http2, looked after B had saved over it, and re-sent it all)."""
        try:
            os.replace(path, path.with_name(f".{destination}.json"))
        except OSError as exc:
            log.error("checkpoint %s not set aside (%s): its sink, renamed, reads from the oldest segment",
                      path, exc)

    def _renamed(self) -> Position | None:
        """The position another checkpoint file saved for this destination holds (this sink's,
        under its old name), taken over; that file goes at the first save."""
        if self.destination is None:
            return None
        # Only those set aside: a configured sink's own file is its own (set_aside_unread, before
        # the readers, set aside the others), also when a new sink delivers to the same place.
        for path in sorted((self.spool.dir / "checkpoints").glob(".*.json")):
            try:
                position, was, _ = _read_checkpoint(path)
            except (OSError, ValueError, KeyError, TypeError):
                continue
            if was != self.destination:
                continue
            log.info("sink %s takes its checkpoint under its old name, %s", self.name, path.stem)
            self._old_name = path
            return position
        return None

    def read(self, max_events: int, start: Position | None = None, stop: Position | None = None,
             *, max_bytes: int | None = None) -> tuple[list[CloudEvent], Position]:
        """Up to `max_events` events after `start` (default: the cursor), and the position past them;
        none at or past `stop` (a record's start), when given; with `max_bytes`, only as many as
        their records hold (at least one: a bigger event comes alone).

        The position can move with no events (past a corrupt stretch): commit it all the same.
        """
        # Cleared before looking, so an append after this read wakes the next wait().
        self._event.clear()
        out: list[CloudEvent] = []
        start = start or self.position
        segment, offset = start.segment, start.offset
        room: float = math.inf if max_bytes is None else max_bytes
        while len(out) < max_events and room > 0:
            if stop is not None and segment > stop.segment:
                break
            size = self.spool._sizes.get(segment)
            if size is None:  # deleted under us (overflow): go on with the next one
                following = self.spool._next_segment(segment)
                if following is None:
                    break
                segment, offset = following, 0
                continue
            # Short of `stop` only where the segment reaches it (a crash may have cut its tail).
            capped = stop is not None and stop.segment == segment and stop.offset <= size
            end = stop.offset if stop is not None and capped else size
            if offset < end:
                offset, room = self._read_segment(segment, offset, end, max_events - len(out), room, out)
                if capped and offset < end and len(out) < max_events and room > 0:
                    # `stop` starts a record, and everything before it is written: a frame that
                    # runs past it is damage (a length's bit flipped), skipped as far as `stop`.
                    self._skip_corrupt(segment, offset, end, "record runs past the next one's start")
                    offset = end
            if len(out) >= max_events or room <= 0 or segment == self.spool._current or capped:
                break
            if offset < size:
                # A torn tail left by a crashed writer: nothing more will come.
                self._skip_corrupt(segment, offset, size, "truncated record")
            following = self.spool._next_segment(segment)
            if following is None:
                break
            segment, offset = following, 0
        return out, Position(segment, offset)

    def holds(self, position: Position) -> bool:
        # The oldest segments go first, so later ones stay too; a segment shorter than the position
        # (its tail lost in a crash) holds no longer what was written there either.
        return position.offset <= self.spool._sizes.get(position.segment, -1)

    def _read_segment(
        self, segment: int, offset: int, size: int, limit: int, room: float, out: list[CloudEvent]
    ) -> tuple[int, float]:
        """Decode records of one segment into `out`, up to `limit` events and `room` bytes (0 when
        the next record did not fit); returns the offset reached (its end when the file is gone:
        dropped on overflow by the writer, which counted it) and the room left."""
        try:
            fh = self._open(segment)
        except OSError as exc:  # EIO, a directory in its place: it failed every read, for ever
            self._unreadable(segment, exc)
            self._skip_corrupt(segment, offset, size, f"cannot open it ({exc})", readable=False)
            return size, room
        if fh is None:
            return size, room
        while offset < size and limit > 0 and room > 0:
            try:
                fh.seek(offset)
                buf = fh.read(min(size - offset, _CHUNK))
                if len(buf) >= _HEADER.size:
                    # A record bigger than a chunk: read exactly that record.
                    _, _, _, alen, dlen = _HEADER.unpack_from(buf, 0)
                    need = _HEADER.size + alen + dlen
                    if need > len(buf) and offset + need <= size:
                        fh.seek(offset)
                        buf = fh.read(need)
            except OSError as exc:  # EIO from a bad sector: where a record after it starts is unknown
                self._close_file()
                self._unreadable(segment, exc)
                self._skip_corrupt(segment, offset, size, f"cannot read it ({exc})", readable=False)
                return size, room
            start = offset
            try:
                for event, stop in iter_records(buf):
                    taken = start + stop - offset
                    if taken > room and out:  # the byte budget: a batch in memory, and each sink's copies
                        return offset, 0
                    out.append(event)
                    offset = start + stop
                    limit -= 1
                    room -= taken
                    if limit == 0 or room <= 0:
                        break
            except CorruptRecordError as exc:
                if exc.resume is None:  # the frame itself is broken: where the next starts is unknown
                    self._skip_corrupt(segment, offset, size, str(exc))
                    return size, room
                resume = start + exc.resume  # only this record: the ones after it are whole
                self._skip_corrupt(segment, offset, resume, str(exc))
                offset = resume
                continue
            if offset == start:  # only a partial frame left: the writer is mid-append
                break
        return offset, room

    def _open(self, segment: int) -> BinaryIO | None:
        if self._file is not None and self._file[0] == segment:
            return self._file[1]
        self._close_file()
        try:
            fh = open(self.spool._path(segment), "rb")  # noqa: SIM115 - kept open across reads
        except FileNotFoundError:  # dropped on overflow meanwhile
            return None
        self._file = (segment, fh)
        return fh

    def _close_file(self) -> None:
        if self._file is not None:
            self._file[1].close()
            self._file = None

    def _unreadable(self, segment: int, error: OSError) -> None:
        """Raise `error` unless the segment is to be skipped as damaged: an error that may pass, or,
        in the delivery process, one on the segment being written (its size there is a stat's,
        which may fall inside a record being appended: skipping to it lost the whole records
        written after). The writer's own sizes end whole records: skipped to, what comes after reads."""
        if error.errno not in _DAMAGE or (segment == self.spool._current and not isinstance(self.spool, DiskSpool)):
            raise error

    def _skip_corrupt(self, segment: int, offset: int, size: int, reason: str, *, readable: bool = True) -> None:
        # Counted (and logged) once, not per sink: an unreadable segment once whatever the offset
        # each sink's reader met it at or read it to, by the segment's size (the writer's process
        # skips the segment being written again as it grows: each stretch appended since counts).
        seen = (segment, offset if readable else -1 - self.spool._sizes.get(segment, size))
        if seen in self.spool._corrupt_seen:  # another sink's reader met it first
            return
        self.spool._corrupt_seen.add(seen)
        lost = self._lost(segment, offset, size) if readable else 1  # unreadable: how many is unknown
        self.spool.stats.corrupt += lost
        log.error("spool segment %d: %s; skipping %d bytes from offset %d (%s)", segment, reason, size - offset,
                  offset, f"events lost: {lost}" if readable else "events lost: unknown, counted as 1")

    def _lost(self, segment: int, offset: int, end: int) -> int:
        """The events in a stretch skipped (`_records_lost`); 1 if it cannot be read to count them."""
        try:
            fh = self._open(segment)
            if fh is None:
                return 1
            fh.seek(offset)
            return _records_lost(fh.read(end - offset))
        except OSError:
            return 1

    def wake(self) -> None:
        """End a wait() early (at shutdown)."""
        self._event.set()

    async def wait(self, timeout: float) -> None:
        """Sleep until something was appended since the last read (or `timeout` passes)."""
        try:
            await asyncio.wait_for(self._event.wait(), timeout)
        except TimeoutError:
            pass

    def commit(self, position: Position, *, force: bool = False, collect: bool = True) -> None:
        """Move the cursor after the sink took everything before it.

        The checkpoint file is rewritten at most every `checkpoint_interval` seconds (and on
        `flush`, and by a worker gone idle): a crash re-delivers at most that much, which
        at-least-once allows, and the file I/O stays off the per-batch path. A save deletes the
        segments every reader has passed, but with `collect` off: a reader made before the
        others that may still need them (the broker's new trigger, at the log's end).
        """
        self.position = position
        if position == self._saved and not force:
            return  # what an idle worker's repeated commit of where it is costs (a forced one
            # writes the file: the broker's attach marks a trigger as known by it)
        now = time.monotonic()
        if force or now - self._saved_at >= self.checkpoint_interval:
            self._save(now, collect)

    def flush(self) -> None:
        """Write the checkpoint now if it moved (at shutdown)."""
        if self.position != self._saved:
            self._save(time.monotonic())
        self._close_file()

    def _save(self, now: float, collect: bool = True) -> None:
        if self.spool.before_save is not None:
            self.spool.before_save()
        position = self.position
        path = self.spool.checkpoint_path(self.name)
        tmp = path.with_suffix(".tmp")
        try:
            saved: dict[str, object] = {"segment": position.segment, "offset": position.offset}
            if self.destination is not None:
                saved["destination"] = self.destination
            if self.ahead is not None:
                saved["ahead"] = self.ahead
            tmp.write_bytes(orjson.dumps(saved))
            os.replace(tmp, path)
        except OSError as exc:
            # E.g. a full disk: delivery goes on, and the next commit tries again. Until then a
            # restart re-delivers from the last saved checkpoint (at-least-once allows it).
            if not self._save_failing:
                log.error("checkpoint %s not saved (%s): delivery goes on, saving is retried", path, exc)
            self._save_failing = True
            self._saved_at = now
            if collect:  # what was delivered frees its segments all the same: the next save may need the room
                self.spool.collect()
            return
        if self._save_failing:
            log.warning("checkpoint %s saved again", path)
            self._save_failing = False
        if self._old_name is not None:  # saved under this name: the old one is no one's now
            self._old_name.unlink(missing_ok=True)
            self._old_name = None
        self._saved, self._saved_at = position, now
        if collect:
            self.spool.collect()

    def lag(self, start: Position | None = None) -> int:
        """Bytes appended after `start` (default: the committed cursor)."""
        return self.spool.bytes_after(start or self.position)



class MemorySpool:
    """`durability: memory`: a bounded in-memory log. Lost on restart or crash, by choice."""

    def __init__(self, *, max_events: int = 100_000, max_bytes: int = 1 << 30,
                 overflow: Overflow = "drop_newest") -> None:
        self.max_events = max_events
        self.max_bytes = max_bytes
        self.overflow = overflow
        self.stats = SpoolStats()
        self._log: collections.deque[tuple[int, CloudEvent, int]] = collections.deque()
        self._next = 0
        self._bytes = 0
        self._readers: dict[str, MemoryReader] = {}
        self._closed = False

    def append(self, event: CloudEvent) -> bool:
        """Append one event; False (and counted) when `max_events` or `max_bytes` refuses it."""
        if self._closed:  # as the disk spool's: nobody delivers it any more
            self.stats.dropped["spool_error"] += 1
            return False
        # Counted as the disk spool would store it, so max_bytes means the same in both.
        size = _HEADER.size + len(orjson.dumps(event.attributes)) + len(event.data or b"")
        full = len(self._log) >= self.max_events or self._bytes + size > self.max_bytes
        if full and (self.overflow == "drop_newest" or size > self.max_bytes):
            self.stats.dropped["spool_full"] += 1
            return False
        while self._log and (len(self._log) >= self.max_events or self._bytes + size > self.max_bytes):
            _, _, dropped = self._log.popleft()  # every event held is one a reader has not taken
            self._bytes -= dropped
            self.stats.dropped["spool_overflow"] += 1
        self._log.append((self._next, event, size))
        self._bytes += size
        self._next += 1
        self.stats.appended += 1
        for reader in self._readers.values():
            reader._event.set()
        return True

    def reader(self, name: str, *, destination: str | None = None) -> MemoryReader:
        if name in self._readers:
            raise SpoolError(f"a reader named {name!r} already exists")
        reader = MemoryReader(self, self._log[0][0] if self._log else self._next)
        self._readers[name] = reader
        return reader

    def remove_reader(self, name: str, *, forget: bool = False) -> None:
        self._readers.pop(name, None)
        self.collect()

    def set_aside_unread(self, keep: Mapping[str, str | None]) -> None:
        pass  # no checkpoints

    def tail(self) -> Position:
        return Position(0, self._next)

    def collect(self) -> None:
        floor = min((r.position.offset for r in self._readers.values()), default=self._next)
        while self._log and self._log[0][0] < floor:
            _, _, size = self._log.popleft()
            self._bytes -= size

    def size_bytes(self) -> int:
        return self._bytes

    def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        self.collect()  # what every sink took goes: the rest was not delivered everywhere
        if self._log:
            log.error("durability memory: %d events not delivered to every sink are lost with the stop",
                      len(self._log))

    def start_fsync(self) -> None:
        pass

    def refresh(self) -> None:
        pass


class MemoryReader:
    ahead = None  # nothing outlives the process

    def __init__(self, spool: MemorySpool, start: int) -> None:
        self.spool = spool
        self.position = Position(0, start)
        self._event = asyncio.Event()

    def read(self, max_events: int, start: Position | None = None, stop: Position | None = None,
             *, max_bytes: int | None = None) -> tuple[list[CloudEvent], Position]:
        self._event.clear()
        start = start or self.position
        log_ = self.spool._log
        if not log_:
            return [], start
        first = log_[0][0]
        index = max(0, start.offset - first)
        if index >= len(log_):
            return [], start
        last = min(len(log_), index + max_events)
        if stop is not None:
            last = max(index, min(last, stop.offset - first))
        if max_bytes is not None:  # as the disk spool's: at least one, the rest as they fit
            room = max_bytes
            for i in range(index, last):
                room -= log_[i][2]
                if room < 0 and i > index:
                    last = i
                    break
        events = [log_[i][1] for i in range(index, last)]
        return events, Position(0, first + last)

    def holds(self, position: Position) -> bool:
        log_ = self.spool._log
        return position.offset >= (log_[0][0] if log_ else self.spool._next)

    def wake(self) -> None:
        self._event.set()

    async def wait(self, timeout: float) -> None:
        try:
            await asyncio.wait_for(self._event.wait(), timeout)
        except TimeoutError:
            pass

    def commit(self, position: Position, *, force: bool = False, collect: bool = True) -> None:
        self.position = position
        if collect:
            self.spool.collect()

    def flush(self) -> None:
        pass

    def lag(self, start: Position | None = None) -> int:
        offset = (start or self.position).offset
        # From the newest back: asked after each short batch, the whole log each time cost the
        # event loop (up to max_events a time) for the few events behind.
        return sum(size for _, _, size in itertools.takewhile(lambda r: r[0] >= offset, reversed(self.spool._log)))


SpoolFactory = Callable[[], Spool]

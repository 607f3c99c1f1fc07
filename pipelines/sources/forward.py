"""`forward` source: a Fluentd Forward protocol v1 server whose records become CloudEvents.

One TCP port takes every mode of the spec: Message `[tag, time, record, option?]`, Forward
`[tag, [[time, record], ...], option?]`, PackedForward `[tag, bin|str of msgpack entries, option?]`
and CompressedPackedForward (option `compressed: "gzip"`, one or more gzip members). Times are
EventTime (ext type 0), integer or float seconds; an entry's may also be v1.5's `[time, map...]`
(Fluent Bit 2.1.x and >= 5.0.5 send `[[EventTime, {metadata}], record]`), whose maps are dropped,
as Fluentd does. A frame with v1.5's option `fluent_signal` other than 0 carries metrics, traces or
another kind, not log records: it is acked and skipped (logged once per connection). With
`shared_key` set every connection starts with HELO -> PING -> PONG (`users` adds username/password
auth). UDP heartbeats are not served: Fluentd's out_forward defaults to `heartbeat_type transport`,
plain TCP connects.

A frame's records go to the subscriber in batches of at most `max_frame_entries`, each unpacked
and converted only when the one before was taken, so a frame of many small entries holds its bytes
and one batch of events, not all of them decoded (a Forward-mode array's entries are read from the
frame's bytes, a PackedForward bin's unpacked, and inflated, as they go); at most `in_flight` frames,
across connections, at once (a connection whose frame waits its turn reads no more: TCP holds its
sender back, and that wait, like the subscriber's, is not `frame_timeout`): frames waiting for
their turn are held in memory, one a connection, up to `max_frame_bytes` each. A connection not yet
authenticated reads no more than a PING (4 KiB). A `chunk` option is acked
(`{"ack": chunk}`) only after the last batch's `send_batch` returned, so a client with
`require_ack_response` resends what the subscriber did not take: the whole chunk, so the batches
before a failed or bad one are delivered again (at-least-once; a chunk's record ids stay the same,
see below). A frame that does not parse or is over `max_frame_bytes`, a failed handshake or a
batch the subscriber failed to take closes that connection (logged, counted in `errors`); other
connections go on. Such a close, or one after the sender half-closed, sends the acks written first
and reads what still comes for up to 5 s, so that no reset drops acks the sender had not read yet.
Events the subscriber refuses for good (`RejectedError`, after a batch refused together went again
in halves) are dead-lettered to `dead_letter_file`, or logged, and the chunk is acked: resent,
they would only be refused again. A chunk whose connection was lost (reset, a write failed) is not
handed on further, nor, while it waits for its turn, held on (counted in `abandoned`): it can no
longer be acked, and the sender sends it again. A FIN is no such loss: a sender that half-closed
(shutdown(SHUT_WR)) has its chunks taken and acked. One that closed (as the `fluentd` sink does
past its timeout: no reset when nothing is unread) looks the same: its chunk is taken, a duplicate,
with the same ids, of the one it sends again.

Records in the CloudEvents JSON format (what the `fluentd` sink sends: they have `specversion`)
become that event again; one that has `specversion` and is no valid CloudEvent (a `time` that is no
RFC 3339 timestamp, a missing `source`) is dead-lettered with the reason, as the refused ones are,
as the record event it would be below (logged at WARNING, counted in `invalid_events`), and the
chunk acked; so is a record whose time no event can hold (outside years 1..9999: a valid Forward
time, often milliseconds sent as seconds), without `time`. Any other record becomes an event of
type `record_type` with the tag as `subject`, the Fluentd time as `time` (nanoseconds), the
record as JSON `data`, and the id
`<chunk>-<index>` when the frame has a chunk (a resent chunk keeps its ids, so an id-keyed store
overwrites) or else a new UUID; in subject and id, what an attribute may not hold (a control
character) is percent-encoded. Every event's `meta` carries `fluentd-tag` and `fluentd-time` (ns).
A record or JSON `data` nested deeper than orjson writes (254 levels; msgpack reads 1024) is written
level by level here, so it is delivered like any other, not refused.
"""

from __future__ import annotations

import asyncio
import base64
import collections
import hmac
import itertools
import logging
import os
import socket
import time
import uuid
import zlib
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from typing import Annotated, Any, Literal, Self

import msgpack
import orjson
from pydantic import AfterValidator, Field, SecretStr, field_validator, model_validator

from infer_logger import deadletter, fields
from infer_logger.asgi import READ_RATE_ALLOWANCE
from infer_logger.cloudevents.event import SPECVERSION, CloudEvent
from infer_logger.cloudevents.json_format import deep_dumps, from_dict
from infer_logger.cloudevents.validation import percent_escaped, source_setting, validate
from infer_logger.config import listen_host
from infer_logger.errors import InvalidEventError, RejectedError
from infer_logger.sinks.base import Sink
from infer_logger.sinks.fluentd import (
    as_bytes,
    password_digest,
    shared_key_digest,
    time_ns,
)
from infer_logger.sinks.halving import Halving
from pipelines.sources.base import SourceConfig

log = logging.getLogger(__name__)

_NS = 1_000_000_000
_READ_SIZE = 256 * 1024
_PIECE = 256 * 1024  # most bytes of entries given to an unpacker at once
_MAX_ENTRIES = 10_000
_WALK_READ = 16 * 1024  # bytes of a frame an unpacker reads at once while walking it
_LINGER = 5.0  # seconds a connection this end closes has to read its acks and close too
_PING_BYTES = 4 * 1024  # most bytes of a PING (a hostname, a salt, two digests, a user: well under 1 KiB)


class FrameError(ValueError):
    """A frame that breaks the Forward protocol; its connection is closed."""


class ForwardSourceConfig(SourceConfig):
    type: Literal["forward"] = "forward"
    host: Annotated[str, AfterValidator(listen_host)] = Field("127.0.0.1", min_length=1)
    """Address to listen on (0.0.0.0 for every interface; "", an unset value, is refused: it is
    every address to asyncio)."""
    port: int = Field(24224, ge=0, le=65535)
    """TCP port; 0 picks a free one (see `ForwardSource.port`)."""
    shared_key: SecretStr | None = None
    """Require the shared-key handshake (Fluentd's `<security> shared_key`)."""
    self_hostname: str = Field(default_factory=socket.gethostname)
    """Our name in PONG."""
    users: dict[str, SecretStr] = {}
    """username -> password; when set, PING must also authenticate one of them."""
    handshake_timeout: fields.Seconds = Field(10.0, gt=0)
    """Seconds a client has to send PING after HELO."""
    frame_timeout: fields.Seconds = Field(60.0, gt=0)
    """Seconds a frame has to arrive whole once begun, plus one per MiB of it that came (a big
    frame on a slow link is not cut), counting only the time spent waiting for its bytes (not
    while the frame before it is taken); then the connection is closed (a client that stopped or
    dripped mid-frame held its bytes, up to max_frame_bytes, for as long as it stayed)."""
    max_frame_bytes: int = Field(32 << 20, ge=1024)
    """Largest frame as sent, and largest decompressed entries; a bigger one closes the connection.
    A batch's entries (`max_frame_entries`) may decode into at most a sixteenth as many maps and
    arrays (2 Mi by default), as an empty one is a byte there and ~64 in memory."""
    max_frame_entries: int = Field(_MAX_ENTRIES, ge=1)
    """Most records per batch handed to the subscriber; a frame with more goes in several, its chunk
    acked after the last. max_frame_bytes cannot bound what entries become (a 3-byte entry is a ~1 KB
    CloudEvent); this bounds how many are held at once. Also the most gzip members that end no entry
    a frame may have (empty ones cost work and carry nothing)."""
    in_flight: int = Field(4, ge=1)
    """Most frames, across connections, being converted and handed to the subscriber at once: each
    holds a batch of up to max_frame_entries events (a 10,000-event batch of tiny records is ~12 MB).
    A connection whose frame waits for its turn reads no more, so TCP holds its sender back (that
    frame held meanwhile: up to max_frame_bytes a connection)."""
    record_type: fields.AttributeText = Field("io.fluentd.record", min_length=1)
    """CloudEvents `type` of records that are not CloudEvents themselves (a CloudEvents String: every
    such record's event has it; "" or a control character had each frame refused, resent for ever)."""
    source_uri: str | None = None
    """Their `source`, a URI reference; default `fluent-forward://<host>:<port>` (an IPv6 host in
    brackets)."""
    dead_letter_file: fields.AppendedPath | None = None
    """Events the subscriber refuses for good are appended here as JSON lines with the reason
    (written before the chunk is acked); without it they are logged with their ids. Counted in
    `refused` either way. So are records that have `specversion` and are no valid CloudEvent (as
    the record events they would be; counted in `invalid_events`)."""

    @field_validator("source_uri")
    @classmethod
    def _uri_reference(cls, uri: str | None) -> str | None:
        return source_setting(uri, "fluent-forward://fluentd/ or /fluentd")

    @model_validator(mode="after")
    def _users_need_key(self) -> ForwardSourceConfig:
        if self.users and self.shared_key is None:
            raise ValueError("users: user authentication happens in the shared-key handshake; set shared_key")
        return self

    def build(self, subscriber: Sink) -> ForwardSource:
        return ForwardSource(self, subscriber)


Entry = tuple[int, dict[Any, Any]]  # (time in ns, record)


class _Budget:
    """How many maps and arrays entries may decode into until `reset`: max_frame_bytes bounds
    their bytes, not what they become (a one-byte empty map is a 64-byte dict, and a 2 KB gzip
    member inflates to a million of them). Counted by the unpacker's hooks as each is made, so a
    frame past it stops there. Their items are not counted: records of many small values (250
    integers each, 4 MB a frame) are ordinary. Short strings still cost ~25 times their bytes
    (a 3-byte "ab" is a ~59-byte str): max_frame_bytes bounds what a connection holds to about
    25 times itself, so keep it to what the senders need."""

    __slots__ = ("left", "size")

    def __init__(self, size: int) -> None:
        self.size = self.left = size

    def reset(self) -> None:
        self.left = self.size

    def take(self, value: Any) -> Any:
        self.left -= 1
        if self.left < 0:
            raise FrameError(f"the entries decode into more than {self.size} maps and arrays "
                             f"(max_frame_bytes / 16 per batch of max_frame_entries)")
        return value


def _containers(limit: int) -> int:
    return max(1 << 16, limit // 16)


@dataclass(frozen=True, slots=True)
class Frame:
    """A frame's tag and chunk, and its entries: checked and (but in Message mode) unpacked as they
    are iterated, once, so iterating can raise FrameError too."""

    tag: str
    entries: Iterable[Entry]
    chunk: str | None
    budget: _Budget | None = None  # of the entries still to unpack
    signal: int = 0  # v1.5's fluent_signal when not logs (0): the entries are then none

    def slices(self, size: int) -> Iterator[list[Entry]]:
        """The entries, `size` at a time (each batch with the whole budget: those before are
        converted by then)."""
        entries = iter(self.entries)
        while True:
            if self.budget is not None:
                self.budget.reset()
            if not (batch := list(itertools.islice(entries, size))):
                return
            yield batch
            batch.clear()  # converted by now: not held while the next one decodes


def _unpacker(limit: int, file: _Reader | None = None, read_size: int = 0,
              budget: _Budget | None = None) -> msgpack.Unpacker:
    # surrogateescape: records may hold invalid UTF-8 (see _scrub). Non-string map keys are the
    # record's business, not a protocol error.
    hooks = {} if budget is None else {"list_hook": budget.take, "object_hook": budget.take}
    return msgpack.Unpacker(file, raw=False, unicode_errors="surrogateescape", strict_map_key=False,
                            max_buffer_size=limit, read_size=read_size, **hooks)


class _Messages:
    """A connection's byte stream cut into msgpack messages of at most `limit` bytes each, given as
    their bytes: parse_frame decodes what it needs of them (decoded whole, a frame of tiny entries
    is ~50 times its size).

    They are found by Unpacker.skip(), which builds nothing and drops what it passed, so its buffer
    holds about a read (all of a bin or str while one comes in). Its buffer limit cannot bound a
    frame: it holds whatever follows in the same read (a frame just under the limit followed by the
    next one's start was BufferFull), so frames are measured here.
    """

    def __init__(self, limit: int) -> None:
        self._limit = limit
        self._unpacker = self._new_unpacker()
        self._base = 0  # where in the stream the unpacker's tell() counts from
        self._fed = 0  # bytes fed so far
        self._start = 0  # where the unfinished message starts
        # Seconds spent waiting for reads of the unfinished message: frame_timeout counts them only,
        # not the time this server spent elsewhere (taking the frame before, waiting for its turn)
        # while its bytes waited in the socket.
        self.waited = 0.0
        self._reads: list[bytes] = []  # the reads it is in, and what follows it
        self._offset = 0  # where it starts in the first

    def feed(self, data: bytes) -> None:
        self._unpacker.feed(data)
        self._reads.append(data)
        self._fed += len(data)

    @property
    def partial(self) -> bool:
        """Whether a message has begun and not ended (once iterating stopped)."""
        return self._fed > self._start


    @property
    def received(self) -> int:
        """Bytes of the unfinished message so far."""
        return self._fed - self._start

    def rest(self) -> bytes:
        """The bytes fed and not yet given as messages."""
        return b"".join([memoryview(self._reads[0])[self._offset:], *self._reads[1:]]) if self._reads else b""

    def __iter__(self) -> Self:
        return self

    def __next__(self) -> bytes | memoryview:
        try:
            self._unpacker.skip()
        except msgpack.OutOfData:
            self._check(self._fed)
            raise StopIteration from None
        end = self._base + self._unpacker.tell()  # exact after a whole message, not after a failed attempt
        self._check(end)
        big = end - self._start > _READ_SIZE
        if big:
            # A bin or str that big left the unpacker's buffer as big, for good: dropped before
            # the message is joined, it and the reads are not held twice at once.
            self._unpacker = self._new_unpacker()
            self._base = end
        message = self._cut(end - self._start)
        self._start = end
        self.waited = 0.0  # the next one's time starts with the first read that waits for it
        if big and self._reads:  # the rest of the last read: the next message's start
            self._unpacker.feed(memoryview(self._reads[0])[self._offset:])
            for data in self._reads[1:]:
                self._unpacker.feed(data)
        return message

    def _new_unpacker(self) -> msgpack.Unpacker:
        # Room for one read past an unfinished frame; starting with a read's room, not 1 MiB.
        return _unpacker(self._limit + _READ_SIZE, read_size=_READ_SIZE)

    def _cut(self, size: int) -> bytes | memoryview:
        """The next `size` bytes of the reads as one buffer: a view when they are in one read."""
        first = memoryview(self._reads[0])[self._offset:]
        if size <= len(first):
            message: bytes | memoryview = first[:size]
            self._offset += size
        else:
            parts: list[bytes | memoryview] = [first]
            left, used = size - len(first), 1
            while left > len(self._reads[used]):
                parts.append(self._reads[used])
                left -= len(self._reads[used])
                used += 1
            parts.append(memoryview(self._reads[used])[:left])
            message = b"".join(parts)
            del self._reads[:used]
            self._offset = left
        if self._offset == len(self._reads[0]):
            del self._reads[0]
            self._offset = 0
        return message

    def _check(self, end: int) -> None:
        if end - self._start > self._limit:
            raise FrameError(_TOO_BIG)


_TOO_BIG = "frame exceeds max_frame_bytes"


def parse_frame(frame: bytes | memoryview, limit: int, max_entries: int = _MAX_ENTRIES) -> Frame:
    """A Forward message, the bytes of one msgpack item, as (tag, entries, chunk); FrameError says
    what is wrong with the frame, and iterating its entries what is wrong with them. Only the tag,
    the option and a Message mode record are decoded here; the entries are unpacked as they are
    iterated. `limit` bounds the inflated entries, `max_entries` the gzip members that end no entry."""
    budget = _Budget(_containers(limit))
    walk = _Walk(memoryview(frame), budget)
    try:
        size = walk.array_header() if walk.kind() == "array" else None
        if size is None or not 2 <= size <= 4:
            found = _describe(walk.value()) if size is None else f"an array of {size} items"
            raise FrameError(f"a frame is an array of 2 to 4 items, not {found}")
        tag = walk.value()
        if not isinstance(tag, str) or not tag:
            raise FrameError(f"the tag must be a non-empty string, not {_describe(tag)}")
        entries: Iterable[Entry]
        kind = walk.kind()
        if kind == "array":  # Forward mode: its items are packed entries one after another
            items = walk.items()
            option = _option(walk, size, 2)
            entries = _entries(_unpacked(_pieces(items), limit, max_entries, budget))
        elif kind == "raw":  # PackedForward, maybe compressed: in a bin, or an old sender's str
            raw = walk.raw()
            option = _option(walk, size, 2)
            compressed = option.get("compressed")
            if _signal(option):
                entries = ()  # metrics or traces, skipped: never read, whatever their compression
            elif compressed == "gzip":
                entries = _entries(_unpacked(_inflate(raw, limit), limit, max_entries, budget))
            elif compressed in (None, "text"):
                entries = _entries(_unpacked(_pieces(raw), limit, max_entries, budget))
            else:
                raise FrameError(f"unknown compression {_describe(compressed)}")
        else:  # Message mode
            if size < 3:
                raise FrameError("a Message mode frame is [tag, time, record, option?]")
            wire_time, record = walk.value(), walk.value(maps=True)
            if isinstance(wire_time, _Skipped):
                raise FrameError(f"a time is an EventTime or a number, not {_describe(wire_time)}")
            option = _option(walk, size, 3)
            entries = [(time_ns(wire_time), _record(record))]
    except (TypeError, ValueError, OverflowError, msgpack.UnpackException) as exc:
        # TypeError: msgpack's for a map key Python cannot hash; ValueError/OverflowError: times
        raise exc if isinstance(exc, FrameError) else FrameError(str(exc) or type(exc).__name__) from exc
    chunk = option.get("chunk")
    if chunk is not None and not isinstance(chunk, str):
        raise FrameError(f"the chunk option must be a string, not {_describe(chunk)}")
    if signal := _signal(option):
        return Frame(tag, (), chunk, budget, signal)
    return Frame(tag, entries, chunk, budget)


def _chunk(frame: bytes | memoryview) -> str | None:
    """The frame's chunk option, read past its entries and record without decoding them; None when
    it has none, or is no frame to tell."""
    walk = _Walk(memoryview(frame))
    try:
        size = walk.array_header() if walk.kind() == "array" else 0
        if not 3 <= size <= 4:
            return None
        walk.skip()  # the tag
        at = 2 if walk.kind() in ("array", "raw") else 3  # the option's place: Forward modes, or Message
        for _ in range(1, at):
            walk.skip()
        if size <= at or walk.kind() != "map":
            return None
        for _ in range(walk.map_header()):
            if walk.value() == "chunk":
                chunk = walk.value()
                return chunk if isinstance(chunk, str) else None
            walk.skip()
    except (ValueError, TypeError, IndexError, msgpack.UnpackException):
        pass
    return None


def _signal(option: dict[str, Any]) -> int:
    """The option's fluent_signal when it says the payload is no log records, else 0: Fluent Bit's
    metrics (1, cmetrics) and traces (2, ctraces), and any later kind (not logs either)."""
    signal = option.get("fluent_signal")
    return signal if type(signal) is int else 0


def _option(walk: _Walk, size: int, index: int) -> dict[str, Any]:
    """The option's `chunk`, `compressed` and `fluent_signal`, all this source reads of it (the rest
    is skipped)."""
    if size > index + 1:
        raise FrameError(f"{size} items is too many for this mode")
    if size == index:
        return {}
    if walk.kind() != "map":
        if (option := walk.value()) is None:
            return {}
        raise FrameError(f"the option must be a map, not {_describe(option)}")
    option = {}
    for _ in range(walk.map_header()):
        key = walk.value()
        if isinstance(key, _Skipped):  # what decoding the map would have raised
            raise TypeError(f"an option key cannot be a {key.kind}")
        if key in ("chunk", "compressed", "fluent_signal"):
            option[key] = walk.value()
        else:
            walk.skip()
    return option


class _Reader:
    """A frame's bytes as the file an Unpacker reads, a piece at a time (BytesIO copies them)."""

    def __init__(self, view: memoryview) -> None:
        self._view = view
        self._pos = 0

    def read(self, size: int) -> bytes:
        piece = self._view[self._pos:self._pos + size]
        self._pos += len(piece)
        return piece.tobytes()


# msgpack type bytes of arrays, maps, str and bin -> (kind, bytes of the length that follows;
# 0: the length is in the type byte's low bits)
_HEADERS = {
    **{byte: ("map", 0) for byte in range(0x80, 0x90)},
    **{byte: ("array", 0) for byte in range(0x90, 0xa0)},
    **{byte: ("raw", 0) for byte in range(0xa0, 0xc0)},
    0xc4: ("raw", 1), 0xc5: ("raw", 2), 0xc6: ("raw", 4),  # bin 8/16/32
    0xd9: ("raw", 1), 0xda: ("raw", 2), 0xdb: ("raw", 4),  # str 8/16/32
    0xdc: ("array", 2), 0xdd: ("array", 4), 0xde: ("map", 2), 0xdf: ("map", 4),
}
_KINDS = {byte: kind for byte, (kind, _) in _HEADERS.items()}


@dataclass(frozen=True, slots=True)
class _Skipped:
    """An array or a map found where a scalar belongs, left undecoded."""

    kind: str
    length: int

    def __str__(self) -> str:
        return f"{self.kind} of {self.length} items"


class _Walk:
    """A frame's items one after another, read from its bytes and decoded only when asked for."""

    def __init__(self, frame: memoryview, budget: _Budget | None = None) -> None:
        self._frame = frame
        self._budget = budget
        self._seek(0)

    def _seek(self, pos: int) -> None:
        self._base = pos
        rest = self._frame[pos:]
        if len(rest) > _WALK_READ:
            self._unpacker = _unpacker(len(rest), _Reader(rest), _WALK_READ, self._budget)
        else:  # most frames: fed at once, cheaper than read
            self._unpacker = _unpacker(_WALK_READ, read_size=_WALK_READ, budget=self._budget)
            self._unpacker.feed(rest)

    @property
    def _pos(self) -> int:
        return self._base + self._unpacker.tell()

    def kind(self) -> str:
        """The next item's: 'array', 'map', 'raw' (str or bin) or 'other'."""
        return _KINDS.get(self._frame[self._pos], "other")

    def _header(self) -> tuple[int, int]:
        """The next array's, map's, str's or bin's header size and its length (items or bytes)."""
        pos = self._pos
        byte = self._frame[pos]
        width = _HEADERS[byte][1]
        if not width:
            return 1, byte & (0x1f if byte >= 0xa0 else 0x0f)
        return 1 + width, int.from_bytes(self._frame[pos + 1:pos + 1 + width], "big")

    def array_header(self) -> int:
        return int(self._unpacker.read_array_header())

    def map_header(self) -> int:
        return int(self._unpacker.read_map_header())

    def value(self, maps: bool = False) -> Any:
        """The next item; an array, or a map unless `maps`, stands as a _Skipped."""
        kind = self.kind()
        if kind == "array" or kind == "map" and not maps:
            length = self._header()[1]
            self._unpacker.skip()
            return _Skipped(kind, length)
        return self._unpacker.unpack()

    def skip(self) -> None:
        if self.kind() == "raw":
            self.raw()
        else:
            self._unpacker.skip()

    def items(self) -> memoryview:
        """The next array's items (packed one after another)."""
        header = self._header()[0]
        start = self._pos + header
        self._unpacker.skip()
        return self._frame[start:self._pos]

    def raw(self) -> memoryview:
        """The next str's or bin's bytes, not copied (skip() would read them into the unpacker)."""
        header, length = self._header()
        start = self._pos + header
        self._seek(start + length)
        return self._frame[start:start + length]


def _ping(message: bytes | memoryview) -> list[Any]:
    """PING's six items (an array or a map among them, which PING has none of, as a _Skipped), or
    none when it is no array of six."""
    walk = _Walk(memoryview(message))
    if walk.kind() != "array" or walk.array_header() != 6:
        return []
    return [walk.value() for _ in range(6)]


def _entries(items: Iterable[object]) -> Iterator[Entry]:
    """Each item as an entry, as they come; whatever is wrong a FrameError."""
    try:
        for item in items:
            yield _entry(item)
    except (TypeError, ValueError, OverflowError, msgpack.UnpackException) as exc:
        # TypeError: msgpack's for a map key Python cannot hash; ValueError/OverflowError: times
        raise exc if isinstance(exc, FrameError) else FrameError(str(exc)) from exc


def _entry(item: object) -> Entry:
    if not isinstance(item, list) or len(item) != 2:
        raise FrameError(f"an entry is [time, record], not {_describe(item)}")
    return _time(item[0]), _record(item[1])


def _time(value: object) -> int:
    """An entry's time in ns: v1.5's Metadata, a time or `[time, map...]`; the maps (Fluent Bit's
    metadata) are dropped, as Fluentd's in_forward does: an event has no place for them."""
    if isinstance(value, list):
        if not value or not all(isinstance(item, dict) for item in value[1:]):
            raise FrameError("a time with metadata is [time, map...], not " + _describe(value))
        value = value[0]
    return time_ns(value)


def _record(value: object) -> dict[Any, Any]:
    if not isinstance(value, dict):
        raise FrameError(f"a record is a map, not {_describe(value)}")
    return value


def _pieces(raw: bytes | memoryview) -> Iterator[memoryview]:
    view = memoryview(raw)
    for start in range(0, len(raw), _PIECE):
        yield view[start:start + _PIECE]


def _unpacked(pieces: Iterable[bytes | memoryview], limit: int, max_idle: int,
              budget: _Budget | None = None) -> Iterator[Any]:
    """The msgpack items of packed entries given in pieces, each as soon as it is whole. An empty
    piece ends a gzip member; more than `max_idle` members that end no item are refused (each costs
    work, and 32 MiB holds 1.6 million empty ones)."""
    # Room for an entry of at most `limit` bytes, and a piece.
    unpacker = _unpacker(limit + _PIECE, read_size=_PIECE, budget=budget)
    fed = end = items = idle = 0
    items_at_member_start = 0
    for piece in pieces:
        if not piece:
            if items == items_at_member_start:
                idle += 1
                if idle > max_idle:
                    raise FrameError(f"more gzip members ending no entry than max_frame_entries ({max_idle})")
            items_at_member_start = items
            continue
        unpacker.feed(piece)
        fed += len(piece)
        for item in unpacker:
            end = unpacker.tell()  # after the last whole entry (a failed attempt moves tell() on)
            items += 1
            yield item
    if end != fed:
        raise FrameError(f"the packed entries end in a cut-off entry ({fed - end} bytes)")


def _inflate(raw: bytes | memoryview, limit: int) -> Iterator[bytes]:
    """What every gzip member in turn inflates to (the spec lets a sender concatenate them; Fluentd
    writes one per append), in pieces of at most _PIECE bytes, an empty one after each member;
    at most `limit` bytes in all."""
    view = memoryview(raw)
    total = offset = 0
    try:
        while offset < len(raw):
            member = zlib.decompressobj(wbits=31)
            # Fed in growing slices: at a member's end, unused_data copies the rest of what it was
            # given, and given the whole rest every time, n small members cost n times the frame.
            step = 256
            while not member.eof:
                if offset == len(raw):
                    raise FrameError("a gzip member is cut short")
                piece = view[offset:offset + step]
                part = member.decompress(piece, _PIECE)
                while True:
                    total += len(part)
                    if total > limit:
                        raise FrameError(f"the entries inflate beyond max_frame_bytes ({limit})")
                    if part:
                        yield part
                    if member.eof or not member.unconsumed_tail and len(part) < _PIECE:
                        break
                    part = member.decompress(member.unconsumed_tail, _PIECE)  # zlib holds more
                offset += len(piece) - len(member.unused_data)
                step = min(2 * step, _PIECE)
            yield b""
    except zlib.error as exc:
        raise FrameError(f"not gzip: {exc}") from exc


def _describe(value: object) -> str:
    if isinstance(value, _Skipped):
        return f"an {value}" if value.kind == "array" else f"a {value}"
    # Not repr() of a map or an array: one nested 1000 deep raised RecursionError (a traceback
    # instead of a reason), and one of millions of items built a string that long for 60 characters.
    if isinstance(value, list):
        return f"an array of {len(value)} items"
    if isinstance(value, dict):
        return f"a map of {len(value)} items"
    text = repr(value[:61] if isinstance(value, (str, bytes)) else value)
    return f"{type(value).__name__} {text[:60]}{'...' if len(text) > 60 else ''}"


_MIN_SECONDS, _END_SECONDS = -62135596800, 253402300800  # 0001-01-01 and 10000-01-01 (UTC)


def rfc3339(ns: int) -> str:
    """RFC 3339 with nanoseconds; ValueError for a year outside 1..9999, which it cannot write."""
    seconds = ns // _NS
    if not _MIN_SECONDS <= seconds < _END_SECONDS:
        raise ValueError(f"time {seconds} s since the epoch is outside years 1..9999")
    return time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(seconds)) + f".{ns % _NS:09d}Z"


def _jsonable(value: object) -> object:
    """orjson's fallback for msgpack values JSON lacks: bin as base64, EventTime and msgpack's
    Timestamp as RFC 3339."""
    if isinstance(value, bytes):
        return base64.b64encode(value).decode()
    if isinstance(value, msgpack.ExtType):
        try:
            return rfc3339(time_ns(value))
        except (ValueError, OverflowError):
            return {"ext": value.code, "base64": base64.b64encode(value.data).decode()}
    if isinstance(value, msgpack.Timestamp):
        try:
            return rfc3339(value.to_unix_nano())
        except ValueError:
            return {"ext": -1, "base64": base64.b64encode(value.to_bytes()).decode()}
    raise TypeError(type(value).__name__)


def _scrub(value: Any) -> Any:
    """The record made writable: strings read with surrogateescape (invalid UTF-8) with U+FFFD where
    bytes were bad, and map keys orjson takes no fallback for (bin, ext) as strings. Without
    recursion: msgpack reads 1024 levels, past Python's recursion limit (a RecursionError escaped
    the connection's handler)."""
    if not isinstance(value, dict | list):
        return _text(value) if isinstance(value, str) else value
    top: dict[Any, Any] | list[Any] = {} if isinstance(value, dict) else []
    todo = [(value, top)]
    while todo:
        original, copy = todo.pop()
        items = original.items() if isinstance(original, dict) else enumerate(original)
        for key, item in items:
            if isinstance(item, dict | list):
                child: Any = {} if isinstance(item, dict) else []
                todo.append((item, child))  # filled later, in its place already
            else:
                child = _text(item) if isinstance(item, str) else item
            if isinstance(copy, dict):
                copy[_key(key)] = child
            else:
                copy.append(child)
    return top


def _text(value: str) -> str:
    return value.encode("utf-8", "surrogateescape").decode("utf-8", "replace")


def _key(key: Any) -> Any:
    if isinstance(key, bytes):
        # A name, not a blob: msgpack-ruby writes ASCII-8BIT strings as bin, so "host" stays "host".
        return key.decode("utf-8", "replace")
    if isinstance(key, msgpack.ExtType | msgpack.Timestamp):
        value = _jsonable(key)
        return value if isinstance(value, str) else orjson.dumps(value).decode()
    return _text(key) if isinstance(key, str) else key  # int, float, bool and None OPT_NON_STR_KEYS writes


def _json(record: dict[Any, Any]) -> bytes:
    options = orjson.OPT_NON_STR_KEYS
    try:
        data = orjson.dumps(record, default=_jsonable, option=options)
    except orjson.JSONEncodeError:
        record = _scrub(record)
        try:
            data = orjson.dumps(record, default=_jsonable, option=options)
        except orjson.JSONEncodeError:  # nested deeper than orjson writes
            try:
                data = deep_dumps(record, _jsonable, options)
            except orjson.JSONEncodeError as exc:
                raise FrameError(f"a record JSON cannot hold: {exc}") from exc
    # orjson's bytes keep its 4 KiB starting buffer: a copy holds a small record's JSON in its own
    # size (100k tiny records held 400 MB, not 4).
    return memoryview(data).tobytes() if len(data) < 4096 else data


_NIL = 0xC0  # msgpack's nil: the protocol's TCP heartbeat

_COUNTERS = ("connections", "frames", "records", "acks", "errors", "abandoned", "auth_failures",
             "invalid_events", "refused")


class ForwardSource:
    """The server; counters are plain attributes (`connections`, `frames`, `records`, `acks`...)."""

    def __init__(self, config: ForwardSourceConfig, subscriber: Sink) -> None:
        self.config = config
        self.subscriber = subscriber
        self._send = Halving(subscriber).send_batch  # batches refused together go again in halves
        self.port = config.port  # the bound one after start()
        self.connections = 0
        self.frames = 0
        self.records = 0
        self.acks = 0
        self.errors = 0  # connections closed for a bad frame, a failed handshake, a refused batch
        self.abandoned = 0  # frames left part-taken: their sender was gone (it sends them again)
        self.auth_failures = 0
        self.invalid_events = 0  # records with specversion that are no valid CloudEvent (dead-lettered)
        self.refused = 0  # events the subscriber refused for good (dead-lettered or logged)
        self._server: asyncio.Server | None = None
        self._tasks: set[asyncio.Task[Any]] = set()
        self._stopped = asyncio.Event()
        self._closing = False
        self._draining = False  # no frame is taken now: those in hand finish (`drain`)
        self._taking = 0  # frames being taken (waiting for their turn, handed on, then acked)
        self._idle = asyncio.Event()
        self._idle.set()
        self._turns = _Turns(config.in_flight)  # frames whose batches are converted and handed on
        # surrogateescape: an ack echoes a chunk that is not UTF-8 (read so) byte for byte; strict,
        # it failed after the records were handed on, and every resend delivered them again.
        self._packer = msgpack.Packer(use_bin_type=True, unicode_errors="surrogateescape")

    @property
    def source_uri(self) -> str:
        if self.config.source_uri:
            return self.config.source_uri
        # RFC 3986 3.2.2 (and 6874 for a zone's `%`): `fluent-forward://:::24224` is no URI.
        host = self.config.host
        host = f"[{host.replace('%', '%25')}]" if ":" in host else host
        return f"fluent-forward://{host}:{self.port}"

    async def start(self) -> None:
        if self._server is None:
            self._stopped.clear()
            self._closing = self._draining = False
            self._server = await asyncio.start_server(self._serve, self.config.host, self.config.port)
            self.port = int(self._server.sockets[0].getsockname()[1])
            log.info("forward source listening on %s:%s", self.config.host, self.port)

    def stats(self) -> dict[str, int]:
        return {name: getattr(self, name) for name in _COUNTERS}

    async def run(self) -> None:
        """Serve until `stop()` or `aclose()`."""
        await self.start()
        await self._stopped.wait()

    def stop(self) -> None:
        """Stop accepting, and let `run` return; the connections open go on until `aclose`."""
        if self._server is not None:
            self._server.close()
        self._stopped.set()

    async def drain(self, timeout: float) -> bool:
        self.stop()
        self._draining = True
        try:
            await asyncio.wait_for(self._idle.wait(), timeout)
        except TimeoutError:
            return False
        return True

    async def aclose(self) -> None:
        if self._server is not None:
            # Stays set until a new start: a connection accepted before the close whose task
            # had not begun yet ends as it begins (it was served on after this returned, and
            # on Python 3.12 wait_closed waited for it, for as long as the client stayed).
            self._closing = True
            self._server.close()
            while self._tasks:  # a batch in flight is not acked: the client resends it
                for task in list(self._tasks):
                    task.cancel()
                await asyncio.gather(*self._tasks, return_exceptions=True)
            await self._server.wait_closed()
            self._server = None
        self._stopped.set()

    async def __aenter__(self) -> Self:
        await self.start()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.aclose()

    # -- one connection ---------------------------------------------------------------------

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        if self._closing:
            writer.transport.abort()
            return
        task = asyncio.current_task()
        assert task is not None
        self._tasks.add(task)
        self.connections += 1
        # Done when the connection is lost (a reset, a failed write), not at a FIN: a sender that
        # half-closed still reads its acks.
        gone = asyncio.ensure_future(writer.wait_closed())
        try:
            if await self._converse(reader, writer, gone):
                await self._linger(reader, writer, gone)
        except asyncio.CancelledError:
            # aclose() ends connections by cancelling them; finishing normally keeps asyncio's
            # stream callback from logging the cancellation as an error.
            if not self._closing:
                raise
        finally:
            self._tasks.discard(task)
            writer.transport.abort()  # a no-op once closed
            if gone.done() and not gone.cancelled():
                gone.exception()  # retrieved: a reset is no error here
            gone.cancel()

    async def _converse(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter,
                        gone: asyncio.Future[None]) -> bool:
        """Serves the connection; True when this end closes it (the sender still there), False when
        the sender is gone."""
        peer = writer.get_extra_info("peername")
        messages = _Messages(self.config.max_frame_bytes)
        skipping = False  # a fluent_signal frame was skipped (logged once)
        try:
            if self.config.shared_key is not None and not await self._handshake(
                    reader, writer, messages, peer):
                return True
            while True:
                # Frames first: some may have come in the handshake's last read, behind its PING.
                for message in messages:
                    if self._draining:
                        return True  # not taken, not acked: the sender sends it again
                    if len(message) == 1 and message[0] == _NIL:
                        continue  # a heartbeat (Fluentd's in_forward skips it too)
                    self._taking += 1
                    self._idle.clear()
                    try:
                        frame = await self._take(message, writer, gone)
                    finally:
                        self._taking -= 1
                        if not self._taking:
                            self._idle.set()
                    if frame is None:
                        continue
                    # Taken once the subscriber returned: a sender that does not read its acks holds
                    # its connection, not the other frames, nor a stop.
                    if frame.chunk is not None:
                        writer.write(self._packer.pack({"ack": frame.chunk}))
                        await writer.drain()
                        self.acks += 1
                    if frame.signal and not skipping:
                        skipping = True
                        log.warning("forward source: %s sends frames with fluent_signal %d (metrics, traces or "
                                    "another kind, not log records; tag %r): acked and skipped", peer,
                                    frame.signal, frame.tag)
                if not (data := await self._read(reader, messages)):
                    return True  # the sender sends no more (it may still read its acks: sent by now)
                messages.feed(data)
        except msgpack.BufferFull:  # _Messages refuses first; kept as the backstop it was
            self._close_for(peer, f"bad frame: {_TOO_BIG}")
        except (FrameError, msgpack.UnpackException, ValueError, OverflowError, TypeError) as exc:
            # ValueError/OverflowError: msgpack's own, and times no calendar holds; TypeError:
            # msgpack's for a map key Python cannot hash (an array or a map)
            self._close_for(peer, f"bad frame: {str(exc) or type(exc).__name__}")
        except _Refused as exc:
            what = exc.args[0] if exc.args else "subscriber refused the batch"
            self._close_for(peer, f"{what}, not acked: {exc.__cause__!r}")
        except TimeoutError:
            self._close_for(peer, "no PING within handshake_timeout")
        except OSError:
            return False  # the client went away
        return True

    async def _linger(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter,
                      gone: asyncio.Future[None]) -> None:
        """Closes the connection without a reset: the acks written go out, then a FIN, and what the
        sender still sends is read and dropped until it closes too, for at most _LINGER seconds
        (closed with bytes unread, the connection was reset, and the sender's socket dropped the
        acks it had not read yet: those chunks came again)."""
        try:
            async with asyncio.timeout(_LINGER):
                if writer.can_write_eof():
                    writer.write_eof()  # once the acks still buffered are written
                while await reader.read(_READ_SIZE):
                    pass
                writer.close()
                # Not wait_closed(): cancelled (the timeout, aclose), it cancels the close future
                # `gone` waits on too; wait() cancels nothing.
                await asyncio.wait((gone,))
        except (TimeoutError, OSError):
            writer.transport.abort()

    async def _read(self, reader: asyncio.StreamReader, messages: _Messages) -> bytes:
        """The next read; when a frame has begun, within what is left of its time: `frame_timeout`,
        plus a second per MiB of it that came (a big frame on a slow link is not cut), counted
        while waiting here only: from its first byte, a frame behind one the subscriber held
        longer was past it when reading resumed, and a sender that waits for no ack lost it."""
        if not messages.partial:
            return await reader.read(_READ_SIZE)
        left = self.config.frame_timeout + messages.received / READ_RATE_ALLOWANCE - messages.waited
        started = time.monotonic()
        try:
            async with asyncio.timeout(left):
                return await reader.read(_READ_SIZE)
        except TimeoutError:
            raise FrameError(f"a frame begun did not arrive whole within {self.config.frame_timeout:g}s "
                             f"(frame_timeout)") from None
        finally:
            messages.waited += time.monotonic() - started

    def _close_for(self, peer: object, reason: str) -> None:
        self.errors += 1
        log.warning("forward source: closing connection from %s: %s", peer, reason)

    async def _take(self, message: bytes | memoryview, writer: asyncio.StreamWriter,
                    gone: asyncio.Future[None]) -> Frame | None:
        """The frame's batches handed on in its turn (one of `in_flight`); the frame, or None when
        it was not taken."""
        # Waiting, this connection reads nothing: TCP holds its sender back.
        if not await self._turns.take(gone):
            # Lost while it waited (a reset: its sender's ack timeout): held on, it was taken for no
            # one to ack, and the sender sends it again on a new connection.
            if _chunk(message) is not None:
                self.abandoned += 1
                raise ConnectionResetError("the sender went away while its chunk waited for its turn")
            await self._turns.take()  # without a chunk nothing comes again: it goes on
        try:
            if self._draining:
                return None  # began while this one waited: not taken, not acked (the sender sends it again)
            # Parsed in its turn too: a Message mode record is decoded whole.
            frame = parse_frame(message, self.config.max_frame_bytes, self.config.max_frame_entries)
            self.frames += 1
            await self._hand_on(frame, writer)
        finally:
            self._turns.release()
        return frame

    async def _hand_on(self, frame: Frame, writer: asyncio.StreamWriter) -> None:
        for events, invalid in self.batches(frame):
            if frame.chunk is not None and writer.transport.is_closing():
                # The connection was lost (a reset: the sender's ack timeout): no ack can reach it,
                # and it sends the chunk again, so the rest of this one would be taken twice. A FIN
                # is no such sign: a sender that half-closed still reads its ack.
                self.abandoned += 1
                raise ConnectionResetError("the sender went away mid-frame")
            if invalid:
                self._write_down(frame, invalid, invalid=True)
            if events:
                try:
                    await self._send(events)
                    taken = len(events)
                except RejectedError as exc:
                    # Refused for good: sent again they would be refused again, and the sender
                    # would resend the chunk for ever. Written down, the rest of it is acked.
                    self._write_down(frame, exc.refusals(events))
                    taken = exc.taken(events)
                except asyncio.CancelledError:
                    raise
                except Exception as exc:
                    raise _Refused() from exc
                self.records += taken
            await asyncio.sleep(0)  # a frame of many batches lets other connections in between

    def _write_down(self, frame: Frame, dead: list[tuple[CloudEvent, str]], invalid: bool = False) -> None:
        try:
            self._dead_letter(dead, invalid=invalid)
        except OSError as error:
            if frame.chunk is not None:
                raise _Refused("dead letters not written") from error  # not acked: the sender sends it again
            # No chunk, no resend: closing would lose the rest of the frame too.
            self._dead_letter(dead, f"not dead-lettered ({error})", invalid)

    def _dead_letter(self, dead: list[tuple[CloudEvent, str]], failed: str = "",
                     invalid: bool = False) -> None:
        """Written to `dead_letter_file` (OSError when it cannot be), else (or when `failed` says
        why it could not be) logged with their ids; one line a batch either way. `invalid`: records
        that make no valid CloudEvent (see `batches`), as the events they were wrapped in."""
        path = self.config.dead_letter_file
        if path is not None and not failed:
            deadletter.append(path, dead, fsync=True)  # on disk before the ack forgets them
        where = failed or (f"dead-lettered to {path}" if path else "not dead-lettered: no dead_letter_file")
        ids = ", ".join(e.id for e, _ in dead)
        if invalid:
            self.invalid_events += len(dead)
            log.warning("forward source: %d records make no valid CloudEvent (%s): %s; ids %s", len(dead), where,
                        dead[0][1], ids)
        else:
            self.refused += len(dead)
            log.error("forward source: the subscriber refused %d events (%s): %s; ids %s", len(dead), where,
                      dead[0][1], ids)

    def batches(self, frame: Frame) -> Iterator[tuple[list[CloudEvent], list[tuple[CloudEvent, str]]]]:
        """The frame's records as CloudEvents (see the module docstring), `max_frame_entries` at a
        time, each batch unpacked and converted when asked for; FrameError if one cannot be. With
        each batch, its records that make no valid CloudEvent, wrapped as other records are (without
        `time` when theirs is the reason), with the reason (dead letters): those that have
        `specversion` and are none, and those whose time is outside years 1..9999."""
        meta_tag = {"fluentd-tag": frame.tag}
        # Tag and chunk are a sender's text: a control character in them made every record an
        # invalid event, the frame was refused and the sender resent it for ever.
        subject = percent_escaped(frame.tag)
        prefix = percent_escaped(frame.chunk) if frame.chunk else None
        checked = False  # records that are no CloudEvents: is the frame's first one valid?
        start = 0  # the slice's first index
        for entries in frame.slices(self.config.max_frame_entries):
            events: list[CloudEvent] = []
            invalid: list[tuple[CloudEvent, str]] = []
            for index, (ns, record) in enumerate(entries, start):
                meta = {**meta_tag, "fluentd-time": str(ns)}
                invalid_reason = ""
                if "specversion" in record:
                    try:
                        event = from_dict(record)
                    except (TypeError, ValueError) as exc:  # also data JSON cannot hold: bin, ext, int keys
                        # Wrapped as a record it was acked, and lost to a subscriber that keeps the
                        # events it knows (the store): dead-lettered as such, with why.
                        claimed = record.get("id")
                        name = repr(claimed[:100]) if isinstance(claimed, str) else _describe(claimed)
                        invalid_reason = (f"a record with specversion and id {name} is no valid "
                                          f"CloudEvent: {exc}")
                    else:
                        events.append(CloudEvent(event.attributes, event.data, meta))
                        continue
                event_id = f"{prefix}-{index}" if prefix else str(uuid.uuid4())
                attributes: dict[str, str | int | bool] = {
                    "specversion": SPECVERSION, "id": event_id, "source": self.source_uri,
                    "type": self.config.record_type, "subject": subject,
                    "datacontenttype": "application/json",
                }
                try:
                    attributes["time"] = rfc3339(ns)
                except ValueError as exc:
                    # A valid Forward time (any integer) an event cannot hold, often milliseconds
                    # sent as seconds: closing the connection lost the frame's later records to a
                    # sender without `chunk`, and one with it resent the chunk for ever.
                    invalid_reason = invalid_reason or f"a record's {exc} (milliseconds sent as seconds?)"
                event = CloudEvent(attributes, _json(record), meta)
                if invalid_reason:
                    invalid.append((event, invalid_reason))
                    continue
                if not checked:
                    # Only id and time differ between these events, and both are ours (`<chunk>-<n>`
                    # or a UUID; rfc3339's own output), so the first one vouches for the rest:
                    # validation is most of this loop's cost.
                    try:
                        validate(event)
                    except InvalidEventError as exc:
                        raise FrameError(f"record {index} makes no valid CloudEvent: {exc}") from exc
                    checked = True
                events.append(event)
            start += len(entries)
            yield events, invalid

    def to_events(self, frame: Frame) -> list[CloudEvent]:
        """All the frame's records as CloudEvents at once (see `batches`), but the invalid ones."""
        return [event for events, _ in self.batches(frame) for event in events]

    async def _handshake(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter,
                         messages: _Messages, peer: object) -> bool:
        assert self.config.shared_key is not None
        key = self.config.shared_key.get_secret_value()
        nonce = os.urandom(16)
        auth_salt = os.urandom(16) if self.config.users else b""
        # An empty `auth` (str, as Fluentd sends it) tells the client no user auth is wanted.
        writer.write(self._packer.pack(["HELO", {"nonce": nonce, "auth": auth_salt or "", "keepalive": True}]))
        # Read apart, at most a PING: a connection not yet authenticated held up to max_frame_bytes.
        hello = _Messages(_PING_BYTES)
        async with asyncio.timeout(self.config.handshake_timeout):
            try:
                ping = _ping(await _next_message(reader, hello))
            except FrameError:
                ping = []  # too big for one
        reason = self._check_ping(ping, nonce, auth_salt, key)
        hostname = self.config.self_hostname
        digest = "" if reason else shared_key_digest(as_bytes(ping[2]), hostname, nonce, key)
        writer.write(self._packer.pack(["PONG", not reason, reason, hostname, digest]))
        await writer.drain()
        if reason:
            self.auth_failures += 1
            self._close_for(peer, f"handshake failed: {reason}")
            return False
        if rest := hello.rest():  # frames that came behind the PING, in its read
            messages.feed(rest)
        return True

    def _check_ping(self, ping: object, nonce: bytes, auth_salt: bytes, key: str) -> str:
        """'' when PING proves the shared key (and a user's password when `users` is set)."""
        if not (isinstance(ping, list) and len(ping) == 6 and ping[0] == "PING" and isinstance(ping[1], str)
                and isinstance(ping[2], bytes | str) and isinstance(ping[3], str)):
            return "invalid PING"
        _, hostname, salt, digest, username, proof = ping
        # Compared as bytes: compare_digest refuses non-ASCII str, and the client chose these.
        if not hmac.compare_digest(as_bytes(digest), shared_key_digest(as_bytes(salt), hostname, nonce, key).encode()):
            return "shared_key mismatch"
        if self.config.users:
            password = self.config.users.get(username) if isinstance(username, str) else None
            if password is None or not isinstance(proof, bytes | str) or not hmac.compare_digest(
                    as_bytes(proof), password_digest(auth_salt, username, password.get_secret_value()).encode()):
                return "username/password mismatch"
        return ""


async def _next_message(reader: asyncio.StreamReader, messages: _Messages) -> bytes | memoryview:
    while True:
        try:
            return next(messages)
        except StopIteration:
            pass
        data = await reader.read(_PING_BYTES)  # no more than a PING's room before it is one
        if not data:
            raise ConnectionResetError("closed during the handshake")
        messages.feed(data)


class _Turns:
    """`in_flight` turns, taken in order; a connection lost while it waits for one leaves the line
    (a Semaphore could not be waited for together with that but by a task a frame)."""

    def __init__(self, size: int) -> None:
        self._free = size
        self._waiters: collections.deque[asyncio.Future[bool]] = collections.deque()

    async def take(self, gone: asyncio.Future[None] | None = None) -> bool:
        """A turn (True), or False when `gone` is done first."""
        if gone is not None and gone.done():
            return False
        if self._free and not self._waiters:
            self._free -= 1
            return True
        turn = asyncio.get_running_loop().create_future()
        self._waiters.append(turn)

        def lost(_: object) -> None:
            if not turn.done():
                turn.set_result(False)  # left in line: release() passes it by

        if gone is not None:
            gone.add_done_callback(lost)
        try:
            got = await turn
        except asyncio.CancelledError:
            if turn.done() and not turn.cancelled() and turn.result():
                self.release()  # given as this one was cancelled: to the next
            raise
        finally:
            if gone is not None:
                gone.remove_done_callback(lost)
        if got and gone is not None and gone.done():
            self.release()
            return False
        return got

    def release(self) -> None:
        while self._waiters:
            turn = self._waiters.popleft()
            if not turn.done():
                turn.set_result(True)
                return
        self._free += 1


class _Refused(Exception):
    """The subscriber raised, or dead letters were not written (the cause); the frame is not acked."""

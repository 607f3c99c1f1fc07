"""`forward` source: a Fluentd Forward protocol v1 server whose records become CloudEvents.

One TCP port takes every mode of the spec: Message `[tag, time, record, option?]`, Forward
`[tag, [[time, record], ...], option?]`, PackedForward `[tag, bin|str of msgpack entries, option?]`
and CompressedPackedForward (option `compressed: "gzip"`, one or more gzip members). Times are
EventTime (ext type 0), integer or float seconds. With `shared_key` set every connection starts
with HELO -> PING -> PONG (`users` adds username/password auth). UDP heartbeats are not served:
Fluentd's out_forward defaults to `heartbeat_type transport`, plain TCP connects.

A frame's records go to the subscriber in batches of at most `max_frame_entries`, each unpacked
and converted only when the one before was taken, so a frame of many small entries holds one batch
of events, not all of them (a PackedForward frame's entries are unpacked, and inflated, as they go;
a Forward-mode array comes whole with its message). A `chunk` option is acked (`{"ack": chunk}`)
only after the last batch's `send_batch` returned, so a client with `require_ack_response` resends
what the subscriber did not take: the whole chunk, so the batches before a refused or bad one are
delivered again (at-least-once; a chunk's record ids stay the same, see below). A frame that does
not parse or is over `max_frame_bytes`, a failed handshake or a refused batch closes that
connection (logged, counted in `errors`); other connections go on.

Records in the CloudEvents JSON format (what the `fluentd` sink sends: they have `specversion`)
become that event again. Any other record becomes an event of type `record_type` with the tag as
`subject`, the Fluentd time as `time` (nanoseconds), the record as JSON `data`, and the id
`<chunk>-<index>` when the frame has a chunk (a resent chunk keeps its ids, so an id-keyed store
overwrites) or else a new UUID. Every event's `meta` carries `fluentd-tag` and `fluentd-time` (ns).
"""

from __future__ import annotations

import asyncio
import base64
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
from typing import Any, Literal, Self

import msgpack
import orjson
from pydantic import Field, SecretStr, model_validator

from infer_logger.cloudevents.event import SPECVERSION, CloudEvent
from infer_logger.cloudevents.json_format import from_dict
from infer_logger.cloudevents.validation import validate
from infer_logger.errors import InvalidEventError
from infer_logger.sinks.base import Sink
from pipelines.sources.base import SourceConfig
from infer_logger.sinks.fluentd import (
    as_bytes,
    password_digest,
    shared_key_digest,
    time_ns,
)

log = logging.getLogger(__name__)

_NS = 1_000_000_000
_READ_SIZE = 256 * 1024
_PIECE = 256 * 1024  # most bytes of entries given to an unpacker at once
_MAX_ENTRIES = 10_000


class FrameError(ValueError):
    """A frame that breaks the Forward protocol; its connection is closed."""


class ForwardSourceConfig(SourceConfig):
    type: Literal["forward"] = "forward"
    host: str = "127.0.0.1"
    """Address to listen on (0.0.0.0 for every interface)."""
    port: int = Field(24224, ge=0, le=65535)
    """TCP port; 0 picks a free one (see `ForwardSource.port`)."""
    shared_key: SecretStr | None = None
    """Require the shared-key handshake (Fluentd's `<security> shared_key`)."""
    self_hostname: str = Field(default_factory=socket.gethostname)
    """Our name in PONG."""
    users: dict[str, SecretStr] = {}
    """username -> password; when set, PING must also authenticate one of them."""
    handshake_timeout: float = Field(10.0, gt=0)
    """Seconds a client has to send PING after HELO."""
    max_frame_bytes: int = Field(32 << 20, ge=1024)
    """Largest frame as sent, and largest decompressed entries; a bigger one closes the connection."""
    max_frame_entries: int = Field(_MAX_ENTRIES, ge=1)
    """Most records per batch handed to the subscriber; a frame with more goes in several, its chunk
    acked after the last. max_frame_bytes cannot bound what entries become (a 3-byte entry is a ~1 KB
    CloudEvent); this bounds how many are held at once. Also the most gzip members that end no entry
    a frame may have (empty ones cost work and carry nothing)."""
    record_type: str = "io.fluentd.record"
    """CloudEvents `type` of records that are not CloudEvents themselves."""
    source_uri: str | None = None
    """Their `source`; default `fluent-forward://<host>:<port>`."""

    @model_validator(mode="after")
    def _users_need_key(self) -> ForwardSourceConfig:
        if self.users and self.shared_key is None:
            raise ValueError("users: user authentication happens in the shared-key handshake; set shared_key")
        return self

    def build(self, subscriber: Sink) -> ForwardSource:
        return ForwardSource(self, subscriber)


Entry = tuple[int, dict[Any, Any]]  # (time in ns, record)


@dataclass(frozen=True, slots=True)
class Frame:
    """A frame's tag and chunk, and its entries: checked and (PackedForward) unpacked as they are
    iterated, once, so iterating can raise FrameError too."""

    tag: str
    entries: Iterable[Entry]
    chunk: str | None

    def slices(self, size: int) -> Iterator[list[Entry]]:
        """The entries, `size` at a time."""
        entries = iter(self.entries)
        while batch := list(itertools.islice(entries, size)):
            yield batch


def _unpacker(limit: int) -> msgpack.Unpacker:
    # surrogateescape: PackedForward entries may arrive as str holding binary msgpack; as_bytes()
    # gets the exact bytes back. Non-string map keys are the record's business, not a protocol error.
    return msgpack.Unpacker(raw=False, unicode_errors="surrogateescape", strict_map_key=False,
                            max_buffer_size=limit)


class _Messages:
    """A connection's byte stream as msgpack messages of at most `limit` bytes each.

    The Unpacker's buffer limit cannot say this: it parses as far as the bytes go and drops what
    it parsed, so its buffer holds only the unfinished item (a frame of many small entries grew
    without bound), and it holds whatever follows in the same read (a frame just under the limit
    followed by the next one's start was BufferFull). So frames are measured here.
    """

    def __init__(self, limit: int) -> None:
        self._limit = limit
        self._unpacker = _unpacker(limit + _READ_SIZE)  # room for one read past an unfinished frame
        self._fed = 0  # bytes fed so far
        self._start = 0  # where the unfinished message starts

    def feed(self, data: bytes) -> None:
        self._unpacker.feed(data)
        self._fed += len(data)

    def __iter__(self) -> Self:
        return self

    def __next__(self) -> Any:
        try:
            message = next(self._unpacker)
        except StopIteration:
            self._check(self._fed)
            raise
        end = self._unpacker.tell()  # exact after a whole message (not after a failed attempt)
        self._check(end)
        self._start = end
        return message

    def _check(self, end: int) -> None:
        if end - self._start > self._limit:
            raise FrameError(_TOO_BIG)


_TOO_BIG = "frame exceeds max_frame_bytes"


def parse_frame(message: object, limit: int, max_entries: int = _MAX_ENTRIES) -> Frame:
    """A decoded Forward message as (tag, entries, chunk); FrameError says what is wrong with the
    frame, and iterating its entries what is wrong with them. `limit` bounds the inflated entries,
    `max_entries` the gzip members that end no entry."""
    if not isinstance(message, list) or not 2 <= len(message) <= 4:
        raise FrameError(f"a frame is an array of 2 to 4 items, not {_describe(message)}")
    tag, second = message[0], message[1]
    if not isinstance(tag, str) or not tag:
        raise FrameError(f"the tag must be a non-empty string, not {_describe(tag)}")
    try:
        entries: Iterable[Entry]
        if isinstance(second, list):  # Forward mode
            option = _option(message, 2)
            entries = _entries(second)
        elif isinstance(second, bytes | str):  # PackedForward, maybe compressed
            option = _option(message, 2)
            raw = as_bytes(second)
            compressed = option.get("compressed")
            if compressed == "gzip":
                entries = _entries(_unpacked(_inflate(raw, limit), limit, max_entries))
            elif compressed in (None, "text"):
                entries = _entries(_unpacked(_pieces(raw), limit, max_entries))
            else:
                raise FrameError(f"unknown compression {compressed!r}")
        else:  # Message mode
            if len(message) < 3:
                raise FrameError("a Message mode frame is [tag, time, record, option?]")
            option = _option(message, 3)
            entries = [(time_ns(second), _record(message[2]))]
    except (TypeError, ValueError, OverflowError, msgpack.UnpackException) as exc:
        raise exc if isinstance(exc, FrameError) else FrameError(str(exc)) from exc
    chunk = option.get("chunk")
    if chunk is not None and not isinstance(chunk, str):
        raise FrameError(f"the chunk option must be a string, not {_describe(chunk)}")
    return Frame(tag, entries, chunk)


def _option(message: list[Any], index: int) -> dict[Any, Any]:
    if len(message) > index + 1:
        raise FrameError(f"{len(message)} items is too many for this mode")
    option = message[index] if len(message) > index else None
    if option is None:
        return {}
    if not isinstance(option, dict):
        raise FrameError(f"the option must be a map, not {_describe(option)}")
    return option


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
    return time_ns(item[0]), _record(item[1])


def _record(value: object) -> dict[Any, Any]:
    if not isinstance(value, dict):
        raise FrameError(f"a record is a map, not {_describe(value)}")
    return value


def _pieces(raw: bytes) -> Iterator[memoryview]:
    view = memoryview(raw)
    for start in range(0, len(raw), _PIECE):
        yield view[start:start + _PIECE]


def _unpacked(pieces: Iterable[bytes | memoryview], limit: int, max_idle: int) -> Iterator[Any]:
    """The msgpack items of packed entries given in pieces, each as soon as it is whole. An empty
    piece ends a gzip member; more than `max_idle` members that end no item are refused (each costs
    work, and 32 MiB holds 1.6 million empty ones)."""
    unpacker = _unpacker(limit + _PIECE)  # one entry of at most `limit` bytes, and a piece
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


def _inflate(raw: bytes, limit: int) -> Iterator[bytes]:
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
    text = repr(value)
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
    bytes were bad, and map keys orjson takes no fallback for (bin, ext) as strings."""
    if isinstance(value, str):
        return value.encode("utf-8", "surrogateescape").decode("utf-8", "replace")
    if isinstance(value, dict):
        return {_key(k): _scrub(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_scrub(v) for v in value]
    return value


def _key(key: Any) -> Any:
    if isinstance(key, bytes):
        # A name, not a blob: msgpack-ruby writes ASCII-8BIT strings as bin, so "host" stays "host".
        return key.decode("utf-8", "replace")
    if isinstance(key, msgpack.ExtType | msgpack.Timestamp):
        value = _jsonable(key)
        return value if isinstance(value, str) else orjson.dumps(value).decode()
    return _scrub(key)  # str; int, float, bool and None OPT_NON_STR_KEYS writes


def _json(record: dict[Any, Any]) -> bytes:
    options = orjson.OPT_NON_STR_KEYS
    try:
        data = orjson.dumps(record, default=_jsonable, option=options)
    except orjson.JSONEncodeError:
        try:
            data = orjson.dumps(_scrub(record), default=_jsonable, option=options)
        except orjson.JSONEncodeError as exc:  # e.g. nested deeper than orjson goes
            raise FrameError(f"a record JSON cannot hold: {exc}") from exc
    # orjson's bytes keep its 4 KiB starting buffer: a copy holds a small record's JSON in its own
    # size (100k tiny records held 400 MB, not 4).
    return memoryview(data).tobytes() if len(data) < 4096 else data


class ForwardSource:
    """The server; counters are plain attributes (`connections`, `frames`, `records`, `acks`...)."""

    def __init__(self, config: ForwardSourceConfig, subscriber: Sink) -> None:
        self.config = config
        self.subscriber = subscriber
        self.port = config.port  # the bound one after start()
        self.connections = 0
        self.frames = 0
        self.records = 0
        self.acks = 0
        self.errors = 0  # connections closed for a bad frame, a failed handshake, a refused batch
        self.auth_failures = 0
        self.invalid_events = 0  # CloudEvent-looking records that failed validation (kept as records)
        self._server: asyncio.Server | None = None
        self._tasks: set[asyncio.Task[Any]] = set()
        self._stopped = asyncio.Event()
        self._closing = False
        self._packer = msgpack.Packer(use_bin_type=True)

    @property
    def source_uri(self) -> str:
        return self.config.source_uri or f"fluent-forward://{self.config.host}:{self.port}"

    async def start(self) -> None:
        if self._server is None:
            self._stopped.clear()
            self._server = await asyncio.start_server(self._serve, self.config.host, self.config.port)
            self.port = int(self._server.sockets[0].getsockname()[1])
            log.info("forward source listening on %s:%s", self.config.host, self.port)

    async def run(self) -> None:
        """Serve until `aclose()`."""
        await self.start()
        await self._stopped.wait()

    def stop(self) -> None:
        """Stop accepting; `run` returns once `aclose` has ended the connections."""
        if self._server is not None:
            self._server.close()

    async def aclose(self) -> None:
        if self._server is not None:
            self._closing = True
            self._server.close()
            for task in list(self._tasks):  # a batch in flight is not acked: the client resends it
                task.cancel()
            await asyncio.gather(*self._tasks, return_exceptions=True)
            await self._server.wait_closed()
            self._server = None
            self._closing = False
        self._stopped.set()

    async def __aenter__(self) -> Self:
        await self.start()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.aclose()

    # -- one connection ---------------------------------------------------------------------

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        assert task is not None
        self._tasks.add(task)
        self.connections += 1
        peer = writer.get_extra_info("peername")
        messages = _Messages(self.config.max_frame_bytes)
        try:
            if self.config.shared_key is not None and not await self._handshake(
                    reader, writer, messages, peer):
                return
            while True:
                # Frames first: some may have come in the handshake's last read, behind its PING.
                for message in messages:
                    frame = parse_frame(message, self.config.max_frame_bytes, self.config.max_frame_entries)
                    await self._take(frame, writer)
                if not (data := await reader.read(_READ_SIZE)):
                    break
                messages.feed(data)
        except msgpack.BufferFull:  # _Messages refuses first; kept as the backstop it was
            self._close_for(peer, f"bad frame: {_TOO_BIG}")
        except (FrameError, msgpack.UnpackException, ValueError, OverflowError, TypeError) as exc:
            # ValueError/OverflowError: msgpack's own, and times no calendar holds; TypeError:
            # msgpack's for a map key Python cannot hash (an array or a map)
            self._close_for(peer, f"bad frame: {str(exc) or type(exc).__name__}")
        except _Refused as exc:
            self._close_for(peer, f"subscriber refused the batch, not acked: {exc.__cause__!r}")
        except TimeoutError:
            self._close_for(peer, "no PING within handshake_timeout")
        except OSError:
            pass  # the client went away
        except asyncio.CancelledError:
            # aclose() ends connections by cancelling them; finishing normally keeps asyncio's
            # stream callback from logging the cancellation as an error.
            if not self._closing:
                raise
        finally:
            self._tasks.discard(task)
            writer.transport.abort()

    def _close_for(self, peer: object, reason: str) -> None:
        self.errors += 1
        log.warning("forward source: closing connection from %s: %s", peer, reason)

    async def _take(self, frame: Frame, writer: asyncio.StreamWriter) -> None:
        self.frames += 1
        for events in self.batches(frame):
            if events:
                try:
                    await self.subscriber.send_batch(events)
                except asyncio.CancelledError:
                    raise
                except Exception as exc:
                    raise _Refused() from exc
                self.records += len(events)
            await asyncio.sleep(0)  # a frame of many batches lets other connections in between
        if frame.chunk is not None:
            writer.write(self._packer.pack({"ack": frame.chunk}))
            await writer.drain()
            self.acks += 1

    def batches(self, frame: Frame) -> Iterator[list[CloudEvent]]:
        """The frame's records as CloudEvents (see the module docstring), `max_frame_entries` at a
        time, each batch unpacked and converted when asked for; FrameError if one cannot be."""
        meta_tag = {"fluentd-tag": frame.tag}
        checked = False  # records that are no CloudEvents: is the frame's first one valid?
        start = 0  # the slice's first index
        for entries in frame.slices(self.config.max_frame_entries):
            events = []
            for index, (ns, record) in enumerate(entries, start):
                meta = {**meta_tag, "fluentd-time": str(ns)}
                if "specversion" in record:
                    try:
                        event = from_dict(record)
                    except (TypeError, ValueError) as exc:  # also data JSON cannot hold: bin, ext, int keys
                        self.invalid_events += 1
                        log.debug("forward source: %s record is no valid CloudEvent (%s); kept as a record",
                                  frame.tag, exc)
                    else:
                        events.append(CloudEvent(event.attributes, event.data, meta))
                        continue
                event_id = f"{frame.chunk}-{index}" if frame.chunk else str(uuid.uuid4())
                attributes: dict[str, str | int | bool] = {
                    "specversion": SPECVERSION, "id": event_id, "source": self.source_uri,
                    "type": self.config.record_type, "subject": frame.tag, "time": rfc3339(ns),
                    "datacontenttype": "application/json",
                }
                event = CloudEvent(attributes, _json(record), meta)
                if not checked:
                    # Only id and time differ between these events, and both are ours (`<chunk>-<n>`
                    # or a UUID; rfc3339's own output), so the first one vouches for the rest:
                    # validation is most of this loop's cost.
                    try:
                        validate(event)
                    except InvalidEventError as exc:  # e.g. a tag with control characters as subject
                        raise FrameError(f"record {index} makes no valid CloudEvent: {exc}") from exc
                    checked = True
                events.append(event)
            start += len(entries)
            yield events

    def to_events(self, frame: Frame) -> list[CloudEvent]:
        """All the frame's records as CloudEvents at once (see `batches`)."""
        return [event for batch in self.batches(frame) for event in batch]

    async def _handshake(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter,
                         messages: _Messages, peer: object) -> bool:
        assert self.config.shared_key is not None
        key = self.config.shared_key.get_secret_value()
        nonce = os.urandom(16)
        auth_salt = os.urandom(16) if self.config.users else b""
        # An empty `auth` (str, as Fluentd sends it) tells the client no user auth is wanted.
        writer.write(self._packer.pack(["HELO", {"nonce": nonce, "auth": auth_salt or "", "keepalive": True}]))
        async with asyncio.timeout(self.config.handshake_timeout):
            ping = await _next_message(reader, messages)
        reason = self._check_ping(ping, nonce, auth_salt, key)
        hostname = self.config.self_hostname
        digest = "" if reason else shared_key_digest(as_bytes(ping[2]), hostname, nonce, key)
        writer.write(self._packer.pack(["PONG", not reason, reason, hostname, digest]))
        await writer.drain()
        if reason:
            self.auth_failures += 1
            self._close_for(peer, f"handshake failed: {reason}")
            return False
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


class _Refused(Exception):
    """The subscriber raised (the cause); the frame is not acked."""


async def _next_message(reader: asyncio.StreamReader, messages: _Messages) -> Any:
    while True:
        try:
            return next(messages)
        except StopIteration:
            pass
        data = await reader.read(_READ_SIZE)
        if not data:
            raise ConnectionResetError("closed during the handshake")
        messages.feed(data)

"""`fluentd` sink: events to Fluentd (or anything speaking Forward protocol v1), acknowledged.

Why not fluent-logger: its senders speak Message mode only and never ask for an ack, so `emit()`
returns True for a record that went into a socket buffer nobody read. A sink may only return once
its events are durably elsewhere (the spool checkpoint moves then), so this sink speaks the
protocol itself with msgpack: PackedForward frames, per tag and of at most `max_frame_bytes` of
entries and `max_frame_events` events, each carrying a random `chunk` id, then it waits for every
`{"ack": chunk}`, which Fluentd's in_forward sends once the records are in its buffer (what
out_forward's `require_ack_response` relies on). It waits as long as the receiver takes bytes or
acks a frame within `timeout` of the last time, so a slow but steady receiver gets the batch
through; one silent that long raises SinkError: the batch stays in the spool and is sent again.
Delivery is at least once; Elasticsearch upserts by event id behind Fluentd, so a resend
overwrites instead of duplicating. `ack: false` skips the wait (fire and forget, what
fluent-logger gives), but not what the server says: a HELO (it wants the shared-key handshake)
raises SinkError, then for every batch after it; a new connection without `shared_key` waits up to
100 ms for one before its first frame.

A receiver that will not take a frame (over Fluent Bit's Buffer_Max_Size, the forward source's
max_frame_bytes) says so by closing the connection. After it closes on a frame of 64 KiB or more
not acked, frames stay below half its size (and event count) for 5 minutes, down to one event a
frame. An event over 1 MiB, and bigger than any frame the receiver acked, closed on alone becomes
a suspect: from then on it goes alone after the batch's other frames, written once they are all
acked (without acks: written with the connection still open), and closed on so 3 times it is
refused for good (RejectedError, too_large: dead-lettered) instead of blocking the spool for ever.
A receiver closes for other reasons too (the forward source on a batch its subscriber failed to
take, a restart): then the frames before the suspect are not acked either, and that close strikes
nothing. A suspect alone in its batch goes, after a close, behind a small event (under 64 KiB)
the receiver acked before, sent again as the witness (a duplicate when taken, which the id-keyed
store downstream overwrites; at most 10 per suspect, and none after 100 tries closed on at it: a
long outage, or a limit below even its size); with no such event (none acked since the start) or
none left, each close strikes it. A silence is no evidence of size (a receiver under
backpressure is silent too): Fluentd's in_forward drops a chunk over its chunk_size_limit without
a word, and such a frame is sent again, without a witness, until its limit is raised.

Tags are `<prefix>.<inferenceservicename>.<request|response|explanation>`; times are EventTime
(nanoseconds) taken from the event's `time`, or integer seconds for one before 1970 or from 2106 on,
which EventTime cannot hold. An event that cannot be packed is refused for good (RejectedError).
The record is the event in the CloudEvents JSON format (`to_dict`): attributes at the top, `data`
for JSON (parsed) or text, `data_base64` for anything else, so `from_dict` rebuilds the same event
(JSON data comes back compact) and Fluentd filters address fields by name. JSON data nested deeper
than orjson writes (254 levels; it reads 1024) goes as `data_base64` too: a receiver rebuilding the
event writes it again (the forward source with orjson), and msgpack nests at most 1024 levels.
`pipelines.sources.forward` is the receiving end and shares the protocol pieces below.
"""

from __future__ import annotations

import asyncio
import base64
import gzip
import hashlib
import logging
import os
import re
import socket
import struct
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, Literal, NamedTuple

import msgpack
import orjson
from pydantic import Field, SecretStr

from infer_logger.asgi import READ_RATE_ALLOWANCE
from infer_logger.cloudevents.event import CloudEvent
from infer_logger.cloudevents.json_format import to_dict
from infer_logger.cloudevents.validation import parse_time
from infer_logger.errors import InvalidEventError, RejectedError, SinkError
from infer_logger.fields import Seconds
from infer_logger.sinks.base import SinkConfig

log = logging.getLogger(__name__)

# -- Forward protocol v1 pieces, shared with pipelines.sources.forward --------------------------

EVENT_TIME_CODE = 0  # msgpack ext type of EventTime: uint32 seconds, uint32 nanoseconds, big-endian
_NS = 1_000_000_000
_FRACTION = re.compile(r"\.(\d+)", re.ASCII)
_TAG_UNSAFE = re.compile(r"[^a-z0-9_-]+")
_KINDS = {"request", "response", "explanation"}


def event_time(ns: int) -> msgpack.ExtType | int:
    """EventTime; integer seconds (the spec's other time) when its unsigned 32-bit seconds cannot
    hold the time: before 1970 or from 2106 on."""
    seconds = ns // _NS
    if 0 <= seconds < 1 << 32:
        return msgpack.ExtType(EVENT_TIME_CODE, struct.pack(">II", seconds, ns % _NS))
    return seconds


def time_ns(value: object) -> int:
    """Nanoseconds since the epoch from a Forward time: EventTime, integer or float seconds.

    Raises TypeError, ValueError or OverflowError for anything else.
    """
    if isinstance(value, msgpack.ExtType):
        if value.code != EVENT_TIME_CODE or len(value.data) != 8:
            raise ValueError(f"ext type {value.code} of {len(value.data)} bytes is not an EventTime")
        seconds, nanos = struct.unpack(">II", value.data)
        if nanos >= _NS:  # not a time: taken, it moved the event up to 4 s later
            raise ValueError(f"an EventTime's nanoseconds are below 10**9, not {nanos}")
        return int(seconds) * _NS + int(nanos)
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise TypeError(f"a time is an EventTime or a number, not {type(value).__name__}")
    if isinstance(value, float):
        whole = int(value)  # OverflowError/ValueError on inf and nan
        return whole * _NS + round((value - whole) * _NS)
    return value * _NS


def shared_key_digest(salt: bytes, hostname: str, nonce: bytes, key: str) -> str:
    """sha512_hex(shared_key_salt + hostname + nonce + shared_key): PING's and PONG's proof.

    Over the bytes as sent: a hostname that is not UTF-8 (read with surrogateescape) raised
    UnicodeEncodeError, and its PING got no PONG.
    """
    return hashlib.sha512(salt + as_bytes(hostname) + nonce + as_bytes(key)).hexdigest()


def password_digest(auth_salt: bytes, username: str, password: str) -> str:
    return hashlib.sha512(auth_salt + as_bytes(username) + as_bytes(password)).hexdigest()


def as_bytes(value: object) -> bytes:
    """A bin-or-str protocol field as bytes (str fields are read with surrogateescape)."""
    if isinstance(value, bytes):
        return value
    if isinstance(value, str):
        return value.encode("utf-8", "surrogateescape")
    raise ValueError(f"expected bin or str, got {type(value).__name__}")


def tag_for(event: CloudEvent, prefix: str) -> str:
    """`<prefix>.<service>.<kind>`.

    fluent.conf names the index after the service part, so it is cleaned the way the
    `elasticsearch` sink cleans index names (lower case, odd characters as `-`, empty as
    `unknown`); a dot would also shift Fluentd's tag routing.
    """
    service = _TAG_UNSAFE.sub("-", str(event.get("inferenceservicename") or "").lower()) or "unknown"
    kind = event.type.rsplit(".", 1)[-1]
    kind = kind if kind in _KINDS else _TAG_UNSAFE.sub("-", kind.lower()) or "unknown"
    return f"{prefix}.{service}.{kind}"


def event_ns(event: CloudEvent) -> int:
    """The event's `time` in nanoseconds (now when it has none or it is unreadable)."""
    value = event.get("time")
    if isinstance(value, str):
        try:
            whole = parse_time(value).replace(microsecond=0).timestamp()
        except InvalidEventError:
            return time.time_ns()
        match = _FRACTION.search(value)
        nanos = int(match.group(1)[:9].ljust(9, "0")) if match else 0
        return int(whole) * _NS + nanos
    return time.time_ns()


# -- the sink -----------------------------------------------------------------------------------


class FluentdSinkConfig(SinkConfig):
    type: Literal["fluentd"] = "fluentd"
    host: str = "127.0.0.1"
    """Fluentd's `forward` input."""
    port: int = Field(24224, ge=1, le=65535)
    tag_prefix: str = Field("inference", pattern=r"^[A-Za-z0-9_-]+(\.[A-Za-z0-9_-]+)*$")
    """Tags are `<tag_prefix>.<inferenceservicename>.<request|response|explanation>`."""
    ack: bool = True
    """Wait for Fluentd's ack of every chunk (`require_ack_response`); off = fire and forget."""
    timeout: Seconds = Field(10.0, gt=0)
    """Seconds for connecting (with the handshake), and that a batch's sending may go without the
    receiver taking bytes or acking a frame (a slow but steady receiver is waited for)."""
    compress: bool = False
    """Send CompressedPackedForward (gzip) frames."""
    shared_key: SecretStr | None = None
    """Fluentd's `<security> shared_key`: do the HELO/PING/PONG handshake on connect."""
    self_hostname: str = Field(default_factory=socket.gethostname)
    """Our name in the handshake (Fluentd's `self_hostname`)."""
    username: str = ""
    """For a Fluentd with `user_auth true` (with `shared_key`)."""
    password: SecretStr = SecretStr("")
    max_frame_bytes: int = Field(6_144_000, ge=1024)
    """Most bytes of entries (before gzip) in one PackedForward frame: a batch's events of one tag
    go in as many frames (chunks, each acked) as it takes; an event bigger than this goes alone.
    Receivers refuse big frames by closing the connection: Fluent Bit's in_forward over its
    Buffer_Max_Size (6,144,000 bytes by default, hence this default), the forward source over its
    own max_frame_bytes (32 MiB); the sink then sends smaller frames for a while (see the module
    docstring). Fluentd drops a chunk over its chunk_size_limit without a word: raise that limit."""
    max_frame_events: int = Field(100, ge=1)
    """Most events in one frame. Each frame is acked on its own, and an ack is how the receiver
    shows progress: it must take this many events within `timeout` (the forward source acks a frame
    once its subscriber took them all)."""

    def build(self) -> FluentdSink:
        return FluentdSink(self)


@dataclass(slots=True)
class _Suspect:
    """A big event the receiver closed on alone (see the module docstring)."""

    strikes: int = 0  # closes right after the receiver took the frames before it
    witnessed: int = 0  # witnesses sent before it the receiver took (each a duplicate)
    witness_cut: int = 0  # ... it closed on
    closed: bool = True  # its last try ended in a close, not a silence: a witness may tell why
    struck_at: float = float("-inf")  # when an unvouched close last struck it


class _Frame(NamedTuple):
    chunk: str  # its `chunk` option ("" without acks)
    data: bytes  # the PackedForward frame
    events: list[CloudEvent]  # what it carries: pending again until its ack came (none: the witness)
    size: int  # bytes of entries (before gzip), what max_frame_bytes bounds
    suspect: bool = False  # a lone event cut off before: written once the frames before it are taken
    unvouched: bool = False  # a suspect alone with no witness to go before it: a close strikes it


_WRITE_PIECE = 64 * 1024  # bytes written between looks at the receiver's progress
_MAX_JSON_DEPTH = 254  # orjson writes no deeper (it reads 1024)
# A receiver refuses a frame too big by closing the connection (a silence is no evidence):
_SUSPECT_BYTES = 64 * 1024  # a frame this big it closed on may have been too big: later ones go smaller
_SHRUNK_FOR = 300.0  # seconds frames stay smaller after one was cut off (then one full size tries again)
_LONE_BYTES = 1 << 20  # an event over this (and anything the receiver acked) cut off alone...
_LONE_TRIES = 3  # ... this many times, right after the frames before it were taken, is refused for good
_WITNESS_TRIES = 10  # witnesses of a suspect alone the receiver took (each a duplicate); then none
_WITNESS_CUTS = 100  # ... it closed on (down, or its limit now below even the witness's); then none
_UNVOUCHED_APART = 60.0  # seconds between two closes that strike a suspect with no witness
_HELO_WAIT = 0.1  # seconds a new connection without acks waits for a HELO before its first frame


def _record(event: CloudEvent) -> dict[str, Any]:
    """`to_dict`, with JSON data nested deeper than _MAX_JSON_DEPTH as `data_base64` (the same bytes
    for `from_dict`): the forward source could not write it again, so it refused the frame and the
    batch was resent for ever; past 1023 levels msgpack could not pack it."""
    record = to_dict(event)
    data = record.get("data")
    raw = event.data or b""
    # Counting brackets is cheap and bounds the depth: most events need no second look.
    if isinstance(data, list | dict) and raw.count(b"[") + raw.count(b"{") > _MAX_JSON_DEPTH:
        try:
            orjson.dumps(data)
        except orjson.JSONEncodeError:
            del record["data"]
            record["data_base64"] = base64.b64encode(raw).decode("ascii")
    return record


_TOO_LARGE = "too large for the receiver"


def _key(event: CloudEvent) -> tuple[str, str, str]:
    """An event across retries (request, response and explanation share an id)."""
    return event.id, str(event.get("source")), event.type


def _split(entries: list[bytes], max_bytes: int, max_entries: int) -> list[list[bytes]]:
    """Packed entries in runs of at most `max_bytes` and `max_entries`; a bigger entry alone."""
    groups: list[list[bytes]] = []
    group: list[bytes] = []
    size = 0
    for entry in entries:
        if group and (size + len(entry) > max_bytes or len(group) == max_entries):
            groups.append(group)
            group, size = [], 0
        group.append(entry)
        size += len(entry)
    if group:
        groups.append(group)
    return groups


class FluentdSink:
    """One connection, opened lazily and again after any failure; its counters (`stats()`) go to
    /metrics as `infer_logger_sink_client_events_total`."""

    def __init__(self, config: FluentdSinkConfig) -> None:
        self.config = config
        self.address = f"{config.host}:{config.port}"
        self.records = 0  # acked (or, with ack off, written)
        self.frames = 0
        self.errors = 0  # batches that failed: refused, cut off, unacked, handshake refused
        self.connects = 0  # connections established (handshake included)
        self.reconnects = 0  # ... of which after an earlier one was lost
        self._reader: asyncio.StreamReader | None = None
        self._writer: asyncio.StreamWriter | None = None
        self._unpacker = msgpack.Unpacker()
        self._packer = msgpack.Packer(use_bin_type=True)
        self._lock = asyncio.Lock()  # one connection: batches take turns
        self._watcher: asyncio.Task[None] | None = None  # without acks, what reads the server's words
        self._wants_handshake: str | None = None  # a HELO came without acks: every batch fails so
        self._max_bytes, self._max_events = config.max_frame_bytes, config.max_frame_events
        self._shrunk_until = 0.0  # loop time the smaller bounds last until
        self._largest_acked = 0  # entry bytes of the biggest frame the receiver acked
        self._suspects: dict[tuple[str, str, str], _Suspect] = {}  # big events cut off alone
        self._witness: CloudEvent | None = None  # a small event acked: sent again before a suspect alone
        self._witness_size = 0
        self._witness_for: _Suspect | None = None  # the suspect of this try's witness
        self._started = 0  # frames of the current try whose writing began
        self._vouched: set[int] = set()  # ... of which suspects written once the frames before were taken
        self._unacked: dict[str, int] = {}  # the current try's bytes written per chunk not acked yet

    def stats(self) -> dict[str, int]:
        return {"records": self.records, "frames": self.frames, "errors": self.errors,
                "connects": self.connects, "reconnects": self.reconnects}

    async def send_batch(self, events: Sequence[CloudEvent]) -> None:
        if not events:
            return
        try:
            frames, refused = self._frames(events)
        except (ValueError, TypeError, OverflowError) as exc:  # no retry could pack it either
            raise RejectedError(f"fluentd sink: cannot pack the batch: {type(exc).__name__}: {exc}") from exc
        if frames:
            await self._send(frames, [event for event, _ in refused])
        self.records += len(events) - len(refused)
        if refused:
            event, reason = refused[0]
            too_large = all(why.startswith(_TOO_LARGE) for _, why in refused)
            what = "refused" if too_large else "cannot be packed"
            raise RejectedError(f"fluentd sink: {len(refused)} event(s) {what}, e.g. {event.id}: {reason}",
                                [event for event, _ in refused], too_large=too_large,
                                reasons=[why for _, why in refused])

    async def _send(self, frames: list[_Frame], unpacked: list[CloudEvent]) -> None:
        """Send and, with acks, wait for each frame's. A failure names as `pending` the events of
        the frames not acked (and `unpacked`, refused once the rest is through): acked frames are
        not sent again."""
        unacked = {frame.chunk for frame in frames}
        try:
            async with self._lock:
                try:
                    writer = await self._connected()
                    await self._deliver(writer, frames, unacked)
                except BaseException:  # also a cancel or a bug mid-frame: no half frame may stay
                    self._fail()
                    raise
        except (SinkError, OSError, ValueError, msgpack.UnpackException) as exc:  # OSError: TimeoutError too
            pending = self._pending(frames, unacked, unpacked)  # the acks that came count first
            # The receiver closed on frames it was sent: how it refuses one too big. A silence
            # (our timeout) is no evidence: a stalled receiver (backpressure) is silent too.
            if isinstance(exc, OSError) and not isinstance(exc, TimeoutError) and self._started:
                self._cut_off(frames, unacked)
            elif isinstance(exc, TimeoutError):  # a silence: no witness for it next time (no close to test)
                for suspect in self._suspects_in(frames):
                    suspect.closed = False
            if isinstance(exc, SinkError):
                exc.pending = pending
                raise
            if isinstance(exc, TimeoutError):
                silent = "took no bytes and acked nothing" if self.config.ack else "took no bytes"
                reason = f"{silent} for {self.config.timeout} s" + (
                    " (and a second per MiB written and not acked)" if self.config.ack else "")
            else:
                reason = f"{type(exc).__name__}: {exc}"
            raise SinkError(f"fluentd at {self.address}: {reason}", pending=pending) from exc
        self.frames += len(frames)
        self._acked(frames)

    def _cut_off(self, frames: list[_Frame], unacked: set[str]) -> None:
        """The receiver closed on frames written but not acked (without acks: the last one begun):
        they may have been too big for it. Later ones go smaller for a while; a big event alone
        becomes a suspect, and a suspect takes a strike when the receiver took the frames before it.

        The shrink needs no such evidence: a big frame first in its batch has no frame before it
        to be taken, and must still get smaller to pass. An outage shrinks frames for a while (more
        acks, nothing lost); once a big event is a suspect, the frames before it fail first."""
        written = range(self._started)
        cut = [i for i in written if frames[i].chunk in unacked] if self.config.ack else list(written)[-1:]
        # The witness was taken before at its size: its cut-off says nothing about size.
        if sized := [frames[i] for i in cut if frames[i].events]:
            biggest = max(sized, key=lambda f: f.size)
            if biggest.size >= _SUSPECT_BYTES:
                self._max_bytes = max(1, min(self._max_bytes, biggest.size) // 2)
                self._max_events = max(1, min(self._max_events, max(len(f.events) for f in sized)) // 2)
                self._shrunk_until = time.monotonic() + _SHRUNK_FOR
                log.warning("fluentd sink: a frame of %d bytes to %s was cut off or not acked: frames of at "
                            "most %d bytes and %d events for %g s", biggest.size, self.address,
                            self._max_bytes, self._max_events, _SHRUNK_FOR)
        if not cut:
            return
        # Closed: a witness may tell next time whether the receiver takes other frames.
        for suspect in self._suspects_in(frames):
            suspect.closed = True
        first = frames[cut[0]]  # the receiver takes frames in order: the one it stopped at
        if not first.events and self._witness_for is not None:  # the witness
            self._witness_for.witness_cut += 1
        if len(first.events) == 1 and first.size > max(_LONE_BYTES, self._largest_acked):
            key = _key(first.events[0])
            if key not in self._suspects:
                if len(self._suspects) >= 1000:  # bounded: stale entries go
                    self._suspects.clear()
                self._suspects[key] = _Suspect()  # no evidence yet: a close for any reason makes one
            elif cut[0] in self._vouched:
                suspect = self._suspects[key]
                if first.unvouched:
                    # No witness: a close for any reason looks alike (a sidecar's first event, big,
                    # through a short outage downstream was dead-lettered within a second), so
                    # only closes far apart strike: one too large is refused after minutes.
                    if (now := time.monotonic()) - suspect.struck_at < _UNVOUCHED_APART:
                        return
                    suspect.struck_at = now
                suspect.strikes += 1

    def _suspects_in(self, frames: list[_Frame]) -> list[_Suspect]:
        found = (self._suspects.get(_key(f.events[0])) for f in frames if f.suspect)
        return [suspect for suspect in found if suspect is not None]

    def _acked(self, frames: list[_Frame]) -> None:
        for frame in frames:
            self._largest_acked = max(self._largest_acked, frame.size)
            if not frame.events and self._witness_for is not None:  # the witness: a duplicate downstream
                self._witness_for.witnessed += 1
            # The smallest: one the receiver may no longer take is closed on instead of the suspect.
            if frame.events and frame.size < _SUSPECT_BYTES and (self._witness is None
                                                                 or frame.size <= self._witness_size):
                self._witness, self._witness_size = frame.events[0], frame.size
            if self._suspects and len(frame.events) == 1:
                self._suspects.pop(_key(frame.events[0]), None)

    def _pending(self, frames: list[_Frame], unacked: set[str],
                 unpacked: list[CloudEvent]) -> list[CloudEvent]:
        """What a failed try sends again; the frames acked in it count as sent (once per try)."""
        if not self.config.ack:  # nothing tells what was taken: all of it again
            return []
        taken = [frame for frame in frames if frame.chunk not in unacked]
        self._acked(taken)
        self.frames += len(taken)  # counted now: they are not sent again
        self.records += sum(len(frame.events) for frame in taken)
        return [event for frame in frames if frame.chunk in unacked for event in frame.events] + unpacked

    def _frames(self, events: Sequence[CloudEvent]) -> tuple[list[_Frame], list[tuple[CloudEvent, str]]]:
        """The PackedForward frames per tag, max_frame_bytes and max_frame_events, in the batch's
        order but suspects last, each alone; and the events that cannot be packed, with why (no
        retry could: dead-lettered)."""
        by_tag: dict[str, tuple[list[bytes], list[CloudEvent]]] = {}
        suspects: list[tuple[str, bytes, CloudEvent]] = []
        refused = []
        if self._shrunk_until and time.monotonic() > self._shrunk_until:  # a while is over: full size again
            self._max_bytes, self._max_events = self.config.max_frame_bytes, self.config.max_frame_events
            self._shrunk_until = 0.0
        for event in events:
            suspect = self._suspects.get(_key(event))
            if suspect is not None and suspect.strikes >= _LONE_TRIES:
                refused.append((event, f"{_TOO_LARGE}: cut off alone {_LONE_TRIES} times by fluentd at "
                                       f"{self.address} right after it took the frames before it "
                                       f"(over its frame limit?)"))
                continue
            try:
                entry = self._packer.pack([event_time(event_ns(event)), _record(event)])
            except (ValueError, TypeError, OverflowError, struct.error) as exc:
                refused.append((event, f"{type(exc).__name__}: {exc}"))
                continue
            if suspect is not None:
                suspects.append((tag_for(event, self.config.tag_prefix), entry, event))
                continue
            entries, owners = by_tag.setdefault(tag_for(event, self.config.tag_prefix), ([], []))
            entries.append(entry)
            owners.append(event)
        frames = []
        for tag, (entries, owners) in by_tag.items():
            start = 0
            for group in _split(entries, self._max_bytes, self._max_events):
                chunk, data = self._frame(tag, group)
                frames.append(_Frame(chunk, data, owners[start:start + len(group)], sum(map(len, group))))
                start += len(group)
        # A suspect is struck only when the receiver took the frames before it (see _cut_off), so it
        # goes after the batch's others: order among logged events is not relied on downstream (the
        # audit documents merge by id). Alone, it goes behind the witness: the event is sent again,
        # which the store downstream overwrites by id; its frame carries no event of the batch.
        # Only after a close (a silence tests nothing: Fluentd drops a chunk over its limit without
        # a word, retried for ever, each try a duplicate), and taken _WITNESS_TRIES times at most
        # (one not taken, the receiver down, is no duplicate); closed on _WITNESS_CUTS times (a
        # long outage, or a limit below even the witness: retried for ever) it goes no more. With
        # no witness to send (none small acked, or its tries used), each close strikes.
        unvouched, self._witness_for = False, None
        if suspects and not frames:
            alone = self._suspects[_key(suspects[0][2])]
            if (self._witness is None or alone.witnessed >= _WITNESS_TRIES
                    or alone.witness_cut >= _WITNESS_CUTS):
                unvouched = True
            elif alone.closed:
                self._witness_for, witness = alone, self._witness
                entry = self._packer.pack([event_time(event_ns(witness)), _record(witness)])
                frames.append(_Frame(*self._frame(tag_for(witness, self.config.tag_prefix), [entry]), [], len(entry)))
        for tag, entry, event in suspects:
            frames.append(_Frame(*self._frame(tag, [entry]), [event], len(entry), suspect=True,
                                 unvouched=unvouched))
        return frames, refused

    def _frame(self, tag: str, group: list[bytes]) -> tuple[str, bytes]:
        entries = b"".join(group)
        option: dict[str, Any] = {"size": len(group)}
        if self.config.compress:
            entries = gzip.compress(entries, compresslevel=1, mtime=0)
            option["compressed"] = "gzip"
        chunk = base64.b64encode(os.urandom(16)).decode() if self.config.ack else ""
        if chunk:
            option["chunk"] = chunk
        return chunk, self._packer.pack([tag, entries, option])

    async def _connected(self) -> asyncio.StreamWriter:
        if self._wants_handshake is not None:  # said once, it holds: no batch is discarded again
            raise SinkError(self._wants_handshake)
        reader, writer = self._reader, self._writer
        if reader is not None and writer is not None and not reader.at_eof() and not writer.is_closing():
            return writer
        self._close()  # the peer went away since the last batch: start afresh
        shaking = False
        try:
            async with asyncio.timeout(self.config.timeout):
                self._reader, self._writer = await asyncio.open_connection(self.config.host, self.config.port)
                self._unpacker = msgpack.Unpacker(max_buffer_size=1 << 20)  # acks and PONGs are small
                if self.config.shared_key is not None:
                    shaking = True
                    await self._handshake(self.config.shared_key.get_secret_value())
            if not self.config.ack:
                # Nothing else reads: a HELO unread had every frame discarded and counted delivered.
                self._watcher = asyncio.create_task(self._watch())
                if self.config.shared_key is None:  # it comes right after accept: not behind our first frame
                    await asyncio.wait({self._watcher}, timeout=_HELO_WAIT)
                self._heard()
        except SinkError:
            raise
        except TimeoutError as exc:
            if shaking:  # connected: the receiver is silent, as one without `<security>` is
                reason = (f"fluentd at {self.address} sent no HELO or PONG within {self.config.timeout:g} s "
                          "(is `<security>` configured there?)")
                log.warning("fluentd sink: %s", reason)
                raise SinkError(reason) from exc
            log.warning("fluentd sink: cannot connect to %s: timed out", self.address)
            raise SinkError(f"cannot connect to fluentd at {self.address}: timed out") from exc
        except (OSError, ValueError, msgpack.UnpackException) as exc:
            reason = f"{type(exc).__name__}: {exc}"
            log.warning("fluentd sink: cannot connect to %s: %s", self.address, reason)
            raise SinkError(f"cannot connect to fluentd at {self.address}: {reason}") from exc
        if self.connects:
            self.reconnects += 1
        self.connects += 1
        assert self._writer is not None
        return self._writer

    async def _handshake(self, key: str) -> None:
        helo = await self._message()
        if not (isinstance(helo, list) and len(helo) == 2 and helo[0] == "HELO"
                and isinstance(helo[1], dict)):
            raise SinkError(f"fluentd at {self.address} sent no HELO (is `<security>` configured there?)")
        nonce, auth_salt = as_bytes(helo[1].get("nonce", b"")), as_bytes(helo[1].get("auth", b""))
        salt = os.urandom(16).hex()  # a str: some servers only take str salts
        name, user = self.config.self_hostname, self.config.username
        proof = password_digest(auth_salt, user, self.config.password.get_secret_value()) if auth_salt else ""
        assert self._writer is not None
        self._writer.write(self._packer.pack(
            ["PING", name, salt, shared_key_digest(salt.encode(), name, nonce, key), user, proof]))
        pong = await self._message()
        if not (isinstance(pong, list) and len(pong) == 5 and pong[0] == "PONG"):
            raise SinkError(f"fluentd at {self.address} answered PING with {pong!r:.80}")
        if pong[1] is not True:
            raise SinkError(f"fluentd at {self.address} refused the handshake: {pong[2]}")
        if pong[4] != shared_key_digest(salt.encode(), str(pong[3]), nonce, key):
            raise SinkError(f"fluentd at {self.address} does not know our shared key (PONG digest differs)")

    async def _deliver(self, writer: asyncio.StreamWriter, frames: list[_Frame], unacked: set[str]) -> None:
        """Write the frames and wait for their acks (`unacked` loses each chunk acked) while the
        receiver makes progress: `timeout` for the whole batch had a slow receiver's batch time
        out and sent again for ever."""
        loop = asyncio.get_running_loop()
        self._started = 0
        self._vouched = set()
        acked = asyncio.Event()  # set on every ack: a suspect waits for those of the frames before it
        # Bytes written and not acked yet: a second more per MiB of them. The kernels on the way
        # take megabytes at once (loopback's buffers), so a receiver reading a big frame for longer
        # than `timeout` before its ack made no progress the sink could see: every try timed out.
        self._unacked = {frame.chunk: 0 for frame in frames}
        async with asyncio.timeout(self.config.timeout) as idle:
            def progress() -> None:
                if not idle.expired():  # progress in the deadline's own loop pass: it stands
                    allowance = sum(self._unacked.values()) / READ_RATE_ALLOWANCE if self.config.ack else 0
                    idle.reschedule(loop.time() + self.config.timeout + allowance)

            try:
                # Acks are read while writing: unread, they could fill the socket and stop the receiver.
                async with asyncio.TaskGroup() as group:
                    group.create_task(self._write(writer, frames, unacked, acked, progress))
                    if self.config.ack:
                        group.create_task(self._acks(unacked, acked, progress))
            except ExceptionGroup as failed:
                raise failed.exceptions[0] from None
        if not self.config.ack:
            await asyncio.sleep(0)  # what came while writing is read
            self._heard()

    def _heard(self) -> None:
        """Without acks: raise what the server's words (or its closing) mean."""
        if self._watcher is not None and self._watcher.done():
            if (exc := self._watcher.exception()) is not None:
                raise exc
            raise ConnectionResetError("connection closed by fluentd")

    async def _watch(self) -> None:
        """Without acks, reads the connection: a HELO raises, the server's closing ends it."""
        try:
            while True:
                reply = await self._message()
                if isinstance(reply, list) and reply and reply[0] == "HELO":
                    self._wants_handshake = f"fluentd at {self.address} wants the shared-key handshake: set shared_key"
                    raise SinkError(self._wants_handshake)
        except OSError:  # closed: _heard says so
            return

    async def _write(self, writer: asyncio.StreamWriter, frames: list[_Frame], unacked: set[str],
                     acked: asyncio.Event, progress: Callable[[], None]) -> None:
        for index, frame in enumerate(frames):
            if frame.suspect and index:
                await self._vouch(frames[:index], unacked, acked)
                self._vouched.add(index)
            elif frame.unvouched:
                # Nothing to vouch with: its close strikes, as any did (a big event first from a
                # sidecar's start through an outage is dead-lettered; retried without a strike, one
                # really too large blocked the spool for ever).
                self._vouched.add(index)
            self._started += 1
            view = memoryview(frame.data)
            for start in range(0, len(view), _WRITE_PIECE):
                piece = view[start:start + _WRITE_PIECE]
                writer.write(piece)
                await writer.drain()  # returns once the socket took (nearly) all of it
                if frame.chunk in self._unacked:  # else acked while written (an ack read early)
                    self._unacked[frame.chunk] += len(piece)
                progress()

    async def _vouch(self, before: list[_Frame], unacked: set[str], acked: asyncio.Event) -> None:
        """Until the receiver took the frames before a suspect: with acks, each acked. Read before
        the suspect is written, these acks cannot be lost with the connection it may close (a
        failed write cancels the reader, and acks that came unread went with it). Without acks,
        only that the connection is still open once they were written: weaker evidence."""
        if self.config.ack:
            while any(frame.chunk in unacked for frame in before):
                acked.clear()
                await acked.wait()
        else:
            await asyncio.sleep(0)  # what came while writing is read
            self._heard()

    async def _acks(self, chunks: set[str], acked: asyncio.Event, progress: Callable[[], None]) -> None:
        while chunks:
            reply = await self._message()
            if isinstance(reply, list) and reply and reply[0] == "HELO":
                raise SinkError(f"fluentd at {self.address} wants the shared-key handshake: set shared_key")
            if isinstance(reply, dict) and isinstance(ack := reply.get("ack"), str) and ack in chunks:
                chunks.discard(ack)
                self._unacked.pop(ack, None)
                acked.set()
                progress()

    async def _message(self) -> Any:
        """The next msgpack object the server sent (the caller bounds the wait)."""
        assert self._reader is not None
        while True:
            try:
                return next(self._unpacker)
            except StopIteration:
                pass
            data = await self._reader.read(65536)
            if not data:
                raise ConnectionResetError("connection closed by fluentd")
            self._unpacker.feed(data)

    def _fail(self) -> None:
        self.errors += 1
        self._close()  # late acks or half-read frames must not leak into the next batch

    def _stop_watching(self) -> None:
        if self._watcher is not None:
            self._watcher.cancel()  # done, its exception is not logged as never retrieved either
            self._watcher = None

    def _close(self) -> None:
        self._stop_watching()
        if self._writer is not None:
            self._writer.transport.abort()
        self._reader = self._writer = None

    async def aclose(self) -> None:
        async with self._lock:
            self._stop_watching()
            if self._writer is not None:
                self._writer.close()
                try:
                    await asyncio.wait_for(self._writer.wait_closed(), 1.0)
                except (OSError, TimeoutError):
                    pass
            self._reader = self._writer = None

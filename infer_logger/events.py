"""Inference CloudEvents: the attributes KServe's logger sets, plus ours.

One request/response exchange yields up to two events sharing one id; an explainer later adds a
third (`EXPLANATION`) with the same id. See DESIGN.md, "The inference event".
"""

from __future__ import annotations

import base64
import functools
import json
import math
import time
import zlib
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from datetime import UTC, datetime

import orjson
from uuid_utils import uuid7

from infer_logger import binary_tensors
from infer_logger.cloudevents.event import SPECVERSION, CloudEvent, InexactJSONError
from infer_logger.cloudevents.http import from_http_many
from infer_logger.cloudevents.json_format import is_event_format
from infer_logger.cloudevents.validation import INT32_MAX, is_media_type, is_string, parse_time
from infer_logger.errors import InvalidEventError

REQUEST = "org.kubeflow.serving.inference.request"
RESPONSE = "org.kubeflow.serving.inference.response"
EXPLANATION = "org.kubeflow.serving.inference.explanation"
TYPES = (REQUEST, RESPONSE, EXPLANATION)

# Attribute names (KServe's first, then ours).
INFERENCESERVICENAME = "inferenceservicename"
NAMESPACE = "namespace"
COMPONENT = "component"
ENDPOINT = "endpoint"
METADATA = "metadata"
ANNOTATIONS = "annotations"
RECORDEDTIME = "recordedtime"
MODELNAME = "modelname"
MODELVERSION = "modelversion"
PROTOCOL = "protocol"
PATH = "path"
STATUSCODE = "statuscode"
LATENCYMS = "latencyms"
TRACEPARENT = "traceparent"
TRUNCATED = "truncated"
DATASIZE = "datasize"

# The audit record (store rows, Elasticsearch documents): which part each event type fills, and
# field <- attribute for what every event of an exchange carries.
KINDS = {REQUEST: "request", RESPONSE: "response", EXPLANATION: "explanation"}
SHARED_FIELDS = {
    "model": MODELNAME,
    "model_version": MODELVERSION,
    "service": INFERENCESERVICENAME,
    "namespace": NAMESPACE,
    "component": COMPONENT,
    "endpoint": ENDPOINT,
    "protocol": PROTOCOL,
    "path": PATH,
}

SKIP_HEADERS = ("x-skip-logging", "seldon-skip-logging")
_SKIP_NAMES = frozenset(name.encode() for name in SKIP_HEADERS)
_TRUE = {"true", "1", "yes", "on"}


@functools.lru_cache(maxsize=4)
def _second(epoch_seconds: int) -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(epoch_seconds))


def now_rfc3339() -> str:
    """UTC time with microseconds and a `Z`, as RFC 3339 wants (on the request path: kept cheap)."""
    seconds, nanos = divmod(time.time_ns(), 1_000_000_000)
    return f"{_second(seconds)}.{nanos // 1000:06d}Z"


def event_id(headers: Mapping[str, str]) -> str:
    """The id shared by an exchange's events: `ce-id`, else `x-request-id`, else a new UUID.

    `headers` must have lower-case keys. A given id that no event may carry (`read_id`) is
    passed over as an absent one: the sinks would refuse the events, and in a batch those of other
    requests with them. A bad `ce-id` gives way to the `x-request-id`, which the predictor gets as
    it is: one id for the call. New ids are UUIDv7 (RFC 9562): they sort by time, so the audit
    store's primary key grows at one end instead of touching a random index page per row (random
    ids cost the store 1.1-1.2x per exchange: benchmarks/store_write.py).
    """
    given = headers.get("ce-id") or headers.get("x-request-id")
    if given and given.isascii() and given.isprintable():  # the usual id, checked inline: the hot path
        return given
    for name in ("ce-id", "x-request-id"):
        if (value := headers.get(name)) and (found := read_id(value)) is not None:
            return found
    return str(uuid7())


def read_id(value: str) -> str | None:
    """A client's id header as an event id, or None when it cannot be one.

    Servers hand header values over as their bytes read as Latin-1: UTF-8 bytes are read as
    UTF-8 (so the log, and `query --id`, hold what the client wrote), others stay Latin-1. None
    when that is no CloudEvents String: a tab or 0x80-0x9F are legal in a header, not in an id.
    """
    if value.isascii():  # the usual id: one cheap check
        return value if value and value.isprintable() else None
    value = header_text(value)
    return value if is_string(value) else None


def header_text(value: str) -> str:
    """A header value as the client wrote it: servers hand values over as their bytes read as
    Latin-1; bytes that are UTF-8 are read as UTF-8, others stay Latin-1."""
    if value.isascii():
        return value
    try:
        return value.encode("latin-1").decode("utf-8")
    except UnicodeError:  # not UTF-8 (or already text, not wire bytes)
        return value


def id_header(event_id: str, headers: Mapping[str, str]) -> bytes:
    """The `x-request-id` to answer with: the very bytes the client sent when they are what
    `event_id` was read from (a UTF-8 or Latin-1 id comes back as sent), else the id in UTF-8."""
    sent = headers.get("x-request-id")
    if sent is not None and (sent == event_id or read_id(sent) == event_id):
        try:
            return sent.encode("latin-1")
        except UnicodeError:  # already text: there are no wire bytes to give back
            pass
    return event_id.encode()


def cloudevent_id(headers: Mapping[str, str], body: bytes) -> str | None:
    """The id of a request that is itself a CloudEvent (binary or structured), else None.

    Raises InvalidEventError for a malformed one: the sidecar (and the middleware) answer 400 rather
    than pass on what the predictor's CloudEvents handling would choke on.
    """
    if "ce-specversion" in headers or is_event_format(headers.get("content-type")):
        found = from_http_many(headers, body)
        if not found:
            raise InvalidEventError("", "an empty batch is no inference request")
        return found[0].id
    return None


def skip_logging(headers: Iterable[tuple[bytes, bytes]]) -> bool:
    """Whether a skip header's first value is true: as Go's `Header.Get` reads it (KServe's, Seldon's
    executor), where a dict of the headers took the last one."""
    first: dict[bytes, bytes] = {}
    for name, value in headers:
        if (lower := name.lower()) in _SKIP_NAMES:
            first.setdefault(lower, value)
    return any(value.strip().lower().decode("latin-1") in _TRUE for value in first.values())


def metadata_json(headers: Iterable[tuple[str, str]], allowed: Iterable[str]) -> str:
    """KServe's `metadata` extension: JSON of allow-listed headers -> list of values.

    Names match case-insensitively and are reported as configured; values are read as
    `header_text` does. The text is a CloudEvents String: what one may not hold (C1 controls,
    noncharacters, which orjson writes as they are) is \\u-escaped, as JSON allows.
    """
    wanted = {name.lower(): name for name in allowed}
    out: dict[str, list[str]] = {}
    if wanted:
        for name, value in headers:
            key = wanted.get(name.lower())
            if key is not None:
                out.setdefault(key, []).append(header_text(value))
    return json_attribute(out)


def json_attribute(value: object) -> str:
    """JSON text that is a CloudEvents String (`metadata`, `annotations`): what one may not hold
    (DEL, C1 controls, noncharacters, which orjson writes as they are) \\u-escaped, as JSON allows."""
    text = orjson.dumps(value).decode()
    if (text.isascii() and text.isprintable()) or is_string(text):  # orjson escapes C0 controls only
        return text
    # DEL is ASCII, so ensure_ascii keeps it; in JSON text it can only be inside a string.
    return json.dumps(value, ensure_ascii=True, separators=(",", ":")).replace("\x7f", "\\u007f")


def traceparent(value: str) -> str | None:
    """A `traceparent` header for the distributed-tracing extension when it is a CloudEvents String
    (a tab or a C1 control in it made the event invalid), else None. Its W3C syntax is the tracing
    system's to judge (W3C: a receiver ignores an invalid one); a regex here cost ~0.5 us a request."""
    return value if is_string(value) else None


def media_type(value: str | None) -> str | None:
    """A Content-Type header as `datacontenttype`, or None when absent or no media type an
    event may carry (`json`, a C1 control): the caller then says what it says for none."""
    return value if value is not None and is_media_type(value) else None


@dataclass(frozen=True, slots=True)
class Origin:
    """Who logs: the sidecar's identity, set once from config."""

    source: str
    inferenceservicename: str = ""
    namespace: str = ""
    component: str = ""
    endpoint: str = ""
    annotations: str | None = None  # JSON object text, only set when configured

    def attributes(self) -> dict[str, str]:
        attrs = {
            "specversion": SPECVERSION,
            "source": self.source,
            INFERENCESERVICENAME: self.inferenceservicename,
            NAMESPACE: self.namespace,
            COMPONENT: self.component,
            ENDPOINT: self.endpoint,
        }
        if self.annotations:
            attrs[ANNOTATIONS] = self.annotations
        return attrs


def as_float(value: object) -> float | None:
    """A numeric attribute (statuscode, latencyms): typed in the JSON format, text in binary modes."""
    if value is None or isinstance(value, bool):
        return None
    try:
        return float(value)  # type: ignore[arg-type]
    except (TypeError, ValueError):
        return None


_MAX_LATENCY_MS = 1e12  # ~30 years: anything longer is a broken attribute, not a latency


def as_latency(value: object) -> float | None:
    """`latencyms` as a number of milliseconds; None when it is none, not finite or absurd (what
    is kept of it: JSON has no number for an infinity)."""
    latency = as_float(value)
    if latency is None or not math.isfinite(latency) or abs(latency) > _MAX_LATENCY_MS:
        return None
    return latency


def as_utc(value: object) -> datetime | None:
    """A time attribute (or a query bound) as an aware UTC datetime; None when it has none.

    ISO 8601 as `fromisoformat` reads it (in C: the audit documents' path, per event), else RFC
    3339 as events may carry it (lower-case `t` and `z`, a leap second: forms `fromisoformat`
    refuses); naive means UTC. A time at either end of the calendar may have no UTC form
    (0001-01-01T00:30:00+01:00).
    """
    if value is None or value == "":
        return None
    if isinstance(value, datetime):
        moment = value
    else:
        try:
            moment = datetime.fromisoformat(str(value))
        except ValueError:
            try:
                moment = parse_time(str(value))
            except InvalidEventError:
                return None
    try:
        return moment.replace(tzinfo=UTC) if moment.tzinfo is None else moment.astimezone(UTC)
    except OverflowError:
        return None


def as_int(value: object) -> int | None:
    number = as_float(value)
    return int(number) if number is not None and number.is_integer() else None


def is_error(event: CloudEvent) -> bool:
    """A response with a status of 400 or more (typed in the JSON format, text in binary modes):
    its body describes the whole exchange, whatever it looks like, and is never split."""
    status = event.get(STATUSCODE)
    if type(status) is not int:  # the sidecar's own events carry an int: kept off the store's hot path
        status = as_int(status)
    return status is not None and status >= 400 and event.type == RESPONSE


def is_truncated(event: CloudEvent) -> bool:
    """Whether the payload was cut (`truncated`): a Boolean, or its text after a binary hop (HTTP,
    Kafka), where "false" is a non-empty string, so no Python truth value."""
    value = event.get(TRUNCATED)
    return value is True or (isinstance(value, str) and value.lower() == "true")


def capped(data: bytes, limit: int, size: int | None = None) -> tuple[bytes, dict[str, str | int | bool]]:
    """Cut a payload to `limit` bytes, marking what was cut; `size` is the whole payload's when
    `data` is only its first part (a caller that kept no more than it logs)."""
    size = len(data) if size is None else size
    if size <= limit:
        return data, {}
    # A CloudEvents Integer is 32-bit: a larger size (a streamed answer past 2 GiB) is text, as
    # binary mode carries it anyway; an int would make the event invalid to every reader.
    return data[:limit], {TRUNCATED: True, DATASIZE: size if size <= INT32_MAX else str(size)}


_WBITS = {"gzip": 31, "x-gzip": 31, "deflate": 15}
# gzip members decoded one after another, at most (a body of many tiny members is no real client's);
# past it, the body is logged as sent.
_MEMBERS_MAX = 64
# Input fed to the decompressor at a time: what it keeps back at a member's end (`unused_data`,
# a copy) is at most this, not the rest of the body (a copy per member held the request path
# for seconds).
_FEED = 1 << 16


def decoded(body: bytes, encoding: str, limit: int) -> tuple[bytes, dict[str, str | int | bool]] | None:
    """A request's logged copy under its Content-Encoding (gzip, deflate): the payload decoded, at
    most `limit` bytes of it (cut there and marked, its whole size not looked for: a small body
    may inflate without end); None for another coding, a body that does not decode whole, or one
    of more than `_MEMBERS_MAX` gzip members."""
    wbits = _WBITS.get(encoding.strip().lower())
    if wbits is None:
        return None
    for bits in (wbits, -15) if wbits == 15 else (wbits,):  # deflate as zlib, or raw as some send it
        try:
            return _inflated(memoryview(body), bits, limit)
        except zlib.error:
            continue
    return None


def _inflated(view: memoryview, bits: int, limit: int) -> tuple[bytes, dict[str, str | int | bool]] | None:
    out = bytearray()
    position = 0
    for _ in range(_MEMBERS_MAX):  # gzip may hold several members (RFC 1952), one after another
        inflater = zlib.decompressobj(bits)
        while not inflater.eof:
            if position >= len(view):
                return None  # cut short
            chunk = view[position:position + _FEED]
            position += len(chunk)
            out += inflater.decompress(chunk, limit + 1 - len(out))
            if len(out) > limit:
                return bytes(out[:limit]), {TRUNCATED: True}
        position -= len(inflater.unused_data)
        if position >= len(view):
            return bytes(out), {}
        if bits != 31:
            return None  # bytes after the stream: not whole
    return None


class RawPayload(dict[str, str]):
    """`decode_data`'s form of a payload that is not JSON, or was truncated: `{"base64": ...}`,
    told apart from a JSON object that happens to look the same by its type."""

    @classmethod
    def of(cls, data: bytes) -> RawPayload:
        return cls(base64=base64.b64encode(data).decode())


def decode_data(event: CloudEvent) -> object:
    """The payload as JSON when it is JSON (a V2 body with binary tensor data too, its tensors'
    `data` filled in), else base64 text (a RawPayload): for stores and displays. None for no
    data, or an empty one (HTTP's binary mode cannot tell them apart): no prediction in it."""
    if not event.data:
        return None
    if not is_truncated(event):
        try:
            doc = event.json()
        except InexactJSONError:
            pass  # JSON whose numbers would change as read: the bytes sent, as base64
        except ValueError:
            inlined = binary_tensors.inline(event.data)
            if inlined is not None:
                return inlined
        else:
            return binary_tensors.inline(event.data) or doc if binary_tensors.carries_binary(doc) else doc
    return RawPayload.of(event.data)

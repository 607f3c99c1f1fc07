"""The CloudEvents HTTP binding: binary, structured and batched content modes.

Pure functions over (headers, body); no HTTP client or server is imported. Encoders return
lower-case header names. Decoders take any mapping of headers, match names without regard to
case, pick the mode from Content-Type as the binding says, and validate every event.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Iterator, Mapping, Sequence
from typing import Literal
from urllib.parse import unquote_to_bytes

from infer_logger.cloudevents import json_format
from infer_logger.cloudevents.event import AttributeValue, CloudEvent, attribute_text
from infer_logger.cloudevents.validation import validate
from infer_logger.errors import InvalidEventError

Mode = Literal["binary", "structured", "batch"]

_PREFIX = "ce-"
# Printable ASCII except '"' and '%' passes through; everything else is percent-encoded.
_NEEDS_ESCAPE = re.compile(r"[^\x21\x23\x24\x26-\x7e]+")
_QUOTED_PAIR = re.compile(r"\\(.)", re.DOTALL)


def to_binary(event: CloudEvent) -> tuple[dict[str, str], bytes]:
    """ce-* headers plus Content-Type = datacontenttype; the body is the data (empty if none).

    An event whose data is itself a CloudEvents format goes structured (see `is_event_format`)."""
    if json_format.is_event_format(event.datacontenttype):
        return to_structured(event)
    headers: dict[str, str] = {}
    for name, value in event.attributes.items():
        if name == "datacontenttype":
            headers["content-type"] = str(value)
        else:
            headers[_PREFIX + name] = encode_header_value(attribute_text(value))
    return headers, event.data or b""


def to_structured(event: CloudEvent) -> tuple[dict[str, str], bytes]:
    return {"content-type": json_format.EVENT_MEDIA_TYPE}, json_format.to_json(event)


def to_batch(events: Iterable[CloudEvent]) -> tuple[dict[str, str], bytes]:
    return {"content-type": json_format.BATCH_MEDIA_TYPE}, json_format.to_json_batch(events)


def to_batches(events: Sequence[CloudEvent], max_bytes: int
               ) -> Iterator[tuple[Sequence[CloudEvent], dict[str, str], bytes]]:
    """Batched messages of `events` in order, each body up to `max_bytes` (an event larger alone)."""
    for chunk, body in json_format.to_json_batches(events, max_bytes):
        yield chunk, {"content-type": json_format.BATCH_MEDIA_TYPE}, body


def from_http(headers: Mapping[str, str], body: bytes) -> CloudEvent:
    """One event from a binary or structured message; a batch is refused (see from_http_many).

    Headers that carry no attribute are kept in the event's `meta`.
    """
    lowered = {name.lower(): value for name, value in headers.items()}
    mode = content_mode(lowered)
    if mode == "batch":
        raise InvalidEventError("", "a batched message holds many events; use from_http_many")
    if mode == "structured":
        event = json_format.from_json(body)
        return CloudEvent(event.attributes, event.data, _meta(lowered, skip_ce=False))
    return _from_binary(lowered, body)


def from_http_many(headers: Mapping[str, str], body: bytes) -> list[CloudEvent]:
    """The events of a message in any mode: a batch gives its list, the others one event."""
    lowered = {name.lower(): value for name, value in headers.items()}
    if content_mode(lowered) != "batch":
        return [from_http(lowered, body)]
    meta = _meta(lowered, skip_ce=False)
    return [CloudEvent(e.attributes, e.data, meta) for e in json_format.from_json_batch(body)]


def content_mode(headers: Mapping[str, str]) -> Mode:
    """The binding's rule: a Content-Type naming a CloudEvents format, else binary mode."""
    content_type = next((v for k, v in headers.items() if k.lower() == "content-type"), "")
    media_type = content_type.split(";", 1)[0].strip().lower()
    if media_type.startswith("application/cloudevents-batch"):
        if media_type != json_format.BATCH_MEDIA_TYPE:
            raise InvalidEventError("", f"unsupported batch format {media_type!r}")
        return "batch"
    if media_type.startswith("application/cloudevents"):
        # The binding allows treating unknown formats as binary; naming them is clearer.
        if media_type != json_format.EVENT_MEDIA_TYPE:
            raise InvalidEventError("", f"unsupported event format {media_type!r}")
        return "structured"
    return "binary"


def encode_header_value(text: str) -> str:
    """Percent-encode space, '"', '%' and all but printable ASCII, as UTF-8 in upper-case hex."""
    return _NEEDS_ESCAPE.sub(lambda m: "".join(f"%{b:02X}" for b in m.group().encode()), text)


def decode_header_value(value: str, attribute: str = "") -> str:
    """Undo an RFC 9110 quoted string, then one round of percent-decoding, as the binding says.

    Values are taken as HTTP libraries hand them over (the wire bytes read as Latin-1), so raw
    UTF-8 from a sender that skipped the encoding still decodes; invalid UTF-8 is refused.
    """
    value = value.strip(" \t")
    if len(value) >= 2 and value[0] == value[-1] == '"':
        value = _QUOTED_PAIR.sub(r"\1", value[1:-1])
    try:
        raw = value.encode("latin-1")
    except UnicodeEncodeError:  # not wire characters: the caller already decoded to Unicode
        raw = value.encode("utf-8")
    try:
        return unquote_to_bytes(raw).decode("utf-8")
    except UnicodeDecodeError:
        raise InvalidEventError(attribute, "header value is not valid UTF-8 once decoded") from None


def _from_binary(headers: Mapping[str, str], body: bytes) -> CloudEvent:
    attributes: dict[str, AttributeValue] = {}
    for name, value in headers.items():
        if not name.startswith(_PREFIX):
            continue
        attribute = name[len(_PREFIX) :]
        if attribute == "datacontenttype":
            raise InvalidEventError(attribute, "binary mode carries it as Content-Type, not a ce- header")
        attributes[attribute] = decode_header_value(value, attribute)
    content_type = headers.get("content-type", "").strip()
    if content_type:  # an empty Content-Type says as little as a missing one
        attributes["datacontenttype"] = content_type
    # An empty body is how binary mode says "no data".
    return validate(CloudEvent(attributes, body or None, _meta(headers, skip_ce=True)))


def _meta(headers: Mapping[str, str], *, skip_ce: bool) -> dict[str, str]:
    """Transport headers beyond the event, kept apart as the spec recommends."""
    return {
        name: value
        for name, value in headers.items()
        if name != "content-type" and not (skip_ce and name.startswith(_PREFIX))
    }

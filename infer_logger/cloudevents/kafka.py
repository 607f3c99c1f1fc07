"""The CloudEvents Kafka binding: binary and structured content modes.

Pure functions over frozen messages; no Kafka client is imported. A producer sends one with
`send(topic, m.value, key=m.key, headers=list(m.headers.items()))`; a consumer decodes a record
with `from_kafka(KafkaRecord(r.headers, r.key, r.value))`: the header pairs as read, so that a
ce_ or content-type header given twice is refused, not decided by whichever came last.

Keys: the `partitionkey` extension, when present, is the record key (the binding's Key
Mapper); otherwise the `key` argument decides, by default the event id, so that the request,
response and explanation events of one prediction land in one partition, in order.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import TypeAlias

from infer_logger.cloudevents import json_format
from infer_logger.cloudevents.event import AttributeValue, CloudEvent, attribute_text
from infer_logger.cloudevents.validation import validate
from infer_logger.errors import InvalidEventError

_PREFIX = "ce_"
_STRUCTURED_CONTENT_TYPE = json_format.EVENT_MEDIA_TYPE.encode()


@dataclass(frozen=True, slots=True)
class KafkaMessage:
    headers: dict[str, bytes]
    key: bytes | None
    # None is a record without a value: binary mode's event without data (a tombstone).
    value: bytes | None


@dataclass(frozen=True, slots=True)
class KafkaRecord:
    """A record as a consumer read it: its headers the (name, value) pairs, repeats and all."""

    headers: Sequence[tuple[str, bytes | None]]
    key: bytes | None
    value: bytes | None


KeyChooser: TypeAlias = Callable[[CloudEvent], bytes | None]
Key: TypeAlias = bytes | None | KeyChooser


def key_by_id(event: CloudEvent) -> bytes:
    return event.id.encode()


def to_kafka_binary(event: CloudEvent, key: Key = key_by_id) -> KafkaMessage:
    """ce_* headers (raw UTF-8, no percent-encoding) and content-type; the value is the data.

    An event whose data is itself a CloudEvents format goes structured (see `is_event_format`)."""
    if json_format.is_event_format(event.datacontenttype):
        return to_kafka_structured(event, key)
    headers: dict[str, bytes] = {}
    for name, value in event.attributes.items():
        if name == "datacontenttype":
            headers["content-type"] = str(value).encode()
        else:
            headers[_PREFIX + name] = attribute_text(value).encode()
    return KafkaMessage(headers, _choose_key(event, key), event.data)


def to_kafka_structured(event: CloudEvent, key: Key = key_by_id) -> KafkaMessage:
    headers = {"content-type": _STRUCTURED_CONTENT_TYPE}
    return KafkaMessage(headers, _choose_key(event, key), json_format.to_json(event))


def from_kafka(message: KafkaMessage | KafkaRecord) -> CloudEvent:
    """A validated event; headers that carry no attribute are kept in its `meta`.

    The record key is not turned into a `partitionkey` attribute: keys chosen by `key` (the
    event id by default) are transport routing, and adding them would change the event.
    """
    headers, repeated = _headers(message.headers)
    # An empty content-type says as little as a missing one (as HTTP reads it).
    content_type = (_text(headers.get("content-type"), "datacontenttype") or "").strip() or None
    media_type = (content_type or "").split(";", 1)[0].strip().lower()
    if media_type.startswith("application/cloudevents"):  # the binding's structured-mode test
        if media_type != json_format.EVENT_MEDIA_TYPE:
            raise InvalidEventError("", f"unsupported event format {media_type!r}")
        if message.value is None:
            raise InvalidEventError("", "a structured-mode record needs a value")
        event = json_format.from_json(message.value)
        return CloudEvent(event.attributes, event.data, _meta(headers, skip_ce=False))
    if repeated is not None:  # binary mode reads it as an attribute (structured mode only keeps it in `meta`)
        raise InvalidEventError(repeated[len(_PREFIX) :], f"header {repeated} repeated")
    attributes: dict[str, AttributeValue] = {}
    for name, raw in headers.items():
        if name.startswith(_PREFIX) and raw is not None:  # a null header (Java clients write them) is none
            attribute = name[len(_PREFIX) :]
            if attribute == "datacontenttype":
                raise InvalidEventError(attribute, "binary mode carries it as content-type")
            attributes[attribute] = _text(raw, attribute) or ""
    if content_type is not None:
        attributes["datacontenttype"] = content_type
    data = message.value or None  # no value, or an empty one, is an event without data
    return validate(CloudEvent(attributes, data, _meta(headers, skip_ce=True)))


def _headers(raw: dict[str, bytes] | Sequence[tuple[str, bytes | None]]) -> tuple[dict[str, bytes | None], str | None]:
    """By lower-cased name (Kafka's names are case-sensitive, but matching them loosely costs
    nothing and accepts what some producers send), and the first `ce_` header given twice. Such
    a header (in binary mode) or content-type is refused: which one holds is anybody's guess, and
    the last one silently won."""
    headers: dict[str, bytes | None] = {}
    repeated = None
    for name, value in raw.items() if isinstance(raw, dict) else raw:
        lower = name.lower()
        if lower in headers:
            if lower == "content-type":
                raise InvalidEventError("datacontenttype", "header content-type repeated")
            if repeated is None and lower.startswith(_PREFIX):
                repeated = lower
        headers[lower] = value
    return headers, repeated


def _choose_key(event: CloudEvent, key: Key) -> bytes | None:
    partition_key = event.get("partitionkey")
    if partition_key is not None:
        return attribute_text(partition_key).encode()
    return key(event) if callable(key) else key


def _text(raw: bytes | None, attribute: str) -> str | None:
    if raw is None:
        return None
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError:
        raise InvalidEventError(attribute, "header value is not valid UTF-8") from None


def _meta(headers: dict[str, bytes | None], *, skip_ce: bool) -> dict[str, str]:
    """Headers beyond the event, kept apart as the spec recommends (bad UTF-8 made visible)."""
    return {
        name: value.decode("utf-8", "backslashreplace")
        for name, value in headers.items()
        # Kafka headers may be null (Java clients write them): no value to keep.
        if value is not None and name != "content-type" and not (skip_ce and name.startswith(_PREFIX))
    }

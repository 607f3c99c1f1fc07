"""The CloudEvents JSON event format (`application/cloudevents+json`) and its batch form.

Events hold data as the raw bytes of binary mode, so this module decides the JSON shape at
encode time: bytes that are JSON under a JSON content type embed as-is (`data`) when they read
back as written, UTF-8 text under any other content type (without another charset) becomes a
JSON string (`data`), and everything else, bytes of no stated type too, travels as `data_base64`.
Reading reverses that (text in the charset its type names), so binary -> JSON -> binary keeps the
bytes, except that embedded JSON comes back in compact form.
"""

from __future__ import annotations

import base64
import binascii
import functools
import json
import re
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from typing import Any

import orjson

from infer_logger.cloudevents.event import (
    AttributeValue,
    CloudEvent,
    charset,
    is_json_type,
    is_known_charset,
    may_hold_long_integer,
)
from infer_logger.cloudevents.validation import validate
from infer_logger.errors import InvalidEventError

EVENT_MEDIA_TYPE = "application/cloudevents+json"
BATCH_MEDIA_TYPE = "application/cloudevents-batch+json"

_FORMAT_PREFIX = "application/cloudevents"
_ENVELOPE = 2  # levels around embedded data: the event's object, a batch's array


def is_event_format(content_type: object) -> bool:
    """Whether a content type names a CloudEvents format, compared as receivers do (any case).

    Such data cannot travel in a binary-mode message: its receiver would read it as the event
    itself (structured mode), so encoders send those events structured.
    """
    return type(content_type) is str and content_type.lstrip()[:23].lower() == _FORMAT_PREFIX


# What the JSON format says an event without `datacontenttype` but with `data` carries.
_IMPLIED_CONTENT_TYPE = "application/json"


def to_dict(event: CloudEvent) -> dict[str, Any]:
    """The event as a JSON-ready dict (embedded JSON data parsed into Python values)."""
    return _members(event, embed_raw=False)


def to_json(event: CloudEvent) -> bytes:
    return orjson.dumps(_members(event, embed_raw=True))


def to_json_batch(events: Iterable[CloudEvent]) -> bytes:
    return orjson.dumps([_members(event, embed_raw=True) for event in events])


def to_json_batches(events: Sequence[CloudEvent], limit: int) -> Iterator[tuple[Sequence[CloudEvent], bytes]]:
    """`events` in order as batches of up to `limit` bytes each (an event larger than that alone),
    each with its events; encoded as they are taken, so only one batch is in memory at a time."""
    parts: list[bytes] = []
    start, size = 0, 1
    for i, event in enumerate(events):
        part = to_json(event)
        if parts and size + 1 + len(part) > limit:
            yield events[start:i], b"[" + b",".join(parts) + b"]"
            start, parts, size = i, [], 1
        parts.append(part)
        size += 1 + len(part)  # a comma or the closing bracket
    if parts:
        yield events[start:], b"[" + b",".join(parts) + b"]"


def from_dict(members: Mapping[str, Any]) -> CloudEvent:
    """A validated event from a parsed JSON object; JSON nulls mean "unset"."""
    if not isinstance(members, Mapping):
        raise InvalidEventError("", f"a CloudEvent is a JSON object, not {_json_kind(members)}")
    attributes: dict[str, AttributeValue] = {}
    for name, value in members.items():
        if value is None or name in ("data", "data_base64"):
            continue
        if not isinstance(value, str | int):  # bool is an int; floats, objects, arrays are not types
            raise InvalidEventError(name, f"a JSON {_json_kind(value)} is not a CloudEvents type")
        attributes[name] = value
    data = _read_data(members, attributes)
    return validate(CloudEvent(attributes, data))


def from_json(raw: bytes | str) -> CloudEvent:
    return from_dict(_loads(raw))


def from_json_batch(raw: bytes | str) -> list[CloudEvent]:
    items = _loads(raw)
    if not isinstance(items, list):
        raise InvalidEventError("", f"a batch is a JSON array, not {_json_kind(items)}")
    events = []
    for index, item in enumerate(items):
        try:
            events.append(from_dict(item))
        except InvalidEventError as error:
            error.add_note(f"in batch item {index}")  # keeps the error's type and attribute
            error.item = index
            raise
    return events


def _members(event: CloudEvent, *, embed_raw: bool) -> dict[str, Any]:
    members: dict[str, Any] = dict(event.attributes)
    data = event.data
    content_type = event.datacontenttype
    if data is None:
        return members
    if content_type is None:
        pass  # bytes of no stated type: base64, which readers must not take for JSON (JSON `data` they would)
    elif is_json_type(content_type):
        try:
            # Checked as readers will read it: an integer past 64 bits (orjson's float) changed,
            # and embedded, 1023 levels made a batch no one could read.
            value = event.json(spare_levels=_ENVELOPE if embed_raw else 0)
        except ValueError:
            pass  # JSON in name only (or not as orjson reads it): base64 keeps the bytes intact
        else:
            if value is not None:  # `"data": null` reads as no data: base64 keeps a JSON null
                # A Fragment splices the already-checked bytes in without re-serializing them.
                members["data"] = orjson.Fragment(data) if embed_raw else value
                return members
    elif codec := _string_codec(content_type):  # text in another charset would read as other text
        try:
            members["data"] = data.decode(codec)
            return members
        except UnicodeDecodeError:
            pass
    members["data_base64"] = base64.b64encode(data).decode("ascii")
    return members


def _read_data(members: Mapping[str, Any], attributes: dict[str, AttributeValue]) -> bytes | None:
    value, encoded = members.get("data"), members.get("data_base64")
    if value is not None and encoded is not None:
        raise InvalidEventError("data", "an event has either data or data_base64, not both")
    if encoded is not None:
        # No content type is implied for base64 data: bytes are just bytes.
        if not isinstance(encoded, str):
            raise InvalidEventError("data_base64", "must be a base64 string")
        try:
            return base64.b64decode(encoded, validate=True)
        except (binascii.Error, ValueError) as error:  # ValueError: characters outside ASCII
            raise InvalidEventError("data_base64", f"not valid base64: {error}") from None
    if value is None:
        return None
    content_type = attributes.get("datacontenttype")
    if content_type is None:
        # Our events are shaped like binary mode, where the content type is explicit; the spec
        # asks translations to spell the implied one out.
        attributes["datacontenttype"] = content_type = _IMPLIED_CONTENT_TYPE
    if isinstance(value, str) and not is_json_type(str(content_type)):
        return _encoded(value, str(content_type))
    # JSON content (a JSON string stays a JSON string, quotes and all). The spec lets a reader
    # refuse non-string data under a non-JSON type; its JSON text is the kinder reading.
    try:
        data = orjson.dumps(value)
    except orjson.JSONEncodeError as exc:
        if "ecursion" not in str(exc):  # what JSON cannot hold (bytes, int keys: a msgpack reader's)
            raise
        # orjson reads 1024 levels deep but writes 254: a payload a predictor took (and our
        # structured sinks wrote) stopped the reader with a TypeError.
        data = deep_dumps(value)
    # JSON text is UTF-8 whatever charset its label names (RFC 8259 11: the parameter has no
    # effect), as the writer embedded it: re-encoded, a legacy client's label changed or refused it.
    # Under a text type (JSON text as its kinder reading) the label's charset holds, as for a string;
    # what it cannot hold in JSON strings goes as \u escapes (the same JSON, as a sender may write it).
    if is_json_type(str(content_type)):
        return data
    text = data.decode()
    try:
        return _encoded(text, str(content_type))
    except InvalidEventError as error:
        if error.attribute != "data":
            raise
        return _encoded(_NOT_ASCII.sub(lambda found: json.dumps(found[0])[1:-1], text), str(content_type))


_NOT_ASCII = re.compile(r"[^\x00-\x7f]")


def _encoded(text: str, content_type: str) -> bytes:
    """Text `data` as binary mode carries it: in the charset its type names, else UTF-8."""
    name = _charset(content_type)
    if name is None:
        return text.encode()
    if not is_known_charset(name):
        raise InvalidEventError("datacontenttype", f"names a charset this reader does not know: {name[:40]!r}")
    try:
        return text.encode(name)
    except UnicodeEncodeError as error:  # a ValueError too: first
        raise InvalidEventError("data", f"holds text that {name} cannot encode: {error.reason}") from None
    except (LookupError, ValueError):  # a codec, but not to text (base64); a NUL in the name
        raise InvalidEventError("datacontenttype", f"names a codec that is no charset: {name[:40]!r}") from None


@functools.lru_cache(maxsize=256)  # content types repeat
def _charset(content_type: str) -> str | None:
    """The charset text data of this type is in, None for UTF-8 (named, or no charset)."""
    name = charset(content_type)
    return None if name is None or name.lower() in ("utf-8", "utf8") else name


@functools.lru_cache(maxsize=256)
def _string_codec(content_type: str) -> str | None:
    """The codec bytes of this type are read with to be a JSON string, which a reader writes back
    the same: UTF-8, or US-ASCII (bytes past it are no text of the type); None for others."""
    name = _charset(content_type)
    if name is None:
        return "utf-8"
    return "ascii" if name.lower() in ("us-ascii", "ascii") else None


def _loads(raw: bytes | str) -> Any:
    try:
        value = orjson.loads(raw)
    except orjson.JSONDecodeError as error:
        raise InvalidEventError("", f"not valid JSON: {error}") from None
    if may_hold_long_integer(raw.encode() if isinstance(raw, str) else raw):
        # orjson read an integer past 64 bits as a float, and `data` would go on changed: read
        # again by stdlib json, which hands each integer's text over to be kept as written.
        try:
            return json.loads(raw, parse_int=_exact_integer)
        except RecursionError:  # orjson reads 1024 levels, stdlib json fewer: refused, never changed
            raise InvalidEventError("data", "nested too deep to be checked for an integer past 64 bits "
                                            "(kept exact only so)") from None
    return value


def _exact_integer(text: str) -> int | orjson.Fragment:
    """An integer as orjson reads it (-2**63 to 2**64 - 1), else its text, which orjson writes
    as it is (no int() either: Python refuses to read one of over 4300 digits)."""
    if len(text) <= 20 and -(2**63) <= (number := int(text)) < 2**64:
        return number
    return orjson.Fragment(text)


def _json_kind(value: object) -> str:
    kinds = {dict: "object", list: "array", str: "string", float: "number", bool: "boolean",
             orjson.Fragment: "integer past 64 bits"}
    return kinds.get(type(value), type(value).__name__)


def deep_dumps(value: Any, default: Callable[[Any], Any] | None = None, option: int = 0) -> bytes:
    """What `orjson.dumps(value, default=default, option=option)` writes, for a value nested deeper
    than it goes (254 levels; it and msgpack read 1024): containers here, without recursion, and
    every scalar and key by orjson (JSONEncodeError as it raises it)."""
    out = bytearray()
    todo: list[tuple[bool, Any]] = [(False, value)]  # (written as is, item)
    while todo:
        literal, item = todo.pop()
        if literal:
            out += item
        elif isinstance(item, dict):
            out += b"{"
            todo.append((True, b"}"))
            pairs = list(item.items())
            for index in range(len(pairs) - 1, -1, -1):
                key, member = pairs[index]
                todo.append((False, member))
                name = orjson.dumps({key: None}, option=option)[1:-6]  # b'{"k":null}' -> b'"k"'
                todo.append((True, b"," + name + b":" if index else name + b":"))
        elif isinstance(item, list):
            out += b"["
            todo.append((True, b"]"))
            for index in range(len(item) - 1, -1, -1):
                todo.append((False, item[index]))
                if index:
                    todo.append((True, b","))
        else:
            out += orjson.dumps(item, default=default, option=option)
    return bytes(out)

"""What an expression sees of an event: its context attributes and extensions as CESQL values.

An event is either an object with an `attributes` mapping (our `CloudEvent`) or a mapping of
attribute name to value. `data` and `data_base64` are never attributes: CESQL does not look
at the payload (spec section 1).
"""

from __future__ import annotations

import base64
from collections.abc import Mapping
from datetime import datetime
from typing import Protocol, TypeAlias

from pipelines.cesql.values import Value, in_int32

_PAYLOAD_KEYS = frozenset({"data", "data_base64"})


class HasAttributes(Protocol):
    @property
    def attributes(self) -> Mapping[str, object]: ...


Event: TypeAlias = Mapping[str, object] | HasAttributes


def attributes_of(event: Event) -> Mapping[str, object]:
    if isinstance(event, Mapping):
        # Two lookups, not isdisjoint(): that iterates a mapping that is not a dict key by key.
        if "data" not in event and "data_base64" not in event:
            return event
        return {name: value for name, value in event.items() if name not in _PAYLOAD_KEYS}
    attributes = getattr(event, "attributes", None)
    if not isinstance(attributes, Mapping):
        raise TypeError(f"expected a mapping or an object with .attributes, got {type(event)!r}")
    return attributes


def as_value(raw: object) -> Value:
    """An attribute as a CESQL value; anything but a bool, 32-bit int or str becomes a String
    (spec 3.2), using the CloudEvents canonical string form where there is one."""
    if isinstance(raw, bool | str):
        return raw
    if isinstance(raw, int):
        return raw if in_int32(raw) else str(raw)
    if isinstance(raw, datetime):
        text = raw.isoformat()
        return text[:-6] + "Z" if text.endswith("+00:00") else text
    if isinstance(raw, bytes | bytearray):
        return base64.b64encode(raw).decode("ascii")
    return str(raw)

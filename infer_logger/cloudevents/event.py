"""The CloudEvent value object.

Attributes are kept in one flat mapping (context attributes and extensions alike, as the spec's
wire formats do); data is always raw bytes, the form it takes in HTTP/Kafka binary mode. Keeping
bytes means the sidecar never parses a payload on the request path; the JSON format decides at
encode time whether the bytes embed as JSON (`data`) or travel as `data_base64`.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import orjson

AttributeValue = str | int | bool

SPECVERSION = "1.0"
REQUIRED = ("id", "source", "specversion", "type")
OPTIONAL = ("datacontenttype", "dataschema", "subject", "time")


def attribute_text(value: AttributeValue) -> str:
    """The spec's canonical string encoding: binary modes carry every attribute as text."""
    if isinstance(value, bool):  # before int: bool is an int subclass, and str(True) is "True"
        return "true" if value else "false"
    return str(value)


@dataclass(frozen=True, slots=True)
class CloudEvent:
    attributes: dict[str, AttributeValue]
    data: bytes | None = None
    # Extra transport headers seen on ingress (not part of the event); never encoded.
    meta: dict[str, str] = field(default_factory=dict, compare=False, repr=False)

    def __getitem__(self, name: str) -> AttributeValue:
        return self.attributes[name]

    def get(self, name: str, default: Any = None) -> Any:
        return self.attributes.get(name, default)

    @property
    def id(self) -> str:
        return str(self.attributes["id"])

    @property
    def type(self) -> str:
        return str(self.attributes["type"])

    @property
    def datacontenttype(self) -> str | None:
        value = self.attributes.get("datacontenttype")
        return None if value is None else str(value)

    def json(self) -> Any:
        """The data parsed as JSON (raises ValueError when it is not JSON)."""
        if self.data is None:
            return None
        return orjson.loads(self.data)

    def with_attributes(self, **changes: AttributeValue) -> CloudEvent:
        return CloudEvent({**self.attributes, **changes}, self.data)

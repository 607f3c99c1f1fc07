"""The CloudEvent value object.

Attributes are kept in one flat mapping (context attributes and extensions alike, as the spec's
wire formats do); data is always raw bytes, the form it takes in HTTP/Kafka binary mode. Keeping
bytes means the sidecar never parses a payload on the request path; the JSON format decides at
encode time whether the bytes embed as JSON (`data`) or travel as `data_base64`.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, field
from typing import Any

import orjson

AttributeValue = str | int | bool
_LONG_NUMBER = re.compile(rb"\d{19}")

SPECVERSION = "1.0"
REQUIRED = ("id", "source", "specversion", "type")
OPTIONAL = ("datacontenttype", "dataschema", "subject", "time")


class InexactJSONError(ValueError):
    """JSON that orjson would not read as it is written (an integer past 64 bits)."""


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
        """The data parsed as JSON (raises ValueError when it is not JSON, or holds an integer
        past 64 bits: orjson reads one as a float, and the value would change unseen)."""
        if self.data is None:
            return None
        value = orjson.loads(self.data)
        # Only a run of 19 digits may be past int64 (uint64 has 20); stdlib json reads it exactly.
        if _LONG_NUMBER.search(self.data) and json.loads(self.data) != value:
            raise InexactJSONError("the data holds an integer past 64 bits, which would be read as a float")
        return value

    def with_attributes(self, **changes: AttributeValue) -> CloudEvent:
        return CloudEvent({**self.attributes, **changes}, self.data)

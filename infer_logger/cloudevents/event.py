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
# Integers that may be at 2**63 or past (19 digits from 9, or 20 and more); in strings too, then
# only checked: no timestamp in nanoseconds matches.
_DIGITS = bytes(48 if 48 <= byte <= 57 else 32 for byte in range(256))  # every digit a 0, the rest blanks
_RUN_19 = b"0" * 19
_LONG_INTEGER = re.compile(rb"(?<![\d.])(?:9\d{18}|\d{20,})(?![\d.eE])")

SPECVERSION = "1.0"
REQUIRED = ("id", "source", "specversion", "type")
OPTIONAL = ("datacontenttype", "dataschema", "subject", "time")


class InexactJSONError(ValueError):
    """JSON that orjson would not read as it is written (an integer past 64 bits)."""


def _int64(text: str) -> int:
    # Past 20 digits, before int(): Python refuses to read over 4300 (a ValueError, not this).
    if len(text.lstrip("-")) > 20 or not -(2**63) <= (number := int(text)) < 2**64:
        raise InexactJSONError("the data holds an integer past 64 bits, which would be read as a float")
    return number


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
        # Only an integer at 2**63 or past may be past int64 (uint64 ends at 2**64 - 1): one that
        # is, unless in a string, is found by stdlib json, which hands each integer's text to
        # `_int64`. (2**64 comes out of orjson as a float equal to it: telling by comparing the
        # values missed those.)
        if (_RUN_19 in self.data.translate(_DIGITS)  # a C-speed look first: a regex takes ~15 ns a byte
                and any(len(run) > 19 or int(run) >= 2**63 for run in _LONG_INTEGER.findall(self.data))):
            try:
                json.loads(self.data, parse_int=_int64)
            except RecursionError:  # orjson reads 1024 levels, stdlib json fewer: unknown, so not kept
                raise InexactJSONError("the data nests too deep to check its integers") from None
            except InexactJSONError:
                raise
            except ValueError:  # what stdlib json reads otherwise than orjson: orjson's reading stands
                pass
        return value

    def with_attributes(self, **changes: AttributeValue) -> CloudEvent:
        return CloudEvent({**self.attributes, **changes}, self.data)

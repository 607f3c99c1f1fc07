"""The CloudEvent value object.

Attributes are kept in one flat mapping (context attributes and extensions alike, as the spec's
wire formats do); data is always raw bytes, the form it takes in HTTP/Kafka binary mode. Keeping
bytes means the sidecar never parses a payload on the request path; the JSON format decides at
encode time whether the bytes embed as JSON (`data`) or travel as `data_base64`.
"""

from __future__ import annotations

import encodings.aliases
import json
import pkgutil
import re
from dataclasses import dataclass, field
from typing import Any

import orjson

AttributeValue = str | int | bool
# Integers that may be at 2**63 or past (19 digits from 9, or 20 and more). A JSON number starts
# the text or follows a blank, `[`, `,`, `:` or `-`: runs after anything else (a fraction's digits
# after `.`, an id string's after `"`) are no integer, and a scan for them cost ~10 ns a byte on
# every float tensor. In strings too, then only checked: no timestamp in nanoseconds matches.
_BEFORE_NUMBER = b" \t\r\n[,:-"
_DIGITS = bytes(48 if 48 <= byte <= 57 else 32 if byte in _BEFORE_NUMBER else 120 for byte in range(256))
_RUN_19 = b"0" * 19
_AFTER_START = b" " + _RUN_19  # in `_DIGITS`' translation: 19 digits after what may start a number
_LONG_INTEGER = re.compile(rb"(?<![^ \t\r\n\[,:\-])(?:9\d{18}|\d{20,})(?![\d.eE])")
# The codecs Python ships (modules, aliases), as its search normalizes their names: only these are
# looked up, since the search keeps every name it did not find, for good (a made-up one per
# event, in a long-running sidecar or broker). Less those that are no charset of a page: they read
# bytes they would not write (`\x41` as "A"), or only names.
_CHARSETS = frozenset({
    *encodings.aliases.aliases, *encodings.aliases.aliases.values(),
    *(module.name for module in pkgutil.iter_modules(encodings.__path__)),
}) - {"unicode_escape", "raw_unicode_escape", "idna", "punycode", "undefined", "aliases"}
MAX_DEPTH = 1024
"""Nesting levels orjson reads."""

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


def charset(content_type: str | None) -> str | None:
    """The charset a content type names, as written (unquoted), or None."""
    for parameter in (content_type or "").split(";")[1:]:
        name, _, value = parameter.partition("=")
        if name.strip().lower() == "charset":
            return value.strip().strip('"')
    return None


def is_json_type(content_type: str) -> bool:
    """application/json, text/json, any */*+json."""
    subtype = content_type.split(";", 1)[0].strip().lower().partition("/")[2]
    return subtype == "json" or subtype.endswith("+json")


def is_known_charset(name: str) -> bool:
    """Whether `name` is a codec Python ships that may be a charset (base64 and zlib, codecs
    too, still fail as text encodings): only such names are looked up."""
    known = encodings.normalize_encoding(name.lower())
    return known in _CHARSETS or known.replace(".", "_") in _CHARSETS


def may_hold_long_integer(text: bytes) -> bool:
    """Whether JSON text may hold an integer orjson reads as a float (one past 64 bits): only one
    at 2**63 or past may be (uint64 ends at 2**64 - 1). Checked exactly by reading it again."""
    digits = text.translate(_DIGITS)  # a C-speed look first: a regex takes ~15 ns a byte
    # Only where a run of 19 digits follows what may start a number, the regex (a 19-digit time in
    # ns made it read the whole text).
    if digits.startswith(_RUN_19):
        at = 0
    else:
        found = digits.find(_AFTER_START)
        at = -1 if found < 0 else found + 1
    while at >= 0:
        if (run := _LONG_INTEGER.match(text, at)) and (len(run[0]) > 19 or int(run[0]) >= 2**63):
            return True
        found = digits.find(_AFTER_START, at + 19)
        at = -1 if found < 0 else found + 1
    return False


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

    def json(self, *, spare_levels: int = 0) -> Any:
        """The data parsed as JSON (raises ValueError when it is not JSON, or holds an integer
        past 64 bits: orjson reads one as a float, and the value would change unseen; or when
        `spare_levels` more around it, as an event's object and a batch's array, would nest past
        what orjson reads)."""
        data = self.data
        if data is None:
            return None
        if spare_levels and data.count(b"[") + data.count(b"{") >= MAX_DEPTH - spare_levels:  # may be that deep
            value = orjson.loads(b"[" * spare_levels + data + b"]" * spare_levels)  # read once, as readers will
            for _ in range(spare_levels):
                if type(value) is not list or len(value) != 1:  # `1], [2` closes the wrapping itself
                    raise ValueError("not one JSON value")
                value = value[0]
        else:
            value = orjson.loads(data)
        # An integer past 64 bits, unless in a string, is found by stdlib json, which hands each
        # integer's text to `_int64`. (2**64 comes out of orjson as a float equal to it: telling by
        # comparing the values missed those.)
        if may_hold_long_integer(data):
            try:
                json.loads(data, parse_int=_int64)
            except RecursionError:  # orjson reads 1024 levels, stdlib json fewer: unknown, so not kept
                raise InexactJSONError("the data nests too deep to check its integers") from None
            except InexactJSONError:
                raise
            except ValueError:  # what stdlib json reads otherwise than orjson: orjson's reading stands
                pass
        return value

    def with_attributes(self, **changes: AttributeValue) -> CloudEvent:
        return CloudEvent({**self.attributes, **changes}, self.data)

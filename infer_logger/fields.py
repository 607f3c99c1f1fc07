"""Types the settings models share: durations and file names, checked where they are read
(a value no server or file could take raised a traceback where it was used)."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, TypeVar

from pydantic import AfterValidator, Field

from infer_logger.cloudevents.validation import is_string

MAX_SECONDS = 86_400
"""The longest duration a setting takes: a day."""

_Name = TypeVar("_Name", str, Path)


def _at_most_a_day(seconds: float) -> float:
    if seconds > MAX_SECONDS:  # no wait here is meant to be longer (a socket's overflows past 292 years)
        raise ValueError(f"Input should be at most {MAX_SECONDS} seconds (a day)")
    return seconds


# A validator, not `le`: a field's own tighter `le` would be replaced by this one.
Seconds = Annotated[float, Field(allow_inf_nan=False), AfterValidator(_at_most_a_day)]
"""A duration setting: finite and at most a day, each field adding its own `gt`/`ge` 0. `inf`
passed `gt=0`, and ended in an OverflowError traceback where it became a server's timeout."""


def nameable(name: _Name) -> _Name:
    """A setting naming a file: no file can be named with a NUL (open() raised ValueError: a
    traceback, or every write of a sink retried for ever)."""
    if "\0" in str(name):
        raise ValueError(f"{str(name)!r} holds a NUL character")
    return name


NamedPath = Annotated[Path, AfterValidator(nameable)]
"""A setting naming a file or directory."""

NamedFile = Annotated[str, AfterValidator(nameable)]
"""A setting naming a file, kept as text (an SQLite file, a CA bundle)."""

AppendedPath = NamedPath
"""A setting naming a file lines are appended to."""


def attribute_text(value: str) -> str:
    """A setting every event carries as an attribute: a control character (a YAML block scalar's
    newline, a tab) had every event refused downstream (the broker dead-lettered them, the Forward
    source closed every frame's connection, resent for ever)."""
    if value and not is_string(value):
        bad = next(char for char in value if not is_string(char))
        raise ValueError(f"{value!r} holds U+{ord(bad):04X}, which an event attribute (a CloudEvents "
                         "String) cannot: every event would be refused")
    return value


AttributeText = Annotated[str, AfterValidator(attribute_text)]
"""A setting that becomes an event attribute's value ("" where unset is allowed: add min_length)."""

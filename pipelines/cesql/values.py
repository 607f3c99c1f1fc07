"""CESQL values, their types and the casts between them (spec sections 3.1 and 3.7).

A value is a Python `bool`, `int` (always within 32 bits) or `str`. `bool` is tested before
`int` everywhere, because `True` is also an `int` in Python.
"""

from __future__ import annotations

import re
from enum import Enum
from typing import TypeAlias

from pipelines.cesql.errors import CesqlCastError

Value: TypeAlias = bool | int | str

INT32_MIN = -(2**31)
INT32_MAX = 2**31 - 1

_INTEGER_TEXT = re.compile(r"[+-]?[0-9]+")


class ValueType(Enum):
    BOOLEAN = "Boolean"
    INTEGER = "Integer"
    STRING = "String"
    # A parameter that takes any type as it is (the explicit cast functions use it).
    ANY = "Any"


def type_of(value: Value) -> ValueType:
    if isinstance(value, bool):
        return ValueType.BOOLEAN
    if isinstance(value, int):
        return ValueType.INTEGER
    return ValueType.STRING


def zero_value(value_type: ValueType) -> Value:
    """The spec's "zero value"; `false` when the type is unknown (`ANY`), as 3.2 asks."""
    if value_type is ValueType.INTEGER:
        return 0
    if value_type is ValueType.STRING:
        return ""
    return False


def in_int32(number: int) -> bool:
    return INT32_MIN <= number <= INT32_MAX


def cast(value: Value, target: ValueType) -> tuple[Value, CesqlCastError | None]:
    """Explicit cast (`INT`, `BOOL`, `STRING`); on failure, the target's zero value and an error."""
    source = type_of(value)
    if target is ValueType.ANY or source is target:
        return value, None
    if target is ValueType.STRING:
        return (("true" if value else "false") if isinstance(value, bool) else str(value)), None
    if target is ValueType.INTEGER:
        if isinstance(value, bool):
            return int(value), None
        assert isinstance(value, str)
        return _parse_int(value)
    if isinstance(value, int):  # Integer -> Boolean
        return value != 0, None
    lowered = value.lower()
    if lowered in ("true", "false"):
        return lowered == "true", None
    return False, CesqlCastError(f"cannot cast {value!r} to Boolean")


def coerce(value: Value, target: ValueType) -> tuple[Value, CesqlCastError | None]:
    """Implicit cast, applied to operands and function arguments.

    It is `cast` except that an Integer never becomes a Boolean implicitly: the TCK expects
    `NOT 10` to be `true` with a cast error (10 is refused, `false` stands in for it), while
    `BOOL(10)` is `true` without one.
    """
    if target is ValueType.BOOLEAN and type_of(value) is ValueType.INTEGER:
        return False, CesqlCastError(f"cannot implicitly cast integer {value} to Boolean")
    return cast(value, target)


def _parse_int(text: str) -> tuple[int, CesqlCastError | None]:
    # Stricter than int(): no surrounding blanks, no "_" separators, ASCII digits only.
    if _INTEGER_TEXT.fullmatch(text) is None:
        return 0, CesqlCastError(f"cannot cast {text!r} to Integer")
    # int() raises past 4300 digits, leading zeros included: past 10 it is out of range anyway.
    digits = text.lstrip("+-").lstrip("0") or "0"
    number = (-1 if text[0] == "-" else 1) * int(digits) if len(digits) <= 10 else INT32_MAX + 1
    if not in_int32(number):
        return 0, CesqlCastError(f"{text!r} is outside the 32-bit integer range")
    return number, None

"""The CloudEvents 1.0 rules an event must keep, checked in one place.

Every decoder validates what it builds; encoders trust their input, so code that builds events
by hand calls `validate` once, where it builds them. Errors name the attribute at fault.
"""

from __future__ import annotations

import calendar
import functools
import re
from collections.abc import Callable
from datetime import datetime, timedelta, timezone

from infer_logger.cloudevents.event import SPECVERSION, AttributeValue, CloudEvent
from infer_logger.errors import InvalidEventError, MissingAttributeError

_NAME = re.compile(r"[a-z0-9]+")
INT32_MIN, INT32_MAX = -(2**31), 2**31 - 1  # a CloudEvents Integer

# The spec's String type excludes control characters, unpaired surrogates and Unicode
# noncharacters (U+FDD0..U+FDEF and the last two code points of every plane).
_PLANE_ENDS = "".join(f"\\U{p + 0xFFFE:08x}\\U{p + 0xFFFF:08x}" for p in range(0, 0x110000, 0x10000))
_BAD_CHAR = re.compile(f"[\\x00-\\x1f\\x7f-\\x9f\\ud800-\\udfff\\ufdd0-\\ufdef{_PLANE_ENDS}]")

# RFC 3339 section 5.6; the separator may be lower-case "t" and the zone "z" (section 5.6 note).
_TIMESTAMP = re.compile(  # ASCII: RFC 3339's DIGIT is 0-9 (\d also takes "２０２４")
    r"(\d{4})-(\d{2})-(\d{2})[Tt](\d{2}):(\d{2}):(\d{2})(?:\.(\d+))?(?:[Zz]|([+-])(\d{2}):(\d{2}))", re.ASCII
)

# RFC 2045 tokens; parameters as RFC 9110 writes them (optional whitespace around ";"). A quoted
# string holds at most obs-text (up to U+00FF) beyond ASCII: the value travels as an HTTP header
# (content-type), where nothing else can be written, so such an event could never be delivered.
_TOKEN = r"[!#$%&'*+.^_`|~0-9A-Za-z-]+"
_QUOTED = r'"(?:[^"\\\x00-\x08\x0a-\x1f\x7f\u0100-\U0010ffff]|\\[\x09\x20-\x7e])*"'
_MEDIA_TYPE = re.compile(rf"{_TOKEN}/{_TOKEN}(?:[ \t]*;[ \t]*{_TOKEN}=(?:{_TOKEN}|{_QUOTED}))*")

# RFC 3986: the characters a URI may hold (percent-escapes checked whole), and the scheme.
_URI_CHARS = re.compile(r"(?:[A-Za-z0-9\-._~:/?#\[\]@!$&'()*+,;=]|%[0-9A-Fa-f]{2})*")
_SCHEME = re.compile(r"[A-Za-z][A-Za-z0-9+.-]*")


def validate(event: CloudEvent) -> CloudEvent:
    """Return `event` unchanged if it is a valid CloudEvents 1.0 event, else raise.

    Raises MissingAttributeError for an absent required attribute and InvalidEventError for
    any other breach; `.attribute` names the attribute either way.
    """
    attributes = event.attributes
    # specversion first: it decides how the rest is read, so its error is the useful one.
    _check_specversion(attributes.get("specversion"))
    for name in ("id", "source", "type"):
        if name not in attributes:
            raise MissingAttributeError(name)
    for name, value in attributes.items():
        _check_name(name)
        check = _CORE.get(name)
        if check is None:
            _check_extension(name, value)
        else:
            check(name, _non_empty_string(name, value))
    return event


def parse_time(value: str, attribute: str = "time") -> datetime:
    """An RFC 3339 timestamp as an aware datetime (nanoseconds are cut to microseconds)."""
    match = _TIMESTAMP.fullmatch(value)
    if match is None:
        raise InvalidEventError(attribute, f"{value!r} is not an RFC 3339 timestamp")
    year, month, day, hour, minute, second = (int(g) for g in match.group(1, 2, 3, 4, 5, 6))
    fraction, sign, off_hour, off_minute = match.group(7, 8, 9, 10)
    offset = 0 if sign is None else int(off_hour) * 60 + int(off_minute)
    if not (
        year >= 1  # RFC 3339 has year 0000; datetime has not
        and 1 <= month <= 12
        and 1 <= day <= calendar.monthrange(year, month)[1]
        and hour <= 23
        and minute <= 59
        and second <= 60  # 60 is a leap second, which RFC 3339 allows
        and (sign is None or (int(off_hour) <= 23 and int(off_minute) <= 59))
    ):
        raise InvalidEventError(attribute, f"{value!r} has a field out of range")
    micros = int((fraction or "0")[:6].ljust(6, "0"))
    if second == 60:  # datetime cannot hold a leap second: keep the instant just before it
        second, micros = 59, 999_999
    zone = timezone(timedelta(minutes=-offset if sign == "-" else offset))
    return datetime(year, month, day, hour, minute, second, micros, tzinfo=zone)


def _check_specversion(value: AttributeValue | None) -> None:
    if value is None:
        raise MissingAttributeError("specversion")
    version = _non_empty_string("specversion", value)
    if version == "0.3":
        raise InvalidEventError("specversion", "CloudEvents 0.3 is not supported; send 1.0")
    if version != SPECVERSION:
        raise InvalidEventError("specversion", f"unknown specversion {version!r}; only 1.0 is supported")


@functools.lru_cache(maxsize=1024)  # names repeat on every event; only valid ones get cached
def _check_name(name: str) -> None:
    # The spec also recommends at most 20 characters; that is advice, so it is not enforced.
    if not _NAME.fullmatch(name):
        raise InvalidEventError(name, "attribute names are lower-case ASCII letters and digits")
    if name == "data":
        raise InvalidEventError(name, "'data' is reserved and cannot name an attribute")


def _non_empty_string(name: str, value: object) -> str:
    if not isinstance(value, str):
        raise InvalidEventError(name, f"must be a string, not {type(value).__name__}")
    if not value:
        raise InvalidEventError(name, "must be a non-empty string")
    _check_chars(name, value)
    return value


def is_string(value: str) -> bool:
    """Whether `value` is a non-empty CloudEvents String (what `id` must be), without raising:
    for callers that replace a value that is not rather than refuse it."""
    if value.isascii():  # printable ASCII holds none of the excluded characters
        return value.isprintable() and bool(value)
    return _BAD_CHAR.search(value) is None


def percent_escaped(value: str) -> str:
    """`value` as a CloudEvents String: unchanged when it is one, else each character it may not
    hold percent-encoded as its UTF-8 bytes (a tab is `%09`). For callers that keep a value read
    off the wire (a model name off a decoded path, a Fluentd tag) rather than refuse it."""
    if value.isascii() and value.isprintable():  # the usual value: one cheap check
        return value
    return _BAD_CHAR.sub(lambda bad: _percent_encoded(bad.group()), value)


def _percent_encoded(char: str) -> str:
    try:  # a byte the server could not read as UTF-8 (surrogateescape) is that byte again
        raw = char.encode("utf-8", "surrogateescape")
    except UnicodeEncodeError:  # a lone surrogate from elsewhere
        raw = char.encode("utf-8", "surrogatepass")
    return "".join(f"%{byte:02X}" for byte in raw)


@functools.lru_cache(maxsize=256)  # content types repeat; the lookup is half the regex
def is_media_type(value: str) -> bool:
    """Whether `value` can be a `datacontenttype` (an RFC 2046 media type), without raising."""
    return is_string(value) and _MEDIA_TYPE.fullmatch(value) is not None


def _check_chars(name: str, value: str) -> None:
    # Fast path for the common case: printable ASCII holds none of the excluded characters.
    if value.isascii() and value.isprintable():
        return
    bad = _BAD_CHAR.search(value)
    if bad is not None:
        raise InvalidEventError(name, f"U+{ord(bad.group()):04X} is not allowed in a string")


def _check_extension(name: str, value: object) -> None:
    if isinstance(value, bool):  # before int: bool is an int subclass
        return
    if isinstance(value, int):
        if not INT32_MIN <= value <= INT32_MAX:
            raise InvalidEventError(name, f"integer {value} is outside the signed 32-bit range")
    elif isinstance(value, str):
        _check_chars(name, value)
    elif value is None:
        raise InvalidEventError(name, "an unset attribute is left out, not set to None")
    else:
        raise InvalidEventError(name, f"{type(value).__name__} is not a CloudEvents type")


def check_uri_reference(name: str, value: str) -> None:
    """Raise InvalidEventError naming `name` unless `value` is an RFC 3986 URI reference (what
    `source` must be); for settings that become one, checked when they are read."""
    if not _URI_CHARS.fullmatch(value) or value.count("#") > 1:
        raise InvalidEventError(name, f"{value!r} is not a URI reference")
    # A colon before any "/", "?" or "#" ends a scheme; a relative path cannot hold one there.
    head = re.split(r"[/?#]", value, maxsplit=1)[0]
    if ":" in head and not _SCHEME.fullmatch(head.split(":", 1)[0]):
        raise InvalidEventError(name, f"{value!r} has an invalid URI scheme")


def source_setting(uri: str | None, example: str) -> str | None:
    """A setting that becomes the events' `source`, checked as a URI reference when it is read
    (ValueError for pydantic: one that is not had every event refused downstream)."""
    if uri:
        try:
            check_uri_reference("source", uri)
        except InvalidEventError as exc:
            raise ValueError(f"{exc.message}, as the events' source must be (e.g. {example})") from None
    return uri


def _check_uri(name: str, value: str) -> None:
    check_uri_reference(name, value)
    head = re.split(r"[/?#]", value, maxsplit=1)[0]
    # RFC 3986 section 4.3 leaves out the fragment too; schema pointers use one, so it is allowed.
    if ":" not in head:
        raise InvalidEventError(name, f"{value!r} is not an absolute URI (no scheme)")


def _check_media_type(name: str, value: str) -> None:
    if not _MEDIA_TYPE.fullmatch(value):
        raise InvalidEventError(name, f"{value!r} is not an RFC 2046 media type (type/subtype)")


def _check_time(name: str, value: str) -> None:
    parse_time(value, name)


def _check_string(name: str, value: str) -> None:
    """Non-empty with allowed characters is all a plain core string needs."""


_CORE: dict[str, Callable[[str, str], None]] = {
    "id": _check_string,
    "source": check_uri_reference,
    "specversion": _check_string,  # already checked first
    "type": _check_string,
    "datacontenttype": _check_media_type,
    "dataschema": _check_uri,
    "subject": _check_string,
    "time": _check_time,
}

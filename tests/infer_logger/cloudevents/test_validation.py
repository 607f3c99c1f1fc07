from __future__ import annotations

from datetime import UTC, datetime, timedelta
from typing import Any

import pytest

from infer_logger.cloudevents import CloudEvent, is_media_type, parse_time, percent_escaped, validate
from infer_logger.errors import InvalidEventError, MissingAttributeError

BASE = {"specversion": "1.0", "id": "1", "source": "/src", "type": "t"}


def event(**changes: Any) -> CloudEvent:
    return CloudEvent({**BASE, **changes})


def rejected(attributes: dict[str, Any]) -> InvalidEventError:
    with pytest.raises(InvalidEventError) as info:
        validate(CloudEvent(attributes))
    return info.value


class TestRequired:
    """The four required attributes are present, non-empty strings."""

    def test_valid_event_is_returned_unchanged(self) -> None:
        e = event()
        assert validate(e) is e

    @pytest.mark.parametrize("name", ["specversion", "id", "source", "type"])
    def test_missing(self, name: str) -> None:
        attributes = {k: v for k, v in BASE.items() if k != name}
        error = rejected(attributes)
        assert isinstance(error, MissingAttributeError)
        assert error.attribute == name

    @pytest.mark.parametrize("name", ["specversion", "id", "source", "type", "subject", "dataschema"])
    def test_empty(self, name: str) -> None:
        assert rejected({**BASE, name: ""}).attribute == name

    @pytest.mark.parametrize("value", [25, True, None])
    def test_core_attributes_are_strings(self, value: Any) -> None:
        error = rejected({**BASE, "id": value})
        assert error.attribute == "id"

    def test_specversion_is_checked_before_the_rest(self) -> None:
        error = rejected({"id": 5, "specversion": "0.9"})
        assert error.attribute == "specversion"


class TestSpecversion:
    """Only 1.0 is supported; 0.3 gets its own message."""

    def test_v03_rejected_clearly(self) -> None:
        error = rejected({**BASE, "specversion": "0.3"})
        assert error.attribute == "specversion"
        assert "0.3 is not supported" in error.message

    @pytest.mark.parametrize("version", ["0.9", "1", "1.0.2", "2.0"])
    def test_unknown(self, version: str) -> None:
        error = rejected({**BASE, "specversion": version})
        assert error.attribute == "specversion" and "only 1.0" in error.message


class TestNames:
    """Attribute names are lower-case ASCII letters and digits, and not 'data'."""

    @pytest.mark.parametrize("name", ["MyExtension", "my.extension", "my_ext", "my-ext", "é", "", "data"])
    def test_invalid(self, name: str) -> None:
        assert rejected({**BASE, name: "x"}).attribute == name

    def test_long_names_are_only_advised_against(self) -> None:
        validate(event(averyveryverylongextensionname1234="x"))


class TestExtensionValues:
    """Extensions are str, bool or 32-bit int."""

    @pytest.mark.parametrize("value", ["", "text", True, False, 0, -(2**31), 2**31 - 1])
    def test_valid(self, value: Any) -> None:
        validate(event(ext=value))

    @pytest.mark.parametrize("value", [2**31, -(2**31) - 1, 1.5, None, b"x", [1], {"a": 1}])
    def test_invalid(self, value: Any) -> None:
        assert rejected({**BASE, "ext": value}).attribute == "ext"


class TestStrings:
    """The spec's String type excludes control characters, surrogates and noncharacters."""

    @pytest.mark.parametrize("char", ["\x00", "\n", "\x1f", "\x7f", "\x9f", "\ud800", "\ufdd0", "\ufffe", "\U0010ffff"])
    def test_disallowed(self, char: str) -> None:
        assert rejected({**BASE, "subject": f"a{char}b"}).attribute == "subject"
        assert rejected({**BASE, "ext": f"a{char}b"}).attribute == "ext"

    def test_unicode_allowed(self) -> None:
        validate(event(subject="Euro € 😀 世界", ext="no-break\u00a0space"))

    def test_percent_escaped_replaces_only_what_a_string_may_not_hold(self) -> None:
        assert percent_escaped("plain ascii") == "plain ascii"
        assert percent_escaped("Euro € \u00a0") == "Euro € \u00a0"
        escaped = percent_escaped("a\tb\x85c\ufffe\x7f")
        assert escaped == "a%09b%C2%85c%EF%BF%BE%7F"
        validate(event(ext=escaped))


class TestTime:
    """RFC 3339 timestamps, with ranges checked."""

    @pytest.mark.parametrize(
        "value",
        [
            "2018-04-05T17:31:00Z",
            "2018-04-05t17:31:00z",
            "2018-04-05T17:31:00.000000000Z",
            "2018-04-05T18:31:00+01:00",
            "2018-04-05T16:31:00-01:00",
            "2016-12-31T23:59:60Z",
            "2024-02-29T00:00:00Z",
        ],
    )
    def test_valid(self, value: str) -> None:
        validate(event(time=value))

    @pytest.mark.parametrize(
        "value",
        [
            "lunchtime",
            "2018-04-05T18:31Z",
            "2018-04-05T18:31:00X",
            "2018-04-05T18:31:00+25:00",
            "2018-04-05T18:31:00+xx:00",
            "2018-04-05T18:31:00+05",
            "2018-04-05T18:31:00",
            "2018-04-05 18:31:00Z",
            "2018-13-05T18:31:00Z",
            "2023-02-29T00:00:00Z",
            "2018-04-05T24:00:00Z",
            "2018-04-05T18:31:00.Z",
            "0000-01-01T00:00:00Z",  # RFC 3339's, not datetime's: a ValueError (500s) before
            "\uff12\uff10\uff11\uff18-04-05T18:31:00Z",  # full-width digits: \d took them
            "2018-04-05T18:31:00.\u0661Z",
        ],
    )
    def test_invalid(self, value: str) -> None:
        assert rejected({**BASE, "time": value}).attribute == "time"

    def test_parse_time_keeps_the_instant(self) -> None:
        assert parse_time("2018-04-05T18:31:00+01:00") == datetime(2018, 4, 5, 17, 31, tzinfo=UTC)
        parsed = parse_time("2018-04-05T16:31:00.123456789-01:00")
        assert parsed.utcoffset() == -timedelta(hours=1)
        assert parsed.microsecond == 123456

    def test_leap_second_is_the_instant_before(self) -> None:
        expected = datetime(2016, 12, 31, 23, 59, 59, 999999, tzinfo=UTC)
        assert parse_time("2016-12-31T23:59:60Z") == expected

    def test_parse_time_names_the_attribute(self) -> None:
        with pytest.raises(InvalidEventError) as info:
            parse_time("nope", "recordedtime")
        assert info.value.attribute == "recordedtime"


class TestDataContentType:
    """RFC 2046 media types: type/subtype and parameters."""

    @pytest.mark.parametrize(
        "value",
        [
            "application/json",
            "text/plain; charset=us-ascii",
            "application/json;charset=utf-8",
            "application/vnd.api+json",
            'multipart/form-data; boundary="a b"',
            'text/plain; x="caf\u00e9"',  # obs-text: a header can carry it
            "*/*",
        ],
    )
    def test_valid(self, value: str) -> None:
        validate(event(datacontenttype=value))
        assert is_media_type(value)

    # Past U+00FF no header can carry it: taken, such an event could never be delivered (binary mode).
    @pytest.mark.parametrize("value", ["xyz", "", "text/", "/json", "text/plain;", "text plain", "a/b; c",
                                       'text/plain; charset="\u20ac"', 'text/plain; x="\x85"', "a/b;\tc=d"])
    def test_invalid(self, value: str) -> None:
        assert rejected({**BASE, "datacontenttype": value}).attribute == "datacontenttype"
        assert not is_media_type(value)


class TestUris:
    """source is a URI reference, dataschema an absolute URI."""

    @pytest.mark.parametrize(
        "value",
        [
            "https://cloudevents.io",
            "#fragment",
            "//authority/path",
            "/mycontext/subcontext",
            "1-555-123-4567",
            "urn:uuid:6e8bc430-9c3a-11d9-9669-0800200c9a66",
            "mailto:someone@example.com",
            "a%20b",
            "http://localhost:9081/",
        ],
    )
    def test_valid_source(self, value: str) -> None:
        validate(event(source=value))

    @pytest.mark.parametrize("value", ["<event-source>", "a b", "a#b#c", "1http:x", "%zz", "é"])
    def test_invalid_source(self, value: str) -> None:
        assert rejected({**BASE, "source": value}).attribute == "source"

    @pytest.mark.parametrize("value", ["https://example.com/schema", "urn:x:y", "https://x/s.json#/defs/a"])
    def test_valid_dataschema(self, value: str) -> None:
        validate(event(dataschema=value))

    @pytest.mark.parametrize("value", ["/relative/schema", "schema.json", "", "https://x y"])
    def test_invalid_dataschema(self, value: str) -> None:
        assert rejected({**BASE, "dataschema": value}).attribute == "dataschema"

from __future__ import annotations

import json

import pytest

import infer_logger.cloudevents as package
from infer_logger.cloudevents import AttributeValue, CloudEvent, attribute_text
from infer_logger.cloudevents.event import InexactJSONError


class TestAttributeText:
    """The spec's canonical string encoding of attribute values."""

    @pytest.mark.parametrize(
        ("value", "text"), [(True, "true"), (False, "false"), (0, "0"), (-5, "-5"), ("x y", "x y")]
    )
    def test_encoding(self, value: AttributeValue, text: str) -> None:
        assert attribute_text(value) == text


class TestCloudEvent:
    """The value object others build on."""

    def test_meta_is_not_part_of_equality(self) -> None:
        assert CloudEvent({"id": "1"}, b"x", {"user-agent": "a"}) == CloudEvent({"id": "1"}, b"x")

    def test_accessors(self) -> None:
        event = CloudEvent({"id": "1", "type": "t", "datacontenttype": "application/json"}, b'{"a":1}')
        assert (event.id, event.type, event.datacontenttype, event["id"]) == ("1", "t", "application/json", "1")
        assert event.json() == {"a": 1} and event.get("nope", 3) == 3
        assert event.with_attributes(id="2").id == "2" and event.id == "1"


def test_exports() -> None:
    """__all__ lists exactly the public names the package defines or re-exports."""
    public = {name for name in vars(package) if not name.startswith("_")}
    modules = {"event", "http", "json_format", "kafka", "validation"}
    assert set(package.__all__) == public - modules
    assert len(package.__all__) == len(set(package.__all__))


class TestJsonIsExact:
    """`json()` refuses data orjson would read otherwise than written: an integer past 64 bits
    comes out a float (the audit record said 1.2345678901234568e+29)."""

    @pytest.mark.parametrize("data", [
        b"[18446744073709551615, -9223372036854775808, 9223372036854775807]",  # the ends of the range
        b'["123456789012345678901234567890", 1.23456789012345678901]',  # in a string; a float's digits
        b'{"t": 1700000000123456789}',  # nanoseconds
        b'[0.000123456789012345678901, 1e-123456789012345678901, "id 123456789012345678901"]',
    ])
    def test_what_reads_as_written(self, data: bytes) -> None:
        event = CloudEvent({"id": "1"}, data)
        assert event.json() == json.loads(data)

    @pytest.mark.parametrize("data", [
        b"[123456789012345678901234567890]", b"[-9223372036854775809]",
        b"[18446744073709551616]", b"[100000000000000000000]",  # equal to the floats orjson makes of them
        b"[" * 1000 + b"99999999999999999999" + b"]" * 1000,  # deeper than stdlib json reads: not known
        # Wherever a number may stand: first, after `:`, `,`, `-` and blanks.
        b"123456789012345678901", b'{"a":99999999999999999999}', b"[1,\r\n\t 99999999999999999999]",
        b'{"a": -99999999999999999999, "b": "x"}',
    ])
    def test_integers_past_64_bits(self, data: bytes) -> None:
        with pytest.raises(InexactJSONError):
            CloudEvent({"id": "1"}, data).json()

    @pytest.mark.parametrize("data", [b"1], [2", b'"' + b"[" * 1100 + b'"], ["tail"', b"[" * 1100 + b"]" * 1099 + b"], ["])
    def test_data_that_closes_the_wrapping_is_not_json(self, data: bytes) -> None:
        """Read wrapped in spare levels, `X], [Y` closed them itself: X was taken for the data,
        and the raw bytes, embedded, made an event no reader could read."""
        with pytest.raises(ValueError):
            CloudEvent({"id": "1"}, data).json(spare_levels=2)

    @pytest.mark.parametrize(("depth", "spare", "reads"), [(1022, 2, True), (1023, 2, False), (1024, 0, True)])
    def test_spare_levels(self, depth: int, spare: int, reads: bool) -> None:
        """Data to be wrapped `spare` levels deeper (an event's object, a batch's array) must read so."""
        event = CloudEvent({"id": "1"}, b"[" * depth + b"]" * depth)
        if reads:
            assert event.json(spare_levels=spare) is not None
        else:
            with pytest.raises(ValueError):
                event.json(spare_levels=spare)

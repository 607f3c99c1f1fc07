from __future__ import annotations

import pytest

import infer_logger.cloudevents as package
from infer_logger.cloudevents import AttributeValue, CloudEvent, attribute_text


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

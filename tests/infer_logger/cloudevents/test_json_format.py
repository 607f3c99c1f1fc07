from __future__ import annotations

from typing import Any

import orjson
import pytest

from infer_logger.cloudevents import (
    BATCH_MEDIA_TYPE,
    EVENT_MEDIA_TYPE,
    AttributeValue,
    CloudEvent,
    attribute_text,
    from_dict,
    from_http,
    from_json,
    from_json_batch,
    to_binary,
    to_dict,
    to_json,
    to_json_batch,
    to_json_batches,
)
from infer_logger.errors import InvalidEventError, MissingAttributeError

from .conformance import (
    GOLDEN_BATCHES,
    assert_attributes,
    assert_data,
    assert_same_event,
    cases,
    format_event,
    golden,
    is_json_type,
    load,
    params,
)

BASE = {"specversion": "1.0", "id": "1", "source": "/src", "type": "t"}


def written(data: bytes | None, content_type: str | None = None) -> dict[str, Any]:
    attributes: dict[str, AttributeValue] = dict(BASE)
    if content_type is not None:
        attributes["datacontenttype"] = content_type
    members: dict[str, Any] = orjson.loads(to_json(CloudEvent(attributes, data)))
    return members


class TestWriteData:
    """Bytes become `data` (JSON or text) or `data_base64`, by content type and content."""

    @pytest.mark.parametrize("content_type", [None, "application/json", "text/json", "application/vnd.api+json", "application/json; charset=utf-8"])
    def test_json_bytes_embed(self, content_type: str | None) -> None:
        assert written(b'{"a": [1, 2.5, null]}', content_type)["data"] == {"a": [1, 2.5, None]}

    def test_embedding_keeps_the_bytes(self) -> None:
        raw = to_json(CloudEvent({**BASE, "datacontenttype": "application/json"}, b'{ "b" : 1 }\n'))
        assert b'"data":{ "b" : 1 }\n}' in raw

    @pytest.mark.parametrize("content_type", [None, "application/json"])
    def test_json_type_but_not_json_goes_base64(self, content_type: str | None) -> None:
        members = written(b"test", content_type)
        assert "data" not in members and members["data_base64"] == "dGVzdA=="

    def test_text_under_a_non_json_type_is_a_string(self) -> None:
        assert written("héllo\n".encode(), "text/plain")["data"] == "héllo\n"

    def test_non_utf8_under_a_text_type_goes_base64(self) -> None:
        assert written(b"\xff\xfe", "text/plain")["data_base64"] == "//4="

    @pytest.mark.parametrize("embed", [True, False], ids=["to_json", "to_dict"])
    def test_json_null_data_goes_base64(self, embed: bool) -> None:
        """`"data": null` reads as no data: a predictor's `null` answer was lost."""
        event = CloudEvent({**BASE, "datacontenttype": "application/json"}, b"null")
        members = orjson.loads(to_json(event)) if embed else to_dict(event)
        assert "data" not in members and from_dict(members).data == b"null"

    @pytest.mark.parametrize("encode", [
        to_json, lambda event: to_json_batch([event]), lambda event: orjson.dumps(to_dict(event)),
    ], ids=["to_json", "to_json_batch", "to_dict"])
    def test_an_integer_past_64_bits_keeps_its_value(self, encode: Any) -> None:
        """Embedded, it read back as a float (1.2345678901234568e+22) in every structured hop."""
        data = b'{"instances": [[12345678901234567890123, 1]]}'
        members = orjson.loads(encode(CloudEvent({**BASE, "datacontenttype": "application/json"}, data)))
        members = members[0] if isinstance(members, list) else members
        assert "data" not in members and from_dict(members).data == data

    @pytest.mark.parametrize("depth", [1022, 1023, 1024])
    def test_data_as_deep_as_orjson_reads_still_reads_back(self, depth: int) -> None:
        """The event's object and a batch's array add two levels: 1023-deep data made a batch
        (1024: an event too) that no reader could read."""
        data = b"[" * depth + b"]" * depth
        event = CloudEvent({**BASE, "datacontenttype": "application/json"}, data)
        assert from_json(to_json(event)).data == data
        assert from_json_batch(to_json_batch([event]))[0].data == data
        assert ("data" in orjson.loads(to_json_batch([event]))[0]) is (depth <= 1022)

    @pytest.mark.parametrize(("content_type", "as_text"), [
        ("text/plain; charset=utf-8", True), ('text/plain; charset="UTF-8"', True),
        ("text/csv; header=present; charset=us-ascii", True), ("text/plain; format=flowed", True),
        ("text/plain; charset=iso-8859-1", False), ("text/plain;charset=utf-16le", False),
    ])
    def test_text_in_another_charset_goes_base64(self, content_type: str, as_text: bool) -> None:
        """UTF-16 `ab` was written as the string 'a\x00b\x00', Latin-1 `été` (read as UTF-8)
        as 'Ã©tÃ©': readers of the JSON (Elasticsearch, Fluentd) saw other text."""
        data = "été".encode() if as_text else "ab".encode("utf-16le")
        members = written(data, content_type)
        assert ("data" in members) is as_text and from_dict(members).data == data

    def test_no_data_no_member(self) -> None:
        members = written(None, "application/json")
        assert "data" not in members and "data_base64" not in members

    def test_typed_extensions_kept(self) -> None:
        members = orjson.loads(to_json(CloudEvent({**BASE, "n": 5, "b": False})))
        assert members["n"] == 5 and members["b"] is False

    def test_to_dict_parses_embedded_json(self) -> None:
        event = CloudEvent({**BASE, "datacontenttype": "application/json"}, b"[1]")
        assert to_dict(event) == {**event.attributes, "data": [1]}


class TestReadData:
    """`data` and `data_base64` become the bytes binary mode would carry."""

    def test_json_value_becomes_its_json_text(self) -> None:
        event = from_dict({**BASE, "datacontenttype": "application/json", "data": {"a": 1}})
        assert orjson.loads(event.data or b"") == {"a": 1}

    def test_json_string_keeps_its_quotes(self) -> None:
        event = from_dict({**BASE, "datacontenttype": "application/json", "data": "hi"})
        assert event.data == b'"hi"'

    def test_absent_content_type_is_spelled_out_as_json(self) -> None:
        event = from_dict({**BASE, "data": "hi"})
        assert event.datacontenttype == "application/json" and event.data == b'"hi"'

    def test_base64_implies_no_content_type(self) -> None:
        event = from_dict({**BASE, "data_base64": "eyAieHl6IjogMTIzIH0="})
        assert event.datacontenttype is None and event.data == b'{ "xyz": 123 }'

    def test_string_under_a_text_type_is_its_utf8(self) -> None:
        assert from_dict({**BASE, "datacontenttype": "text/plain", "data": "é"}).data == "é".encode()

    def test_non_string_under_a_text_type_is_its_json_text(self) -> None:
        assert from_dict({**BASE, "datacontenttype": "text/plain", "data": [1]}).data == b"[1]"

    def test_nulls_mean_unset(self) -> None:
        event = from_dict({**BASE, "subject": None, "ext": None, "data": None, "data_base64": None})
        assert event.attributes == BASE and event.data is None

    def test_data_nested_deeper_than_orjson_writes(self) -> None:
        """orjson reads 1024 levels but writes 254: a predictor's payload 300 deep, read from
        the JSON format, raised a TypeError (the broker's ingress answered 500, a Kafka source
        stopped), as deep as it reads."""
        for depth in (150, 511):  # two levels each: 300 and 1022
            deep = b'[{"a":' * depth + b"1" + b"}]" * depth
            assert from_dict({**BASE, "datacontenttype": "application/json", "data": orjson.loads(deep)}).data == deep

    def test_both_data_members_rejected(self) -> None:
        with pytest.raises(InvalidEventError) as info:
            from_dict({**BASE, "data": "x", "data_base64": "eA=="})
        assert info.value.attribute == "data"

    @pytest.mark.parametrize("encoded", ["not base64!", 5])
    def test_bad_base64(self, encoded: Any) -> None:
        with pytest.raises(InvalidEventError) as info:
            from_dict({**BASE, "data_base64": encoded})
        assert info.value.attribute == "data_base64"

    @pytest.mark.parametrize("value", [1.5, [1], {"a": 1}])
    def test_attribute_json_types(self, value: Any) -> None:
        with pytest.raises(InvalidEventError) as info:
            from_dict({**BASE, "ext": value})
        assert info.value.attribute == "ext"

    @pytest.mark.parametrize("raw", [b"", b"{", b"123", b"[]", b'"x"'])
    def test_not_an_object(self, raw: bytes) -> None:
        with pytest.raises(InvalidEventError) as info:
            from_json(raw)
        assert info.value.attribute == ""

    def test_round_trip(self) -> None:
        event = CloudEvent({**BASE, "datacontenttype": "image/png", "n": -3, "flag": True}, b"\x89PNG")
        assert from_json(to_json(event)) == event
        assert from_json(to_json(event).decode()) == event


class TestBatch:
    """A batch is a JSON array of events; errors say which item."""

    def test_round_trip(self) -> None:
        events = [CloudEvent(dict(BASE)), CloudEvent({**BASE, "datacontenttype": "text/plain"}, b"x")]
        assert from_json_batch(to_json_batch(events)) == events
        assert to_json_batch([]) == b"[]"

    @pytest.mark.parametrize("limit", [1, 300, 700, 10**6])
    def test_batches_up_to_a_size(self, limit: int) -> None:
        """In order, each as to_json_batch would write it, within the limit or one event alone."""
        events = [CloudEvent({**BASE, "id": str(i), "datacontenttype": "text/plain"}, b"x" * (i * 40))
                  for i in range(10)]
        batches = list(to_json_batches(events, limit))
        assert [e for chunk, _ in batches for e in chunk] == events
        assert all(body == to_json_batch(chunk) for chunk, body in batches)
        assert all(len(body) <= limit or len(chunk) == 1 for chunk, body in batches)
        assert len(batches) == {1: 10, 10**6: 1}.get(limit, len(batches))
        assert list(to_json_batches([], limit)) == []

    def test_not_an_array(self) -> None:
        with pytest.raises(InvalidEventError):
            from_json_batch(orjson.dumps(BASE))

    def test_item_error_keeps_type_attribute_and_index(self) -> None:
        missing = {k: v for k, v in BASE.items() if k != "type"}
        with pytest.raises(MissingAttributeError) as info:
            from_json_batch(orjson.dumps([BASE, missing]))
        assert info.value.attribute == "type"
        assert "in batch item 1" in info.value.__notes__


# --- conformance: format-json (cloudevents/conformance, branch format-tests) -----------------

INVALID_EVENT_ATTRIBUTE = {
    "invalidNoSpecVersion": "specversion",
    "invalidNoId": "id",
    "invalidNoType": "type",
    "invalidNoSource": "source",
    "invalidTimeGarbage": "time",
    "invalidTimeToMinute": "time",
    "invalidTimeOffsetX": "time",
    "invalidTimeOffsetOutOfRange": "time",
    "invalidTimeOffsetNonInteger": "time",
    "invalidTimeOffsetHourOnly": "time",
    "invalidEmptyId": "id",
    "invalidEmptyType": "type",
    "invalidEmptySource": "source",
    "invalidEmptySpecVersion": "specversion",
    "invalidUnknownSpecVersion": "specversion",
    "invalidNonRfc2046DataContentType": "datacontenttype",
    "invalidEmptyDataContentType": "datacontenttype",
    "invalidEmptyDataSchema": "dataschema",
    "invalidEmptySubject": "subject",
    "invalidNumericId": "id",
    "invalidObjectId": "id",
    "invalidCapitalizedExtension": "MyExtension",
    "invalidPunctuatedExtension": "my.extension",
    "invalidNonIntegerExtensionValue": "my.extension",
    "invalidBothDataAndDataBase64": "data",
}
INVALID_BATCH_ATTRIBUTE = {
    "invalidBatchMixedSpecVersions": "specversion",
    "invalidBatchContainingInvalidCloudEvent": "id",
    "invalidBatchContainingNonObject": "",  # no attribute to blame: the item is not an object
}


class TestFormatJsonConformance:
    """Every format-json case: valid ones equal their golden sample, invalid ones are refused."""

    @pytest.mark.parametrize("case", cases("format-json/valid-events.json", "tests"))
    def test_valid_event(self, case: dict[str, Any]) -> None:
        event = from_json(orjson.dumps(case["event"]))
        assert_same_event(event, golden(case["id"], case["sampleId"]))

    @pytest.mark.parametrize("case", cases("format-json/invalid-events.json", "tests"))
    def test_invalid_event(self, case: dict[str, Any]) -> None:
        with pytest.raises(InvalidEventError) as info:
            from_json(orjson.dumps(case["event"]))
        assert info.value.attribute == INVALID_EVENT_ATTRIBUTE[case["id"]]

    @pytest.mark.parametrize("case", cases("format-json/valid-batches.json", "tests"))
    def test_valid_batch(self, case: dict[str, Any]) -> None:
        events = from_json_batch(orjson.dumps(case["batch"]))
        expected = GOLDEN_BATCHES[case["sampleId"]]
        assert len(events) == len(expected)
        for event, sample in zip(events, expected, strict=True):
            assert_same_event(event, sample)

    @pytest.mark.parametrize("case", cases("format-json/invalid-batches.json", "tests"))
    def test_invalid_batch(self, case: dict[str, Any]) -> None:
        with pytest.raises(InvalidEventError) as info:
            from_json_batch(orjson.dumps(case["batch"]))
        assert info.value.attribute == INVALID_BATCH_ATTRIBUTE[case["id"]]


# --- conformance: sdk-python json-format vectors ---------------------------------------------


class TestSdkJsonVectors:
    """Write and read vectors; the SDK's exact whitespace (`sdk_exact`) is compared as JSON."""

    @pytest.mark.parametrize("case", cases("sdk-python/json-format-vectors.json", "write"))
    def test_write(self, case: dict[str, Any]) -> None:
        event = format_event(case["event"])
        written = orjson.loads(to_json(event))
        assert to_dict(event) == written
        if "expect_json" in case:
            assert written == case["expect_json"]
        for name, value in case.get("expect_json_subset", {}).items():
            assert written[name] == value
        if "sdk_exact" in case:
            assert written == orjson.loads(case["sdk_exact"])

    @pytest.mark.parametrize("case", cases("sdk-python/json-format-vectors.json", "read"))
    def test_read(self, case: dict[str, Any]) -> None:
        event = from_json(case["json"])
        assert_attributes(event, case.get("expect_attributes", {}))
        assert_data(event, case)


# --- conformance: spec json-format examples --------------------------------------------------

_SPEC = "spec-examples/json-format-examples.yaml"


def _spec_examples(key: str) -> list[Any]:
    data = load(_SPEC)
    return params(None if data is None else ((_example_id(e), e) for e in data[key]))


def _example_id(example: dict[str, Any]) -> str:
    if "id" in example:
        return str(example["id"])
    kind = str(example["type"]).replace(" (null)", "-null")  # the attribute type table has no ids
    return f"{example['attribute']}-{kind}"


def _canonical(attributes: dict[str, Any]) -> dict[str, str]:
    return {name: attribute_text(value) for name, value in attributes.items()}


def _same_data(a: CloudEvent, b: CloudEvent) -> bool:
    if a.data is not None and b.data is not None and is_json_type(a.datacontenttype):
        return bool(orjson.loads(a.data) == orjson.loads(b.data))
    return a.data == b.data


def _body_matches(body: bytes, expected: str, content_type: str | None) -> bool:
    if content_type is not None and is_json_type(content_type):
        return bool(orjson.loads(body) == orjson.loads(expected))  # JSON whitespace is not significant
    return body == expected.encode()


class TestSpecJsonExamples:
    """Each structured example and the spec's own HTTP binary rendering are the same event."""

    @pytest.mark.parametrize("example", _spec_examples("examples"))
    def test_structured_to_binary(self, example: dict[str, Any]) -> None:
        structured, binary = dict(example["structured"]), example["http_binary"]
        if example.get("data_elided"):
            structured.pop("data_base64")  # "... base64 encoded string ..." is no data
        headers, body = to_binary(from_json(orjson.dumps(structured)))
        expected = {k.lower(): v for k, v in binary["headers"].items()}
        assert headers == expected
        assert not set(binary.get("headers_absent", [])) & set(headers)
        if not binary.get("body_elided"):
            assert _body_matches(body, binary["body"], headers.get("content-type"))

    @pytest.mark.parametrize("example", _spec_examples("examples"))
    def test_binary_to_structured(self, example: dict[str, Any]) -> None:
        binary, structured = example["http_binary"], dict(example["structured"])
        body = binary["body"].encode()
        if binary.get("body_elided"):  # no data invented for it: the attributes still map
            structured.pop("data_base64")
            body = b""
        event = from_http(binary["headers"], body)
        expected = from_json(orjson.dumps(structured))
        # Binary mode carries every attribute as text, so compare canonical strings.
        assert _canonical(event.attributes) == _canonical(expected.attributes)
        assert _same_data(event, expected)
        again = from_json(to_json(event))
        assert _same_data(again, event)
        if event.datacontenttype is None and again.data is not None:
            # A body without Content-Type that parses as JSON is written as JSON `data` (absent
            # means JSON to the format); reading it back spells out the implied type.
            assert again.attributes == {**event.attributes, "datacontenttype": "application/json"}
        else:
            assert again.attributes == event.attributes

    @pytest.mark.parametrize("example", _spec_examples("batch_examples"))
    def test_batch(self, example: dict[str, Any]) -> None:
        batch = [dict(item) for item in example["batch"]]
        if example.get("data_elided_in_first_event"):
            batch[0].pop("data_base64")
        assert example["content_type"] == BATCH_MEDIA_TYPE
        events = from_json_batch(orjson.dumps(batch))
        assert [e.attributes["id"] for e in events] == [item["id"] for item in batch]
        assert from_json_batch(to_json_batch(events)) == events

    @pytest.mark.parametrize("example", _spec_examples("attribute_type_examples"))
    def test_attribute_type(self, example: dict[str, Any]) -> None:
        name, value = example["attribute"], orjson.loads(example["json"])
        event = from_json(orjson.dumps({**BASE, name: value}))
        assert event.get(name) == value  # null leaves it unset: get() gives None

    def test_media_types(self, conformance_dir: Any) -> None:
        assert load(_SPEC)["media_types"] == {"event": EVENT_MEDIA_TYPE, "batch": BATCH_MEDIA_TYPE}


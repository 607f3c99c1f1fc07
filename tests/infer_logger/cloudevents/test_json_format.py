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
    from_http_many,
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


def from_dict_raw(members: bytes) -> CloudEvent:
    """An event read from BASE's JSON text with `members` (JSON text) added."""
    return from_json(orjson.dumps(BASE)[:-1] + b"," + members + b"}")


class TestWriteData:
    """Bytes become `data` (JSON or text) or `data_base64`, by content type and content."""

    @pytest.mark.parametrize("content_type", ["application/json", "text/json", "application/vnd.api+json", "application/json; charset=utf-8"])
    def test_json_bytes_embed(self, content_type: str) -> None:
        assert written(b'{"a": [1, 2.5, null]}', content_type)["data"] == {"a": [1, 2.5, None]}

    @pytest.mark.parametrize("data", [b'{"a": 1}', b"123", b'"text"', b"text", b"\xff"])
    def test_bytes_of_no_stated_type_go_base64(self, data: bytes) -> None:
        """JSON `data` without datacontenttype reads as application/json (spec 3.1.2), so bytes
        that happened to parse as JSON came back typed: one structured hop (the broker's, a
        Kafka structured sink's) changed the event. The spec writes them as `data_base64`."""
        event = CloudEvent(dict(BASE), data)
        members = orjson.loads(to_json(event))
        assert "data" not in members and "datacontenttype" not in members
        assert from_json(to_json(event)) == event and from_dict(to_dict(event)) == event

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

    @pytest.mark.parametrize(("content_type", "data", "as_text"), [
        ("text/plain; charset=utf-8", "été".encode(), True), ('text/plain; charset="UTF-8"', "été".encode(), True),
        ("text/csv; header=present; charset=us-ascii", b"a,b", True), ("text/plain; format=flowed", "été".encode(), True),
        ("text/plain; charset=iso-8859-1", "été".encode("latin-1"), False),
        ("text/plain;charset=utf-16le", "ab".encode("utf-16le"), False),
        ("text/plain; charset=us-ascii", "été".encode(), False),  # no US-ASCII text: read back, refused
    ])
    def test_text_in_another_charset_goes_base64(self, content_type: str, data: bytes, as_text: bool) -> None:
        """UTF-16 `ab` was written as the string 'a\x00b\x00', Latin-1 `été` (read as UTF-8)
        as 'Ã©tÃ©': readers of the JSON (Elasticsearch, Fluentd) saw other text."""
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

    @pytest.mark.parametrize(("content_type", "value", "data"), [
        ("text/plain; charset=iso-8859-1", "café", b"caf\xe9"),
        ('text/csv; header=present; charset="Windows-1252"', "5 €", b"5 \x80"),
        ("text/plain;charset=utf-16le", "ab", b"a\x00b\x00"),
        ("text/plain; charset=us-ascii", "abc", b"abc"),
        ("text/plain; charset=UTF-8", "café", "café".encode()),
        # JSON is UTF-8 whatever its label says (RFC 8259 11), as the writer embeds it: re-encoded,
        # a legacy client's `charset=ISO-8859-1` changed its JSON, or had it refused.
        ("application/json; charset=iso-8859-1", "é", '"é"'.encode()),
        ("application/vnd.api+json; charset=us-ascii", {"日本": [1]}, '{"日本":[1]}'.encode()),
    ])
    def test_text_is_written_in_the_charset_its_type_names(self, content_type: str, value: Any, data: bytes) -> None:
        """Written as UTF-8 whatever the charset, `café` went on in binary mode as b'caf\\xc3\\xa9'
        labelled iso-8859-1: its receivers read 'cafÃ©'."""
        event = from_dict({**BASE, "datacontenttype": content_type, "data": value})
        assert event.data == data
        assert from_json(to_json(event)) == event  # read back as written (base64 past UTF-8)

    @pytest.mark.parametrize(("content_type", "value", "attribute"), [
        ("text/plain; charset=iso-8859-1", "日本", "data"),
        ("text/plain; charset=us-ascii", "café", "data"),
        ("text/plain; charset=no-such-charset", "x", "datacontenttype"),
        ("text/plain; charset=base64", "x", "datacontenttype"),  # a codec, but not to text
        ("text/plain; charset=unicode_escape", "x", "datacontenttype"),  # Python's, no page's
        ("text/plain; charset=latin\x001", "x", "datacontenttype"),  # a NUL: a ValueError, not refused
    ])
    def test_text_its_charset_cannot_hold_is_refused(self, content_type: str, value: Any, attribute: str) -> None:
        with pytest.raises(InvalidEventError) as info:
            from_dict({**BASE, "datacontenttype": content_type, "data": value})
        assert info.value.attribute == attribute

    def test_non_string_under_a_text_type_is_its_json_text(self) -> None:
        assert from_dict({**BASE, "datacontenttype": "text/plain", "data": [1]}).data == b"[1]"

    def test_non_string_under_a_text_type_is_its_json_text_in_its_charset(self) -> None:
        """JSON's own text is UTF-8, but under a text type the label's charset holds, as a string's."""
        event = from_dict({**BASE, "datacontenttype": "text/plain; charset=iso-8859-1", "data": ["é"]})
        assert event.data == '["é"]'.encode("latin-1")
        # What the charset cannot hold goes as JSON's escapes, as a sender may have written it
        # (it was refused): the same JSON, in Latin-1.
        event = from_dict({**BASE, "datacontenttype": "text/plain; charset=iso-8859-1", "data": {"a": "日本😀"}})
        assert event.data == b'{"a":"\\u65e5\\u672c\\ud83d\\ude00"}' and orjson.loads(event.data) == {"a": "日本😀"}

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

    @pytest.mark.parametrize("read", [
        from_json,
        lambda raw: from_json(raw.decode()),
        lambda raw: from_json_batch(b"[" + raw + b"]")[0],
        lambda raw: from_http({"content-type": EVENT_MEDIA_TYPE}, raw),
        lambda raw: from_http_many({"content-type": BATCH_MEDIA_TYPE}, b"[" + raw + b"]")[0],
    ], ids=["from_json", "from_json-str", "from_json_batch", "from_http", "from_http_many"])
    @pytest.mark.parametrize("number", [
        "18446744073709551616", "-9223372036854775809", "123456789012345678901234567890", "9" * 300,
    ], ids=["2**64", "-2**63-1", "30-digits", "300-digits"])
    def test_an_integer_past_64_bits_in_data_keeps_its_value(self, read: Any, number: str) -> None:
        """orjson reads one as a float: 2**64 went on to binary mode (the broker's subscribers,
        Kafka, the stores) as 18446744073709551616.0, rewritten as 1.8446744073709552e+19."""
        data = '{"n": [' + number + ', 18446744073709551615, -9223372036854775808, 1.5], "é": "9223372036854775808"}'
        raw = orjson.dumps({**BASE, "datacontenttype": "application/json"})[:-1] + b',"data": ' + data.encode() + b"}"
        event = read(raw)
        assert event.data == data.replace(": ", ":").replace(", ", ",").encode()  # compact, as orjson writes
        assert from_json(to_json(event)) == event  # written back as data_base64: the encoder's guard

    def test_data_that_is_one_integer_past_64_bits(self) -> None:
        assert from_dict_raw(b'"data":18446744073709551616').data == b"18446744073709551616"

    def test_long_digit_runs_that_are_no_integers_change_nothing(self) -> None:
        data = b'{"s":"a 18446744073709551616","f":0.18446744073709551616,"e":1.5e-18446744073709551616}'
        event = from_dict_raw(b'"datacontenttype":"application/json","data":' + data)
        assert orjson.loads(event.data or b"") == {"s": "a 18446744073709551616", "f": 0.18446744073709551616, "e": 0.0}

    def test_an_integer_past_what_a_double_holds_is_refused(self) -> None:
        """orjson refuses it (infinity as a double): refused, not changed, and no stdlib digit limit."""
        with pytest.raises(InvalidEventError, match="infinity"):
            from_dict_raw(b'"datacontenttype":"application/json","data":[' + b"9" * 5000 + b"]")

    def test_an_attribute_past_64_bits_is_refused_by_name(self) -> None:
        """Read as a float it was refused as a JSON number; read exactly, it is no Integer either."""
        with pytest.raises(InvalidEventError) as info:
            from_dict_raw(b'"ext":18446744073709551616')
        assert info.value.attribute == "ext"

    def test_an_integer_past_64_bits_nested_deeper_than_stdlib_json_reads_is_refused(self) -> None:
        """Kept exact by stdlib json, which reads fewer levels than orjson: refused, not changed."""
        deep = b"[" * 1020 + b"18446744073709551616" + b"]" * 1020
        with pytest.raises(InvalidEventError) as info:
            from_dict_raw(b'"datacontenttype":"application/json","data":' + deep)
        assert info.value.attribute == "data"

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


# The SDK holds data as a runtime value, we as the bytes binary mode carries; bytes of no stated
# type are written as `data_base64` (the spec's json-data-base64-no-datacontenttype example). A
# runtime JSON value of no stated type is what the format implies for `data`, application/json
# (spec 3.1.2), which our events spell out: these vectors' events carry it, and so does the JSON.
IMPLIED_JSON = {"w-no-datacontenttype-string", "w-no-datacontenttype-object"}


class TestSdkJsonVectors:
    """Write and read vectors; the SDK's exact whitespace (`sdk_exact`) is compared as JSON."""

    @pytest.mark.parametrize("case", cases("sdk-python/json-format-vectors.json", "write"))
    def test_write(self, case: dict[str, Any]) -> None:
        event = format_event(case["event"])
        implied = {"datacontenttype": "application/json"} if case["id"] in IMPLIED_JSON else {}
        event = event.with_attributes(**implied)
        written = orjson.loads(to_json(event))
        assert to_dict(event) == written
        if "expect_json" in case:
            assert written == {**case["expect_json"], **implied}
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
        # Written as the spec writes it: a body without Content-Type is bytes of no stated type
        # (`data_base64`, not JSON `data` that the next reader would take for application/json).
        members = orjson.loads(to_json(event))
        assert [m in members for m in ("data", "data_base64")] == [m in structured for m in ("data", "data_base64")]
        again = from_json(to_json(event))
        assert _same_data(again, event)
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


from __future__ import annotations

import base64
import dataclasses
from collections.abc import Callable
from typing import Any

import orjson
import pytest

from infer_logger.cloudevents import (
    CloudEvent,
    KafkaMessage,
    from_kafka,
    key_by_id,
    to_json,
    to_kafka_binary,
    to_kafka_structured,
)
from infer_logger.cloudevents.kafka import KafkaRecord
from infer_logger.errors import InvalidEventError, MissingAttributeError

from .conformance import assert_attributes, assert_data, binding_event, cases, load, params

BASE = {"specversion": "1.0", "id": "req-1", "source": "/src", "type": "t"}
HEADERS = {"ce_specversion": b"1.0", "ce_id": b"req-1", "ce_source": b"/src", "ce_type": b"t"}


class TestKeys:
    """partitionkey wins; otherwise the `key` argument, by default the event id."""

    def test_default_is_the_event_id(self) -> None:
        event = CloudEvent(dict(BASE))
        assert to_kafka_binary(event).key == b"req-1" == to_kafka_structured(event).key
        assert key_by_id(event) == b"req-1"

    @pytest.mark.parametrize(
        ("key", "expected"),
        [(None, None), (b"fixed", b"fixed"), (lambda e: e.type.encode(), b"t"), (lambda e: None, None)],
        ids=["none", "bytes", "chooser", "chooser-none"],
    )
    def test_selectable(self, key: Any, expected: bytes | None) -> None:
        assert to_kafka_binary(CloudEvent(dict(BASE)), key=key).key == expected

    def test_partitionkey_wins_and_stays_in_the_event(self) -> None:
        event = CloudEvent({**BASE, "partitionkey": "user-1"})
        message = to_kafka_binary(event, key=b"ignored")
        assert message.key == b"user-1" and message.headers["ce_partitionkey"] == b"user-1"
        assert to_kafka_structured(event, key=None).key == b"user-1"

    def test_decoding_does_not_invent_a_partitionkey(self) -> None:
        event = from_kafka(KafkaMessage(HEADERS, b"req-1", None))
        assert "partitionkey" not in event.attributes


class TestBinary:
    """ce_ headers hold raw UTF-8; the value is the data, None when there is none."""

    def test_encode(self) -> None:
        event = CloudEvent({**BASE, "datacontenttype": "text/plain", "subject": 'a "b" é', "n": 5}, b"hi")
        message = to_kafka_binary(event)
        assert message.headers == {
            **HEADERS,
            "content-type": b"text/plain",
            "ce_subject": 'a "b" é'.encode(),
            "ce_n": b"5",
        }
        assert message.value == b"hi"

    def test_no_data_is_a_tombstone(self) -> None:
        message = to_kafka_binary(CloudEvent(dict(BASE)))
        assert message.value is None and from_kafka(message).data is None
        assert from_kafka(dataclasses.replace(message, value=b"")).data is None

    def test_round_trip_and_meta(self) -> None:
        event = CloudEvent({**BASE, "datacontenttype": "application/octet-stream"}, b"\x00\xff")
        message = to_kafka_binary(event)
        decoded = from_kafka(dataclasses.replace(message, headers={**message.headers, "trace": b"\xffx"}))
        assert decoded == event and decoded.meta == {"trace": "\\xffx"}

    @pytest.mark.parametrize("content_type", [b"", b" \t"])
    def test_an_empty_content_type_is_none(self, content_type: bytes) -> None:
        """It refused the record (the source dead-lettered it), where HTTP reads it as none."""
        event = from_kafka(KafkaMessage({**HEADERS, "content-type": content_type}, None, b"x"))
        assert "datacontenttype" not in event.attributes and event.data == b"x"

    def test_a_null_header_is_no_attribute(self) -> None:
        """Java clients write null headers: a null ce_ header became an attribute "" (an empty
        partitionkey keyed the record by "")."""
        headers: dict[str, Any] = {**HEADERS, "ce_partitionkey": None, "content-type": None}
        event = from_kafka(KafkaMessage(headers, None, b"x"))
        assert event.attributes == BASE and to_kafka_binary(event).key == b"req-1"

    def test_invalid_utf8_header_refused(self) -> None:
        with pytest.raises(InvalidEventError) as info:
            from_kafka(KafkaMessage({**HEADERS, "ce_subject": b"\xc0\xa0"}, None, None))
        assert info.value.attribute == "subject"

    def test_ce_datacontenttype_header_refused(self) -> None:
        with pytest.raises(InvalidEventError) as info:
            from_kafka(KafkaMessage({**HEADERS, "ce_datacontenttype": b"text/plain"}, None, None))
        assert info.value.attribute == "datacontenttype"

    def test_v03_refused(self) -> None:
        with pytest.raises(InvalidEventError, match="0.3"):
            from_kafka(KafkaMessage({**HEADERS, "ce_specversion": b"0.3"}, None, None))


class TestRepeatedHeaders:
    """A ce_ or content-type header given twice makes no CloudEvent (which one holds?); the
    last one silently won. Names are case-insensitive; other headers may repeat."""

    @pytest.mark.parametrize(
        ("headers", "attribute", "named"),
        [
            ([*HEADERS.items(), ("ce_id", b"dup-b")], "id", "ce_id"),
            ([*HEADERS.items(), ("CE_ID", b"req-1")], "id", "ce_id"),  # the same value: still two
            ([*HEADERS.items(), ("ce_subject", b"a"), ("ce_Subject", None)], "subject", "ce_subject"),
            ([*HEADERS.items(), ("content-type", b"text/plain"), ("Content-Type", b"text/csv")],
             "datacontenttype", "content-type"),
        ],
        ids=["ce_id", "case", "null", "content-type"],
    )
    def test_binary_refused(self, headers: list[tuple[str, bytes | None]], attribute: str, named: str) -> None:
        with pytest.raises(InvalidEventError, match=f"header {named} repeated") as info:
            from_kafka(KafkaRecord(headers, None, b"x"))
        assert info.value.attribute == attribute

    def test_names_differing_in_case_refused_in_a_dict(self) -> None:
        with pytest.raises(InvalidEventError, match="header ce_id repeated"):
            from_kafka(KafkaMessage({**HEADERS, "ce_ID": b"dup-a"}, None, None))

    def test_structured_content_type_refused(self) -> None:
        message = to_kafka_structured(CloudEvent(dict(BASE)))
        headers = [*message.headers.items(), ("content-type", b"application/cloudevents+json")]
        with pytest.raises(InvalidEventError, match="header content-type repeated"):
            from_kafka(KafkaRecord(headers, None, message.value))

    def test_a_repeated_ce_header_a_structured_record_never_reads_is_taken(self) -> None:
        """It only goes to `meta`: the record was dead-lettered for a header that says nothing."""
        event = CloudEvent(dict(BASE))
        message = to_kafka_structured(event)
        headers = [*message.headers.items(), ("ce_traceparent", b"a"), ("ce_traceparent", b"b")]
        assert from_kafka(KafkaRecord(headers, None, message.value)).attributes == event.attributes

    def test_other_headers_repeat_freely(self) -> None:
        headers = [*HEADERS.items(), ("traceparent", b"a"), ("traceparent", b"b"), ("x", b"1"), ("X", b"2")]
        assert from_kafka(KafkaRecord(headers, None, b"x")).attributes == BASE


class TestStructured:
    """The value is the JSON format, never a tombstone."""

    def test_round_trip(self) -> None:
        event = CloudEvent({**BASE, "datacontenttype": "application/json", "n": 5}, b'{"a":1}')
        message = to_kafka_structured(event)
        assert message.headers == {"content-type": b"application/cloudevents+json"}
        assert message.value == to_json(event) and from_kafka(message) == event

    def test_an_integer_past_64_bits_keeps_its_value(self) -> None:
        """orjson reads one as a float: the Kafka source stored 18446744073709551616 as 1.8446744073709552e+19."""
        value = to_json(CloudEvent({**BASE, "datacontenttype": "application/json"}, b"{}"))[:-3] + b'{"n":18446744073709551616}}'
        event = from_kafka(KafkaMessage({"content-type": b"application/cloudevents+json"}, None, value))
        assert event.data == b'{"n":18446744073709551616}'

    def test_data_of_no_stated_type_stays_untyped(self) -> None:
        """Written as JSON `data`, it came back as application/json: binary delivery added a Content-Type."""
        event = CloudEvent(dict(BASE), b'{"a":1}')
        again = from_kafka(to_kafka_structured(event))
        assert again == event and "content-type" not in to_kafka_binary(again).headers

    def test_unknown_format_refused(self) -> None:
        with pytest.raises(InvalidEventError, match="avro"):
            from_kafka(KafkaMessage({"content-type": b"application/cloudevents+avro"}, None, b"x"))

    def test_missing_value_refused(self) -> None:
        with pytest.raises(InvalidEventError):
            from_kafka(KafkaMessage({"content-type": b"application/cloudevents+json"}, None, None))


# --- conformance: sdk-python Kafka binding vectors ------------------------------------------

_VECTORS = "sdk-python/kafka-binding-vectors.json"


def _message(case: dict[str, Any]) -> KafkaMessage:
    value = base64.b64decode(case["value_b64"]) if "value_b64" in case else case["value"].encode()
    key = None if case["key"] is None else case["key"].encode()
    return KafkaMessage({k: v.encode() for k, v in case["headers"].items()}, key, value)


def _refused(attribute: str, error: type[InvalidEventError] = InvalidEventError) -> Callable[[KafkaMessage], None]:
    def check(message: KafkaMessage) -> None:
        with pytest.raises(error) as info:
            from_kafka(message)
        assert info.value.attribute == attribute

    return check


def _no_partitionkey(message: KafkaMessage) -> None:
    event = from_kafka(message)
    assert "partitionkey" not in event.attributes and event["type"] == "com.example.test"


# Vectors where our rule differs, each with the reason; everything else must pass as written.
OUR_RULE: dict[str, Callable[[KafkaMessage], None]] = {
    # sdk_specific: the record key is routing; keys we choose (the id) must not become attributes.
    "k-binary-key-to-partitionkey": _no_partitionkey,
    "k-structured-key-to-partitionkey": _no_partitionkey,
    # sdk_specific: without a cloudevents content-type the binding says binary mode.
    "k-auto-empty-headers-structured": _refused("specversion", MissingAttributeError),
    # We support CloudEvents 1.0 only.
    "k-structured-v03-with-key": _refused("specversion"),
    # The old SDK API accepted a time without offset and content type "foo"; neither is valid.
    "k-v1compat-binary": _refused("time"),
}


# A runtime JSON value of no stated type, which our events hold as JSON bytes under the type the
# JSON format implies for it (see test_json_format.IMPLIED_JSON): bytes of no stated type are
# written as `data_base64`.
IMPLIED_JSON = {"k-enc-structured"}


class TestSdkKafkaVectors:
    """Decode and encode vectors from the Python SDK's tests."""

    @pytest.mark.parametrize("case", cases(_VECTORS, "decode"))
    def test_decode(self, case: dict[str, Any]) -> None:
        message = _message(case)
        if case["id"] in OUR_RULE:
            OUR_RULE[case["id"]](message)
            return
        event = from_kafka(message)
        assert_attributes(event, case.get("expect_attributes", {}))
        assert_data(event, case)

    @pytest.mark.parametrize("case", cases(_VECTORS, "encode"))
    def test_encode(self, case: dict[str, Any]) -> None:
        event = binding_event(case["event"])
        if case["id"] in IMPLIED_JSON:
            event = event.with_attributes(datacontenttype="application/json")
        # The vectors give no user key, so key=None; our id default is tested in TestKeys.
        encode = to_kafka_binary if case["mode"] == "binary" else to_kafka_structured
        message = encode(event, key=None)
        for name, value in case.get("expect_headers", {}).items():
            assert message.headers[name] == value.encode(), name
        for name in case.get("expect_headers_absent", []):
            assert name not in message.headers
        if "expect_key" in case:
            assert message.key == (None if case["expect_key"] is None else case["expect_key"].encode())
        if "expect_value" in case:  # no data: the binding's tombstone, which the vector allows
            assert (message.value or b"") == case["expect_value"].encode()
        if "expect_value_b64" in case:
            assert message.value == base64.b64decode(case["expect_value_b64"])
        if "expect_value_json" in case:
            assert orjson.loads(message.value or b"") == case["expect_value_json"]
        for name, value in case.get("expect_value_json_subset", {}).items():
            assert orjson.loads(message.value or b"")[name] == value
        if case.get("roundtrip"):
            assert from_kafka(message) == event


# --- conformance: spec Kafka binding examples and rules --------------------------------------

_SPEC = "spec-examples/kafka-protocol-binding-examples.yaml"


def _spec_params(key: str) -> list[Any]:
    data = load(_SPEC)
    return params(None if data is None else ((item["id"], item) for item in data[key]))


def _rule_mode_detection() -> None:
    structured = to_kafka_structured(CloudEvent(dict(BASE)))
    upper = dataclasses.replace(structured, headers={"content-type": b"Application/CloudEvents+JSON"})
    assert from_kafka(upper) == CloudEvent(dict(BASE))
    assert from_kafka(KafkaMessage({**HEADERS, "content-type": b"application/json"}, None, b"{}")).data == b"{}"


def _rule_key_mapping_default() -> None:
    assert to_kafka_binary(CloudEvent(dict(BASE)), key=b"mykey").key == b"mykey"


def _rule_key_mapper_partitionkey() -> None:
    event = CloudEvent({**BASE, "partitionkey": "pk"})
    message = to_kafka_binary(event)
    assert message.key == b"pk" and from_kafka(message) == event


def _rule_binary_content_type() -> None:
    message = to_kafka_binary(CloudEvent({**BASE, "datacontenttype": "application/avro"}))
    assert message.headers["content-type"] == b"application/avro"
    assert from_kafka(message).datacontenttype == "application/avro"


def _rule_binary_data() -> None:
    assert to_kafka_binary(CloudEvent(dict(BASE), b"\x01")).value == b"\x01"
    assert to_kafka_binary(CloudEvent(dict(BASE))).value is None


def _rule_binary_header_names() -> None:
    headers = to_kafka_binary(CloudEvent({**BASE, "time": "2018-04-05T03:56:24Z"})).headers
    assert set(headers) == {"ce_specversion", "ce_id", "ce_source", "ce_type", "ce_time"}
    assert all(isinstance(v, bytes) and v.decode() for v in headers.values())


def _rule_structured_content_type() -> None:
    assert to_kafka_structured(CloudEvent(dict(BASE))).headers["content-type"] == b"application/cloudevents+json"


def _rule_structured_no_data() -> None:
    assert to_kafka_structured(CloudEvent(dict(BASE))).value


def _rule_structured_extra_headers() -> None:
    # A MAY for producers; as a consumer, ce_ headers beside a structured value are ignored.
    message = to_kafka_structured(CloudEvent(dict(BASE)))
    extra = dataclasses.replace(message, headers={**message.headers, "ce_id": b"other"})
    assert from_kafka(extra).id == "req-1"


RULES: dict[str, Callable[[], None]] = {
    "mode-detection": _rule_mode_detection,
    "key-mapping-default": _rule_key_mapping_default,
    "key-mapper-partitionkey": _rule_key_mapper_partitionkey,
    "binary-content-type": _rule_binary_content_type,
    "binary-data": _rule_binary_data,
    "binary-header-names": _rule_binary_header_names,
    "structured-content-type": _rule_structured_content_type,
    "structured-no-data": _rule_structured_no_data,
    "structured-extra-headers": _rule_structured_extra_headers,
}


class TestSpecKafkaExamples:
    """The binding's rules and its (partly elided) examples."""

    @pytest.mark.parametrize("rule", _spec_params("rules"))
    def test_rule(self, rule: dict[str, Any]) -> None:
        RULES[rule["id"]]()  # a KeyError means a new rule that needs a check

    @pytest.mark.parametrize("example", _spec_params("examples"))
    def test_example(self, example: dict[str, Any]) -> None:
        headers = {name: str(value).encode() for name, value in example["headers"].items()}
        key = example.get("key", "").encode() or None
        if example["mode"] == "binary":
            value = None  # the spec elides the Avro value; no data is invented for it
        else:
            value = orjson.dumps(example.get("value_json_attributes", BASE))
        event = from_kafka(KafkaMessage(headers, key, value))
        assert_attributes(event, example.get("expected_attributes", {}))


@pytest.mark.parametrize("content_type", ["application/cloudevents+json", "Application/CloudEvents+JSON; charset=utf-8",
                                          "application/cloudevents-batch+json"])
def test_binary_mode_sends_a_cloudevent_payload_structured(content_type: str) -> None:
    """In binary mode the receiver would read such a payload as the event itself (any case)."""
    inner = b'{"specversion":"1.0","id":"inner","source":"/i","type":"t"}'
    event = CloudEvent({**BASE, "datacontenttype": content_type}, inner)
    message = to_kafka_binary(event)
    assert message.headers == {"content-type": b"application/cloudevents+json"}
    back = from_kafka(message)
    assert back.id == "req-1" and back.data == inner and back.datacontenttype == content_type

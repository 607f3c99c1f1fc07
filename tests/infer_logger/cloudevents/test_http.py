from __future__ import annotations

import base64
import re
from collections.abc import Callable
from typing import Any

import orjson
import pytest

from infer_logger.cloudevents import (
    CloudEvent,
    content_mode,
    decode_header_value,
    encode_header_value,
    from_http,
    from_http_many,
    to_batch,
    to_binary,
    to_json,
    to_structured,
)
from infer_logger.errors import InvalidEventError, MissingAttributeError

from .conformance import assert_attributes, assert_data, binding_event, cases, load, params, parse_raw_http

BASE = {"specversion": "1.0", "id": "1", "source": "/src", "type": "t"}
HEADERS = {"ce-specversion": "1.0", "ce-id": "1", "ce-source": "/src", "ce-type": "t"}


class TestHeaderValues:
    """Percent-encoding of ce- header values, both ways."""

    @pytest.mark.parametrize(
        ("text", "encoded"),
        [
            ("plain-ASCII:/?#@!&'()*+,;=~", "plain-ASCII:/?#@!&'()*+,;=~"),
            ("a b", "a%20b"),
            ('"q"', "%22q%22"),
            ("100%", "100%25"),
            ("tab\there", "tab%09here"),
            ("é", "%C3%A9"),
            ("", ""),
        ],
    )
    def test_round_trip(self, text: str, encoded: str) -> None:
        assert encode_header_value(text) == encoded
        assert decode_header_value(encoded) == text

    def test_lower_case_hex_and_needless_escapes_accepted(self) -> None:
        assert decode_header_value("%c3%a9%41") == "éA"

    def test_quoted_string_unescaped_first(self) -> None:
        assert decode_header_value('"a \\"b\\" %20c"') == 'a "b"  c'

    def test_raw_utf8_as_http_libraries_give_it(self) -> None:
        latin1_view = "é".encode().decode("latin-1")  # what an ASGI server hands over
        assert decode_header_value(latin1_view) == "é"
        assert decode_header_value("世界") == "世界"

    @pytest.mark.parametrize("encoded", ["%C0%A0", "%FF", "%E2%82"])
    def test_invalid_utf8_rejected(self, encoded: str) -> None:
        with pytest.raises(InvalidEventError) as info:
            decode_header_value(encoded, "subject")
        assert info.value.attribute == "subject"


class TestModes:
    """Content-Type picks the mode; everything else is binary."""

    @pytest.mark.parametrize(
        ("content_type", "mode"),
        [
            (None, "binary"),
            ("application/json", "binary"),
            ("application/cloudevents+json", "structured"),
            ("Application/CloudEvents+JSON; charset=UTF-8", "structured"),
            ("application/cloudevents-batch+json", "batch"),
        ],
    )
    def test_detection(self, content_type: str | None, mode: str) -> None:
        headers = {} if content_type is None else {"Content-Type": content_type}
        assert content_mode(headers) == mode

    @pytest.mark.parametrize("content_type", ["application/cloudevents+avro", "application/cloudevents-batch+xml"])
    def test_unknown_event_formats_named(self, content_type: str) -> None:
        with pytest.raises(InvalidEventError, match="unsupported"):
            content_mode({"content-type": content_type})

    def test_single_decoder_refuses_a_batch(self) -> None:
        headers, body = to_batch([CloudEvent(dict(BASE))])
        with pytest.raises(InvalidEventError, match="from_http_many"):
            from_http(headers, body)

    def test_many_handles_every_mode(self) -> None:
        events = [CloudEvent(dict(BASE)), CloudEvent({**BASE, "id": "2"})]
        assert from_http_many(*to_batch(events)) == events
        assert from_http_many(*to_structured(events[0])) == events[:1]
        assert from_http_many(*to_binary(events[1])) == events[1:]


class TestBinary:
    """ce- headers and Content-Type map to attributes; other headers go to meta."""

    def test_encode(self) -> None:
        event = CloudEvent({**BASE, "datacontenttype": "text/plain", "n": 5, "ok": True}, b"hi")
        headers, body = to_binary(event)
        assert headers == {**HEADERS, "content-type": "text/plain", "ce-n": "5", "ce-ok": "true"}
        assert body == b"hi"

    @pytest.mark.parametrize("content_type", ["application/cloudevents+json", "Application/CloudEvents+JSON"])
    def test_a_cloudevent_payload_goes_structured(self, content_type: str) -> None:
        """A receiver reads such a body as the event itself (content types compare in any case)."""
        inner = b'{"specversion":"1.0","id":"inner","source":"/i","type":"t"}'
        headers, body = to_binary(CloudEvent({**BASE, "datacontenttype": content_type}, inner))
        back = from_http(headers, body)
        assert back.id == "1" and back.data == inner and back.datacontenttype == content_type

    def test_no_data_is_an_empty_body_and_back(self) -> None:
        headers, body = to_binary(CloudEvent(dict(BASE)))
        assert body == b"" and from_http(headers, body).data is None

    def test_decode_keeps_transport_headers_apart(self) -> None:
        event = from_http({**HEADERS, "User-Agent": "foo", "Content-Type": " text/plain "}, b"x")
        assert event.attributes == {**BASE, "datacontenttype": "text/plain"}
        assert event.meta == {"user-agent": "foo"}

    def test_empty_content_type_is_none(self) -> None:
        assert from_http({**HEADERS, "content-type": ""}, b"x").datacontenttype is None

    def test_ce_datacontenttype_header_refused(self) -> None:
        with pytest.raises(InvalidEventError) as info:
            from_http({**HEADERS, "ce-datacontenttype": "text/plain"}, b"")
        assert info.value.attribute == "datacontenttype"

    def test_decoded_events_are_validated(self) -> None:
        with pytest.raises(InvalidEventError) as info:
            from_http({**HEADERS, "ce-time": "noon"}, b"")
        assert info.value.attribute == "time"


class TestStructured:
    """The body is the JSON format; ce- headers are not attributes in this mode."""

    def test_round_trip(self) -> None:
        event = CloudEvent({**BASE, "datacontenttype": "application/json", "n": 5}, b'{"a":1}')
        headers, body = to_structured(event)
        assert headers == {"content-type": "application/cloudevents+json"} and body == to_json(event)
        assert from_http(headers, body) == event

    def test_transport_headers_in_meta(self) -> None:
        headers, body = to_structured(CloudEvent(dict(BASE)))
        assert from_http({**headers, "X-Request-Id": "r"}, body).meta == {"x-request-id": "r"}


# --- conformance: sdk-python HTTP binding vectors -------------------------------------------

_VECTORS = "sdk-python/http-binding-vectors.json"


def _body(case: dict[str, Any]) -> bytes:
    if "body_b64" in case:
        return base64.b64decode(case["body_b64"])
    return (case.get("body") or "").encode("utf-8")


def _expect_structured_wins(event: CloudEvent) -> None:
    assert event["type"] == "com.example.structured" and event["source"] == "/structured"


def _expect_missing_specversion(headers: dict[str, str], body: bytes) -> None:
    with pytest.raises(MissingAttributeError) as info:
        from_http(headers, body)
    assert info.value.attribute == "specversion"


# Where an `sdk_specific` vector and the spec disagree we follow the spec (the README calls these
# advisory); the test pins our rule instead.
SPEC_OVER_SDK: dict[str, Callable[[dict[str, str], bytes], None]] = {
    # application/json without ce- headers is binary mode, so the required attributes are missing.
    "sdk-json-without-ce-headers-parsed-as-structured": _expect_missing_specversion,
    # A Content-Type of application/cloudevents+json means structured, whatever ce- headers say.
    "sdk-ce-headers-win-over-structured-content-type": lambda h, b: _expect_structured_wins(from_http(h, b)),
}
INVALID_ATTRIBUTE = {
    "binary-missing-id": "id",
    "binary-missing-source": "source",
    "binary-missing-type": "type",
    "binary-missing-specversion": "specversion",
    "binary-missing-id-empty-body": "id",
    "structured-missing-id": "id",
    "structured-missing-source": "source",
    "structured-missing-type": "type",
    "structured-missing-specversion": "specversion",
    "structured-unknown-specversion-0.2": "specversion",
    "structured-empty-body": "",  # not JSON at all: no attribute to blame
    "structured-non-object-body": "",
    "binary-broken-prefix": "specversion",  # 'e-' headers are not attributes: nothing is there
}
_PREDICATES: dict[str, Callable[[str], bool]] = {
    "no raw space": lambda v: " " not in v,
    "no raw double-quote": lambda v: '"' not in v,
    "only printable ASCII": lambda v: re.fullmatch(r"[\x21-\x7e]*", v) is not None,
}


def _predicate(text: str) -> Callable[[str], bool]:
    if text in _PREDICATES:
        return _PREDICATES[text]
    needle = re.fullmatch(r"contains '?(.+?)'?", text)
    assert needle is not None, f"unknown predicate {text!r}"
    return lambda v: needle.group(1) in v


class TestSdkHttpVectors:
    """Decode, invalid-decode and encode vectors from the Python SDK's tests."""

    @pytest.mark.parametrize("case", cases(_VECTORS, "decode"))
    def test_decode(self, case: dict[str, Any]) -> None:
        headers, body = case["headers"], _body(case)
        if case["id"] in SPEC_OVER_SDK:
            assert case.get("sdk_specific"), "only advisory vectors may be overridden"
            SPEC_OVER_SDK[case["id"]](headers, body)
            return
        event = from_http(headers, body)
        assert_attributes(event, case.get("expect_attributes", {}))
        assert_data(event, case)

    @pytest.mark.parametrize("case", cases(_VECTORS, "decode_invalid"))
    def test_decode_invalid(self, case: dict[str, Any]) -> None:
        with pytest.raises(InvalidEventError) as info:
            from_http(case["headers"], _body(case))
        assert info.value.attribute == INVALID_ATTRIBUTE[case["id"]]
        if "Missing" in case["expect"] and info.value.attribute:
            assert isinstance(info.value, MissingAttributeError)

    @pytest.mark.parametrize("case", cases(_VECTORS, "encode"))
    def test_encode(self, case: dict[str, Any]) -> None:
        event = binding_event(case["event"])
        headers, body = to_binary(event) if case["mode"] == "binary" else to_structured(event)
        for name, value in {**case.get("expect_headers", {}), **case.get("spec_exact", {})}.items():
            assert headers[name.lower()] == value, name
        for name in case.get("expect_headers_absent", []):
            assert name.lower() not in headers
        for name, predicates in case.get("expect_header_predicates", {}).items():
            for text in predicates:
                assert _predicate(text)(headers[name]), text
        if "expect_body" in case:
            assert body == case["expect_body"].encode()
        if "expect_body_b64" in case:
            assert body == base64.b64decode(case["expect_body_b64"])
        for key in ("expect_body_json", "sdk_exact_body"):  # the SDK's spacing is not ours
            if key in case:
                assert orjson.loads(body) == (case[key] if key == "expect_body_json" else orjson.loads(case[key]))
        members = orjson.loads(body) if case["mode"] == "structured" else {}
        for name, value in case.get("expect_body_json_subset", {}).items():
            assert members[name] == value
        assert not set(case.get("expect_body_keys_absent", [])) & set(members)
        if case.get("roundtrip"):
            assert from_http(headers, body) == event


# --- conformance: spec HTTP binding examples -------------------------------------------------

_SPEC = "spec-examples/http-protocol-binding-examples.yaml"


def _spec_params(key: str) -> list[Any]:
    data = load(_SPEC)
    return params(None if data is None else ((item["id"], item) for item in data[key]))


def _rule_mode_detection() -> None:
    assert content_mode({"content-type": "APPLICATION/CLOUDEVENTS+JSON"}) == "structured"
    assert content_mode({"content-type": "application/cloudevents-batch+json; charset=utf-8"}) == "batch"
    assert content_mode({"content-type": "text/plain"}) == "binary"


def _rule_unknown_format() -> None:
    # A MAY: we name the unsupported format instead of forwarding it as binary.
    with pytest.raises(InvalidEventError, match="application/cloudevents\\+avro"):
        from_http({"content-type": "application/cloudevents+avro"}, b"")


def _rule_batched_unsolicited() -> None:
    # Encoders only batch when asked (to_batch); a receiver that did not ask refuses a batch.
    with pytest.raises(InvalidEventError):
        from_http(*to_batch([]))


def _rule_binary_content_type() -> None:
    headers, _ = to_binary(CloudEvent({**BASE, "datacontenttype": "text/xml"}))
    assert headers["content-type"] == "text/xml" and "ce-datacontenttype" not in headers
    assert from_http({**HEADERS, "Content-Type": "text/xml"}, b"<a/>").datacontenttype == "text/xml"


def _rule_binary_header_names() -> None:
    headers, _ = to_binary(CloudEvent({**BASE, "myext": "x"}))
    assert set(headers) == {f"ce-{name}" for name in (*BASE, "myext")}
    assert from_http({"CE-SPECVERSION": "1.0", "Ce-Id": "1", "ce-SOURCE": "/s", "cE-type": "t"}, b"")


def _rule_header_value_encoding() -> None:
    assert encode_header_value(' "%~\x7f') == "%20%22%25~%7F"
    assert decode_header_value("%e2%82%ac%41") == "€A"
    with pytest.raises(InvalidEventError):
        decode_header_value("%C0%A0")


def _rule_batch_media_type() -> None:
    assert to_batch([])[0] == {"content-type": "application/cloudevents-batch+json"}


RULES: dict[str, Callable[[], None]] = {
    "mode-detection": _rule_mode_detection,
    "unknown-format": _rule_unknown_format,
    "batched-unsolicited": _rule_batched_unsolicited,
    "binary-content-type": _rule_binary_content_type,
    "binary-header-names": _rule_binary_header_names,
    "header-value-encoding": _rule_header_value_encoding,
    "batch-media-type": _rule_batch_media_type,
}
_EXAMPLE_MODES = {"binary": "binary", "structured": "structured", "batched": "batch"}


class TestSpecHttpExamples:
    """The binding's rules, percent-encoding cases and raw examples."""

    @pytest.mark.parametrize("rule", _spec_params("rules"))
    def test_rule(self, rule: dict[str, Any]) -> None:
        RULES[rule["id"]]()  # a KeyError means a new rule that needs a check

    @pytest.mark.parametrize("case", _spec_params("header_value_encoding_cases"))
    def test_header_value_encoding(self, case: dict[str, Any]) -> None:
        if case.get("expect") == "reject":
            with pytest.raises(InvalidEventError):
                decode_header_value(case["encoded"])
            return
        assert decode_header_value(case["encoded"]) == case["decoded"]
        if case["direction"] == "both":
            assert encode_header_value(case["decoded"]) == case["encoded"]

    @pytest.mark.parametrize("example", _spec_params("examples"))
    def test_example(self, example: dict[str, Any]) -> None:
        if "raw" in example:
            headers, body = parse_raw_http(example["raw"])
        else:
            name, _, value = example["header"].partition(":")
            headers, body = {name: value.strip()}, b""
        assert content_mode(headers) == _EXAMPLE_MODES[example["mode"]]
        if "expected_attributes" in example:
            # Binary bodies are opaque, so an elided one still decodes; the attributes must match.
            assert_attributes(from_http(headers, body), example["expected_attributes"])

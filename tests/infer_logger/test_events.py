"""The exchange id rule, the ids the sidecar makes, and attributes read off client input."""

from __future__ import annotations

import json
import uuid
from typing import Any

import pytest

from infer_logger import events as ev
from infer_logger.cloudevents import is_string, percent_escaped


def test_ce_id_wins_then_x_request_id() -> None:
    assert ev.event_id({"ce-id": "a", "x-request-id": "b"}) == "a"
    assert ev.event_id({"x-request-id": "b"}) == "b"


def test_an_id_no_event_may_carry_is_replaced_by_a_new_one() -> None:
    """Header values may hold a tab, or 0x80-0x9F read as Latin-1; a CloudEvents id may not."""
    for sent in ("bad\tid", "caf\x85", "\x7f", "a\xef\xbf\xbe"):  # the last: U+FFFE in UTF-8
        assert ev.read_id(sent) is None
        assert uuid.UUID(ev.event_id({"x-request-id": sent})).version == 7
        assert uuid.UUID(ev.event_id({"ce-id": sent, "x-request-id": sent})).version == 7
        assert uuid.UUID(ev.event_id({"ce-id": "", "x-request-id": sent})).version == 7


def test_an_unusable_ce_id_gives_way_to_the_x_request_id() -> None:
    """ce-id, else x-request-id, else a new id: a bad ce-id beside a good x-request-id made a new
    one, while the predictor got the client's x-request-id."""
    assert ev.event_id({"ce-id": "bad\tid", "x-request-id": "b"}) == "b"
    assert ev.event_id({"ce-id": "caf\x85", "x-request-id": "caf\xc3\xa9"}) == "café"
    assert ev.event_id({"ce-id": "", "x-request-id": "b"}) == "b"


def test_a_non_ascii_id_is_read_as_utf_8_and_answered_as_sent() -> None:
    utf8, latin1 = "caf\xc3\xa9", "caf\xe9"  # b"caf\xc3\xa9" and b"caf\xe9" as servers hand them over
    assert ev.event_id({"x-request-id": utf8}) == ev.event_id({"x-request-id": latin1}) == "café"
    assert ev.id_header("café", {"x-request-id": utf8}) == b"caf\xc3\xa9"
    assert ev.id_header("café", {"x-request-id": latin1}) == b"caf\xe9"
    assert ev.id_header("café", {}) == b"caf\xc3\xa9"
    assert ev.id_header("new", {"x-request-id": "bad\tid"}) == b"new"


def test_new_ids_are_uuid7_in_creation_order() -> None:
    ids = [ev.event_id({}) for _ in range(1000)]
    assert all(uuid.UUID(i).version == 7 for i in ids)
    assert len(set(ids)) == len(ids)
    # Time-ordered ids keep the store's primary key growing at one end.
    assert ids == sorted(ids)


def test_a_structured_request_is_known_in_any_case_of_its_content_type() -> None:
    envelope = b'{"specversion":"1.0","id":"env-1","source":"/c","type":"t"}'
    assert ev.cloudevent_id({"content-type": "Application/CloudEvents+JSON"}, envelope) == "env-1"


class TestMetadata:
    """`metadata` is JSON of allow-listed header values, and always a CloudEvents String."""

    def test_values_are_read_as_utf_8_else_latin_1(self) -> None:
        # b"caf\xc3\xa9" and b"na\xefve" as servers hand them over
        text = ev.metadata_json([("Foo", "caf\xc3\xa9"), ("foo", "na\xefve"), ("Bar", "x")], ["foo"])
        assert json.loads(text) == {"foo": ["café", "naïve"]}
        assert text == '{"foo":["café","naïve"]}'  # valid as it is: left as orjson wrote it

    @pytest.mark.parametrize("value", ["a\x85b", "a\x7fb", "a\tb", "\xef\xb7\x90"], ids=["c1", "del", "tab", "U+FDD0"])
    def test_what_a_string_may_not_hold_is_escaped(self, value: str) -> None:
        """orjson writes C1 controls, DEL and noncharacters as they are: the event was refused."""
        text = ev.metadata_json([("foo", value)], ["Foo"])
        assert is_string(text) and text.isascii()
        assert json.loads(text) == {"Foo": [ev.header_text(value)]}


class TestTraceparent:
    """`traceparent` is copied when an attribute may hold it; its W3C syntax is not judged here."""

    VALID = "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01"

    @pytest.mark.parametrize("value", [VALID, VALID.upper(), VALID + "-what-comes", "not-w3c"])
    def test_copied(self, value: str) -> None:
        assert ev.traceparent(value) == value

    @pytest.mark.parametrize("value", ["x\tz", "\x85", "", VALID + "-a\x85", VALID + "\x7f"])
    def test_dropped_when_no_attribute_may_hold_it(self, value: str) -> None:
        assert ev.traceparent(value) is None


class TestPathText:
    """Names read off a decoded path keep what a String may hold; the rest is percent-encoded."""

    @pytest.mark.parametrize("value", ["iris", "/v1/models/iris:predict", "modèle-été", "a b%20c"])
    def test_valid_names_are_unchanged(self, value: str) -> None:
        assert percent_escaped(value) == value

    @pytest.mark.parametrize(("value", "escaped"), [
        ("a\tb", "a%09b"), ("a\x85b", "a%C2%85b"), ("a\x7f", "a%7F"), ("\ufdd0x", "%EF%B7%90x"),
        ("a\udc85b", "a%85b"),  # a byte that was no UTF-8 (surrogateescape): that byte again
    ])
    def test_what_a_string_may_not_hold_is_percent_encoded(self, value: str, escaped: str) -> None:
        assert percent_escaped(value) == escaped


def test_a_content_type_no_event_may_carry_is_none() -> None:
    assert ev.media_type("application/json; charset=utf-8") == "application/json; charset=utf-8"
    for value in (None, "json", "application/json; x=\x85", "text/plain;", "a/b\tc"):
        assert ev.media_type(value) is None


def test_decoded_request_bodies() -> None:
    """The logged copy of a compressed request (gzip may hold several members, RFC 1952)."""
    import gzip
    import zlib

    from infer_logger.events import decoded

    payload = b'{"instances": [[1, 2]]}'
    two = gzip.compress(payload[:10]) + gzip.compress(payload[10:])  # only the first was logged
    assert decoded(two, "gzip", 1000) == (payload, {})
    assert decoded(gzip.compress(payload) + b"garbage", "gzip", 1000) is None  # not whole: not JSON
    assert decoded(gzip.compress(payload)[:-4], "gzip", 1000) is None  # cut short
    assert decoded(zlib.compress(payload), "Deflate ", 1000) == (payload, {})
    assert decoded(gzip.compress(b" " * 10_000) * 3, "gzip", 100) == (b" " * 100, {"truncated": True})
    assert decoded(payload, "br", 1000) is None


def test_a_gzip_body_of_very_many_members_is_not_decoded() -> None:
    """Each member cost a copy of the rest of the body: 2 MiB of tiny members held the request
    path 5 s (the time grew as the square of the size). Past 64 members it is logged as sent."""
    import gzip

    from infer_logger.events import decoded

    assert decoded(gzip.compress(b"x") * 65, "gzip", 1000) is None
    assert decoded(gzip.compress(b"x") * 64, "gzip", 1000) == (b"x" * 64, {})


def test_a_size_past_a_cloudevents_integer_is_text() -> None:
    """A streamed answer past 2 GiB got an int `datasize` no reader of a structured event takes."""
    from infer_logger.cloudevents import CloudEvent, from_json, to_json

    assert ev.capped(b"abc", 2, size=2**31 - 1)[1] == {ev.TRUNCATED: True, ev.DATASIZE: 2**31 - 1}
    data, marks = ev.capped(b"abc", 2, size=2**31)
    assert data == b"ab" and marks == {ev.TRUNCATED: True, ev.DATASIZE: str(2**31)}
    event = CloudEvent({"specversion": "1.0", "id": "1", "source": "/s", "type": ev.RESPONSE, **marks}, data)
    assert from_json(to_json(event))[ev.DATASIZE] == "2147483648"


@pytest.mark.parametrize(("value", "cut"), [
    (True, True), ("true", True), ("TRUE", True), (False, False), ("false", False), ("False", False),
    (None, False), ("", False), ("yes", False), (1, False),
])
def test_truncated_is_true_or_its_text(value: Any, cut: bool) -> None:
    from infer_logger.cloudevents import CloudEvent

    marks = {} if value is None else {ev.TRUNCATED: value}
    event = CloudEvent({"specversion": "1.0", "id": "1", "source": "/s", "type": ev.REQUEST, **marks}, b"{}")
    assert ev.is_truncated(event) is cut


def test_a_payload_marked_not_truncated_is_json_after_a_binary_hop() -> None:
    """Binary modes (HTTP, Kafka) carry every attribute as text: "false" counted as truncated, and
    the JSON was stored and shown as base64."""
    from infer_logger.cloudevents import CloudEvent, from_http, from_kafka, to_binary, to_kafka_binary

    event = CloudEvent({"specversion": "1.0", "id": "1", "source": "/s", "type": ev.REQUEST,
                        "datacontenttype": "application/json", ev.TRUNCATED: False}, b'{"instances":[[1,2]]}')
    for got in (from_http(*to_binary(event)), from_kafka(to_kafka_binary(event))):
        assert got[ev.TRUNCATED] == "false" and ev.decode_data(got) == {"instances": [[1, 2]]}
    cut = from_kafka(to_kafka_binary(event.with_attributes(**{ev.TRUNCATED: True})))
    assert cut[ev.TRUNCATED] == "true" and isinstance(ev.decode_data(cut), ev.RawPayload)


@pytest.mark.parametrize(("headers", "skipped"), [
    ([(b"x-skip-logging", b"true"), (b"X-Skip-Logging", b"false")], True),
    ([(b"x-skip-logging", b"false"), (b"x-skip-logging", b"true")], False),
    ([(b"x-skip-logging", b"false"), (b"Seldon-Skip-Logging", b" TRUE ")], True),
    ([(b"x-skip-logging", b"1")], True),
    ([(b"x-other", b"true")], False),
])
def test_a_skip_header_s_first_value_counts(headers: list[tuple[bytes, bytes]], skipped: bool) -> None:
    """As Go's Header.Get reads it (KServe's, Seldon's executor): the headers as a dict took the last."""
    assert ev.skip_logging(headers) is skipped

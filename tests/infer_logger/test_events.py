"""The exchange id rule and the ids the sidecar makes."""

from __future__ import annotations

import uuid

from infer_logger import events as ev


def test_ce_id_wins_then_x_request_id() -> None:
    assert ev.event_id({"ce-id": "a", "x-request-id": "b"}) == "a"
    assert ev.event_id({"x-request-id": "b"}) == "b"


def test_an_id_no_event_may_carry_is_replaced_by_a_new_one() -> None:
    """Header values may hold a tab, or 0x80-0x9F read as Latin-1; a CloudEvents id may not."""
    for sent in ("bad\tid", "caf\x85", "\x7f", "a\xef\xbf\xbe"):  # the last: U+FFFE in UTF-8
        assert ev.read_id(sent) is None
        assert uuid.UUID(ev.event_id({"x-request-id": sent})).version == 7
        assert uuid.UUID(ev.event_id({"ce-id": sent, "x-request-id": "b"})).version == 7


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

"""The exchange id rule and the ids the sidecar makes."""

from __future__ import annotations

import uuid

from infer_logger import events as ev


def test_ce_id_wins_then_x_request_id() -> None:
    assert ev.event_id({"ce-id": "a", "x-request-id": "b"}) == "a"
    assert ev.event_id({"x-request-id": "b"}) == "b"


def test_new_ids_are_uuid7_in_creation_order() -> None:
    ids = [ev.event_id({}) for _ in range(1000)]
    assert all(uuid.UUID(i).version == 7 for i in ids)
    assert len(set(ids)) == len(ids)
    # Time-ordered ids keep the store's primary key growing at one end.
    assert ids == sorted(ids)


def test_a_structured_request_is_known_in_any_case_of_its_content_type() -> None:
    envelope = b'{"specversion":"1.0","id":"env-1","source":"/c","type":"t"}'
    assert ev.cloudevent_id({"content-type": "Application/CloudEvents+JSON"}, envelope) == "env-1"

"""Replays the cloudevents/conformance YAML events over HTTP, as that repo's Go tool sends them.

Binary: body = `Data` as-is, `ce-<attr>` headers, Content-Type = datacontenttype, extensions
whitespace-trimmed, transport extensions as plain headers. Structured: the attributes plus
`data` = `Data` parsed as JSON, sent as application/cloudevents+json. Each decoded event must
then survive our own binary and structured encoders.
"""

from __future__ import annotations

from typing import Any

import orjson
import pytest

from infer_logger.cloudevents import CloudEvent, from_http, to_binary, to_structured
from infer_logger.errors import InvalidEventError

from .conformance import is_json_type, load_yaml_documents, params

V1_FILES = ("yaml/v1.0/v1_minimum.yaml", "yaml/v1.yaml")
V03_FILES = ("yaml/v0.3/v03_minimum.yaml", "yaml/v03.yaml")


def _replays(files: tuple[str, ...]) -> list[Any]:
    loaded = [(name, load_yaml_documents(name)) for name in files]
    if any(documents is None for _, documents in loaded):
        return params(None)
    return params(
        (f"{name.rsplit('/', 1)[-1]}-{doc['ContextAttributes']['id']}-{_mode(doc)}", doc)
        for name, documents in loaded
        for doc in documents or []
    )


def _mode(doc: dict[str, Any]) -> str:
    return str(doc.get("Mode", "binary"))


def _parts(doc: dict[str, Any]) -> tuple[dict[str, str], dict[str, str], dict[str, str], str]:
    attributes = dict(doc["ContextAttributes"])
    extensions = {**attributes.pop("Extensions", {}), **doc.get("Extensions", {})}
    extensions = {name: value.strip() for name, value in extensions.items()}
    return attributes, extensions, dict(doc.get("TransportExtensions", {})), doc.get("Data", "")


def _request(doc: dict[str, Any]) -> tuple[dict[str, str], bytes]:
    attributes, extensions, transport, data = _parts(doc)
    if _mode(doc) == "structured":
        members = {**attributes, **extensions, "data": orjson.loads(data)}
        headers = {"Content-Type": "application/cloudevents+json; charset=UTF-8", **transport}
        return headers, orjson.dumps(members)
    headers = {f"ce-{name}": value for name, value in {**attributes, **extensions}.items()}
    if "ce-datacontenttype" in headers:
        headers["Content-Type"] = headers.pop("ce-datacontenttype")
    return {**headers, **transport}, data.encode("utf-8")


def _same_data(actual: CloudEvent, expected: bytes | None) -> bool:
    if actual.data is None or expected is None:
        return actual.data == expected
    if is_json_type(actual.datacontenttype):
        return bool(orjson.loads(actual.data) == orjson.loads(expected))  # compact vs as sent
    return actual.data == expected


class TestV1Events:
    """Every 1.0 event decodes to exactly what was sent, and survives both our encoders."""

    @pytest.mark.parametrize("doc", _replays(V1_FILES))
    def test_decodes_as_sent(self, doc: dict[str, Any]) -> None:
        attributes, extensions, transport, data = _parts(doc)
        event = from_http(*_request(doc))
        expected = {**attributes, **extensions}
        if _mode(doc) == "structured":
            expected.setdefault("datacontenttype", "application/json")  # implied by `data`
            assert _same_data(event, data.encode())
        else:
            assert event.data == data.encode()  # byte for byte, trailing newline included
        assert event.attributes == expected
        assert {name.lower(): value for name, value in transport.items()}.items() <= event.meta.items()

    @pytest.mark.parametrize("doc", _replays(V1_FILES))
    def test_binary_round_trip(self, doc: dict[str, Any]) -> None:
        event = from_http(*_request(doc))
        assert from_http(*to_binary(event)) == event

    @pytest.mark.parametrize("doc", _replays(V1_FILES))
    def test_structured_round_trip(self, doc: dict[str, Any]) -> None:
        event = from_http(*_request(doc))
        again = from_http(*to_structured(event))
        # A body without Content-Type is bytes of no stated type, written as `data_base64` (the
        # spec's json-data-base64-no-datacontenttype example): no type is added on the way.
        assert again.attributes == event.attributes
        assert _same_data(again, event.data)

    def test_yaml_typing_trap_avoided(self, conformance_dir: Any) -> None:
        documents = load_yaml_documents("yaml/v1.yaml") or []
        assert documents[0]["ContextAttributes"]["specversion"] == "1.0"  # not the float 1.0
        assert documents[0]["ContextAttributes"]["time"] == "2018-04-05T03:56:24Z"  # not a datetime


class TestV03Events:
    """We support CloudEvents 1.0 only: every 0.3 event is refused, saying why."""

    @pytest.mark.parametrize("doc", _replays(V03_FILES))
    def test_rejected(self, doc: dict[str, Any]) -> None:
        with pytest.raises(InvalidEventError) as info:
            from_http(*_request(doc))
        assert info.value.attribute == "specversion"
        assert "0.3 is not supported" in str(info.value)

"""Reading the shared CloudEvents conformance data, and the golden events it refers to.

The data lives outside the repo (never copied in): `$INFER_LOGGER_CONFORMANCE`, else
`<repo>/../shared/conformance`. When it is absent, every case built here is one skipped param.
"""

from __future__ import annotations

import base64
from collections.abc import Iterable, Mapping
from functools import cache
from typing import Any

import orjson
import pytest
import yaml

from infer_logger.cloudevents import CloudEvent, parse_time
from tests.conformance import ROOT, reason

CE = ROOT / "cloudevents-conformance"
MISSING_REASON = reason("cloudevents-conformance")

# Attributes typed Timestamp in the golden samples: compared as instants, per GOLDEN-SAMPLES.md.
TIME_ATTRIBUTES = frozenset({"time", "exttimestamp"})


@cache
def load(relative: str) -> Any:
    """A JSON or YAML file under cloudevents-conformance/, or None when the data is absent.

    YAML is read as typed (safe_load) here: only the re-expressed files use this, and they quote
    the values that would otherwise turn into floats or datetimes.
    """
    path = CE / relative
    if not path.is_file():
        return None
    text = path.read_text(encoding="utf-8")
    return orjson.loads(text) if path.suffix == ".json" else yaml.safe_load(text)


@cache
def load_yaml_documents(relative: str) -> list[dict[str, Any]] | None:
    """The verbatim conformance YAML, every scalar as text: `specversion: 1.0` must stay "1.0"."""
    path = CE / relative
    if not path.is_file():
        return None
    return list(yaml.load_all(path.read_text(encoding="utf-8"), Loader=yaml.BaseLoader))


def params(items: Iterable[tuple[str, Any]] | None) -> list[Any]:
    """(id, case) pairs as pytest params; one skipped param when the data is absent."""
    if items is None:
        return [pytest.param(None, id="no-conformance-data", marks=pytest.mark.skip(reason=MISSING_REASON))]
    return [pytest.param(case, id=case_id) for case_id, case in items]


def cases(relative: str, key: str, id_key: str = "id") -> list[Any]:
    """The list under `key` in a data file, each case named by its own id."""
    data = load(relative)
    return params(None if data is None else ((case[id_key], case) for case in data[key]))


def comparable(attributes: Mapping[str, Any]) -> dict[str, Any]:
    """Attributes with timestamps turned into instants, so that offsets and precision don't count."""
    return {name: _instant(name, value) for name, value in attributes.items()}


def assert_attributes(event: CloudEvent, expected: Mapping[str, Any]) -> None:
    """Every expected attribute is present with that value (timestamps as instants)."""
    actual = comparable(event.attributes)
    for name, value in comparable(expected).items():
        assert name in actual, f"{name} missing from {event.attributes}"
        assert actual[name] == value, name


def assert_same_event(actual: CloudEvent, expected: CloudEvent) -> None:
    assert comparable(actual.attributes) == comparable(expected.attributes)
    assert actual.data == expected.data


def assert_data(event: CloudEvent, case: Mapping[str, Any]) -> None:
    """The vectors' convention: JSON value for JSON types, text for text/*, else base64 bytes."""
    if "expect_data_b64" in case:
        assert event.data == base64.b64decode(case["expect_data_b64"])
    if "expect_data" not in case:
        return
    expected = case["expect_data"]
    if expected is None:
        assert event.data is None
    elif is_json_type(event.datacontenttype):
        assert event.data is not None and orjson.loads(event.data) == expected
    else:
        assert event.data is not None and event.data.decode("utf-8") == expected


def is_json_type(content_type: str | None) -> bool:
    if content_type is None:
        return True
    subtype = content_type.split(";", 1)[0].strip().lower().partition("/")[2]
    return subtype == "json" or subtype.endswith("+json")


def binding_event(spec: Mapping[str, Any]) -> CloudEvent:
    """A vector's SDK event in our model: data as the body binary mode would carry.

    The SDK writes a str body as its UTF-8 text and other JSON values as JSON text.
    """
    if "data_b64" in spec:
        data: bytes | None = base64.b64decode(spec["data_b64"])
    elif spec.get("data") is None:
        data = None
    elif isinstance(spec["data"], str):
        data = spec["data"].encode("utf-8")
    else:
        data = orjson.dumps(spec["data"])
    return CloudEvent(dict(spec["attributes"]), data)


def format_event(spec: Mapping[str, Any]) -> CloudEvent:
    """A JSON-format vector's event in our model: its `data` is a JSON-format value.

    So a str under a JSON (or absent) content type is a JSON string, quotes and all.
    """
    attributes = dict(spec["attributes"])
    value = spec.get("data")
    if "data_b64" in spec:
        return CloudEvent(attributes, base64.b64decode(spec["data_b64"]))
    if value is None:
        return CloudEvent(attributes, None)
    if isinstance(value, str) and not is_json_type(attributes.get("datacontenttype")):
        return CloudEvent(attributes, value.encode("utf-8"))
    return CloudEvent(attributes, orjson.dumps(value))


def parse_raw_http(raw: str) -> tuple[dict[str, str], bytes]:
    """Headers and body of a raw HTTP/1.1 message as the spec and feature files print them.

    Indented lines are the spec's elisions ("... further attributes ..."), not headers.
    """
    head, _, body = raw.partition("\n\n")
    headers: dict[str, str] = {}
    for line in head.splitlines()[1:]:  # the first line is the request or status line
        if line[:1].isspace() or ":" not in line:
            continue
        name, _, value = line.partition(":")
        headers[name.strip()] = value.strip()
    return headers, body.encode("utf-8")


def _instant(name: str, value: Any) -> Any:
    return parse_time(value, name) if name in TIME_ATTRIBUTES and isinstance(value, str) else value


_MINIMAL = {"specversion": "1.0", "id": "minimal", "type": "io.cloudevents.test", "source": "https://cloudevents.io"}
_ALL_CORE = {
    **_MINIMAL,
    "id": "allCore",
    "datacontenttype": "text/plain",
    "dataschema": "https://cloudevents.io/dataschema",
    "subject": "tests",
    "time": "2018-04-05T17:31:00Z",
}
# GOLDEN-SAMPLES.md defines these in prose, for each SDK to build in code. Our attributes are
# untyped beyond str/int/bool, so Binary, Timestamp, URI and URI-reference extensions are held
# in their canonical string encodings (which the spec allows), e.g. extbinary as base64 "TWE=".
GOLDEN: dict[str, CloudEvent] = {
    "minimal": CloudEvent(dict(_MINIMAL)),
    "minimalWithTime": CloudEvent({**_MINIMAL, "id": "minimalWithTime", "time": "2018-04-05T17:31:00Z"}),
    "minimalWithRelativeSource": CloudEvent(
        {**_MINIMAL, "id": "minimalWithRelativeSource", "source": "#fragment"}
    ),
    "allCore": CloudEvent(dict(_ALL_CORE)),
    "simpleTextData": CloudEvent(
        {**_MINIMAL, "id": "simpleData", "datacontenttype": "text/plain"}, b"Simple text"
    ),
    "allExtensionTypes": CloudEvent(
        {
            **_MINIMAL,
            "id": "allExtensionTypes",
            "extinteger": 10,
            "extboolean": True,
            "extstring": "text",
            "extbinary": base64.b64encode(bytes([77, 97])).decode(),
            "exttimestamp": "2023-03-31T15:12:00Z",
            "exturi": "https://cloudevents.io",
            "exturiref": "//authority/path",
        }
    ),
}
GOLDEN_BATCHES: dict[str, list[CloudEvent]] = {
    "empty": [],
    "minimal": [GOLDEN["minimal"]],
    "minimal2": [GOLDEN["minimal"], GOLDEN["minimal"]],
    "minimalAndAllCore": [GOLDEN["minimal"], GOLDEN["allCore"]],
    "minimalAndAllExtensionTypes": [GOLDEN["minimal"], GOLDEN["allExtensionTypes"]],
}
# Known slips in the upstream data, applied on top of the golden sample: the prose gives
# simpleTextData the id "simpleData" while its only test event uses "simpleTextData".
GOLDEN_ERRATA: dict[str, dict[str, Any]] = {"validSimpleTextData": {"id": "simpleTextData"}}


def golden(test_id: str, sample_id: str) -> CloudEvent:
    sample = GOLDEN[sample_id]
    return CloudEvent({**sample.attributes, **GOLDEN_ERRATA.get(test_id, {})}, sample.data)

"""The audit document: one inference event as partial documents to deep-merge by `_id`.

An exchange's request, response and explanation events share an id and arrive in any order. Each
becomes `[(doc_id, partial), ...]`, one per instance (`<id>-<instance>`), or one per exchange
(`<id>`) with `per_instance=False`. Every partial holds only what its event knows, and no two
kinds write one field differently, so upserting them (`_bulk` `update` + `doc_as_upsert`) in any
order ends in the same document:

    id, instance                 the exchange id and the prediction's index in the batch
    @timestamp                   request time: the request's `time`; from the response,
                                 `time - latencyms` (the same moment within ~1 ms)
    model, model_version, service, namespace, component, endpoint, protocol, path
                                 from the request and response events (copies of one another)
    metadata                     the `metadata` attribute as an object
    status, latency_ms           the response's, on every instance's document it knows of (a
                                 latency that is not finite, or over ~30 years, is left out)
    request                      {"features": {name: value}}   an object instance, or a list with
                                                               `feature_names` of the same length
                                 {"values": [...]}             a list of scalars (or of lists of
                                                               them), names unknown
                                 {"items": [{...}, ...]}       a list holding objects, names
                                                               unknown; other items as {"value": x}
                                 {"value": x}                  anything else (a JSON scalar)
                                 {"raw": "base64"}             a payload that is not JSON, or was
                                                               truncated (any kind; kept, not indexed)
    response                     {"prediction": x}             a scalar
                                 {"prediction": i, "probabilities": [...]}
                                                               a list that sums to 1 in [0, 1]: i
                                                               is its argmax
                                 {"values": [...]}             any other list
                                 {"outputs": {...}}            several named outputs (V2 tensors)
                                 {"error": "text"}             status >= 400: the body as text on
                                                               instance 0 (bytes that are not text
                                                               in their charset: `{"base64":...}`);
                                                               the other instances get its first
                                                               1,000 characters, marked
    explanation                  the explainer's object as is; a list becomes
                                 {"attributions": {name: v}} with names, else {"values": [...]}
                                 or {"items": [...]} as for the request
    <kind>_time                  the event's `time`
    <kind>_attributes            every CloudEvents attribute, as text (the raw audit trail)

A response's part writes the keys it does not set as null, so that a later response of the id
(a retry that kept x-request-id) replaces an earlier one instead of merging with it; the
instances it has no part for get all of them null. A request's and a response's attributes write
the cut marks (`truncated`, `datasize`) null when they have none, so that a retry's payload is not
said to be cut for the earlier one's. (A request's part is as it is: a retry's request has the
shape of the first's. The documents of instances beyond a retry's count are not known here, and
keep what the earlier exchange wrote; the audit store deletes such rows.)

A one-tensor V2 row (`{"input-0": [...]}`, `{"output-0": 1}`) is read as the tensor's value.
With `per_instance=False` there is no `instance` and each part is the list of the instances'
parts. Explanation events write no shared attributes and no `@timestamp` (an explainer may name
another component, and explains later); they carry `namespace` and `inferenceservicename` only
so that the sink routes them to the exchange's index.

Limits: a response knows its own instances only. When it has fewer than the request (an error
body, a model answering one item for a batch), the caller passes `instances` (the request's
count, when it saw the request first) to mark the rest with status; otherwise those documents
have no status. A response with more items than the request makes documents without `request`.
"""

from __future__ import annotations

import hashlib
from collections.abc import Mapping, Sequence
from datetime import datetime, timedelta
from typing import Any

import orjson

from infer_logger import events, payloads
from infer_logger.cloudevents.event import CloudEvent, attribute_text

Document = dict[str, Any]
KINDS = events.KINDS
SHARED = events.SHARED_FIELDS
_MAX_ID_BYTES = 512  # Elasticsearch refuses longer _ids
_SUM_TOLERANCE = 0.01  # float32 softmax outputs rarely sum to exactly 1
_ERROR_COPY_CHARS = 1000  # of an error body on the instances after the first
# Every key a response part may have (`_response_part`, error, raw), as null.
_RESPONSE_CLEARED: Document = dict.fromkeys(
    ("prediction", "probabilities", "values", "outputs", "error", "raw"))
_CUT_MARKS: Document = dict.fromkeys((events.TRUNCATED, events.DATASIZE))
_SPLIT = {"request": payloads.split_request, "response": payloads.split_response,
          "explanation": payloads.split_explanation}


def documents(
    event: CloudEvent,
    *,
    per_instance: bool = True,
    feature_names: Sequence[str] | None = None,
    instances: int = 0,
) -> list[tuple[str, Document]]:
    """The partial documents to upsert for `event`; empty for a type that is not inference.

    `feature_names` names the items of list instances (and list explanations); `instances` is
    how many instances the exchange's request had, when known (see the module docstring).
    """
    kind = KINDS.get(event.type)
    if kind is None:
        return []
    common = _common(event, kind)
    body = events.decode_data(event)
    parts: list[Document | None]
    if events.is_error(event):
        # The error body is the whole exchange's: every instance gets it, the first one whole. A
        # copy per instance would multiply it (a 1 MiB body, 400 instances: 400 MiB to index).
        # No body is "": not the `null` a body may say.
        text = _text(payloads.error_body(event, body), event) if event.data else ""
        parts = [{"error": text}]
        if per_instance and instances > 1:
            parts += [{"error": _cut(text)}] * (instances - 1)
    elif (raw := _raw(body)) is not None:
        parts = [{"raw": raw}]  # its shape is unknown: never a prediction or features
    else:
        parts = [_part(kind, item, feature_names) for item in _SPLIT[kind](body)]
    if not per_instance:
        doc = dict(common)
        if present := [p for p in parts if p is not None]:
            doc[kind] = present
        elif kind != "explanation":
            doc[kind] = None  # replaces an earlier request's or response's list (a retry under the same id)
        return [(doc_id(event.id), doc)]
    if kind == "response":
        parts += [None] * (instances - len(parts))  # status on instances without a prediction
        # A later response of the id (a retry that kept x-request-id) replaces an earlier one:
        # the update deep-merges objects, so every key this one does not set is written null.
        parts = [{**_RESPONSE_CLEARED, **(part or {})} for part in parts]
    out: list[tuple[str, Document]] = []
    for index, part in enumerate(parts):
        doc = {**common, "instance": index}
        if part is not None:
            doc[kind] = part
        out.append((doc_id(event.id, index), doc))
    return out


def instances(event: CloudEvent) -> int:
    """How many per-instance documents `documents` makes for a request `event` (its instance
    count, for the response's `instances`), without building them."""
    body = events.decode_data(event)
    return 1 if _raw(body) is not None else len(_SPLIT["request"](body))


def doc_id(event_id: str, instance: int | None = None) -> str:
    """`<id>-<instance>` (or `<id>`); ids too long for Elasticsearch are replaced by their hash."""
    if len(event_id.encode()) > _MAX_ID_BYTES - 12:
        event_id = "sha256:" + hashlib.sha256(event_id.encode()).hexdigest()
    return event_id if instance is None else f"{event_id}-{instance}"


def _common(event: CloudEvent, kind: str) -> Document:
    attrs = event.attributes
    doc: Document = {"id": event.id}
    time = events.as_utc(attrs.get("time"))
    if kind != "explanation":
        for field, name in SHARED.items():
            value = attrs.get(name)
            if value is not None and value != "":  # "" is KServe's "unset": never overwrite with it
                doc[field] = str(value)
        if (metadata := _metadata(attrs.get(events.METADATA))) is not None:
            doc["metadata"] = metadata
    if kind == "request":
        if time is not None:
            doc["@timestamp"] = _format(time)
    elif kind == "response":
        status, latency = events.as_int(attrs.get(events.STATUSCODE)), events.as_latency(attrs.get(events.LATENCYMS))
        if status is not None:
            doc["status"] = status
        if latency is not None:
            doc["latency_ms"] = latency
        if time is not None and (asked := request_time(time, attrs.get(events.LATENCYMS))) is not None:
            doc["@timestamp"] = _format(asked)
    if time is not None:
        doc[f"{kind}_time"] = _format(time)
    texts = {name: attribute_text(value) for name, value in attrs.items()}
    # A later request or response of the id replaces an earlier one (see `documents`): marks only
    # a cut payload has are written null, or a retry's whole payload was said to be cut.
    doc[f"{kind}_attributes"] = texts if kind == "explanation" else {**_CUT_MARKS, **texts}
    return doc


def request_time(response_time: datetime, latencyms: object) -> datetime | None:
    """When a response's request came: its `time` less its `latencyms` attribute (one left out of
    the document counts as none); None within that latency of year 1. The audit store dates the
    rows of a response whose request it has not seen so too."""
    try:
        return response_time - timedelta(milliseconds=events.as_latency(latencyms) or 0.0)
    except OverflowError:
        return None


def _part(kind: str, item: Any, names: Sequence[str] | None) -> Document | None:
    if item is None:
        return None
    if kind == "response":
        return _response_part(_unwrap(item))
    if kind == "explanation" and isinstance(item, Mapping):
        return dict(item)  # the explainer's own shape (method, attributions by feature...)
    if isinstance(item, Mapping) and len(item) == 1 and isinstance(_unwrap(item), list):
        item = _unwrap(item)  # a V2 row of one tensor: its name says nothing about the features
    if isinstance(item, list):
        if names and len(names) == len(item):
            return {"attributions" if kind == "explanation" else "features": dict(zip(names, item))}
        if _scalars(item):
            return {"values": item}
        # Objects among the items (tokens, {feature, value} pairs): a keyword field refuses them,
        # `items` (flattened) takes any shape whose top level is objects.
        return {"items": [x if isinstance(x, Mapping) else {"value": x} for x in item]}
    if isinstance(item, Mapping):
        return {"features": dict(item)}
    return {"value": item}


def _response_part(item: Any) -> Document:
    if isinstance(item, Mapping):
        return {"outputs": dict(item)}
    if isinstance(item, list):
        if _is_distribution(item):
            return {"prediction": max(range(len(item)), key=item.__getitem__), "probabilities": item}
        return {"values": item}
    return {"prediction": item}


def _scalars(values: list[Any]) -> bool:
    """Only scalars, or lists of them, at any depth (a loop: JSON nests deeper than Python recurses)."""
    pending = [values]
    while pending:
        for value in pending.pop():
            if isinstance(value, list):
                pending.append(value)
            elif isinstance(value, Mapping):
                return False
    return True


def _unwrap(item: Any) -> Any:
    # A V2 row of one output tensor ({"output-0": 1}) is that tensor's value.
    if isinstance(item, Mapping) and len(item) == 1:
        return next(iter(item.values()))
    return item


def _is_distribution(values: list[Any]) -> bool:
    if len(values) < 2 or not all(_is_number(v) and 0.0 <= v <= 1.0 for v in values):
        return False
    return abs(float(sum(values)) - 1.0) <= _SUM_TOLERANCE


def _is_number(value: Any) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool)


def _metadata(value: object) -> Document | None:
    if value is None or value == "":
        return None
    try:
        parsed = orjson.loads(str(value))
    except orjson.JSONDecodeError:
        parsed = None
    # The mapping wants an object: anything else is kept, as text, beside nothing else.
    return parsed if isinstance(parsed, dict) else {"raw": str(value)}


def _text(value: object, event: CloudEvent) -> str:
    if isinstance(value, str):
        return value
    try:
        return orjson.dumps(value).decode()
    except TypeError:  # nested past orjson's 254 levels: the payload as sent, as the store has it
        sent = payloads.as_sent(event)
        return sent if isinstance(sent, str) else orjson.dumps(sent).decode()


def _cut(text: str) -> str:
    if len(text) <= _ERROR_COPY_CHARS:
        return text
    return f"{text[:_ERROR_COPY_CHARS]}... [cut from {len(text)} characters: instance 0 has it whole]"


def _raw(body: object) -> str | None:
    """The base64 text `decode_data` gives for a payload that is not JSON (or was truncated);
    None for JSON, even a JSON object that happens to be `{"base64": ...}`."""
    return body["base64"] if isinstance(body, events.RawPayload) else None


def _format(moment: datetime) -> str:
    # %Y writes year 999 as "999", which Elasticsearch's date format refuses.
    return f"{moment.year:04d}-" + moment.strftime("%m-%dT%H:%M:%S.%fZ")

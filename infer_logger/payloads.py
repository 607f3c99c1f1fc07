"""Split inference payloads into per-instance items (one audit record per prediction).

Shapes are recognised by structure, not by the `protocol` attribute, because KServe's V1 server
accepts TF-style `inputs` too and mislabelled paths are common:

- V1: `{"instances": [...]}` / `{"predictions": [...]}`, one item per element.
- TF: `{"inputs": [...]}` (row) or `{"inputs": {"name": [...], ...}}` (columnar); same for `outputs`.
- V2 (Open Inference Protocol): `{"inputs"|"outputs": [{"name", "shape", "datatype", "data"}]}`; row i
  is `{tensor_name: value}`, sliced by `shape[0]` from natural (nested) or flattened row-major data.
- Explanations: `{"explanations": [...]}`, one per instance; any other explanation is instance 0's.

Whatever cannot be split safely (error bodies, truncated or binary data, inconsistent shapes, shapes
of more than 64 dimensions, empty batches, V2 tensors without `data`) becomes one item holding the
whole payload, so nothing is dropped from the audit trail. An error body that is not JSON (a
proxy's plain-text or HTML page) is that item as text when its bytes are text (UTF-8, or the
charset `datacontenttype` names), else as base64 like other bodies that are not JSON.
Pure Python on purpose: the store runs in the sidecar, which must not pull in numpy or pandas.
"""

from __future__ import annotations

import codecs
from collections.abc import Mapping
from math import prod
from typing import Any

from infer_logger import binary_tensors, events
from infer_logger.cloudevents.event import CloudEvent, charset, is_json_type, is_known_charset

_MAX_DIMS = 64  # numpy's own limit (NPY_MAXDIMS): a shape with more is not a tensor's
_MAX_CHARACTER_BYTES = 4  # the most bytes a cut character holds back (UTF-8's, GB18030's)


def instances(event: CloudEvent) -> list[Any]:
    """The event's payload as one item per instance (at least one item)."""
    return split(event, events.decode_data(event))


def split(event: CloudEvent, body: Any) -> list[Any]:
    """`instances` of the event's payload decoded by `events.decode_data` (`body`): for a caller
    that looks at the decoded payload too."""
    if event.type == events.REQUEST:
        return split_request(body)
    if event.type == events.RESPONSE:
        return [error_body(event, body)] if events.is_error(event) else split_response(body)
    if event.type == events.EXPLANATION:
        return split_explanation(body)
    return [body]


def error_body(event: CloudEvent, body: Any) -> Any:
    """An error response's decoded `body` as audited: JSON as it is; anything else (an Envoy or
    nginx page, a cut body) as its text when it is text (`as_text`), else as decoded (base64: bytes
    replaced by U+FFFD would be lost for good)."""
    if isinstance(body, events.RawPayload) and (text := as_text(event)) is not None:
        return text
    return body


def as_sent(event: CloudEvent) -> str | events.RawPayload:
    """The payload's bytes as text when they are text (`as_text`), else as base64."""
    text = as_text(event)
    return events.RawPayload.of(event.data or b"") if text is None else text


def as_text(event: CloudEvent) -> str | None:
    """The payload's bytes as text, decoded strictly by the charset `datacontenttype` names (one
    Python knows), else as UTF-8; a truncated payload up to its last whole character (it may be
    cut in one). None when they are not text so, or the text does not encode back to them: the
    caller keeps them as base64."""
    data = event.data or b""
    encoding = _charset(event.datacontenttype) or "utf-8"
    try:
        if events.is_truncated(event):
            decoder = codecs.getincrementaldecoder(encoding)()
            text = decoder.decode(data, final=False)  # holds a cut character's bytes back
            held = len(decoder.getstate()[0])
            if held > _MAX_CHARACTER_BYTES:  # more than a character (UTF-7's open run, IDNA's label): lost
                return None
            data = data[: len(data) - held]
        else:
            text = data.decode(encoding)
        # A codec may read bytes it would not write back (UTF-7's optional shifts): the bytes
        # would be lost. Strict UTF-8 always writes them back.
        if codecs.lookup(encoding).name != "utf-8" and text.encode(encoding) != data:
            return None
        text.encode()  # a lone surrogate (UTF-7 reads `+2AA-` as one): no store or index writes it
    except UnicodeError:  # not only UnicodeDecodeError: UTF-16's incremental decoder, for a missing BOM
        return None
    return text


def _charset(content_type: str | None) -> str | None:
    """The text encoding `content_type`'s charset names, when Python has it (not base64 or zlib,
    which are codecs too); None for JSON, UTF-8 whatever its label says (RFC 8259 11)."""
    name = charset(content_type)
    if name is None or not is_known_charset(name) or is_json_type(content_type or ""):
        return None
    try:
        b"\0".decode(name)  # b"" is decoded without looking the codec up
    except UnicodeDecodeError:  # a text encoding wanting more bytes (UTF-16)
        pass
    except (LookupError, ValueError):  # unknown, or not to text (base64); a NUL in the name
        return None
    return name


def split_request(body: Any) -> list[Any]:
    return _split(body, "instances", "inputs")


def split_response(body: Any) -> list[Any]:
    return _split(body, "predictions", "outputs")


def split_explanation(body: Any) -> list[Any]:
    if isinstance(body, Mapping):
        items = body.get("explanations")
        if isinstance(items, list) and items:
            return items
    return [body]


def _split(body: Any, rows_key: str, tensors_key: str) -> list[Any]:
    if not isinstance(body, Mapping):
        return [body]
    rows = body.get(rows_key)
    if isinstance(rows, list):
        return rows or [body]
    if tensors_key in body:
        items = _split_tensors(body[tensors_key])
        if items:
            return items
    return [body]


def _split_tensors(value: Any) -> list[Any] | None:
    if isinstance(value, list):
        if value and all(_is_tensor(t) for t in value):
            return _tensor_rows(value)
        if value and all(_is_v2_tensor(t) for t in value):
            return None  # tensors without `data` (Triton's shared memory names a region): no rows to cut
        return value  # TF row format: already one element per instance
    if isinstance(value, Mapping):
        return _columns_to_rows(value)
    return None


def _is_tensor(value: Any) -> bool:
    return isinstance(value, Mapping) and "name" in value and "data" in value


def _is_v2_tensor(value: Any) -> bool:
    """Whether `value` is a V2 tensor, with data or not: a `name`, a list `shape` and a V2
    `datatype`. Looser, TF rows were taken for tensors (a row with a `datatype` feature, or a
    `name` and a list `shape`): a batch of them became one row."""
    return (
        isinstance(value, Mapping)
        and "name" in value
        and isinstance(value.get("shape"), list)
        and value.get("datatype") in binary_tensors.DATATYPES
    )


def _tensor_rows(tensors: list[Mapping[str, Any]]) -> list[dict[str, Any]] | None:
    columns: dict[str, list[Any]] = {}
    for tensor in tensors:
        rows = _rows(tensor.get("shape"), tensor["data"])
        name = str(tensor["name"])
        if rows is None or name in columns:  # two tensors of one name (or 1 and "1"): kept whole
            return None
        columns[name] = rows
    return _columns_to_rows(columns)


def _columns_to_rows(columns: Mapping[str, Any]) -> list[dict[str, Any]] | None:
    """`{name: [v0, v1, ...]}` -> `[{name: v0}, {name: v1}, ...]` when every column agrees on n."""
    lengths = {len(c) if isinstance(c, list) else -1 for c in columns.values()}
    if len(lengths) != 1 or (n := lengths.pop()) <= 0:
        return None
    return [{name: column[i] for name, column in columns.items()} for i in range(n)]


def _rows(shape: Any, data: Any) -> list[Any] | None:
    """Rows of a V2 tensor along its first dimension, or None when shape and data disagree."""
    if not isinstance(shape, list) or not 0 < len(shape) <= _MAX_DIMS or not all(_is_dim(d) for d in shape):
        return None
    flat = _flatten(data)
    n, inner = shape[0], shape[1:]
    size = prod(inner)
    if len(flat) != n * size or size == 0:  # rows of nothing: [10**12, 0] fits `[]`
        return None
    if not inner:
        return flat
    return [_reshape(flat[i * size : (i + 1) * size], inner) for i in range(n)]


def _is_dim(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= 0


def _flatten(data: Any) -> list[Any]:
    if not isinstance(data, list):
        return [data]  # a lone scalar (e.g. one BYTES string) is a 1-element tensor
    out: list[Any] = []
    stack = [iter(data)]
    while stack:
        for item in stack[-1]:
            if isinstance(item, list):
                stack.append(iter(item))
                break
            out.append(item)
        else:
            stack.pop()
    return out


def _reshape(flat: list[Any], shape: list[int]) -> list[Any]:
    if len(shape) == 1:
        return flat
    step = prod(shape[1:])
    return [_reshape(flat[i * step : (i + 1) * step], shape[1:]) for i in range(shape[0])]

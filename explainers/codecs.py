"""KServe V1 and V2 (Open Inference Protocol) payloads to and from 2-D arrays of instances.

Instances are `(n, features)` arrays in `Schema.feature_names` order: float64 when every feature is
numeric, object (str for categorical features) otherwise. Whatever does not fit raises
`InvalidInputError` naming the expected shape (`[n, 4]` and the feature names); an answer from
the predictor that does not fit raises `PredictorError`.
"""

from __future__ import annotations

import reprlib
from collections import Counter
from collections.abc import Collection, Mapping, Sequence
from dataclasses import dataclass
from math import isfinite, prod
from typing import Any

import numpy as np
import orjson

from explainers.errors import InvalidInputError, PredictorError
from infer_logger import binary_tensors
from infer_logger.errors import BinaryDataError

_NUMPY = orjson.OPT_SERIALIZE_NUMPY
_TOO_DEEP = "the request nests JSON too deeply to read"
# A bad value in a message: JSON nests up to 1024 levels, and repr of that is a RecursionError (a 500).
_brief = reprlib.Repr()
_brief.maxlevel, _brief.maxstring, _brief.maxother = 3, 60, 60
# The Open Inference Protocol's datatypes, as JSON carries them: FP16 (and Triton's BF16) only as
# binary data, as KServe has it (a JSON number does not say it fits the precision).
_BINARY_ONLY = frozenset({"FP16", "BF16"})
_JSON_DATATYPES = tuple(d for d in binary_tensors.DATATYPES if d not in _BINARY_ONLY)
_INTEGER_RANGES = {
    **{f"INT{bits}": (-(1 << bits - 1), (1 << bits - 1) - 1) for bits in (8, 16, 32, 64)},
    **{f"UINT{bits}": (0, (1 << bits) - 1) for bits in (8, 16, 32, 64)},
}


@dataclass(frozen=True)
class Schema:
    """The model's input: feature names (and which are strings), and how V2 carries them."""

    feature_names: tuple[str, ...]
    categorical: frozenset[str] = frozenset()
    tensor: str | None = "input-0"
    """V2: one `[n, width]` tensor of this name; None: one tensor per feature, named by it."""
    datatype: str = "FP64"
    datatypes: tuple[str, ...] = ()
    """One tensor per feature: each one's datatype, in feature order (none known: FP64, or BYTES
    for strings). A strict server (Triton) refuses any other than its metadata's."""
    shapes: tuple[tuple[int, ...], ...] = ()
    """One tensor per feature: each one's sizes after the first, all 1 (`[-1, 1]`: `(1,)`), in
    feature order (none known: `[n]`). A strict server refuses any other shape than its metadata's."""

    @property
    def width(self) -> int:
        return len(self.feature_names)

    @property
    def numeric(self) -> bool:
        return not self.categorical

    def datatype_of(self, index: int) -> str:
        """The datatype of the tensor of feature `index` (one tensor per feature)."""
        if self.feature_names[index] in self.categorical:
            return "BYTES"
        return self.datatypes[index] if self.datatypes else "FP64"

    def shape_of(self, index: int, n: int) -> list[int]:
        """The shape of the tensor of feature `index` for `n` rows (one tensor per feature)."""
        return [n, *self.shapes[index]] if self.shapes else [n]

    def expected(self) -> str:
        names = ", ".join(self.feature_names)
        return f"expected shape [n, {self.width}] ({names})"


def explain_parameters(body: Mapping[str, Any], names: Collection[str] = ()) -> dict[str, Any]:
    """Per-request parameters: V1 `parameters` (or `explain_parameters`); V2 those of `parameters`
    named in `names` (the explain methods' parameters, checked as V1's are), with
    `parameters.explain_parameters` over them. The Open Inference Protocol's parameter values are
    strings, numbers and booleans (tritonclient sends no object), and its `parameters` are free-form:
    the names of no explain method are other servers' (`binary_data_output`...), left alone."""
    params = body.get("parameters")
    if _holds_tensors(body.get("inputs")) and isinstance(params, Mapping):
        nested = params.get("explain_parameters")
        if nested is not None and not isinstance(nested, Mapping):
            raise InvalidInputError("explain parameters must be a JSON object")
        return {**{k: v for k, v in params.items() if k in names}, **(nested or {})}
    if params is None:
        params = body.get("explain_parameters")
    if params is None:
        return {}
    if not isinstance(params, Mapping):
        raise InvalidInputError("explain parameters must be a JSON object")
    return dict(params)


def decode_body(body: bytes, header_length: str | None, max_values: int | None = None) -> dict[str, Any]:
    """A request body, JSON or with binary tensor data; binary inputs get their values as `data`.

    A binary tensor of more than `max_values` values is refused before it is unpacked (its Python
    values take ~20 times its bytes): a request within `max_instances` rows of `width` features
    has none, so the caller passes their product.
    """
    try:
        doc, raw = binary_tensors.decode(body, header_length, "inputs", max_values)
    except BinaryDataError as exc:
        raise InvalidInputError(str(exc)) from None
    except RecursionError:  # in the message naming a bad shape or datatype nested ~1000 deep
        raise InvalidInputError(_TOO_DEEP) from None
    if raw:
        for i, tensor in enumerate(doc["inputs"]):
            if not isinstance(tensor, dict) or not _is_binary(tensor):
                continue  # not a tensor (decode_instances names it), or one carrying its own `data`
            name = binary_tensors.tensor_name(tensor, "inputs", i)
            tensor["data"] = _values(tensor["datatype"], raw[name])
    return doc


def _is_binary(tensor: Mapping[str, Any]) -> bool:
    params = tensor.get("parameters")
    return isinstance(params, Mapping) and "binary_data_size" in params


def _values(datatype: str, raw: memoryview) -> list[Any]:
    if datatype == "BYTES":  # text features; undecodable bytes are left for the schema check to name
        return [v.decode("utf-8", "replace") for v in binary_tensors.unpack_values("BYTES", raw)]
    values: list[Any] = _numbers(datatype, raw).tolist()
    return values


def _numbers(datatype: str, raw: memoryview) -> np.ndarray:
    """Binary data of a fixed-size datatype (checked by `binary_tensors.decode`) as an array."""
    if datatype == "BF16":  # no numpy dtype: each element is the high half of an FP32
        return (np.frombuffer(raw, "<u2").astype(np.uint32) << 16).view(np.float32)
    return np.frombuffer(raw, binary_tensors.NUMPY_DTYPES[datatype])


def _bf16(values: np.ndarray) -> np.ndarray:
    """Numbers as BF16 bits, rounded to the nearest even (by way of FP32) as `binary_tensors.pack_values`
    does, except that a value past BF16's range becomes infinity here (as the FP32 cast does)."""
    bits = np.ascontiguousarray(values, dtype=np.float32).view(np.uint32)
    rounded = (bits + 0x7FFF + (bits >> 16 & 1)) >> 16
    # NaN: rounding its payload up could carry into infinity or the sign
    return np.where(bits & 0x7FFFFFFF > 0x7F800000, bits >> 16 | 0x0040, rounded).astype("<u2")


def decode_instances(body: Any, schema: Schema, max_rows: int | None = None) -> np.ndarray:
    """The instances of a V1 (`instances`, or TF-style row `inputs`) or V2 (`inputs` tensors) request.

    More than `max_rows` are refused before any is converted (6 million took seconds)."""
    try:
        return _instances(body, schema, max_rows)
    except RecursionError:  # orjson reads 1024 levels; Python's recursion stops sooner
        raise InvalidInputError(f"{_TOO_DEEP}; {schema.expected()}") from None


def _instances(body: Any, schema: Schema, max_rows: int | None) -> np.ndarray:
    if not isinstance(body, Mapping):
        raise InvalidInputError(f'expected a JSON object with "instances" or "inputs"; {schema.expected()}')
    if isinstance(body.get("instances"), list):
        _check_count(len(body["instances"]), max_rows)
        return _rows(body["instances"], schema, "instances")
    inputs = body.get("inputs")
    if inputs and _holds_tensors(inputs):
        names = Counter(binary_tensors.tensor_name(t, "inputs", i) for i, t in enumerate(inputs))
        twice = [name for name, n in names.items() if n > 1]
        if twice:  # which one is the feature (or whose bytes were they, for a binary tensor)?
            raise InvalidInputError(f"inputs: tensor {_brief.repr(twice[0])} is named twice; "
                                    f"{schema.expected()}")
        return _tensors(inputs, schema, max_rows)
    if isinstance(inputs, list):
        _check_count(len(inputs), max_rows)
        return _rows(inputs, schema, "inputs")
    raise InvalidInputError(f'expected "instances" (V1) or "inputs" (V2); {schema.expected()}')


def _holds_tensors(inputs: Any) -> bool:
    """V2 `inputs` (tensor objects), not TF-style V1 rows (lists, or objects keyed by feature). A
    tensor without `data` is one too (by its `shape`, a list, and `name` or `datatype`): said to have
    no data, not read as a row missing every feature (a row with features `name` and `shape` stays one)."""
    return isinstance(inputs, list) and all(
        isinstance(t, Mapping) and ("data" in t or isinstance(t.get("shape"), list) and ("name" in t or "datatype" in t))
        for t in inputs)


def _rows(rows: list[Any], schema: Schema, key: str, text: frozenset[str] = frozenset()) -> np.ndarray:
    """`text`: the features that came in BYTES tensors, whose numbers are strings."""
    if not rows:
        raise InvalidInputError(f"{key} is empty; {schema.expected()}")
    if schema.numeric and all(isinstance(r, list) for r in rows):
        try:  # the common case: one conversion, checked afterwards
            array = np.asarray(rows, dtype=float)
            if (array.ndim == 2 and array.shape[1] == schema.width and not _has_non_number(rows)
                    and np.isfinite(array).all()):
                return array
        except (TypeError, ValueError):
            pass
    return np.array([_row(r, schema, f"{key}[{i}]", text) for i, r in enumerate(rows)],
                    dtype=float if schema.numeric else object).reshape(len(rows), schema.width)


def _has_non_number(rows: list[list[Any]]) -> bool:
    # None too: numpy reads null as NaN, which `_value` refuses, so the fast path must not take it.
    return any(v is None or isinstance(v, bool | str) for row in rows for v in row)


def _row(row: Any, schema: Schema, where: str, text: frozenset[str] = frozenset()) -> list[Any]:
    if isinstance(row, Mapping):
        missing = [f for f in schema.feature_names if f not in row]
        unknown = [k for k in row if k not in schema.feature_names]
        if missing or unknown:
            raise InvalidInputError(f"{where}: missing {missing}, unknown {unknown}; {schema.expected()}")
        row = [row[f] for f in schema.feature_names]
    if not isinstance(row, list) or len(row) != schema.width:
        got = f"{len(row)} values" if isinstance(row, list) else type(row).__name__
        raise InvalidInputError(f"{where}: got {got}; {schema.expected()}")
    return [_value(v, name, schema, f"{where}[{j}]", name in text)
            for j, (v, name) in enumerate(zip(row, schema.feature_names))]


def _value(value: Any, name: str, schema: Schema, where: str, text: bool = False) -> Any:
    if name in schema.categorical:
        if isinstance(value, str):
            return value
        raise InvalidInputError(f"{where} ({name}): expected a string, got {_brief.repr(value)}")
    if text and isinstance(value, str | bytes):
        # BYTES elements are strings (the Open Inference Protocol): a mixed model's one input
        # tensor is BYTES, its numbers sent as text (by our own predictor client too).
        try:
            value = float(value)
        except ValueError:
            raise InvalidInputError(f"{where} ({name}): expected a number, got {_brief.repr(value)}; "
                                    f"{schema.expected()}") from None
    if isinstance(value, int | float) and not isinstance(value, bool):
        if isfinite(value):  # NaN and infinities (binary tensor data holds them) as JSON's null
            return float(value)
        raise InvalidInputError(f"{where} ({name}): expected a finite number, got {_brief.repr(value)}")
    raise InvalidInputError(f"{where} ({name}): expected a number, got {_brief.repr(value)}; "
                            f"{schema.expected()}")


def _check_count(count: int, max_rows: int | None) -> None:
    if max_rows is not None and count > max_rows:
        raise InvalidInputError(f"{count} instances; at most {max_rows} per request")


def _tensors(inputs: list[Mapping[str, Any]], schema: Schema, max_rows: int | None) -> np.ndarray:
    if len(inputs) == 1:  # several, for one feature too: the one named by it (not the first)
        tensor = inputs[0]
        _check_tensor(tensor)
        shape = _shape(tensor)
        if len(shape) == 1:  # one instance as a vector, or one feature as a column
            shape = [1, shape[0]] if schema.width > 1 else [shape[0], 1]
        if len(shape) != 2 or shape[1] != schema.width:
            raise InvalidInputError(f"inputs[0] ({tensor.get('name')}): shape {shape}; {schema.expected()}")
        _check_count(shape[0], max_rows)
        flat = _flat(tensor, shape)
        rows = [flat[i * schema.width:(i + 1) * schema.width] for i in range(shape[0])]
        text = frozenset(schema.feature_names) if tensor.get("datatype") == "BYTES" else frozenset()
        return _rows(rows, schema, f"inputs[0] ({tensor.get('name')})", text)
    by_name = {str(t.get("name")): t for t in inputs}
    for tensor in inputs:  # the features' and any other: the request is refused as a whole
        _check_tensor(tensor)
    missing = [f for f in schema.feature_names if f not in by_name]
    if missing:
        raise InvalidInputError(f"inputs: no tensor for {missing}; expected one [n] tensor per feature "
                                f"({', '.join(schema.feature_names)}) or one [n, {schema.width}] tensor")
    columns = []
    for name in schema.feature_names:
        shape = _shape(by_name[name])
        if not shape or prod(shape[1:]) != 1:
            raise InvalidInputError(f"inputs ({name}): shape {shape}; expected [n] or [n, 1]")
        _check_count(shape[0], max_rows)
        columns.append(_flat(by_name[name], [shape[0]]))
    if len({len(c) for c in columns}) != 1:
        raise InvalidInputError("inputs: the feature tensors have different lengths")
    text = frozenset(name for name in schema.feature_names if by_name[name].get("datatype") == "BYTES")
    return _rows([list(r) for r in zip(*columns)], schema, "inputs", text)


def _check_tensor(tensor: Mapping[str, Any]) -> None:
    """A datatype of the protocol's, and data. A binary tensor's datatype was checked as its bytes
    were read (FP16 and BF16 allowed there); its values are in `data` now."""
    datatype, name = tensor.get("datatype"), tensor.get("name")
    if not _is_binary(tensor) and datatype not in _JSON_DATATYPES:
        if datatype in _BINARY_ONLY:
            raise InvalidInputError(f"inputs ({name}): {datatype} is taken as binary tensor data only, not as "
                                    "JSON numbers (as KServe has it); send it as FP32 or FP64 in JSON")
        raise InvalidInputError(f"inputs ({name}): `datatype` {_brief.repr(datatype)} is not one of "
                                f"{', '.join(_JSON_DATATYPES)}")
    if "data" not in tensor:
        raise InvalidInputError(f"inputs ({name}): tensor {_brief.repr(name)} has no data")


def _shape(tensor: Mapping[str, Any]) -> list[int]:
    shape = tensor.get("shape")
    if not isinstance(shape, list) or not all(isinstance(d, int) and not isinstance(d, bool) and d >= 0
                                              for d in shape):
        raise InvalidInputError(f"inputs ({tensor.get('name')}): `shape` must be a list of sizes")
    return shape


def _flat(tensor: Mapping[str, Any], shape: Sequence[int]) -> list[Any]:
    data = tensor["data"]
    if isinstance(data, list) and len(data) > prod(shape):  # flat or nested, too many: before converting
        raise InvalidInputError(f"inputs ({tensor.get('name')}): {len(data)} values or more for shape {list(shape)}")
    try:
        flat = np.asarray(data, dtype=object).reshape(-1).tolist() if isinstance(data, list) else [data]
    except ValueError:  # ragged nesting
        raise InvalidInputError(f"inputs ({tensor.get('name')}): `data` is not a rectangular array") from None
    if len(flat) != prod(shape):
        raise InvalidInputError(f"inputs ({tensor.get('name')}): {len(flat)} values for shape {list(shape)}")
    return _typed(tensor, flat)


def _typed(tensor: Mapping[str, Any], flat: list[Any]) -> list[Any]:
    """`flat` checked against the tensor's datatype where JSON's numbers do not say it: integers
    within an INT or UINT type's range, booleans for BOOL (as 0 and 1, the model's numbers).
    Floating types and BYTES are checked value by value as features (`_value`)."""
    datatype = tensor.get("datatype")
    if datatype == "BOOL":
        if (bad := next((v for v in flat if type(v) is not bool), flat)) is not flat:  # 0 is one too
            raise InvalidInputError(f"inputs ({tensor.get('name')}): BOOL `data` holds {_brief.repr(bad)}, "
                                    "not true or false")
        return [int(v) for v in flat]
    if isinstance(datatype, str) and (span := _INTEGER_RANGES.get(datatype)) is not None:
        low, high = span
        for value in flat:
            if type(value) is not int or not low <= value <= high:  # bool is an int too: refused
                raise InvalidInputError(f"inputs ({tensor.get('name')}): {datatype} `data` holds "
                                        f"{_brief.repr(value)}, not an integer in {datatype}'s range")
    return flat


# -- to and from the predictor --------------------------------------------------------------------


def encode_v1(rows: np.ndarray) -> bytes:
    if rows.dtype == object:
        return orjson.dumps({"instances": rows.tolist()})
    return orjson.dumps({"instances": np.ascontiguousarray(rows, dtype=np.float64)}, option=_NUMPY)


def encode_v2(rows: np.ndarray, schema: Schema, output: str | None = None) -> bytes:
    """A V2 request for `rows` as JSON; `output` names the one output wanted (None: all)."""
    parts, _ = _v2(rows, schema, output, binary=False)
    return b"".join(parts)


def encode_v2_binary(rows: np.ndarray, schema: Schema,
                     output: str | None = None) -> tuple[bytes, dict[str, str]]:
    """The same as binary tensor data, asking for binary outputs, and its headers: no text to print
    or parse for the thousands of rows a perturbation batch has."""
    parts, headers = _v2(rows, schema, output, binary=True)
    return b"".join(parts), headers


def encode_v2_binary_parts(rows: np.ndarray, schema: Schema,
                           output: str | None = None) -> tuple[list[bytes | memoryview], dict[str, str]]:
    """`encode_v2_binary`'s body as its parts (`binary_tensors.encode_parts`): the rows' buffer is not
    copied into a joined body."""
    return _v2(rows, schema, output, binary=True)


def _v2(rows: np.ndarray, schema: Schema, output: str | None, *,
        binary: bool) -> tuple[list[bytes | memoryview], dict[str, str]]:
    n = len(rows)
    tensors: list[dict[str, Any]] = []
    raw: dict[str, Any] = {}

    def add(name: str, shape: list[int], values: np.ndarray, datatype: str) -> None:
        if datatype == "BYTES":
            data: Any = values.reshape(-1).tolist()
            if binary:
                raw[name] = binary_tensors.pack_values("BYTES", map(str, data))
        elif binary and datatype == "BF16":  # Triton takes BF16 as binary data only
            data = raw[name] = _bf16(values).reshape(-1)
        else:
            dtype = binary_tensors.NUMPY_DTYPES[datatype] if binary else np.float64
            data = np.ascontiguousarray(values, dtype=dtype).reshape(-1)
            if binary:
                raw[name] = data
        tensors.append({"name": name, "shape": shape, "datatype": datatype, "data": data})

    if schema.tensor is not None and rows.dtype != object:
        add(schema.tensor, [n, schema.width], rows, _numeric(schema.datatype, binary))
    elif schema.tensor is not None:
        add(schema.tensor, [n, schema.width], rows, "BYTES")
    else:
        for j, name in enumerate(schema.feature_names):
            datatype = schema.datatype_of(j)
            add(name, schema.shape_of(j, n), rows[:, j],
                datatype if datatype == "BYTES" else _numeric(datatype, binary))
    doc: dict[str, Any] = {"inputs": tensors}
    if output is not None:
        wanted: dict[str, Any] = {"name": output}
        if binary:
            wanted["parameters"] = {"binary_data": True}
        doc["outputs"] = [wanted]
    elif binary:
        doc["parameters"] = {"binary_data_output": True}
    return binary_tensors.encode_parts(doc, "inputs", raw, option=_NUMPY)


def _numeric(datatype: str, binary: bool) -> str:
    # JSON numbers fit any numeric datatype; binary data needs one with a fixed element size.
    return datatype if not binary or datatype in binary_tensors.ITEMSIZE else "FP64"


def decode_v1_output(body: Any, n: int) -> np.ndarray:
    predictions = body.get("predictions") if isinstance(body, Mapping) else None
    if not isinstance(predictions, list) or len(predictions) != n:
        raise PredictorError(f'the predictor answered no "predictions" list of {n} items')
    try:
        array = _finite(np.asarray(predictions, dtype=float), '"predictions"')
    except (TypeError, ValueError):
        pass
    else:  # [n, 1, k] and the like: one row of outputs per instance, as for V2
        return array.reshape(n, -1) if array.ndim > 2 else array
    # Labels (anchors take them) are scalars; objects, nulls or ragged lists would fail in the explainer.
    if not all(isinstance(p, str | int | float) for p in predictions):
        raise PredictorError(f'the predictor answered "predictions" that are neither numbers nor labels: '
                             f'{_short_json(predictions)}')
    return np.asarray(predictions, dtype=object)


def _short_json(value: Any, limit: int = 200) -> str:
    text = orjson.dumps(value, default=str).decode()
    return text if len(text) <= limit else text[:limit] + "…"


def pick_output(outputs: Sequence[Mapping[str, Any]], wanted: str | None) -> Mapping[str, Any]:
    """The named output; by default the first whose name has `proba` (explain probabilities), else the first."""
    if wanted is not None:
        for output in outputs:
            if output.get("name") == wanted:
                return output
        raise PredictorError(f"the predictor returned no output {wanted!r} "
                             f"(it returned {[o.get('name') for o in outputs]})")
    return next((o for o in outputs if "proba" in str(o.get("name", ""))), outputs[0])


def decode_v2_output(body: Any, n: int, wanted: str | None,
                     raw: Mapping[str, memoryview] | None = None) -> np.ndarray:
    """The wanted output of a V2 response, from its `data` or from its binary data in `raw`."""
    outputs = body.get("outputs") if isinstance(body, Mapping) else None
    if not isinstance(outputs, list) or not outputs or not all(isinstance(o, Mapping) for o in outputs):
        raise PredictorError('the predictor answered no "outputs" tensors')
    output = pick_output(outputs, wanted)
    name, shape = str(output.get("name")), output.get("shape")
    try:
        if raw and name in raw:
            datatype = output.get("datatype")
            if datatype not in binary_tensors.ITEMSIZE:
                raise ValueError(f"binary {datatype} data is not numbers")
            data = _numbers(datatype, raw[name]).astype(float)
        else:
            data = np.asarray(output.get("data"), dtype=float)
        array = data.reshape(shape) if isinstance(shape, list) else data
    except (TypeError, ValueError) as exc:
        raise PredictorError(f"output {name!r}: {exc}") from None
    if array.ndim == 0 or array.shape[0] != n:
        raise PredictorError(f"output {name!r} has shape {list(array.shape)}, expected [{n}, ...]")
    _finite(array, f"output {name!r}")
    return array.reshape(n, -1) if array.ndim > 2 else array


def _finite(array: np.ndarray, what: str) -> np.ndarray:
    """`array`, or PredictorError when it holds a NaN or infinity (JSON null reads as NaN): the
    explainer would answer null attributions."""
    if not np.isfinite(array).all():
        raise PredictorError(f"the predictor answered non-finite {what} (null, NaN or infinity): "
                             f"{np.count_nonzero(~np.isfinite(array))} of {array.size} values")
    return array


def v2_explanation_response(model: str, explanation: Mapping[str, Any], request_id: Any = None) -> dict[str, Any]:
    """A V2 inference response whose one output, `explanation`, is the explanation's JSON text."""
    response: dict[str, Any] = {"model_name": model, "outputs": [{
        "name": "explanation", "shape": [1], "datatype": "BYTES", "parameters": {"content_type": "str"},
        "data": [orjson.dumps(explanation).decode()],
    }]}
    if request_id is not None:
        response["id"] = request_id
    return response

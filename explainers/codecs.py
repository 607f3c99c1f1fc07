"""KServe V1 and V2 (Open Inference Protocol) payloads to and from 2-D arrays of instances.

Instances are `(n, features)` arrays in `Schema.feature_names` order: float64 when every feature is
numeric, object (str for categorical features) otherwise. Whatever does not fit raises
`InvalidInputError` naming the expected shape (`[n, 4]` and the feature names); an answer from
the predictor that does not fit raises `PredictorError`.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from math import prod
from typing import Any

import numpy as np
import orjson

from explainers.errors import InvalidInputError, PredictorError

_NUMPY = orjson.OPT_SERIALIZE_NUMPY


@dataclass(frozen=True)
class Schema:
    """The model's input: feature names (and which are strings), and how V2 carries them."""

    feature_names: tuple[str, ...]
    categorical: frozenset[str] = frozenset()
    tensor: str | None = "input-0"
    """V2: one `[n, width]` tensor of this name; None: one tensor per feature, named by it."""
    datatype: str = "FP64"

    @property
    def width(self) -> int:
        return len(self.feature_names)

    @property
    def numeric(self) -> bool:
        return not self.categorical

    def expected(self) -> str:
        names = ", ".join(self.feature_names)
        return f"expected shape [n, {self.width}] ({names})"


def explain_parameters(body: Mapping[str, Any]) -> dict[str, Any]:
    """Per-request parameters: V2 `parameters.explain_parameters`, V1 `parameters` (or `explain_parameters`)."""
    params = body.get("parameters")
    if "inputs" in body and isinstance(params, Mapping):
        params = params.get("explain_parameters")
    elif params is None:
        params = body.get("explain_parameters")
    if params is None:
        return {}
    if not isinstance(params, Mapping):
        raise InvalidInputError("explain parameters must be a JSON object")
    return dict(params)


def decode_instances(body: Any, schema: Schema) -> np.ndarray:
    """The instances of a V1 (`instances`, or TF-style row `inputs`) or V2 (`inputs` tensors) request."""
    if not isinstance(body, Mapping):
        raise InvalidInputError(f'expected a JSON object with "instances" or "inputs"; {schema.expected()}')
    if isinstance(body.get("instances"), list):
        return _rows(body["instances"], schema, "instances")
    inputs = body.get("inputs")
    if isinstance(inputs, list) and inputs and all(isinstance(t, Mapping) and "data" in t for t in inputs):
        return _tensors(inputs, schema)
    if isinstance(inputs, list):
        return _rows(inputs, schema, "inputs")
    raise InvalidInputError(f'expected "instances" (V1) or "inputs" (V2); {schema.expected()}')


def _rows(rows: list[Any], schema: Schema, key: str) -> np.ndarray:
    if not rows:
        raise InvalidInputError(f"{key} is empty; {schema.expected()}")
    if schema.numeric and all(isinstance(r, list) for r in rows):
        try:  # the common case: one conversion, checked afterwards
            array = np.asarray(rows, dtype=float)
            if array.ndim == 2 and array.shape[1] == schema.width and not _has_bool_or_str(rows):
                return array
        except (TypeError, ValueError):
            pass
    return np.array([_row(r, schema, f"{key}[{i}]") for i, r in enumerate(rows)],
                    dtype=float if schema.numeric else object).reshape(len(rows), schema.width)


def _has_bool_or_str(rows: list[list[Any]]) -> bool:
    return any(isinstance(v, bool | str) for row in rows for v in row)


def _row(row: Any, schema: Schema, where: str) -> list[Any]:
    if isinstance(row, Mapping):
        missing = [f for f in schema.feature_names if f not in row]
        unknown = [k for k in row if k not in schema.feature_names]
        if missing or unknown:
            raise InvalidInputError(f"{where}: missing {missing}, unknown {unknown}; {schema.expected()}")
        row = [row[f] for f in schema.feature_names]
    if not isinstance(row, list) or len(row) != schema.width:
        got = f"{len(row)} values" if isinstance(row, list) else type(row).__name__
        raise InvalidInputError(f"{where}: got {got}; {schema.expected()}")
    return [_value(v, name, schema, f"{where}[{j}]") for j, (v, name) in enumerate(zip(row, schema.feature_names))]


def _value(value: Any, name: str, schema: Schema, where: str) -> Any:
    if name in schema.categorical:
        if isinstance(value, str):
            return value
        raise InvalidInputError(f"{where} ({name}): expected a string, got {value!r}")
    if isinstance(value, int | float) and not isinstance(value, bool):
        return float(value)
    raise InvalidInputError(f"{where} ({name}): expected a number, got {value!r}; {schema.expected()}")


def _tensors(inputs: list[Mapping[str, Any]], schema: Schema) -> np.ndarray:
    if len(inputs) == 1 and schema.width > 1 or schema.width == 1:
        tensor = inputs[0]
        shape = _shape(tensor)
        if len(shape) == 1:  # one instance as a vector, or one feature as a column
            shape = [1, shape[0]] if schema.width > 1 else [shape[0], 1]
        if len(shape) != 2 or shape[1] != schema.width:
            raise InvalidInputError(f"inputs[0] ({tensor.get('name')}): shape {shape}; {schema.expected()}")
        flat = _flat(tensor, shape)
        rows = [flat[i * schema.width:(i + 1) * schema.width] for i in range(shape[0])]
        return _rows(rows, schema, f"inputs[0] ({tensor.get('name')})")
    by_name = {str(t.get("name")): t for t in inputs}
    missing = [f for f in schema.feature_names if f not in by_name]
    if missing:
        raise InvalidInputError(f"inputs: no tensor for {missing}; expected one [n] tensor per feature "
                                f"({', '.join(schema.feature_names)}) or one [n, {schema.width}] tensor")
    columns = []
    for name in schema.feature_names:
        shape = _shape(by_name[name])
        if not shape or prod(shape[1:]) != 1:
            raise InvalidInputError(f"inputs ({name}): shape {shape}; expected [n] or [n, 1]")
        columns.append(_flat(by_name[name], [shape[0]]))
    if len({len(c) for c in columns}) != 1:
        raise InvalidInputError("inputs: the feature tensors have different lengths")
    return _rows([list(r) for r in zip(*columns)], schema, "inputs")


def _shape(tensor: Mapping[str, Any]) -> list[int]:
    shape = tensor.get("shape")
    if not isinstance(shape, list) or not all(isinstance(d, int) and not isinstance(d, bool) and d >= 0
                                              for d in shape):
        raise InvalidInputError(f"inputs ({tensor.get('name')}): `shape` must be a list of sizes")
    return shape


def _flat(tensor: Mapping[str, Any], shape: Sequence[int]) -> list[Any]:
    data = tensor["data"]
    try:
        flat = np.asarray(data, dtype=object).reshape(-1).tolist() if isinstance(data, list) else [data]
    except ValueError:  # ragged nesting
        raise InvalidInputError(f"inputs ({tensor.get('name')}): `data` is not a rectangular array") from None
    if len(flat) != prod(shape):
        raise InvalidInputError(f"inputs ({tensor.get('name')}): {len(flat)} values for shape {list(shape)}")
    return flat


# -- to and from the predictor --------------------------------------------------------------------


def encode_v1(rows: np.ndarray) -> bytes:
    if rows.dtype == object:
        return orjson.dumps({"instances": rows.tolist()})
    return orjson.dumps({"instances": np.ascontiguousarray(rows, dtype=np.float64)}, option=_NUMPY)


def encode_v2(rows: np.ndarray, schema: Schema) -> bytes:
    n = len(rows)
    if schema.tensor is not None and rows.dtype != object:
        data = np.ascontiguousarray(rows, dtype=np.float64).reshape(-1)
        tensors: list[dict[str, Any]] = [{"name": schema.tensor, "shape": [n, schema.width],
                                          "datatype": schema.datatype, "data": data}]
    elif schema.tensor is not None:
        tensors = [{"name": schema.tensor, "shape": [n, schema.width], "datatype": "BYTES",
                    "data": rows.reshape(-1).tolist()}]
    else:
        tensors = []
        for j, name in enumerate(schema.feature_names):
            column = rows[:, j]
            if name in schema.categorical:
                tensors.append({"name": name, "shape": [n], "datatype": "BYTES", "data": column.tolist()})
            else:
                tensors.append({"name": name, "shape": [n], "datatype": "FP64",
                                "data": np.ascontiguousarray(column, dtype=np.float64)})
    return orjson.dumps({"inputs": tensors}, option=_NUMPY)


def decode_v1_output(body: Any, n: int) -> np.ndarray:
    predictions = body.get("predictions") if isinstance(body, Mapping) else None
    if not isinstance(predictions, list) or len(predictions) != n:
        raise PredictorError(f'the predictor answered no "predictions" list of {n} items')
    try:
        return np.asarray(predictions, dtype=float)
    except (TypeError, ValueError):
        return np.asarray(predictions, dtype=object)


def pick_output(outputs: Sequence[Mapping[str, Any]], wanted: str | None) -> Mapping[str, Any]:
    """The named output; by default the first whose name has `proba` (explain probabilities), else the first."""
    if wanted is not None:
        for output in outputs:
            if output.get("name") == wanted:
                return output
        raise PredictorError(f"the predictor returned no output {wanted!r} "
                             f"(it returned {[o.get('name') for o in outputs]})")
    return next((o for o in outputs if "proba" in str(o.get("name", ""))), outputs[0])


def decode_v2_output(body: Any, n: int, wanted: str | None) -> np.ndarray:
    outputs = body.get("outputs") if isinstance(body, Mapping) else None
    if not isinstance(outputs, list) or not outputs or not all(isinstance(o, Mapping) for o in outputs):
        raise PredictorError('the predictor answered no "outputs" tensors')
    output = pick_output(outputs, wanted)
    shape = output.get("shape")
    try:
        data = np.asarray(output.get("data"), dtype=float)
        array = data.reshape(shape) if isinstance(shape, list) else data
    except (TypeError, ValueError) as exc:
        raise PredictorError(f"output {output.get('name')!r}: {exc}") from None
    if array.ndim == 0 or array.shape[0] != n:
        raise PredictorError(f"output {output.get('name')!r} has shape {list(array.shape)}, expected [{n}, ...]")
    return array.reshape(n, -1) if array.ndim > 2 else array


def v2_explanation_response(model: str, explanation: Mapping[str, Any], request_id: Any = None) -> dict[str, Any]:
    """A V2 inference response whose one output, `explanation`, is the explanation's JSON text."""
    response: dict[str, Any] = {"model_name": model, "outputs": [{
        "name": "explanation", "shape": [1], "datatype": "BYTES", "parameters": {"content_type": "str"},
        "data": [orjson.dumps(explanation).decode()],
    }]}
    if request_id is not None:
        response["id"] = request_id
    return response

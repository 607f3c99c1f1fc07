"""A small model server speaking KServe V1 and V2 (Open Inference Protocol), for demos and tests.

    python -m infer_logger.demo.predictor --port 8080 --model iris    # a scikit-learn model
    python -m infer_logger.demo.predictor --port 8080 --model echo    # trivial, no scikit-learn

It is the predictor the sidecar is measured and tested against, not a product. V2 takes the binary
tensor data extension too (what tritonclient sends by default, and what the explainer's perturbation
batches travel as): inputs are read with `np.frombuffer`, outputs sent as binary when asked.
"""

from __future__ import annotations

import argparse
from collections.abc import Sequence
from typing import Any, Protocol

import numpy as np
import orjson
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, Response

from infer_logger import binary_tensors
from infer_logger.errors import BinaryDataError

_NUMPY = orjson.OPT_SERIALIZE_NUMPY  # output arrays, and echo predictions of binary rows (numpy scalars)
Rows = Sequence[Sequence[Any]] | np.ndarray
"""Instances: lists from JSON, or an `(n, width)` array from binary tensor data."""
Outputs = Sequence[Any] | np.ndarray
"""A model's answer for each row: numbers stay an array until written (no list of thousands of floats
to build and convert back for binary data)."""
_DATATYPES = {"b": "BOOL", "i": "INT64", "u": "UINT64", "f": "FP64"}


class Model(Protocol):
    name: str
    feature_names: list[str]

    def predict(self, rows: Rows) -> Outputs: ...

    def predict_proba(self, rows: Rows) -> Outputs | None: ...


class EchoModel:
    """Predicts the first feature back: costs nothing, so the proxy's cost shows."""

    name = "echo"
    feature_names = ["x0", "x1", "x2", "x3"]

    def predict(self, rows: Rows) -> Outputs:
        return [row[0] if len(row) else None for row in rows]

    def predict_proba(self, rows: Rows) -> Outputs | None:
        return None


class SklearnModel:
    def __init__(self, name: str, estimator: Any, feature_names: list[str]) -> None:
        self.name = name
        self.estimator = estimator
        self.feature_names = feature_names

    def predict(self, rows: Rows) -> Outputs:
        return np.asarray(self.estimator.predict(rows))

    def predict_proba(self, rows: Rows) -> Outputs | None:
        if not hasattr(self.estimator, "predict_proba"):
            return None
        return np.asarray(self.estimator.predict_proba(rows)).round(6)


def train_iris(name: str = "iris") -> SklearnModel:
    """A random forest on scikit-learn's bundled iris data (no download)."""
    from sklearn.datasets import load_iris
    from sklearn.ensemble import RandomForestClassifier

    data = load_iris()
    model = RandomForestClassifier(n_estimators=20, max_depth=4, random_state=0, n_jobs=1)
    model.fit(data.data, data.target)
    return SklearnModel(name, model, [str(n) for n in data.feature_names])


class BadInput(ValueError):
    pass


def _rows_v1(body: Any, width: int) -> list[list[float]]:
    if not isinstance(body, dict) or not isinstance(body.get("instances"), list):
        raise BadInput('expected {"instances": [[...], ...]}')
    rows = body["instances"]
    for i, row in enumerate(rows):
        if not isinstance(row, list) or len(row) != width:
            raise BadInput(f"instances[{i}]: expected a list of {width} numbers")
    return rows


def _rows_v2(body: dict[str, Any], raw: dict[str, memoryview], width: int) -> Rows:
    inputs = body.get("inputs")
    if not isinstance(inputs, list) or len(inputs) != 1 or not isinstance(inputs[0], dict):
        raise BadInput("expected one input tensor in `inputs`")
    tensor = inputs[0]
    shape, data, datatype = tensor.get("shape"), tensor.get("data"), tensor.get("datatype")
    binary = raw.get(str(tensor.get("name")))
    expected = f"inputs[0]: expected shape [n, {width}] with `data` or binary data"
    if not isinstance(shape, list) or len(shape) != 2 or shape[1] != width:
        raise BadInput(expected)
    flat: list[Any]
    if binary is not None and datatype == "BF16":  # numpy has no bfloat16
        return np.array(binary_tensors.unpack_values("BF16", binary), np.float32).reshape(shape)
    if binary is not None and datatype != "BYTES":  # sizes already checked against the shape
        return np.frombuffer(binary, binary_tensors.NUMPY_DTYPES[str(datatype)]).reshape(shape)
    if binary is not None:
        try:
            flat = [v.decode() for v in binary_tensors.unpack_values("BYTES", binary)]
        except UnicodeDecodeError:
            raise BadInput("inputs[0]: BYTES elements must be UTF-8 text") from None
    elif datatype == "FP16":
        raise BadInput("inputs[0]: FP16 has no JSON form; send it as binary data")
    elif not isinstance(data, list):
        raise BadInput(expected)
    else:
        flat = [x for row in data for x in row] if data and isinstance(data[0], list) else data
        if len(flat) != shape[0] * width:
            raise BadInput(f"inputs[0]: data has {len(flat)} values, shape says {shape[0] * width}")
    return [flat[i * width : (i + 1) * width] for i in range(shape[0])]


def _writable(values: Outputs) -> Outputs:
    """Numbers as they are (orjson writes arrays of them); anything else as a list."""
    if isinstance(values, np.ndarray) and values.dtype.kind not in _DATATYPES:
        return values.tolist()
    return values


def _json_output(name: str, values: Outputs, n: int) -> dict[str, Any]:
    if isinstance(values, np.ndarray) and values.dtype.kind in _DATATYPES:
        return {"name": name, "datatype": _DATATYPES[values.dtype.kind], "shape": list(values.shape),
                "data": np.ascontiguousarray(values).reshape(-1)}
    values = _writable(values)
    if name == "predict_proba":
        return {"name": name, "datatype": "FP64", "shape": [n, len(values[0]) if len(values) else 0],
                "data": [p for row in values for p in row]}
    return {"name": name, "datatype": "INT64" if all(isinstance(p, int) for p in values) else "FP64",
            "shape": [n], "data": values}


def _binary_output(name: str, values: Outputs) -> tuple[dict[str, Any], Any]:
    array = np.asarray(values)
    kind = array.dtype.kind
    if kind in _DATATYPES:
        datatype = _DATATYPES[kind]
        raw: Any = np.ascontiguousarray(array, binary_tensors.NUMPY_DTYPES[datatype])
    else:
        datatype, raw = "BYTES", binary_tensors.pack_values("BYTES", map(str, array.reshape(-1).tolist()))
    return {"name": name, "datatype": datatype, "shape": list(array.shape)}, raw


def _requested(body: dict[str, Any]) -> list[str] | None:
    """The outputs the request names (None: it names none, so all)."""
    asked = body.get("outputs")
    if not asked:
        return None
    if not isinstance(asked, list) or not all(isinstance(o, dict) and isinstance(o.get("name"), str)
                                              for o in asked):
        raise BadInput("`outputs` must be a list of {\"name\": ...} objects")
    return [o["name"] for o in asked]


def _predict(model: Model, rows: Rows, names: list[str] | None) -> dict[str, Any]:
    """Only the outputs asked for: the explainer asks for one, and each is a pass over the rows."""
    results: dict[str, Any] = {}
    if names is None or "predict" in names:
        results["predict"] = model.predict(rows)
    if (names is None or "predict_proba" in names) and (proba := model.predict_proba(rows)) is not None:
        results["predict_proba"] = proba
    unknown = [n for n in names or [] if n not in results]
    if unknown:
        raise BadInput(f"no output {unknown[0]!r} (there are predict, and predict_proba for classifiers)")
    return {n: results[n] for n in names} if names else results


def create_app(models: Sequence[Model]) -> FastAPI:
    registry = {m.name: m for m in models}
    app = FastAPI(title="infer-logger demo predictor")

    def error(status: int, message: str) -> JSONResponse:
        return JSONResponse({"error": message}, status_code=status)

    async def body_of(request: Request) -> Any:
        # orjson: explainers send thousands of perturbed rows per call; stdlib json dominated.
        try:
            return orjson.loads(await request.body())
        except orjson.JSONDecodeError:
            raise BadInput("the body is not JSON") from None

    @app.get("/")
    async def root() -> dict[str, str]:
        return {"status": "alive"}

    @app.get("/v1/models")
    async def v1_models() -> dict[str, list[str]]:
        return {"models": list(registry)}

    @app.get("/v1/models/{name}")
    async def v1_model(name: str) -> Any:
        if name not in registry:
            return error(404, f"Model with name {name} does not exist.")
        return {"name": name, "ready": True}

    @app.post("/v1/models/{name}:predict")
    async def v1_predict(name: str, request: Request) -> Any:
        model = registry.get(name)
        if model is None:
            return error(404, f"Model with name {name} does not exist.")
        try:
            rows = _rows_v1(await body_of(request), len(model.feature_names))
        except BadInput as exc:
            return error(400, str(exc))
        return Response(orjson.dumps({"predictions": _writable(model.predict(rows))}, option=_NUMPY),
                        media_type="application/json")

    @app.get("/v2")
    async def v2_server() -> dict[str, Any]:
        return {"name": "infer-logger-demo", "version": "0", "extensions": ["binary_tensor_data"]}

    @app.get("/v2/health/live")
    async def live() -> dict[str, bool]:
        return {"live": True}

    @app.get("/v2/health/ready")
    async def ready() -> dict[str, bool]:
        return {"ready": True}

    @app.get("/v2/models/{name}")
    async def v2_metadata(name: str) -> Any:
        model = registry.get(name)
        if model is None:
            return error(404, f"Model with name {name} does not exist.")
        width = len(model.feature_names)
        return {
            "name": name,
            "platform": "python",
            "inputs": [{"name": "input-0", "datatype": "FP64", "shape": [-1, width]}],
            "outputs": [{"name": "predict", "datatype": "INT64", "shape": [-1]}],
            "parameters": {"feature_names": model.feature_names},
        }

    @app.get("/v2/models/{name}/ready")
    async def v2_ready(name: str) -> Any:
        if name not in registry:
            return error(404, f"Model with name {name} does not exist.")
        return {"name": name, "ready": True}

    async def v2_infer(request: Request) -> Response:
        name, version = request.path_params["name"], request.path_params.get("version")
        model = registry.get(name)
        if model is None:
            return error(404, f"Model with name {name} does not exist.")
        try:
            # JSON bodies too (no header): with or without a Content-Type, as tritonclient sends them.
            header = request.headers.get(binary_tensors.HEADER)
            body, raw = binary_tensors.decode(await request.body(), header, "inputs")
            rows = _rows_v2(body, raw, len(model.feature_names))
            results = _predict(model, rows, _requested(body))
        except (BadInput, BinaryDataError) as exc:
            return error(400, str(exc))
        except (TypeError, ValueError) as exc:  # the model's own refusal (e.g. text for a numeric feature)
            return error(400, f"the model refused the input: {exc}")
        outputs, binary = [], {}
        for output in results:
            if binary_tensors.wants_binary(body, output):
                tensor, binary[output] = _binary_output(output, results[output])
                outputs.append(tensor)
            else:
                outputs.append(_json_output(output, results[output], len(rows)))
        response: dict[str, Any] = {"model_name": name, "outputs": outputs}
        if version:
            response["model_version"] = version
        if "id" in body:
            response["id"] = body["id"]
        content, headers = binary_tensors.encode(response, "outputs", binary, option=_NUMPY)
        return Response(content, headers=headers)

    # Plain routes: explainers call this one twice per explanation, and FastAPI's parameter resolution
    # per request cost more here than reading the body did.
    app.add_route("/v2/models/{name}/infer", v2_infer, methods=["POST"])
    app.add_route("/v2/models/{name}/versions/{version}/infer", v2_infer, methods=["POST"])
    return app


def main(argv: Sequence[str] | None = None) -> None:
    import uvicorn

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=8080)
    parser.add_argument("--model", choices=["iris", "echo"], default="iris")
    args = parser.parse_args(argv)
    model: Model = train_iris() if args.model == "iris" else EchoModel()
    uvicorn.run(create_app([model]), host=args.host, port=args.port, log_level="warning", access_log=False)


if __name__ == "__main__":
    main()

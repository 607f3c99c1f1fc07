"""A small model server speaking KServe V1 and V2 (Open Inference Protocol), for demos and tests.

    python -m infer_logger.demo.predictor --port 8080 --model iris    # a scikit-learn model
    python -m infer_logger.demo.predictor --port 8080 --model echo    # trivial, no scikit-learn

It is the predictor the sidecar is measured and tested against, not a product.
"""

from __future__ import annotations

import argparse
from collections.abc import Sequence
from typing import Any, Protocol

import orjson
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, Response


class Model(Protocol):
    name: str
    feature_names: list[str]

    def predict(self, rows: Sequence[Sequence[float]]) -> list[Any]: ...

    def predict_proba(self, rows: Sequence[Sequence[float]]) -> list[list[float]] | None: ...


class EchoModel:
    """Predicts the first feature back: costs nothing, so the proxy's cost shows."""

    name = "echo"
    feature_names = ["x0", "x1", "x2", "x3"]

    def predict(self, rows: Sequence[Sequence[float]]) -> list[Any]:
        return [row[0] if row else None for row in rows]

    def predict_proba(self, rows: Sequence[Sequence[float]]) -> list[list[float]] | None:
        return None


class SklearnModel:
    def __init__(self, name: str, estimator: Any, feature_names: list[str]) -> None:
        self.name = name
        self.estimator = estimator
        self.feature_names = feature_names

    def predict(self, rows: Sequence[Sequence[float]]) -> list[Any]:
        return self.estimator.predict(rows).tolist()

    def predict_proba(self, rows: Sequence[Sequence[float]]) -> list[list[float]] | None:
        if not hasattr(self.estimator, "predict_proba"):
            return None
        return self.estimator.predict_proba(rows).round(6).tolist()


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


def _rows_v2(body: Any, width: int) -> list[list[float]]:
    inputs = body.get("inputs") if isinstance(body, dict) else None
    if not isinstance(inputs, list) or len(inputs) != 1 or not isinstance(inputs[0], dict):
        raise BadInput("expected one input tensor in `inputs`")
    tensor = inputs[0]
    shape, data = tensor.get("shape"), tensor.get("data")
    if not isinstance(shape, list) or len(shape) != 2 or shape[1] != width or not isinstance(data, list):
        raise BadInput(f"inputs[0]: expected shape [n, {width}] with `data`")
    flat = [x for row in data for x in row] if data and isinstance(data[0], list) else data
    if len(flat) != shape[0] * width:
        raise BadInput(f"inputs[0]: data has {len(flat)} values, shape says {shape[0] * width}")
    return [flat[i * width : (i + 1) * width] for i in range(shape[0])]


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
        return Response(orjson.dumps({"predictions": model.predict(rows)}), media_type="application/json")

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

    @app.post("/v2/models/{name}/infer")
    @app.post("/v2/models/{name}/versions/{version}/infer")
    async def v2_infer(name: str, request: Request, version: str | None = None) -> Any:
        model = registry.get(name)
        if model is None:
            return error(404, f"Model with name {name} does not exist.")
        try:
            body = await body_of(request)
            rows = _rows_v2(body, len(model.feature_names))
        except BadInput as exc:
            return error(400, str(exc))
        predictions = model.predict(rows)
        outputs: list[dict[str, Any]] = [
            {"name": "predict", "datatype": "INT64" if all(isinstance(p, int) for p in predictions) else "FP64",
             "shape": [len(rows)], "data": predictions}
        ]
        if (proba := model.predict_proba(rows)) is not None:
            outputs.append({"name": "predict_proba", "datatype": "FP64",
                            "shape": [len(rows), len(proba[0]) if proba else 0],
                            "data": [p for row in proba for p in row]})
        response: dict[str, Any] = {"model_name": name, "outputs": outputs}
        if version:
            response["model_version"] = version
        if "id" in body:
            response["id"] = body["id"]
        return Response(orjson.dumps(response), media_type="application/json")

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

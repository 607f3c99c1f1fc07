"""Models trained on bundled data (deterministically: the tests train the same ones in process), and a
predictor process serving them over KServe V1 and V2 with the demo predictor's app.

    python -m tests.explainers.models --port 8080
"""

from __future__ import annotations

import argparse
from collections.abc import Sequence
from functools import cache
from typing import Any

import numpy as np

from explainers.data import DATASETS, Table

NAMES = ("iris", "iris-proba", "cancer", "diabetes", "penguins")


@cache
def table(name: str) -> Table:
    return DATASETS[name]()


@cache
def estimator(name: str) -> Any:
    """The fitted model behind each served name (same seeds here and in the predictor process)."""
    from sklearn.ensemble import RandomForestClassifier, RandomForestRegressor

    if name in ("iris", "iris-proba"):
        t = table("iris")
        return RandomForestClassifier(n_estimators=20, max_depth=4, random_state=0, n_jobs=1).fit(t.rows, t.target)
    if name == "cancer":
        t = table("breast_cancer")
        return RandomForestClassifier(n_estimators=30, max_depth=5, random_state=0, n_jobs=1).fit(t.rows, t.target)
    if name == "diabetes":
        t = table("diabetes")
        return RandomForestRegressor(n_estimators=20, max_depth=4, random_state=0, n_jobs=1).fit(t.rows, t.target)
    if name == "penguins":
        from sklearn.compose import make_column_transformer
        from sklearn.pipeline import make_pipeline
        from sklearn.preprocessing import OneHotEncoder

        t = table("penguins")
        encode = make_column_transformer((OneHotEncoder(handle_unknown="ignore"), list(t.categorical)),
                                         remainder="passthrough")
        model = make_pipeline(encode, RandomForestClassifier(n_estimators=20, max_depth=5, random_state=0, n_jobs=1))
        return model.fit(frame(t.rows, t), t.target)
    raise KeyError(name)


def frame(rows: Any, t: Table) -> Any:
    import pandas as pd

    out = pd.DataFrame(np.asarray(rows, dtype=object), columns=t.feature_names)
    for column in t.feature_names:
        if column not in t.categorical:
            out[column] = out[column].astype(float)
    return out


class Served:
    """A demo-predictor model; `proba=True` makes V1 `predictions` the class probabilities."""

    def __init__(self, name: str, data: str, *, proba: bool) -> None:
        self.name, self.proba = name, proba
        self.table = table(data)
        self.feature_names = self.table.feature_names
        self.estimator = estimator(name)

    def _rows(self, rows: Sequence[Sequence[Any]]) -> Any:
        return frame(rows, self.table) if self.table.categorical else np.asarray(rows, dtype=float)

    def predict(self, rows: Sequence[Sequence[Any]]) -> list[Any]:
        if self.proba:
            return self.estimator.predict_proba(self._rows(rows)).tolist()
        return self.estimator.predict(self._rows(rows)).tolist()

    def predict_proba(self, rows: Sequence[Sequence[Any]]) -> list[list[float]] | None:
        if not hasattr(self.estimator, "predict_proba"):
            return None
        return self.estimator.predict_proba(self._rows(rows)).tolist()


def served() -> list[Served]:
    return [Served("iris", "iris", proba=False), Served("iris-proba", "iris", proba=True),
            Served("cancer", "breast_cancer", proba=True), Served("diabetes", "diabetes", proba=False),
            Served("penguins", "penguins", proba=True)]


def main(argv: Sequence[str] | None = None) -> None:
    import uvicorn

    from infer_logger.demo.predictor import create_app
    from infer_logger.server import uvicorn_config

    parser = argparse.ArgumentParser()
    parser.add_argument("--port", type=int, required=True)
    args = parser.parse_args(argv)
    uvicorn.Server(uvicorn_config(create_app(served()), "127.0.0.1", args.port)).run()


if __name__ == "__main__":
    main()

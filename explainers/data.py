"""Tables for explainers: background data from files or bundled data sets, and local model files.

A table becomes `(rows, feature_names, categorical)`: rows a 2-D array, float64 when every column
is numeric, else object with the strings kept (those columns are the categorical features).

Bundled data sets need no download: scikit-learn's `iris`, `breast_cancer`, `wine`, `diabetes`,
and `penguins` (the `palmerpenguins` package: a real table with categorical columns).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from explainers.base import Model, match_columns, named_twice
from explainers.errors import ArtifactError, MissingExtraError, UnsupportedModelError


@dataclass(frozen=True)
class Table:
    rows: np.ndarray
    feature_names: list[str]
    categorical: tuple[str, ...] = ()
    target: np.ndarray | None = None
    target_names: list[str] | None = None
    unnamed: bool = False
    """Its columns have no names of their own (an array's): `feature_names` are x0, x1, ..."""


def from_frame(frame: Any) -> Table:
    """A pandas DataFrame as a table: non-numeric columns are categorical (kept as str)."""
    import pandas as pd

    names = [str(c) for c in frame.columns]
    numeric = [pd.api.types.is_numeric_dtype(frame[c]) and not pd.api.types.is_bool_dtype(frame[c])
               for c in frame.columns]
    if all(numeric):
        return Table(frame.to_numpy(dtype=float), names)
    rows = np.empty(frame.shape, dtype=object)
    for j, (column, is_number) in enumerate(zip(frame.columns, numeric)):
        values = frame[column].to_numpy()
        rows[:, j] = values.astype(float) if is_number else [str(v) for v in values]
    return Table(rows, names, tuple(n for n, is_number in zip(names, numeric) if not is_number))


def _sklearn(name: str) -> Callable[[], Table]:
    def load() -> Table:
        from sklearn import datasets

        bunch = getattr(datasets, f"load_{name}")()
        targets = [str(t) for t in bunch.target_names] if hasattr(bunch, "target_names") else None
        return Table(np.asarray(bunch.data, dtype=float), [str(f) for f in bunch.feature_names],
                     target=np.asarray(bunch.target), target_names=targets)

    return load


def _penguins() -> Table:
    try:
        import palmerpenguins
    except ImportError as exc:
        raise MissingExtraError("explain", exc.name or "palmerpenguins") from None
    frame = palmerpenguins.load_penguins().dropna().reset_index(drop=True)
    species = frame.pop("species").astype(str)
    frame = frame.drop(columns=["year"])
    table = from_frame(frame)
    names = sorted(set(species))
    return Table(table.rows, table.feature_names, table.categorical,
                 np.asarray([names.index(s) for s in species]), names)


DATASETS: dict[str, Callable[[], Table]] = {
    "iris": _sklearn("iris"),
    "breast_cancer": _sklearn("breast_cancer"),
    "wine": _sklearn("wine"),
    "diabetes": _sklearn("diabetes"),
    "penguins": _penguins,
}


def load_table(spec: str) -> Table:
    """`dataset:<name>` (see DATASETS), or a .csv, .parquet, .npy, .joblib/.pkl file of a table."""
    if spec.startswith("dataset:"):
        name = spec.split(":", 1)[1]
        if name not in DATASETS:
            raise ArtifactError(spec, f"no bundled data set {name!r} (known: {', '.join(DATASETS)})")
        return DATASETS[name]()
    path = Path(spec)
    try:
        if path.suffix == ".npy":
            loaded: Any = np.load(path, allow_pickle=False)
        elif path.suffix == ".csv":
            import pandas as pd

            loaded = pd.read_csv(path)
        elif path.suffix == ".parquet":
            import pandas as pd

            try:
                loaded = pd.read_parquet(path)
            except ImportError:  # pandas' own is many lines, and no extra installs an engine
                raise _no_parquet_engine(path) from None
        else:
            import joblib

            loaded = joblib.load(path)
    except MissingExtraError:
        raise
    except Exception as exc:
        raise ArtifactError(path, f"cannot read background data: {type(exc).__name__}: {exc}") from exc
    if isinstance(loaded, np.ndarray) and loaded.ndim == 2:
        if loaded.dtype.kind not in "biuf":
            raise ArtifactError(path, f"expected numbers, got an array of {loaded.dtype} (for string features "
                                      "give a .csv or .parquet table)")
        return _checked(path, Table(loaded.astype(float), [f"x{i}" for i in range(loaded.shape[1])], unnamed=True))
    if hasattr(loaded, "columns"):
        if twice := named_twice([str(c) for c in loaded.columns]):  # pandas hands a frame for such a name
            raise ArtifactError(path, f"the column(s) {twice} are named more than once")
        return _checked(path, from_frame(loaded))
    raise ArtifactError(path, f"expected a 2-D table, got {type(loaded).__name__}")


def _no_parquet_engine(path: Path) -> MissingExtraError:
    """pyarrow is large and no extra brings it (a .csv serves as well): said in one line."""
    error = MissingExtraError("explain", "pyarrow")
    # Its own message, not the extra's (which would not install it); an ImportError's is its `msg`.
    ImportError.__init__(error, f"{path}: reading .parquet needs pyarrow: pip install pyarrow (or give a .csv)",
                         name="pyarrow")
    return error


def _checked(path: Path, table: Table) -> Table:
    """A table to fit on: rows, and no missing numbers (requests with NaN are refused, and most
    models fail on them, at warm-up or at the first request)."""
    if not len(table.rows):
        raise ArtifactError(path, "the background data has no rows")
    for j, name in enumerate(table.feature_names):
        if name not in table.categorical:
            missing = np.flatnonzero(~np.isfinite(table.rows[:, j].astype(float)))
            if len(missing):
                raise ArtifactError(path, f"column {name!r} has {len(missing)} missing or infinite value(s) "
                                          f"(first in row {missing[0]}): drop or fill them")
    return table


def load_model_file(path: str | Path) -> Any:
    """A fitted model saved with joblib or pickle (scikit-learn API: sklearn, XGBoost, LightGBM)."""
    try:
        import joblib

        loaded = joblib.load(path)
    except Exception as exc:
        raise ArtifactError(path, f"cannot load the model: {type(exc).__name__}: {exc}") from exc
    if not callable(getattr(loaded, "predict", None)):
        raise ArtifactError(path, f"not a model: a {type(loaded).__name__}, with no predict method")
    return loaded


def local_model(estimator: Any, feature_names: list[str], categorical: tuple[str, ...] = ()) -> Model:
    """A white-box `Model` of a scikit-learn-API estimator: probabilities for classifiers.

    Rows come in `feature_names` order (the schema's); an estimator fitted on a DataFrame is given
    one in its own column order, matched by name (the background's order may differ from it)."""
    names = [str(n) for n in feature_names]
    own = [str(n) for n in getattr(estimator, "feature_names_in_", names)]
    columns = match_columns(own, names)
    width = getattr(estimator, "n_features_in_", len(names))
    if isinstance(width, int) and width != len(names):
        raise UnsupportedModelError(f"the model was fitted on {width} features, the data has {len(names)}: {names}")
    wants_frame = hasattr(estimator, "feature_names_in_") or bool(categorical)
    classify = hasattr(estimator, "predict_proba")
    method = estimator.predict_proba if classify else estimator.predict

    def predict(rows: np.ndarray) -> np.ndarray:
        if wants_frame:  # fitted on a DataFrame (e.g. a Pipeline with encoders): give it one
            import pandas as pd

            frame = pd.DataFrame(np.asarray(rows)[:, columns], columns=own)
            for column, at in zip(own, columns):
                if names[at] not in categorical:
                    frame[column] = frame[column].astype(float)
            return np.asarray(method(frame))
        return np.asarray(method(rows))

    labels = [str(c) for c in getattr(estimator, "classes_", [])] if classify else ["prediction"]
    return Model(predict, names, labels or None, estimator, tuple(categorical),
                 "classification" if classify else "regression")

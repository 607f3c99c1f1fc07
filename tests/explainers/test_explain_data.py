"""Tables and local models: a model fitted on a DataFrame gets its own column order, whatever the
background's; files that cannot serve as background data or a model are refused naming the file."""

from __future__ import annotations

import importlib.util
import subprocess
import sys
from pathlib import Path

import joblib
import numpy as np
import pandas as pd
import pytest
from sklearn.linear_model import LinearRegression

from explainers import registry
from explainers.data import load_model_file, load_table, local_model
from explainers.errors import ArtifactError, MissingExtraError, UnsupportedModelError


def abc_model() -> LinearRegression:
    """y = 10a + b, fitted on a DataFrame with columns a, b, c."""
    x = pd.DataFrame(np.random.default_rng(0).normal(size=(100, 3)), columns=["a", "b", "c"])
    return LinearRegression().fit(x, 10 * x["a"] + x["b"])


class TestColumnOrder:
    """Rows come in the schema's order; the estimator is given its own, matched by name."""

    def test_predictions_and_attributions_by_name(self) -> None:
        model = local_model(abc_model(), ["c", "b", "a"])
        assert model.feature_names == ["c", "b", "a"]
        # a=1, b=2, c=3 in the schema's order c, b, a: 10a + b = 12
        np.testing.assert_allclose(model.predict(np.array([[3.0, 2.0, 1.0]])), [12.0])
        background = np.random.default_rng(1).normal(size=(30, 3))
        explainer = registry.create("kernel", {"background_size": 30}, {"nsamples": 50})
        explainer.fit(model, background)
        [output] = explainer.explain(np.array([[3.0, 2.0, 1.0]])).instances[0].outputs
        assert output.value == pytest.approx(12.0)
        assert abs(output.attributions["c"]) < 1e-6  # c has no weight in the model
        assert output.attributions["a"] == pytest.approx(10 * (1 - background[:, 2].mean()), abs=1e-6)

    def test_names_the_estimator_rewrote_are_matched(self) -> None:
        """LightGBM names `sepal length (cm)` `sepal_length_(cm)`: refused as other features, a model
        started on its own training data failed."""
        x = pd.DataFrame(np.random.default_rng(0).normal(size=(50, 2)), columns=["a_b_(cm)", "c"])
        fitted = LinearRegression().fit(x, 10 * x["a_b_(cm)"] + x["c"])
        model = local_model(fitted, ["c", "a b (cm)"])
        np.testing.assert_allclose(model.predict(np.array([[2.0, 1.0]])), [12.0])
        assert model.estimator_columns() == [1, 0]

    def test_other_features_are_refused_naming_both(self) -> None:
        with pytest.raises(UnsupportedModelError, match=r"fitted on features \['a', 'b', 'c'\].*\['a', 'b', 'd'\]"):
            local_model(abc_model(), ["a", "b", "d"])

    def test_a_model_of_another_width_is_refused(self) -> None:
        fitted = LinearRegression().fit(np.ones((5, 4)), np.arange(5.0))
        with pytest.raises(UnsupportedModelError, match="fitted on 4 features, the data has 3"):
            local_model(fitted, ["a", "b", "c"])


class TestFiles:
    """Background data and model files that would fail at warm-up (or on every request) are
    refused when read, naming the file."""

    @pytest.mark.parametrize("name, content, words", [
        ("strings.npy", np.array([["a", "b"], ["c", "d"]]), "expected numbers"),
        ("empty.csv", "a,b\n", "has no rows"),
        ("nan.csv", "a,b\n1,2\n3,\n", "column 'b' has 1 missing or infinite value(s) (first in row 1)"),
    ])
    def test_background_refused(self, tmp_path: Path, name: str, content: object, words: str) -> None:
        path = tmp_path / name
        if isinstance(content, str):
            path.write_text(content)
        else:
            np.save(path, content)
        with pytest.raises(ArtifactError) as caught:
            load_table(str(path))
        assert str(path) in str(caught.value) and words in str(caught.value)

    def test_a_column_named_twice(self, tmp_path: Path) -> None:
        """pandas hands a frame for a name given twice: a narwhals traceback at start."""
        path = tmp_path / "twice.joblib"
        joblib.dump(pd.DataFrame([[1.0, 2.0, 3.0]], columns=["a", "b", "a"]), path)
        with pytest.raises(ArtifactError, match=r"twice.joblib: the column\(s\) 'a' are named more than once"):
            load_table(str(path))

    def test_a_model_file_without_predict(self, tmp_path: Path) -> None:
        path = tmp_path / "dict.joblib"
        joblib.dump({"not": "a model"}, path)
        with pytest.raises(ArtifactError, match="dict.joblib: not a model: a dict, with no predict method"):
            load_model_file(path)

    def test_parquet_without_an_engine_says_what_to_install(self, tmp_path: Path,
                                                            monkeypatch: pytest.MonkeyPatch) -> None:
        """No extra installs pyarrow: pandas' "Unable to find a usable engine; tried using: 'pyarrow',
        'fastparquet'..." was reported as data that could not be read."""
        path = tmp_path / "bg.parquet"
        path.write_bytes(b"PAR1")
        monkeypatch.setitem(sys.modules, "pyarrow", None)  # neither engine importable
        monkeypatch.setitem(sys.modules, "fastparquet", None)
        with pytest.raises(MissingExtraError) as caught:
            load_table(str(path))
        assert str(caught.value) == f"{path}: reading .parquet needs pyarrow: pip install pyarrow (or give a .csv)"

    @pytest.mark.skipif(any(importlib.util.find_spec(m) for m in ("pyarrow", "fastparquet")),
                        reason="a parquet engine is installed")
    def test_parquet_without_an_engine_stops_the_command_in_one_line(self, tmp_path: Path) -> None:
        path = tmp_path / "bg.parquet"
        path.write_bytes(b"PAR1")
        cli = subprocess.run([sys.executable, "-m", "explainers", "--predictor-url", "http://127.0.0.1:1",
                              "--background", str(path)], check=False, capture_output=True, text=True, timeout=60)
        assert cli.returncode == 1 and "Traceback" not in cli.stderr, cli.stderr
        assert cli.stderr.splitlines()[-1] == (f"infer-logger explainer: {path}: reading .parquet needs pyarrow: "
                                               "pip install pyarrow (or give a .csv)")

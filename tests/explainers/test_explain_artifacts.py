"""Artifacts round-trip without the model; what does not load names the path and the cause."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import joblib
import numpy as np
import pytest

from explainers import registry
from explainers.artifacts import load_artifact, restore_explainer, save_artifact
from explainers.data import load_model_file, load_table, local_model
from explainers.errors import ArtifactError
from tests.explainers.models import estimator, table


class TestRoundTrip:
    """What fitting learned comes back; the model is attached at load."""

    @pytest.mark.parametrize("method", ["kernel", "permutation", "tree"])
    def test_same_explanations(self, method: str, tmp_path: Path) -> None:
        t = table("iris")
        model = local_model(estimator("iris"), t.feature_names)
        explainer = registry.create(method, {"background_size": 15}, {"nsamples": 20} if method == "kernel" else {})
        explainer.fit(model, t.rows)
        path = save_artifact(tmp_path / "e.joblib", explainer)
        artifact = load_artifact(path)
        assert artifact.method == method and artifact.feature_names == t.feature_names and "shap" in artifact.libraries
        restored = restore_explainer(path, model)
        rows = t.rows[[5, 55]]
        first, second = explainer.explain(rows), restored.explain(rows)
        for a, b in zip(first.instances, second.instances):
            for x, y in zip(a.outputs, b.outputs):
                assert x.base_value == pytest.approx(y.base_value)
                if method != "permutation":  # permutation draws its own orders each call
                    assert x.attributions == pytest.approx(y.attributions)

    def test_white_box_model_file(self, tmp_path: Path) -> None:
        path = tmp_path / "model.joblib"
        joblib.dump(estimator("diabetes"), path)
        loaded = load_model_file(path)
        t = table("diabetes")
        np.testing.assert_allclose(local_model(loaded, t.feature_names).predict(t.rows[:2]),
                                   estimator("diabetes").predict(t.rows[:2]))


class TestRefusals:
    """Path and cause, every time."""

    def test_missing_corrupt_foreign_and_mismatched(self, tmp_path: Path) -> None:
        with pytest.raises(ArtifactError, match="nope.joblib: no such file"):
            load_artifact(tmp_path / "nope.joblib")
        corrupt = tmp_path / "corrupt.joblib"
        corrupt.write_bytes(b"\x80\x04junk")
        with pytest.raises(ArtifactError, match="corrupt.joblib: cannot unpickle"):
            load_artifact(corrupt)
        foreign = tmp_path / "foreign.joblib"
        joblib.dump({"a": 1}, foreign)
        with pytest.raises(ArtifactError, match="not an infer-logger explainer artifact"):
            load_artifact(foreign)
        t = table("iris")
        explainer = registry.create("kernel", {"background_size": 5})
        explainer.fit(local_model(estimator("iris"), t.feature_names), t.rows)
        path = save_artifact(tmp_path / "iris.joblib", explainer)
        other = local_model(estimator("diabetes"), table("diabetes").feature_names)
        with pytest.raises(ArtifactError, match="fitted on features"):
            restore_explainer(path, other)

    def test_a_version_of_another_type_says_so(self, tmp_path: Path) -> None:
        """A version "1" (a string) read "artifact version 1, this reads 1"."""
        t = table("iris")
        explainer = registry.create("kernel", {"background_size": 5})
        explainer.fit(local_model(estimator("iris"), t.feature_names), t.rows)
        path = save_artifact(tmp_path / "e.joblib", explainer)
        joblib.dump({**joblib.load(path), "version": "1"}, path)
        with pytest.raises(ArtifactError, match="e.joblib: artifact version '1', this reads 1$"):
            load_artifact(path)

    def test_a_state_missing_keys(self, tmp_path: Path) -> None:
        t = table("iris")
        model = local_model(estimator("iris"), t.feature_names)
        explainer = registry.create("kernel", {"background_size": 5})
        explainer.fit(model, t.rows)
        path = save_artifact(tmp_path / "e.joblib", explainer)
        payload = joblib.load(path)
        joblib.dump({**payload, "state": {"weights": None}}, path)
        with pytest.raises(ArtifactError, match=r"e.joblib: its fitted state does not load: KeyError: 'background'"):
            restore_explainer(path, model)

    def test_saving_where_it_cannot_be(self, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
        t = table("iris")
        explainer = registry.create("kernel", {"background_size": 5})
        explainer.fit(local_model(estimator("iris"), t.feature_names), t.rows)
        with pytest.raises(ArtifactError, match="is a directory"):
            save_artifact(tmp_path, explainer)

        def full(*args: object) -> None:
            raise OSError(28, "No space left on device")

        monkeypatch.setattr(joblib, "dump", full)
        with pytest.raises(ArtifactError, match="e.joblib: cannot save the artifact: OSError: .*No space left"):
            save_artifact(tmp_path / "e.joblib", explainer)
        assert list(tmp_path.iterdir()) == []  # no temporary file left behind

    def test_tables(self, tmp_path: Path) -> None:
        with pytest.raises(ArtifactError, match="no bundled data set 'mnist'"):
            load_table("dataset:mnist")
        with pytest.raises(ArtifactError, match="cannot read background data"):
            load_table(str(tmp_path / "missing.csv"))
        csv = tmp_path / "bg.csv"
        csv.write_text("a,b,kind\n1,2,x\n3,4,y\n")
        loaded = load_table(str(csv))
        assert loaded.feature_names == ["a", "b", "kind"] and loaded.categorical == ("kind",)
        assert loaded.rows.tolist() == [[1.0, 2.0, "x"], [3.0, 4.0, "y"]]
        with pytest.raises(ArtifactError, match="cannot load the model"):
            load_model_file(csv)


def test_sidecar_never_imports_the_explain_stack() -> None:
    """The logger (and the explainers package itself) load without shap, pandas or scikit-learn."""
    code = ("import sys, infer_logger.cli, infer_logger.server, infer_logger.store, explainers, explainers.app, "
            "explainers.subscriber, explainers.cli\n"
            "heavy = [m for m in ('shap', 'pandas', 'sklearn', 'alibi', 'numba') if m in sys.modules]\n"
            "assert not heavy, heavy\n")
    subprocess.run([sys.executable, "-c", code], check=True, timeout=60)
    sidecar = ("import sys, infer_logger.cli, infer_logger.server, infer_logger.logger\n"
               "assert not [m for m in sys.modules if m.split('.')[0] in ('explainers', 'shap', 'pandas')]\n")
    subprocess.run([sys.executable, "-c", sidecar], check=True, timeout=60)

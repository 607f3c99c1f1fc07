"""Alibi backends (the `alibi` extra, run in .venv-alibi): anchors hold on held-out rows; alibi's
SHAP explainers are additive too."""

from __future__ import annotations

import re

import numpy as np
import pytest

from explainers import registry
from explainers.artifacts import restore_explainer, save_artifact
from explainers.data import local_model
from tests.explainers.models import estimator, table
from tests.explainers.test_explain_backends import outputs

pytestmark = pytest.mark.alibi

_RANGE = re.compile(r"(-?[\d.]+) < (.+) <= (-?[\d.]+)")
_BOUND = re.compile(r"(.+) (<=|>=|<|>) (-?[\d.]+)")
_EQUAL = re.compile(r"(.+) = (.+)")


def covers(anchor: list[str], names: list[str], row: np.ndarray) -> bool:
    """Whether `row` meets every condition of an anchor as alibi writes them."""
    for condition in anchor:
        if m := _RANGE.fullmatch(condition):
            low, name, high = m.groups()
            value = float(row[names.index(name)])
            ok = float(low) < value <= float(high)
        elif m := _BOUND.fullmatch(condition):
            name, op, bound = m.groups()
            value = float(row[names.index(name)])
            ok = {"<=": value <= float(bound), ">=": value >= float(bound), "<": value < float(bound),
                  ">": value > float(bound)}[op]
        elif m := _EQUAL.fullmatch(condition):
            name, category = m.groups()
            ok = str(row[names.index(name)]) == category
        else:
            raise AssertionError(f"cannot read anchor condition {condition!r}")
        if not ok:
            return False
    return True


class TestAnchors:
    """An anchor's precision holds on rows the explainer never saw."""

    def test_precision_on_held_out_rows(self) -> None:
        from sklearn.ensemble import RandomForestClassifier
        from sklearn.model_selection import train_test_split

        t = table("iris")
        train, test, y_train, _ = train_test_split(t.rows, t.target, test_size=0.4, random_state=0, stratify=t.target)
        forest = RandomForestClassifier(n_estimators=20, max_depth=4, random_state=0).fit(train, y_train)
        model = local_model(forest, t.feature_names)
        threshold = 0.9
        explainer = registry.create("anchor_tabular", {"background_size": len(train)}, {"threshold": threshold})
        explainer.fit(model, train)
        predicted = forest.predict(test)
        checked = 0
        for i in range(0, 60, 6):
            [result] = explainer.explain(test[i:i + 1]).instances
            assert result.anchor is not None and result.precision is not None and result.coverage is not None
            assert result.prediction == predicted[i]
            if result.precision < threshold:
                continue  # alibi found none (near a class boundary) and says so with the precision
            covered = [j for j in range(len(test)) if covers(list(result.anchor), t.feature_names, test[j])]
            if len(covered) >= 5:
                empirical = float(np.mean(predicted[covered] == predicted[i]))
                assert empirical >= threshold - 0.1, (result.anchor, empirical)
                checked += 1
        assert checked >= 5

    def test_categorical_features_and_artifact(self, tmp_path: object) -> None:
        t = table("penguins")
        model = local_model(estimator("penguins"), t.feature_names, t.categorical)
        explainer = registry.create("anchor_tabular", {"background_size": 200})
        explainer.fit(model, t.rows)
        path = save_artifact(tmp_path / "anchors.joblib", explainer)  # type: ignore[operator]
        restored = restore_explainer(path, model)
        [result] = restored.explain(t.rows[:1]).instances
        assert result.precision is not None and result.precision >= 0.95
        assert all(covers([c], t.feature_names, t.rows[0]) for c in result.anchor or ())


    def test_a_predictor_failing_at_build_is_its_own_error(self) -> None:
        """alibi wraps what the predictor raised in its PredictorCallError (an Exception): restored
        with the predictor down, the start was a traceback, not "predictor ..."."""
        import dataclasses

        from explainers.errors import PredictorError

        t = table("iris")
        model = local_model(estimator("iris"), t.feature_names)
        explainer = registry.create("anchor_tabular", {"background_size": 50})
        explainer.fit(model, t.rows)

        def down(rows: np.ndarray) -> np.ndarray:
            raise PredictorError("predictor http://127.0.0.1:1: ConnectionRefusedError")

        with pytest.raises(PredictorError, match="ConnectionRefusedError"):
            explainer.restore(dataclasses.replace(model, predict=down), explainer.state())


class TestAlibiShap:
    """alibi's KernelShap and TreeShap give additive attributions in the common JSON shape."""

    @pytest.mark.parametrize("method", ["alibi_kernel_shap", "alibi_tree_shap"])
    def test_additivity(self, method: str) -> None:
        t = table("iris")
        model = local_model(estimator("iris"), t.feature_names)
        explainer = registry.create(method, {"background_size": 20}, {"nsamples": 50} if "kernel" in method else {})
        explainer.fit(model, t.rows)
        rows = t.rows[[0, 60, 120]]
        explanation = explainer.explain(rows)
        sums, _ = outputs(explanation)
        np.testing.assert_allclose(sums, model.predict(rows), atol=1e-6)
        assert explanation.library.startswith("alibi ") and explanation.method == method

    def test_kernel_auto_is_held_to_the_limit(self) -> None:
        """alibi hands nsamples "auto" to shap's KernelExplainer (2 * 30 + 2048 coalitions for 30
        features): it was taken whatever `max_samples`, as `kernel`'s was."""
        from explainers.base import Model

        rows = np.random.default_rng(0).normal(size=(40, 30))
        explainer = registry.create("alibi_kernel_shap", {"background_size": 5}, {"nsamples": 1})
        explainer.fit(Model(lambda x: np.asarray(x, dtype=float).sum(axis=1), [f"f{i}" for i in range(30)]), rows)
        assert explainer.params({"nsamples": "auto"}, max_samples=2107).model_dump()["nsamples"] == 2107
        assert explainer.params({"nsamples": "auto"}, max_samples=2108).model_dump()["nsamples"] == "auto"

    @pytest.mark.parametrize("options", [{}, {"feature_perturbation": "interventional"}])
    def test_tree_shap_gives_the_estimator_its_own_column_order(self, options: dict[str, object]) -> None:
        """Fitted on a DataFrame (a, b, c), explained over a schema in order c, b, a: rows went to
        the trees as they came, and each attribution landed on another feature."""
        import pandas as pd
        from sklearn.ensemble import RandomForestRegressor

        x = pd.DataFrame(np.random.default_rng(0).normal(size=(200, 3)), columns=["a", "b", "c"])
        fitted = RandomForestRegressor(n_estimators=10, random_state=0).fit(x, 10 * x["a"] + x["b"])
        model = local_model(fitted, ["c", "b", "a"])
        explainer = registry.create("alibi_tree_shap", {"background_size": 50, **options})
        explainer.fit(model, x[["c", "b", "a"]].to_numpy())
        [output] = explainer.explain(np.array([[3.0, 2.0, 1.0]])).instances[0].outputs
        assert output.value == pytest.approx(fitted.predict(pd.DataFrame([[1.0, 2.0, 3.0]], columns=["a", "b", "c"]))[0])
        assert abs(output.attributions["c"]) < 0.5 < output.attributions["a"]  # c has no weight in the model

"""SHAP backends in process: additivity (sum + base = model output) for classifiers and regressors,
categorical features, parameters, and the one JSON shape."""

from __future__ import annotations

import importlib.util

import numpy as np
import orjson
import pytest

from explainers import registry
from explainers.base import Explanation, Model
from explainers.data import local_model
from explainers.errors import InvalidParametersError, MissingExtraError, PredictorError, UnsupportedModelError
from tests.explainers.models import estimator, frame, table


def outputs(explanation: Explanation) -> tuple[np.ndarray, np.ndarray]:
    """`(n, outputs)` arrays of base + sum of attributions, and of `value`."""
    sums = [[o.base_value + sum(o.attributions.values()) for o in i.outputs] for i in explanation.instances]
    values = [[o.value for o in i.outputs] for i in explanation.instances]
    return np.array(sums), np.array(values)


def iris_model() -> Model:
    t = table("iris")
    return local_model(estimator("iris"), t.feature_names)


class TestAdditivity:
    """sum(attributions) + base_value equals the model output the method explains."""

    @pytest.mark.parametrize("method, params", [("tree", {}), ("kernel", {"nsamples": 50}), ("permutation", {}),
                                                ("partition", {}), ("auto", {})])
    def test_classifier_probabilities(self, method: str, params: dict[str, object]) -> None:
        model = iris_model()
        explainer = registry.create(method, {"background_size": 20}, params)
        explainer.fit(model, table("iris").rows)
        rows = table("iris").rows[[0, 60, 120, 140]]
        explanation = explainer.explain(rows)
        sums, values = outputs(explanation)
        assert len(explanation.instances) == 4 and explanation.output_names == ["0", "1", "2"]
        np.testing.assert_allclose(sums, model.predict(rows), atol=1e-6)
        np.testing.assert_allclose(values, sums)

    @pytest.mark.parametrize("method", ["tree", "kernel", "permutation"])
    def test_regressor(self, method: str) -> None:
        t = table("diabetes")
        model = local_model(estimator("diabetes"), t.feature_names)
        explainer = registry.create(method, {"background_size": 20}, {"nsamples": 100} if method == "kernel" else {})
        explainer.fit(model, t.rows)
        rows = t.rows[:3]
        sums, _ = outputs(explainer.explain(rows))
        np.testing.assert_allclose(sums[:, 0], model.predict(rows), rtol=1e-6)

    def test_boosted_binary_margin(self) -> None:
        from sklearn.ensemble import GradientBoostingClassifier

        t = table("breast_cancer")
        boosted = GradientBoostingClassifier(n_estimators=20, random_state=0).fit(t.rows, t.target)
        explainer = registry.create("tree")
        explainer.fit(local_model(boosted, t.feature_names), t.rows)
        explanation = explainer.explain(t.rows[:3])
        sums, _ = outputs(explanation)
        assert explanation.output_names == ["1"]  # one margin: the positive class
        np.testing.assert_allclose(sums[:, 0], boosted.decision_function(t.rows[:3]), atol=1e-6)

    def test_linear_margin(self) -> None:
        from sklearn.linear_model import LogisticRegression
        from sklearn.preprocessing import StandardScaler

        t = table("wine")
        x = StandardScaler().fit_transform(t.rows)
        linear = LogisticRegression(max_iter=1000).fit(x, t.target)
        explainer = registry.create("linear", {"background_size": 50})
        explainer.fit(local_model(linear, t.feature_names), x)
        sums, _ = outputs(explainer.explain(x[:3]))
        # shap's linear explainer is exact up to the mean of the background it summarises.
        np.testing.assert_allclose(sums, linear.decision_function(x[:3]), atol=1e-6)


class TestCategorical:
    """String features (palmerpenguins): kernel takes them as they are, maskers as codes."""

    @pytest.mark.parametrize("method", ["kernel", "permutation"])
    def test_penguins(self, method: str) -> None:
        t = table("penguins")
        model = local_model(estimator("penguins"), t.feature_names, t.categorical)
        explainer = registry.create(method, {"background_size": 20}, {"nsamples": 100} if method == "kernel" else {})
        explainer.fit(model, t.rows)
        rows = t.rows[[0, 200, 300]]
        explanation = explainer.explain(rows)
        sums, _ = outputs(explanation)
        np.testing.assert_allclose(sums, estimator("penguins").predict_proba(frame(rows, t)), atol=1e-6)
        assert set(explanation.instances[0].outputs[0].attributions) == set(t.feature_names)


class TestContract:
    """Parameters, refusals and the JSON shape."""

    def test_json_shape(self) -> None:
        explainer = registry.create("kernel", {"background_size": 10}, {"nsamples": 30})
        explainer.fit(iris_model(), table("iris").rows)
        doc = orjson.loads(orjson.dumps(explainer.explain(table("iris").rows[:2], {"nsamples": 40}).to_dict()))
        assert doc["method"] == "kernel" and doc["params"] == {"nsamples": 40, "l1_reg": False}
        assert doc["library"].startswith("shap ") and len(doc["explanations"]) == 2
        item = doc["explanations"][1]
        assert item["method"] == "kernel" and [o["name"] for o in item["outputs"]] == ["0", "1", "2"]
        assert set(item["outputs"][0]) == {"name", "base_value", "value", "attributions"}
        assert set(item["outputs"][0]["attributions"]) == set(table("iris").feature_names)

    def test_unknown_parameter_names_the_allowed(self) -> None:
        explainer = registry.create("kernel")
        with pytest.raises(InvalidParametersError, match="nsamples, l1_reg"):
            explainer.params({"threshold": 0.9})
        with pytest.raises(InvalidParametersError, match="options"):
            registry.create("kernel", {"nope": 1})

    @pytest.mark.parametrize("params", [{"l1_reg": "aic", "nsamples": 1}, {"l1_reg": "bic", "nsamples": 2}])
    def test_too_few_coalitions_for_an_information_criterion_is_a_parameter_error(
            self, params: dict[str, object]) -> None:
        """scikit-learn's ValueError (fewer samples than features + 1) was a 500."""
        explainer = registry.create("kernel", {"background_size": 10})
        explainer.fit(iris_model(), table("iris").rows)
        with pytest.raises(InvalidParametersError, match=f"l1_reg '{params['l1_reg']}' needs more coalitions"):
            explainer.explain(table("iris").rows[:1], params)

    def test_l1_reg_keeps_at_least_one_feature(self) -> None:
        """`num_features(0)` explained with all attributions 0."""
        with pytest.raises(InvalidParametersError, match="l1_reg"):
            registry.create("kernel").params({"l1_reg": "num_features(0)"})
        assert registry.create("kernel").params({"l1_reg": "num_features(1)"}).l1_reg == "num_features(1)"

    @pytest.mark.parametrize("method, width, param, count", [
        ("kernel", 30, "nsamples", 2108),  # 2 * 30 + 2048 coalitions
        ("kernel", 4, "nsamples", 14),  # at most 2^4 - 2: every coalition
        ("permutation", 30, "max_evals", 600),  # 10 permutations forwards and back
        ("partition", 30, "max_evals", 500),
        ("auto", 30, "max_evals", 600),  # permutation over 10 features
        ("auto", 4, "max_evals", 16),  # exact: every coalition
        ("permutation", 4, "batch_size", 10),
    ])
    def test_auto_is_held_to_the_limit(self, method: str, width: int, param: str, count: int) -> None:
        """`"auto"` was taken whatever `max_samples`: 21,080 model rows for a limit of 100. It is
        the count shap makes of it for this model, at most the limit (never refused: it is shap's
        default, a wide model's would refuse every request)."""
        rows = np.random.default_rng(0).normal(size=(40, width))
        small = {"nsamples": 1} if method == "kernel" else {"max_evals": 2 * width + 1, "batch_size": 1}
        explainer = registry.create(method, {"background_size": 5}, small)
        model = Model(lambda x: np.asarray(x, dtype=float).sum(axis=1), [f"f{i}" for i in range(width)])
        explainer.fit(model, rows)
        assert explainer.params({param: "auto"}, max_samples=count - 1).model_dump()[param] == count - 1
        assert explainer.params({param: "auto"}, max_samples=count).model_dump()[param] == "auto"

    def test_auto_of_an_engine_that_does_not_evaluate_is_not_counted(self) -> None:
        """`auto` over a tree model: shap's tree engine reads the trees, not `max_evals` model calls."""
        explainer = registry.create("auto", {"background_size": 5})
        explainer.fit(iris_model(), table("iris").rows)
        assert explainer.params({"max_evals": "auto"}, max_samples=1).model_dump()["max_evals"] == "auto"

    def test_white_box_method_needs_the_model(self) -> None:
        black_box = Model(iris_model().predict, table("iris").feature_names)
        with pytest.raises(UnsupportedModelError, match="model file"):
            registry.create("tree").fit(black_box, table("iris").rows)

    @pytest.mark.parametrize("method", ["kernel", "permutation", "partition", "auto"])
    def test_class_labels_are_refused_as_the_predictors(self, method: str) -> None:
        """A V1 classifier's `predict` answers labels: shap failed on them (TypeError, numba's
        TypingError), a 500; the predictor's answer does not suit the method, a 502."""
        names = np.array(["setosa", "versicolor", "virginica"], dtype=object)
        labels = Model(lambda rows: names[estimator("iris").predict(np.asarray(rows, dtype=float))],
                       table("iris").feature_names)
        explainer = registry.create(method, {"background_size": 10}, {"nsamples": 20} if method == "kernel" else {})
        explainer.fit(labels, table("iris").rows)
        with pytest.raises(PredictorError, match=f"answered labels.*the {method} method explains numeric outputs"):
            explainer.explain(table("iris").rows[:1])

    def test_unknown_method(self) -> None:
        with pytest.raises(registry.UnknownMethodError, match="known: tree, kernel"):
            registry.create("lime")

    @pytest.mark.skipif(importlib.util.find_spec("alibi") is not None, reason="alibi is installed")
    def test_alibi_missing_names_the_extra(self) -> None:
        with pytest.raises(MissingExtraError, match=r"'alibi' extra.*infer-logger\[alibi\]"):
            registry.create("anchor_tabular")


class TestEstimatorColumnOrder:
    """A model fitted on a DataFrame (a, b, c) explained over a schema in another order (c, b, a):
    the methods that read the estimator give it rows in its own order, attributions by name."""

    @pytest.mark.parametrize("method, options", [("linear", {}), ("auto", {}), ("tree", {}),
                                                 ("tree", {"feature_perturbation": "interventional"})])
    def test_attributions_on_the_right_features(self, method: str, options: dict[str, object]) -> None:
        import pandas as pd
        from sklearn.ensemble import RandomForestRegressor
        from sklearn.linear_model import LinearRegression

        x = pd.DataFrame(np.random.default_rng(0).normal(size=(200, 3)), columns=["a", "b", "c"])
        kind = RandomForestRegressor(n_estimators=10, random_state=0) if method == "tree" else LinearRegression()
        fitted = kind.fit(x, 10 * x["a"] + x["b"])
        model = local_model(fitted, ["c", "b", "a"])
        explainer = registry.create(method, {"background_size": 50, **options})
        explainer.fit(model, x[["c", "b", "a"]].to_numpy())
        [output] = explainer.explain(np.array([[3.0, 2.0, 1.0]])).instances[0].outputs
        assert output.value == pytest.approx(fitted.predict(pd.DataFrame([[1.0, 2.0, 3.0]], columns=["a", "b", "c"]))[0])
        assert abs(output.attributions["c"]) < 0.5 < output.attributions["a"]  # c has no weight in the model

"""The service's start and its white-box model over HTTP: columns matched by name, rows the model
cannot take answered 400, and settings, files and artifacts that do not fit refused at start,
naming the field or the file (an artifact is saved only by a start that succeeded)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import httpx
import joblib
import numpy as np
import pandas as pd
import pytest
from sklearn.linear_model import LinearRegression

from explainers import registry
from explainers.app import create_app
from explainers.artifacts import save_artifact
from explainers.data import local_model
from explainers.errors import ArtifactError, SettingsError
from explainers.service import ExplainerService
from infer_logger.errors import ConfigError
from tests.explainers.conftest import refused_start, serve, settings
from tests.explainers.models import frame, table
from tests.servers import Process


class Broken:
    """A model (4 features) that fails on any rows."""

    n_features_in_ = 4

    def predict(self, rows: Any) -> Any:
        raise ValueError("broken on purpose")


@pytest.fixture
def abc(tmp_path: Path) -> tuple[Path, Path]:
    """A model fitted on a DataFrame (a, b, c; y = 10a + b), and background data in order c, b, a."""
    x = pd.DataFrame(np.random.default_rng(0).normal(size=(100, 3)), columns=["a", "b", "c"])
    joblib.dump(LinearRegression().fit(x, 10 * x["a"] + x["b"]), tmp_path / "abc.joblib")
    x[["c", "b", "a"]].to_csv(tmp_path / "cba.csv", index=False)
    return tmp_path / "abc.joblib", tmp_path / "cba.csv"


class TestWhiteBox:
    """A local model answers as the model would, over HTTP."""

    def test_background_columns_in_another_order(self, abc: tuple[Path, Path]) -> None:
        model_file, background = abc
        service = ExplainerService(settings(model_name="m", model_file=model_file, background=str(background),
                                            method="kernel", params={"nsamples": 50}))
        with serve(create_app(service)) as url:
            names = httpx.get(f"{url}/v2/models/m", timeout=20).json()["parameters"]["feature_names"]
            assert names == ["c", "b", "a"]
            row = [[3.0, 2.0, 1.0]]  # a=1, b=2, c=3 in that order: 10a + b = 12
            r = httpx.post(f"{url}/v1/models/m:predict", json={"instances": row}, timeout=20)
            assert r.status_code == 200 and r.json()["predictions"] == pytest.approx([12.0]), r.text
            r = httpx.post(f"{url}/v1/models/m:explain", json={"instances": row}, timeout=60)
            [output] = r.json()["explanations"][0]["outputs"]
            assert output["value"] == pytest.approx(12.0) and abs(output["attributions"]["c"]) < 1e-6, r.text

    def test_other_features_fail_the_start_naming_both(self, abc: tuple[Path, Path], tmp_path: Path) -> None:
        model_file, _ = abc
        (tmp_path / "abd.csv").write_text("a,b,d\n1,2,3\n4,5,6\n")
        service = ExplainerService(settings(model_file=model_file, background=str(tmp_path / "abd.csv")))
        with pytest.raises(ArtifactError, match=r"abc.joblib: the model was fitted on features \['a', 'b', 'c'\], "
                                                r"the data has \['a', 'b', 'd'\]"):
            service.prepare()

    def test_rows_the_model_cannot_take_are_400(self, tmp_path: Path) -> None:
        from sklearn.compose import make_column_transformer
        from sklearn.pipeline import make_pipeline
        from sklearn.preprocessing import OneHotEncoder

        t = table("penguins")
        strict = make_column_transformer((OneHotEncoder(handle_unknown="error"), list(t.categorical)),
                                         remainder="passthrough")
        joblib.dump(make_pipeline(strict, LinearRegression()).fit(frame(t.rows, t), t.target), tmp_path / "p.joblib")
        service = ExplainerService(settings(model_name="p", model_file=tmp_path / "p.joblib",
                                            background="dataset:penguins", method="kernel", params={"nsamples": 20}))
        row = t.rows[0].tolist()
        row[t.feature_names.index("island")] = "Atlantis"
        with serve(create_app(service)) as url:
            for verb in ("explain", "predict"):
                r = httpx.post(f"{url}/v1/models/p:{verb}", json={"instances": [row]}, timeout=60)
                assert r.status_code == 400, r.text
                assert r.json()["error"].startswith("the model cannot take these rows: Found unknown categories "
                                                    "['Atlantis']"), r.text


def ordered_predictor(order: list[str], layout: str) -> Any:
    """A V2 predictor of y = 10a - 3c (+ 4 when `colour` is red) whose metadata lists its features
    in `order`: one tensor each ("per-feature"), or one tensor with `parameters.feature_names`."""
    from starlette.applications import Starlette
    from starlette.responses import JSONResponse
    from starlette.routing import Route

    async def metadata(request: Any) -> JSONResponse:
        if layout == "per-feature":
            inputs = [{"name": n, "datatype": "BYTES" if n == "colour" else "FP64", "shape": [-1]} for n in order]
            parameters = {}
        else:
            kind = "BYTES" if "colour" in order else "FP64"
            inputs = [{"name": "input-0", "datatype": kind, "shape": [-1, len(order)]}]
            parameters = {"feature_names": order}
        return JSONResponse({"name": "m", "inputs": inputs, "parameters": parameters,
                             "outputs": [{"name": "y", "datatype": "FP64", "shape": [-1]}]})

    async def infer(request: Any) -> JSONResponse:
        tensors = (await request.json())["inputs"]
        if layout == "per-feature":
            columns = {t["name"]: np.asarray(t["data"], dtype=object).reshape(-1) for t in tensors}
        else:
            [t] = tensors
            matrix = np.asarray(t["data"], dtype=object).reshape(t["shape"])
            columns = {name: matrix[:, i] for i, name in enumerate(order)}
        y = 10 * columns["a"].astype(float) - 3 * columns["c"].astype(float)
        if "colour" in columns:
            y = y + 4 * (columns["colour"] == "red")
        return JSONResponse({"outputs": [{"name": "y", "shape": [len(y)], "datatype": "FP64", "data": y.tolist()}]})

    return Starlette(routes=[Route("/v2/models/{name}", metadata),
                             Route("/v2/models/{name}/infer", infer, methods=["POST"])])


def background_abc(tmp_path: Path, colour: bool = True) -> Path:
    """20 rows (kept whole: background_size 20) whose means are a=5, c=-5, colour half red."""
    i = np.arange(20)
    x = pd.DataFrame({"a": 5 + np.where(i % 2, 1.0, -1.0), "c": -5 + np.where(i // 2 % 2, 1.0, -1.0),
                      "colour": np.where(i % 4 < 2, "red", "blue")})
    x[["a", "c", "colour"] if colour else ["a", "c"]].to_csv(tmp_path / "acc.csv", index=False)
    return tmp_path / "acc.csv"


class TestBlackBoxColumns:
    """The predictor's metadata may list its features in another order than the background file:
    the rows were fitted on in the file's order, each feature given another's values."""

    @pytest.mark.parametrize("layout", ["per-feature", "feature_names"])
    @pytest.mark.parametrize("order", [["c", "a"], ["c", "colour", "a"]])
    def test_the_background_is_matched_by_name(self, tmp_path: Path, layout: str, order: list[str]) -> None:
        background = background_abc(tmp_path, colour="colour" in order)
        with serve(ordered_predictor(order, layout)) as predictor_url:
            service = ExplainerService(settings(model_name="m", predictor_url=predictor_url, binary_data=False,
                                                background=str(background), params={"nsamples": 50}))
            with serve(create_app(service)) as url:
                row = {"a": 5.0, "c": -5.0, "colour": "red"} if "colour" in order else {"a": 5.0, "c": -5.0}
                r = httpx.post(f"{url}/v1/models/m:explain", json={"instances": [row]}, timeout=60)
        assert r.status_code == 200, r.text
        assert r.json()["feature_names"] == order
        [output] = r.json()["explanations"][0]["outputs"]
        # At the background's means, red where half are: only the colour moves it, by 4 * 1/2.
        red = 2.0 if "colour" in order else 0.0
        assert output["base_value"] == pytest.approx(65.0 + red), output
        assert output["attributions"] == pytest.approx({"c": 0.0, "a": 0.0, **({"colour": red} if red else {})},
                                                       abs=1e-6), output

    async def test_other_names_fail_the_start_naming_both(self, tmp_path: Path) -> None:
        background = background_abc(tmp_path)
        with serve(ordered_predictor(["c", "colour", "b"], "per-feature")) as predictor_url:
            service = ExplainerService(settings(model_name="m", predictor_url=predictor_url, binary_data=False,
                                                background=str(background)))
            await refused_start(service, SettingsError, r"background: the columns of .*acc.csv \(a, c, colour\) "
                                                        r"are not the model's features \(c, colour, b\)")

    def test_a_nameless_background_is_taken_in_the_models_order(self, tmp_path: Path) -> None:
        i = np.arange(20)
        np.save(tmp_path / "ca.npy", np.column_stack([-5 + np.where(i // 2 % 2, 1.0, -1.0),
                                                     5 + np.where(i % 2, 1.0, -1.0)]))
        with serve(ordered_predictor(["c", "a"], "per-feature")) as predictor_url:
            service = ExplainerService(settings(model_name="m", predictor_url=predictor_url, binary_data=False,
                                                background=str(tmp_path / "ca.npy"), params={"nsamples": 50}))
            with serve(create_app(service)) as url:
                r = httpx.post(f"{url}/v1/models/m:explain", json={"instances": [[-5.0, 6.0]]}, timeout=60)
        assert r.status_code == 200, r.text
        [output] = r.json()["explanations"][0]["outputs"]
        assert output["base_value"] == pytest.approx(65.0)
        assert output["attributions"] == pytest.approx({"c": 0.0, "a": 10.0}, abs=1e-6), output


class TestStart:
    """What does not fit is refused before any fitting, naming the field or the file."""

    @pytest.mark.parametrize("values, words", [
        ({"feature_names": ["w", "w", "y", "z"]}, "feature_names: 'w' named more than once"),
        ({"feature_names": ["a", "b"]}, "feature_names: 2 names for the 4 columns of dataset:iris"),
        ({"categorical": ["nope"]}, "categorical: 'nope' name no feature (features: "),
    ])
    def test_settings(self, tmp_path: Path, values: dict[str, object], words: str) -> None:
        joblib.dump(LinearRegression().fit(table("iris").rows, table("iris").target), tmp_path / "m.joblib")
        service = ExplainerService(settings(model_file=tmp_path / "m.joblib", background="dataset:iris",
                                            method="linear", **values))
        with pytest.raises(ConfigError) as caught:
            service.prepare()
        assert words in str(caught.value)

    def test_an_array_background_takes_the_models_names(self, abc: tuple[Path, Path], tmp_path: Path) -> None:
        """An array has no names (x0, x1, ...): a model fitted on a DataFrame was refused as fitted
        on other features."""
        model_file, background = abc
        np.save(tmp_path / "abc.npy", pd.read_csv(background)[["a", "b", "c"]].to_numpy())
        service = ExplainerService(settings(model_file=model_file, background=str(tmp_path / "abc.npy")))
        service.prepare()
        assert service._fallback_schema().feature_names == ("a", "b", "c")

    def test_a_table_whose_header_reads_x0_x1_keeps_it(self, tmp_path: Path) -> None:
        """Guessed unnamed by its names, a CSV headed x0,x1,x2 took the model's order (x2,x1,x0)."""
        x = pd.DataFrame(np.random.default_rng(0).normal(size=(50, 3)), columns=["x0", "x1", "x2"])
        joblib.dump(LinearRegression().fit(x[["x2", "x1", "x0"]], 10 * x["x0"] + x["x1"]), tmp_path / "m.joblib")
        x.to_csv(tmp_path / "x.csv", index=False)
        service = ExplainerService(settings(model_file=tmp_path / "m.joblib", background=str(tmp_path / "x.csv")))
        service.prepare()
        assert service._fallback_schema().feature_names == ("x0", "x1", "x2")

    def test_a_background_of_another_width(self, tmp_path: Path) -> None:
        joblib.dump(LinearRegression().fit(table("iris").rows, table("iris").target), tmp_path / "m.joblib")
        service = ExplainerService(settings(model_file=tmp_path / "m.joblib", background="dataset:wine"))
        with pytest.raises(ArtifactError, match="m.joblib: the model was fitted on 4 features, the data has 13"):
            service.prepare()

    def test_an_artifact_target_that_cannot_be(self, tmp_path: Path) -> None:
        (tmp_path / "file").write_text("")
        for target, words in ((tmp_path, "is a directory"), (tmp_path / "file" / "a.joblib", "cannot save here")):
            service = ExplainerService(settings(predictor_url="http://127.0.0.1:1", background="dataset:iris",
                                                save_artifact=target))
            with pytest.raises(ArtifactError) as caught:
                service.prepare()  # before fitting, not after it
            assert str(target) in str(caught.value) and words in str(caught.value)

    async def test_no_artifact_saved_when_the_warm_up_fails(self, tmp_path: Path) -> None:
        joblib.dump(Broken(), tmp_path / "broken.joblib")
        artifact = tmp_path / "e.joblib"
        service = ExplainerService(settings(model_file=tmp_path / "broken.joblib", background="dataset:iris",
                                            method="kernel", save_artifact=artifact))
        try:
            with pytest.raises(ValueError, match="broken on purpose"):
                await service.start()
        finally:
            await service.aclose()
        assert not artifact.exists() and list(tmp_path.iterdir()) == [tmp_path / "broken.joblib"]


class TestArtifactFeatures:
    """An artifact fitted for other features fails the start naming it (it failed at warm-up, or
    started and answered 500)."""

    async def test_black_box(self, model_server: Process, tmp_path: Path) -> None:
        artifact = tmp_path / "iris.joblib"
        fitted = ExplainerService(settings(model_name="iris", predictor_url=model_server.url, background="dataset:iris",
                                           params={"nsamples": 20}, save_artifact=artifact))
        await fitted.start()
        await fitted.aclose()
        service = ExplainerService(settings(model_name="cancer", predictor_url=model_server.url, artifact=artifact,
                                            warmup=False))
        await refused_start(service, ArtifactError, r"iris.joblib: fitted on features \['sepal length \(cm\)'.*"
                                                    r"the model has \['mean radius'")

    async def test_white_box(self, tmp_path: Path) -> None:
        t = table("iris")
        joblib.dump(LinearRegression().fit(t.rows, t.target), tmp_path / "iris.joblib")
        joblib.dump(LinearRegression().fit(t.rows[:, :3], t.target), tmp_path / "three.joblib")
        artifact = tmp_path / "e.joblib"
        fitted = ExplainerService(settings(model_file=tmp_path / "iris.joblib", background="dataset:iris",
                                           save_artifact=artifact, warmup=False))
        await fitted.start()
        await fitted.aclose()
        service = ExplainerService(settings(model_file=tmp_path / "three.joblib", artifact=artifact, warmup=False))
        await refused_start(service, ArtifactError, r"e.joblib: does not fit the model file .*three.joblib: "
                                                    r"the model was fitted on 3 features, the data has 4")


class TestArtifactParams:
    """The configured `params` over a loaded artifact's own: they were ignored, and not checked."""

    @pytest.fixture
    def fitted(self, tmp_path: Path) -> tuple[Path, Path]:
        t = table("iris")
        model = LinearRegression().fit(t.rows, t.target)
        joblib.dump(model, tmp_path / "iris.joblib")
        explainer = registry.create("kernel", {"background_size": 5}, {"nsamples": 20, "l1_reg": "aic"})
        explainer.fit(local_model(model, t.feature_names), t.rows)
        return tmp_path / "iris.joblib", save_artifact(tmp_path / "e.joblib", explainer)

    async def test_they_apply(self, fitted: tuple[Path, Path]) -> None:
        model_file, artifact = fitted
        service = ExplainerService(settings(model_file=model_file, artifact=artifact, params={"nsamples": 40},
                                            warmup=False))
        try:
            await service.start()
            assert service.explainer is not None
            assert service.explainer.defaults.model_dump() == {"nsamples": 40, "l1_reg": "aic"}  # the rest: its own
            explanation = await service.explain(table("iris").rows[:1])
            assert explanation.params == {"nsamples": 40, "l1_reg": "aic"}
        finally:
            await service.aclose()

    @pytest.mark.parametrize("params, error, words", [
        ({"nsamples": "bogus"}, SettingsError, "the configured kernel parameters: nsamples: "),
        ({"threshold": 0.9}, SettingsError, "threshold: Extra inputs are not permitted"),
        ({"nsamples": 500}, SettingsError, "the configured parameters: nsamples: 500 is over this "
                                                    "server's limit of 100 (max_samples)"),
    ])
    def test_bad_ones_are_refused_as_without_an_artifact(self, fitted: tuple[Path, Path], params: dict[str, Any],
                                                         error: type[Exception], words: str) -> None:
        model_file, artifact = fitted
        service = ExplainerService(settings(model_file=model_file, artifact=artifact, params=params,
                                            max_samples=100, warmup=False))
        with pytest.raises(error) as caught:
            service.prepare()
        assert words in str(caught.value)
        if error is SettingsError:
            assert isinstance(caught.value, ConfigError) and caught.value.field == "params"

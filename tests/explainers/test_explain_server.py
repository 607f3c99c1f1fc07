"""The explainer server over HTTP, in front of a real predictor process: V1 `:explain`, V2 `/infer`,
health and metadata, bad input, an unreachable predictor, artifacts, and the CLI."""

from __future__ import annotations

import asyncio
import json
import logging
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import orjson
import pytest
from fastapi import FastAPI, Request
from fastapi.responses import Response, StreamingResponse

from explainers.app import create_app
from explainers.errors import ArtifactError, SettingsError
from explainers.service import ExplainerService
from infer_logger import binary_tensors as bt
from infer_logger.demo.predictor import create_app as predictor_app
from infer_logger.testing import free_port
from tests.conformance import ROOT
from tests.explainers.conftest import refused_start, serve, settings
from tests.explainers.models import Served, estimator, table
from tests.servers import Process, dribble

PAYLOADS = ROOT / "kserve" / "payloads"  # $INFER_LOGGER_CONFORMANCE, else ../shared/conformance
IRIS_V1 = {"instances": [[6.8, 2.8, 4.8, 1.4], [6.0, 3.4, 4.5, 1.6]]}


def payload(name: str) -> dict[str, object]:
    path = PAYLOADS / name
    return json.loads(path.read_text()) if path.exists() else IRIS_V1  # the same rows, if shared/ is absent


def sums(explanation: dict[str, object]) -> np.ndarray:
    return np.array([[o["base_value"] + sum(o["attributions"].values()) for o in item["outputs"]]  # type: ignore[index]
                     for item in explanation["explanations"]])  # type: ignore[union-attr]


@pytest.fixture(scope="module")
def iris_explainer(model_server: Process, tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """Kernel SHAP over the V2 `iris` model (its predict_proba output); saves its artifact."""
    artifact = tmp_path_factory.mktemp("artifacts") / "iris-kernel.joblib"
    service = ExplainerService(settings(model_name="iris", predictor_url=model_server.url, protocol="v2",
                                        background="dataset:iris", method="kernel", params={"nsamples": 30},
                                        save_artifact=artifact))
    with serve(create_app(service)) as url:
        yield url


class TestExplain:
    """Every instance explained, additive through the HTTP predictor, in V1 and V2."""

    def test_v1_every_instance_additive(self, iris_explainer: str) -> None:
        body = payload("iris-v1-input.json")
        r = httpx.post(f"{iris_explainer}/v1/models/iris:explain", json=body, timeout=30)
        assert r.status_code == 200, r.text
        doc = r.json()
        assert doc["method"] == "kernel" and len(doc["explanations"]) == 2
        assert doc["output_names"] == ["setosa", "versicolor", "virginica"]
        expected = estimator("iris").predict_proba(np.array(body["instances"]))
        np.testing.assert_allclose(sums(doc), expected, atol=1e-6)

    def test_v2_infer_has_an_explanation_output(self, iris_explainer: str) -> None:
        body = {**payload("iris-v2-input.json"), "id": "req-7", "parameters": {"explain_parameters": {"nsamples": 20}}}
        r = httpx.post(f"{iris_explainer}/v2/models/iris/infer", json=body, timeout=30)
        assert r.status_code == 200, r.text
        doc = r.json()
        assert doc["id"] == "req-7" and doc["model_name"] == "iris"
        [output] = doc["outputs"]
        assert (output["name"], output["datatype"], output["shape"]) == ("explanation", "BYTES", [1])
        explanation = orjson.loads(output["data"][0])
        assert len(explanation["explanations"]) == 2 and explanation["params"]["nsamples"] == 20

    @pytest.mark.parametrize("parameters, status, words", [
        ({"nsamples": 20, "binary_data_output": False, "content_type": "np"}, 200, ""),
        ({"nsamples": -5}, 400, "nsamples: Input should be greater than or equal to 1"),
        ({"max_evals": 50}, 400, "max_evals: Extra inputs are not permitted (allowed: nsamples, l1_reg)"),
    ])
    def test_v2_explain_parameters_directly_under_parameters(self, iris_explainer: str, parameters: dict[str, Any],
                                                             status: int, words: str) -> None:
        """Applied and checked as V1's: they were dropped without a word, bad ones too."""
        body = {**payload("iris-v2-input.json"), "parameters": parameters}
        r = httpx.post(f"{iris_explainer}/v2/models/iris/infer", json=body, timeout=30)
        assert r.status_code == status, r.text
        if status == 200:  # the others are other servers' (free-form): left alone
            assert orjson.loads(r.json()["outputs"][0]["data"][0])["params"]["nsamples"] == 20
        else:
            assert words in r.json()["error"], r.text

    def test_v2_infer_binary_both_ways(self, iris_explainer: str) -> None:
        rows = np.array(IRIS_V1["instances"], dtype="<f4")
        doc = {"id": "req-8", "inputs": [{"name": "input-0", "shape": [2, 4], "datatype": "FP32"}]}
        body, headers = bt.encode(doc, "inputs", {"input-0": rows})
        r = httpx.post(f"{iris_explainer}/v2/models/iris/infer", content=body, headers=headers, timeout=30)
        assert r.status_code == 200 and r.headers["content-type"] == "application/json", r.text
        json_answer = orjson.loads(r.json()["outputs"][0]["data"][0])
        asked = {**doc, "outputs": [{"name": "explanation", "parameters": {"binary_data": True}}]}
        body, headers = bt.encode(asked, "inputs", {"input-0": rows})
        r = httpx.post(f"{iris_explainer}/v2/models/iris/infer", content=body, headers=headers, timeout=30)
        assert r.status_code == 200 and r.headers["content-type"] == bt.CONTENT_TYPE, r.text
        answer, raw = bt.decode(r.content, r.headers[bt.HEADER], "outputs")
        assert answer["id"] == "req-8" and answer["outputs"][0]["datatype"] == "BYTES"
        [text] = bt.unpack_values("BYTES", raw["explanation"])
        explanation = orjson.loads(text)
        assert explanation == json_answer
        expected = estimator("iris").predict_proba(rows.astype(float))
        np.testing.assert_allclose(sums(explanation), expected, atol=1e-6)

    def test_v2_bad_binary_data_is_400(self, iris_explainer: str) -> None:
        doc = {"inputs": [{"name": "input-0", "shape": [2, 4], "datatype": "FP32"}]}
        body, headers = bt.encode(doc, "inputs", {"input-0": np.zeros((2, 4), "<f4")})
        url = f"{iris_explainer}/v2/models/iris/infer"
        r = httpx.post(url, content=body, headers={"content-type": bt.CONTENT_TYPE}, timeout=10)
        assert r.status_code == 400 and bt.HEADER in r.json()["error"], r.text
        r = httpx.post(url, content=body[:-4], headers=headers, timeout=10)
        assert r.status_code == 400 and "'input-0'" in r.json()["error"], r.text

    def test_predict_passes_through(self, iris_explainer: str) -> None:
        r = httpx.post(f"{iris_explainer}/v1/models/iris:predict", json=IRIS_V1, timeout=10)
        assert r.status_code == 200 and r.json() == {"predictions": estimator("iris").predict(
            np.array(IRIS_V1["instances"])).tolist()}

    def test_health_and_metadata(self, iris_explainer: str) -> None:
        get = lambda path: httpx.get(iris_explainer + path, timeout=10)
        assert get("/").json() == {"status": "alive"}
        assert get("/v1/models").json() == {"models": ["iris"]}
        assert get("/v1/models/iris").json() == {"name": "iris", "ready": True}
        assert get("/v2/health/live").json() == {"live": True}
        assert get("/v2/health/ready").json() == {"ready": True}
        assert get("/v2/models/iris/ready").json() == {"name": "iris", "ready": True}
        assert get("/v2").json()["extensions"] == ["binary_tensor_data"]
        meta = get("/v2/models/iris").json()
        assert meta["inputs"] == [{"name": "input-0", "datatype": "FP64", "shape": [-1, 4]}]
        assert meta["outputs"][0]["name"] == "explanation" and meta["parameters"]["method"] == "kernel"

    def test_work_is_off_the_event_loop(self, iris_explainer: str) -> None:
        async def race() -> None:
            async with httpx.AsyncClient(base_url=iris_explainer, timeout=60) as client:
                many = {"instances": table("iris").rows[:60].tolist(), "parameters": {"nsamples": 200}}
                explain = asyncio.create_task(client.post("/v1/models/iris:explain", json=many))
                await asyncio.sleep(0.05)
                live = await client.get("/v2/health/live")
                assert live.status_code == 200 and not explain.done()  # served while explaining
                assert (await explain).status_code == 200

        asyncio.run(race())


class TestBadInput:
    """400 naming the expected shape, 404 for another model."""

    @pytest.mark.parametrize("body, words", [
        ({"instances": [[1, 2, 3]]}, ["[n, 4]", "sepal length (cm)"]),
        ({"instances": [[1, 2, 3, "a"]]}, ["expected a number"]),
        ({"inputs": [{"name": "input-0", "shape": [1, 5], "datatype": "FP32", "data": [1, 2, 3, 4, 5]}]}, ["[n, 4]"]),
        ({"instances": [[1, 2, 3, 4]], "parameters": {"threshold": 1}}, ["allowed: nsamples, l1_reg"]),
    ])
    def test_400(self, iris_explainer: str, body: object, words: list[str]) -> None:
        r = httpx.post(f"{iris_explainer}/v1/models/iris:explain", json=body, timeout=10)
        assert r.status_code == 400 and all(w in r.json()["error"] for w in words), r.text

    def test_not_json_and_unknown_model(self, iris_explainer: str) -> None:
        r = httpx.post(f"{iris_explainer}/v1/models/iris:explain", content=b"{", timeout=10)
        assert r.status_code == 400 and "not JSON" in r.json()["error"]
        r = httpx.post(f"{iris_explainer}/v1/models/nope:explain", json=IRIS_V1, timeout=10)
        assert r.status_code == 404 and r.json() == {"error": "Model with name nope does not exist."}


class TestRegressionAndFailures:
    """A V1 regressor through HTTP; a predictor that goes away gives 502 with the reason."""

    def test_regressor_over_v1(self, model_server: Process) -> None:
        service = ExplainerService(settings(model_name="diabetes", predictor_url=model_server.url, protocol="v1",
                                            background="dataset:diabetes", method="kernel", params={"nsamples": 100}))
        rows = table("diabetes").rows[:3]
        with serve(create_app(service)) as url:
            r = httpx.post(f"{url}/v1/models/diabetes:explain", json={"instances": rows.tolist()}, timeout=60)
        assert r.status_code == 200, r.text
        np.testing.assert_allclose(sums(r.json())[:, 0], estimator("diabetes").predict(rows), rtol=1e-6)

    def test_kernel_rows_asked_ahead_in_one_request(self) -> None:
        from infer_logger.demo.quickstart import ServerThread
        from infer_logger.server import uvicorn_config

        posts = []
        app = predictor_app([Served("iris-proba", "iris", proba=True)])

        async def counted(scope: dict[str, object], receive: object, send: object) -> None:
            if scope["type"] == "http" and scope["method"] == "POST":
                posts.append(scope["path"])
            await app(scope, receive, send)  # type: ignore[arg-type]

        port = free_port()
        with ServerThread(uvicorn_config(counted, "127.0.0.1", port)):
            service = ExplainerService(settings(model_name="iris-proba", predictor_url=f"http://127.0.0.1:{port}",
                                                protocol="v1", background="dataset:iris", params={"nsamples": 30}))
            rows = table("iris").rows[:3]
            with serve(create_app(service)) as url:
                posts.clear()  # the fit and the warm-up
                r = httpx.post(f"{url}/v1/models/iris-proba:explain", json={"instances": rows.tolist()}, timeout=30)
        assert r.status_code == 200, r.text
        assert len(posts) == 1 + 3  # the 3 rows together, then each row's coalitions
        np.testing.assert_allclose(sums(r.json()), estimator("iris-proba").predict_proba(rows), atol=1e-6)

    def test_predictor_unreachable_is_502(self) -> None:
        from infer_logger.demo.quickstart import ServerThread
        from infer_logger.server import uvicorn_config

        port = free_port()
        predictor = ServerThread(uvicorn_config(predictor_app([Served("iris-proba", "iris", proba=True)]),
                                                "127.0.0.1", port))
        with predictor:
            service = ExplainerService(settings(model_name="iris-proba", predictor_url=f"http://127.0.0.1:{port}",
                                                protocol="v1", background="dataset:iris", retries=1))
            with serve(create_app(service)) as url:
                assert httpx.post(f"{url}/v1/models/iris-proba:explain", json=IRIS_V1, timeout=30).status_code == 200
                predictor.__exit__(None, None, None)
                r = httpx.post(f"{url}/v1/models/iris-proba:explain", json=IRIS_V1, timeout=30)
        assert r.status_code == 502 and "failed after 2 attempts" in r.json()["error"], r.text


class TestArtifacts:
    """A saved explainer loads instead of fitting; one that does not load stops the start."""

    def test_restored_explainer_explains_the_same(self, iris_explainer: str, model_server: Process,
                                                 tmp_path_factory: pytest.TempPathFactory) -> None:
        [artifact] = (tmp_path_factory.getbasetemp() / "artifacts0").glob("*.joblib")
        service = ExplainerService(settings(model_name="iris", predictor_url=model_server.url,
                                            artifact=artifact, params={"nsamples": 30}))
        with serve(create_app(service)) as url:
            restored = httpx.post(f"{url}/v1/models/iris:explain", json=IRIS_V1, timeout=30).json()
        fitted = httpx.post(f"{iris_explainer}/v1/models/iris:explain", json=IRIS_V1, timeout=30).json()
        # Four features: kernel SHAP enumerates every coalition, so the result is exact and repeatable.
        np.testing.assert_allclose(sums(restored), sums(fitted), atol=1e-9)
        assert restored["explanations"][0]["outputs"][0]["attributions"] == pytest.approx(
            fitted["explanations"][0]["outputs"][0]["attributions"])

    def test_bad_artifact_names_path_and_cause(self, tmp_path: Path, model_server: Process) -> None:
        bad = tmp_path / "broken.joblib"
        bad.write_bytes(b"not a pickle")
        service = ExplainerService(settings(predictor_url=model_server.url, artifact=bad))
        with pytest.raises(ArtifactError) as caught:
            service.prepare()
        assert str(bad) in str(caught.value) and "cannot unpickle" in str(caught.value)
        cli = subprocess.run([sys.executable, "-m", "explainers", "--predictor-url", model_server.url,
                              "--artifact", str(bad), "--port", str(free_port())],
                             check=False, capture_output=True, text=True, timeout=60)
        assert cli.returncode == 1 and str(bad) in cli.stderr and "cannot unpickle" in cli.stderr


class TestCommand:
    """`python -m explainers` (= `infer-logger explainer`) serves after warming up."""

    def test_serves(self, model_server: Process, tmp_path: Path) -> None:
        port = free_port()
        proc = Process([sys.executable, "-m", "explainers", "--port", str(port), "--model-name", "iris-proba",
                        "--predictor-url", model_server.url, "--protocol", "v1", "--background", "dataset:iris",
                        "--method", "permutation", "--option", "background_size=10", "--log-level", "warning"],
                       port, ready_path="/v2/health/ready", log=tmp_path / "explainer.log")
        proc.start(timeout=90)
        try:
            r = httpx.post(f"{proc.url}/v1/models/iris-proba:explain", json=IRIS_V1, timeout=60)
            assert r.status_code == 200 and r.json()["method"] == "permutation", r.text
            np.testing.assert_allclose(sums(r.json()), estimator("iris").predict_proba(
                np.array(IRIS_V1["instances"])), atol=1e-6)
        finally:
            assert proc.stop() == 0  # uvicorn raised SIGTERM again once it had shut down: -15

    def test_other_libraries_info_is_not_logged_at_info(self, monkeypatch: pytest.MonkeyPatch) -> None:
        """shap logs each explanation's working at INFO, 4 lines each: the default level printed
        them all (2,408 of shap's lines to the explainer's own 4 in a short run)."""
        from explainers.cli import _logging

        root, ours = logging.getLogger(), [logging.getLogger(n) for n in ("explainers", "infer_logger", "pipelines")]
        before = root.level, [logger.level for logger in ours]
        monkeypatch.setattr(root, "handlers", [])  # as at a CLI's start: basicConfig sets up only then
        try:
            _logging("info")
            assert not logging.getLogger("shap").isEnabledFor(logging.INFO)
            assert all(logger.isEnabledFor(logging.INFO) for logger in ours)
            root.handlers = []
            _logging("error")  # theirs held to it too
            assert not logging.getLogger("shap").isEnabledFor(logging.WARNING)
            assert not any(logger.isEnabledFor(logging.WARNING) for logger in ours)
        finally:
            root.setLevel(before[0])
            for logger, level in zip(ours, before[1], strict=True):
                logger.setLevel(level)

    def test_a_failed_start_says_why_in_one_line(self) -> None:
        base = [sys.executable, "-m", "explainers", "--port", str(free_port()), "--protocol", "v1",
                "--predictor-url", f"http://127.0.0.1:{free_port()}", "--background", "dataset:iris"]
        # Defaults over the limit: refused before fitting, a settings error (exit 2) as other bad --params.
        cli = subprocess.run([*base, "--param", "nsamples=50000"], check=False, capture_output=True, text=True,
                             timeout=60)
        assert cli.returncode == 2, cli.stderr
        assert cli.stderr.splitlines()[-1] == (
            "infer-logger explainer: the configured parameters: nsamples: 50000 is over this server's limit of "
            "10000 (max_samples) (allowed: nsamples, l1_reg)")
        # No predictor to warm up with: the server's start fails, logged in one line (no traceback).
        cli = subprocess.run([*base, "--option", "background_size=5"], check=False, capture_output=True,
                             text=True, timeout=60)
        assert cli.returncode != 0 and "Traceback" not in cli.stderr, cli.stderr
        assert "explainer model failed to start: predictor" in cli.stderr and "ConnectionRefusedError" in cli.stderr

    def test_settings_only_the_predictor_refutes_exit_2(self, model_server: Process) -> None:
        # A black box learns its features from the predictor's metadata, in the server's start.
        cli = subprocess.run([sys.executable, "-m", "explainers", "--port", str(free_port()), "--protocol", "v1",
                              "--predictor-url", model_server.url, "--model-name", "iris",
                              "--background", "dataset:iris", "--categorical", "colour"],
                             check=False, capture_output=True, text=True, timeout=120)
        assert cli.returncode == 2, cli.stderr
        assert "Traceback" not in cli.stderr and "categorical: 'colour' name no feature" in cli.stderr, cli.stderr


class SwitchablePredictor:
    """A V1 `iris` predictor answering probabilities, or failing as `mode` says (set between requests)."""

    def __init__(self) -> None:
        self.mode = "ok"
        self.holding = 0
        """Requests held by mode `hang`: until their client hangs up, or `release`."""
        self.release = threading.Event()
        self.headers: dict[str, str] = {}
        """Those of the last request."""
        self.app = FastAPI()

        @self.app.post("/v1/models/{name}:predict")
        async def predict(name: str, request: Request) -> Response:
            self.headers = dict(request.headers)
            rows = np.asarray(orjson.loads(await request.body())["instances"], dtype=float)
            n, out = len(rows), None
            if self.mode == "slow":
                await asyncio.sleep(3)
            if self.mode == "hang":
                self.holding += 1
                try:
                    while not (self.release.is_set() or await request.is_disconnected()):
                        await asyncio.sleep(0.02)
                finally:
                    self.holding -= 1
                return Response(b'{"error": "released"}', status_code=503, media_type="application/json")
            if self.mode == "trickle":  # the answer, 4 bytes every 0.1 s: no read waits long
                body = orjson.dumps({"predictions": estimator("iris").predict_proba(rows).tolist()})

                async def drip() -> Any:
                    for i in range(0, len(body), 4):
                        yield body[i:i + 4]
                        await asyncio.sleep(0.1)

                return StreamingResponse(drip(), headers={"content-length": str(len(body))})
            if self.mode == "ok":
                out = {"predictions": estimator("iris").predict_proba(rows).tolist()}
            elif self.mode == "two-columns":
                out = {"predictions": [[0.1, 0.9]] * n}
            elif self.mode == "labels":
                out = {"predictions": ["setosa"] * n}
            elif self.mode == "objects":
                out = {"predictions": [{"p": 1}] * n}
            elif self.mode == "ragged":
                out = {"predictions": [[0.1, 0.9]] + [[0.1]] * (n - 1)}
            if out is not None:
                return Response(orjson.dumps(out), media_type="application/json")
            if self.mode == "html":
                return Response(b"<html>oops</html>", media_type="text/html")
            if self.mode == "empty":
                return Response(status_code=204)
            if self.mode in ("400", "422"):  # the rows themselves, as a model server refuses them
                return Response(b'{"error": "Input X contains infinity"}', status_code=int(self.mode),
                                media_type="application/json")
            return Response(b'{"error": "boom"}', status_code=500, media_type="application/json")


@pytest.fixture(scope="module")
def switchable() -> Iterator[tuple[SwitchablePredictor, str]]:
    """A kernel explainer (fitted on good answers) over a predictor that then misbehaves."""
    predictor = SwitchablePredictor()
    with serve(predictor.app) as predictor_url:
        service = ExplainerService(settings(model_name="iris", predictor_url=predictor_url, protocol="v1",
                                            background="dataset:iris", params={"nsamples": 20},
                                            timeout=1.0, retries=1, max_request_bytes=4096,
                                            request_read_timeout=1.0))
        with serve(create_app(service)) as url:
            yield predictor, url
            predictor.mode = "ok"


def _explained_while(switchable: tuple[SwitchablePredictor, str], mode: str) -> httpx.Response:
    """An explanation asked while the predictor answers as `mode` says."""
    predictor, url = switchable
    predictor.mode = mode
    try:
        return httpx.post(f"{url}/v1/models/iris:explain", json=IRIS_V1, timeout=20)
    finally:
        predictor.mode = "ok"


class TestPredictorMisbehaves:
    """An explainer whose predictor answers 5xx, no JSON, outputs of another layout or nothing in
    time: 502 with a JSON reason, never a 500 with a traceback, and never a hang."""

    @pytest.mark.parametrize("mode, words", [
        ("500", "answered 500"), ("html", "no JSON"), ("empty", "no JSON"),
        ("two-columns", "[2] numbers per row, but [3] numbers per row before"),
        ("labels", "[] labels per row, but [3] numbers"), ("objects", "neither numbers nor labels"),
        ("ragged", "answered"), ("slow", "no answer within 1s"), ("trickle", "no answer within 1s"),
    ])
    def test_502(self, switchable: tuple[SwitchablePredictor, str], mode: str, words: str) -> None:
        r = _explained_while(switchable, mode)
        assert r.status_code == 502 and words in r.json()["error"], r.text
        assert httpx.post(f"{switchable[1]}/v1/models/iris:explain", json=IRIS_V1, timeout=20).status_code == 200


    @pytest.mark.parametrize("mode", ["400", "422"])
    def test_rows_the_predictor_refuses_are_400(self, switchable: tuple[SwitchablePredictor, str], mode: str) -> None:
        """Input the model cannot take (in JSON too): no retry helps, and a 502 told the broker to
        retry it."""
        r = _explained_while(switchable, mode)
        assert r.status_code == 400 and f"answered {mode}" in r.json()["error"] and "infinity" in r.text, r.text


class TestMoreBadInput:
    """Inputs that got a 500 (or were taken) before: 400 with the reason."""

    @pytest.mark.parametrize("body, words", [
        ({"instances": [[None, 2, 3, 4]]}, "expected a number, got None"),
        ({"inputs": [{"name": "x", "shape": [1, 4], "datatype": "FP64", "data": [1, 2, None, 4]}]},
         "expected a number, got None"),
        ({"instances": [[1, 2, 3, 4]], "parameters": {"nsamples": 0}}, "nsamples"),
        ({"instances": [[1, 2, 3, 4]], "parameters": {"nsamples": -5}}, "nsamples"),
        ({"instances": [[1, 2, 3, 4]], "parameters": {"l1_reg": "bogus"}}, "l1_reg"),
        ({"instances": [[1, 2, 3, 4]], "parameters": {"nsamples": 10**9}},
         "nsamples: 1000000000 is over this server's limit of 10000 (max_samples)"),
    ])
    def test_400(self, switchable: tuple[SwitchablePredictor, str], body: object, words: str) -> None:
        _, url = switchable
        r = httpx.post(f"{url}/v1/models/iris:explain", json=body, timeout=20)
        assert r.status_code == 400 and words in r.json()["error"], r.text

    def test_binary_body_with_a_non_tensor_input(self, switchable: tuple[SwitchablePredictor, str]) -> None:
        _, url = switchable
        tensor = {"name": "x", "shape": [1, 4], "datatype": "FP64", "parameters": {"binary_data_size": 32}}
        head = orjson.dumps({"inputs": [tensor, 7]})
        body, headers = head + np.ones(4).tobytes(), {bt.HEADER: str(len(head))}
        r = httpx.post(f"{url}/v2/models/iris/infer", content=body, headers=headers, timeout=20)
        assert r.status_code == 400 and "expected shape [n, 4]" in r.json()["error"], r.text  # was a 500

    def test_json_nested_near_its_limit(self, switchable: tuple[SwitchablePredictor, str]) -> None:
        # Valid JSON (orjson reads 1024 levels) whose bad value the 400 quoted with repr, or whose
        # echoed `id` orjson would not write back: RecursionError / TypeError, a 500.
        _, url = switchable
        deep = b"[" * 990 + b"1" + b"]" * 990
        v2 = b'{"name": "input-0", "shape": [1, 4], "datatype": "FP64", "data": [' + deep + b', 2, 3, 4]}'
        for path, body, words in [
            ("/v1/models/iris:explain", b'{"instances": [[' + deep + b", 2, 3, 4]]}",
             "expected a number, got [[[[...]]]]"),
            ("/v2/models/iris/infer", b'{"inputs": [' + v2 + b"]}", "expected a number, got [[[[...]]]]"),
            ("/v2/models/iris/infer", b'{"inputs": [{"name": ' + deep + b', "shape": [1], "data": [1]}, '
                                      b'{"name": "b", "shape": [1], "data": [1]}]}', "nests JSON too deeply"),
            ("/v2/models/iris/infer", b'{"id": ' + deep + b', "inputs": [{"name": "input-0", "shape": [1, 4], '
                                      b'"datatype": "FP64", "data": [1, 2, 3, 4]}]}', "`id` must be a string"),
        ]:
            r = httpx.post(url + path, content=body, timeout=20)
            assert r.status_code == 400 and words in r.json()["error"], r.text

    def test_v2_outputs_not_a_list_of_objects(self, switchable: tuple[SwitchablePredictor, str]) -> None:
        # Read after explaining, by iterating it: a 500 for a number or `true`.
        _, url = switchable
        tensor = {"name": "input-0", "shape": [1, 4], "datatype": "FP64", "data": [6.8, 2.8, 4.8, 1.4]}
        for outputs in (1, True, "explanation", [7]):
            r = httpx.post(f"{url}/v2/models/iris/infer", json={"inputs": [tensor], "outputs": outputs}, timeout=20)
            assert r.status_code == 400 and "`outputs` must be a list of objects" in r.json()["error"], r.text
        for outputs in (None, [{"name": "explanation"}]):
            r = httpx.post(f"{url}/v2/models/iris/infer", json={"inputs": [tensor], "outputs": outputs}, timeout=20)
            assert r.status_code == 200, r.text

    def test_v2_an_unknown_output_is_400(self, switchable: tuple[SwitchablePredictor, str]) -> None:
        """Answered 200 with the explanation: the client never learnt it had named no output of this model."""
        _, url = switchable
        tensor = {"name": "input-0", "shape": [1, 4], "datatype": "FP64", "data": [6.8, 2.8, 4.8, 1.4]}
        for outputs, words in (([{"name": "foo"}], "unknown output 'foo'"),
                               ([{"name": "explanation"}, {}], "unknown output with no string `name`")):
            r = httpx.post(f"{url}/v2/models/iris/infer", json={"inputs": [tensor], "outputs": outputs}, timeout=20)
            assert r.status_code == 400 and words in r.json()["error"], r.text

    @pytest.mark.parametrize("tensor, words", [
        ({"datatype": "FOO"}, "inputs (input-0): `datatype` 'FOO' is not one of"),
        ({"datatype": None}, "inputs (input-0): `datatype` None is not one of"),
        ({"datatype": "FP16"}, "inputs (input-0): FP16 is taken as binary tensor data only"),
        ({"datatype": "INT64", "data": [6, 2, 5.1, 1]}, "INT64 `data` holds 5.1, not an integer"),
        ({"datatype": "INT64", "data": [6, 2, 99999999999999999999999, 1]}, "not an integer in INT64's range"),
        ({"data": None}, "tensor 'input-0' has no data"),
    ])
    def test_v2_tensor_datatype_and_data(self, switchable: tuple[SwitchablePredictor, str],
                                         tensor: dict[str, Any], words: str) -> None:
        """Taken before, whatever the datatype (FP16 in JSON too, which KServe refuses with a 400);
        a tensor without data was read as a V1 row and refused for missing features."""
        _, url = switchable
        body = {"name": "input-0", "shape": [1, 4], "datatype": "FP64", "data": [6.8, 2.8, 4.8, 1.4], **tensor}
        body = {k: v for k, v in body.items() if v is not None}
        r = httpx.post(f"{url}/v2/models/iris/infer", json={"inputs": [body]}, timeout=20)
        assert r.status_code == 400 and words in r.json()["error"], r.text

    def test_get_on_explain_or_predict_is_405(self, switchable: tuple[SwitchablePredictor, str]) -> None:
        """Taken by `GET /v1/models/{name}`: a 404 for a model named `iris:explain`."""
        _, url = switchable
        for path in ("/v1/models/iris:explain", "/v1/models/iris:predict", "/v2/models/iris/infer"):
            r = httpx.get(url + path, timeout=20)
            assert r.status_code == 405 and r.headers["allow"] == "POST", (path, r.text)
            assert r.json() == {"error": "Method Not Allowed"}, (path, r.text)
        assert httpx.get(f"{url}/v1/models/iris", timeout=20).json() == {"name": "iris", "ready": True}

    def test_a_model_named_with_a_verb_is_found(self) -> None:
        """The 405 for a GET of `x:explain` hid a served model of that name."""
        predictor = SwitchablePredictor()
        with serve(predictor.app) as predictor_url:
            service = ExplainerService(settings(model_name="x:explain", predictor_url=predictor_url, protocol="v1",
                                                predictor_model="iris", background="dataset:iris",
                                                params={"nsamples": 20}))
            with serve(create_app(service)) as url:
                r = httpx.get(f"{url}/v1/models/x:explain", timeout=20)
        assert r.status_code == 200 and r.json()["name"] == "x:explain", r.text

    def test_predict_passes_the_predictors_answers_and_times_out_with_504(
            self, switchable: tuple[SwitchablePredictor, str]) -> None:
        """A predictor that does not answer `:predict` within `timeout` was a 502; its own answers,
        failures too, are passed on as they are."""
        predictor, url = switchable
        try:
            predictor.mode = "500"
            r = httpx.post(f"{url}/v1/models/iris:predict", json=IRIS_V1, timeout=20)
            assert (r.status_code, r.content) == (500, b'{"error": "boom"}')
            predictor.mode = "slow"
            r = httpx.post(f"{url}/v1/models/iris:predict", json=IRIS_V1, timeout=20)
            assert r.status_code == 504 and "no answer within 1s" in r.json()["error"], r.text
        finally:
            predictor.mode = "ok"
        assert httpx.post(f"{url}/v1/models/iris:predict", json=IRIS_V1, timeout=20).status_code == 200

    def test_predict_passes_no_hop_by_hop_headers(self, switchable: tuple[SwitchablePredictor, str]) -> None:
        # Forwarded, a chunked body's transfer-encoding beside the client's content-length: a 400.
        predictor, url = switchable
        body = orjson.dumps(IRIS_V1)
        for content, headers in [(iter([body[:10], body[10:]]), {}),
                                 (body, {"expect": "100-continue", "te": "trailers"}),
                                 (body, {"connection": "keep-alive, x-hop", "x-hop": "1", "keep-alive": "timeout=5",
                                         "proxy-authorization": "Basic eA==", "x-end": "2"})]:
            r = httpx.post(f"{url}/v1/models/iris:predict", content=content, headers=headers, timeout=20)
            assert r.status_code == 200 and len(r.json()["predictions"]) == 2, r.text
            seen = set(predictor.headers)
            assert not seen & {"transfer-encoding", "expect", "te", "x-hop", "keep-alive", "proxy-authorization"}, seen
        assert predictor.headers["x-end"] == "2"

    def test_binary_body_with_a_json_tensor_of_its_name(self, switchable: tuple[SwitchablePredictor, str]) -> None:
        # The JSON tensor was read as the binary one, with its own datatype: KeyError (none, or
        # BF16) or BinaryDataError (BYTES), a 500.
        _, url = switchable
        binary = {"name": "a", "shape": [1, 4], "datatype": "FP64", "parameters": {"binary_data_size": 32}}
        for other in ({}, {"datatype": "BF16"}, {"datatype": "BYTES", "data": ["x"]}):
            head = orjson.dumps({"inputs": [binary, {"name": "a", "shape": [1], "data": [1], **other}]})
            r = httpx.post(f"{url}/v2/models/iris/infer", content=head + np.ones(4).tobytes(),
                           headers={bt.HEADER: str(len(head))}, timeout=20)
            assert r.status_code == 400 and "'a': is named twice" in r.json()["error"], r.text

    def test_white_box_predict_not_json(self, tmp_path: Path) -> None:
        import joblib

        joblib.dump(estimator("iris"), tmp_path / "iris.joblib")
        service = ExplainerService(settings(model_name="iris", model_file=tmp_path / "iris.joblib",
                                            background="dataset:iris", method="tree"))
        with serve(create_app(service)) as url:
            r = httpx.post(f"{url}/v1/models/iris:predict", content=b"{", timeout=20)
            assert r.status_code == 400 and "not JSON" in r.json()["error"], r.text
            deep = b"[" * 990 + b"1" + b"]" * 990
            body = b'{"instances": [[' + deep + b", 2, 3, 4]]}"
            r = httpx.post(f"{url}/v1/models/iris:predict", content=body, timeout=20)
            assert r.status_code == 400 and "expected a number, got [[[[...]]]]" in r.json()["error"], r.text
            assert httpx.post(f"{url}/v1/models/iris:predict", json=IRIS_V1, timeout=20).status_code == 200

    def test_a_binary_tensor_past_max_instances(self, tmp_path: Path) -> None:
        # Refused before its values are unpacked (as Python objects, ~20 times its bytes), not after.
        import joblib

        joblib.dump(estimator("iris"), tmp_path / "iris.joblib")
        service = ExplainerService(settings(model_name="iris", model_file=tmp_path / "iris.joblib",
                                            background="dataset:iris", method="tree", max_instances=2))
        with serve(create_app(service)) as url:
            body, headers = bt.encode({"inputs": [{"name": "input-0", "shape": [3, 4], "datatype": "FP64"}]},
                                      "inputs", {"input-0": np.ones((3, 4))})
            r = httpx.post(f"{url}/v2/models/iris/infer", content=body, headers=headers, timeout=20)
            assert r.status_code == 400 and "'input-0': 12 values; at most 8" in r.json()["error"], r.text


class TestLimits:
    """One request cannot hold the server: its sample counts are capped (`max_samples`) and its
    time (`explain_timeout`), after which its workers are free again."""

    def test_over_its_time_is_504_and_the_workers_go_on(self) -> None:
        predictor = SwitchablePredictor()
        with serve(predictor.app) as predictor_url:
            # The predictor never answers and its client waits 600 s: an answer within the 60 s hang
            # guard came from explain_timeout, not from the predictor's timeout or its retries.
            # 5 s: the follow-up's real explanation must fit in it on a loaded machine too.
            service = ExplainerService(settings(model_name="iris", predictor_url=predictor_url, protocol="v1",
                                                background="dataset:iris", params={"nsamples": 20},
                                                timeout=600.0, retries=2, workers=1, explain_timeout=5.0))
            with serve(create_app(service)) as url:
                predictor.mode = "hang"
                try:
                    try:
                        r = httpx.post(f"{url}/v1/models/iris:explain", json=IRIS_V1, timeout=60)
                    except httpx.TimeoutException:
                        pytest.fail("no answer within 60 s: explain_timeout (5 s) was not applied")
                    assert r.status_code == 504, r.text
                    assert r.json()["error"] == ("explaining 2 instance(s) took over 5s (explain_timeout): "
                                                 "ask for fewer instances or samples, or add workers")
                    predictor.mode = "ok"
                    # The worker's call was cut off at the deadline (else held till the end): it is free.
                    deadline = time.monotonic() + 30
                    while predictor.holding:
                        assert time.monotonic() < deadline, "the worker's call to the predictor was not cut off"
                        time.sleep(0.02)
                    # A 200 within its own 5 s explain_timeout: the one worker took it.
                    assert httpx.post(f"{url}/v1/models/iris:explain", json=IRIS_V1, timeout=60).status_code == 200
                finally:
                    predictor.release.set()

    def test_a_local_model_is_stopped_at_the_deadline_too(self, tmp_path: Path) -> None:
        """White box, a method that calls the model (kernel): the worker stops at its next call."""
        import joblib

        joblib.dump(estimator("iris"), tmp_path / "iris.joblib")
        # Minutes of work in one chunk, so that a worker not stopped stays busy far past what follows
        # (and far past explain_timeout: 5 s, for the follow-up's real explanation on a loaded machine).
        rows = np.tile(np.array(IRIS_V1["instances"]), (15_000, 1))
        service = ExplainerService(settings(model_name="iris", model_file=tmp_path / "iris.joblib", method="kernel",
                                            background="dataset:iris", params={"nsamples": 500}, workers=1,
                                            chunk_size=len(rows), max_instances=len(rows), explain_timeout=5.0))
        with serve(create_app(service)) as url:
            try:
                r = httpx.post(f"{url}/v1/models/iris:explain", json={"instances": rows.tolist()}, timeout=60)
            except httpx.TimeoutException:
                pytest.fail("no answer within 60 s: explain_timeout (5 s) was not applied")
            assert r.status_code == 504 and "30000 instance(s)" in r.json()["error"], r.text
            r = httpx.post(f"{url}/v1/models/iris:explain", json=IRIS_V1, timeout=60)
            # A 200 within its own 5 s explain_timeout: the one worker was free again.
            assert r.status_code == 200, r.text

    async def test_configured_parameters_over_the_limit_fail_the_start(self, model_server: Process) -> None:
        service = ExplainerService(settings(model_name="iris", predictor_url=model_server.url, protocol="v2",
                                            background="dataset:iris", params={"nsamples": 500}, max_samples=100,
                                            warmup=False))
        await refused_start(service, SettingsError, r"the configured parameters: nsamples: 500 is over "
                                                             r"this server's limit of 100 \(max_samples\)")

    def test_auto_is_held_to_the_limit(self, model_server: Process) -> None:
        """`nsamples: "auto"` was taken whatever the limit: 21,080 model rows asked of the predictor
        for a limit of 100 (30 features: 2 * 30 + 2048 coalitions, each over 10 background rows)."""
        row = table("breast_cancer").rows[:1].tolist()
        service = ExplainerService(settings(model_name="cancer", predictor_url=model_server.url, protocol="v2",
                                            background="dataset:breast_cancer", options={"background_size": 10},
                                            params={"nsamples": 20}, max_samples=100, warmup=False))
        with serve(create_app(service)) as url:
            r = httpx.post(f"{url}/v1/models/cancer:explain", timeout=60,
                           json={"instances": row, "parameters": {"nsamples": "auto"}})
        assert r.status_code == 200 and r.json()["params"]["nsamples"] == 100, r.text

    async def test_a_default_auto_over_the_limit_starts_held_to_it(self, model_server: Process) -> None:
        """shap's own default: a wide model's `max_evals: auto` over the limit must neither fail the
        start nor refuse every request."""
        service = ExplainerService(settings(model_name="iris", predictor_url=model_server.url, protocol="v2",
                                            background="dataset:iris", method="permutation", max_samples=50,
                                            warmup=False))
        await service.start()
        try:
            explanation = await service.explain(table("iris").rows[:1], None)
        finally:
            await service.aclose()
        assert explanation.params["max_evals"] == 50


MARK = 7.77
"""A petal width no iris has: the predictor knows the rows of the request under test by it."""


class MarkedPredictor:
    """A V1 `iris` predictor (probabilities, 0.1 s a call) counting the calls about rows marked
    MARK (in their last column); a row holding 999 it refuses (400)."""

    def __init__(self) -> None:
        self.marked = 0
        self.app = FastAPI()

        @self.app.post("/v1/models/{name}:predict")
        async def predict(name: str, request: Request) -> Response:
            rows = np.asarray(orjson.loads(await request.body())["instances"], dtype=float)
            self.marked += bool((rows[:, 3] == MARK).any())
            await asyncio.sleep(0.1)
            if (rows == 999).any():
                return Response(b'{"error": "999 is no value"}', status_code=400, media_type="application/json")
            return Response(orjson.dumps({"predictions": estimator("iris").predict_proba(rows).tolist()}),
                            media_type="application/json")


@pytest.fixture(scope="module")
def marked() -> Iterator[tuple[MarkedPredictor, str]]:
    """Kernel SHAP over a MarkedPredictor: 64 rows are 8 chunks for 2 workers, ~70 predictor calls."""
    predictor = MarkedPredictor()
    with serve(predictor.app) as predictor_url:
        service = ExplainerService(settings(model_name="iris", predictor_url=predictor_url, protocol="v1",
                                            background="dataset:iris", params={"nsamples": 20}, workers=2,
                                            chunk_size=8))
        with serve(create_app(service)) as url:
            yield predictor, url


class TestWorkEndsWithItsRequest:
    """A request answered early (one chunk failed) or left by its client: its other chunks kept
    running on the workers, calling the predictor, and the next request waited behind them. At most
    the calls already sent by the two workers may follow the end."""

    async def test_a_failed_chunk_stops_the_others(self, marked: tuple[MarkedPredictor, str]) -> None:
        predictor, url = marked
        rows = [[999, 3.5, 1.4, MARK]] + [[5.1, 3.5, 1.4, MARK]] * 63
        async with httpx.AsyncClient(base_url=url, timeout=60) as client:
            r = await client.post("/v1/models/iris:explain", json={"instances": rows})
            assert r.status_code == 400 and "999 is no value" in r.json()["error"], r.text
            answered = predictor.marked
            # Served after whatever of the batch was still queued on the workers.
            assert (await client.post("/v1/models/iris:explain", json=IRIS_V1)).status_code == 200
        assert predictor.marked - answered <= 2

    @pytest.mark.parametrize("path", ["/v1/models/iris:explain", "/v2/models/iris/infer"])
    async def test_a_client_gone_stops_its_work(self, marked: tuple[MarkedPredictor, str], path: str) -> None:
        import socket

        from tests.waiting import until

        predictor, url = marked
        rows = [[5.1, 3.5, 1.4, MARK]] * 64
        body = orjson.dumps({"instances": rows} if path.startswith("/v1") else
                            {"inputs": [{"name": "input-0", "shape": [64, 4], "datatype": "FP64", "data": rows}]})
        before = predictor.marked
        with socket.create_connection(("127.0.0.1", int(url.rsplit(":", 1)[1]))) as client:
            client.sendall(f"POST {path} HTTP/1.1\r\nhost: x\r\ncontent-type: application/json\r\n"
                           f"content-length: {len(body)}\r\n\r\n".encode() + body)
            await until(lambda: predictor.marked > before, what="the explanation's first predictor call")
        gone = predictor.marked
        async with httpx.AsyncClient(base_url=url, timeout=60) as other:
            assert (await other.post("/v1/models/iris:explain", json=IRIS_V1)).status_code == 200
        assert predictor.marked - gone <= 2


def test_an_unexpected_error_is_a_json_500(switchable: tuple[SwitchablePredictor, str],
                                            monkeypatch: pytest.MonkeyPatch) -> None:
    """A bug is still answered in JSON (the traceback goes to the log), and the server goes on."""
    _, url = switchable

    async def broken(*args: object, **kwargs: object) -> object:
        raise ZeroDivisionError("a bug")

    monkeypatch.setattr(ExplainerService, "explain", broken)
    with httpx.Client(timeout=20) as client:  # one kept-alive connection: it was closed under the client
        r = client.post(f"{url}/v1/models/iris:explain", json=IRIS_V1)
        assert r.status_code == 500 and r.headers["content-type"] == "application/json"
        assert r.json() == {"error": "internal error in the explainer (ZeroDivisionError); see its log"}
        monkeypatch.undo()
        assert client.post(f"{url}/v1/models/iris:explain", json=IRIS_V1).status_code == 200


def test_a_body_over_the_limit_is_413(switchable: tuple[SwitchablePredictor, str]) -> None:
    _, url = switchable
    for body in (b"x" * 4097, iter([b"x" * 3000, b"x" * 3000])):  # a declared length, then chunks
        r = httpx.post(f"{url}/v1/models/iris:explain", content=body, timeout=20)
        assert r.status_code == 413
        assert r.json() == {"error": "the request body is larger than 4096 bytes (max_request_bytes)"}
    assert httpx.post(f"{url}/v1/models/iris:explain", json=IRIS_V1, timeout=20).status_code == 200


def test_a_body_over_the_limit_waiting_for_a_go_ahead_is_413_and_closed(
        switchable: tuple[SwitchablePredictor, str]) -> None:
    """Told to send (uvicorn's 100 Continue) it uploaded up to the limit first; refused before, and
    the connection kept, the server took the client's next request for body bytes: no answer."""
    import socket

    _, url = switchable
    with socket.create_connection(("127.0.0.1", int(url.rsplit(":", 1)[1])), timeout=10) as sock:
        sock.sendall(b"POST /v1/models/iris:explain HTTP/1.1\r\nhost: x\r\nexpect: 100-continue\r\n"
                     b"content-length: 5000\r\n\r\n")
        raw = b""
        while chunk := sock.recv(65536):
            raw += chunk
    assert raw.startswith(b"HTTP/1.1 413") and b"100 Continue" not in raw and b"connection: close" in raw.lower()


def test_a_dribbled_body_is_408_and_closed(switchable: tuple[SwitchablePredictor, str]) -> None:
    """A body sent a byte at a time held its connection (and what it had sent) for ever."""
    _, url = switchable
    raw = dribble(int(url.rsplit(":", 1)[1]), b"POST /v1/models/iris:explain HTTP/1.1\r\nhost: x\r\n"
                                              b"content-type: application/json\r\ncontent-length: 999\r\n\r\n", b" ")
    head, _, body = raw.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 408") and b"connection: close" in head
    assert orjson.loads(body) == {"error": "the request body did not arrive whole within 1 seconds (request_read_timeout)"}
    assert httpx.post(f"{url}/v1/models/iris:explain", json=IRIS_V1, timeout=20).status_code == 200


def test_metrics(switchable: tuple[SwitchablePredictor, str]) -> None:
    predictor, url = switchable
    assert httpx.post(f"{url}/v1/models/iris:explain", json=IRIS_V1, timeout=20).status_code == 200
    predictor.mode = "500"
    try:
        assert httpx.post(f"{url}/v1/models/iris:explain", json=IRIS_V1, timeout=20).status_code == 502
    finally:
        predictor.mode = "ok"
    text = httpx.get(f"{url}/metrics").text
    assert 'infer_logger_explainer_explain_seconds_count{protocol="v1"}' in text
    assert 'infer_logger_explainer_errors_total{status="502"}' in text
    assert "infer_logger_explainer_ready 1.0" in text
    requests = next(line for line in text.splitlines() if line.startswith("infer_logger_explainer_predictor_requests_total"))
    assert float(requests.split()[-1]) > 0
    for name in ("events_explained_total", "events_other_model_total", "events_evicted_total", "events_expired_total",
                 "events_waiting"):
        assert f"infer_logger_explainer_{name} " in text


def test_a_client_gone_mid_body_is_no_error_of_ours(switchable: tuple[SwitchablePredictor, str]) -> None:
    """It was logged with a traceback and counted as a 500."""
    import socket

    _, url = switchable

    def server_errors() -> float:
        line = next((x for x in httpx.get(f"{url}/metrics").text.splitlines()
                     if x.startswith('infer_logger_explainer_errors_total{status="500"}')), None)
        return 0.0 if line is None else float(line.split()[-1])

    before = server_errors()
    with socket.create_connection(("127.0.0.1", int(url.rsplit(":", 1)[1]))) as client:
        client.sendall(b"POST /v1/models/iris:explain HTTP/1.1\r\nhost: x\r\ncontent-type: application/json\r\n"
                       b"content-length: 1000\r\n\r\n{\"instances\": ")
        time.sleep(0.3)
    time.sleep(0.5)
    assert server_errors() == before
    assert httpx.post(f"{url}/v1/models/iris:explain", json=IRIS_V1, timeout=20).status_code == 200


def test_versioned_ready_and_metadata_and_unknown_routes(switchable: tuple[SwitchablePredictor, str]) -> None:
    """The Open Inference Protocol's versioned ready and metadata paths were 404, and an unknown
    path or method answered FastAPI's {"detail": ...}: the protocol's errors are {"error": ...}."""
    _, url = switchable
    ready = httpx.get(f"{url}/v2/models/iris/versions/1/ready", timeout=10)
    assert ready.status_code == 200 and ready.json()["ready"] is True, ready.text
    metadata = httpx.get(f"{url}/v2/models/iris/versions/1", timeout=10)
    assert metadata.status_code == 200 and metadata.json()["name"] == "iris", metadata.text
    assert httpx.get(f"{url}/v2/models/nope/versions/1", timeout=10).status_code == 404
    for method, path, status in [("GET", "/nope", 404), ("GET", "/v2/models/iris/versions/1/nope", 404),
                                 ("PUT", "/v2/models/iris/infer", 405)]:
        r = httpx.request(method, f"{url}{path}", timeout=10)
        assert r.status_code == status and isinstance(r.json()["error"], str), (path, r.text)
    assert 'errors_total{status="405"}' not in httpx.get(f"{url}/metrics", timeout=10).text

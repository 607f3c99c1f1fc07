"""The demo predictor's V2 endpoint over a socket: JSON and the binary tensor data extension, requested
outputs, 400s with a reason for every malformed body, and tritonclient as an independent client."""

from __future__ import annotations

import importlib.util
from typing import Any

import httpx
import numpy as np
import orjson
import pytest

from infer_logger import binary_tensors as bt
from tests.servers import Process

ROWS = np.array([[6.8, 2.8, 4.8, 1.4], [6.0, 3.4, 4.5, 1.6], [5.1, 3.5, 1.4, 0.2]])


def infer(url: str, content: bytes, headers: dict[str, str], model: str = "iris") -> httpx.Response:
    return httpx.post(f"{url}/v2/models/{model}/infer", content=content, headers=headers, timeout=10)


def binary_request(rows: np.ndarray, datatype: str = "FP32", **extra: Any) -> tuple[bytes, dict[str, str]]:
    tensor = {"name": "input-0", "shape": list(rows.shape), "datatype": datatype}
    doc = {"id": "b-1", "inputs": [tensor], **extra}
    if datatype == "BF16":  # numpy has no bfloat16
        return bt.encode(doc, "inputs", {"input-0": bt.pack_values("BF16", rows.ravel().tolist())})
    return bt.encode(doc, "inputs", {"input-0": np.ascontiguousarray(rows, bt.NUMPY_DTYPES[datatype])})


def outputs(r: httpx.Response) -> dict[str, np.ndarray]:
    """Every output as an array, whether it came as JSON or binary."""
    assert r.status_code == 200, r.text
    doc, raw = bt.decode(r.content, r.headers.get(bt.HEADER), "outputs")
    return {o["name"]: (np.frombuffer(raw[o["name"]], bt.NUMPY_DTYPES[o["datatype"]]) if o["name"] in raw
                        else np.asarray(o["data"])).reshape(o["shape"]) for o in doc["outputs"]}


@pytest.fixture(scope="module")
def expected(iris_predictor: Process) -> dict[str, np.ndarray]:
    r = httpx.post(f"{iris_predictor.url}/v2/models/iris/infer", timeout=10, json={
        "inputs": [{"name": "input-0", "shape": [3, 4], "datatype": "FP64", "data": ROWS.tolist()}]})
    return outputs(r)


class TestBinaryTensorData:
    """Binary inputs give the JSON answers; binary outputs only when asked, per output or for all."""

    @pytest.mark.parametrize("datatype", ["FP32", "FP64", "FP16", "BF16"])
    def test_binary_inputs_json_outputs(self, iris_predictor: Process, expected: dict[str, np.ndarray],
                                        datatype: str) -> None:
        r = infer(iris_predictor.url, *binary_request(ROWS, datatype))
        assert r.headers["content-type"] == "application/json" and bt.HEADER not in r.headers
        assert r.json()["id"] == "b-1"
        got = outputs(r)
        assert set(got) == {"predict", "predict_proba"}
        np.testing.assert_array_equal(got["predict"], expected["predict"])
        np.testing.assert_allclose(got["predict_proba"], expected["predict_proba"], atol=0.05)

    def test_all_outputs_binary(self, iris_predictor: Process, expected: dict[str, np.ndarray]) -> None:
        r = infer(iris_predictor.url, *binary_request(ROWS, "FP64", parameters={"binary_data_output": True}))
        assert r.headers["content-type"] == bt.CONTENT_TYPE and int(r.headers[bt.HEADER]) < len(r.content)
        doc, raw = bt.decode(r.content, r.headers[bt.HEADER], "outputs")
        assert [(o["name"], o["datatype"], o["shape"]) for o in doc["outputs"]] == [
            ("predict", "INT64", [3]), ("predict_proba", "FP64", [3, 3])]
        assert all("data" not in o for o in doc["outputs"]) and set(raw) == {"predict", "predict_proba"}
        got = outputs(r)
        np.testing.assert_array_equal(got["predict"], expected["predict"])
        np.testing.assert_array_equal(got["predict_proba"], expected["predict_proba"])

    def test_requested_outputs_only(self, iris_predictor: Process, expected: dict[str, np.ndarray]) -> None:
        asked = {"outputs": [{"name": "predict_proba", "parameters": {"binary_data": True}}]}
        got = outputs(infer(iris_predictor.url, *binary_request(ROWS, "FP64", **asked)))
        assert list(got) == ["predict_proba"]
        np.testing.assert_array_equal(got["predict_proba"], expected["predict_proba"])
        # A JSON request may ask for binary outputs too, and one output may stay JSON.
        r = httpx.post(f"{iris_predictor.url}/v2/models/iris/infer", timeout=10, json={
            "inputs": [{"name": "input-0", "shape": [3, 4], "datatype": "FP64",
                        "data": ROWS.ravel().tolist()}],
            "parameters": {"binary_data_output": True},
            "outputs": [{"name": "predict", "parameters": {"binary_data": False}},
                        {"name": "predict_proba"}]})
        doc, raw = bt.decode(r.content, r.headers[bt.HEADER], "outputs")
        assert doc["outputs"][0]["data"] == expected["predict"].tolist() and set(raw) == {"predict_proba"}

    def test_json_without_content_type(self, iris_predictor: Process,
                                       expected: dict[str, np.ndarray]) -> None:
        body = orjson.dumps({"inputs": [{"name": "input-0", "shape": [3, 4], "datatype": "FP64",
                                         "data": ROWS.tolist()}]})
        request = httpx.Request("POST", f"{iris_predictor.url}/v2/models/iris/infer", content=body)
        assert "content-type" not in request.headers
        with httpx.Client(timeout=10) as client:
            got = outputs(client.send(request))
        np.testing.assert_array_equal(got["predict"], expected["predict"])

    def test_echo_keeps_integers_and_text(self, echo_predictor: Process) -> None:
        rows = np.array([[7, 1, 2, 3], [-9, 4, 5, 6]])
        all_binary = {"parameters": {"binary_data_output": True}}
        got = outputs(infer(echo_predictor.url, *binary_request(rows, "INT64", **all_binary), model="echo"))
        assert got["predict"].dtype == np.int64 and got["predict"].tolist() == [7, -9]
        body, headers = bt.encode(
            {"inputs": [{"name": "t", "shape": [1, 4], "datatype": "BYTES"}], **all_binary},
            "inputs", {"t": bt.pack_values("BYTES", ["a", "b", "c", "d"])})
        r = infer(echo_predictor.url, body, headers, model="echo")
        doc, raw = bt.decode(r.content, r.headers[bt.HEADER], "outputs")
        assert doc["outputs"][0]["datatype"] == "BYTES"
        assert bt.unpack_values("BYTES", raw["predict"]) == [b"a"]


class TestRefusals:
    """Malformed bodies answer 400 with a JSON reason, never 500."""

    def refused(self, url: str, content: bytes, headers: dict[str, str], *words: str) -> None:
        r = infer(url, content, headers)
        assert r.status_code == 400, r.text
        assert all(w in r.json()["error"] for w in words), r.json()

    def test_framing_faults(self, iris_predictor: Process) -> None:
        body, headers = binary_request(ROWS)
        url = iris_predictor.url
        self.refused(url, body, {"content-type": bt.CONTENT_TYPE}, bt.HEADER)  # header missing
        self.refused(url, body, {**headers, bt.HEADER: str(len(body) + 5)}, "body has only")
        self.refused(url, body[:-4], headers, "'input-0'", "runs past the end")
        self.refused(url, body + b"\0" * 4, headers, "4 bytes after")
        head = orjson.dumps({"inputs": [{"name": "input-0", "shape": [3, 4], "datatype": "FP32",
                                         "parameters": {"binary_data_size": 40}}]})
        self.refused(url, head + b"\0" * 40, {bt.HEADER: str(len(head))}, "'input-0'", "48 expected")
        head = head.replace(b"FP32", b"REAL")
        self.refused(url, head + b"\0" * 40, {bt.HEADER: str(len(head))}, "'REAL' is not one of")

    def test_content_faults(self, iris_predictor: Process) -> None:
        url = iris_predictor.url
        self.refused(url, *binary_request(ROWS[:, :3]), "expected shape [n, 4]")
        self.refused(url, *binary_request(ROWS, outputs=[{"name": "logits"}]), "no output 'logits'")
        text, headers = bt.encode({"inputs": [{"name": "input-0", "shape": [1, 4], "datatype": "BYTES"}]},
                                  "inputs", {"input-0": bt.pack_values("BYTES", ["a", "b", "c", "d"])})
        self.refused(url, text, headers, "the model refused the input")
        fp16 = orjson.dumps({"inputs": [{"name": "input-0", "shape": [1, 4], "datatype": "FP16",
                                         "data": [1, 2, 3, 4]}]})
        self.refused(url, fp16, {"content-type": "application/json"}, "FP16", "binary data")


@pytest.mark.skipif(importlib.util.find_spec("tritonclient") is None,
                    reason="tritonclient[http] is not installed (not in the test extra: it pulls in gevent)")
class TestTritonClient:
    """tritonclient in its default binary mode (and in JSON mode, which sends no Content-Type)."""

    @pytest.mark.parametrize("binary", [True, False])
    def test_infer(self, iris_predictor: Process, expected: dict[str, np.ndarray], binary: bool) -> None:
        import tritonclient.http as triton

        client = triton.InferenceServerClient(url=iris_predictor.url.removeprefix("http://"))
        try:
            assert client.is_server_live() and client.is_model_ready("iris")
            assert "binary_tensor_data" in client.get_server_metadata()["extensions"]
            tensor = triton.InferInput("input-0", list(ROWS.shape), "FP32")
            tensor.set_data_from_numpy(ROWS.astype(np.float32), binary_data=binary)
            result = client.infer("iris", [tensor], request_id="t-1", outputs=[
                triton.InferRequestedOutput("predict_proba", binary_data=binary)])
            assert result.get_response()["id"] == "t-1"
            np.testing.assert_allclose(result.as_numpy("predict_proba"), expected["predict_proba"], atol=0.05)
            assert result.as_numpy("predict") is None  # only the requested output
        finally:
            client.close()

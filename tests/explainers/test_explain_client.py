"""The predictor client: V1 and V2 against real servers, batching, retries, the skip-logging header,
binary tensor data and the fall back to JSON."""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import logging
import threading
import time
from collections.abc import Awaitable, Iterator
from concurrent.futures import ThreadPoolExecutor
from typing import Any, TypeVar

import numpy as np
import orjson
import pytest
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, Response, StreamingResponse

from explainers.client import PredictorClient, schema_from_metadata
from explainers.codecs import Schema
from explainers.deadline import Deadline
from explainers.errors import ExplainTimeoutError, PredictorError
from infer_logger import binary_tensors as bt
from infer_logger.testing import free_port
from tests.explainers.conftest import serve
from tests.explainers.models import estimator, table
from tests.servers import Process, Scripted

IRIS = Schema(tuple(table("iris").feature_names))
T = TypeVar("T")


async def within_guard(pending: Awaitable[T], what: str) -> T:
    """`pending`, or a failure naming `what` if still waiting after 60 s: a hang guard, not a timing."""
    try:
        return await asyncio.wait_for(pending, 60)
    except TimeoutError:
        pytest.fail(f"still waiting after 60 s: {what}")


class Recorder:
    """A V1 predictor answering the sum of each row, after `fail` 503s; it records every request."""

    def __init__(self, fail: int = 0) -> None:
        self.fail = fail
        self.requests: list[tuple[dict[str, str], int]] = []
        self.app = FastAPI()

        @self.app.post("/v1/models/{name}:predict")
        async def predict(name: str, request: Request) -> Any:
            body = await request.json()
            self.requests.append((dict(request.headers), len(body["instances"])))
            if self.fail > 0:
                self.fail -= 1
                return JSONResponse({"error": "busy"}, status_code=503)
            return {"predictions": [sum(row) for row in body["instances"]]}


class V2Recorder:
    """A V2 predictor answering each row's sum as `sum`; it records every request's headers and body.

    `binary`: "full" reads binary inputs and answers binary when asked; "json-answer" reads them but
    always answers JSON; "refuse" takes JSON only and answers `refuse_status` to anything else.
    `datatype`: the datatype of `sum` (BF16, as Triton has it: no numpy dtype).
    """

    def __init__(self, binary: str = "full", refuse_status: int = 400, datatype: str = "FP64") -> None:
        self.requests: list[tuple[dict[str, str], dict[str, Any]]] = []
        self.app = FastAPI()

        @self.app.post("/v2/models/{name}/infer")
        async def infer(name: str, request: Request) -> Any:
            header = request.headers.get(bt.HEADER)
            if binary == "refuse" and (header or request.headers.get("content-type") == bt.CONTENT_TYPE):
                return JSONResponse({"error": "the body is not JSON"}, status_code=refuse_status)
            doc, raw = bt.decode(await request.body(), header, "inputs")
            self.requests.append((dict(request.headers), doc))
            [tensor] = doc["inputs"]
            if tensor["name"] in raw and tensor["datatype"] == "BF16":  # the high half of an FP32
                rows = (np.frombuffer(raw[tensor["name"]], "<u2").astype("<u4") << 16).view("<f4")
            elif tensor["name"] in raw:
                rows = np.frombuffer(raw[tensor["name"]], bt.NUMPY_DTYPES[tensor["datatype"]])
            else:
                rows = np.asarray(tensor["data"], dtype=float)
            if (rows < 0).any():
                return JSONResponse({"error": "negative values"}, status_code=400)
            sums = rows.reshape(tensor["shape"]).sum(axis=1)
            outputs = [{"name": "sum", "shape": [len(sums)], "datatype": datatype, "data": sums.tolist()},
                       {"name": "count", "shape": [len(sums)], "datatype": "INT64", "data": [3] * len(sums)}]
            wanted = {o["name"] for o in doc.get("outputs") or []}
            outputs = [o for o in outputs if not wanted or o["name"] in wanted]
            as_binary = {o["name"]: _bf16(o["data"]) if o["datatype"] == "BF16"
                         else np.asarray(o["data"], bt.NUMPY_DTYPES[o["datatype"]])
                         for o in outputs if binary == "full" and bt.wants_binary(doc, o["name"])}
            if datatype == "BF16":  # written as Triton writes it, not by the code under test
                body, headers = _by_hand(outputs, as_binary)
            else:
                body, headers = bt.encode({"outputs": outputs}, "outputs", as_binary)
            return Response(body, headers=headers)


def _bf16(values: list[float]) -> np.ndarray:
    """BF16 as Triton writes it: each FP32's high 16 bits (these values need no rounding)."""
    return (np.asarray(values, "<f4").view("<u4") >> 16).astype("<u2")


def _by_hand(outputs: list[dict[str, Any]], binary: dict[str, np.ndarray]) -> tuple[bytes, dict[str, str]]:
    """A V2 answer whose `binary` outputs go as binary data after the JSON part."""
    tensors, chunks = [], []
    for output in outputs:
        if output["name"] in binary:
            chunks.append(binary[output["name"]].tobytes())
            output = {"name": output["name"], "shape": output["shape"], "datatype": output["datatype"],
                      "parameters": {"binary_data_size": len(chunks[-1])}}
        tensors.append(output)
    head = orjson.dumps({"outputs": tensors})
    if not chunks:
        return head, {"content-type": "application/json"}
    return head + b"".join(chunks), {bt.HEADER: str(len(head)), "content-type": bt.CONTENT_TYPE}


def sent(request: tuple[dict[str, str], dict[str, Any]]) -> tuple[str, str, list[str]]:
    """How a recorded request travelled: content type, input datatype, and the outputs it named."""
    headers, doc = request
    return (headers.get("content-type", ""), doc["inputs"][0]["datatype"],
            [o["name"] for o in doc.get("outputs") or []])


async def started_v2(url: str, datatype: str = "FP32", **options: Any) -> PredictorClient:
    client = await started(url, "m", protocol="v2", **options)
    client.schema = Schema(("a", "b", "c"), datatype=datatype)
    return client


@pytest.fixture
def recorder() -> Iterator[tuple[Recorder, str]]:
    rec = Recorder()
    with serve(rec.app) as url:
        yield rec, url


async def started(url: str, model: str, **options: Any) -> PredictorClient:
    client = PredictorClient(url, model, **options)
    await client.start()
    return client


class TestAgainstThePredictor:
    """Real V1 and V2 calls to the predictor process give the model's outputs."""

    async def test_v1_and_v2(self, model_server: Process) -> None:
        rows = table("iris").rows[:5]
        expected = estimator("iris").predict_proba(rows)
        v1 = await started(model_server.url, "iris-proba", protocol="v1")
        v2 = await started(model_server.url, "iris", protocol="v2")
        try:
            v2.schema = schema_from_metadata(await v2.metadata(), IRIS)
            assert v2.schema.tensor == "input-0" and v2.schema.feature_names == IRIS.feature_names
            np.testing.assert_allclose(await v1.predict(rows), expected)
            np.testing.assert_allclose(await v2.predict(rows), expected)  # the predict_proba output
            assert await v1.metadata() is None
        finally:
            await v1.aclose()
            await v2.aclose()


class TestSchemaFromMetadata:
    """Metadata whose inputs are not tensor objects leaves the configured layout (the start failed
    with an AttributeError traceback)."""

    def test_odd_inputs_fall_back(self) -> None:
        for inputs in (["input-0"], [7, {"name": "a"}], [None]):
            assert schema_from_metadata({"inputs": inputs}, IRIS) is IRIS
        for shape in ("[-1, 4]", 4, None, {"a": 1}):
            schema = schema_from_metadata({"inputs": [{"name": "x", "shape": shape}]}, IRIS)
            assert schema.feature_names == IRIS.feature_names and schema.tensor == "x"


    def test_a_feature_named_twice_is_refused(self) -> None:
        """Attributions are keyed by name: one of the two was lost."""
        named = {"inputs": [{"name": "input-0", "shape": [-1, 4]}],
                 "parameters": {"feature_names": ["a", "b", "a", "c"]}}
        with pytest.raises(PredictorError, match=r"names feature\(s\) 'a' more than once \(parameters.feature_names\)"):
            schema_from_metadata(named, IRIS)
        tensors = {"inputs": [{"name": "a", "shape": [-1]}, {"name": "a", "shape": [-1]}]}
        with pytest.raises(PredictorError, match=r"'a' more than once \(inputs\)"):
            schema_from_metadata(tensors, IRIS)

    def test_per_feature_tensors_keep_their_datatypes(self) -> None:
        """Each was sent as FP64 whatever the metadata said: a strict server (Triton) refused them."""
        inputs = [{"name": "island", "datatype": "BYTES", "shape": [-1]},
                  {"name": "bill", "datatype": "FP32", "shape": [-1, 1]},
                  {"name": "year", "datatype": "INT64", "shape": [-1, 1]}]
        schema = schema_from_metadata({"inputs": inputs}, IRIS)
        assert schema.tensor is None and schema.categorical == {"island"}
        assert [schema.datatype_of(j) for j in range(3)] == ["BYTES", "FP32", "INT64"]

    def test_per_feature_tensors_keep_their_shapes(self) -> None:
        """Each was sent as `[n]`: a strict server refused the `[-1, 1]` its metadata declared.
        A size other than 1 after the first is not one feature's: sent as `[n]`, as before."""
        inputs = [{"name": "a", "shape": [-1, 1]}, {"name": "b", "shape": [-1]}, {"name": "c", "shape": [-1, -1, 1]},
                  {"name": "d", "shape": [-1, 3]}, {"name": "e", "shape": "[-1, 1]"}, {"name": "f"}]
        schema = schema_from_metadata({"inputs": inputs}, IRIS)
        assert schema.shapes == ((1,), (), (1, 1), (), (), ())


class TestPerFeatureTensors:
    """One tensor per feature is sent in the shape the metadata gives it (`[-1, 1]`: `[n, 1]`)."""

    async def test_a_strict_predictor_gets_its_shapes(self) -> None:
        """Each went as `[n]`: a strict predictor (Triton) refused them all, and the explainer never started."""
        declared = {"a": [-1, 1], "b": [-1], "c": [-1, 1, 1]}

        def reply(request: bytes) -> bytes:
            head, body = request.split(b"\r\n\r\n", 1)
            length = next((line.split(b":")[1].strip().decode() for line in head.split(b"\r\n")
                           if line.lower().startswith(bt.HEADER.encode())), None)
            doc, raw = bt.decode(body, length, "inputs")
            columns = []
            for tensor in doc["inputs"]:
                n, *rest = tensor["shape"]
                if rest != declared[tensor["name"]][1:]:
                    return _http(400, orjson.dumps({"error": f"unexpected shape for input {tensor['name']!r}: "
                                                             f"{tensor['shape']}"}))
                values = (np.frombuffer(raw[tensor["name"]], bt.NUMPY_DTYPES[tensor["datatype"]])
                          if tensor["name"] in raw else np.asarray(tensor["data"], dtype=float))
                columns.append(values.astype(float).reshape(n))
            sums = np.sum(columns, axis=0).tolist()
            return _http_200(orjson.dumps({"outputs": [{"name": "sum", "shape": [len(sums)], "datatype": "FP64",
                                                        "data": sums}]}))

        metadata = {"inputs": [{"name": name, "datatype": "FP32", "shape": shape} for name, shape in declared.items()]}
        async with Scripted(reply) as url:
            for binary in (True, False):
                client = await started(url, "m", protocol="v2", retries=0, binary_data=binary)
                client.schema = schema_from_metadata(metadata, IRIS)
                try:
                    rows = np.array([[1.0, 2.0, 3.0], [4.0, 5.0, 6.0]])
                    assert (await client.predict(rows)).tolist() == [6.0, 15.0]
                    assert (await asyncio.to_thread(client.predict_blocking, rows[1:])).tolist() == [15.0]
                finally:
                    await client.aclose()
                assert client.binary_data is binary


class TestBinaryData:
    """V2 rows go as binary tensor data with binary outputs asked for; JSON answers are read too; a
    predictor that refuses binary data gets JSON, once told."""

    async def test_binary_both_ways(self) -> None:
        rec = V2Recorder()
        with serve(rec.app) as url:
            client = await started_v2(url)
            try:
                rows = np.array([[1.0, 2.0, 3.5], [4.0, 5.0, 6.0]])
                np.testing.assert_allclose(await client.predict(rows), [6.5, 15.0])
                np.testing.assert_allclose(await client.predict(rows[:1]), [6.5])
            finally:
                await client.aclose()
        # The output explained (the first: none is named *proba*) is asked for alone once known.
        assert [sent(r) for r in rec.requests] == [(bt.CONTENT_TYPE, "FP32", []),
                                                   (bt.CONTENT_TYPE, "FP32", ["sum"])]
        assert rec.requests[0][1]["parameters"] == {"binary_data_output": True}
        assert rec.requests[0][0]["x-skip-logging"] == "true" and client.binary_data

    @pytest.mark.parametrize("binary", [True, False])
    async def test_bf16_outputs_and_inputs(self, binary: bool) -> None:
        """A Triton-like predictor answering its BF16 output as binary data, as asked: the client
        failed ("datatype 'BF16' is not one of ..."), and, not refused, never fell back to JSON."""
        rec = V2Recorder(datatype="BF16")
        rows = np.array([[1.0, 2.0, 0.140625], [0.25, 0.25, 0.5]])  # sums 3.140625 and 1.0, exact in BF16
        with serve(rec.app) as url:
            for datatype in ("FP32", "BF16"):  # the inputs as the metadata says, BF16 too
                client = await started_v2(url, datatype=datatype, binary_data=binary)
                try:
                    assert (await client.predict(rows)).tolist() == [3.140625, 1.0]
                    assert (await client.predict(rows[1:])).tolist() == [1.0]
                finally:
                    await client.aclose()
                assert client.binary_data is binary
        content = bt.CONTENT_TYPE if binary else "application/json"
        assert [sent(r) for r in rec.requests] == [
            (content, "FP32", []), (content, "FP32", ["sum"]), (content, "BF16", []), (content, "BF16", ["sum"])]

    async def test_json_answer_to_a_binary_request(self) -> None:
        rec = V2Recorder(binary="json-answer")
        with serve(rec.app) as url:
            client = await started_v2(url)
            try:
                np.testing.assert_allclose(await client.predict(np.ones((4, 3))), [3.0] * 4)
            finally:
                await client.aclose()
        assert sent(rec.requests[0])[0] == bt.CONTENT_TYPE and client.binary_data

    @pytest.mark.parametrize("status", [400, 415])
    async def test_falls_back_to_json_once(self, status: int, caplog: pytest.LogCaptureFixture) -> None:
        rec = V2Recorder(binary="refuse", refuse_status=status)
        with serve(rec.app) as url:
            client = await started_v2(url, retries=3)
            try:
                with caplog.at_level(logging.WARNING, logger="explainers.client"):
                    np.testing.assert_allclose(await client.predict(np.ones((2, 3))), [3.0, 3.0])
                    np.testing.assert_allclose(await client.predict(np.zeros((1, 3))), [0.0])
            finally:
                await client.aclose()
        assert client.requests == 3 and not client.binary_data  # refused once, then JSON only
        assert [sent(r) for r in rec.requests] == [("application/json", "FP32", []),
                                                   ("application/json", "FP32", ["sum"])]
        [record] = caplog.records
        assert f"answered {status}" in record.getMessage() and "JSON from now on" in record.getMessage()

    async def test_a_refusal_of_the_rows_keeps_binary(self) -> None:
        rec = V2Recorder()
        with serve(rec.app) as url:
            client = await started_v2(url)
            try:
                with pytest.raises(PredictorError, match="answered 400: .*negative values"):
                    await client.predict(-np.ones((1, 3)))
            finally:
                await client.aclose()
        assert client.binary_data and client.requests == 2  # binary, then JSON to tell the causes apart

    async def test_switched_off(self) -> None:
        rec = V2Recorder()
        with serve(rec.app) as url:
            client = await started_v2(url, binary_data=False, datatype="FP64")
            try:
                np.testing.assert_allclose(await client.predict(np.ones((2, 3))), [3.0, 3.0])
            finally:
                await client.aclose()
        assert sent(rec.requests[0]) == ("application/json", "FP64", [])
        assert not PredictorClient("http://x", "m", protocol="v1").binary_data  # V2 only

    async def test_the_demo_predictor_both_ways(self, model_server: Process) -> None:
        rows = table("iris").rows[:50]
        expected = estimator("iris").predict_proba(rows)
        for binary in (True, False):
            client = await started(model_server.url, "iris", protocol="v2", binary_data=binary)
            try:
                client.schema = schema_from_metadata(await client.metadata(), IRIS)
                np.testing.assert_allclose(await client.predict(rows), expected)
                np.testing.assert_allclose(await client.predict(rows[:2]), expected[:2])
                assert client.binary_data is binary and client._picked == "predict_proba"
            finally:
                await client.aclose()


class TestBatching:
    """Few requests for many rows; every request says x-skip-logging."""

    async def test_large_calls_split_small_calls_merge(self, recorder: tuple[Recorder, str]) -> None:
        rec, url = recorder
        client = await started(url, "m", protocol="v1", max_batch_rows=100, linger=0.01)
        try:
            big = np.ones((250, 3))
            np.testing.assert_allclose(await client.predict(big), 3.0)
            assert sorted(n for _, n in rec.requests) == [50, 100, 100]
            rec.requests.clear()
            smalls = [np.full((2, 3), float(i)) for i in range(20)]
            results = await asyncio.gather(*(client.predict(s) for s in smalls))
            assert [r.tolist() for r in results] == [[3.0 * i] * 2 for i in range(20)]
            assert len(rec.requests) < 5 and sum(n for _, n in rec.requests) == 40
            assert all(h.get("x-skip-logging") == "true" for h, _ in rec.requests)
        finally:
            await client.aclose()

    async def test_blocking_calls_from_threads(self, recorder: tuple[Recorder, str]) -> None:
        _, url = recorder
        client = await started(url, "m", protocol="v1")
        try:
            out = await asyncio.to_thread(client.predict_blocking, np.ones((3, 2)))
            assert out.tolist() == [2.0, 2.0, 2.0]
            with pytest.raises(RuntimeError, match="deadlock"):
                client.predict_blocking(np.ones((1, 2)))
        finally:
            await client.aclose()


class TestFromWorkerThreads:
    """With linger 0 a worker thread sends its calls itself, over its own connection: the same
    splitting, retries and fall back to JSON; with linger > 0 its calls go to the loop, to be merged."""

    async def test_own_connection_retried_and_big_calls_split(self) -> None:
        rec = Recorder(fail=1)
        with serve(rec.app) as url:
            client = await started(url, "m", protocol="v1", max_batch_rows=100, retries=1, backoff=0.01)
            try:
                out = await asyncio.to_thread(client.predict_blocking, np.ones((80, 3)))
                assert out.shape == (80,) and set(out.tolist()) == {3.0}
                assert [n for _, n in rec.requests] == [80, 80]  # the first one answered 503
                rec.requests.clear()
                out = await asyncio.to_thread(client.predict_blocking, np.ones((250, 3)))  # through the loop
                assert out.shape == (250,) and sorted(n for _, n in rec.requests) == [50, 100, 100]
            finally:
                await client.aclose()
        assert all(h.get("x-skip-logging") == "true" for h, _ in rec.requests)

    async def test_a_connection_the_predictor_closed_is_replaced(self) -> None:
        from infer_logger.demo.quickstart import ServerThread
        from infer_logger.server import uvicorn_config

        rec = Recorder()
        config = uvicorn_config(rec.app, "127.0.0.1", free_port())
        config.timeout_keep_alive = 0.05  # closes idle connections quickly
        with ServerThread(config):
            client = await started(f"http://127.0.0.1:{config.port}", "m", protocol="v1", retries=0)
            connection, connects = client._connection, []

            def counted(slot: str) -> Any:
                found = connection(slot)
                connects.append(found[1])
                return found

            client._connection = counted  # type: ignore[method-assign]
            worker = ThreadPoolExecutor(1)  # one thread: its connection is kept, then found closed
            try:
                for _ in range(2):
                    out = await asyncio.get_running_loop().run_in_executor(
                        worker, client.predict_blocking, np.ones((1, 2)))
                    assert out.tolist() == [2.0]
                    await asyncio.sleep(0.3)
            finally:
                worker.shutdown()
                await client.aclose()
        assert len(rec.requests) == 2 and client.requests == 2
        assert connects == [False, True, False]  # new, kept (found closed), new

    @pytest.mark.parametrize("status", [400, 422])
    async def test_falls_back_to_json_once(self, status: int) -> None:
        rec = V2Recorder(binary="refuse", refuse_status=status)
        with serve(rec.app) as url:
            client = await started_v2(url)
            try:
                for rows in (np.ones((2, 3)), np.zeros((1, 3))):
                    out = await asyncio.to_thread(client.predict_blocking, rows)
                    assert out.tolist() == rows.sum(axis=1).tolist()
            finally:
                await client.aclose()
        assert client.requests == 3 and not client.binary_data
        assert [sent(r)[0] for r in rec.requests] == ["application/json"] * 2

    async def test_gives_up_with_the_reason(self) -> None:
        client = await started(f"http://127.0.0.1:{free_port()}", "m", protocol="v1", retries=1, backoff=0.01)
        try:
            with pytest.raises(PredictorError, match="failed after 2 attempts: ConnectionRefusedError"):
                await asyncio.to_thread(client.predict_blocking, np.ones((1, 2)))
        finally:
            await client.aclose()

    @pytest.mark.parametrize("ahead", [False, True])
    async def test_an_interim_answer_is_not_taken_for_the_answer(self, ahead: bool) -> None:
        """A predictor answering 103 Early Hints before its 200: http.client returned the 103 as the
        answer and left the 200 on the kept-alive connection, for the next request to read as its
        own (wrong attributions, answered 200)."""
        def reply(request: bytes) -> bytes:
            rows = orjson.loads(request.split(b"\r\n\r\n", 1)[1])["instances"]
            hints = b"HTTP/1.1 103 Early Hints\r\nlink: </style.css>; rel=preload\r\n\r\n"
            return hints + _http_200(orjson.dumps({"predictions": [sum(row) for row in rows]}))

        scripted = Scripted(reply)
        async with scripted as url:
            client = await started(url, "m", protocol="v1", retries=0)

            def explain_each(firsts: list[list[float]]) -> list[list[float]]:  # one thread: one connection
                answers = []
                for first in firsts:
                    rows = np.array([first, [0.0, 0.0]])
                    with client.asking_ahead(rows) if ahead else contextlib.nullcontext():
                        answers.append(client.predict_blocking(rows[:1]).tolist())
                return answers

            try:
                assert await asyncio.to_thread(explain_each, [[1.0, 2.0], [5.0, 5.0], [7.0, 1.0]]) == [
                    [3.0], [10.0], [8.0]]
            finally:
                await client.aclose()
        assert client.requests == 3 and scripted.connections == 1  # kept alive, ahead or not

    async def test_linger_merges_through_the_loop(self, recorder: tuple[Recorder, str]) -> None:
        rec, url = recorder
        client = await started(url, "m", protocol="v1", linger=0.05)
        try:
            outs = await asyncio.gather(*(asyncio.to_thread(client.predict_blocking, np.full((1, 2), float(i)))
                                          for i in range(4)))
            assert [o.tolist() for o in outs] == [[2.0 * i] for i in range(4)]
        finally:
            await client.aclose()
        assert len(rec.requests) < 4 and sum(n for _, n in rec.requests) == 4


class TestAhead:
    """Rows asked ahead by a worker thread, in one request: calls for one of them alone are answered
    from it within the block; other calls, and a failed request, are made as usual."""

    async def test_rows_alone_answered_from_the_request_ahead(self, recorder: tuple[Recorder, str]) -> None:
        rec, url = recorder
        client = await started(url, "m", protocol="v1")
        rows = np.array([[1.0, 2.0], [3.0, 4.0], [1.0, 2.0]])

        def explain() -> list[list[float]]:
            with client.asking_ahead(rows):
                assert [n for _, n in rec.requests] in ([], [3])  # sent, perhaps not answered yet
                alone = [client.predict_blocking(rows[i:i + 1]).tolist() for i in (1, 0)]
                assert [n for _, n in rec.requests] == [3]
                # Only rows alone, and only these rows, are answered from it.
                alone.append(client.predict_blocking(rows[:2]).tolist())
                alone.append(client.predict_blocking(np.array([[5.0, 5.0]])).tolist())
            alone.append(client.predict_blocking(rows[:1]).tolist())
            return alone

        try:
            assert await asyncio.to_thread(explain) == [[7.0], [3.0], [3.0, 7.0], [10.0], [3.0]]
        finally:
            await client.aclose()
        assert [n for _, n in rec.requests] == [3, 2, 1, 1] and client.requests == 4

    async def test_a_failed_request_ahead_leaves_the_call_as_usual(self) -> None:
        rec = Recorder(fail=1)
        with serve(rec.app) as url:
            client = await started(url, "m", protocol="v1", retries=1, backoff=0.01)

            def explain() -> list[float]:
                with client.asking_ahead(np.ones((2, 2))):
                    out: list[float] = client.predict_blocking(np.ones((1, 2))).tolist()
                    return out

            try:
                assert await asyncio.to_thread(explain) == [2.0]
            finally:
                await client.aclose()
        assert [n for _, n in rec.requests] == [2, 1]  # the request ahead got a 503

    async def test_an_answer_nobody_asked_for_is_not_awaited(self, recorder: tuple[Recorder, str]) -> None:
        _, url = recorder
        client = await started(url, "m", protocol="v1")

        def explain() -> list[float]:
            with client.asking_ahead(np.ones((2, 2))):
                pass
            assert getattr(client._lanes, "ahead_connection", None) is None  # dropped, not read
            out: list[float] = client.predict_blocking(np.ones((1, 2))).tolist()
            return out

        try:
            assert await asyncio.to_thread(explain) == [2.0] and client.requests == 2
        finally:
            await client.aclose()

    async def test_text_rows_are_not_asked_ahead(self, recorder: tuple[Recorder, str]) -> None:
        rec, url = recorder
        client = await started(url, "m", protocol="v1")

        def explain() -> None:
            with client.asking_ahead(np.array([["a", 1.0]], dtype=object)):
                pass

        try:
            await asyncio.to_thread(explain)
            assert rec.requests == [] and client.requests == 0
        finally:
            await client.aclose()


class TestFailures:
    """Retries with backoff, then a PredictorError that says why."""

    async def test_retries_busy_predictor(self) -> None:
        rec = Recorder(fail=2)
        with serve(rec.app) as url:
            client = await started(url, "m", protocol="v1", retries=2, backoff=0.01)
            try:
                assert (await client.predict(np.ones((1, 2)))).tolist() == [2.0]
                assert len(rec.requests) == 3
            finally:
                await client.aclose()

    async def test_gives_up_with_the_reason(self) -> None:
        rec = Recorder(fail=10)
        with serve(rec.app) as url:
            client = await started(url, "m", protocol="v1", retries=1, backoff=0.01)
            try:
                with pytest.raises(PredictorError, match="after 2 attempts: answered 503"):
                    await client.predict(np.ones((1, 2)))
            finally:
                await client.aclose()

    async def test_unreachable(self) -> None:
        client = await started(f"http://127.0.0.1:{free_port()}", "m", protocol="v1", retries=1, backoff=0.01)
        try:
            with pytest.raises(PredictorError, match="failed after 2 attempts: Client"):
                await client.predict(np.ones((1, 2)))
        finally:
            await client.aclose()

    async def test_refusal_is_not_retried(self, model_server: Process) -> None:
        client = await started(model_server.url, "iris", protocol="v1", retries=3)
        try:
            with pytest.raises(PredictorError, match="answered 400") as caught:
                await client.predict(np.ones((1, 3)))
            assert caught.value.status == 400 and client.requests == 1
        finally:
            await client.aclose()

    async def test_outputs_in_another_layout_are_refused(self) -> None:
        """Answers whose per-row layout differs from the first one's fail here, naming both, not
        deep inside the explainer (which made a 500)."""
        answers = iter([[[0.2, 0.8]], [0.5], [[0.2, 0.8]], ["a"], [{"p": 1}]])
        app = FastAPI()

        @app.post("/v1/models/{name}:predict")
        async def predict(name: str) -> Any:
            return {"predictions": next(answers)}

        with serve(app) as url:
            client = await started(url, "m", protocol="v1", retries=0)
            try:
                assert (await client.predict(np.ones((1, 2)))).shape == (1, 2)
                with pytest.raises(PredictorError, match=r"answered \[\] numbers per row, but \[2\] numbers"):
                    await client.predict(np.ones((1, 2)))
                assert (await asyncio.to_thread(client.predict_blocking, np.ones((1, 2)))).shape == (1, 2)
                with pytest.raises(PredictorError, match=r"\[\] labels per row, but \[2\] numbers"):
                    await asyncio.to_thread(client.predict_blocking, np.ones((1, 2)))
                with pytest.raises(PredictorError, match="neither numbers nor labels"):
                    await client.predict(np.ones((1, 2)))
            finally:
                await client.aclose()

    @pytest.mark.parametrize("blocking", [False, True])
    async def test_a_predictor_hanging_up_mid_request(self, blocking: bool) -> None:
        scripted = Scripted(lambda request: None)  # reads the request, closes without an answer
        async with scripted as url:
            client = await started(url, "m", protocol="v1", retries=1, backoff=0.01, timeout=2.0)
            try:
                with pytest.raises(PredictorError, match="failed after 2 attempts"):
                    if blocking:
                        await asyncio.to_thread(client.predict_blocking, np.ones((1, 2)))
                    else:
                        await client.predict(np.ones((1, 2)))
            finally:
                await client.aclose()
        assert len(scripted.heads) == 2

    async def test_a_trickling_answer_is_cut_off(self) -> None:
        """A socket timeout bounds each read, and this predictor sends a byte every 0.1 s: the
        answer as a whole must come within `timeout`."""
        body = b'{"predictions": [2.0]}' + b" " * 6000  # 10 minutes of it: only the timeout ends it in time
        stop = threading.Event()  # ends the drip should the client read on
        app = FastAPI()

        @app.post("/v1/models/{name}:predict")
        async def predict(name: str) -> StreamingResponse:
            async def drip() -> Any:
                for byte in body:
                    if stop.is_set():
                        return
                    yield bytes([byte])
                    await asyncio.sleep(0.1)

            return StreamingResponse(drip(), headers={"content-length": str(len(body))})

        with serve(app) as url:
            client = await started(url, "m", protocol="v1", retries=0, timeout=0.5)
            try:
                with pytest.raises(PredictorError, match="no answer within 0.5s"):
                    await within_guard(asyncio.to_thread(client.predict_blocking, np.ones((1, 2))),
                                       "the 0.5 s timeout did not bound the whole answer")
            finally:
                stop.set()
                await client.aclose()

    @pytest.mark.parametrize("part", ["head", "trailers"])
    async def test_an_answer_trickling_outside_its_body_is_cut_off_too(self, part: str) -> None:
        """A header line or chunked trailers a byte or a line at a time: http.client reads them
        in one call each, which no socket timeout ends; the watchdog does."""
        body = b'{"predictions": [2.0]}'
        stop = asyncio.Event()  # ends the trickle should the client read on

        async def answer(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
            head = await reader.readuntil(b"\r\n\r\n")
            length = int(next(line.split(b":")[1] for line in head.split(b"\r\n")
                              if line.lower().startswith(b"content-length")))
            await reader.readexactly(length)
            if part == "head":
                writer.write(b"HTTP/1.1 200 OK\r\nx-slow: ")
                pieces, end = [b"y"], b"\r\ncontent-length: %d\r\n\r\n%s" % (len(body), body)
            else:
                writer.write(b"HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\n\r\n%x\r\n%s\r\n0\r\n"
                             % (len(body), body))
                pieces, end = [b"x-t: 1\r\n"], b"\r\n"
            with contextlib.suppress(ConnectionError):  # the client hung up
                for piece in itertools.islice(itertools.cycle(pieces), 6000):  # 10 minutes: never in time
                    if stop.is_set():
                        break
                    writer.write(piece)
                    await writer.drain()
                    await asyncio.sleep(0.1)
                writer.write(end)
            writer.close()

        server = await asyncio.start_server(answer, "127.0.0.1", 0)
        url = f"http://127.0.0.1:{server.sockets[0].getsockname()[1]}"
        client = await started(url, "m", protocol="v1", retries=0, timeout=0.5)
        try:
            with pytest.raises(PredictorError, match="no answer within 0.5s"):
                await within_guard(asyncio.to_thread(client.predict_blocking, np.ones((1, 2))),
                                   f"the watchdog did not end the trickling {part} at 0.5 s")
        finally:
            stop.set()
            await client.aclose()
            server.close()

    async def test_a_body_cut_short_is_a_failure(self) -> None:
        scripted = Scripted(lambda request: b'HTTP/1.1 200 OK\r\ncontent-length: 100\r\n\r\n{"predictions"',
                            close_after=1)
        async with scripted as url:
            client = await started(url, "m", protocol="v1", retries=0)
            try:
                with pytest.raises(PredictorError, match="IncompleteRead"):
                    await asyncio.to_thread(client.predict_blocking, np.ones((1, 2)))
            finally:
                await client.aclose()

    @pytest.mark.parametrize("linger", [0.0, 0.01])  # from the worker thread, and through the loop
    async def test_a_deadline_ends_the_calls_without_retrying(self, linger: float) -> None:
        app = FastAPI()
        release, calls = threading.Event(), itertools.count()

        @app.post("/v1/models/{name}:predict")
        async def predict(name: str) -> dict[str, Any]:
            if next(calls) == 0:  # unanswered until the test ends: only the deadline ends this call
                while not release.is_set():
                    await asyncio.sleep(0.02)
            return {"predictions": [2.0]}

        with serve(app) as url:
            # A 600 s timeout per request: a call ended within the hang guard was ended by the deadline.
            client = await started(url, "m", protocol="v1", retries=2, timeout=600.0, linger=linger)

            def explain() -> None:
                with client.deadline(Deadline(time.monotonic() + 1.0, "too late")):
                    with pytest.raises(ExplainTimeoutError, match="too late"):
                        client.predict_blocking(np.ones((1, 2)))
                    with pytest.raises(ExplainTimeoutError):  # once past it, no request at all
                        client.predict_blocking(np.ones((1, 2)))
                out = client.predict_blocking(np.ones((1, 2)))  # outside the block: no deadline
                assert out.tolist() == [2.0]

            try:
                await within_guard(asyncio.to_thread(explain), "the 1 s deadline did not end the unanswered call")
            finally:
                release.set()
                await client.aclose()
        assert client.requests == 2

    async def test_a_deadline_met_while_asking_ahead_leaves_no_half_used_connection(self) -> None:
        app = FastAPI()

        @app.post("/v1/models/{name}:predict")
        async def predict(name: str, request: Request) -> dict[str, Any]:
            await asyncio.sleep(0.3)
            return {"predictions": [sum(row) for row in (await request.json())["instances"]]}

        rows = np.array([[1.0, 2.0], [3.0, 4.0]])
        with serve(app) as url:
            client = await started(url, "m", protocol="v1", retries=0, timeout=5.0)

            def explain_twice() -> int:
                with client.deadline(Deadline(time.monotonic() + 0.1, "too late")), client.asking_ahead(rows):
                    time.sleep(0.2)  # the explainer's own work outlasts the deadline
                    with pytest.raises(ExplainTimeoutError):
                        client.predict_blocking(rows[:1])
                assert getattr(client._lanes, "ahead_connection", None) is None  # its answer was never read
                before = client.requests
                with client.asking_ahead(rows):  # the next explanation on this thread asks ahead again
                    assert client.predict_blocking(rows[1:]).tolist() == [7.0]
                return client.requests - before

            try:
                assert await asyncio.to_thread(explain_twice) == 1  # answered from the request ahead
            finally:
                await client.aclose()

    async def test_v2_garbage_answers(self) -> None:
        bodies = iter([b"<html>", b'{"outputs": "x"}', b'{"outputs": [{"name": "y", "shape": [1], "data": ["a"]}]}',
                       b'{"outputs": [{"name": "y", "shape": [5], "data": [1, 2, 3, 4, 5]}]}'])
        scripted = Scripted(lambda request: _http_200(next(bodies)))
        async with scripted as url:
            client = await started_v2(url, retries=0)
            try:
                for words in ("not JSON", "must be a list of tensors", "could not convert", r"shape \[5\]"):
                    with pytest.raises(PredictorError, match=words):
                        await client.predict(np.ones((1, 3)))
            finally:
                await client.aclose()


def _http_200(body: bytes) -> bytes:
    return _http(200, body)


def _http(status: int, body: bytes) -> bytes:
    return b"HTTP/1.1 %d X\r\ncontent-type: application/json\r\ncontent-length: %d\r\n\r\n%s" % (
        status, len(body), body)


class TestAnswerSize:
    """Predictor answers were read whole, whatever their size: `max_answer_bytes` caps them (a
    `PredictorError`, a 502), whether the answer says its length or is chunked."""

    @staticmethod
    def app(chunked: bool, gzipped: bool = False) -> FastAPI:
        app = FastAPI()
        big = orjson.dumps({"predictions": [2.0], "padding": "x" * 5000})

        @app.post("/v1/models/{name}:predict")
        async def predict(name: str) -> Response:
            body = big if name == "big" else b'{"predictions": [2.0]}'
            if gzipped:  # 5 KB inflated from ~60 bytes: its length said nothing of it
                import gzip

                return Response(gzip.compress(body), media_type="application/json",
                                headers={"content-encoding": "gzip"})
            if chunked:
                async def parts() -> Any:
                    for i in range(0, len(body), 1000):
                        yield body[i:i + 1000]

                return StreamingResponse(parts(), media_type="application/json")
            return Response(body, media_type="application/json")

        return app

    @pytest.mark.parametrize("chunked", [False, True])
    async def test_capped(self, chunked: bool) -> None:
        with serve(self.app(chunked)) as url:
            big = await started(url, "big", protocol="v1", retries=0, max_answer_bytes=4096)
            small = await started(url, "small", protocol="v1", retries=0, max_answer_bytes=4096)
            try:
                for call in (lambda: asyncio.to_thread(big.predict_blocking, np.ones((1, 2))),
                             lambda: big.predict(np.ones((1, 2))),
                             lambda: big.forward("/v1/models/big:predict", b"{}", {})):
                    with pytest.raises(PredictorError, match="answered more than 4096 bytes"):
                        await within_guard(call(), "a capped answer")
                for _ in range(2):  # within the cap, and the connection kept for the next request
                    assert (await asyncio.to_thread(small.predict_blocking, np.ones((1, 2)))).tolist() == [2.0]
                    assert (await small.predict(np.ones((1, 2)))).tolist() == [2.0]
                    assert (await small.forward("/v1/models/small:predict", b"{}", {}))[0] == 200
            finally:
                await big.aclose()
                await small.aclose()

    async def test_a_compressed_answer_is_capped_inflated(self) -> None:
        with serve(self.app(chunked=False, gzipped=True)) as url:
            big = await started(url, "big", protocol="v1", retries=0, max_answer_bytes=4096)
            small = await started(url, "small", protocol="v1", retries=0, max_answer_bytes=4096)
            try:
                for call in (lambda: big.predict(np.ones((1, 2))),
                             lambda: big.forward("/v1/models/big:predict", b"{}", {"accept-encoding": "gzip"})):
                    with pytest.raises(PredictorError, match="answered more than 4096 bytes"):
                        await within_guard(call(), "a capped answer")
                assert (await small.predict(np.ones((1, 2)))).tolist() == [2.0]
            finally:
                await big.aclose()
                await small.aclose()

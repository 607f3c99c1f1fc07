"""The predictor client: V1 and V2 against real servers, batching, retries, the skip-logging header."""

from __future__ import annotations

import asyncio
from collections.abc import Iterator
from typing import Any

import numpy as np
import pytest
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse

from explainers.client import PredictorClient, schema_from_metadata
from explainers.codecs import Schema
from explainers.errors import PredictorError
from infer_logger.testing import free_port
from tests.explainers.conftest import serve
from tests.explainers.models import estimator, table
from tests.servers import Process

IRIS = Schema(tuple(table("iris").feature_names))


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

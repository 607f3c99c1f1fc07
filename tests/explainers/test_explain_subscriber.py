"""Explain on events: request and response joined by id, the explanation event with the same id, the
store join, failures (retried, nothing half-written), the HTTP endpoint and the broker."""

from __future__ import annotations

import asyncio
import threading
from collections.abc import AsyncIterator, Sequence
from contextlib import asynccontextmanager
from functools import partial
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import orjson
import pytest

from explainers.app import create_app
from explainers.config import SubscriberSettings
from explainers.service import ExplainerService
from explainers.subscriber import EventCache, ExplainSubscriber
from infer_logger import binary_tensors, events
from infer_logger.cloudevents import http as ce_http
from infer_logger.cloudevents.event import CloudEvent
from infer_logger.errors import RejectedError, SinkError
from infer_logger.sinks.http import HttpSinkConfig
from infer_logger.sinks.memory import MemorySink
from infer_logger.store import AuditStore
from infer_logger.testing import EventCollector
from tests.explainers.conftest import serve, settings
from tests.explainers.models import estimator
from tests.servers import Process
from tests.waiting import until

ROWS = [[6.8, 2.8, 4.8, 1.4], [6.0, 3.4, 4.5, 1.6]]
REQUIRED = {"predictor_url": "http://127.0.0.1:9", "background": "dataset:iris"}


def exchange(id_: str, rows: list[list[Any]] = ROWS, status: int = 200,
             model: str = "iris-proba") -> tuple[CloudEvent, CloudEvent]:
    """The request and response events the sidecar logs for one V1 call to `model` (its predictions
    made up unless it is `iris-proba`)."""
    common = {"specversion": "1.0", "id": id_, "source": "http://sidecar", "datacontenttype": "application/json",
              "modelname": model, "inferenceservicename": "iris", "namespace": "test", "time": events.now_rfc3339()}
    request = CloudEvent({**common, "type": events.REQUEST}, orjson.dumps({"instances": rows}))
    ok = model == "iris-proba" and status < 400 and all(len(r) == 4 for r in rows)
    answer = {"predictions": estimator("iris").predict_proba(np.array(rows)).tolist()} if ok else {"error": "x"}
    response = CloudEvent({**common, "type": events.RESPONSE, "statuscode": status}, orjson.dumps(answer))
    return request, response


def cancer_exchange(id_: str, n: int) -> tuple[CloudEvent, CloudEvent]:
    """An exchange of `n` instances of `cancer` (30 features, 2 outputs: ~2.4 KB of explanation each)."""
    from tests.explainers.models import table

    rows = table("breast_cancer").rows[:n].tolist()
    request, response = exchange(id_, rows, model="cancer")
    answer = {"predictions": estimator("cancer").predict_proba(np.array(rows)).tolist()}
    return request, CloudEvent(response.attributes, orjson.dumps(answer))


def cancer_service(url: str, **values: Any) -> ExplainerService:
    return ExplainerService(settings(model_name="cancer", predictor_url=url, protocol="v1",
                                     background="dataset:breast_cancer", params={"nsamples": 10}, **values))


def _kept_explanations(service: ExplainerService) -> list[Any]:
    """The service's explanations, whole, from now on."""
    made: list[Any] = []
    explain = service.explain

    async def kept(rows: np.ndarray, params: Any = None) -> Any:
        made.append(result := await explain(rows, params))
        return result

    service.explain = kept  # type: ignore[method-assign]
    return made


def _assert_largest_kept(explanation: dict[str, Any], whole: Any, k: int) -> None:
    """Each output of an instance's `explanation` holds the `k` attributions of `whole` (its
    InstanceExplanation) largest in absolute value, with their values."""
    assert explanation["params"]["top_k"] == k
    for output, original in zip(explanation["outputs"], whole.outputs, strict=True):
        kept = output["attributions"]
        dropped = [abs(v) for name, v in original.attributions.items() if name not in kept]
        assert len(kept) == k and all(original.attributions[name] == v for name, v in kept.items())
        assert min(abs(v) for v in kept.values()) >= max(dropped, default=0.0)
        assert output["base_value"] == original.base_value and output["value"] == original.value


def service_for(url: str, **values: Any) -> ExplainerService:
    return ExplainerService(settings(model_name="iris-proba", predictor_url=url, protocol="v1",
                                     background="dataset:iris", params={"nsamples": 20}, **values))


async def _merged(sub: ExplainSubscriber, *exchanges: tuple[CloudEvent, CloudEvent]) -> list[Any]:
    """Each exchange's request cached, then their responses at once (explained in one merged call
    within `linger`): the replies, or the failures, in order."""
    for request, _ in exchanges:
        assert await sub.handle(request) is None
    return await asyncio.gather(*(sub.handle(response) for _, response in exchanges), return_exceptions=True)


def _recorded(service: ExplainerService, check: Any = None) -> list[int]:
    """The row counts of the service's explain calls, from now on (`check(rows)` may raise first)."""
    calls: list[int] = []
    explain = service.explain

    async def recorded(rows: np.ndarray, params: Any = None) -> Any:
        calls.append(len(rows))
        if check is not None:
            check(rows)
        return await explain(rows, params)

    service.explain = recorded  # type: ignore[method-assign]
    return calls


def _blip_once(sub: ExplainSubscriber, monkeypatch: pytest.MonkeyPatch, event_id: str) -> None:
    """The predictor's blip: explaining `event_id` fails once, retryably (as 503)."""
    explain, blips = sub._explain, [event_id]

    async def blip_once(request: CloudEvent) -> Any:
        if request.id in blips:
            blips.clear()
            raise SinkError("the predictor answered 503")
        return await explain(request)

    monkeypatch.setattr(sub, "_explain", blip_once)


async def _explain_concurrently(service: ExplainerService, prefix: str, n: int) -> list[str]:
    """`n` exchanges through a subscriber that batches them: the ids of the explanations made."""
    sub = ExplainSubscriber(service, SubscriberSettings(linger=0.05, batch_size=64))
    pairs = [exchange(f"{prefix}-{i}", ROWS[i % 2:i % 2 + 1]) for i in range(n)]
    for request, _ in pairs:
        await sub.handle(request)
    replies = await asyncio.gather(*(sub.handle(response) for _, response in pairs))
    return sorted(r.id for r in replies if r)


@pytest.fixture
async def service(model_server: Process) -> AsyncIterator[ExplainerService]:
    svc = service_for(model_server.url)
    await svc.start()
    yield svc
    await svc.aclose()


class TestJoin:
    """The second half of an exchange gets the explanation event; the store joins it by id."""

    async def test_request_then_response(self, service: ExplainerService, tmp_path: Path) -> None:
        sub = ExplainSubscriber(service, SubscriberSettings(linger=0.001))
        request, response = exchange("ex-1")
        assert await sub.handle(request) is None
        reply = await sub.handle(response)
        assert reply is not None and reply.type == events.EXPLANATION and reply.id == "ex-1"
        assert reply["modelname"] == "iris-proba" and reply["namespace"] == "test" and len(sub.cache) == 0
        with AuditStore(tmp_path / "audit.db") as store:
            store.write([request, response, reply])
            records = store.query(id="ex-1", order="asc")
        assert [r.instance for r in records] == [0, 1]
        for record, row in zip(records, ROWS):
            explanation = record.explanation
            assert explanation["method"] == "kernel" and record.request == row
            total = [o["base_value"] + sum(o["attributions"].values()) for o in explanation["outputs"]]
            np.testing.assert_allclose(total, record.response, atol=1e-6)

    def test_the_explanation_carries_every_shared_attribute(self) -> None:
        """It carried the model, version, service and namespace only: a sink indexing by
        `{component}` put it in an `...-unknown` index, never joined with its exchange."""
        from explainers.base import Explanation
        from explainers.subscriber import explanation_event

        request, response = exchange("ex-attrs")
        shared = {"component": "predictor", "endpoint": "default", "protocol": "v1", "path": "/v1/models/m:predict"}
        request = CloudEvent({**request.attributes, **shared}, request.data)
        reply = explanation_event(request, response, Explanation("kernel", {}, [], []), "urn:explainer")
        assert {name: reply.get(attr) for name, attr in events.SHARED_FIELDS.items()} == {
            name: request.get(attr) for name, attr in events.SHARED_FIELDS.items()}

    def test_the_explanation_takes_namespace_and_service_from_one_event(self) -> None:
        """They key its exchange in the store: taken each from whichever had it, a request naming the
        namespace and a response the service made an explanation of a third exchange."""
        from explainers.base import Explanation
        from explainers.subscriber import explanation_event

        request, response = exchange("ex-keyed")
        request = CloudEvent({**request.attributes, "namespace": "ml", "inferenceservicename": ""}, request.data)
        response = CloudEvent({k: v for k, v in response.attributes.items() if k != "namespace"}
                              | {"inferenceservicename": "iris"}, response.data)
        reply = explanation_event(request, response, Explanation("kernel", {}, [], []), "urn:explainer")
        assert (reply.get("namespace"), reply.get("inferenceservicename")) == (None, "iris")

    def test_the_explanation_keeps_the_exchanges_partition_key(self) -> None:
        """The Kafka binding keys a record by `partitionkey` when an event has one: the
        explanation, without it, was keyed by its id, and landed in another partition."""
        from explainers.base import Explanation
        from explainers.subscriber import explanation_event

        request, response = exchange("ex-key")
        request = CloudEvent({**request.attributes, "partitionkey": "customer-42"}, request.data)
        response = CloudEvent({**response.attributes, "partitionkey": "customer-42"}, response.data)
        reply = explanation_event(request, response, Explanation("kernel", {}, [], []), "urn:explainer")
        assert reply.get("partitionkey") == "customer-42"

    async def test_a_request_with_binary_tensor_data(self, service: ExplainerService) -> None:
        """tritonclient's default: a V2 body whose rows travel as raw bytes after the JSON part."""
        sub = ExplainSubscriber(service, SubscriberSettings(linger=0.001))
        request, response = exchange("ex-bin")
        tensor = {"name": "x", "shape": [2, 4], "datatype": "FP64"}
        body, _ = binary_tensors.encode({"inputs": [tensor]}, "inputs", {"x": np.array(ROWS)})
        binary = CloudEvent({**request.attributes, "datacontenttype": binary_tensors.CONTENT_TYPE}, body)
        assert await sub.handle(binary) is None
        reply = await sub.handle(response)
        assert reply is not None and reply.id == "ex-bin" and len(reply.json()["explanations"]) == 2

    async def test_binary_tensor_data_that_does_not_read_is_refused_naming_why(
            self, service: ExplainerService) -> None:
        """A datatype not known (FP8), or sizes that do not add up: the refusal said "not JSON: str
        is not valid UTF-8", nothing about the tensors."""
        sub = ExplainSubscriber(service, SubscriberSettings(linger=0.001))
        for id_, datatype, size in (("ex-fp8", "FP8", 8), ("ex-short", "FP64", 63)):
            request, response = exchange(id_)
            head = orjson.dumps({"inputs": [{"name": "x", "shape": [2, 4], "datatype": datatype,
                                             "parameters": {"binary_data_size": size}}]})
            bad = CloudEvent({**request.attributes, "datacontenttype": binary_tensors.CONTENT_TYPE},
                             head + b"\xff" * size)
            assert await sub.handle(bad) is None
            with pytest.raises(RejectedError, match="binary tensor data") as caught:
                await sub.handle(response)
            assert "UTF-8" not in str(caught.value) and (datatype in str(caught.value) or "63" in str(caught.value))
        for id_, body in (("ex-utf8", b'{"x": "\xff"}'), ("ex-two", b'{"a": 1}{"b": 2}')):  # no tensor data
            request, response = exchange(id_)
            assert await sub.handle(CloudEvent(request.attributes, body)) is None
            with pytest.raises(RejectedError, match="is not JSON") as caught:
                await sub.handle(response)
            assert "binary tensor data" not in str(caught.value)

    def test_an_integer_past_64_bits_is_read_as_the_explain_endpoint_reads_it(self, model_server: Process) -> None:
        """Every feature becomes a float: `:explain` explained the body, while the subscriber
        dead-lettered the same request as "not JSON" (an integer orjson reads as a float)."""
        body = b'{"instances": [[18446744073709551616, 2.8, 4.8, 1.4]]}'
        with serve(create_app(service_for(model_server.url, subscriber={"linger": 0.001}))) as url:
            assert httpx.post(f"{url}/v1/models/iris-proba:explain", content=body, timeout=30).status_code == 200
            request, response = exchange("ex-big", [[1.8e19, 2.8, 4.8, 1.4]])
            for event in (CloudEvent(request.attributes, body), response):
                headers, data = ce_http.to_binary(event)
                r = httpx.post(f"{url}/events", headers=headers, content=data, timeout=30)
            assert r.status_code == 200 and r.headers["ce-id"] == "ex-big", r.text

    async def test_a_binary_tensor_past_max_instances_is_refused_before_it_is_unpacked(
            self, model_server: Process) -> None:
        """The server's /infer refuses it by its shape (`max_values`); the subscriber unpacked every
        value into Python numbers on the event loop first (2 million rows: +340 MB, 0.4 s)."""
        svc = service_for(model_server.url, max_instances=10)
        await svc.start()
        try:
            sub = ExplainSubscriber(svc, SubscriberSettings(linger=0.001))
            request, response = exchange("ex-huge")
            tensor = {"name": "input-0", "shape": [11, 4], "datatype": "FP32"}
            body, _ = binary_tensors.encode({"inputs": [tensor]}, "inputs", {"input-0": np.ones((11, 4), "<f4")})
            assert await sub.handle(CloudEvent({**request.attributes, "datacontenttype": binary_tensors.CONTENT_TYPE},
                                               body)) is None
            with pytest.raises(RejectedError, match="44 values; at most 40 per request"):
                await sub.handle(response)
        finally:
            await svc.aclose()

    async def test_response_first(self, service: ExplainerService) -> None:
        sub = ExplainSubscriber(service, SubscriberSettings(linger=0.001))
        request, response = exchange("ex-2")
        assert await sub.handle(response) is None
        reply = await sub.handle(request)
        assert reply is not None and reply.id == "ex-2"

    async def test_skipped(self, service: ExplainerService) -> None:
        sub = ExplainSubscriber(service, SubscriberSettings(linger=0.001))
        request, failed = exchange("ex-3", status=500)
        await sub.handle(request)
        assert await sub.handle(failed) is None and len(sub.cache) == 0
        none = ExplainSubscriber(service, SubscriberSettings(sample=0.0))
        assert all([await none.handle(e) is None for e in exchange("ex-4")]) and len(none.cache) == 0

    def test_events_of_another_model_are_skipped(self, model_server: Process) -> None:
        """A trigger filtered by type only sent another model's exchanges (of the same width): they
        were explained with this model, and the explanation joined to that model's record."""
        service = ExplainerService(settings(model_name="iris-explainer", predictor_model="iris-proba",
                                            predictor_url=model_server.url, protocol="v1", background="dataset:iris",
                                            params={"nsamples": 20}, subscriber={"linger": 0.001}))
        app = create_app(service)
        with serve(app) as url:
            calls = _recorded(service)

            def post(event: CloudEvent) -> httpx.Response:
                headers, body = ce_http.to_binary(event)
                return httpx.post(f"{url}/events", headers=headers, content=body, timeout=30)

            other = exchange("m-1", ROWS[:1], model="fraud-detector")
            assert [post(e).status_code for e in other] == [202, 202]
            sub = app.state.subscriber
            assert calls == [] and sub.explained == 0 and sub.other_models == 2 and len(sub.cache) == 0
            # This model, by either of its names (or no name at all): explained.
            for i, model in enumerate(["iris-proba", "iris-explainer"]):
                request, response = exchange(f"m-{i + 2}", ROWS[:1], model=model)
                assert post(request).status_code == 202
                r = post(response)
                assert r.status_code == 200 and r.headers["ce-id"] == f"m-{i + 2}", r.text
            unnamed = [CloudEvent({k: v for k, v in e.attributes.items() if k != "modelname"}, e.data)
                       for e in exchange("m-4", ROWS[:1])]
            assert [post(e).status_code for e in unnamed] == [202, 200]
            assert sub.explained == 3 and sub.other_models == 2

    async def test_a_failed_response_before_its_request_leaves_nothing_cached(self, service: ExplainerService) -> None:
        sub = ExplainSubscriber(service, SubscriberSettings(linger=0.001))
        request, failed = exchange("ex-5", status=500)
        assert await sub.handle(failed) is None
        assert await sub.handle(request) is None and len(sub.cache) == 0  # was cached until cache_ttl

    async def test_a_copy_of_the_completing_half_is_explained_once(self, service: ExplainerService) -> None:
        """At-least-once deliveries: a copy while the explanation runs, and the whole exchange again."""
        calls = _recorded(service)
        sub = ExplainSubscriber(service, SubscriberSettings(linger=0.001))
        request, response = exchange("ex-6")
        assert await sub.handle(request) is None
        replies = await asyncio.gather(sub.handle(response), sub.handle(response))
        assert [r.id if r else None for r in replies] == ["ex-6", None]
        for event in (request, response, response, request):  # delivered again after it was explained
            again = await sub.handle(event)
            # The completing half gets the same explanation (the broker may not have stored it).
            assert again is replies[0] if event is response else again is None
        assert calls == [2] and sub.explained == 1 and len(sub.cache) == 0

    def test_a_batch_holding_an_event_twice_answers_it_once(self, model_server: Process) -> None:
        with serve(create_app(service_for(model_server.url, subscriber={"linger": 0.001}))) as url:
            request, response = exchange("ex-7")
            headers, body = ce_http.to_batch([request, response, response])
            r = httpx.post(f"{url}/events", headers=headers, content=body, timeout=30)
            assert r.status_code == 200 and [e["id"] for e in r.json()] == ["ex-7"], r.text

    async def test_batches_amortize(self, service: ExplainerService) -> None:
        calls = _recorded(service)
        ids = await _explain_concurrently(service, "b", 12)
        assert ids == sorted(f"b-{i}" for i in range(12))
        assert sum(calls) == 12 and len(calls) < 12

    async def test_a_merged_batch_past_its_deadline_is_explained_event_by_event(
            self, service: ExplainerService) -> None:
        """Retried, the same events would merge again and time out again, for good."""
        from explainers.errors import ExplainTimeoutError

        def too_slow_when_merged(rows: np.ndarray) -> None:
            if len(rows) > 1:
                raise ExplainTimeoutError("merged: too slow")

        calls = _recorded(service, too_slow_when_merged)
        assert await _explain_concurrently(service, "t", 3) == ["t-0", "t-1", "t-2"]
        assert calls == [3, 1, 1, 1]

    async def test_rows_the_predictor_refuses_refuse_their_event_only(self, service: ExplainerService) -> None:
        """Merged with others, the predictor's 400 to one event's rows refused (dead-lettered)
        every event merged in, and settled them as refused."""
        from explainers.errors import PredictorRefusedError

        def refuses_out_of_range(rows: np.ndarray) -> None:
            if (np.asarray(rows, dtype=float) > 100).any():
                raise PredictorRefusedError("predictor answered 400: feature out of range", status=400)

        calls = _recorded(service, refuses_out_of_range)
        out = MemorySink()
        sub = ExplainSubscriber(service, SubscriberSettings(linger=0.05, batch_size=64), reply_to=out)
        pairs = [exchange(f"r-{i}", ROWS[:1]) for i in range(3)] + [exchange("r-bad", [[6.8, 2.8, 400.0, 1.4]])]
        await sub.send_batch([request for request, _ in pairs])
        with pytest.raises(RejectedError) as info:
            await sub.send_batch([response for _, response in pairs])
        assert [e.id for e in info.value.events] == ["r-bad"] and "out of range" in str(info.value)
        assert sorted(e.id for e in out.events) == ["r-0", "r-1", "r-2"] and calls[0] == 4

    async def test_rows_a_local_model_cannot_take_refuse_their_event_only(self, tmp_path: Path) -> None:
        """White box: merged with an event whose category the model's encoder never saw, a good
        event was refused too (400, dead-lettered on every redelivery)."""
        import joblib
        from sklearn.compose import make_column_transformer
        from sklearn.ensemble import RandomForestClassifier
        from sklearn.pipeline import make_pipeline
        from sklearn.preprocessing import OneHotEncoder

        from tests.explainers.models import frame, table

        t = table("penguins")
        strict = make_column_transformer((OneHotEncoder(), list(t.categorical)), remainder="passthrough")
        model = make_pipeline(strict, RandomForestClassifier(n_estimators=5, max_depth=3, random_state=0))
        joblib.dump(model.fit(frame(t.rows, t), t.target), tmp_path / "strict.joblib")
        svc = ExplainerService(settings(model_name="penguins", model_file=tmp_path / "strict.joblib",
                                        background="dataset:penguins", options={"background_size": 10},
                                        params={"nsamples": 20}))
        await svc.start()
        try:
            calls = _recorded(svc)
            sub = ExplainSubscriber(svc, SubscriberSettings(linger=0.05, batch_size=64))
            good_row = t.rows[0].tolist()
            replies = await _merged(sub, exchange("w-good", [good_row], model="penguins"),
                                    exchange("w-bad", [["Atlantis", *good_row[1:]]], model="penguins"))
            assert isinstance(replies[0], CloudEvent) and replies[0].id == "w-good", replies[0]
            assert isinstance(replies[1], RejectedError) and "w-bad" in str(replies[1])
            assert calls == [2, 1, 1]
        finally:
            await svc.aclose()

    async def test_rows_the_predictor_fails_on_fail_their_event_only(self) -> None:
        """Black box: a predictor answering 500 for one event's rows (its model raises on them)
        failed every event merged in, on every redelivery that came with the bad one."""
        from infer_logger.demo.predictor import create_app as predictor_app
        from tests.explainers.models import Served

        inner = predictor_app([Served("iris-proba", "iris", proba=True)])

        async def crashes_on_99(scope: Any, receive: Any, send: Any) -> None:
            if scope["type"] != "http" or not scope["path"].endswith(":predict"):
                return await inner(scope, receive, send)
            body, more = b"", True
            while more:
                message = await receive()
                body, more = body + message.get("body", b""), message.get("more_body", False)
            if any(row[0] == 99.0 for row in orjson.loads(body)["instances"]):
                await send({"type": "http.response.start", "status": 500,
                            "headers": [(b"content-type", b"application/json")]})
                return await send({"type": "http.response.body", "body": b'{"error": "ValueError: crashed"}'})

            async def again() -> dict[str, Any]:
                return {"type": "http.request", "body": body, "more_body": False}

            await inner(scope, again, send)

        with serve(crashes_on_99) as url:
            svc = service_for(url)
            await svc.start()
            try:
                calls = _recorded(svc)
                sub = ExplainSubscriber(svc, SubscriberSettings(linger=0.05, batch_size=64))
                replies = await _merged(sub, exchange("p-good", ROWS[:1]), exchange("p-bad", [[99.0, 3.0, 4.0, 1.0]]))
                assert isinstance(replies[0], CloudEvent) and replies[0].id == "p-good", replies[0]
                assert isinstance(replies[1], SinkError) and "500" in str(replies[1])
                assert calls == [2, 1, 1]
            finally:
                await svc.aclose()

    async def test_a_predictor_down_fails_merged_events_at_once(self) -> None:
        """Unavailable (503 after the retries) is the predictor's state, not one event's rows: each
        event explained again alone asked the down predictor once more per event, one after the
        other (a broker attempt waited for all of them)."""
        from infer_logger.demo.predictor import create_app as predictor_app
        from tests.explainers.models import Served

        inner = predictor_app([Served("iris-proba", "iris", proba=True)])
        down = [False]

        async def unavailable(scope: Any, receive: Any, send: Any) -> None:
            if scope["type"] != "http" or not down[0] or not scope["path"].endswith(":predict"):
                return await inner(scope, receive, send)
            await send({"type": "http.response.start", "status": 503, "headers": []})
            await send({"type": "http.response.body", "body": b"loading"})

        with serve(unavailable) as url:
            svc = service_for(url, retries=1)
            await svc.start()
            try:
                calls = _recorded(svc)
                sub = ExplainSubscriber(svc, SubscriberSettings(linger=0.05, batch_size=64))
                exchanges = [exchange(f"d-{i}", ROWS[:1]) for i in range(4)]
                for request, _ in exchanges:
                    assert await sub.handle(request) is None
                down[0] = True
                replies = await asyncio.gather(*(sub.handle(r) for _, r in exchanges), return_exceptions=True)
                assert all(type(r) is SinkError and "503" in str(r) for r in replies), replies
                assert calls == [4]
            finally:
                await svc.aclose()

    def test_cache_bound_and_ttl(self, caplog: pytest.LogCaptureFixture) -> None:
        cache = EventCache(size=2, ttl=60)
        for i in range(4):
            cache.put((str(i), "t"), exchange(str(i))[0])
        assert cache.get(("1", "t")) is None and cache.get(("3", "t")) is not None and cache.evicted == 2
        # Logged once (then at most once a minute), with the count at the time.
        assert [r.getMessage() for r in caplog.records if "explain-on-event" in r.getMessage()] == [
            ("explain-on-event: 1 event(s) dropped for room (cache_size 2, cache_bytes 268435456) and 0 expired "
             "(cache_ttl 60s) before their other half came; those exchanges are not explained")]
        expired = EventCache(size=10, ttl=1e-9)
        expired.put(("a", "t"), exchange("a")[0])
        assert expired.get(("a", "t")) is None
        expired.put(("b", "t"), exchange("b")[0])
        assert expired.expired == 1 and len(expired) == 1
        # Taken by its other half after its time: counted (taking it dropped it uncounted).
        assert expired.take(("b", "t")) is None and expired.expired == 2 and len(expired) == 0


    def test_the_join_cache_is_bound_in_bytes(self, model_server: Process, caplog: pytest.LogCaptureFixture) -> None:
        """`cache_size` bounded the count only: 10,000 requests of up to the sidecar's 900 KiB cap
        waiting for their responses held ~8.6 GiB."""
        app = create_app(service_for(model_server.url, subscriber={"linger": 0.001, "cache_bytes": "1MiB"}))
        big = orjson.dumps({"instances": [ROWS[0]] * 18_000})  # 324 KB: 3 fit in 1 MiB
        with serve(app) as url:
            for i in range(8):
                headers, body = ce_http.to_binary(CloudEvent(exchange(f"b-{i}")[0].attributes, big))
                assert httpx.post(f"{url}/events", headers=headers, content=body, timeout=30).status_code == 202
            cache = app.state.subscriber.cache
            assert cache.evicted == 5 and len(cache) == 3 and 3 * len(big) < cache.bytes <= 1 << 20
            assert cache.get(("b-7", events.REQUEST)) is not None and cache.get(("b-4", events.REQUEST)) is None
        assert [r.getMessage() for r in caplog.records if "dropped for room" in r.getMessage()][:1] == [
            ("explain-on-event: 1 event(s) dropped for room (cache_size 10000, cache_bytes 1048576) and 0 expired "
             "(cache_ttl 300s) before their other half came; those exchanges are not explained")]

    def test_the_kept_explanations_are_bound_in_bytes(self) -> None:
        """The explanations kept for redeliveries were bounded by count only (`cache_size`), each as
        large as `max_explanation_bytes`."""
        from explainers.subscriber import _Settled

        settled = _Settled(size=100, ttl=60, max_bytes=1 << 20)
        for i in range(8):
            reply = CloudEvent({"specversion": "1.0", "id": f"k-{i}", "source": "s", "type": events.EXPLANATION},
                               b"x" * 300_000)
            settled.add(f"k-{i}", reply, events.RESPONSE)
        assert settled.bytes <= 1 << 20 and "k-4" not in settled and "k-5" in settled and "k-7" in settled
        kept = settled.reply(CloudEvent({**exchange("k-7")[1].attributes}, b"{}"))
        assert isinstance(kept, CloudEvent) and kept.data == b"x" * 300_000

class TestFailures:
    """Unreachable predictor: retry later, keep the cached half, reply nothing. Bad payload: reject."""

    async def test_retry_after_the_predictor_comes_back(self, model_server: Process) -> None:
        svc = service_for(model_server.url)
        await svc.start()
        try:
            sub = ExplainSubscriber(svc, SubscriberSettings(linger=0.001))
            request, response = exchange("f-1")
            await sub.handle(request)
            assert svc.client is not None
            svc.client.url = svc.client.url.replace(model_server.url, "http://127.0.0.1:9")  # nothing listens
            with pytest.raises(SinkError, match="failed after 2 attempts"):
                await sub.handle(response)
            assert len(sub.cache) == 1 and sub.explained == 0
            svc.client.url = svc.client.url.replace("http://127.0.0.1:9", model_server.url)
            assert (await sub.handle(response)) is not None
        finally:
            await svc.aclose()

    async def test_the_half_being_explained_is_not_evicted(self, service: ExplainerService,
                                                           monkeypatch: pytest.MonkeyPatch) -> None:
        """It stayed in the cache, the oldest entry, while explained: evicted for room (counted as
        never explained), then the predictor's blip left the retry without it: cached as a first half."""
        sub = ExplainSubscriber(service, SubscriberSettings(linger=0.001, cache_size=2))
        explain, go = sub._explain, asyncio.Event()

        async def blip_after_others_came(request: CloudEvent) -> Any:
            await go.wait()
            monkeypatch.setattr(sub, "_explain", explain)
            raise SinkError("the predictor answered 503")

        monkeypatch.setattr(sub, "_explain", blip_after_others_came)
        request, response = exchange("e-1")
        await sub.handle(request)
        running = asyncio.create_task(sub.handle(response))
        await asyncio.sleep(0)
        for i in (2, 3):
            await sub.handle(exchange(f"e-{i}")[0])
        assert sub.cache.evicted == 0
        go.set()
        with pytest.raises(SinkError, match="503"):
            await running
        reply = await sub.handle(response)  # the broker's retry
        assert reply is not None and reply.id == "e-1" and sub.explained == 1

    async def test_unreadable_request_is_rejected(self, service: ExplainerService) -> None:
        sub = ExplainSubscriber(service, SubscriberSettings(linger=0.001))
        request, response = exchange("f-2", rows=[[1.0, 2.0]])
        await sub.handle(request)
        with pytest.raises(RejectedError, match=r"\[n, 4\]"):
            await sub.handle(response)
        assert len(sub.cache) == 0

    def test_an_event_past_its_deadline_is_retried(self, model_server: Process) -> None:
        """Timed out, it may have waited for busy workers or a stalled predictor, which pass: 502
        (the sender's policy bounds the retries; `max_instances` refuses rows too many up front)."""
        from explainers.errors import ExplainTimeoutError

        def slow_once(rows: np.ndarray) -> None:
            if len(calls) == 1:
                raise ExplainTimeoutError(f"explaining {len(rows)} instance(s) took over 1s (explain_timeout)")

        service = service_for(model_server.url, subscriber={"linger": 0.001})
        with serve(create_app(service)) as url:
            calls = _recorded(service, slow_once)
            request, response = exchange("f-slow")
            answers = [httpx.post(f"{url}/events", headers=h, content=b, timeout=30)
                       for h, b in map(ce_http.to_binary, (request, response, response))]
            assert [r.status_code for r in answers] == [202, 502, 200], answers[1].text
            assert "f-slow" in answers[1].json()["error"] and "explain_timeout" in answers[1].json()["error"]
            assert calls == [2, 2]

    async def test_data_nested_too_deep_is_rejected_as_a_sink(self, service: ExplainerService) -> None:
        # RecursionError reading it escaped as a retryable failure (SinkError): retried for ever.
        # (Past orjson's 1024 levels the payload reads as no JSON at all.)
        sub = ExplainSubscriber(service, SubscriberSettings(linger=0.001), reply_to=MemorySink())
        request, response = exchange("f-3")
        deep = CloudEvent(request.attributes, b'{"instances": ' + b"[" * 1100 + b"]" * 1100 + b"}")
        await sub.send_batch([deep])
        reason = "f-3: the request payload is not JSON"
        with pytest.raises(RejectedError, match=reason) as caught:
            await sub.send_batch([response])
        assert caught.value.events == [deep] and len(sub.cache) == 0

    async def test_as_a_sink(self, service: ExplainerService) -> None:
        out = MemorySink()
        sub = ExplainSubscriber(service, SubscriberSettings(linger=0.001), reply_to=out)
        await sub.send_batch([*exchange("s-1"), *exchange("s-2")])
        assert sorted(e.id for e in out.events) == ["s-1", "s-2"]
        # An upstream copy (a spool replay, a resend): reply_to took the explanation already.
        await sub.send_batch(list(exchange("s-1")))
        assert sorted(e.id for e in out.events) == ["s-1", "s-2"]

    async def test_a_reply_failure_names_the_callers_events_as_pending(self, service: ExplainerService) -> None:
        """`reply_to` failing part-way names explanations as `pending`: a caller retrying only
        those as its events lost the other explanations. It names the caller's events whose
        explanations were not taken."""
        out = MemorySink()
        out.fail = lambda batch: SinkError("down", pending=batch[1:], retry_after=2.0)
        sub = ExplainSubscriber(service, SubscriberSettings(linger=0.001), reply_to=out)
        batch = [*exchange("p-1"), *exchange("p-2")]
        with pytest.raises(SinkError) as caught:
            await sub.send_batch(batch)
        assert caught.value.pending_among(batch) is not None and caught.value.retry_after == 2.0
        assert [(e.id, e.type) for e in caught.value.pending] == [("p-2", events.RESPONSE)]
        out.fail = lambda batch: None
        await sub.send_batch(caught.value.pending)  # the caller's retry of those
        assert [e.id for e in out.events] == ["p-2"] and len(sub.cache) == 0

    async def test_replies_taken_before_reply_to_failed_are_not_sent_again(self, service: ExplainerService) -> None:
        """Halved after a 413, `reply_to` took the first half of the explanations, then failed:
        every one was made and sent again on the retry (two of each taken before)."""
        out, sent = MemorySink(), [0]

        def fail(batch: Sequence[CloudEvent]) -> Exception | None:
            sent[0] += 1
            if sent[0] == 1:
                return RejectedError("413 too large", together=True, too_large=True)
            return SinkError("503 down") if sent[0] == 3 else None

        out.fail = fail
        sub = ExplainSubscriber(service, SubscriberSettings(linger=0.01), reply_to=out)
        pairs = [exchange(f"q-{i}", ROWS[:1]) for i in range(4)]
        responses = [response for _, response in pairs]
        await sub.send_batch([request for request, _ in pairs])
        with pytest.raises(SinkError, match="503") as caught:
            await sub.send_batch(responses)
        await sub.send_batch(responses)  # the caller's retry of the whole batch
        assert [e.id for e in out.events] == ["q-0", "q-1", "q-2", "q-3"] and sub.explained == 6
        assert len(sub.cache) == 0
        # A caller retrying only its pending events sends no more than those.
        assert not isinstance(caught.value, RejectedError) and caught.value.pending == responses[2:]

    async def test_replies_refused_together_for_their_size_go_in_halves(self, service: ExplainerService) -> None:
        """`reply_to` a batch POST answered 413: the refusal reached the caller, whose own halving
        handed the explanations back in as its events."""
        out = MemorySink()
        sizing = ExplainSubscriber(service, SubscriberSettings(linger=0.001), reply_to=out)
        await sizing.send_batch([*exchange("z-1")])
        one = len(ce_http.to_batch(out.events)[1])
        with EventCollector() as receiver:
            receiver.max_body = one * 3 // 2  # one explanation per POST fits, two do not
            sink = HttpSinkConfig(url=receiver.url, mode="batch").build()
            sub = ExplainSubscriber(service, SubscriberSettings(linger=0.001), reply_to=sink)
            await sub.send_batch([e for i in range(4) for e in exchange(f"z-{i}")])
            await sink.aclose()
            assert sorted(e.id for e in receiver.events) == [f"z-{i}" for i in range(4)]


class TestHttpEndpoint:
    """`POST /events`: 202 for a cached half, 200 + the explanation in binary mode, 400 for junk."""

    async def test_binary_structured_batch(self, model_server: Process) -> None:
        app = create_app(service_for(model_server.url, subscriber={"linger": 0.001}))
        client = httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://x")
        async with app.router.lifespan_context(app), client:
            request, response = exchange("h-1")
            headers, body = ce_http.to_binary(request)
            r = await client.post("/events", headers=headers, content=body)
            assert r.status_code == 202 and r.content == b""
            headers, body = ce_http.to_structured(response)
            r = await client.post("/events", headers=headers, content=body)
            assert r.status_code == 200 and r.headers["ce-type"] == events.EXPLANATION
            assert r.headers["ce-id"] == "h-1" and len(r.json()["explanations"]) == 2
            headers, body = ce_http.to_batch(exchange("h-2"))
            r = await client.post("/events", headers=headers, content=body)
            assert r.status_code == 200 and [e.id for e in ce_http.from_http_many(r.headers, r.content)] == ["h-2"]
            r = await client.post("/events", content=b"{}", headers={"content-type": "application/json"})
            assert r.status_code == 400


    async def test_a_redelivered_completing_half_gets_the_same_explanation(self, model_server: Process) -> None:
        """The id was settled before its 200 was written: when the broker's attempt timed out, or it
        could not store the reply (503, retried), the redelivery got 202 and the explanation was lost."""
        app = create_app(service_for(model_server.url, subscriber={"linger": 0.001}))
        client = httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://x")
        async with app.router.lifespan_context(app), client:
            request, response = exchange("h-3")
            answers = [await client.post("/events", headers=h, content=b)
                       for h, b in map(ce_http.to_binary, (request, response, response, request))]
        assert [r.status_code for r in answers] == [202, 200, 200, 202]
        assert answers[2].headers["ce-id"] == "h-3" and answers[2].content == answers[1].content


    async def test_a_copy_of_the_other_half_while_explaining_gets_no_explanation(self, model_server: Process) -> None:
        """Only the completing half's copy shares the explanation: the request's copy, arriving as
        its exchange was being explained, got it too, and the broker held two explanation events."""
        app = create_app(service_for(model_server.url, subscriber={"linger": 0.001}))
        client = httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://x")
        async with app.router.lifespan_context(app), client:
            request, response = exchange("h-4")
            post = [partial(client.post, "/events", headers=h, content=b)
                    for h, b in map(ce_http.to_binary, (request, response))]
            assert (await post[0]()).status_code == 202
            answers = await asyncio.gather(post[1](), post[0](), post[1]())
        assert [r.status_code for r in answers] == [200, 202, 200]
        assert answers[2].content == answers[0].content

    async def test_a_refused_completing_half_delivered_again_is_refused_again(self, model_server: Process) -> None:
        """Its 400 may never have reached the broker: the copy got 202 (done), and the exchange
        went without a dead letter."""
        app = create_app(service_for(model_server.url, subscriber={"linger": 0.001}))
        client = httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://x")
        async with app.router.lifespan_context(app), client:
            request, response = exchange("h-5", rows=[[1.0, 2.0]])  # two features of four
            answers = [await client.post("/events", headers=h, content=b)
                       for h, b in map(ce_http.to_binary, (request, response, response, request))]
        assert [r.status_code for r in answers] == [202, 400, 400, 202]
        assert answers[2].json() == answers[1].json() and "h-5" in answers[1].json()["error"]


    def test_halves_waiting_when_it_stops_are_counted_and_logged(self, model_server: Process,
                                                                   caplog: pytest.LogCaptureFixture) -> None:
        """The join cache is in memory: a restart lost every half answered 202 and waiting for its
        other half, with no log and no count."""
        from prometheus_client import generate_latest

        app = create_app(service_for(model_server.url, subscriber={"linger": 0.001}))
        with serve(app) as url:
            for event in (exchange("s-1")[0], exchange("s-2")[1]):
                headers, body = ce_http.to_binary(event)
                assert httpx.post(f"{url}/events", headers=headers, content=body, timeout=30).status_code == 202
        metrics = generate_latest(app.state.metrics.registry).decode()
        assert "infer_logger_explainer_events_dropped_at_stop_total 2.0" in metrics, metrics
        assert "infer_logger_explainer_events_waiting 0.0" in metrics
        assert [r.getMessage() for r in caplog.records if "stopping with" in r.getMessage()] == [
            ("explain-on-event: stopping with 2 event(s) waiting in the join cache for their other half, "
             "which a restart loses: those exchanges are not explained")]


    def test_an_explanation_no_top_k_fits_is_refused_naming_the_setting(self, model_server: Process) -> None:
        """Past `max_explanation_bytes`, the largest attributions fitting are kept; when even one per
        output does not fit, the exchange is refused (400: dead-lettered, not retried), never a 500."""
        svc = cancer_service(model_server.url, subscriber={"linger": 0.001, "max_explanation_bytes": 16384})
        made = _kept_explanations(svc)
        with serve(create_app(svc)) as url:
            def post(event: CloudEvent) -> httpx.Response:
                headers, body = ce_http.to_binary(event)
                return httpx.post(f"{url}/events", headers=headers, content=body, timeout=60)

            request, response = cancer_exchange("f-1", 20)
            assert post(request).status_code == 202
            r = post(response)
            assert r.status_code == 200 and r.headers["ce-id"] == "f-1", r.text
            assert len(r.content) <= 16384 and len(orjson.dumps(made[0].to_dict())) > 16384
            doc = r.json()
            k = doc["params"]["top_k"]
            assert 1 <= k < 30 and doc["params"]["nsamples"] == 10 and len(doc["explanations"]) == 20
            for explanation, whole in zip(doc["explanations"], made[0].instances, strict=True):
                _assert_largest_kept(explanation, whole, k)
            request, response = cancer_exchange("f-2", 100)
            assert post(request).status_code == 202
            answers = [post(response), post(response)]  # refused, and refused again when redelivered
            assert [a.status_code for a in answers] == [400, 400], answers[0].text
            assert "max_explanation_bytes" in answers[0].json()["error"] and "f-2" in answers[0].json()["error"]

def _explaining_broker(tmp_path: Path, subscriber: ExplainSubscriber, store_path: Path, *, retry: int,
                       timeout: str) -> Any:
    """A broker whose triggers send every inference event to a store and the exchanges to `subscriber`."""
    broker_mod = pytest.importorskip("pipelines.broker")
    from infer_logger.sinks.store import StoreSinkConfig

    return broker_mod.Broker(
        broker_mod.BrokerSettings(dir=tmp_path / "broker", channel="memory", drain_timeout=1.0,
                                  delivery={"retry": retry, "backoffDelay": "PT0.05S", "timeout": timeout}),
        components={"explainer": subscriber, "audit": StoreSinkConfig(path=str(store_path)).build()},
        triggers="""
triggers:
  - {name: audit, filters: [{prefix: {type: org.kubeflow.serving.inference.}}], subscriber: {ref: {name: audit}}}
  - name: explain
    filters: [{any: [{exact: {type: org.kubeflow.serving.inference.request}},
                     {exact: {type: org.kubeflow.serving.inference.response}}]}]
    subscriber: {ref: {name: explainer}}
""")


class TestBroker:
    """In a broker: request and response events in, the explanation joined in the store."""

    async def test_explanation_reenters_and_joins(self, model_server: Process, tmp_path: Path) -> None:
        svc = service_for(model_server.url, subscriber={"linger": 0.01})
        subscriber = ExplainSubscriber(svc, owns_service=True)
        store_path = tmp_path / "audit.db"
        broker = _explaining_broker(tmp_path, subscriber, store_path, retry=3, timeout="PT30S")
        await broker.startup()
        try:
            async with httpx.AsyncClient(transport=httpx.ASGITransport(app=broker), base_url="http://b") as client:
                for event in (*exchange("k-1"), *exchange("k-2")):
                    headers, body = ce_http.to_binary(event)
                    assert (await client.post("/", headers=headers, content=body)).status_code < 300
            with AuditStore(store_path, readonly=False) as store:
                for _ in range(300):
                    records = store.query(limit=None)
                    if len(records) == 4 and all(r.explanation for r in records):
                        break
                    await asyncio.sleep(0.05)
            assert sorted((r.id, r.instance) for r in records if r.explanation) == [
                ("k-1", 0), ("k-1", 1), ("k-2", 0), ("k-2", 1)]
        finally:
            await broker.shutdown()
            await subscriber.aclose()

    async def test_an_explanation_over_the_brokers_event_size_keeps_the_largest_attributions(
            self, model_server: Process, tmp_path: Path) -> None:
        """450 instances of a 30-feature model (max_instances is 1,000): their 1.08 MB explanation was
        over the broker's max_event_bytes (1 MiB), the reply refused (413) and the explanation lost
        for good (a dead letter's replay made the same one)."""
        svc = cancer_service(model_server.url, subscriber={"linger": 0.01})
        made = _kept_explanations(svc)
        subscriber = ExplainSubscriber(svc, owns_service=True)
        store_path = tmp_path / "audit.db"
        broker = _explaining_broker(tmp_path, subscriber, store_path, retry=1, timeout="PT60S")
        await broker.startup()
        try:
            request, response = cancer_exchange("big-1", 450)
            async with httpx.AsyncClient(transport=httpx.ASGITransport(app=broker), base_url="http://b") as client:
                for event in (request, response):
                    headers, body = ce_http.to_binary(event)
                    assert (await client.post("/", headers=headers, content=body)).status_code < 300
            await until(lambda: subscriber.explained == 1, 120, "the explanation")
            with AuditStore(store_path, readonly=False) as store:
                def joined() -> bool:
                    return sum(r.explanation is not None for r in store.query(id="big-1", limit=None)) == 450

                await until(joined, 30, "the explanation in the store", every=0.1)
                records = store.query(id="big-1", order="asc", limit=None)
            reply = await subscriber.handle(response)  # redelivered: the explanation it was answered with
            assert reply is not None and len(reply.data or b"") <= 1_000_000 < len(orjson.dumps(made[0].to_dict()))
            k = reply.json()["params"]["top_k"]
            assert 1 <= k < 30
            # No `truncated` mark: it means cut bytes, and the store (and Elasticsearch) kept the
            # explanation as base64 `raw` then, not the JSON every reader takes.
            assert not events.is_truncated(reply)
            for record, whole in zip(records, made[0].instances, strict=True):
                _assert_largest_kept(record.explanation, whole, k)
        finally:
            await broker.shutdown()
            await subscriber.aclose()

    @pytest.mark.parametrize(("spec", "field"), [
        ({"settings": {"model_name": "x"}}, "settings"),  # no predictor_url nor model_file
        ({"settings": {**REQUIRED, "subscriber": {"source": "a\tb"}}}, "settings"),
        ({"config": "/nonexistent/explainer.yaml", "settings": REQUIRED}, "config"),
        # The loader's own keywords, not settings: `env: false` dropped the user's variables unsaid.
        ({"settings": {**REQUIRED, "env": False}}, "settings"),
        ({"settings": {**REQUIRED, "section": "x"}}, "settings"),
    ])
    def test_a_component_config_is_checked_when_validated(self, spec: dict[str, Any], field: str) -> None:
        """Only build() read the settings: `broker --check` took the component, the start failed."""
        from pydantic import ValidationError

        from explainers.subscriber import ExplainerComponentConfig

        with pytest.raises(ValidationError) as info:
            ExplainerComponentConfig.model_validate({"type": "explainer", **spec})
        assert info.value.errors()[0]["loc"] == (field,), info.value
        # No predictor is asked (none listens at :9): reaching it is the start's.
        ExplainerComponentConfig.model_validate({"type": "explainer", "settings": REQUIRED})

    @staticmethod
    @asynccontextmanager
    async def _gated_predictor() -> AsyncIterator[tuple[ExplainerService, threading.Event]]:
        """A started service whose predictor answers nothing while the gate is shut."""
        from infer_logger.demo.predictor import create_app as predictor_app
        from tests.explainers.models import Served

        inner, gate = predictor_app([Served("iris-proba", "iris", proba=True)]), threading.Event()
        gate.set()

        async def gated(scope: Any, receive: Any, send: Any) -> None:
            while scope["type"] == "http" and not gate.is_set():
                await asyncio.sleep(0.01)
            await inner(scope, receive, send)

        with serve(gated) as url:
            svc = service_for(url, subscriber={"linger": 0.001})
            await svc.start()
            try:
                yield svc, gate
            finally:
                gate.set()
                await svc.aclose()

    async def test_a_retry_after_an_attempt_timed_out_joins_the_running_explanation(self) -> None:
        """In process, the broker's attempt timing out cancelled the explanation (its predictor calls
        went on in the workers): every retry started afresh and timed out again, dead-lettered."""
        endpoints = pytest.importorskip("pipelines.broker.endpoints")
        async with self._gated_predictor() as (svc, gate):
            calls = _recorded(svc)
            sub = ExplainSubscriber(svc)
            endpoint = endpoints.ComponentEndpoint("explainer", sub)
            request, response = exchange("t-1")
            assert (await endpoint.send(request, {}, reply=True, timeout=30)).status == 202
            gate.clear()
            timed_out = await endpoint.send(response, {}, reply=True, timeout=0.2)
            assert timed_out.status == endpoints.NO_RESPONSE and timed_out.reply is None
            retry = asyncio.create_task(endpoint.send(response, {}, reply=True, timeout=30))
            for _ in range(3):
                await asyncio.sleep(0)  # the retry reaches the running explanation
            gate.set()
            answer = await retry
            assert answer.status == 200 and answer.reply is not None and answer.reply.id == "t-1", answer
            assert calls == [2] and sub.explained == 1 and len(sub.cache) == 0

    async def test_an_explanation_finished_after_its_attempt_timed_out_goes_to_the_retry(self) -> None:
        endpoints = pytest.importorskip("pipelines.broker.endpoints")
        async with self._gated_predictor() as (svc, gate):
            calls = _recorded(svc)
            sub = ExplainSubscriber(svc)
            endpoint = endpoints.ComponentEndpoint("explainer", sub)
            request, response = exchange("t-2")
            await endpoint.send(request, {}, reply=True, timeout=30)
            gate.clear()
            assert (await endpoint.send(response, {}, reply=True, timeout=0.2)).status == endpoints.NO_RESPONSE
            gate.set()
            await until(lambda: sub.explained == 1, 30, "the explanation finishing on its own")
            answer = await endpoint.send(response, {}, reply=True, timeout=30)
            assert answer.status == 200 and answer.reply is not None and answer.reply.id == "t-2", answer
            assert calls == [2] and len(sub.cache) == 0
            assert (await endpoint.send(request, {}, reply=True, timeout=30)).status == 202  # the other half: done


class TestDeliveryFailures:
    """An explanation that is not delivered leaves the cached half for the retry; malformed events
    are refused with a reason, over a real socket."""

    async def test_reply_sink_down_keeps_the_cached_half(self, service: ExplainerService) -> None:
        from infer_logger.sinks.memory import failing

        out = MemorySink()
        out.fail = failing(1)
        sub = ExplainSubscriber(service, SubscriberSettings(linger=0.001), reply_to=out)
        request, response = exchange("d-1")
        await sub.send_batch([request])
        with pytest.raises(SinkError, match="down"):
            await sub.send_batch([response])
        await sub.send_batch([response])  # the retry: the request is still cached
        assert [e.id for e in out.events] == ["d-1"] and len(sub.cache) == 0

    async def test_a_refused_explanation_does_not_hide_an_others_retryable_failure(
            self, service: ExplainerService, monkeypatch: pytest.MonkeyPatch) -> None:
        """reply_to refusing one explanation for good was raised at once: another exchange's
        retryable failure (the predictor's blip) went unsaid, the batch was committed, and that
        exchange was never explained."""

        class TakesAllButB(MemorySink):
            async def send_batch(self, events: Sequence[CloudEvent]) -> None:
                self.events.extend(e for e in events if e.id != "r-B")
                if any(e.id == "r-B" for e in events):
                    raise RejectedError("413 too large", [e for e in events if e.id == "r-B"], too_large=True)

        out = TakesAllButB()
        sub = ExplainSubscriber(service, SubscriberSettings(linger=0.001), reply_to=out)
        _blip_once(sub, monkeypatch, "r-A")
        batch = [*exchange("r-A"), *exchange("r-B")]
        with pytest.raises(SinkError, match="503") as first:
            await sub.send_batch(batch)
        assert not isinstance(first.value, RejectedError)
        with pytest.raises(RejectedError, match="413") as second:
            await sub.send_batch(batch)  # the worker's retry
        assert [e.id for e in second.value.events] == ["r-B"] and second.value.events[0].type == events.EXPLANATION
        assert [e.id for e in out.events] == ["r-A"] and len(sub.cache) == 1  # r-B's half, for a retry

    async def test_a_request_refused_with_an_others_retryable_failure_is_refused_on_the_retry(
            self, service: ExplainerService, monkeypatch: pytest.MonkeyPatch) -> None:
        """An exchange whose request cannot be explained dropped its cached half at once: when
        another exchange of the batch failed for a while, the retry cached the refused one's
        response as a first half (expired later, counted as a partner that never came), and the
        refusal never reached the caller: no dead letter."""
        out = MemorySink()
        sub = ExplainSubscriber(service, SubscriberSettings(linger=0.001), reply_to=out)
        _blip_once(sub, monkeypatch, "h-A")
        (bad_request, bad_response), (request, response) = exchange("h-C", rows=[[1.0, 2.0]]), exchange("h-A")
        await sub.send_batch([bad_request, request])  # both cached, in an earlier batch
        with pytest.raises(SinkError, match="503") as first:
            await sub.send_batch([bad_response, response])
        assert not isinstance(first.value, RejectedError)
        with pytest.raises(RejectedError, match=r"h-C.*\[n, 4\]") as second:
            await sub.send_batch([bad_response, response])  # the worker's retry
        assert second.value.events == [bad_request] and [e.id for e in out.events] == ["h-A"]
        assert len(sub.cache) == 0
        with pytest.raises(RejectedError, match=r"h-C"):  # delivered again: refused again, nothing cached
            await sub.handle(bad_response)
        assert len(sub.cache) == 0

        # The same over HTTP (a trigger's delivery): 502 for the blip, then 400 for the refusal.
        sub = ExplainSubscriber(service, SubscriberSettings(linger=0.001))
        _blip_once(sub, monkeypatch, "h-A")
        await sub.handle_http(*ce_http.to_batch([bad_request, request]))
        statuses = [(await sub.handle_http(*ce_http.to_batch([bad_response, response])))[0] for _ in range(2)]
        assert statuses == [502, 400] and len(sub.cache) == 1  # A's request: its explanation was not delivered

    async def test_a_refused_explanation_is_refused_again_on_a_retry(self, service: ExplainerService) -> None:
        """Its exchange was settled at once: when the caller could not write the dead letter and
        sent the batch again, nothing was explained, and the batch was committed without it."""
        out = MemorySink()
        out.fail = lambda batch: RejectedError("413 too large", batch, too_large=True)
        sub = ExplainSubscriber(service, SubscriberSettings(linger=0.001), reply_to=out)
        batch = list(exchange("g-1"))
        for _ in range(2):
            with pytest.raises(RejectedError, match="413") as caught:
                await sub.send_batch(batch)
            assert [(e.id, e.type) for e in caught.value.events] == [("g-1", events.EXPLANATION)]

    async def test_failed_starts_close_their_predictor_clients(self, monkeypatch: pytest.MonkeyPatch) -> None:
        """An owned service starts again on each delivery while the predictor answers 5xx: each
        failed start closed nothing, and left a watchdog thread running for good."""
        from fastapi import FastAPI
        from fastapi.responses import Response

        import explainers.service
        from explainers.client import PredictorClient

        down = FastAPI()

        @down.post("/v1/models/{name}:predict")
        async def loading(name: str) -> Response:
            return Response(b'{"error": "model loading"}', status_code=500, media_type="application/json")

        clients: list[PredictorClient] = []

        class Recorded(PredictorClient):
            def __init__(self, *args: Any, **kwargs: Any) -> None:
                super().__init__(*args, **kwargs)
                clients.append(self)

        monkeypatch.setattr(explainers.service, "PredictorClient", Recorded)
        with serve(down) as url:
            sub = ExplainSubscriber(service_for(url, retries=0), owns_service=True)
            request, response = exchange("d-0")
            await sub.handle(request)
            for _ in range(3):
                with pytest.raises(SinkError):
                    await sub.handle(response)
        assert len(clients) == 3 and sub.service.client is None
        assert all(c._session is None and c._watchdog._stopped.is_set() for c in clients)
        await sub.aclose()

    def test_a_batch_that_fails_keeps_the_others_cached_halves(self, model_server: Process) -> None:
        app = create_app(service_for(model_server.url, subscriber={"linger": 0.001}))
        with serve(app) as url:
            good, bad = exchange("d-2"), exchange("d-3", rows=[[1.0, 2.0]])
            headers, body = ce_http.to_batch([good[0], bad[0]])
            r = httpx.post(f"{url}/events", headers=headers, content=body, timeout=30)
            assert r.status_code == 202, r.text  # both requests cached (the bad one is refused on its response)
            headers, body = ce_http.to_batch([good[1], bad[1]])
            r = httpx.post(f"{url}/events", headers=headers, content=body, timeout=30)
            assert r.status_code == 400 and "d-3" in r.json()["error"], r.text
            headers, body = ce_http.to_binary(good[1])  # the good half again, on its own
            r = httpx.post(f"{url}/events", headers=headers, content=body, timeout=30)
            assert r.status_code == 200 and r.headers["ce-id"] == "d-2", r.text

    @pytest.mark.parametrize("data, status", [(b"not json", 400), (b'{"instances": "x"}', 400),
                                              (b"", 400), (b"[1, 2]", 400),
                                              # past orjson's 1024 levels; json's decoder (binary
                                              # tensor data?) raised RecursionError: a 500
                                              (b'{"instances": ' + b"[" * 1100 + b"]" * 1100 + b"}", 400)])
    def test_unreadable_request_data(self, model_server: Process, data: bytes, status: int) -> None:
        with serve(create_app(service_for(model_server.url, subscriber={"linger": 0.001}))) as url:
            request, response = exchange("d-4")
            for event in (CloudEvent(request.attributes, data or None), response):
                headers, body = ce_http.to_binary(event)
                r = httpx.post(f"{url}/events", headers=headers, content=body, timeout=30)
            assert r.status_code == status and "d-4" in r.json()["error"], r.text

    def test_malformed_events_and_failed_responses(self, model_server: Process) -> None:
        with serve(create_app(service_for(model_server.url, subscriber={"linger": 0.001}))) as url:
            for headers, body in [({"content-type": "application/cloudevents+json"}, b"[1]"),
                                  ({"content-type": "application/cloudevents-batch+json"}, b'{"a": 1}'),
                                  ({"ce-specversion": "1.0", "ce-id": "x"}, b"{}")]:
                r = httpx.post(f"{url}/events", headers=headers, content=body, timeout=30)
                assert r.status_code == 400 and "not a CloudEvent" in r.json()["error"], r.text
            request, failed = exchange("d-5", status=500)
            for event in (failed, request):  # the failed response first: nothing to explain
                headers, body = ce_http.to_binary(event)
                assert httpx.post(f"{url}/events", headers=headers, content=body, timeout=30).status_code == 202

    def test_predictor_down_is_502_then_explained(self) -> None:
        from infer_logger.demo.predictor import create_app as predictor_app
        from infer_logger.demo.quickstart import ServerThread
        from infer_logger.server import uvicorn_config
        from infer_logger.testing import free_port
        from tests.explainers.models import Served

        port = free_port()
        predictor = lambda: ServerThread(uvicorn_config(predictor_app([Served("iris-proba", "iris", proba=True)]),
                                                        "127.0.0.1", port))
        request, response = exchange("d-6")
        first = predictor()
        with first:
            service = service_for(f"http://127.0.0.1:{port}", subscriber={"linger": 0.001})
            with serve(create_app(service)) as url:
                def post(event: CloudEvent) -> httpx.Response:
                    headers, body = ce_http.to_binary(event)
                    return httpx.post(f"{url}/events", headers=headers, content=body, timeout=30)

                assert post(request).status_code == 202
                first.__exit__(None, None, None)
                r = post(response)
                assert r.status_code == 502 and "failed after 2 attempts" in r.json()["error"], r.text
                with predictor():  # back: the broker's retry of the response finds the request
                    r = post(response)
                assert r.status_code == 200 and r.headers["ce-id"] == "d-6", r.text


def test_a_binary_part_of_blanks_reads_as_binary_data() -> None:
    """INT8 10 after the JSON part is JSON's trailing whitespace: the request was explained from
    tensors without data (a 400 for a request the predictor had answered)."""
    from explainers.subscriber import _payload
    from infer_logger import binary_tensors
    from infer_logger.cloudevents.event import CloudEvent

    body, _ = binary_tensors.encode({"inputs": [{"name": "x", "shape": [1, 1], "datatype": "INT8"}]}, "inputs",
                                    {"x": binary_tensors.pack_values("INT8", [10])})
    event = CloudEvent({"specversion": "1.0", "id": "1", "source": "/s", "type": "t"}, body)
    assert _payload(event)["inputs"][0]["data"] == [10]

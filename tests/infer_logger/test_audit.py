"""The audit document: pure functions from inference events to partial documents."""

from __future__ import annotations

import itertools
from collections.abc import Mapping
from typing import Any

import orjson
import pytest

from infer_logger import binary_tensors, events
from infer_logger.audit import Document, doc_id, documents, instances
from infer_logger.cloudevents.event import CloudEvent

T_REQUEST = "2025-01-01T00:00:00.100000Z"
T_RESPONSE = "2025-01-01T00:00:00.112000Z"  # 12 ms later: the response's latencyms
T_EXPLANATION = "2025-01-01T00:00:05.000000Z"


def _event(type_: str, body: Any, time: str, id_: str = "a", **extra: Any) -> CloudEvent:
    attrs = {
        "id": id_,
        "source": "http://sidecar",
        "specversion": "1.0",
        "type": type_,
        "time": time,
        "inferenceservicename": "iris",
        "namespace": "default",
        "component": "predictor",
        "endpoint": "",
        "modelname": "iris",
        "protocol": "v1",
        "path": "/v1/models/iris:predict",
        "metadata": '{"x-user": ["ann"]}',
        **extra,
    }
    data = body if isinstance(body, bytes) else orjson.dumps(body)
    return CloudEvent(attrs, data)


def request(body: Any = None, **extra: Any) -> CloudEvent:
    return _event(events.REQUEST, {"instances": [[1, 2], [3, 4]]} if body is None else body, T_REQUEST, **extra)


def response(body: Any = None, status: int | str = 200, **extra: Any) -> CloudEvent:
    body = {"predictions": [0, 1]} if body is None else body
    return _event(events.RESPONSE, body, T_RESPONSE, statuscode=status, latencyms=12, **extra)


def explanation(body: Any = None, **extra: Any) -> CloudEvent:
    body = {"explanations": [{"f0": 0.5}, {"f0": -0.5}]} if body is None else body
    return _event(events.EXPLANATION, body, T_EXPLANATION, **extra)


def parts(event: CloudEvent, kind: str, **options: Any) -> list[Any]:
    return [doc.get(kind) for _, doc in documents(event, **options)]


def merge(into: dict[str, Any], partial: Mapping[str, Any]) -> dict[str, Any]:
    """Elasticsearch's `doc` update: objects merge recursively, anything else is replaced."""
    for key, value in partial.items():
        if isinstance(value, Mapping) and isinstance(into.get(key), dict):
            merge(into[key], value)
        else:
            into[key] = dict(value) if isinstance(value, Mapping) else value
    return into


def answer(**keys: Any) -> dict[str, Any]:
    """A per-instance `response`: the keys it does not set are null (they clear an earlier one's)."""
    return {**dict.fromkeys(("prediction", "probabilities", "values", "outputs", "error", "raw")), **keys}


def _set(part: Any) -> Any:
    """A response part without the keys it sets to null (to clear an earlier response's)."""
    return {k: v for k, v in part.items() if v is not None} if isinstance(part, Mapping) else part


def merged(order: tuple[CloudEvent, ...], **options: Any) -> dict[str, dict[str, Any]]:
    out: dict[str, dict[str, Any]] = {}
    for event in order:
        for key, partial in documents(event, **options):
            merge(out.setdefault(key, {}), orjson.loads(orjson.dumps(partial)))
    return out


class TestMerge:
    """Partials of one exchange merge to the same documents in any arrival order."""

    def test_all_orders_agree(self) -> None:
        exchange = (request(), response(), explanation())
        results = [merged(order) for order in itertools.permutations(exchange)]
        assert all(r == results[0] for r in results[1:])
        assert sorted(results[0]) == ["a-0", "a-1"]
        doc = results[0]["a-1"]
        assert doc["@timestamp"] == T_REQUEST  # the response's time minus its latency agrees
        assert (doc["status"], doc["latency_ms"], doc["instance"]) == (200, 12.0, 1)
        assert doc["request"] == {"values": [3, 4]}
        assert doc["response"] == answer(prediction=1)
        assert doc["explanation"] == {"f0": -0.5}
        assert doc["request_time"] == T_REQUEST and doc["explanation_time"] == T_EXPLANATION

    @pytest.mark.parametrize(("first", "second"), [
        (response({"error": "busy"}, status=503), response()),
        (response(), response({"error": "busy"}, status=503)),
        (response({"predictions": [[0.2, 0.8], [0.6, 0.4]]}), response({"predictions": [7]})),
        (response(b"oops", datacontenttype="text/plain"), response({"predictions": [[1, 2], [3, 4]]})),
    ], ids=["error-then-ok", "ok-then-error", "fewer-items", "raw-then-values"])
    def test_a_later_response_replaces_the_earlier(self, first: CloudEvent, second: CloudEvent) -> None:
        """A retry under the same id (Envoy keeps x-request-id): deep-merged, a 503's error stayed
        beside the 200's prediction."""
        got = merged((request(), first, second), instances=2)
        alone = merged((request(), second), instances=2)
        assert {k: _set(d.get("response")) for k, d in got.items()} == {
            k: _set(d.get("response")) for k, d in alone.items()}
        assert {k: d["status"] for k, d in got.items()} == {k: d["status"] for k, d in alone.items()}

    def test_a_later_response_replaces_the_earlier_cut_marks(self) -> None:
        """The earlier answer was cut (truncated, datasize), the retry's was not: the marks stayed
        in the merged response attributes, saying the answer kept was cut."""
        got = merged((request(), response(truncated=True, datasize=2_000_000), response()), instances=2)
        attributes = got["a-0"]["response_attributes"]
        assert not attributes.get("truncated") and not attributes.get("datasize"), attributes

    def test_a_later_response_replaces_the_earlier_in_one_document(self) -> None:
        got = merged((request(), response(), response({"predictions": [None]})), per_instance=False)
        assert not got["a"].get("response")

    def test_a_later_request_replaces_the_earlier_cut_marks(self) -> None:
        """A retry under the same id: the first try's request was cut, the retry's was not; the
        marks stayed in the merged request attributes, saying the request kept was cut."""
        cut = request(b'{"instances": [[1, 2], [3', truncated=True, datasize=2_000_000)
        got = merged((cut, request()))
        assert all(not d["request_attributes"].get("truncated") for d in got.values()), got
        assert all(not d["request_attributes"].get("datasize") for d in got.values()), got

    def test_a_later_request_replaces_the_earlier_in_one_document(self) -> None:
        got = merged((request(), request({"instances": [None]})), per_instance=False)
        assert not got["a"].get("request")

    def test_no_field_is_written_differently_by_two_kinds(self) -> None:
        docs = {e.type: documents(e)[0][1] for e in (request(), response(), explanation())}
        for (_, a), (_, b) in itertools.combinations(docs.items(), 2):
            assert all(a[k] == b[k] for k in a.keys() & b.keys())


class TestCommon:
    """Attributes every document gets, and the ones only some kinds write."""

    def test_request_attributes(self) -> None:
        (key, doc), _ = documents(request())
        assert key == "a-0"
        assert doc["id"] == "a" and doc["instance"] == 0
        assert doc["model"] == "iris" and doc["service"] == "iris" and doc["namespace"] == "default"
        assert doc["protocol"] == "v1" and doc["path"] == "/v1/models/iris:predict"
        assert "endpoint" not in doc  # "" is unset: it must not overwrite a value
        assert doc["metadata"] == {"x-user": ["ann"]}
        assert "status" not in doc and "latency_ms" not in doc
        assert doc["request_attributes"]["type"] == events.REQUEST

    def test_attributes_are_text(self) -> None:
        doc = documents(response(truncated=True))[0][1]
        assert doc["response_attributes"]["statuscode"] == "200"
        assert doc["response_attributes"]["truncated"] == "true"

    def test_binary_mode_text_attributes(self) -> None:
        doc = documents(_event(events.RESPONSE, {"predictions": [1]}, T_RESPONSE,
                               statuscode="503", latencyms="7"))[0][1]
        assert (doc["status"], doc["latency_ms"]) == (503, 7.0)
        assert doc["@timestamp"] == "2025-01-01T00:00:00.105000Z"

    def test_metadata_that_is_not_an_object(self) -> None:
        assert documents(request(metadata="x-user=ann"))[0][1]["metadata"] == {"raw": "x-user=ann"}
        assert documents(request(metadata="[1]"))[0][1]["metadata"] == {"raw": "[1]"}
        assert "metadata" not in documents(request(metadata=""))[0][1]

    def test_times_to_utc(self) -> None:
        doc = documents(_event(events.REQUEST, {"instances": [1]}, "2025-01-01T02:00:00+02:00"))[0][1]
        assert doc["@timestamp"] == doc["request_time"] == "2025-01-01T00:00:00.000000Z"

    @pytest.mark.parametrize(("time", "utc"), [
        ("2025-01-01t00:30:00z", "2025-01-01T00:30:00.000000Z"),  # RFC 3339 allows lower case
        ("2016-12-31T23:59:60+01:00", "2016-12-31T22:59:59.999999Z"),  # a leap second
    ])
    def test_rfc_3339_times_fromisoformat_refuses(self, time: str, utc: str) -> None:
        """They had no @timestamp: the document dropped out of every time-based view."""
        doc = documents(_event(events.REQUEST, {"instances": [1]}, time))[0][1]
        assert doc["@timestamp"] == doc["request_time"] == utc

    def test_times_at_the_edge_of_year_1(self) -> None:
        early = documents(_event(events.REQUEST, {"instances": [1]}, "0001-01-01T00:30:00+01:00"))[0][1]
        assert "@timestamp" not in early and "request_time" not in early  # before year 1 in UTC
        doc = documents(_event(events.RESPONSE, {"predictions": [1]}, "0001-01-01T00:00:00Z",
                               statuscode=200, latencyms=5))[0][1]
        assert "@timestamp" not in doc and doc["response_time"] == "0001-01-01T00:00:00.000000Z"
        old = documents(_event(events.REQUEST, {"instances": [1]}, "0999-12-31T23:59:59Z"))[0][1]
        assert old["@timestamp"] == "0999-12-31T23:59:59.000000Z"  # 4 digits, as dates need

    @pytest.mark.parametrize("latency", ["1e20", "nan", "inf", "-1e300"])
    def test_an_impossible_latency_is_left_out(self, latency: str) -> None:
        doc = documents(_event(events.RESPONSE, {"predictions": [1]}, T_RESPONSE, statuscode=200,
                               latencyms=latency))[0][1]
        assert "latency_ms" not in doc and doc["@timestamp"] == T_RESPONSE

    def test_explanation_writes_no_shared_attributes(self) -> None:
        doc = documents(explanation(component="explainer"))[0][1]
        assert not {"@timestamp", "model", "component", "metadata", "status"} & doc.keys()
        assert doc["explanation_attributes"]["component"] == "explainer"

    def test_other_types_make_nothing(self) -> None:
        assert documents(_event("com.example.other", {}, T_REQUEST)) == []

    def test_long_ids_are_hashed(self) -> None:
        long = "x" * 600
        assert doc_id("a", 3) == "a-3" and doc_id("a") == "a"
        assert doc_id(long, 0).startswith("sha256:") and len(doc_id(long, 0)) < 512
        assert doc_id(long, 0) == doc_id(long, 0)


class TestRequest:
    """`request` holds the instance's features: by name when names are known."""

    def test_lists_without_names(self) -> None:
        assert parts(request(), "request") == [{"values": [1, 2]}, {"values": [3, 4]}]

    def test_lists_with_names(self) -> None:
        got = parts(request(), "request", feature_names=["a", "b"])
        assert got == [{"features": {"a": 1, "b": 2}}, {"features": {"a": 3, "b": 4}}]

    def test_names_of_another_length_are_ignored(self) -> None:
        assert parts(request(), "request", feature_names=["a"]) == [{"values": [1, 2]}, {"values": [3, 4]}]

    def test_object_instances(self) -> None:
        got = parts(request({"instances": [{"sepal": 5.1, "kind": "x"}]}), "request")
        assert got == [{"features": {"sepal": 5.1, "kind": "x"}}]

    def test_v2_one_tensor(self) -> None:
        body = {"inputs": [{"name": "input-0", "shape": [2, 2], "datatype": "FP32", "data": [1, 2, 3, 4]}]}
        assert parts(request(body), "request", feature_names=["a", "b"]) == [
            {"features": {"a": 1, "b": 2}},
            {"features": {"a": 3, "b": 4}},
        ]

    def test_v2_named_columns(self) -> None:
        body = {"inputs": [{"name": "age", "shape": [2], "datatype": "INT64", "data": [30, 40]},
                           {"name": "city", "shape": [2], "datatype": "BYTES", "data": ["a", "b"]}]}
        assert parts(request(body), "request") == [
            {"features": {"age": 30, "city": "a"}},
            {"features": {"age": 40, "city": "b"}},
        ]

    def test_lists_holding_objects(self) -> None:
        tokens = [{"token": "a", "pos": 1}, {"token": "b", "pos": 2}]
        assert parts(request({"instances": [tokens]}), "request") == [{"items": tokens}]
        # Top-level items that are not objects are wrapped: `items` is flattened, objects only.
        mixed = [{"token": "a"}, 3, [{"token": "b"}], None]
        assert parts(request({"instances": [mixed]}), "request") == [
            {"items": [{"token": "a"}, {"value": 3}, {"value": [{"token": "b"}]}, {"value": None}]}
        ]
        assert parts(request({"instances": [[[1, "x"], [None, True]]]}), "request") == [
            {"values": [[1, "x"], [None, True]]}  # lists of scalars at any depth stay values
        ]

    def test_deep_lists_do_not_recurse(self) -> None:
        deep = b'{"instances": [' + b"[" * 1000 + b"1" + b"]" * 1000 + b"]}"  # as deep as orjson reads
        (got,) = parts(request(deep), "request")
        assert list(got) == ["values"]

    @pytest.mark.parametrize("body", [
        b'{"instances":' + b"[" * 1100 + b"]" * 1100 + b"}",  # past orjson's 1024 levels: raw
        b'{"inputs":[{"name":"x","datatype":"FP32","shape":[' + b",".join([b"1"] * 1000) + b'],"data":[1]}]}',
    ])
    def test_payloads_deeper_than_python_recurses_make_one_document(self, body: bytes) -> None:
        """Both raised RecursionError (while finding the end of the JSON, while reshaping rows)."""
        assert instances(request(body)) == len(documents(request(body))) == 1

    def test_instance_count(self) -> None:
        assert instances(request()) == 2
        assert instances(request({"instances": "x"})) == 1
        assert instances(request(b"\x00\x01")) == 1
        v2 = {"inputs": [{"name": "input-0", "shape": [3, 1], "datatype": "FP32", "data": [1, 2, 3]}]}
        assert instances(request(v2)) == len(documents(request(v2))) == 3

    def test_scalars_and_binary(self) -> None:
        assert parts(request({"instances": ["some text"]}), "request") == [{"value": "some text"}]
        (got,) = parts(request(b"\x00\x01"), "request")
        assert got == {"raw": "AAE="}  # kept as is, never features
        assert parts(request({"base64": "AAE="}), "request") == [{"features": {"base64": "AAE="}}]  # JSON


class TestResponse:
    """`response` holds the prediction, and probabilities when the output is a distribution."""

    def test_scalars(self) -> None:
        assert parts(response(), "response") == [answer(prediction=0), answer(prediction=1)]
        assert parts(response({"predictions": ["cat"]}), "response") == [answer(prediction="cat")]

    def test_distribution(self) -> None:
        got = parts(response({"predictions": [[0.1, 0.7, 0.2], [0.5, 0.5]]}), "response")
        assert got == [answer(prediction=1, probabilities=[0.1, 0.7, 0.2]),
                       answer(prediction=0, probabilities=[0.5, 0.5])]

    @pytest.mark.parametrize("row", [[0.2, 0.2], [1.5, -0.5], [3, 4], [0.9]])
    def test_other_lists(self, row: list[float]) -> None:
        assert parts(response({"predictions": [row]}), "response") == [answer(values=row)]

    def test_v2_one_output(self) -> None:
        body = {"outputs": [{"name": "output-0", "shape": [2], "datatype": "INT64", "data": [2, 0]}]}
        assert parts(response(body), "response") == [answer(prediction=2), answer(prediction=0)]

    def test_v2_several_outputs(self) -> None:
        body = {"outputs": [{"name": "label", "shape": [1], "datatype": "BYTES", "data": ["cat"]},
                            {"name": "score", "shape": [1], "datatype": "FP32", "data": [0.9]}]}
        assert parts(response(body), "response") == [answer(outputs={"label": "cat", "score": 0.9})]

    @pytest.mark.parametrize("status", [500, "500"])
    def test_error_goes_to_every_known_instance(self, status: int | str) -> None:
        docs = documents(response({"error": "boom"}, status=status), instances=3)
        assert [k for k, _ in docs] == ["a-0", "a-1", "a-2"]
        assert all(d["response"] == answer(error='{"error":"boom"}') and d["status"] == 500 for _, d in docs)

    def test_a_large_error_is_whole_on_the_first_instance_only(self) -> None:
        body = {"error": "E" * 5000}
        text = orjson.dumps(body).decode()
        docs = documents(response(body, status=500), instances=400)
        assert len(docs) == 400 and all(d["status"] == 500 for _, d in docs)
        assert docs[0][1]["response"] == answer(error=text)
        for _, doc in docs[1:]:
            error = doc["response"]["error"]
            assert error.startswith(text[:1000]) and len(error) < 1100
            assert f"cut from {len(text)} characters" in error

    def test_not_json_or_truncated_is_raw(self) -> None:
        plain = response(b"setosa", datacontenttype="text/plain")
        assert parts(plain, "response") == [answer(raw="c2V0b3Nh")]
        cut = orjson.dumps({"predictions": [1, 2, 3]})[:10]
        (got,) = parts(response(cut, truncated=True, datasize=99), "response")
        assert got == answer(raw=got["raw"])  # not a prediction of the first 10 bytes
        assert parts(explanation(b"<html>"), "explanation") == [{"raw": "PGh0bWw+"}]

    def test_fewer_predictions_than_instances(self) -> None:
        docs = documents(response({"predictions": [7]}), instances=3)
        assert [d.get("response") for _, d in docs] == [answer(prediction=7), answer(), answer()]
        assert all(d["status"] == 200 and d["latency_ms"] == 12.0 for _, d in docs)

    def test_an_error_nested_past_what_orjson_writes_is_its_own_text(self) -> None:
        """A 500 whose body nests 300 deep (orjson writes 254 levels) raised TypeError."""
        body = b'{"error":' + b"[" * 300 + b"]" * 300 + b"}"
        (got,) = parts(response(body, status=500), "response")
        assert got == answer(error=body.decode())

    def test_an_error_body_that_is_not_json_is_its_text(self) -> None:
        """A proxy's plain-text or HTML error page was `{"base64":"..."}` as text."""
        page = b"upstream connect error or disconnect/reset before headers. reset reason: overflow"
        docs = documents(response(page, status=503, datacontenttype="text/plain"), instances=2)
        assert [d["response"] for _, d in docs] == [answer(error=page.decode())] * 2
        cut = b'{"error": "CUDA out of mem'
        (cut_part,) = parts(response(cut, status=500, truncated=True, datasize=99), "response")
        assert cut_part == answer(error=cut.decode())

    def test_an_error_body_is_text_only_when_its_bytes_are(self) -> None:
        """Decoded as UTF-8 with U+FFFD for what was not, a page in another charset lost its bytes:
        they are text in the charset named, else `{"base64":"..."}` as text, as the store has them."""
        page = "<p>Erreur : réessayez à 10h</p>"
        sent = page.encode("cp1252")
        named = response(sent, status=503, datacontenttype="text/html; charset=windows-1252")
        assert parts(named, "response") == [answer(error=page)]
        (unnamed,) = parts(response(sent, status=503, datacontenttype="text/html"), "response")
        assert unnamed == answer(error=orjson.dumps(events.RawPayload.of(sent)).decode())
        cut = response(page.encode()[:14], status=503, truncated=True, datasize=99)  # in "é"'s two bytes
        assert parts(cut, "response") == [answer(error="<p>Erreur : r")]

    def test_binary_nan_and_infinities_stay_null(self) -> None:
        """Elasticsearch refuses them in a numeric field, as "NaN" text too (the audit store keeps
        that text): the document would be refused, its event dead-lettered."""
        head = {"outputs": [{"name": "y", "shape": [3], "datatype": "FP32"}]}
        values = binary_tensors.pack_values("FP32", [float("nan"), float("inf"), 0.5])
        body, _ = binary_tensors.encode(head, "outputs", {"y": values})
        docs = [orjson.loads(orjson.dumps(doc)) for _, doc in documents(response(body))]
        assert [d["response"] for d in docs] == [answer(prediction=p) for p in (None, None, 0.5)]

    def test_binary_bf16_by_instance(self) -> None:
        """BF16 (Triton's bfloat16) binary data: numbers per instance, not one base64 blob."""
        head = {"outputs": [{"name": "y", "shape": [3], "datatype": "BF16"}]}
        body, _ = binary_tensors.encode(head, "outputs", {"y": binary_tensors.pack_values("BF16", [1.0, -2.5, 0.5])})
        docs = [orjson.loads(orjson.dumps(doc)) for _, doc in documents(response(body))]
        assert [d["response"] for d in docs] == [answer(prediction=p) for p in (1.0, -2.5, 0.5)]

    def test_error_without_known_instances(self) -> None:
        assert [k for k, _ in documents(response("plain text", status=502))] == ["a-0"]

    def test_an_error_without_a_body_is_no_null(self) -> None:
        """Its error read "null", as if the predictor had answered the JSON `null` (which still does)."""
        empty = response(status=500)
        empty = CloudEvent({k: v for k, v in empty.attributes.items() if k != "datacontenttype"}, None)
        assert [doc["response"]["error"] for _, doc in documents(empty, instances=2)] == ["", ""]
        said_null = _event(events.RESPONSE, None, T_RESPONSE, statuscode=500)  # the body `null`
        assert [doc["response"]["error"] for _, doc in documents(said_null)] == ["null"]


class TestExplanation:
    """`explanation` keeps the explainer's object; lists become attributions by feature."""

    def test_objects_as_they_are(self) -> None:
        body = {"explanations": [{"method": "shap", "attributions": {"f0": 0.5}}]}
        assert parts(explanation(body), "explanation") == [{"method": "shap", "attributions": {"f0": 0.5}}]

    def test_lists(self) -> None:
        body = {"explanations": [[0.1, -0.2]]}
        assert parts(explanation(body), "explanation") == [{"values": [0.1, -0.2]}]
        assert parts(explanation(body), "explanation", feature_names=["a", "b"]) == [
            {"attributions": {"a": 0.1, "b": -0.2}}
        ]
        pairs = [{"feature": "x", "value": 0.3}, {"feature": "y", "value": -0.1}]
        assert parts(explanation({"explanations": [pairs]}), "explanation") == [{"items": pairs}]


class TestPerExchange:
    """`per_instance=False`: one document per id, parts as lists."""

    def test_one_document(self) -> None:
        docs: list[tuple[str, Document]] = []
        for event in (request(), response(), explanation()):
            docs += documents(event, per_instance=False)
        assert {k for k, _ in docs} == {"a"}
        assert all("instance" not in d for _, d in docs)
        doc = merged((request(), response(), explanation()), per_instance=False)["a"]
        assert doc["request"] == [{"values": [1, 2]}, {"values": [3, 4]}]
        assert doc["response"] == [{"prediction": 0}, {"prediction": 1}]
        assert doc["status"] == 200

    def test_error(self) -> None:
        ((key, doc),) = documents(response({"error": "boom"}, status=500), per_instance=False, instances=4)
        assert key == "a" and doc["response"] == [{"error": '{"error":"boom"}'}]

from __future__ import annotations

import base64
import dataclasses
import itertools
import json
import sqlite3
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import orjson
import pytest

from infer_logger import audit, binary_tensors, events
from infer_logger import store as store_module
from infer_logger.cloudevents.event import CloudEvent
from infer_logger.errors import InferLoggerError
from infer_logger.store import _SCHEMA, SCHEMA_VERSION, AuditRecord, AuditStore, format_table, records_to_json

T0 = "2025-01-01T00:00:00.000000Z"
T1 = "2025-01-01T00:05:00.000000Z"


def _attrs(type_: str, id_: str, time: str, **extra: Any) -> dict[str, Any]:
    return {
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


def request(id_: str = "a", body: Any = None, time: str = T0, **extra: Any) -> CloudEvent:
    body = {"instances": [[1, 2], [3, 4]]} if body is None else body
    return CloudEvent(_attrs(events.REQUEST, id_, time, **extra), orjson.dumps(body))


def response(
    id_: str = "a", body: Any = None, status: int = 200, latency: float = 12.5, time: str = T0, **extra: Any
) -> CloudEvent:
    body = {"predictions": [0, 1]} if body is None else body
    data = body if isinstance(body, bytes) else orjson.dumps(body)
    attrs = _attrs(events.RESPONSE, id_, time, statuscode=status, latencyms=latency, **extra)
    return CloudEvent(attrs, data)


def explanation(id_: str = "a", body: Any = None, time: str = T0) -> CloudEvent:
    body = {"explanations": [{"f0": 0.5}, {"f0": -0.5}]} if body is None else body
    return CloudEvent(_attrs(events.EXPLANATION, id_, time), orjson.dumps(body))


# A client's retry that kept x-request-id: three instances, then one, five minutes later.
RETRY = {
    "r1": request(body={"instances": [[1], [2], [3]]}),
    "p1": response(body={"predictions": [10, 20, 30]}),
    "e1": explanation(body={"explanations": [{"f0": 1}, {"f0": 2}, {"f0": 3}]}),
    "r2": request(body={"instances": [[9]]}, time=T1),
    "p2": response(body={"predictions": [90]}, time=T1),
    "e2": explanation(body={"explanations": [{"f0": 9}]}, time=T1),
    # ... or with instances nested too deep to write as JSON: their text is NULL, the payload whole on the first
    "r3": CloudEvent(_attrs(events.REQUEST, "a", T1), b'{"instances": [%s]}' % b",".join(
        [b"[" * 1020 + b"1" + b"]" * 1020] * 3)),
    "p3": response(body={"predictions": [7, 8, 9]}, time=T1),
}


@pytest.fixture
def store(tmp_path: Path) -> Iterator[AuditStore]:
    with AuditStore(tmp_path / "audit.db") as s:
        yield s


def _by_instance(store: AuditStore, id_: str = "a") -> list[AuditRecord]:
    return sorted(store.query(id=id_), key=lambda r: r.instance)


class TestJoin:
    """Request, response and explanation meet in one record per instance, whatever their order."""

    @pytest.mark.parametrize("order", list(itertools.permutations(["request", "response", "explanation"])))
    @pytest.mark.parametrize("batched", [False, True])
    def test_every_arrival_order(self, store: AuditStore, order: tuple[str, ...], batched: bool) -> None:
        made = {"request": request(), "response": response(), "explanation": explanation()}
        if batched:
            store.write([made[k] for k in order])
        else:
            for kind in order:
                store.write([made[kind]])
        first, second = _by_instance(store)
        assert (first.request, first.response, first.explanation) == ([1, 2], 0, {"f0": 0.5})
        assert (second.request, second.response, second.explanation) == ([3, 4], 1, {"f0": -0.5})
        for record in (first, second):
            assert (record.status, record.latency_ms, record.model, record.service) == (200, 12.5, "iris", "iris")
            assert record.metadata == {"x-user": ["ann"]}
            assert record.request_attributes and record.request_attributes["type"] == events.REQUEST
            assert record.response_attributes and record.response_attributes["statuscode"] == 200
            assert record.explanation_attributes is not None

    @pytest.mark.parametrize(
        "before, pair",
        [
            ([], [request(), response()]),
            ([], [response(body={"predictions": [0, 1, 2]}), request(endpoint="canary")]),
            ([], [request(modelname=""), response(modelname="iris-v2")]),
            ([], [request(), response(status=500, body=b"boom")]),
            ([explanation(body={"explanations": [{"f0": 1}, {"f0": 2}, {"f0": 3}]})], [request(), response()]),
            ([request(), response(status=503)], [request(namespace="prod"), response(status=200)]),
            ([request(), response()], [request(), response(status=503, body={"error": "busy"})]),
            # KServe's "" for unset: the rows beyond the response's items had its model only paired.
            ([], [request(body={"instances": [[1], [2], [3]]}, modelname="", namespace=""), response()]),
            ([request(body={"instances": [[1], [2], [3]]}), response(body={"predictions": [0, 1, 2]})],
             [request(body={"instances": [[9]]}, time=T1), response(body={"predictions": [9]}, time=T1)]),
        ],
    )
    def test_a_pair_in_one_batch_is_written_as_in_two(
        self, tmp_path: Path, before: list[CloudEvent], pair: list[CloudEvent]
    ) -> None:
        """The one-upsert path for a request and its response leaves what separate writes would."""
        with AuditStore(tmp_path / "one.db") as one, AuditStore(tmp_path / "apart.db") as apart:
            for store in (one, apart):
                for event in before:
                    store.write([event])
            one.write(pair)
            for event in pair:
                apart.write([event])
            fields = [f for f in AuditRecord.__dataclass_fields__ if f != "updated"]
            rows = [[[getattr(r, f) for f in fields] for r in _by_instance(s)] for s in (one, apart)]
            assert rows[0] == rows[1]

    def test_redelivery_overwrites(self, store: AuditStore) -> None:
        batch = [request(), response(), explanation()]
        store.write(batch)
        store.write(batch)
        store.write([batch[0], batch[0]])
        assert len(store.query()) == 2
        assert store.summary().records == 2

    def test_redelivered_response_replaces(self, store: AuditStore) -> None:
        store.write([request(), response(status=503, body={"error": "busy"})])
        store.write([response(status=200)])
        assert [(r.status, r.response) for r in _by_instance(store)] == [(200, 0), (200, 1)]

    @pytest.mark.parametrize("batches", [
        [[request(), response()], [request(), response(status=503, body={"error": "busy"})]],
        [[request()], [response()], [response(status=503, body={"error": "busy"})]],
        [[request(), response(body={"predictions": [0, 1, 2]})],
         [response(status=503, body={"error": "busy"})]],
    ], ids=["as-pairs", "kind-by-kind", "beyond-the-request"])
    def test_a_later_response_with_fewer_items_replaces_all_of_the_earlier(
        self, store: AuditStore, batches: list[list[CloudEvent]]
    ) -> None:
        """A retry under the same id logged in completion order (a 200, then the 503 of a try
        that timed out): instance 1 kept the 200's prediction and attributes under the 503."""
        for batch in batches:
            store.write(batch)
        records = _by_instance(store)
        assert [(r.status, r.response) for r in records][:2] == [(503, {"error": "busy"}), (503, None)]
        assert all(r.status == 503 for r in records)
        assert [(r.response_attributes or {}).get("statuscode") for r in records][:2] == [503, None]
        assert all(r.response is None and r.response_attributes is None for r in records[1:])

    def test_rows_beyond_the_response_s_items_have_the_request_s_attributes(self, tmp_path: Path) -> None:
        """Paired, they had the response's model too; apart, not (`query --model` found 3 vs 2)."""
        asked = request(body={"instances": [[1], [2], [3]]}, modelname="")
        for name, batches in (("one", [[asked, response()]]), ("apart", [[asked], [response()]])):
            with AuditStore(tmp_path / f"{name}.db") as s:
                for batch in batches:
                    s.write(batch)
                assert [(r.instance, r.model) for r in _by_instance(s)] == [
                    (0, "iris"), (1, "iris"), (2, None)]

    @pytest.mark.parametrize("batches", [
        "r1 p1|r2 p2", "r1|p1|r2|p2", "r1 p1 r2 p2", "r1 p1 r2|p2", "r1|p1 p2 r2"])
    def test_a_later_request_replaces_the_earlier_whole(self, store: AuditStore, batches: str) -> None:
        """A client's retry that kept x-request-id, with fewer instances: the first try's instances
        1 and 2 stayed, under the retry's status with no prediction (or with the first's, dated by
        it), or not, by how the sink worker batched the four events."""
        for batch in batches.split("|"):
            store.write([RETRY[name] for name in batch.split()])
        asked = [(r.request_attributes or {}).get("time") for r in _by_instance(store)]
        assert [(r.instance, r.time, r.status, r.request, r.response) for r in _by_instance(store)] == [
            (0, T1, 200, [9], 90)]
        assert asked == [T1]

    @pytest.mark.parametrize("sequence", [
        "r1 p1 r2 p2", "p1 r1 p2 r2", "r1 p1 p2 r2", "r1 r2 p1 p2", "r1 p1 r2", "r1 p1 p2",
        "r1 p1 e1 r2 p2", "r1 p1 r2 p2 e1", "e1 r1 p1 r2", "r2 p2 r1 p1", "r1 p1 r1 p2",
        "r1 p1 e1 r2 p2 e2", "e1 e2 r1", "r2 e1 p2 e2", "r1 p1 r3 p3",
    ])
    def test_a_retry_makes_the_same_rows_however_batched(self, tmp_path: Path, sequence: str) -> None:
        """Every way of cutting the same events, in the same order, into sink-worker batches."""
        named = sequence.split()
        fields = [f for f in AuditRecord.__dataclass_fields__ if f != "updated"]
        ends: list[tuple[tuple[bool, ...], list[list[Any]]]] = []
        for cuts in itertools.product((False, True), repeat=len(named) - 1):
            with AuditStore(tmp_path / f"{len(ends)}.db") as s:
                batch = [RETRY[named[0]]]
                for name, cut in zip(named[1:], cuts):
                    if cut:
                        s.write(batch)
                        batch = []
                    batch.append(RETRY[name])
                s.write(batch)
                ends.append((cuts, [[getattr(r, f) for f in fields] for r in _by_instance(s)]))
        assert [cuts for cuts, rows in ends if rows != ends[-1][1]] == []  # the last: one event a batch

    def test_a_later_request_keeps_the_earlier_explanation(self, store: AuditStore) -> None:
        """A request or response clears no explanation: rows left with only the first try's are
        undated, as an explanation's row beyond its exchange's is."""
        for name in "r1 p1 e1 r2 p2".split():
            store.write([RETRY[name]])
        assert [(r.instance, r.time, r.status, r.request, r.response, r.explanation)
                for r in _by_instance(store)] == [
            (0, T1, 200, [9], 90, {"f0": 1}), (1, None, 200, None, None, {"f0": 2}),
            (2, None, 200, None, None, {"f0": 3})]

    def test_a_later_explanation_replaces_the_earlier_whole(self, store: AuditStore) -> None:
        """As requests and responses do: batched together only the later one was written."""
        for name in "r1 p1 e1 e2".split():
            store.write([RETRY[name]])
        assert [r.explanation for r in _by_instance(store)] == [{"f0": 9}, None, None]
        assert [r.explanation_attributes is None for r in _by_instance(store)] == [False, True, True]

    def test_a_redelivered_request_keeps_the_response(self, store: AuditStore) -> None:
        store.write([RETRY["r1"], RETRY["p1"]])
        store.write([RETRY["r1"]])
        store.write([RETRY["r1"], RETRY["r1"], RETRY["p1"]])
        store.write([RETRY["p1"]])
        assert [(r.request, r.response, r.status) for r in _by_instance(store)] == [
            ([1], 10, 200), ([2], 20, 200), ([3], 30, 200)]

    def test_request_attributes_win(self, store: AuditStore) -> None:
        store.write([response(time="2025-01-01T00:00:01.000000Z", modelversion="")])
        store.write([request(modelversion="v3")])
        record = _by_instance(store)[0]
        assert (record.time, record.model_version) == (T0, "v3")

    def test_paired_request_fills_gaps_from_response(self, store: AuditStore) -> None:
        store.write([request(modelversion="", endpoint="canary"), response(modelversion="v2", endpoint="x")])
        assert {(r.model_version, r.endpoint) for r in store.query()} == {("v2", "canary")}

    def test_non_text_attribute_values_keep_their_text(self, store: AuditStore) -> None:
        # Numbers and booleans are valid attribute values; `True == 1` must not share a conversion.
        for id_, version in (("a", 1), ("b", True), ("c", "1"), ("d", 1)):
            store.write([request(id_, modelversion=version), response(id_, modelversion=version)])
        assert {r.id: r.model_version for r in store.query()} == {"a": "1", "b": "True", "c": "1", "d": "1"}

    def test_endpoint_empty_string_is_null(self, store: AuditStore) -> None:
        store.write([request()])
        assert store.query()[0].endpoint is None


    @pytest.mark.parametrize("order", ["r|p|e", "rpe", "r|pe", "e|rp", "e|r|p", "p|e|r"])
    def test_the_same_events_make_the_same_rows_however_batched(self, tmp_path: Path, order: str) -> None:
        """A row beyond the request's one instance took its time from the explanation or from the
        response, by how the sink worker happened to batch the events (now the request's)."""
        events_ = {"r": request(body={"instances": [[1, 2]]}, time="2026-01-01T00:00:00Z"),
                   "p": response(time="2026-01-01T00:00:01Z"),
                   "e": explanation(time="2026-01-01T00:00:05Z")}

        def rows(batches: str, name: str) -> list[tuple[Any, ...]]:
            with AuditStore(tmp_path / name) as s:
                for batch in batches.split("|"):
                    s.write([events_[kind] for kind in batch])
                return [(r.instance, r.time, r.status, r.request, r.response, r.explanation) for r in _by_instance(s)]

        assert rows(order, "a.db") == rows("r|p|e", "ref.db")
        assert [row[1] for row in rows(order, "b.db")] == ["2026-01-01T00:00:00.000000Z"] * 2

    @pytest.mark.parametrize("order", ["r|p", "rp", "p|r", "pr", "p|rp", "rp|p|r"])
    def test_an_exchange_is_dated_by_its_request_whatever_the_order(self, tmp_path: Path, order: str) -> None:
        """Rows beyond the request's instances (a cut request has one) were dated by the response,
        5 s later: --since/--until cut the exchange in two, and `query --id` listed instance 0 last."""
        cut = CloudEvent({**request().attributes, "truncated": True, "datasize": 999}, b'{"instances": [[1')
        # Its latency is not quite the time between the two events: its rows wait for the request's.
        answer = response(body={"predictions": [0, 1, 2]}, latency=4990, time="2025-01-01T00:00:05.000000Z")
        made = {"r": cut, "p": answer}
        with AuditStore(tmp_path / "a.db") as s:
            for batch in order.split("|"):
                s.write([made[kind] for kind in batch])
            assert [(r.instance, r.time) for r in s.query(id="a", order="asc")] == [(0, T0), (1, T0), (2, T0)]
            assert len(s.query(until="2025-01-01T00:00:01Z")) == 3
            assert s.query(since="2025-01-01T00:00:01Z") == []

    def test_a_response_alone_is_dated_when_its_request_came(self, store: AuditStore) -> None:
        """By its time less its latency, as the audit documents' @timestamp; then by the request."""
        store.write([response(body={"predictions": [0, 1]}, latency=250, time="2025-01-01T00:00:01.000000Z")])
        assert [r.time for r in _by_instance(store)] == ["2025-01-01T00:00:00.750000Z"] * 2
        store.write([request(body={"instances": [[1]]})])
        assert [r.time for r in _by_instance(store)] == [T0, T0]


class TestExchanges:
    """An exchange is its id within its namespace and service: CloudEvents ids are unique per
    source only, and a mesh gives one x-request-id to every service a request reaches."""

    def _two_services(self) -> list[CloudEvent]:
        iris = {"inferenceservicename": "iris", "modelname": "iris"}
        wine = {"inferenceservicename": "wine", "modelname": "wine", "source": "http://wine-sidecar"}
        return [request("req-1", **iris), request("req-1", body={"instances": [[5]]}, **wine),
                response("req-1", **iris), response("req-1", body={"predictions": [7]}, latency=3.0, **wine)]

    @pytest.mark.parametrize("batched", [True, False])
    def test_two_services_given_one_id_keep_their_rows(self, store: AuditStore, batched: bool) -> None:
        """The iris exchange was lost: the wine one, written after, overwrote its rows (and, the
        events interleaved, wine's request was joined to iris's response meanwhile)."""
        made = self._two_services()
        for batch in [made] if batched else [[e] for e in made]:
            store.write(batch)
        rows = sorted((r.service, r.instance, r.request, r.response, r.latency_ms) for r in store.query(id="req-1"))
        assert rows == [("iris", 0, [1, 2], 0, 12.5), ("iris", 1, [3, 4], 1, 12.5), ("wine", 0, [5], 7, 3.0)]
        assert [r.instance for r in store.query(model="iris")] == [0, 1]
        assert (store.summary().records, store.summary().ids) == (3, 2)

    def test_an_explanation_joins_its_service_s_exchange(self, store: AuditStore) -> None:
        wine = dict(_attrs(events.EXPLANATION, "req-1", T0), inferenceservicename="wine", modelname="wine")
        store.write([*self._two_services(), CloudEvent(wine, orjson.dumps({"explanations": [{"f0": 3}]}))])
        by_service = {(r.service, r.instance): r.explanation for r in store.query(id="req-1")}
        assert by_service == {("iris", 0): None, ("iris", 1): None, ("wine", 0): {"f0": 3}}

    def test_an_id_is_not_found_by_its_beginning(self, store: AuditStore) -> None:
        store.write([request("req"), request("req-1"), request("re", namespace="", inferenceservicename="")])
        assert {r.id for r in store.query(id="req")} == {"req"}
        assert {r.id for r in store.query(id="re")} == {"re"}


SCHEMA_1 = """
CREATE TABLE records (
    id TEXT NOT NULL, instance INTEGER NOT NULL, time TEXT, model TEXT, model_version TEXT, service TEXT,
    namespace TEXT, component TEXT, endpoint TEXT, protocol TEXT, path TEXT, metadata TEXT, status INTEGER,
    latency_ms REAL, request TEXT, response TEXT, explanation TEXT, request_attributes TEXT,
    response_attributes TEXT, explanation_attributes TEXT, updated TEXT NOT NULL, PRIMARY KEY (id, instance)
);
CREATE INDEX records_time ON records (time);
CREATE INDEX records_model_time ON records (model, time);
CREATE INDEX records_status_time ON records (status, time);
PRAGMA user_version = 1;
"""


class TestSchema1:
    """Stores an earlier infer-logger wrote keyed rows by (id, instance)."""

    def _old_store(self, path: Path) -> None:
        conn = sqlite3.connect(path)
        conn.executescript(SCHEMA_1)
        attributes = orjson.dumps(_attrs(events.REQUEST, "a", T0)).decode()
        conn.executemany(
            "INSERT INTO records (id, instance, time, model, service, namespace, request, request_attributes, "
            "updated) VALUES (?, ?, ?, 'iris', ?, ?, ?, ?, ?)",
            [("a", 0, T0, "iris", "default", "[1,2]", attributes, T0),
             ("a", 1, T0, "iris", "default", "[3,4]", attributes, T0),
             ("b", 0, T0, None, None, "[5]", attributes, T0)])
        conn.commit()
        conn.close()

    def test_a_writer_migrates_it_and_its_rows_join_as_new_ones_do(self, tmp_path: Path) -> None:
        """At its first write, not at the open: a sink's build, which the sidecar gives 60 s (a large
        store was killed mid-way, rolled back, and converted again at every start)."""
        path = tmp_path / "audit.db"
        self._old_store(path)
        with AuditStore(path) as s:
            assert sqlite3.connect(path).execute("PRAGMA user_version").fetchone()[0] == 1
            assert sorted((r.id, r.instance) for r in s.query()) == [("a", 0), ("a", 1), ("b", 0)]
            s.write([response("a"), response("b", namespace="", inferenceservicename="")])
            rows = sorted((r.id, r.instance, r.request, r.response) for r in s.query())
            assert rows == [("a", 0, [1, 2], 0), ("a", 1, [3, 4], 1), ("b", 0, [5], 0), ("b", 1, None, 1)]
        conn = sqlite3.connect(path)
        assert conn.execute("PRAGMA user_version").fetchone()[0] == SCHEMA_VERSION
        assert conn.execute("PRAGMA integrity_check").fetchone()[0] == "ok"
        assert {r[0] for r in conn.execute("SELECT name FROM sqlite_master WHERE type = 'index'")} >= {
            "records_time", "records_model_time", "records_status_time"}
        conn.close()

    def test_a_reader_reads_it_as_it_is(self, tmp_path: Path) -> None:
        """The sidecar still running is an older one: `query` reads its store without a migration."""
        path = tmp_path / "audit.db"
        self._old_store(path)
        with AuditStore(path, readonly=True) as s:
            assert sorted((r.id, r.instance) for r in s.query()) == [("a", 0), ("a", 1), ("b", 0)]
            assert [r.instance for r in s.query(id="a")] == [0, 1] and s.summary().ids == 2
        conn = sqlite3.connect(path)
        assert conn.execute("PRAGMA user_version").fetchone()[0] == 1
        conn.close()


class TestStatus:
    """The response's status and latency hold for every record of its id."""

    def test_late_request_with_more_instances(self, store: AuditStore) -> None:
        store.write([response(body={"predictions": [7]})])
        store.write([request(body={"instances": [[1], [2], [3]]})])
        records = _by_instance(store)
        assert [r.response for r in records] == [7, None, None]
        assert {(r.status, r.latency_ms) for r in records} == {(200, 12.5)}

    def test_late_explanation_row(self, store: AuditStore) -> None:
        store.write([request(body={"instances": [[1]]}), response(body={"predictions": [1]})])
        store.write([explanation()])
        assert [(r.instance, r.status) for r in _by_instance(store)] == [(0, 200), (1, 200)]

    def test_a_request_before_its_response_costs_sqlite_work_in_proportion(self, tmp_path: Path) -> None:
        """Each row of an unanswered request looked for its response in every row of its id
        written so far: a 20k-instance request took 56 s. Counted in SQLite VM steps, not time."""
        steps = []
        for n in (500, 4000):
            with AuditStore(tmp_path / f"{n}.db") as fresh:
                count = [0]
                fresh._conn.set_progress_handler(lambda: count.__setitem__(0, count[0] + 1), 100)
                fresh.write([request(body={"instances": [[i] for i in range(n)]})])
                fresh._conn.set_progress_handler(None, 0)
                steps.append(count[0])
                assert {r.status for r in fresh.query(limit=None)} == {None}
        assert steps[1] < 16 * steps[0]  # 8x the rows: about 8x the steps (it was 62x)

    def test_error_response_with_text_body(self, store: AuditStore) -> None:
        store.write([request(), response(body=b"Internal Server Error", status=500, latency=3)])
        first, second = _by_instance(store)
        assert first.response == "Internal Server Error"
        assert second.response is None
        assert (first.status, second.status, second.latency_ms) == (500, 500, 3.0)

    @pytest.mark.parametrize("body, extra", [
        (b"upstream connect error or disconnect/reset before headers. reset reason: overflow", {}),
        ("<html><body><h1>502 Passerelle</h1>é</body></html>".encode(), {"datacontenttype": "text/html"}),
        (b'{"error": "CUDA out of mem', {"truncated": True, "datasize": 4000}),
    ])
    def test_an_error_body_that_is_not_json_is_its_text(
        self, store: AuditStore, body: bytes, extra: dict[str, Any]
    ) -> None:
        """An Envoy or nginx error page was stored as {"base64": ...}; the audit document's
        `error` holds the same text."""
        event = response(body=body, status=503, **extra)
        store.write([event])
        (record,) = store.query()
        assert record.response == body.decode()
        assert audit.documents(event)[0][1]["response"]["error"] == record.response

    @pytest.mark.parametrize("body, extra, text", [
        ("<p>Erreur : réessayez à 10h</p>".encode("cp1252"),
         {"datacontenttype": "text/html; charset=windows-1252"}, "<p>Erreur : réessayez à 10h</p>"),
        # Cut in "é"'s two bytes: the text up to it.
        ("<p>Erreur : réessayez</p>".encode()[:14], {"truncated": True, "datasize": 4000}, "<p>Erreur : r"),
        (b"<html>\xff</html>", {"datacontenttype": "text/html"}, None),  # not UTF-8: base64
        ("<p>réessayez</p>".encode("cp1252"), {"datacontenttype": "text/html; charset=utf-8"}, None),
    ])
    def test_an_error_body_is_text_only_when_its_bytes_are(
        self, store: AuditStore, body: bytes, extra: dict[str, Any], text: str | None
    ) -> None:
        """Decoded as UTF-8 with U+FFFD for what was not, a page in another charset (a cp1252
        proxy page) lost its bytes for good: they are text in the charset named, else base64.
        The audit document's `error` holds what the store does."""
        event = response(body=body, status=503, **extra)
        store.write([event])
        (record,) = store.query()
        (_, doc), *_ = audit.documents(event)
        if text is None:
            assert record.response == {"base64": base64.b64encode(body).decode()}
            assert doc["response"]["error"] == orjson.dumps(record.response).decode()
        else:
            assert record.response == text
            assert doc["response"]["error"] == text

    def test_an_error_body_too_deep_to_write_is_kept_as_its_text(self, store: AuditStore) -> None:
        """Nested past what stdlib json writes (orjson reads it): kept as sent, as text as the
        audit document's `error` has it, not base64."""
        event = response(body=b'{"error": ' + b"[" * 1018 + b"]" * 1018 + b"}", status=500)
        store.write([event])
        (record,) = store.query()
        assert record.response == (event.data or b"").decode()
        assert audit.documents(event)[0][1]["response"]["error"] == record.response

    def test_string_attributes_from_binary_mode(self, store: AuditStore) -> None:
        event = response()
        store.write([event.with_attributes(statuscode="404", latencyms="7.5")])
        assert (store.query()[0].status, store.query()[0].latency_ms) == (404, 7.5)

    @pytest.mark.parametrize("latency", ["inf", float("inf"), "-Infinity", "NaN", 1e13])
    @pytest.mark.parametrize("paired", [False, True])
    def test_a_latency_not_finite_or_absurd_is_none(
        self, store: AuditStore, latency: Any, paired: bool
    ) -> None:
        """As the audit documents have it (`events.as_latency`): SQLite kept Inf, which `query --format
        json` wrote as `Infinity` (no JSON) when another row made it fall back to stdlib json."""
        answer = response().with_attributes(latencyms=latency)
        if paired:
            store.write([request(), answer])
        else:
            store.write([request()])
            store.write([answer])
        assert {(r.status, r.latency_ms) for r in store.query()} == {(200, None)}

    @pytest.mark.parametrize("status", [500, "500"])
    def test_an_error_body_is_never_split(self, store: AuditStore, status: int | str) -> None:
        """With the statuscode as text (binary modes) an error body was split like predictions."""
        body = {"predictions": [0, 1], "error": "partial"}
        store.write([response(body=body).with_attributes(statuscode=status)])
        assert [(r.instance, r.response, r.status) for r in store.query()] == [(0, body, 500)]

    def test_pending_without_response(self, store: AuditStore) -> None:
        store.write([request()])
        assert {r.status for r in store.query()} == {None}


class TestPayloads:
    """Each instance gets its slice; what cannot be split lands in instance 0."""

    def test_v2_multi_instance(self, store: AuditStore) -> None:
        v2: dict[str, Any] = {"protocol": "v2", "path": "/v2/models/iris/infer"}
        req = {"inputs": [{"name": "x", "shape": [3, 2], "datatype": "FP32", "data": [1, 2, 3, 4, 5, 6]}]}
        resp = {"outputs": [{"name": "y", "shape": [3], "datatype": "INT64", "data": [0, 1, 2]}]}
        store.write([request(body=req, **v2), response(body=resp, **v2)])
        records = _by_instance(store)
        assert [(r.request, r.response) for r in records] == [
            ({"x": [1, 2]}, {"y": 0}),
            ({"x": [3, 4]}, {"y": 1}),
            ({"x": [5, 6]}, {"y": 2}),
        ]
        assert {r.protocol for r in records} == {"v2"}

    def test_v2_binary_tensor_data(self, store: AuditStore) -> None:
        """Bodies with binary tensor data (tritonclient's default) are split like their JSON form."""
        v2: dict[str, Any] = {"protocol": "v2", "path": "/v2/models/iris/infer",
                              "datacontenttype": binary_tensors.CONTENT_TYPE}
        x = {"name": "x", "shape": [3, 2], "datatype": "FP32"}
        y = {"name": "y", "shape": [3], "datatype": "INT64"}
        req, _ = binary_tensors.encode({"inputs": [x]}, "inputs", {"x": binary_tensors.pack_values("FP32", range(1, 7))})
        resp, _ = binary_tensors.encode({"outputs": [y]}, "outputs", {"y": binary_tensors.pack_values("INT64", [0, 1, 2])})
        store.write([CloudEvent({**request().attributes, **v2}, req), CloudEvent({**response().attributes, **v2}, resp)])
        assert [(r.request, r.response) for r in _by_instance(store)] == [
            ({"x": [1, 2]}, {"y": 0}),
            ({"x": [3, 4]}, {"y": 1}),
            ({"x": [5, 6]}, {"y": 2}),
        ]

    def test_binary_nan_and_infinities_are_stored_as_text(self, store: AuditStore) -> None:
        """orjson writes them as null: a model's inf was stored as a missing value."""
        y = {"name": "y", "shape": [4], "datatype": "FP32"}
        z = {"name": "z", "shape": [4], "datatype": "FP64", "data": [None, 1.0, 2.0, 3.0]}  # JSON null stays
        values = binary_tensors.pack_values("FP32", [float("nan"), float("inf"), float("-inf"), 0.5])
        body, _ = binary_tensors.encode({"outputs": [y, z]}, "outputs", {"y": values})
        store.write([request(body={"instances": [[1]] * 4}), response(body=body)])
        assert [r.response for r in _by_instance(store)] == [
            {"y": "NaN", "z": None}, {"y": "Infinity", "z": 1.0}, {"y": "-Infinity", "z": 2.0}, {"y": 0.5, "z": 3.0},
        ]

    def test_json_is_not_searched_for_nan_and_infinities(
        self, store: AuditStore, monkeypatch: pytest.MonkeyPatch
    ) -> None:
        """JSON has none (orjson refuses them): the search, a second serialisation of each
        instance with a null, cost 1.3-2.8x on JSON bodies. Binary tensor data is searched."""
        searched: list[object] = []
        monkeypatch.setattr(store_module, "_finite", lambda value: searched.append(value) or True)
        row = {"age": 31, "income": None, "flags": [1, None]}
        store.write([request(body={"instances": [row] * 3}), response(body={"predictions": [None, 1, None]})])
        assert [r.request for r in _by_instance(store)] == [row] * 3
        assert searched == []
        y = {"name": "y", "shape": [2], "datatype": "FP32"}
        z = {"name": "z", "shape": [2], "datatype": "FP64", "data": [None, 1.0]}  # a null to look past
        values = binary_tensors.pack_values("FP32", [1, 2])
        body, _ = binary_tensors.encode({"outputs": [y, z]}, "outputs", {"y": values})
        store.write([response(id_="b", body=body)])
        assert searched == [{"y": 1.0, "z": None}]

    def test_tf_rows_with_tensor_like_features_are_one_per_instance(self, store: AuditStore) -> None:
        """A `name` and a list `shape` (or a `datatype` feature in one row) kept a batch of rows
        whole, as if V2 tensors without `data`: its predictions had no request beside them."""
        parcels = [{"name": "parcel-1", "shape": [[0, 0], [1, 1]]}, {"name": "parcel-2", "shape": [[2, 2]]}]
        people = [{"age": 3, "city": "x"}, {"age": 5, "city": "y", "datatype": "float"}]
        for id_, rows in (("a", parcels), ("b", people)):
            store.write([request(id_, body={"inputs": rows}), response(id_, body={"predictions": [1, 2]})])
            records = _by_instance(store, id_)
            assert [(r.request, r.response) for r in records] == [(rows[0], 1), (rows[1], 2)]

    def test_truncated_request(self, store: AuditStore) -> None:
        event = CloudEvent(
            {**request().attributes, "truncated": True, "datasize": 1000}, b'{"instances": [[1, 2], [3'
        )
        store.write([event, response()])
        first, second = _by_instance(store)
        assert set(first.request) == {"base64"}
        assert (second.request, second.response) == (None, 1)

    def test_integers_past_64_bits_are_kept_exactly(self, store: AuditStore) -> None:
        """orjson reads them as floats: the record said 1.2345678901234568e+29 where the client
        sent 123456789012345678901234567890. Kept as the bytes sent (base64), as non-JSON is."""
        body = b'{"instances": [[123456789012345678901234567890, 2]]}'
        store.write([CloudEvent(request().attributes, body), response()])
        first, second = _by_instance(store)
        assert base64.b64decode(first.request["base64"]) == body and second.request is None

    def test_unknown_type_skipped(self, store: AuditStore) -> None:
        other = CloudEvent({"id": "z", "source": "s", "specversion": "1.0", "type": "com.example"}, b"{}")
        assert store.write([other]) == 0
        assert store.query() == []


class TestQuery:
    """Every filter narrows; results come by time."""

    @pytest.fixture
    def filled(self, store: AuditStore) -> AuditStore:
        batch = []
        for i in range(6):
            time = f"2025-01-01T00:00:0{i}.000000Z"
            model = "iris" if i % 2 == 0 else "income"
            batch += [
                request(f"id{i}", {"instances": [[i]]}, time=time, modelname=model),
                response(f"id{i}", {"predictions": [i]}, status=200 if i < 4 else 500, latency=i, time=time),
            ]
        store.write(batch)
        return store

    def test_all_desc_then_asc(self, filled: AuditStore) -> None:
        assert [r.id for r in filled.query()] == [f"id{i}" for i in reversed(range(6))]
        assert [r.id for r in filled.query(order="asc", limit=2)] == ["id0", "id1"]
        assert len(filled.query(limit=None)) == 6

    def test_filters(self, filled: AuditStore) -> None:
        assert [r.id for r in filled.query(id="id3")] == ["id3"]
        assert {r.id for r in filled.query(model="income")} == {"id1", "id3", "id5"}
        assert {r.id for r in filled.query(status=500)} == {"id4", "id5"}
        since, until = "2025-01-01T00:00:02Z", "2025-01-01T02:00:04+02:00"  # any RFC 3339 form
        assert {r.id for r in filled.query(since=since, until=until)} == {"id2", "id3"}
        assert {r.id for r in filled.query(model="iris", status=500)} == {"id4"}

    def test_offset_skips_rows_in_the_same_order(self, filled: AuditStore) -> None:
        """Rows sharing a time (an exchange's instances) could not be paged to with --until."""
        filled.write([request(f"same{i}", {"instances": [[1], [2]]}, time=T0) for i in range(3)])
        every = [(r.id, r.instance) for r in filled.query(limit=None)]
        pages = [filled.query(limit=3, offset=n) for n in range(0, len(every), 3)]
        assert [(r.id, r.instance) for page in pages for r in page] == every
        assert [r.id for r in filled.query(order="asc", limit=1, offset=7)] == ["id1"]
        assert filled.query(offset=len(every)) == []

    @pytest.mark.parametrize("order", ["desc", "asc"])
    @pytest.mark.parametrize("size", [1, 2, 3, 5])
    def test_page_tokens_walk_every_row_once(self, filled: AuditStore, order: Any, size: int) -> None:
        """Undated rows (an explanation alone) and ties of time and id (two services' exchanges of
        one id) among them; then rows written between pages move no page onto rows shown."""
        filled.write([explanation("late"), explanation("later"), request("id2", namespace="other", time=T0),
                      request("same", {"instances": [[1], [2]]}, time="2025-01-01T00:00:03.000000Z")])
        every = [(r.id, r.namespace, r.instance) for r in filled.query(limit=None, order=order)]
        seen, token, extra = [], None, iter(range(5))
        while True:
            page = filled.query(limit=size, order=order, start=token)
            seen += [(r.id, r.namespace, r.instance) for r in page]
            token = filled.page_token(offset=size, order=order, start=token)
            if token is None:
                break
            if (n := next(extra, None)) is not None:  # a few: ascending, each is a page more
                filled.write([request(f"new{n}", time="2025-01-01T00:00:09.000000Z")])
        # Written before every page descending; ascending after the rows then shown, so shown too.
        assert [r for r in seen if not r[0].startswith("new")] == every and len(seen) == len(set(seen))
        assert len(every) == 6 + 2 * 2 + 2 + 2  # the undated (late, later) among them
        assert filled.page_token(offset=len(filled.query(limit=None))) is None
        assert [(r.id, r.instance) for r in filled.query(id="same", start=filled.page_token(id="same", offset=1))] \
            == [("same", 1)]

    @pytest.mark.parametrize("place", [[1, 2, 3], ["t", "id", "k", 1.5, "exchange"], ["t", "id", "k", 1 << 63, "exchange"],
                                       [None, "a", "a", 0, "other"], {"a": 1}])
    def test_a_page_token_that_is_none_is_a_value_error(self, filled: AuditStore, place: Any) -> None:
        """An instance past 64 bits was a traceback (OverflowError binding it)."""
        for token in ("", "!!", base64.urlsafe_b64encode(orjson.dumps(place)).decode()):
            with pytest.raises(ValueError, match="not a page token"):
                filled.check_page_token(token)
            with pytest.raises(ValueError, match="not a page token"):
                filled.query(start=token)

    def test_a_page_token_of_the_store_before_its_conversion_is_refused(self, tmp_path: Path) -> None:
        """Its key was the id: on the converted store the rest of its exchange was skipped."""
        path = tmp_path / "audit.db"
        TestSchema1()._old_store(path)
        with AuditStore(path, readonly=True) as old:
            token = old.page_token(offset=1)
            assert token is not None and [(r.id, r.instance) for r in old.query(start=token)] == [("a", 0), ("a", 1)]
        with AuditStore(path) as s:
            s.write([request("c")])  # converts it
            with pytest.raises(ValueError, match="before a newer sidecar converted it"):
                s.check_page_token(token)
            newer = s.page_token()
        TestSchema1()._old_store(tmp_path / "backup.db")
        with AuditStore(tmp_path / "backup.db", readonly=True) as old, pytest.raises(ValueError, match="newer store"):
            old.check_page_token(newer or "")

    @pytest.mark.parametrize("order", ["desc", "asc"])
    def test_a_page_begins_on_the_time_index_without_sorting(self, filled: AuditStore, order: Any) -> None:
        """Dated and undated rows past the place in one statement (an OR) were all read and sorted
        for a page: 1.3 s for page 2 of 300k rows, where --offset took 50 ms."""
        token = filled.page_token(offset=2, order=order)
        assert token is not None
        for sql, params in filled._select("id", id=None, model=None, since=None, until=None, status=None,
                                          order=order, start=token):
            plan = " ".join(str(row[-1]) for row in filled._conn.execute(f"EXPLAIN QUERY PLAN {sql}", params))
            # A sort of ties only ("RIGHT PART OF ORDER BY"), as without a token; not of every row.
            assert "records_time" in plan and "TEMP B-TREE FOR ORDER BY" not in plan, plan

    def test_records_are_read_from_the_cursor_as_taken(
        self, store: AuditStore, monkeypatch: pytest.MonkeyPatch
    ) -> None:
        """`query` fetched every row and parsed each one's JSON before the first was shown:
        ~770 MB for a 66k-row export."""
        store.write([request("big", {"instances": [[i] for i in range(3000)]})])
        made = []
        monkeypatch.setattr(store_module, "_record", lambda row: made.append(row) or row)
        rows = store.records(limit=None)
        next(rows)
        assert 0 < len(made) < 1000
        assert len(list(rows)) + 1 == len(made) == 3000

    def test_a_time_before_year_1000_sorts_before_later_ones(self, filled: AuditStore) -> None:
        # As text: "500-01-01..." sorted after "2025-...", so it found nothing.
        assert len(filled.query(since="0500-01-01", limit=None)) == len(filled.query(limit=None))
        assert filled.query(until="0500-01-01T00:00:00Z") == []

    @pytest.mark.parametrize(("time", "utc"), [
        ("2025-01-01t00:30:00z", "2025-01-01T00:30:00.000000Z"),  # RFC 3339 allows lower case
        ("2025-01-01t00:30:00.000000Z", "2025-01-01T00:30:00.000000Z"),  # (the canonical form's length)
        ("2016-12-31T23:59:60+01:00", "2016-12-31T22:59:59.999999Z"),  # a leap second
        ("0001-01-01T00:00:00+01:00", "0001-01-01T00:00:00+01:00"),  # no UTC form: an OverflowError
    ])
    def test_rfc_3339_times_are_stored_in_utc(self, store: AuditStore, time: str, utc: str) -> None:
        """fromisoformat refuses the first three: the text was stored as it came, sorted and
        filtered as text (a --since/--until around it missed it)."""
        store.write([request("t", time=time), response("t", time=time)])
        assert {r.time for r in store.query(id="t")} == {utc}

    def test_bad_order(self, filled: AuditStore) -> None:
        with pytest.raises(ValueError, match="order"):
            filled.query(order="sideways")  # type: ignore[arg-type]

    def test_summary(self, filled: AuditStore) -> None:
        filled.write([request("late", {"instances": [[1], [2]]}, modelname="iris")])
        summary = filled.summary()
        assert (summary.records, summary.ids) == (8, 7)
        assert summary.by_model == {"iris": 5, "income": 3}
        assert summary.by_status == {200: 4, 500: 2, None: 2}
        assert (summary.latency_p50_ms, summary.latency_p95_ms) == (2.0, 5.0)

    def test_empty_summary(self, store: AuditStore) -> None:
        summary = store.summary()
        assert (summary.records, summary.latency_p50_ms) == (0, None)

    def test_format_table_and_json(self, filled: AuditStore) -> None:
        filled.write([response("id0", {"predictions": ["x" * 100]})])
        records = filled.query(order="asc", limit=2)
        lines = format_table(records, width=20).splitlines()
        assert lines[0].split() == ["TIME", "ID", "INSTANCE", "MODEL", "STATUS", "LATENCY_MS", "PREDICTION"]
        assert lines[1].split()[1:6] == ["id0", "0", "iris", "200", "12.5"]
        assert lines[1].endswith("x" * 19 + "…")  # strings shown bare
        assert len({line.index("id") for line in lines[1:]}) == 1  # columns aligned
        decoded = orjson.loads(records_to_json(records))
        assert decoded[1]["id"] == "id1" and decoded[1]["request"] == [1]

    def test_payloads_nested_past_what_orjson_writes_are_shown(self, store: AuditStore) -> None:
        """The store writes them by stdlib json (orjson writes 254 levels, reads 1024): `query`
        failed on them with TypeError("Recursion limit reached"), as a table and as JSON."""
        deep = b"[" * 300 + b"0" + b"]" * 300
        asked = CloudEvent(request().attributes, b'{"instances": [' + deep + b"]}")
        store.write([asked, response(body=b'{"predictions": [' + deep + b"]}")])
        records = store.query()
        (shown,) = json.loads(records_to_json(records))
        assert shown["request"] == shown["response"] == json.loads(deep) and shown["id"] == "a"
        assert format_table(records).splitlines()[1].endswith("[" * 39 + "…")

    def test_json_is_never_nan_or_infinity(self, store: AuditStore) -> None:
        """A record nested past orjson's 254 levels sends the rest to stdlib json, which wrote
        an infinite latency as `Infinity` (orjson writes null)."""
        deep = b"[" * 300 + b"0" + b"]" * 300
        store.write([CloudEvent(request().attributes, b'{"instances": [' + deep + b"]}"), response()])
        record = store.query()[0]
        records = [dataclasses.replace(record, latency_ms=x) for x in (float("inf"), float("nan"), 1.5)]
        records.append(dataclasses.replace(record, request=1, latency_ms=float("-inf")))

        def no_constant(name: str) -> None:
            raise AssertionError(f"not JSON: {name}")

        shown = json.loads(records_to_json(records), parse_constant=no_constant)
        assert [r["latency_ms"] for r in shown] == [None, None, 1.5, None]
        assert shown[0]["request"] == json.loads(deep)

    def test_json_and_table_output_is_made_a_record_at_a_time(self, filled: AuditStore) -> None:
        """The whole output was built in memory before a byte of it was written."""
        taken: list[AuditRecord] = []

        def records() -> Iterator[AuditRecord]:
            for record in filled.query(limit=None):
                taken.append(record)
                yield record

        chunks = store_module.json_chunks(records())
        first = next(chunks)
        assert first.startswith("[") and len(taken) == 1
        assert len(orjson.loads(first + "".join(chunks))) == len(taken) == 6
        widths = store_module.table_widths(filled.query(limit=None))
        taken.clear()
        lines = store_module.table_lines(records(), widths)
        assert next(lines).startswith("TIME") and next(lines) and len(taken) == 1

    @pytest.mark.parametrize("rows", [0, 1, 4000])
    def test_streamed_output_is_as_written_whole(self, store: AuditStore, rows: int) -> None:
        """Same text, byte for byte, as the whole-array orjson dump and the one-shot table."""
        if rows:
            store.write([request("many", {"instances": [[i, "猫\n"] for i in range(rows)]}),
                         response("many", {"predictions": [{"p": i / 7} for i in range(rows)]})])
        records = store.query(limit=None)
        whole = orjson.dumps(records, option=orjson.OPT_INDENT_2 | orjson.OPT_NON_STR_KEYS).decode()
        assert "".join(store_module.json_chunks(iter(records))) == records_to_json(records) == whole
        table = "\n".join(store_module.table_lines(records, store_module.table_widths(records)))
        assert table == format_table(records)
        lines = table.splitlines()
        assert len(lines) == rows + 1 and len({line.index("many") for line in lines[1:]}) <= 1

    def test_payloads_deeper_than_python_recurses_where_shown_are_marked(self, store: AuditStore) -> None:
        """The store's writer may have had more of the stack to spare than `query`'s caller."""
        deeper: Any = 0
        for _ in range(5000):
            deeper = [deeper]
        store.write([request(), response()])
        record = dataclasses.replace(store.query()[0], response=deeper)
        (shown,) = json.loads(records_to_json([record]))
        assert shown["response"] == "(nested too deep to show)" and shown["request"] == [1, 2]
        assert format_table([record]).splitlines()[1].endswith("(nested too deep to show)")


def test_a_store_locked_by_a_writer_is_not_read_as_immutable(tmp_path: Path) -> None:
    """Only the WAL index a reader cannot make is read past: "locked" (a store taken out of WAL
    mode, written) was read as immutable, uncommitted pages with it."""
    import sqlite3

    db = tmp_path / "audit.db"
    with AuditStore(db) as store:
        store.write([request(f"q{i}") for i in range(50)])
    writer = sqlite3.connect(db, isolation_level=None)
    writer.execute("PRAGMA journal_mode=DELETE")
    writer.execute("BEGIN EXCLUSIVE")
    writer.execute("DELETE FROM records")
    try:
        with pytest.raises(InferLoggerError, match="locked"):
            AuditStore(db, readonly=True, timeout=0.2)
    finally:
        writer.execute("ROLLBACK")
        writer.close()


class TestFile:
    """The file itself: WAL, schema version, readers in other connections."""

    def test_pragmas(self, tmp_path: Path) -> None:
        path = tmp_path / "sub" / "audit.db"
        AuditStore(path).close()
        conn = sqlite3.connect(path)
        assert conn.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
        assert conn.execute("PRAGMA page_size").fetchone()[0] == 16384
        assert conn.execute("PRAGMA user_version").fetchone()[0] == SCHEMA_VERSION
        conn.close()

    def test_reopen_keeps_data(self, tmp_path: Path) -> None:
        with AuditStore(tmp_path / "a.db") as s:
            s.write([request()])
        with AuditStore(tmp_path / "a.db", readonly=True) as s:
            assert len(s.query()) == 2

    @pytest.mark.parametrize("gone", ["all its files", "the main file", "renamed"])
    def test_a_store_removed_under_the_writer_is_made_again(self, tmp_path: Path, gone: str) -> None:
        """SQLite kept writing to the file it had opened: after an `rm` (or a rotation's rename),
        every later batch went to an unlinked inode, acknowledged and lost at exit."""
        path = tmp_path / "audit.db"
        with AuditStore(path) as s:
            s.write([request("a")])
            if gone == "renamed":
                path.rename(tmp_path / "audit.db.1")
            else:
                for name in ("audit.db", "audit.db-wal", "audit.db-shm")[:3 if gone == "all its files" else 1]:
                    (tmp_path / name).unlink(missing_ok=True)
            s.write([request("b")])
        with AuditStore(path, readonly=True) as s:
            assert {row.id for row in s.query()} == {"b"}
        if gone == "renamed":  # its WAL went back into it: left at the path, the new store took it in
            with AuditStore(tmp_path / "audit.db.1", readonly=True) as s:
                assert {row.id for row in s.query()} == {"a"}

    def test_a_path_it_cannot_look_at_is_an_error_to_retry(self, tmp_path: Path,
                                                            monkeypatch: pytest.MonkeyPatch) -> None:
        """A directory not searchable for a while (or NFS's ESTALE): the store sink took the
        PermissionError for the events' fault and dead-lettered the batch."""
        import os

        with AuditStore(tmp_path / "audit.db") as s:
            real = os.stat

            def stat(path: Any, *args: Any, **kwargs: Any) -> Any:
                if Path(path) == s.path:
                    raise PermissionError(13, "Permission denied")
                return real(path, *args, **kwargs)

            monkeypatch.setattr(os, "stat", stat)
            with pytest.raises(sqlite3.OperationalError, match="Permission denied"):
                s.write([request("a")])
            monkeypatch.undo()
            s.write([request("a")])
            assert {row.id for row in s.query()} == {"a"}

    def test_a_store_put_in_place_of_the_writer_s_is_written_to(self, tmp_path: Path) -> None:
        """A backup restored over the path (renamed into place): the old writer's WAL, left at the
        path, was applied to it (its rows replaced by the other file's pages, its index corrupt)."""
        path = tmp_path / "audit.db"
        with AuditStore(tmp_path / "backup.db") as backup:
            backup.write([request("restored")])
        with AuditStore(path) as s:
            s.write([request("a")])
            (tmp_path / "backup.db").rename(path)
            s.write([request("b")])
        conn = sqlite3.connect(path)
        assert conn.execute("PRAGMA integrity_check").fetchone()[0] == "ok"
        conn.close()
        with AuditStore(path, readonly=True) as s:
            assert {row.id for row in s.query()} == {"restored", "b"}

    def test_store_with_small_pages_keeps_them(self, tmp_path: Path) -> None:
        # Stores made before 16 KiB pages: the page size of a file with tables cannot change.
        path = tmp_path / "a.db"
        conn = sqlite3.connect(path)
        conn.execute("PRAGMA page_size=4096")
        conn.executescript(_SCHEMA)
        conn.execute(f"PRAGMA user_version = {SCHEMA_VERSION}")
        conn.close()
        with AuditStore(path) as s:
            s.write([request()])
            assert len(s.query()) == 2
        conn = sqlite3.connect(path)
        assert conn.execute("PRAGMA page_size").fetchone()[0] == 4096
        conn.close()

    def test_newer_schema_refused(self, tmp_path: Path) -> None:
        path = tmp_path / "a.db"
        AuditStore(path).close()
        conn = sqlite3.connect(path)
        conn.execute(f"PRAGMA user_version = {SCHEMA_VERSION + 1}")
        conn.close()
        with pytest.raises(InferLoggerError, match="schema version"):
            AuditStore(path)

    @pytest.mark.parametrize("readonly", [True, False])
    def test_not_a_database(self, tmp_path: Path, readonly: bool) -> None:
        path = tmp_path / "audit.db"
        path.write_bytes(b"just some text, not SQLite" * 100)
        with pytest.raises(InferLoggerError, match="not a usable audit store: file is not a database"):
            AuditStore(path, readonly=readonly)

    @pytest.mark.parametrize("readonly", [True, False])
    def test_another_applications_database_is_refused(self, tmp_path: Path, readonly: bool) -> None:
        """Its user_version may be 1 too: a query gave a traceback, and the sink failed every batch."""
        for version, table in ((1, "things"), (0, "things"), (0, "records")):  # 0: SQLite's default
            path = tmp_path / f"other{version}{table}.db"
            conn = sqlite3.connect(path)
            conn.execute(f"CREATE TABLE {table} (x)")
            conn.execute(f"PRAGMA user_version = {version}")
            conn.close()
            with pytest.raises(InferLoggerError, match="not an audit store"):
                AuditStore(path, readonly=readonly)
            conn = sqlite3.connect(path)  # left as it was: not switched to WAL, no table of ours
            assert conn.execute("PRAGMA journal_mode").fetchone()[0] == "delete"
            assert [r[0] for r in conn.execute("SELECT name FROM sqlite_master")] == [table]
            conn.close()

    def test_opening_a_store_another_writer_holds_waits_for_nothing(self, tmp_path: Path) -> None:
        """Every open took the write lock to look at the schema: an old delivery process finishing
        a big batch made the new one's store sink fail to start (a config error)."""
        path = tmp_path / "a.db"
        AuditStore(path).close()
        other = sqlite3.connect(path, isolation_level=None)
        other.execute("BEGIN IMMEDIATE")
        other.execute("INSERT INTO records (exchange, id, instance, updated) VALUES ('x', 'x', 0, 'now')")
        try:
            AuditStore(path, timeout=0.2).close()
        finally:
            other.execute("COMMIT")
            other.close()

    def test_readonly_missing(self, tmp_path: Path) -> None:
        with pytest.raises(InferLoggerError, match="no audit store"):
            AuditStore(tmp_path / "missing.db", readonly=True)

    def test_reader_while_writing(self, tmp_path: Path) -> None:
        path = tmp_path / "a.db"
        writer = AuditStore(path)
        reader = AuditStore(path, readonly=True)
        done = threading.Event()
        seen: list[int] = []

        def read() -> None:
            while not done.is_set():
                seen.append(len(reader.query(limit=None)))

        thread = threading.Thread(target=read)
        thread.start()
        try:
            for i in range(50):
                writer.write([request(f"r{i}"), response(f"r{i}")])
        finally:
            done.set()
            thread.join()
        assert seen == sorted(seen)  # each read sees a committed prefix, never a torn batch
        assert all(n % 2 == 0 for n in seen)
        assert len(reader.query(limit=None)) == 100
        reader.close()
        writer.close()

    def test_writers_from_threads(self, store: AuditStore) -> None:
        threads = [
            threading.Thread(target=store.write, args=([request(f"t{i}"), response(f"t{i}")],))
            for i in range(8)
        ]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        assert store.summary().ids == 8

    def test_large_batch_redelivered(self, store: AuditStore) -> None:
        # Speed is measured in benchmarks/, never asserted here.
        batch = [e for i in range(2000) for e in (request(f"p{i}"), response(f"p{i}"))]
        for _ in range(3):
            store.write(batch)
        assert store.summary().records == 4000

"""The sidecar as a process between a real predictor and a real CloudEvents receiver."""

from __future__ import annotations

import base64
import contextlib
import json
import time
import uuid
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

import httpx
import orjson
import pytest

from infer_logger import events as ev
from infer_logger.cloudevents import from_dict
from infer_logger.cloudevents.event import CloudEvent
from infer_logger.config import load_settings
from infer_logger.server import SidecarThread
from infer_logger.testing import CannedPredictor, EventCollector, free_port
from tests.servers import Process, Scripted, dribble, sidecar_process

if TYPE_CHECKING:
    from infer_logger.proxy import Proxy

pytestmark = pytest.mark.slow

@contextlib.asynccontextmanager
async def before(peer: Scripted, tmp_path: Path, **settings: object) -> AsyncIterator[str]:
    """A sidecar (on a thread, its file sink `events.jsonl` in `tmp_path`) in front of `peer`: its URL."""
    async with peer as url:
        port = free_port()
        with SidecarThread(load_settings(None, port=port, predictor_url=url, **settings,
                                         spool={"dir": str(tmp_path / "spool")},
                                         sinks=[{"type": "file", "path": str(tmp_path / "events.jsonl")}])):
            yield f"http://127.0.0.1:{port}"


def logged(tmp_path: Path) -> list[dict[str, object]]:
    return [orjson.loads(line) for line in (tmp_path / "events.jsonl").read_bytes().splitlines()]


V1 = {"instances": [[5.1, 3.5, 1.4, 0.2], [6.7, 3.0, 5.2, 2.3]]}
V2 = {"inputs": [{"name": "input-0", "datatype": "FP64", "shape": [1, 4], "data": [5.1, 3.5, 1.4, 0.2]}]}


@pytest.fixture(scope="module", params=["httptools", "uvicorn"])
def server(request: pytest.FixtureRequest) -> str:
    """The sidecar's own HTTP server (default) and the ASGI app under uvicorn: same behaviour."""
    return request.param


@pytest.fixture(scope="module")
def collector(server: str) -> Iterator[EventCollector]:
    with EventCollector() as sink:  # one per server, so ids seen by one never satisfy the other
        yield sink


@pytest.fixture(scope="module")
def sidecar(iris_predictor: Process, collector: EventCollector, server: str, tmp_path_factory) -> Iterator[Process]:
    tmp = tmp_path_factory.mktemp("sidecar")
    proc = sidecar_process(
        iris_predictor.url, tmp, "--server", server, "--log-url", collector.url, "--inference-service", "iris",
        "--namespace", "ns", "--component", "predictor", "--endpoint", "default",
        "--metadata-headers", "Foo,Fizz", "--source-uri", "http://localhost:9081/",
        "--max-payload-bytes", "4096", "--max-request-bytes", "1MiB",
    ).start()
    yield proc
    proc.stop()


def events_for(collector: EventCollector, event_id: str, count: int = 2) -> dict[str, CloudEvent]:
    import time

    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        found = {e.type: e for e in list(collector.events) if e.id == event_id}
        if len(found) >= count:
            return found
        time.sleep(0.02)
    raise AssertionError(f"{count} events for {event_id} never arrived: {found}")


class TestLogging:
    """Inference calls produce a request and a response event sharing the id."""

    def test_v1_predict(self, sidecar: Process, collector: EventCollector) -> None:
        r = httpx.post(sidecar.url + "/v1/models/iris:predict", json=V1, headers={"Foo": "bar", "Fizz": "buzz"})
        assert r.status_code == 200
        assert len(r.json()["predictions"]) == 2
        rid = r.headers["x-request-id"]
        assert uuid.UUID(rid).version == 7  # made by the sidecar: time-ordered
        found = events_for(collector, rid)
        req, resp = found[ev.REQUEST], found[ev.RESPONSE]
        assert req.json() == V1
        assert resp.json() == r.json()
        for e in (req, resp):
            assert e["specversion"] == "1.0"
            assert e["source"] == "http://localhost:9081/"
            assert e["inferenceservicename"] == "iris"
            assert e["namespace"] == "ns"
            assert e["component"] == "predictor"
            assert e["endpoint"] == "default"
            assert e["modelname"] == "iris"
            assert e["protocol"] == "v1"
            assert e["path"] == "/v1/models/iris:predict"
            assert json.loads(e["metadata"]) == {"Foo": ["bar"], "Fizz": ["buzz"]}
            assert e["recordedtime"] >= e["time"]
        assert int(resp["statuscode"]) == 200
        assert int(resp["latencyms"]) >= 0
        assert resp.datacontenttype.startswith("application/json")

    def test_v2_infer_with_version_and_ce_id(self, sidecar: Process, collector: EventCollector) -> None:
        r = httpx.post(sidecar.url + "/v2/models/iris/versions/3/infer", json=V2, headers={"ce-id": "abc-123"})
        assert r.status_code == 200
        assert r.headers["x-request-id"] == "abc-123"
        found = events_for(collector, "abc-123")
        assert found[ev.RESPONSE]["modelversion"] == "3"
        assert found[ev.REQUEST]["protocol"] == "v2"
        assert found[ev.RESPONSE].json()["outputs"][0]["name"] == "predict"

    def test_x_request_id_is_the_id(self, sidecar: Process, collector: EventCollector) -> None:
        r = httpx.post(sidecar.url + "/v1/models/iris:predict", json=V1, headers={"x-request-id": "rid-7"})
        assert r.headers["x-request-id"] == "rid-7"
        events_for(collector, "rid-7")

    @pytest.mark.parametrize("header", [(b"x-request-id", b"bad\tid"), (b"x-request-id", b"caf\x85"),
                                        (b"ce-id", b"bad\tid")], ids=["tab", "c1-control", "ce-id"])
    def test_an_id_no_event_may_carry_is_replaced(self, sidecar: Process, collector: EventCollector,
                                                  header: tuple[bytes, bytes]) -> None:
        """Legal in a header, not in a CloudEvents id: the sink refused the events (dead letters)."""
        r = httpx.post(sidecar.url + "/v1/models/iris:predict", json=V1, headers=[header])
        assert r.status_code == 200
        rid = r.headers["x-request-id"]
        assert uuid.UUID(rid).version == 7
        events_for(collector, rid)

    @pytest.mark.parametrize(("sent", "logged"), [(b"caf\xc3\xa9-8", "café-8"), (b"na\xefve-1", "naïve-1")],
                             ids=["utf-8", "latin-1"])
    def test_a_non_ascii_id_comes_back_as_sent(self, sidecar: Process, collector: EventCollector,
                                               sent: bytes, logged: str) -> None:
        """UTF-8 is logged as such (query --id finds it); the client gets its bytes back, not
        their Latin-1 reading encoded as UTF-8."""
        r = httpx.post(sidecar.url + "/v1/models/iris:predict", json=V1, headers=[(b"x-request-id", sent)])
        assert r.status_code == 200
        assert [v for k, v in r.headers.raw if k.lower() == b"x-request-id"] == [sent]
        events_for(collector, logged)

    def test_error_responses_are_logged_with_status(self, sidecar: Process, collector: EventCollector) -> None:
        r = httpx.post(sidecar.url + "/v1/models/iris:predict", json={"instances": [[1]]})
        assert r.status_code == 400
        found = events_for(collector, r.headers["x-request-id"])
        assert int(found[ev.RESPONSE]["statuscode"]) == 400
        assert "expected a list" in found[ev.RESPONSE].json()["error"]

    @pytest.mark.parametrize("header", ["x-skip-logging", "Seldon-Skip-Logging"])
    def test_skip_logging(self, sidecar: Process, collector: EventCollector, header: str) -> None:
        r = httpx.post(sidecar.url + "/v1/models/iris:predict", json=V1, headers={header: "true", "ce-id": header})
        assert r.status_code == 200
        assert r.headers["x-request-id"] == header
        httpx.post(sidecar.url + "/v1/models/iris:predict", json=V1, headers={"ce-id": "after-" + header})
        events_for(collector, "after-" + header)
        assert not [e for e in collector.events if e.id == header]

    def test_other_paths_are_proxied_unlogged(self, sidecar: Process, collector: EventCollector) -> None:
        before = len(collector.events)
        assert httpx.get(sidecar.url + "/v1/models").json() == {"models": ["iris"]}
        assert httpx.get(sidecar.url + "/v2/health/ready").json() == {"ready": True}
        assert httpx.get(sidecar.url + "/v2/models/iris").json()["name"] == "iris"
        assert httpx.get(sidecar.url + "/v1/models/nope").status_code == 404
        httpx.post(sidecar.url + "/v1/models/iris:predict", json=V1, headers={"ce-id": "fence-1"})
        events_for(collector, "fence-1")
        assert all(e.id == "fence-1" for e in collector.events[before:])

    def test_huge_and_binary_bodies(self, sidecar: Process, collector: EventCollector) -> None:
        big = {"instances": [[1.0, 2.0, 3.0, 4.0]] * 2000}  # > 4096 bytes: cut and marked
        r = httpx.post(sidecar.url + "/v1/models/iris:predict", json=big, headers={"ce-id": "big-1"})
        assert r.status_code == 200 and len(r.json()["predictions"]) == 2000
        found = events_for(collector, "big-1")
        req = found[ev.REQUEST]
        assert req["truncated"] in (True, "true")
        assert int(req["datasize"]) == len(orjson.dumps(big)) or int(req["datasize"]) > 4096
        assert len(req.data or b"") == 4096
        raw = bytes(range(256)) * 4
        r = httpx.post(sidecar.url + "/v1/models/iris:predict", content=raw,
                       headers={"content-type": "application/octet-stream", "ce-id": "bin-1"})
        assert r.status_code == 400  # the predictor's answer, passed through
        found = events_for(collector, "bin-1")
        assert found[ev.REQUEST].data == raw
        assert found[ev.REQUEST].datacontenttype == "application/octet-stream"

    def test_body_over_the_request_limit_is_413(self, sidecar: Process, collector: EventCollector) -> None:
        r = httpx.post(sidecar.url + "/v1/models/iris:predict", content=b"x" * (1 << 20 | 1),
                       headers={"ce-id": "over-1", "content-type": "application/json"})
        assert r.status_code == 413
        assert r.json() == {"error": "the request body is larger than 1048576 bytes (max_request_bytes)",
                            "status": 413}
        assert httpx.post(sidecar.url + "/v1/models/iris:predict", json=V1).status_code == 200
        # Refused before it was an inference call: not logged, not sent to the predictor.
        r = httpx.post(sidecar.url + "/v1/models/iris:predict", json=V1, headers={"ce-id": "fence-2"})
        events_for(collector, "fence-2")
        assert not any(e.id == "over-1" for e in collector.events)

    def test_a_body_cut_short_by_the_client_is_neither_forwarded_nor_logged(
            self, sidecar: Process, collector: EventCollector) -> None:
        import socket

        port = int(sidecar.url.rsplit(":", 1)[1])
        with socket.create_connection(("127.0.0.1", port)) as sock:  # 83 bytes declared, 20 sent
            sock.sendall(b"POST /v1/models/iris:predict HTTP/1.1\r\nhost: x\r\nce-id: partial-1\r\n"
                         b"content-type: application/json\r\ncontent-length: 83\r\n\r\n" + b'{"instances": [[5.1, ')
        r = httpx.post(sidecar.url + "/v1/models/iris:predict", json=V1, headers={"ce-id": "fence-3"})
        assert r.status_code == 200
        events_for(collector, "fence-3")
        assert not any(e.id == "partial-1" for e in collector.events)

    def test_own_endpoints(self, sidecar: Process) -> None:
        assert httpx.get(sidecar.url + "/healthz").json() == {"status": "ok"}
        ready = httpx.get(sidecar.url + "/readyz").json()
        assert ready["ready"] is True and ready["sinks"] == {"http": "ok"}
        metrics = httpx.get(sidecar.url + "/metrics").text
        for name in ("infer_logger_events_accepted_total", "infer_logger_events_delivered_total",
                     "infer_logger_spool_bytes", "infer_logger_sink_latency_seconds_bucket",
                     "infer_logger_events_dropped"):
            assert name in metrics


class TestPredictorFailures:
    """The client gets the 502/504 and the events record it."""

    def test_predictor_down_is_502(self, collector: EventCollector, server: str, tmp_path: Path) -> None:
        dead = f"http://127.0.0.1:{free_port()}"
        proc = sidecar_process(dead, tmp_path, "--server", server, "--log-url", collector.url).start()
        try:
            r = httpx.post(proc.url + "/v1/models/m:predict", json=V1, headers={"ce-id": "down-1"})
            assert r.status_code == 502
            assert "unreachable" in r.json()["error"]
            found = events_for(collector, "down-1")
            assert int(found[ev.RESPONSE]["statuscode"]) == 502
        finally:
            proc.stop()

    def test_slow_predictor_is_504(self, collector: EventCollector, server: str, tmp_path: Path) -> None:
        with EventCollector() as slow:
            slow.delay = 3
            proc = sidecar_process(slow.url, tmp_path, "--server", server, "--log-url", collector.url,
                                   "--timeout", "0.5").start()
            try:
                r = httpx.post(proc.url + "/v1/models/m:predict", json=V1, headers={"ce-id": "slow-1"}, timeout=10)
                assert r.status_code == 504
                found = events_for(collector, "slow-1")
                assert int(found[ev.RESPONSE]["statuscode"]) == 504
            finally:
                proc.stop()


@pytest.mark.parametrize(("mode", "types"), [("request", {ev.REQUEST}), ("response", {ev.RESPONSE})])
def test_log_mode(iris_predictor: Process, tmp_path: Path, mode: str, types: set[str]) -> None:
    with EventCollector() as sink:
        proc = sidecar_process(iris_predictor.url, tmp_path, "--log-url", sink.url, "--log-mode", mode).start()
        try:
            for i in range(3):
                httpx.post(proc.url + "/v1/models/iris:predict", json=V1, headers={"ce-id": f"m{i}"})
        finally:
            proc.stop()  # drains
        assert {e.type for e in sink.wait_for(3)} == types
        assert len(sink.events) == 3


class TestCloudEventRequests:
    """Requests that are CloudEvents are checked; a malformed one gets 400 naming the attribute."""

    def test_binary_cloudevent_request_keeps_its_id(self, sidecar: Process, collector: EventCollector) -> None:
        headers = {"ce-specversion": "1.0", "ce-id": "ce-in-1", "ce-source": "/client", "ce-type": "infer"}
        r = httpx.post(sidecar.url + "/v1/models/iris:predict", json=V1, headers=headers)
        assert r.status_code == 200 and r.headers["x-request-id"] == "ce-in-1"
        events_for(collector, "ce-in-1")

    def test_structured_cloudevent_request_uses_the_envelope_id(self, sidecar: Process,
                                                                collector: EventCollector) -> None:
        envelope = {"specversion": "1.0", "id": "ce-in-2", "source": "/client", "type": "infer", "data": V1}
        r = httpx.post(sidecar.url + "/v1/models/iris:predict", content=orjson.dumps(envelope),
                       headers={"content-type": "application/cloudevents+json"})
        assert r.headers["x-request-id"] == "ce-in-2"
        found = events_for(collector, "ce-in-2")
        assert found[ev.REQUEST].json()["id"] == "ce-in-2"  # the payload is logged as received

    @pytest.mark.parametrize(("headers", "attribute"), [
        ({"ce-specversion": "1.0", "ce-id": "x", "ce-source": "/c"}, "type"),
        ({"ce-specversion": "0.9", "ce-id": "x", "ce-source": "/c", "ce-type": "t"}, "specversion"),
        ({"ce-specversion": "1.0", "ce-id": "x", "ce-source": "/c", "ce-type": "t", "ce-time": "yesterday"}, "time"),
    ])
    def test_malformed_cloudevent_is_400(self, sidecar: Process, headers: dict, attribute: str) -> None:
        r = httpx.post(sidecar.url + "/v1/models/iris:predict", json=V1, headers=headers)
        assert r.status_code == 400
        assert r.json()["attribute"] == attribute
        assert attribute in r.json()["error"]

    def test_malformed_structured_cloudevent_is_400(self, sidecar: Process) -> None:
        r = httpx.post(sidecar.url + "/v1/models/iris:predict", content=b'{"specversion": "1.0", "id": "x"}',
                       headers={"content-type": "application/cloudevents+json"})
        assert r.status_code == 400 and r.json()["attribute"] in ("source", "type")
        # These were 500s: an empty batch, and data_base64 outside ASCII.
        r = httpx.post(sidecar.url + "/v1/models/iris:predict", content=b"[]",
                       headers={"content-type": "application/cloudevents-batch+json"})
        assert r.status_code == 400 and "empty batch" in r.json()["error"]
        r = httpx.post(sidecar.url + "/v1/models/iris:predict",
                       content='{"specversion": "1.0", "id": "x", "source": "/s", "type": "t", "data_base64": "é"}'.encode(),
                       headers={"content-type": "application/cloudevents+json"})
        assert r.status_code == 400 and r.json()["attribute"] == "data_base64"
        # A batch: which of its events, as the broker's ingress says it
        r = httpx.post(sidecar.url + "/v1/models/iris:predict",
                       content=b'[{"specversion": "1.0", "id": "x", "source": "/s", "type": "t"}, {"specversion": "1.0"}]',
                       headers={"content-type": "application/cloudevents-batch+json"})
        assert r.status_code == 400 and r.json()["item"] == 1 and "batch item 1" in r.json()["error"]


async def test_headers_the_connection_header_names_stay_on_their_hop(tmp_path: Path) -> None:
    """RFC 9110 7.6.1: `Connection: x-hop` makes `x-hop` hop-by-hop, both ways."""
    answer = (b"HTTP/1.1 200 OK\r\ncontent-type: application/json\r\nconnection: X-Trace\r\nx-trace: up\r\n"
              b"x-kept: up\r\ncontent-length: 2\r\n\r\n{}")
    peer = Scripted(lambda _: answer)
    async with before(peer, tmp_path) as sidecar, httpx.AsyncClient() as client:
        r = await client.post(f"{sidecar}/v1/models/m:predict", content=b"{}",
                              headers={"connection": "keep-alive, X-Hop", "x-hop": "1", "x-end": "2"})
    assert r.status_code == 200 and r.headers["x-kept"] == "up" and "x-trace" not in r.headers
    [head] = peer.heads
    assert b"x-hop" not in head and b"x-end: 2\r\n" in head


@pytest.mark.parametrize("server", ["httptools", "uvicorn"])
async def test_head_keeps_the_predictor_s_content_length(tmp_path: Path, server: str) -> None:
    """RFC 9110 8.6: a HEAD answer's content-length is what a GET would send (it said 0)."""
    peer = Scripted(lambda _: b"HTTP/1.1 200 OK\r\ncontent-type: application/json\r\ncontent-length: 1234\r\n\r\n")
    async with before(peer, tmp_path, server=server) as sidecar, httpx.AsyncClient() as client:
        r = await client.head(f"{sidecar}/v2/models/m")
    assert r.status_code == 200 and r.headers["content-length"] == "1234" and r.content == b""


async def test_a_predictor_switching_protocols_is_a_logged_502(tmp_path: Path) -> None:
    """A 101 nobody asked for was a 500 with a traceback, and the request event had no response."""
    peer = Scripted(lambda _: b"HTTP/1.1 101 Switching Protocols\r\nupgrade: h2c\r\nconnection: upgrade\r\n\r\n")
    async with before(peer, tmp_path) as sidecar, httpx.AsyncClient() as client:
        r = await client.post(f"{sidecar}/v1/models/m:predict", content=b"{}", headers={"x-request-id": "switch-1"})
    assert r.status_code == 502 and "switched protocols" in r.json()["error"]
    assert [(e["id"], e.get("statuscode")) for e in logged(tmp_path)] == [("switch-1", None), ("switch-1", 502)]


async def test_an_empty_body_is_no_data(tmp_path: Path) -> None:
    """A 204's event carried `data_base64: ""` labelled with the request's JSON type: the audit
    store recorded `{"base64": ""}` as its prediction (and as an empty request's features)."""
    from infer_logger.store import AuditStore

    peer = Scripted(lambda _: b"HTTP/1.1 204 No Content\r\n\r\n")
    async with before(peer, tmp_path) as sidecar, httpx.AsyncClient() as client:
        r = await client.post(f"{sidecar}/v1/models/m:predict", content=b"", headers={"x-request-id": "empty-1",
                                                                                         "content-type": "application/json"})
    assert r.status_code == 204
    events = logged(tmp_path)
    assert [(e["id"], e.get("statuscode")) for e in events] == [("empty-1", None), ("empty-1", 204)]
    assert all("data" not in e and "data_base64" not in e and "datacontenttype" not in e for e in events), events
    with AuditStore(tmp_path / "audit.db") as store:
        store.write([from_dict(e) for e in events])
        (row,) = store.query()  # the call is audited, with nothing for a payload
        assert (row.status, row.request, row.response) == (204, None, None)


def test_under_uvicorn_a_dribbled_body_is_408_and_closed(tmp_path: Path) -> None:
    """`proxy --server uvicorn`: a body sent a byte at a time held its connection for ever; now
    a 408 past `request_read_timeout`, while whole requests and a slow predictor are served."""
    from infer_logger.demo.quickstart import ServerThread
    from infer_logger.server import build_app, uvicorn_config

    with CannedPredictor(body=b'{"predictions": [1]}') as predictor:
        port = free_port()
        settings = load_settings(None, port=port, predictor_url=predictor.url.rstrip("/"), server="uvicorn",
                                 request_read_timeout=0.5, spool={"dir": str(tmp_path / "spool")},
                                 sinks=[{"type": "file", "path": str(tmp_path / "events.jsonl")}])
        with ServerThread(uvicorn_config(build_app(settings), "127.0.0.1", port)):
            raw = dribble(port, b"POST /v1/models/m:predict HTTP/1.1\r\nhost: x\r\ncontent-length: 500\r\n\r\n", b"x")
            head, _, body = raw.partition(b"\r\n\r\n")
            assert head.startswith(b"HTTP/1.1 408") and b"connection: close" in head
            assert orjson.loads(body) == {"error": "the request body did not arrive whole within 0.5 seconds "
                                                   "(request_read_timeout)", "status": 408}
            with httpx.Client(base_url=f"http://127.0.0.1:{port}") as client:
                for _ in range(3):  # keep-alive, longer than the deadline in all
                    assert client.post("/v1/models/m:predict", json=V1).json() == {"predictions": [1]}
                    time.sleep(0.3)
                predictor.delay = 1.2  # the predictor's time is governed by --timeout, not this
                assert client.post("/v1/models/m:predict", json=V1).json() == {"predictions": [1]}
    assert predictor.attempts == 4  # the dribbled request never reached it


async def test_a_predictor_echoing_the_id_echoes_the_one_that_replaced_a_bad_one(tmp_path: Path) -> None:
    """The predictor gets the event's id in place of one no event may carry, so its echo (KServe's
    predictors echo x-request-id) matches the log."""
    def echo(request: bytes) -> bytes:
        rid = next(line.split(b":", 1)[1].strip() for line in request.split(b"\r\n")
                   if line.lower().startswith(b"x-request-id:"))
        return (b"HTTP/1.1 200 OK\r\ncontent-type: application/json\r\nx-request-id: " + rid
                + b"\r\ncontent-length: 2\r\n\r\n{}")

    async with before(Scripted(echo), tmp_path) as sidecar, httpx.AsyncClient() as client:
        r = await client.post(f"{sidecar}/v1/models/m:predict", content=b"{}", headers=[(b"x-request-id", b"bad\tid")])
    rid = r.headers["x-request-id"]
    assert r.status_code == 200 and uuid.UUID(rid).version == 7
    assert [e["id"] for e in logged(tmp_path)] == [rid, rid]


async def test_a_bad_ce_id_gives_way_to_the_x_request_id_the_predictor_gets(tmp_path: Path) -> None:
    """ce-id, else x-request-id, else a new id: with a ce-id no event may carry beside a good
    x-request-id, the events had a new id and the predictor the client's: two ids for one call."""
    def echo(request: bytes) -> bytes:
        rid = next(line.split(b":", 1)[1].strip() for line in request.split(b"\r\n")
                   if line.lower().startswith(b"x-request-id:"))
        body = orjson.dumps({"seen": rid.decode()})
        return (b"HTTP/1.1 200 OK\r\ncontent-type: application/json\r\ncontent-length: %d\r\n\r\n" % len(body)
                + body)

    async with before(Scripted(echo), tmp_path) as sidecar, httpx.AsyncClient() as client:
        r = await client.post(f"{sidecar}/v1/models/m:predict", content=b"{}",
                              headers=[(b"ce-id", b"bad\tid"), (b"x-request-id", b"good-x")])
    assert r.status_code == 200 and r.json() == {"seen": "good-x"} and r.headers["x-request-id"] == "good-x"
    assert [e["id"] for e in logged(tmp_path)] == ["good-x", "good-x"]


@pytest.mark.parametrize(("sent", "answered"), [
    ([(b"x-request-id", b"mine")], b"4e84a8b1c0de4c3e9f6b2a1d7c5e3f90"),  # a correlation-id middleware's own
    ([(b"ce-specversion", b"1.0"), (b"ce-id", b"A"), (b"ce-source", b"/c"), (b"ce-type", b"t"),
      (b"x-request-id", b"B")], b"B"),  # the client's x-request-id, echoed, beside its ce-id
])
async def test_the_client_gets_the_id_its_events_carry(tmp_path: Path, sent: list[tuple[bytes, bytes]],
                                                       answered: bytes) -> None:
    """A predictor answering with an x-request-id of its own kept it: the client could find no
    event by the id it was given."""
    reply = (b"HTTP/1.1 200 OK\r\ncontent-type: application/json\r\nx-request-id: " + answered
             + b"\r\ncontent-length: 2\r\n\r\n{}")
    async with before(Scripted(lambda _: reply), tmp_path) as sidecar, httpx.AsyncClient() as client:
        r = await client.post(f"{sidecar}/v1/models/m:predict", content=b"{}", headers=sent)
    assert [v for k, v in r.headers.raw if k.lower() == b"x-request-id"] == [dict(sent).get(b"ce-id", b"mine")]
    assert {e["id"] for e in logged(tmp_path)} == {r.headers["x-request-id"]}


async def test_a_predictor_that_compresses_is_not_asked_to_on_a_logged_call(tmp_path: Path) -> None:
    """python-requests accepts gzip by default, and Triton or a GZip middleware compress: the
    response event held gzip bytes labelled JSON, the predictions unreadable in the audit."""
    import gzip

    def compressing(request: bytes) -> bytes:
        # With no Accept-Encoding any coding may do (RFC 9110 12.5.3): only `identity` is none.
        head = request.split(b"\r\n\r\n", 1)[0].lower()
        body, coding = b'{"predictions": [1]}', b""
        if b"accept-encoding: identity" not in head:
            body, coding = gzip.compress(body), b"content-encoding: gzip\r\n"
        return (b"HTTP/1.1 200 OK\r\ncontent-type: application/json\r\n" + coding
                + b"content-length: %d\r\n\r\n" % len(body) + body)

    async with before(Scripted(compressing), tmp_path) as sidecar, httpx.AsyncClient() as client:
        r = await client.post(f"{sidecar}/v1/models/m:predict", content=b"{}", headers={"accept-encoding": "gzip"})
        other = await client.get(f"{sidecar}/other", headers={"accept-encoding": "gzip"})
    assert r.json() == {"predictions": [1]} and other.headers["content-encoding"] == "gzip"  # unlogged: as asked
    response = next(e for e in logged(tmp_path) if e["type"] == ev.RESPONSE)
    assert response["data"] == {"predictions": [1]}
    # Logging requests only, the answer is the client's as it asked for it.
    async with before(Scripted(compressing), tmp_path / "requests", log_mode="request") as sidecar:
        async with httpx.AsyncClient() as client:
            r = await client.post(f"{sidecar}/v1/models/m:predict", content=b"{}", headers={"accept-encoding": "gzip"})
    assert r.headers["content-encoding"] == "gzip" and r.json() == {"predictions": [1]}


async def test_an_id_sent_twice_reaches_the_predictor_once(tmp_path: Path) -> None:
    """Frameworks read the first x-request-id, the events carry the last: the predictor got both."""
    reply = b"HTTP/1.1 200 OK\r\ncontent-type: application/json\r\ncontent-length: 2\r\n\r\n{}"
    peer = Scripted(lambda _: reply)
    async with before(peer, tmp_path) as sidecar, httpx.AsyncClient() as client:
        r = await client.post(f"{sidecar}/v1/models/m:predict", content=b"{}",
                              headers=[(b"x-request-id", b"A"), (b"x-request-id", b"B")])
    ids = [line for line in peer.heads[0].split(b"\r\n") if line.lower().startswith(b"x-request-id:")]
    assert ids == [b"x-request-id: B"] and r.headers["x-request-id"] == "B"
    assert {e["id"] for e in logged(tmp_path)} == {"B"}


async def test_a_request_not_to_be_logged_is_not_checked_as_a_cloudevent(tmp_path: Path) -> None:
    """x-skip-logging: proxied as it is (the middleware did; the sidecar answered 400)."""
    reply = b"HTTP/1.1 200 OK\r\ncontent-type: application/json\r\ncontent-length: 2\r\n\r\n{}"
    async with before(Scripted(lambda _: reply), tmp_path) as sidecar, httpx.AsyncClient() as client:
        r = await client.post(f"{sidecar}/v1/models/m:predict", content=b"{}",
                              headers={"x-skip-logging": "true", "ce-specversion": "1.0", "ce-id": "x"})
    assert r.status_code == 200 and not (tmp_path / "events.jsonl").exists()


@pytest.mark.parametrize("server", ["httptools", "uvicorn"])
async def test_attributes_read_off_the_client_keep_the_events_valid(tmp_path: Path, server: str) -> None:
    """Legal in a request, not in a CloudEvents String: a C1 control in an allow-listed header, a
    broken traceparent or content type, `%09`/`%C2%85` in the model name or version. Each event
    was refused by every sink (in batch mode with other clients' events); now each is valid, and
    the predictor still gets the request as sent."""
    ok = b"HTTP/1.1 200 OK\r\ncontent-type: json\r\ncontent-length: 2\r\n\r\n{}"  # a sloppy predictor too
    trace = "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01"
    sent = [
        ("/v1/models/iris:predict", [(b"foo", b"a\x85b"), (b"foo", b"caf\xc3\xa9")]),
        ("/v1/models/iris:predict", [(b"traceparent", b"00-x\t-1"), (b"content-type", b"json")]),
        ("/v1/models/iris:predict", [(b"traceparent", trace.encode())]),
        ("/v1/models/a%09b:predict", []),
        ("/v2/models/a%C2%85b/versions/v%7F1/infer", []),
        ("/v1/models/a%FFb:predict", []),  # no UTF-8: U+FFFD, as %FE was too (one model)
    ]
    peer = Scripted(lambda _: ok)
    async with before(peer, tmp_path, server=server, metadata_headers=["Foo"]) as sidecar:
        async with httpx.AsyncClient(base_url=sidecar) as client:
            for i, (path, headers) in enumerate(sent):
                r = await client.post(path, content=b"{}", headers=[(b"x-request-id", b"a-%d" % i), *headers])
                assert r.status_code == 200
    for (path, headers), head in zip(sent, peer.heads, strict=True):
        assert head.startswith(f"POST {path} HTTP/1.1\r\n".encode())
        assert all(b"%s: %s\r\n" % header in head for header in headers)
    by_id: dict[str, list[CloudEvent]] = {}
    for line in (tmp_path / "events.jsonl").read_bytes().splitlines():
        event = from_dict(orjson.loads(line))  # validates
        by_id.setdefault(event.id, []).append(event)
    assert sorted(by_id) == ["a-0", "a-1", "a-2", "a-3", "a-4", "a-5"]
    assert all(len(events) == 2 for events in by_id.values())
    request = {id_: events[0] for id_, events in by_id.items()}
    assert json.loads(request["a-0"]["metadata"]) == {"Foo": ["a\x85b", "café"]}
    assert request["a-1"].get("traceparent") is None and request["a-1"].datacontenttype == "application/json"
    assert request["a-2"]["traceparent"] == trace
    assert {e.datacontenttype for events in by_id.values() for e in events} == {"application/json"}
    assert (request["a-3"]["modelname"], request["a-3"]["path"]) == ("a%09b", "/v1/models/a%09b:predict")
    assert (request["a-4"]["modelname"], request["a-4"]["modelversion"]) == ("a%C2%85b", "v%7F1")
    # uvicorn decodes the path itself, bytes that are no UTF-8 as U+FFFD
    assert request["a-5"]["modelname"] == ("a%FFb" if server == "httptools" else "a\ufffdb")


@pytest.mark.parametrize("coding", ["gzip", "deflate", "deflate-raw", "br", "gzip-bomb"])
async def test_a_compressed_request_is_logged_decoded(tmp_path: Path, coding: str) -> None:
    """tritonclient can compress its requests: the request event held gzip bytes labelled JSON."""
    import gzip
    import zlib

    payload = b'{"instances": [[1, 2]]}'
    body = {"gzip": gzip.compress(payload), "deflate": zlib.compress(payload), "br": b"\x0b\x03\x80{}\x03",
            "gzip-bomb": gzip.compress(b" " * (8 << 20))}.get(coding)
    if coding == "deflate-raw":  # as some clients send "deflate"
        raw = zlib.compressobj(wbits=-15)
        body = raw.compress(payload) + raw.flush()
    header = coding.split("-")[0]
    reply = b"HTTP/1.1 200 OK\r\ncontent-type: application/json\r\ncontent-length: 2\r\n\r\n{}"
    async with before(Scripted(lambda _: reply), tmp_path, max_payload_bytes=4096) as sidecar:
        async with httpx.AsyncClient() as client:
            r = await client.post(f"{sidecar}/v1/models/m:predict", content=body,
                                  headers={"content-encoding": header, "content-type": "application/json"})
    assert r.status_code == 200
    request = next(e for e in logged(tmp_path) if e["type"] == ev.REQUEST)
    if coding == "br":  # not one it decodes: said to be bytes, not JSON
        assert request["datacontenttype"] == "application/octet-stream" and "data_base64" in request
    elif coding == "gzip-bomb":  # cut at the payload cap, no further inflated
        assert request["truncated"] is True and len(base64.b64decode(request["data_base64"])) == 4096
    else:
        assert request["data"] == {"instances": [[1, 2]]} and "truncated" not in request


def _mounted(tmp_path: Path, url: str, *, lifespan: bool) -> tuple[Proxy, Any]:
    """The proxy mounted at /svc in a Starlette app (which runs no mounted app's lifespan: the
    outer app's runs the proxy's, if `lifespan`), its file sink `events.jsonl` in `tmp_path`."""
    from starlette.applications import Starlette
    from starlette.routing import Mount

    from infer_logger.server import build_app

    proxy = build_app(load_settings(None, predictor_url=url, spool={"dir": str(tmp_path / "spool")},
                                    delivery={"mode": "inline"},
                                    sinks=[{"type": "file", "path": str(tmp_path / "events.jsonl")}]))

    @contextlib.asynccontextmanager
    async def run(_: object) -> AsyncIterator[None]:
        await proxy.startup()
        yield
        await proxy.shutdown()

    return proxy, Starlette(routes=[Mount("/svc", app=proxy)],  # type: ignore[arg-type]  # Scope: a dict
                            lifespan=run if lifespan else None)


async def test_mounted_under_a_root_path_it_routes_and_forwards_without_it(tmp_path: Path) -> None:
    """Mounted at /svc, /svc/v1/models/m:predict went to the predictor as such and was not logged."""
    from infer_logger.demo.quickstart import ServerThread
    from infer_logger.server import uvicorn_config

    reply = b"HTTP/1.1 200 OK\r\ncontent-type: application/json\r\ncontent-length: 2\r\n\r\n{}"
    peer = Scripted(lambda _: reply)
    async with peer as url:
        _, outer = _mounted(tmp_path, url, lifespan=True)
        port = free_port()
        with ServerThread(uvicorn_config(outer, "127.0.0.1", port)):
            async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{port}") as client:
                r = await client.post("/svc/v1/models/m:predict?x=1", content=b"{}", headers={"x-request-id": "mnt-1"})
                other = await client.get("/svc/other%20thing")
    assert r.status_code == 200 and other.status_code == 200
    assert [h.split(b"\r\n", 1)[0] for h in peer.heads] == [b"POST /v1/models/m:predict?x=1 HTTP/1.1",
                                                           b"GET /other%20thing HTTP/1.1"]
    assert [(e["id"], e["type"], e["path"]) for e in logged(tmp_path)] == [
        ("mnt-1", ev.REQUEST, "/v1/models/m:predict"), ("mnt-1", ev.RESPONSE, "/v1/models/m:predict")]


@pytest.mark.parametrize("root, path, raw, expected", [
    ("/svc", "/svc/v1/models/m:predict", b"/svc/v1/models/m:predict", ("/v1/models/m:predict", b"/v1/models/m:predict")),
    # A root written percent-encoded in the raw path: its segments dropped, the rest as written
    # (an encoded slash in a model name stays one: re-encoding the decoded path made it a real one).
    ("/a c/x", "/a c/x/v1/models/a/b:predict", b"/a%20c/x/v1/models/a%2Fb:predict",
     ("/v1/models/a/b:predict", b"/v1/models/a%2Fb:predict")),
    ("/svc", "/svcx/v1", b"/svcx/v1", ("/svcx/v1", b"/svcx/v1")),  # not under the root
    ("/svc", "/svc", b"/svc", ("/", b"/")),
])
def test_the_root_path_is_taken_off_as_written(root: str, path: str, raw: bytes, expected: tuple[str, bytes]) -> None:
    from infer_logger.proxy import _own_path

    assert _own_path({"root_path": root, "path": path, "raw_path": raw}) == expected


async def test_mounted_without_its_lifespan_it_serves_unlogged_and_says_so(
        tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    """Its logger never started: the events were spooled for no one to deliver, and nothing said so."""
    import logging

    from infer_logger.demo.quickstart import ServerThread
    from infer_logger.server import uvicorn_config

    reply = b"HTTP/1.1 200 OK\r\ncontent-type: application/json\r\ncontent-length: 2\r\n\r\n{}"
    peer = Scripted(lambda _: reply)
    async with peer as url:
        proxy, outer = _mounted(tmp_path, url, lifespan=False)
        port = free_port()
        with caplog.at_level(logging.ERROR, logger="infer_logger.proxy"), \
                ServerThread(uvicorn_config(outer, "127.0.0.1", port)):
            async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{port}") as client:
                for i in range(2):
                    r = await client.post("/svc/v1/models/m:predict", content=b"{}", headers={"ce-id": f"u-{i}"})
                    assert r.status_code == 200 and r.json() == {}
    said = [r.getMessage() for r in caplog.records if "logger is not running" in r.getMessage()]
    assert len(said) == 1 and "served unlogged" in said[0]
    assert proxy.logger.spool.stats.appended == 0
    assert len(peer.heads) == 2


async def test_an_answer_compressed_though_identity_was_asked_for_is_logged_decoded(tmp_path: Path) -> None:
    """A predictor sending pre-compressed answers whatever it is asked: logged as gzip bytes
    labelled JSON. Decoded as a compressed request is; a coding it cannot decode, said to be bytes."""
    import gzip

    def forcing(request: bytes) -> bytes:
        body, coding = gzip.compress(b'{"predictions": [1]}'), b"gzip"
        if b"/br:" in request:
            body, coding = b"\x0b\x03\x80{}\x03", b"br"
        return (b"HTTP/1.1 200 OK\r\ncontent-type: application/json\r\ncontent-encoding: " + coding
                + b"\r\ncontent-length: %d\r\n\r\n" % len(body) + body)

    async with before(Scripted(forcing), tmp_path) as sidecar, httpx.AsyncClient() as client:
        r = await client.post(f"{sidecar}/v1/models/m:predict", content=b"{}", headers={"x-request-id": "gz"})
        br = await client.post(f"{sidecar}/v1/models/br:predict", content=b"{}", headers={"x-request-id": "br"})
    assert r.json() == {"predictions": [1]} and br.status_code == 200  # the client's as the predictor sent it
    responses = {e["id"]: e for e in logged(tmp_path) if e["type"] == ev.RESPONSE}
    assert responses["gz"]["data"] == {"predictions": [1]} and responses["gz"]["datacontenttype"] == "application/json"
    assert responses["br"]["datacontenttype"] == "application/octet-stream"
    assert base64.b64decode(str(responses["br"]["data_base64"])) == b"\x0b\x03\x80{}\x03"


async def test_mounted_under_an_outer_timeout_its_cancel_goes_through(tmp_path: Path) -> None:
    """A cancel was taken for the sidecar's stop: under a middleware giving the app 1 s, the
    client got "the sidecar stopped" (503) and the audit said so, not the middleware's 504."""
    import asyncio
    import socket

    class Timeout:
        def __init__(self, app: Any) -> None:
            self.app = app

        async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
            try:
                async with asyncio.timeout(0.5 if scope["type"] == "http" else None):
                    await self.app(scope, receive, send)
            except TimeoutError:
                await send({"type": "http.response.start", "status": 504, "headers": []})
                await send({"type": "http.response.body", "body": b"timed out"})

    with socket.socket() as silent:  # takes the connection, answers nothing
        silent.bind(("127.0.0.1", 0))
        silent.listen()
        proxy, outer = _mounted(tmp_path, f"http://127.0.0.1:{silent.getsockname()[1]}", lifespan=False)
        await proxy.startup()
        try:
            async with httpx.AsyncClient(transport=httpx.ASGITransport(app=Timeout(outer)), base_url="http://x") as c:
                r = await c.post("/svc/v1/models/m:predict", json={"instances": [[1]]})
        finally:
            await proxy.shutdown()
    assert (r.status_code, r.text) == (504, "timed out")
    assert [e["type"] for e in logged(tmp_path)] == [ev.REQUEST]

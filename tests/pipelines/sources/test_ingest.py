"""`infer-logger ingest`: a source feeding a sink as a service, run as the command it is, against
real peers (fluent-logger's sender, noida-db's Kafka protocol) and the store it writes."""

from __future__ import annotations

import asyncio
import signal
import socket
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
from fluent.sender import FluentSender

from infer_logger.cloudevents.event import CloudEvent
from infer_logger.errors import ConfigError
from infer_logger.events import REQUEST, RESPONSE
from infer_logger.sinks.memory import MemorySink
from infer_logger.store import AuditStore
from infer_logger.testing import EventCollector, free_port
from pipelines.sources.service import Ingest, Watched, create_app
from pipelines.sources.settings import IngestSettings
from tests.pipelines.sources.test_kafka_source import new_topic, publish
from tests.servers import Process
from tests.services import NoidaServer

INGEST = [sys.executable, "-m", "infer_logger.cli", "ingest"]


def ingest_process(tmp: Path, *args: str, env: dict[str, str] | None = None) -> Process:
    port = free_port()
    return Process([*INGEST, "--port", str(port), *args], port, ready_path="/readyz", log=tmp / "ingest.log",
                   env=env)


STOP_AFTER_1S = {"INFER_LOGGER_INGEST_DRAIN_TIMEOUT": "1", "INFER_LOGGER_INGEST_SINK__TYPE": "http"}


def kafka_to_http(bootstrap: str, topic: str, group: str, receiver: socket.socket) -> list[str]:
    """Flags reading `topic` as `group` into an http sink at `receiver`'s address."""
    return ["--source", "kafka", "--kafka-bootstrap", bootstrap, "--topic", topic, "--group-id", group,
            "--sink-url", f"http://127.0.0.1:{receiver.getsockname()[1]}/"]


@pytest.fixture
def running(tmp_path: Path) -> Iterator[list[Process]]:
    started: list[Process] = []
    yield started
    for proc in started:
        proc.stop()


def rows(db: Path) -> list[tuple[str, str | None]]:
    if not db.exists():
        return []
    store = AuditStore(db, readonly=True)
    try:
        return sorted((r.id, r.model) for r in store.query(limit=1000))
    finally:
        store.close()


def wait_for(check: object, timeout: float = 20.0) -> None:
    deadline = time.monotonic() + timeout
    while not check():  # type: ignore[operator]
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.05)


def inference_record(i: int, kind: str) -> dict[str, object]:
    return {"specversion": "1.0", "id": f"fl-{i}", "source": "/fluent-bit", "type": kind,
            "inferenceservicename": "iris", "modelname": "iris", "datacontenttype": "application/json",
            "data": {"instances": [[i, 1.0]]} if kind == REQUEST else {"predictions": [i % 3]}}


class TestForward:
    def test_fluent_logger_to_the_store(self, tmp_path: Path, running: list[Process]) -> None:
        db, forward = tmp_path / "audit.db", free_port()
        proc = ingest_process(tmp_path, "--listen", f"127.0.0.1:{forward}", "--db", str(db)).start()
        running.append(proc)
        sender = FluentSender("inference", host="127.0.0.1", port=forward)
        try:
            for i in range(20):
                for kind in (REQUEST, RESPONSE):
                    assert sender.emit("iris", inference_record(i, kind)), sender.last_error
            assert sender.emit("app", {"message": "not an inference event"})
        finally:
            sender.close()
        wait_for(lambda: len(rows(db)) == 20)
        assert rows(db) == sorted((f"fl-{i}", "iris") for i in range(20))
        metrics = httpx.get(proc.url + "/metrics").text
        assert 'infer_logger_ingest_records_total{source="forward"} 41.0' in metrics
        assert httpx.get(proc.url + "/healthz").json() == {"status": "alive"}
        assert httpx.get(proc.url + "/readyz").json() == {"ready": True, "source": "forward"}
        # SIGTERM: a graceful stop.
        assert proc.stop(signal.SIGTERM) == 0  # uvicorn raised it again once stopped: -15
        assert "Traceback" not in (tmp_path / "ingest.log").read_text()

    def test_not_ready_while_the_sink_fails_and_ready_once_it_takes_them(self, tmp_path: Path,
                                                                         running: list[Process]) -> None:
        forward, receiver_port = free_port(), free_port()
        proc = ingest_process(tmp_path, "--listen", f"127.0.0.1:{forward}",
                              "--sink-url", f"http://127.0.0.1:{receiver_port}/").start()
        running.append(proc)
        sender = FluentSender("inference", host="127.0.0.1", port=forward)
        try:
            sender.emit("iris", inference_record(1, REQUEST))  # the sink is down: not taken
            wait_for(lambda: httpx.get(proc.url + "/readyz").status_code == 503)
            assert "the sink fails" in httpx.get(proc.url + "/readyz").json()["reason"]
            with EventCollector(port=receiver_port) as receiver:
                sender.close()  # its connection was closed on it: a new one
                sender = FluentSender("inference", host="127.0.0.1", port=forward)
                assert sender.emit("iris", inference_record(2, REQUEST)), sender.last_error
                received = receiver.wait_until(lambda events: any(e.id == "fl-2" for e in events))
                wait_for(lambda: httpx.get(proc.url + "/readyz").status_code == 200)
            # fl-1 too, when the closed sender sent it again from its buffer (at least once)
            assert {e.id for e in received} <= {"fl-1", "fl-2"}
        finally:
            sender.close()

    def test_forward_port_in_use_is_a_clear_error(self, tmp_path: Path) -> None:
        with socket.create_server(("127.0.0.1", 0)) as taken:
            port = taken.getsockname()[1]
            done = subprocess.run([*INGEST, "--listen", f"127.0.0.1:{port}", "--db", str(tmp_path / "a.db"),
                                   "--port", str(free_port())], capture_output=True, text=True, timeout=60)
        assert done.returncode == 1, done.stderr
        assert "forward source" in done.stderr and str(port) in done.stderr
        assert "Traceback" not in done.stderr

    @pytest.mark.parametrize(("args", "field"), [
        (["--host", "my..host"], "host"),
        (["--host", "a" * 64], "host"),
        (["--listen", "my..host:0"], "source.forward.host"),
        (["--listen", "a" * 64 + ":0"], "source.forward.host"),
    ])
    def test_a_host_idna_refuses_is_a_config_error(self, tmp_path: Path, args: list[str], field: str) -> None:
        """A UnicodeError traceback at start (exit 1), where a port in use is a message."""
        done = subprocess.run([*INGEST, "--port", "0", *args, "--db", str(tmp_path / "a.db")],
                              capture_output=True, text=True, timeout=60)
        assert done.returncode == 2, done.stderr
        assert f"config error: {field}: " in done.stderr and "is not a host name or address" in done.stderr
        assert "Traceback" not in done.stderr

    def test_endpoint_port_in_use_is_a_clear_error(self, tmp_path: Path) -> None:
        with socket.create_server(("127.0.0.1", 0)) as taken:
            port = taken.getsockname()[1]
            done = subprocess.run([*INGEST, "--listen", f"127.0.0.1:{free_port()}", "--port", str(port),
                                   "--db", str(tmp_path / "a.db")], capture_output=True, text=True, timeout=60)
        assert done.returncode == 1, done.stderr
        assert f"cannot listen on 127.0.0.1:{port}" in done.stderr
        assert "Traceback" not in done.stderr


class TestKafka:
    def test_a_topic_to_the_store_committed(self, kafka_bootstrap: str, tmp_path: Path,
                                            running: list[Process]) -> None:
        topic, db = new_topic(kafka_bootstrap), tmp_path / "audit.db"
        events = [CloudEvent({"specversion": "1.0", "id": f"k-{i // 2}", "source": "/sidecar",
                              "type": REQUEST if i % 2 == 0 else RESPONSE, "modelname": "iris",
                              "datacontenttype": "application/json"}, b'{"predictions": [1]}')
                  for i in range(30)]
        asyncio.run(publish(kafka_bootstrap, topic, events))
        group = f"ingest-{uuid.uuid4().hex[:8]}"
        proc = ingest_process(tmp_path, "--source", "kafka", "--kafka-bootstrap", kafka_bootstrap,
                              "--topic", topic, "--group-id", group, "--db", str(db)).start()
        running.append(proc)
        wait_for(lambda: len(rows(db)) == 15)
        wait_for(lambda: 'infer_logger_ingest_delivered_total{source="kafka"} 30.0'
                 in httpx.get(proc.url + "/metrics").text)
        proc.stop()
        from tests.pipelines.sources.test_kafka_source import committed

        assert committed(kafka_bootstrap, group, topic) == [30]


    def test_not_ready_while_no_broker_is_reachable(self, tmp_path: Path, running: list[Process]) -> None:
        """/readyz said 200 while the consumer only logged that no broker answered."""
        server = NoidaServer("kafka")  # its port, nothing listening yet
        port = free_port()
        proc = Process([*INGEST, "--port", str(port), "--source", "kafka", "--kafka-bootstrap", server.address,
                        "--topic", "t", "--db", str(tmp_path / "audit.db")], port, ready_path="/healthz",
                       log=tmp_path / "ingest.log").start()
        running.append(proc)
        try:
            wait_for(lambda: httpx.get(proc.url + "/readyz").status_code == 503)
            reason = httpx.get(proc.url + "/readyz").json()["reason"]
            assert server.address in reason, reason
            server.start()
            wait_for(lambda: httpx.get(proc.url + "/readyz").status_code == 200, 30)
        finally:
            server.stop()

    def test_sigterm_gives_the_batch_in_hand_drain_timeout_then_leaves_it_uncommitted(
            self, kafka_bootstrap: str, tmp_path: Path) -> None:
        """A sink that never answers: the stop waited for the whole batch, 16 POSTs of 10 s at a
        time (~5 min for 500 events), past a pod's grace period, sending all the while."""
        topic, group = new_topic(kafka_bootstrap), f"ingest-{uuid.uuid4().hex[:8]}"
        asyncio.run(publish(kafka_bootstrap, topic, [CloudEvent(
            {"specversion": "1.0", "id": f"h-{i}", "source": "/s", "type": REQUEST}, b"{}") for i in range(200)]))
        silent = socket.create_server(("127.0.0.1", 0))  # takes connections, never answers
        try:
            # POSTs time out after 600 s: only drain_timeout can end the stop within its 60 s guard.
            proc = ingest_process(tmp_path, *kafka_to_http(kafka_bootstrap, topic, group, silent),
                                  env={**STOP_AFTER_1S, "INFER_LOGGER_INGEST_SINK__TIMEOUT": "600"}).start()
            silent.settimeout(60)
            conn, _ = silent.accept()
            with conn:
                conn.settimeout(60)
                assert conn.recv(1), "no POST"  # the first batch is with the sink
                code = proc.stop(signal.SIGTERM, timeout=60)  # then SIGKILL (-9)
            # -9: still running 60 s after SIGTERM, the drain_timeout (1 s) was not applied.
            assert code in (0, -signal.SIGTERM), f"exit {code}, not a graceful stop"
        finally:
            silent.close()
        from tests.pipelines.sources.test_kafka_source import committed

        assert all(offset <= 0 for offset in committed(kafka_bootstrap, group, topic))  # nothing committed
        assert "drain_timeout" in (tmp_path / "ingest.log").read_text()


    def test_sigterm_with_kafka_stalled_ends_the_process(self, tmp_path: Path) -> None:
        """A commit to a broker that does not answer (SIGSTOPped: no reset, no timeout) held the
        consumer's thread for ever, and the interpreter's exit joined it: SIGTERM never ended
        the process."""
        server = NoidaServer("kafka").start()
        silent = socket.create_server(("127.0.0.1", 0))
        try:
            topic, group = new_topic(server.address), f"ingest-{uuid.uuid4().hex[:8]}"
            asyncio.run(publish(server.address, topic, [CloudEvent(
                {"specversion": "1.0", "id": "s-1", "source": "/s", "type": REQUEST}, b"{}")]))
            proc = ingest_process(tmp_path, *kafka_to_http(server.address, topic, group, silent),
                                  env=STOP_AFTER_1S).start()
            silent.settimeout(60)
            conn, _ = silent.accept()
            with conn:
                conn.settimeout(60)
                assert conn.recv(65536), "no POST"
                server.pause()
                conn.sendall(b"HTTP/1.1 200 OK\r\ncontent-length: 0\r\n\r\n")  # taken: the commit goes to Kafka
                time.sleep(1)
                code = proc.stop(signal.SIGTERM, timeout=120)  # then SIGKILL (-9)
            assert code in (0, -signal.SIGTERM), f"exit {code}: still running 120 s after SIGTERM"
        finally:
            silent.close()
            server.resume()
            server.stop()
        assert "did not answer" in (tmp_path / "ingest.log").read_text()


class TestConfig:
    @pytest.mark.parametrize(("args", "env", "names"), [
        (["--source", "kafka"], {}, "bootstrap_servers"),
        (["--listen", "24224"], {}, "--listen"),
        (["--listen", "::1"], {}, "IPv6 in brackets"),  # host ":" and port 1, failing only at start
        (["--sink-url", "http://127.0.0.1:1/", "--db", "x.db"], {}, "--sink-url and --db"),
        # Empty values were taken for unset: the file's or the default's value ran instead.
        (["--source", "kafka", "--topic", "t", "--kafka-bootstrap", ""], {}, "source.kafka.bootstrap_servers"),
        (["--source", "kafka", "--topic", "t", "--kafka-bootstrap", " , "], {}, "names no broker"),
        (["--source", "kafka", "--topic", "t", "--kafka-bootstrap", "k:1", "--group-id", ""], {}, "group_id"),
        (["--source", "kafka", "--topic", "", "--kafka-bootstrap", "k:1"], {}, "source.kafka.topics.0"),
        (["--sink-url", ""], {}, "sink.http.url"),
        (["--listen", ""], {}, "--listen"),
        # "" is every address to asyncio: the unauthenticated data port open to the network.
        (["--listen", "[]:24224"], {}, "--listen"),
        ([], {"INFER_LOGGER_INGEST_SOURCE__HOST": ""}, "INFER_LOGGER_INGEST_SOURCE__HOST (source.forward.host)"),
        ([], {"INFER_LOGGER_INGEST_PROT": "1"}, "INFER_LOGGER_INGEST_PROT"),
        ([], {"INFER_LOGGER_INGEST_SOURCE__PORT": "x"}, "INFER_LOGGER_INGEST_SOURCE__PORT"),
        # `inf` passed `gt=0` (and `ge=0`): seconds are finite, at most a day.
        ([], {"INFER_LOGGER_INGEST_DRAIN_TIMEOUT": "inf"}, "INFER_LOGGER_INGEST_DRAIN_TIMEOUT (drain_timeout)"),
        ([], {"INFER_LOGGER_INGEST_SINK": '{"type": "http", "url": "http://b/", "timeout": 1e10}'},
         "INFER_LOGGER_INGEST_SINK (sink.http.timeout)"),
        ([], {"INFER_LOGGER_INGEST_SOURCE__FRAME_TIMEOUT": "inf"}, "(source.forward.frame_timeout)"),
        ([], {"INFER_LOGGER_INGEST_SOURCE__HANDSHAKE_TIMEOUT": "1e10"}, "(source.forward.handshake_timeout)"),
        *(([], {"INFER_LOGGER_INGEST_SOURCE": f'{{"type": "kafka", "bootstrap_servers": "k:1", "topics": ["t"], '
                                              f'"{name}": 1e10}}'}, f"(source.kafka.{name})")
          for name in ("retry_max", "batch_timeout")),
        # No file can be named so: the sink's start was a `ValueError: embedded null byte` traceback.
        ([], {"INFER_LOGGER_INGEST_SINK": '{"type": "store", "path": "audit\\u0000.db"}'},
         "INFER_LOGGER_INGEST_SINK (sink.store.path)"),
        # A scalar has no keys: it was ignored (README: a variable matching no setting stops it).
        ([], {"INFER_LOGGER_INGEST_PORT__NUMBER": "1234"}, "INFER_LOGGER_INGEST_PORT__NUMBER: matches no setting"),
        # Every plain record's `type`: each frame was refused at validation, its sender resent it for ever.
        *(([], {"INFER_LOGGER_INGEST_SOURCE__RECORD_TYPE": value},
           "INFER_LOGGER_INGEST_SOURCE__RECORD_TYPE (source.forward.record_type)") for value in ("", "a\tb")),
        # A variable of a section naming no type was dropped under `--source kafka`: `--check` said ok.
        (["--source", "kafka", "--kafka-bootstrap", "127.0.0.1:9", "--topic", "t"],
         {"INFER_LOGGER_INGEST_SOURCE__BATCH_SIZE": "0"}, "INFER_LOGGER_INGEST_SOURCE__BATCH_SIZE (source.kafka.batch_size)"),
        # A flag of the other source: `source.forward.bootstrap_servers: Extra inputs are not permitted`
        # (and `--listen` under kafka said `bootstrap_servers: Field required`).
        (["--kafka-bootstrap", "k:1", "--topic", "t"], {}, "--kafka-bootstrap needs --source kafka"),
        (["--topic", "t"], {}, "--topic needs --source kafka"),
        (["--source", "forward", "--group-id", "g"], {}, "--group-id needs --source kafka"),
        (["--kafka-bootstrap", "k:1", "--topic", "t"], {"INFER_LOGGER_INGEST_SOURCE__TYPE": "forward"},
         "--kafka-bootstrap needs --source kafka"),
        (["--source", "kafka", "--listen", "127.0.0.1:24224"], {}, "--listen needs --source forward"),
    ])
    def test_bad_settings_exit_2_naming_them(self, args: list[str], env: dict[str, str], names: str) -> None:
        import os

        done = subprocess.run([*INGEST, *args, "--check"], capture_output=True, text=True, timeout=60,
                              env={**os.environ, **env})
        assert done.returncode == 2, done.stderr
        assert names in done.stderr and "Traceback" not in done.stderr

    def test_check_names_what_runs(self, tmp_path: Path) -> None:
        config = tmp_path / "ingest.yaml"
        config.write_text("source:\n  type: kafka\n  bootstrap_servers: 127.0.0.1:9092\n  topics: [a]\n"
                          "sink:\n  type: http\n  url: http://127.0.0.1:9082/\n")
        done = subprocess.run([*INGEST, "-c", str(config), "--topic", "b", "--check"], capture_output=True,
                              text=True, timeout=60)
        assert done.returncode == 0, done.stderr
        assert done.stdout.strip() == "ok: kafka source -> http sink"

    def test_the_flags_lie_over_the_file(self, tmp_path: Path) -> None:
        config = tmp_path / "ingest.yaml"
        config.write_text("source:\n  type: kafka\n  bootstrap_servers: kafka:9092\n  topics: [a]\n")
        from pipelines.sources.settings import load_ingest_settings

        settings = load_ingest_settings(config, source={"topics": ["b"]})
        assert settings.source.type == "kafka"
        assert (settings.source.bootstrap_servers, settings.source.topics) == ("kafka:9092", ["b"])
        assert load_ingest_settings(None, source={"port": 24225}).source.type == "forward"

    def test_a_flag_of_another_type_replaces_the_files_section(self, tmp_path: Path) -> None:
        """`--db` over the file's http sink was merged into it: `sink.store.url: Extra inputs`."""
        from pipelines.sources.settings import load_ingest_settings

        config = tmp_path / "ingest.yaml"
        config.write_text("source: {port: 24225, shared_key: s}\nsink: {type: http, url: 'http://b/'}\n")
        settings = load_ingest_settings(config, sink={"type": "store", "path": "x.db"},
                                        source={"type": "forward", "host": "0.0.0.0"})
        assert (settings.sink.type, settings.sink.path) == ("store", "x.db")  # type: ignore[union-attr]
        # The same type (the file's by default): merged, its options kept.
        assert (settings.source.host, settings.source.port) == ("0.0.0.0", 24225)  # type: ignore[union-attr]
        kafka = {"type": "kafka", "bootstrap_servers": "k:9092", "topics": ["t"]}
        # A section naming no type with keys the flag's type lacks is the default's (forward):
        # replaced, as one naming it is (merged, a config that ran failed: `source.kafka.port`).
        assert load_ingest_settings(config, source=kafka).source.type == "kafka"
        config.write_text("source: {type: forward, port: 24225, shared_key: s}\nsink: {path: y.db}\n")
        assert load_ingest_settings(config, source=kafka).source.type == "kafka"
        assert load_ingest_settings(config, sink={"type": "http", "url": "http://b/"}).sink.type == "http"
        # Keys neither type has: merged, so named (replaced, the section went, a group id with it).
        for section in ("{grup_id: x}", "{group_id: g, grup_id: x}", "{group_id: g, port: 1}"):
            config.write_text(f"source: {section}\n")
            with pytest.raises(ConfigError, match=r"source\.kafka\.(grup_id|port): Extra inputs"):
                load_ingest_settings(config, source=kafka)

    def test_a_section_naming_no_type_is_merged_under_the_flags_type(
            self, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
        """Under `--source kafka` the env's or file's `source:` naming no type was taken for a forward
        one and dropped: the group id, TLS or SASL of env vars were not used, silently."""
        from pipelines.sources.settings import load_ingest_settings

        kafka = {"type": "kafka", "bootstrap_servers": "h:9", "topics": ["t"]}
        monkeypatch.setenv("INFER_LOGGER_INGEST_SOURCE__GROUP_ID", "from-env")
        monkeypatch.setenv("INFER_LOGGER_INGEST_SOURCE__BATCH_SIZE", "7")
        monkeypatch.setenv("INFER_LOGGER_INGEST_SINK__BATCH_SIZE", "9")
        settings = load_ingest_settings(None, source=kafka, sink={"type": "http", "url": "http://b/"})
        assert (settings.source.group_id, settings.source.batch_size) == ("from-env", 7)  # type: ignore[union-attr]
        assert (settings.sink.type, settings.sink.batch_size) == ("http", 9)
        monkeypatch.delenv("INFER_LOGGER_INGEST_SOURCE__GROUP_ID")
        config = tmp_path / "ingest.yaml"
        config.write_text("source: {group_id: from-file, config: {security.protocol: SSL}}\nsink: {batch_size: 3}\n")
        settings = load_ingest_settings(config, source=kafka, sink={"type": "http", "url": "http://b/"})
        assert settings.source.group_id == "from-file"  # type: ignore[union-attr]
        assert settings.source.config == {"security.protocol": "SSL"}  # type: ignore[union-attr]
        assert settings.source.batch_size == 7  # type: ignore[union-attr]
        assert (settings.sink.type, settings.sink.batch_size) == ("http", 9)

    def test_kafka_flags_join_a_kafka_source_of_env_vars(self) -> None:
        import os

        env = {**os.environ, "INFER_LOGGER_INGEST_SOURCE__TYPE": "kafka", "INFER_LOGGER_INGEST_SOURCE__TOPICS": '["t"]'}
        done = subprocess.run([*INGEST, "--kafka-bootstrap", "127.0.0.1:9", "--check"], capture_output=True,
                              text=True, timeout=60, env=env)
        assert done.returncode == 0, done.stderr
        assert done.stdout.strip() == "ok: kafka source -> store sink"

    @pytest.mark.parametrize("env", [
        {"INFER_LOGGER_INGEST_SINK": '{"type": "store", "path": "x.db"}'},
        {"INFER_LOGGER_INGEST_SINK__TYPE": "store", "INFER_LOGGER_INGEST_SINK__PATH": "x.db"},
    ])
    def test_an_env_var_of_another_type_replaces_the_files_section(
            self, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, env: dict[str, str]) -> None:
        """Env lies over the file as flags do: it was merged into the file's http sink
        (`sink.store.url: Extra inputs are not permitted`, blaming the file's key)."""
        from pipelines.sources.settings import load_ingest_settings

        config = tmp_path / "ingest.yaml"
        config.write_text("sink: {type: http, url: 'http://b/'}\n")
        for name, value in env.items():
            monkeypatch.setenv(name, value)
        settings = load_ingest_settings(config)
        assert (settings.sink.type, settings.sink.path) == ("store", "x.db")  # type: ignore[union-attr]

    def test_a_sink_naming_no_type_is_the_default_store(self, tmp_path: Path,
                                                        monkeypatch: pytest.MonkeyPatch) -> None:
        """As a source naming none is a `forward` one: `INFER_LOGGER_INGEST_SINK__PATH` (the default
        sink's file) was refused, `sink: Unable to extract tag using discriminator 'type'`."""
        from pipelines.sources.settings import load_ingest_settings

        monkeypatch.setenv("INFER_LOGGER_INGEST_SINK__PATH", "x.db")
        settings = load_ingest_settings(None)
        assert (settings.sink.type, settings.sink.path) == ("store", "x.db")  # type: ignore[union-attr]
        monkeypatch.delenv("INFER_LOGGER_INGEST_SINK__PATH")
        config = tmp_path / "ingest.yaml"
        config.write_text("sink: {path: y.db, batch_size: 10}\n")
        settings = load_ingest_settings(config)
        assert (settings.sink.type, settings.sink.path) == ("store", "y.db")  # type: ignore[union-attr]
        assert settings.sink.batch_size == 10

    def test_a_flag_of_another_type_replaces_an_env_vars_section(self, monkeypatch: pytest.MonkeyPatch) -> None:
        """Flags lie over env: `--db` was merged into the env's http sink (`sink.store.url: Extra inputs`)."""
        from pipelines.sources.settings import load_ingest_settings

        monkeypatch.setenv("INFER_LOGGER_INGEST_SINK", '{"type": "http", "url": "http://b/"}')
        monkeypatch.setenv("INFER_LOGGER_INGEST_SOURCE", '{"type": "kafka", "bootstrap_servers": "k:9092", '
                                                         '"topics": ["t"]}')
        settings = load_ingest_settings(None, sink={"type": "store", "path": "x.db"}, source={"type": "forward"})
        assert (settings.sink.type, settings.sink.path) == ("store", "x.db")  # type: ignore[union-attr]
        assert settings.source.type == "forward"
        assert load_ingest_settings(None).sink.type == "http"  # no flag: the env's


class _Stops:
    """A source whose run ends by itself (a bug, a fatal client error)."""

    def __init__(self, error: Exception | None) -> None:
        self.error = error
        self.closed = False

    async def start(self) -> None: ...

    async def run(self) -> None:
        await asyncio.sleep(0)
        if self.error is not None:
            raise self.error

    def stop(self) -> None: ...

    async def drain(self, timeout: float) -> bool:
        return True

    async def aclose(self) -> None:
        self.closed = True

    def stats(self) -> dict[str, int]:
        return {"records": 3}


class TestService:
    @pytest.mark.parametrize("error", [RuntimeError("fatal"), None])
    async def test_a_source_that_stops_stops_the_service(self, error: Exception | None) -> None:
        sink = Watched(MemorySink())
        ingest = Ingest(IngestSettings(), _Stops(error), sink)
        stopped = asyncio.Event()
        ingest.on_stopped = stopped.set
        app = create_app(ingest)
        async with app.router.lifespan_context(app):
            await asyncio.wait_for(stopped.wait(), 5)
            assert ingest.failure == ("RuntimeError: fatal" if error else "it stopped")
            assert ingest.problem == ingest.failure
            transport = httpx.ASGITransport(app=app)
            async with httpx.AsyncClient(transport=transport, base_url="http://ingest") as client:
                ready = await client.get("/readyz")
                assert ready.status_code == 503 and ready.json()["reason"] == ingest.failure
                assert 'infer_logger_ingest_records_total{source="forward"} 3.0' in (await client.get("/metrics")).text
        assert ingest.source.closed  # type: ignore[attr-defined]

    async def test_a_stop_lets_the_forward_frame_in_hand_be_taken_and_acked(self) -> None:
        """The Forward source's stop let `run` return at once: the connection was cancelled with
        its frame at the sink, taken but not acked, and Fluent Bit sent it again."""
        import msgpack

        class Slow:
            def __init__(self) -> None:
                self.events: list[CloudEvent] = []
                self.taking = asyncio.Event()

            async def send_batch(self, events: list[CloudEvent]) -> None:
                self.taking.set()
                await asyncio.sleep(1.0)
                self.events.extend(events)

            async def aclose(self) -> None: ...

        # A generous drain_timeout (a bound): the second the sink takes must fit on a loaded machine.
        settings = IngestSettings(source={"type": "forward", "port": 0}, drain_timeout=30)
        slow = Slow()
        sink = Watched(slow)  # type: ignore[arg-type]
        source = settings.source.build(sink)
        ingest = Ingest(settings, source, sink)
        await ingest.start()
        ingest.begin()
        reader, writer = await asyncio.open_connection("127.0.0.1", source.port)  # type: ignore[attr-defined]
        writer.write(msgpack.packb(["app", [[1, {"a": 1}]], {"chunk": "c1"}]))
        await asyncio.wait_for(slow.taking.wait(), 30)  # the frame is with the sink
        await ingest.aclose()
        assert msgpack.unpackb(await asyncio.wait_for(reader.read(100), 5)) == {"ack": "c1"}
        assert len(slow.events) == 1
        writer.close()

    async def test_a_failing_sink_makes_it_unready_for_a_while_only(self) -> None:
        """Unready, no connection comes behind a Service, so no batch finds the sink back."""
        from infer_logger.errors import SinkError
        from infer_logger.sinks.memory import failing

        memory = MemorySink()
        memory.fail = failing(1, SinkError("down"))
        watched = Watched(memory, hold=0.3)
        with pytest.raises(SinkError):
            await watched.send_batch([CloudEvent({"specversion": "1.0", "id": "1", "source": "/", "type": "t"})])
        assert watched.failure == "the sink fails: down"
        await asyncio.sleep(0.4)
        assert watched.failure is None
        pulled = Watched(memory)  # Kafka's: it retries anyway, until a batch passes
        memory.fail = failing(1, SinkError("down"))
        with pytest.raises(SinkError):
            await pulled.send_batch([CloudEvent({"specversion": "1.0", "id": "1", "source": "/", "type": "t"})])
        await asyncio.sleep(0.4)
        assert pulled.failure == "the sink fails: down"

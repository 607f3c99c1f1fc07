"""`infer-logger cesql` and `infer-logger broker --check` (the click commands, run in-process)."""

from __future__ import annotations

from pathlib import Path

import click
import orjson
import pytest
from click.testing import CliRunner

from pipelines.broker.cli import broker_command, cesql_command

EVENT = {"specversion": "1.0", "id": "1", "source": "/s", "type": "org.kubeflow.serving.inference.response",
         "statuscode": 500}


class TestCesql:
    def test_valid_expression(self) -> None:
        result = CliRunner().invoke(cesql_command, ["type LIKE 'org.%' AND statuscode >= 500"])
        assert result.exit_code == 0 and result.output == "valid\n"

    def test_an_empty_expression_is_no_filter_as_a_trigger_loads_it(self, tmp_path: Path) -> None:
        result = CliRunner().invoke(cesql_command, [""])
        assert result.exit_code == 0 and result.output.startswith("valid (empty: no filter"), result.output
        (tmp_path / "bad.json").write_text("not json")
        result = CliRunner().invoke(cesql_command, ["", "--event", str(tmp_path / "bad.json")])
        assert result.exit_code == 2 and "--event: not JSON" in result.output

    def test_a_mixed_logic_warning_is_said_once(self, tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
        path = tmp_path / "event.json"
        path.write_bytes(orjson.dumps(EVENT))
        result = CliRunner().invoke(cesql_command, ["TRUE OR FALSE AND FALSE", "--event", str(path)])
        assert result.exit_code == 1  # (TRUE OR FALSE) AND FALSE, as the spec reads it
        assert len([r for r in caplog.records if "without parentheses" in r.getMessage()]) == 1

    def test_parse_error_points_at_the_position(self) -> None:
        result = CliRunner().invoke(cesql_command, ["type = = 'x'"])
        assert result.exit_code == 2
        assert "at position 7" in result.output and "\n         ^" in result.output

    def test_a_function_that_does_not_exist_is_invalid(self) -> None:
        """It was "valid", and the trigger filtered out every event."""
        result = CliRunner().invoke(cesql_command, ["LENGHT(type) > 3"])
        assert result.exit_code == 2 and "no function LENGHT of 1 argument at position 0" in result.output

    def test_event_matches(self, tmp_path: Path) -> None:
        path = tmp_path / "event.json"
        path.write_bytes(orjson.dumps(EVENT))
        result = CliRunner().invoke(cesql_command, ["statuscode >= 500", "--event", str(path)])
        assert (result.exit_code, result.output) == (0, "result: TRUE\nmatches: yes\n")

    @pytest.mark.parametrize(("expression", "matches"), [
        ("truncated", 0),  # a boolean extension: the String "true" to a trigger, cast for the filter
        ("NOT EXISTS knativebrokerttl", 0),  # a trigger never sees the broker's TTL
        ("statuscode = '500'", 0),  # text, as delivered
    ])
    def test_an_event_is_taken_as_a_trigger_takes_it(self, expression: str, matches: int) -> None:
        event = {**EVENT, "truncated": True, "knativebrokerttl": 255}
        result = CliRunner().invoke(cesql_command, [expression, "--event", "-"], input=orjson.dumps(event))
        assert result.exit_code == matches, result.output

    def test_event_errors_do_not_match(self) -> None:
        result = CliRunner().invoke(cesql_command, ["subject = 'x'", "--event", "-"],
                                    input=orjson.dumps({"type": "t"}))
        assert result.exit_code == 1
        assert "result: FALSE" in result.output and "error (missingAttribute)" in result.output

    def test_invalid_event(self) -> None:
        result = CliRunner().invoke(cesql_command, ["TRUE", "--event", "-"],
                                    input=orjson.dumps({**EVENT, "time": "yesterday"}))
        assert result.exit_code == 2 and "not a valid CloudEvent: time" in result.output


class TestBrokerCheck:
    def test_good_files(self, tmp_path: Path) -> None:
        path = tmp_path / "triggers.yaml"
        path.write_text("triggers:\n  - {name: a, subscriber: 'http://127.0.0.1:9/'}\n"
                        "  - {name: b, subscriber: {ref: {name: store}}}\n")
        result = CliRunner().invoke(broker_command, ["-t", str(path), "--dir", str(tmp_path), "--check"])
        assert result.exit_code == 0, result.output
        assert result.output.strip().endswith("ok: 2 triggers")

    def test_bad_file_names_its_line(self, tmp_path: Path) -> None:
        path = tmp_path / "triggers.yaml"
        path.write_text("triggers:\n  - name: a\n    subscriber: 'http://127.0.0.1:9/'\n"
                        "    filters: [{cesql: \"type LIKE\"}]\n")
        result = CliRunner().invoke(broker_command, ["-t", str(path), "--check"])
        assert result.exit_code == 2
        assert f"{path}:4:" in result.output and "triggers[0].filters[0].cesql" in result.output

    def test_unknown_reference(self, tmp_path: Path) -> None:
        path = tmp_path / "triggers.yaml"
        path.write_text("triggers:\n  - {name: a, subscriber: {ref: {name: event-display}}}\n")
        result = CliRunner().invoke(broker_command, ["-t", str(path), "--check"])
        assert result.exit_code == 2 and "no component or address named 'event-display'" in result.output

    def test_bad_setting(self, tmp_path: Path) -> None:
        result = CliRunner().invoke(broker_command, ["--role", "ingress", "--check"])
        assert result.exit_code == 2 and "needs channel: kafka" in result.output

    @pytest.mark.parametrize(("env", "words"), [
        ({"INFER_LOGGER_BROKER_SPOOL__MAX_BYTES": "1KiB"}, "spool.max_bytes (1.0KiB) must be at least 4 x max_event_bytes"),
        ({"INFER_LOGGER_BROKER_SPOOL__MAX_BYTES": "0"}, "greater than 0"),
        ({"INFER_LOGGER_BROKER_SPOOL__SEGMENT_BYTES": "0"}, "greater than 0"),
        ({"INFER_LOGGER_BROKER_MAX_EVENT_BYTES": "0"}, "greater than 0"),  # every event a 413
        ({"INFER_LOGGER_BROKER_MAX_REQUEST_BYTES": "512KiB"}, "must be at least max_event_bytes"),
    ])
    def test_a_log_too_small_for_its_events_is_a_config_error(self, env: dict[str, str], words: str) -> None:
        """It passed, and every event over a quarter of it was answered 503 (retry) for ever."""
        result = CliRunner().invoke(broker_command, ["--check"], env=env)
        assert result.exit_code == 2 and words in result.output, result.output

    def test_a_transactional_kafka_client_is_a_config_error(self) -> None:
        result = CliRunner().invoke(broker_command, ["--channel", "kafka", "--check"],
                                    env={"INFER_LOGGER_BROKER_KAFKA__CONFIG": '{"transactional.id": "t"}'})
        assert result.exit_code == 2 and "kafka.config" in result.output and "transactional.id" in result.output

    @pytest.mark.parametrize(("config", "words"), [
        ('{"group.id": "my-app"}', "group.id"),  # every trigger in one group: each event to one of them
        ('{"group.instance.id": "a"}', "group.instance.id"),
        ('{"enable.auto.commit": true, "enable.auto.offset.store": true}', "enable.auto.commit"),
        ('{"acks": 1}', "acks"),
    ])
    def test_kafka_client_properties_the_channel_rests_on_are_config_errors(self, config: str, words: str) -> None:
        result = CliRunner().invoke(broker_command, ["--channel", "kafka", "--check"],
                                    env={"INFER_LOGGER_BROKER_KAFKA__CONFIG": config})
        assert result.exit_code == 2 and "kafka.config" in result.output and words in result.output, result.output

    def test_odd_yaml_values_are_config_errors(self, tmp_path: Path) -> None:
        path = tmp_path / "triggers.yaml"
        path.write_text("triggers:\n  - name: a\n    subscriber: 'http://127.0.0.1:9/'\n"
                        '    filters: [{exact: {type: "\\ud800"}}]\n')
        result = CliRunner().invoke(broker_command, ["-t", str(path), "--check"])
        assert result.exit_code == 2
        assert f"{path}:4:" in result.output and "triggers[0].filters[0].exact.type" in result.output

    @pytest.mark.parametrize(("env", "field"), [
        ({"INFER_LOGGER_BROKER_DRAIN_TIMEOUT": "inf"}, "INFER_LOGGER_BROKER_DRAIN_TIMEOUT (drain_timeout)"),
        ({"INFER_LOGGER_BROKER_REQUEST_READ_TIMEOUT": "inf"},
         "INFER_LOGGER_BROKER_REQUEST_READ_TIMEOUT (request_read_timeout)"),
        ({"INFER_LOGGER_BROKER_SPOOL__FSYNC_INTERVAL": "1e10"},
         "INFER_LOGGER_BROKER_SPOOL__FSYNC_INTERVAL (spool.fsync_interval)"),
        ({"INFER_LOGGER_BROKER_COMPONENTS": '[{"type": "http", "url": "http://b/", "timeout": "inf"}]'}, "components"),
    ])
    def test_an_endless_duration_is_a_config_error(self, tmp_path: Path, env: dict[str, str], field: str) -> None:
        """`inf` passed `gt=0`: seconds are finite, at most a day."""
        result = CliRunner().invoke(broker_command, ["--check", "--channel", "memory", "--dir", str(tmp_path)],
                                    env=env)
        assert result.exit_code == 2 and field in result.output, result.output
        assert "finite" in result.output or "86400" in result.output, result.output

    @pytest.mark.parametrize(("text", "field"), [
        ('trigger_files: ["triggers\\0.yaml"]\n', "trigger_files.0"),
        ('components: [{type: store, path: "audit\\0.db"}]\n', "components"),
        ('dir: "broker\\0x"\n', "dir"),  # the start said "embedded null byte", naming no setting
    ])
    def test_a_nul_in_a_file_name_is_a_config_error(self, tmp_path: Path, text: str, field: str) -> None:
        """No file can be named so: it was a `ValueError: embedded null byte` traceback."""
        config = tmp_path / "broker.yaml"
        config.write_text(text)
        where = [] if text.startswith("dir:") else ["--dir", str(tmp_path)]
        result = CliRunner().invoke(broker_command, ["--check", "--channel", "memory", *where, "-c", str(config)])
        assert result.exit_code == 2 and field in result.output, result.output
        assert "holds a NUL character" in result.output, result.output

    def test_a_trigger_file_no_file_can_be_named_is_a_document_error(self) -> None:
        from infer_logger.documents import DocumentError
        from pipelines.broker.trigger import load_trigger_files

        with pytest.raises(DocumentError, match="cannot read"):
            load_trigger_files([Path("triggers\0.yaml")])

    @pytest.mark.parametrize(("name", "words"), [
        ("INFER_LOGGER_BROKER_HOST__ADDRESS", "matches no setting: host has no keys"),
        ("INFER_LOGGER_BROKER_TRIGGER_FILES__0", "give INFER_LOGGER_BROKER_TRIGGER_FILES whole, as JSON"),
    ])
    def test_a_key_under_a_setting_that_has_none_is_a_config_error(self, tmp_path: Path, name: str,
                                                                   words: str) -> None:
        """README: a variable that matches no setting stops the command; this one was ignored."""
        result = CliRunner().invoke(broker_command, ["--check", "--channel", "memory", "--dir", str(tmp_path)],
                                    env={name: "x"})
        assert result.exit_code == 2 and f"config error: {name}: " in result.output, result.output
        assert words in result.output, result.output
        result = CliRunner().invoke(broker_command, ["--check", "--channel", "memory", "--dir", str(tmp_path)],
                                    env={"INFER_LOGGER_BROKER_ADDRESSES__DISPLAY": "http://127.0.0.1:9/"})
        assert result.exit_code == 0, result.output  # a map's keys are read

    def test_an_integer_beyond_64_bits(self, tmp_path: Path) -> None:
        path = tmp_path / "triggers.yaml"
        path.write_text("triggers:\n  - name: a\n    subscriber: 'http://127.0.0.1:9/'\n"
                        "    delivery: {retry: 99999999999999999999999}\n")
        result = CliRunner().invoke(broker_command, ["-t", str(path), "--dir", str(tmp_path), "--check"])
        assert result.exit_code == 0, result.output


def test_serving_with_a_bad_trigger_file_exits_2_naming_it(tmp_path: Path) -> None:
    """Checked before serving: a bad file was uvicorn's exit 3 from its failed startup."""
    path = tmp_path / "triggers.yaml"
    path.write_text("triggers:\n  - {name: a, subscriber: {ref: {name: event-display}}}\n")
    result = CliRunner().invoke(broker_command, ["-t", str(path), "--dir", str(tmp_path)])
    assert result.exit_code == 2 and "no component or address named 'event-display'" in result.output


@pytest.mark.parametrize("command", [broker_command, cesql_command])
def test_help_fits_80_columns(command: click.Command) -> None:
    out = CliRunner().invoke(command, ["--help"], terminal_width=78).output  # what click fills in 80 columns
    assert max(len(line) for line in out.splitlines()) < 80


def test_broker_help_shows_the_kafka_default() -> None:
    out = CliRunner().invoke(broker_command, ["--help"], terminal_width=80).output
    assert "[default: 127.0.0.1:9092]" in " ".join(out.split())


def test_a_port_in_use_exits_1_naming_it(tmp_path: Path) -> None:
    """As the proxy and ingest do (it was uvicorn's exit 3, its error alone)."""
    import socket
    import subprocess
    import sys

    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        done = subprocess.run([str(Path(sys.executable).parent / "infer-logger"), "broker", "--port", str(port),
                               "--dir", str(tmp_path / "broker")], capture_output=True, text=True, timeout=60)
    assert done.returncode == 1, done.stderr
    assert f"did not start on 127.0.0.1:{port}" in done.stderr and "address already in use" in done.stderr


def test_an_empty_host_is_refused(tmp_path: Path) -> None:
    """uvicorn binds "" (an unset manifest value) to every address."""
    result = CliRunner().invoke(broker_command, ["--check", "--dir", str(tmp_path)], env={"INFER_LOGGER_BROKER_HOST": ""})
    assert result.exit_code == 2 and "host" in result.output


@pytest.mark.parametrize("host", ["my..host", "a" * 64])
def test_a_host_idna_refuses_exits_2_naming_it(tmp_path: Path, host: str) -> None:
    """It was uvicorn's UnicodeError traceback (exit 1), where a port in use is a message."""
    import subprocess
    import sys

    done = subprocess.run([str(Path(sys.executable).parent / "infer-logger"), "broker", "--host", host, "--port", "0",
                           "--channel", "memory", "--dir", str(tmp_path / "broker")],
                          capture_output=True, text=True, timeout=60)
    assert done.returncode == 2, done.stderr
    assert "host" in done.stderr and "is not a host name or address" in done.stderr
    assert "Traceback" not in done.stderr


def test_an_empty_kafka_bootstrap_is_refused(tmp_path: Path) -> None:
    """It was taken for unset (the default 127.0.0.1:9092 ran); in a file, librdkafka waited for ever."""
    result = CliRunner().invoke(broker_command, ["--check", "--dir", str(tmp_path), "--channel", "kafka",
                                                 "--kafka-bootstrap", ""])
    assert result.exit_code == 2 and "kafka.bootstrap_servers" in result.output


def test_an_explainer_component_needs_no_registration(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """README promises `type: explainer` components; only code that registered it could use it."""
    pytest.importorskip("explainers.subscriber")
    config = tmp_path / "broker.yaml"
    config.write_text("components:\n  - {type: explainer, name: explainer, settings: {predictor_url: "
                      "'http://127.0.0.1:9', model_name: iris, background: 'dataset:iris'}}\n")
    result = CliRunner().invoke(broker_command, ["--check", "--dir", str(tmp_path / "b"), "-c", str(config)])
    assert result.exit_code == 0, result.output
    from pipelines.broker.components import Components

    # `ref: {name: explainer}` with its defaults, too, when they make an explainer (env vars here):
    # defaults that do not were taken by --check, and the start failed.
    assert not Components().knows("explainer")
    monkeypatch.setenv("INFER_LOGGER_EXPLAINER_PREDICTOR_URL", "http://127.0.0.1:9")
    monkeypatch.setenv("INFER_LOGGER_EXPLAINER_BACKGROUND", "dataset:iris")
    assert Components().knows("explainer")


class TestExplainerComponentSettings:
    """Checked with the component: `--check` said ok, and the start failed (exit 1) blaming the
    trigger file's line, though the bad settings were in the broker's file."""

    @pytest.fixture(autouse=True)
    def _explainer(self) -> None:
        pytest.importorskip("explainers.subscriber")

    def test_a_declared_one_is_a_config_error(self, tmp_path: Path) -> None:
        config = tmp_path / "broker.yaml"
        config.write_text("components:\n  - {type: explainer, name: explain}\n")
        path = tmp_path / "triggers.yaml"
        path.write_text("triggers:\n  - {name: t, subscriber: {ref: {name: explain}}}\n")
        result = CliRunner().invoke(broker_command, ["--check", "--channel", "memory", "--dir", str(tmp_path),
                                                     "-c", str(config), "-t", str(path)])
        assert result.exit_code == 2 and "config error: components" in result.output, result.output
        assert "settings" in result.output and "give predictor_url" in result.output, result.output

    def test_an_inline_one_names_its_field(self, tmp_path: Path) -> None:
        path = tmp_path / "triggers.yaml"
        path.write_text("triggers:\n  - {name: t, subscriber: {component: {type: explainer, settings: "
                        "{predictor_url: 'http://127.0.0.1:9', background: 'dataset:iris', method: nope}}}}\n")
        result = CliRunner().invoke(broker_command, ["--check", "--channel", "memory", "--dir", str(tmp_path),
                                                     "-t", str(path)])
        assert result.exit_code == 2 and "subscriber.component" in result.output, result.output
        assert "settings" in result.output and "unknown method 'nope'" in result.output, result.output

    @pytest.mark.parametrize(("text", "words"), [
        (None, "cannot read config file"),
        ("explainer:\n  predictor_url: localhost:8080\n  background: dataset:iris\n", "predictor_url"),
        ("explainer:\n  predictor_url: http://127.0.0.1:9\n  background: dataset:iris\n  subscriber: {source: ''}\n",
         "subscriber.source"),
    ])
    def test_its_config_file_is_read(self, tmp_path: Path, text: str | None, words: str) -> None:
        explainer = tmp_path / "explainer.yaml"
        if text is not None:
            explainer.write_text(text)
        config = tmp_path / "broker.yaml"
        config.write_text(f"components:\n  - {{type: explainer, name: explain, config: '{explainer}'}}\n")
        result = CliRunner().invoke(broker_command, ["--check", "--channel", "memory", "--dir", str(tmp_path),
                                                     "-c", str(config)])
        assert result.exit_code == 2 and "config" in result.output and words in result.output, result.output
        explainer.write_text("explainer:\n  predictor_url: http://127.0.0.1:9\n  background: dataset:iris\n")
        result = CliRunner().invoke(broker_command, ["--check", "--channel", "memory", "--dir", str(tmp_path),
                                                     "-c", str(config)])
        assert result.exit_code == 0, result.output  # the predictor is not asked: only the start needs it

    def test_the_start_exits_2_naming_it(self, tmp_path: Path) -> None:
        import subprocess
        import sys

        path = tmp_path / "triggers.yaml"
        path.write_text("triggers:\n  - {name: t, subscriber: {component: {type: explainer, "
                        "settings: {model_name: x}}}}\n")
        done = subprocess.run([str(Path(sys.executable).parent / "infer-logger"), "broker", "--port", "0",
                               "--channel", "memory", "--dir", str(tmp_path / "broker"), "-t", str(path)],
                              check=False, capture_output=True, text=True, timeout=120)
        assert done.returncode == 2, done.stderr
        assert "subscriber.component" in done.stderr and "give predictor_url" in done.stderr, done.stderr

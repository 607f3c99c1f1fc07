"""Settings: sources and their order, and errors that name the field."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from infer_logger.cloudevents import CloudEvent, validate
from infer_logger.config import Settings, load_settings
from infer_logger.errors import ConfigError
from infer_logger.sinks import FileSinkConfig, HttpSinkConfig, StoreSinkConfig


@pytest.fixture(autouse=True)
def clean_environ(monkeypatch: pytest.MonkeyPatch) -> None:
    import os

    for key in list(os.environ):
        if key.startswith("INFER_LOGGER_") and key != "INFER_LOGGER_CONFORMANCE":
            monkeypatch.delenv(key)


class TestSources:
    """Flags beat env vars, env vars beat the YAML file, the file beats defaults."""

    def test_defaults_use_the_store(self) -> None:
        s = load_settings()
        assert s.port == 9081 and s.upstream == "http://127.0.0.1:8080"
        assert [type(x) for x in s.all_sinks()] == [StoreSinkConfig]

    def test_precedence(self, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
        cfg = tmp_path / "c.yaml"
        cfg.write_text("port: 1000\nnamespace: from-yaml\ncomponent: from-yaml\nspool:\n  durability: memory\n")
        monkeypatch.setenv("INFER_LOGGER_NAMESPACE", "from-env")
        monkeypatch.setenv("INFER_LOGGER_COMPONENT", "from-env")
        monkeypatch.setenv("INFER_LOGGER_SPOOL__MAX_BYTES", "10MiB")
        s = load_settings(cfg, component="from-flag", spool={"dir": "x"})
        assert s.port == 1000
        assert s.namespace == "from-env"
        assert s.component == "from-flag"
        assert s.spool.durability == "memory" and s.spool.dir == Path("x")
        assert int(s.spool.max_bytes) == 10 * 1024 * 1024

    def test_env_false_reads_no_variable(self, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
        """The quickstart's way: the user's variables (one unknown, one a sink) are a real sidecar's."""
        cfg = tmp_path / "c.yaml"
        cfg.write_text("namespace: from-yaml\n")
        monkeypatch.setenv("INFER_LOGGER_TOKEN", "x")
        monkeypatch.setenv("INFER_LOGGER_LOG_URL", "http://prod/")
        monkeypatch.setenv("INFER_LOGGER_NAMESPACE", "from-env")
        monkeypatch.setenv("INFER_LOGGER_SPOOL__DURABILITY", "memory")
        s = Settings.load(cfg, env=False, component="from-flag")
        assert (s.namespace, s.component, s.spool.durability) == ("from-yaml", "from-flag", "disk")
        assert [type(x) for x in s.all_sinks()] == [StoreSinkConfig]
        monkeypatch.setenv("INFER_LOGGER_PORT", "1")
        with pytest.raises(ConfigError) as info:  # the flag's, not blamed on the variable
            Settings.load(None, env=False, port=-1)
        assert info.value.field == "port"

    def test_log_urls_become_named_sinks(self) -> None:
        s = load_settings(log_url=["http://a/", "http://b/", "file:///tmp/e.jsonl", "sqlite:///tmp/a.db"])
        sinks = s.all_sinks()
        assert [type(x) for x in sinks] == [HttpSinkConfig, HttpSinkConfig, FileSinkConfig, StoreSinkConfig]
        assert [x.sink_name for x in sinks] == ["http", "http2", "file", "store"]

    def test_log_url_sinks_name_their_destination(self) -> None:
        """Named by place, a sink's checkpoint must say whose it is (the spool keeps it with it)."""
        s = load_settings(log_url=["http://user:pw@a/", "http://b/"], sinks=[{"type": "http", "url": "http://c/"}])
        where = s.destinations()
        assert list(where) == ["http", "http2", "http3"] and len(set(where.values())) == 3
        # Its address only: another password or timeout is the same place.
        again = load_settings(log_url=["http://user:new@a/"], sinks=[{"type": "http", "url": "http://c/", "timeout": 3}])
        assert list(again.destinations().values()) == [where["http"], where["http2"]]
        with pytest.raises(ConfigError, match="given twice") as info:
            load_settings(log_url=["http://a/", "http://a/"])
        assert info.value.field == "log_url"

    @pytest.mark.parametrize(("urls", "sinks"), [
        (["file://events.jsonl", "file://./events.jsonl"], []),
        (["file://events.jsonl"], [{"type": "file", "path": "logs/../events.jsonl"}]),
        ([], [{"type": "file", "path": "events.jsonl"}, {"type": "file", "name": "again", "path": "./events.jsonl"}]),
    ])
    def test_two_file_sinks_on_one_file_are_refused(self, urls: list[str], sinks: list[dict[str, str]]) -> None:
        with pytest.raises(ConfigError, match=r"events.jsonl write one file: give each its own") as info:
            load_settings(log_url=urls, sinks=sinks)  # every event written twice
        assert info.value.field == "sinks"
        assert len(load_settings(log_url=["file://a.jsonl"], sinks=[{"type": "file", "path": "b.jsonl"}]).all_sinks()) == 2

    def test_file_sinks_on_one_device_are_not_refused_on_one_pipe_they_are(self, tmp_path: Path) -> None:
        # A device takes each write whole: nothing mixed or cut (one pipe for two was refused as one file).
        assert len(load_settings(log_url=["file:///dev/null", "file:///dev/../dev/null"]).all_sinks()) == 2
        # A pipe takes a batch over its buffer in pieces, the two sinks' lines mixed.
        os.mkfifo(tmp_path / "events.fifo")
        (tmp_path / "link").symlink_to(tmp_path / "events.fifo")
        with pytest.raises(ConfigError, match="write one file"):
            load_settings(log_url=[f"file://{tmp_path}/events.fifo", f"file://{tmp_path}/link"])

    def test_file_and_sqlite_urls_take_what_follows_the_slashes_as_the_path(self) -> None:
        # file://events.jsonl was a sink writing to '.' (the host part was dropped): every batch failed.
        sinks = load_settings(log_url=["file://events.jsonl", "sqlite://audit.db", "file://localhost/tmp/e.jsonl"]).all_sinks()
        assert [str(s.path) for s in sinks] == ["events.jsonl", "audit.db", "/tmp/e.jsonl"]

    @pytest.mark.parametrize("url", ["file://", "sqlite://", "file://logs/"])
    def test_a_url_naming_no_file_is_refused(self, url: str) -> None:
        with pytest.raises(ConfigError, match="names no file") as info:
            load_settings(log_url=[url])
        assert info.value.field == "log_url"

    @pytest.mark.parametrize(("url", "path"), [
        # Taken as written: a file named `my%20audit.db`, not the `my audit.db` the URL names.
        ("sqlite:///tmp/my%20audit.db", "/tmp/my audit.db"),
        ("file:///tmp/a%23b%3F.jsonl", "/tmp/a#b?.jsonl"),
        ("file://localhost/tmp/e%C3%A9.jsonl", "/tmp/eé.jsonl"),
        ("sqlite://audit%201.db", "audit 1.db"),
        # A `%` that starts no escape is kept as it is.
        ("sqlite://100%.db", "100%.db"),
        ("file://a%2g.jsonl", "a%2g.jsonl"),
    ])
    def test_file_and_sqlite_paths_are_percent_decoded(self, url: str, path: str) -> None:
        from infer_logger.config import sink_from_url

        assert str(sink_from_url(url).path) == path  # type: ignore[union-attr]

    @pytest.mark.parametrize("url", ["sqlite:///tmp/a.db?cache=shared", "sqlite:///tmp/a.db?", "file:///tmp/e.jsonl#x",
                                     "file://localhost/tmp/e.jsonl?x=1", "sqlite://a.db#"])
    def test_a_query_or_fragment_is_refused(self, url: str) -> None:
        """They became part of the file's name: `sqlite:///tmp/a.db?cache=shared` wrote `a.db?cache=shared`."""
        with pytest.raises(ConfigError, match=r"no query or fragment.*%3F.*%23") as info:
            load_settings(log_url=[url])
        assert info.value.field == "log_url" and url in info.value.message

    @pytest.mark.parametrize("url", ["sqlite:///tmp/a%FF.db", "file://%C3.jsonl"])
    def test_an_escape_that_is_not_utf8_is_refused(self, url: str) -> None:
        with pytest.raises(ConfigError, match="UTF-8") as info:
            load_settings(log_url=[url])
        assert info.value.field == "log_url"

    def test_the_proxy_exits_2_on_a_query(self, tmp_path: Path) -> None:
        done = subprocess.run([sys.executable, "-m", "infer_logger.cli", "proxy", "--log-url",
                               f"sqlite:///{tmp_path}/a.db?cache=shared"], capture_output=True, text=True, timeout=60)
        assert done.returncode == 2, done.stderr
        assert "log_url" in done.stderr and "no query or fragment" in done.stderr and "Traceback" not in done.stderr
        assert not list(tmp_path.iterdir())

    def test_a_file_sink_on_a_directory_is_refused(self, tmp_path: Path) -> None:
        with pytest.raises(ConfigError, match="is a directory") as info:
            load_settings(log_url=[f"file://{tmp_path}"])
        assert info.value.field == "log_url.path"
        with pytest.raises(ConfigError, match="is a directory") as info:
            load_settings(sinks=[{"type": "file", "path": str(tmp_path)}])
        assert info.value.field == "sinks.0.file.path"

    @pytest.mark.parametrize(("host", "source"), [
        ("0.0.0.0", "http://0.0.0.0:9081/"),
        ("::", "http://[::]:9081/"),  # was http://:::9081/, which no sink takes as a source
        ("fe80::1%eth0", "http://[fe80::1%25eth0]:9081/"),
    ])
    def test_the_default_source_is_the_sidecars_url(self, host: str, source: str) -> None:
        settings = load_settings(host=host)
        assert settings.source == source
        validate(CloudEvent({"specversion": "1.0", "id": "1", "type": "t", "source": settings.source}))
        assert load_settings(host=host, source_uri="/mine").source == "/mine"

    def test_sinks_from_yaml(self, tmp_path: Path) -> None:
        cfg = tmp_path / "c.yaml"
        cfg.write_text("sinks:\n  - type: http\n    url: http://broker/\n    mode: structured\n"
                       "  - type: file\n    path: /tmp/x.jsonl\n")
        s = load_settings(cfg)
        assert s.all_sinks()[0].mode == "structured"


class TestErrors:
    """Every error names the field and, where there is a choice, the allowed values."""

    @pytest.mark.parametrize(
        ("yaml_text", "field", "hint"),
        [
            ("log_mode: sometimes\n", "log_mode", "'all', 'request' or 'response'"),
            ("sinks:\n  - type: carrier-pigeon\n", "sinks.0", "'http', 'file', 'store', 'elasticsearch', 'fluentd', 'kafka'"),
            ("sinks:\n  - type: http\n", "sinks.0.http.url", "Field required"),
            ("spool:\n  durability: tape\n", "spool.durability", "'disk' or 'memory'"),
            ("spool:\n  nope: 1\n", "spool.nope", "Extra inputs"),
            ("port: -1\n", "port", "greater than or equal"),
            ("spool:\n  segment_bytes: 0\n", "spool.segment_bytes", "greater than 0"),
            ("sinks:\n  - type: file\n  - type: file\n", "sinks", "two sinks are named 'file'"),
            # A spool of a couple of payloads is full with the next one (it refused them all).
            ("spool:\n  max_bytes: 2MiB\n", "spool", "spool.max_bytes (2.0MiB) must be at least 4 x max_payload_bytes"),
            # In memory too: the cap is what bounds the sidecar's memory during a sink outage.
            ("spool:\n  durability: memory\n  max_bytes: 2MiB\n", "spool",
             "spool.max_bytes (2.0MiB) must be at least 4 x max_payload_bytes"),
            # A sink's name names its checkpoint file: one it could not save never freed the spool.
            ("sinks:\n  - type: file\n    name: audit/events\n", "sinks.0.file.name", "cannot hold '/'"),
            ("sinks:\n  - type: file\n    name: 'a\\\\b'\n", "sinks.0.file.name", "cannot hold '\\\\'"),
            ("sinks:\n  - type: file\n    name: \"a\\tb\"\n", "sinks.0.file.name", "cannot hold '\\t'"),
            ("sinks:\n  - type: store\n    name: ..\n", "sinks.0.store.name", "cannot start with '.'"),
            ("sinks:\n  - type: store\n    name: .hidden\n", "sinks.0.store.name", "cannot start with '.'"),
            # Every event carries it: the broker refused them all, and each was dead-lettered.
            ("source_uri: my source\n", "source_uri", "'my source' is not a URI reference"),
            ("source_uri: '1x:y'\n", "source_uri", "invalid URI scheme"),
            # Path("") is "." (the spool spread in the working directory); "" is every address.
            ("spool: {dir: ''}\n", "spool.dir", "is empty"),
            ("host: ''\n", "host", "at least 1 character"),
            # As getaddrinfo reads a name (IDNA): a UnicodeError traceback at start.
            ("host: my..host\n", "host", "'my..host' is not a host name or address: label empty or too long"),
            (f"host: {'a' * 64}.example\n", "host", "too long"),
        ],
    )
    def test_bad_yaml_values(self, tmp_path: Path, yaml_text: str, field: str, hint: str) -> None:
        cfg = tmp_path / "c.yaml"
        cfg.write_text(yaml_text)
        with pytest.raises(ConfigError) as info:
            load_settings(cfg)
        assert info.value.field.startswith(field)
        assert hint in info.value.message

    @pytest.mark.parametrize("name", ["es:prod", "audit store", "kafka@dc1", "журнал", "es.prod", "a..b"])
    def test_a_sink_name_a_file_can_hold_loads_and_keeps_its_checkpoint(self, tmp_path: Path, name: str) -> None:
        # Refused, a renamed sink would orphan its checkpoint and be sent the whole spool again.
        from infer_logger.spool import DiskSpool

        cfg = tmp_path / "c.yaml"
        cfg.write_text(f'sinks:\n  - {{type: file, name: "{name}", path: {tmp_path / "e.jsonl"}}}\n', encoding="utf-8")
        assert load_settings(cfg).all_sinks()[0].sink_name == name
        spool = DiskSpool(tmp_path / "spool")
        reader = spool.reader(name)
        reader.commit(reader.position, force=True)
        assert spool.checkpoint_path(name).exists()
        assert spool.checkpoint_path(name).parent == tmp_path / "spool" / "checkpoints"
        spool.close()

    def test_broken_yaml_names_the_line(self, tmp_path: Path) -> None:
        cfg = tmp_path / "c.yaml"
        cfg.write_text("port: 1\nsinks: [\n")
        with pytest.raises(ConfigError, match=r"c.yaml:3:1"):
            load_settings(cfg)

    def test_deep_nesting_is_refused_at_its_line(self, tmp_path: Path) -> None:
        """5000 `[` was a RecursionError traceback; the trigger files' bound applies here too."""
        cfg = tmp_path / "c.yaml"
        cfg.write_text("port: 1\nsinks: " + "[" * 5000 + "]" * 5000 + "\n")
        with pytest.raises(ConfigError, match="nested deeper than 100 levels") as info:
            load_settings(cfg)
        assert info.value.field.startswith(f"{cfg}:2:") and "not valid YAML" not in str(info.value)

    def test_timestamps_are_read_as_text(self, tmp_path: Path) -> None:
        cfg = tmp_path / "c.yaml"
        cfg.write_text("namespace: 2024-01-02\n")
        assert load_settings(cfg).namespace == "2024-01-02"

    @pytest.mark.parametrize(("text", "where", "words"), [
        ("off: true\n", "c.yaml:1:1", "the key False is not text"),  # YAML 1.1's booleans: a traceback
        ("1: 2\n", "c.yaml:1:1", "the key 1 is not text"),
        ("explainer:\n  yes: 1\n", "c.yaml:2:3", "the key True is not text"),
        ("port: 1\nport: 2\n", "c.yaml:2:1", "the key 'port' is given twice"),  # the last one won
        ("spool:\n  max_bytes: 1GiB\n  max_bytes: 2GiB\n", "c.yaml:3:3", "'max_bytes' is given twice"),
        ("<<: {off: true}\n", "c.yaml:1:6", "the key False is not text"),  # merged inline: never checked
        ("<<: [{port: 1, port: 2}]\n", "c.yaml:1:16", "'port' is given twice"),
    ])
    def test_keys_that_are_not_text_or_given_twice(self, tmp_path: Path, text: str, where: str, words: str) -> None:
        cfg = tmp_path / "c.yaml"
        cfg.write_text(text)
        with pytest.raises(ConfigError, match=words) as info:
            load_settings(cfg)
        assert info.value.field.endswith(where)

    def test_a_mapping_merged_into_itself_is_read(self, tmp_path: Path) -> None:
        """Its keys' check recursed for ever (a RecursionError traceback); yaml.safe_load reads it."""
        cfg = tmp_path / "c.yaml"
        cfg.write_text("a: &x {port: 1, <<: *x}\nb: &y {namespace: n, <<: [*y]}\n")
        assert load_settings(cfg, section="b").namespace == "n"

    def test_merge_keys_may_be_overridden(self, tmp_path: Path) -> None:
        cfg = tmp_path / "c.yaml"
        cfg.write_text("base: &b {port: 1, namespace: a}\n"
                       "x:\n  <<: *b\n  port: 9090\n")
        assert load_settings(cfg, section="x").port == 9090

    def test_a_file_that_is_not_utf8_names_the_file(self, tmp_path: Path) -> None:
        cfg = tmp_path / "c.yaml"
        cfg.write_bytes(b"namespace: caf\xe9\n")  # Latin-1
        with pytest.raises(ConfigError, match="not UTF-8") as info:
            load_settings(cfg)
        assert info.value.field == str(cfg)

    @pytest.mark.parametrize(("url", "says"), [
        ("http://127.0.0.1:99999/", "Port out of range"),
        ("http://127.0.0.1:abc/", "could not be cast to integer"),
        ("http://ü..x/", "label empty or too long"),
        ("http://" + "a" * 64 + ":8080/", "label too long"),
    ])
    def test_a_predictor_url_the_client_cannot_read_is_refused(self, monkeypatch: pytest.MonkeyPatch, url: str,
                                                               says: str) -> None:
        """Only the scheme and host were checked: the proxy started, then failed with a traceback."""
        with pytest.raises(ConfigError, match=says) as info:
            load_settings(predictor_url=url)
        assert info.value.field == "predictor_url" and "http(s)://host[:port]" in info.value.message
        monkeypatch.setenv("INFER_LOGGER_PREDICTOR_URL", url)
        with pytest.raises(ConfigError, match=says) as info:
            load_settings()
        assert info.value.field == "INFER_LOGGER_PREDICTOR_URL (predictor_url)"

    def test_bad_log_url_scheme(self) -> None:
        with pytest.raises(ConfigError, match="scheme must be"):
            load_settings(log_url=["ftp://x"])

    def test_cli_exits_2_naming_the_field(self, tmp_path: Path) -> None:
        cfg = tmp_path / "c.yaml"
        cfg.write_text("spool:\n  overflow: explode\n")
        done = subprocess.run([sys.executable, "-m", "infer_logger.cli", "proxy", "-c", str(cfg)],
                              capture_output=True, text=True, timeout=60)
        assert done.returncode == 2
        assert "spool.overflow" in done.stderr and "drop_newest" in done.stderr
        assert "Traceback" not in done.stderr

    def test_cli_env_error(self, tmp_path: Path) -> None:
        done = subprocess.run([sys.executable, "-m", "infer_logger.cli", "proxy"], capture_output=True,
                              text=True, timeout=60, env={"INFER_LOGGER_LOG_MODE": "x", "PATH": "/usr/bin"})
        assert done.returncode == 2 and "log_mode" in done.stderr


# A duration setting of each section, as YAML holding a value.
DURATIONS = {
    "timeout": "timeout: {}\n",
    "request_read_timeout": "request_read_timeout: {}\n",
    "delivery.backoff_initial": "delivery: {{backoff_initial: {}}}\n",
    "delivery.backoff_max": "delivery: {{backoff_max: {}}}\n",
    "delivery.retry_after_max": "delivery: {{retry_after_max: {}}}\n",
    "delivery.linger": "delivery: {{linger: {}}}\n",
    "delivery.drain_timeout": "delivery: {{drain_timeout: {}}}\n",
    "spool.fsync_interval": "spool: {{fsync_interval: {}}}\n",
    "sinks.0.http.timeout": "sinks: [{{type: http, url: 'http://b/', timeout: {}}}]\n",
    "sinks.0.elasticsearch.timeout": "sinks: [{{type: elasticsearch, timeout: {}}}]\n",
}


class TestDurations:
    """Seconds are finite and at most a day: `inf` passed `gt=0`, and ended in an OverflowError
    traceback where it became a server's or a socket's timeout."""

    @pytest.mark.parametrize("value", [".inf", "1.0e+10"])
    @pytest.mark.parametrize("field", list(DURATIONS))
    def test_an_endless_duration_is_refused_a_day_is_not(self, tmp_path: Path, field: str, value: str) -> None:
        cfg = tmp_path / "c.yaml"
        cfg.write_text(DURATIONS[field].format(value))
        with pytest.raises(ConfigError) as info:
            load_settings(cfg)
        assert info.value.field == field and ("finite" in info.value.message or "86400" in info.value.message)
        cfg.write_text(DURATIONS[field].format(86400))
        load_settings(cfg)

    @pytest.mark.parametrize(("args", "env", "field"), [
        (["--timeout", "inf"], {}, "config error: timeout:"),
        ([], {"INFER_LOGGER_TIMEOUT": "inf"}, "config error: INFER_LOGGER_TIMEOUT (timeout):"),
    ])
    def test_the_proxy_exits_2_naming_it(self, tmp_path: Path, args: list[str], env: dict[str, str],
                                         field: str) -> None:
        """Under uvicorn it was an OverflowError traceback at start (its keep-alive, int(timeout + 5))."""
        from infer_logger.testing import free_port

        done = subprocess.run([sys.executable, "-m", "infer_logger.cli", "proxy", "--port", str(free_port()),
                               "--server", "uvicorn", "--durability", "memory", "--log-url",
                               f"file://{tmp_path}/e.jsonl", *args],
                              capture_output=True, text=True, timeout=60, cwd=tmp_path, env={**os.environ, **env})
        assert done.returncode == 2, done.stderr
        assert field in done.stderr and "Traceback" not in done.stderr


class TestStorePath:
    @pytest.mark.parametrize(("text", "field"), [
        ('sinks: [{type: store, path: "audit\\0.db"}]\n', "sinks.0.store.path"),
        ('log_url: ["sqlite://audit\\0.db"]\n', "log_url"),
        # The spool's start was the same traceback; a CA bundle so named, the system's CAs instead.
        ('spool: {dir: "spool\\0x"}\n', "spool.dir"),
        ('log_ca_cert_file: "ca\\0x"\n', "log_ca_cert_file"),
        ('sinks: [{type: http, url: "https://b/", ca_certs: "ca\\0x"}]\n', "sinks.0.http.ca_certs"),
    ])
    def test_a_nul_in_a_store_path_is_refused(self, tmp_path: Path, text: str, field: str) -> None:
        """No file can be named so: the sink's start was a `ValueError: embedded null byte` traceback."""
        cfg = tmp_path / "c.yaml"
        cfg.write_text(text)
        with pytest.raises(ConfigError, match="holds a NUL character") as info:
            load_settings(cfg)
        assert info.value.field.startswith(field)


class TestEnvLists:
    """List and section env vars: the KServe-style bare forms work, and JSON errors name the variable."""

    def test_a_bare_url_and_comma_separated_lists(self, monkeypatch: pytest.MonkeyPatch) -> None:
        monkeypatch.setenv("INFER_LOGGER_LOG_URL", "http://broker/")
        monkeypatch.setenv("INFER_LOGGER_METADATA_HEADERS", "x-user, x-tenant")
        s = load_settings()
        assert s.log_url == ["http://broker/"] and s.metadata_headers == ["x-user", "x-tenant"]
        # Split at a comma before a scheme only: a URL's own commas stay.
        monkeypatch.setenv("INFER_LOGGER_LOG_URL", "http://a/?q=1,2, sqlite://audit.db")
        assert load_settings().log_url == ["http://a/?q=1,2", "sqlite://audit.db"]
        monkeypatch.setenv("INFER_LOGGER_LOG_URL", '["http://a/", "http://b/"]')
        assert load_settings().log_url == ["http://a/", "http://b/"]

    @pytest.mark.parametrize("url", [
        "http://collector/log?tags=env,team:ml",  # a query's comma before `word:`
        "http://user:p,w:d@collector/log",  # a password's
    ])
    def test_a_urls_own_comma_before_a_colon_stays(self, monkeypatch: pytest.MonkeyPatch, url: str) -> None:
        monkeypatch.setenv("INFER_LOGGER_LOG_URL", url)
        assert load_settings().log_url == [url]
        monkeypatch.setenv("INFER_LOGGER_LOG_URL", f"{url},FILE:///tmp/e.jsonl")
        assert load_settings().log_url == [url, "FILE:///tmp/e.jsonl"]

    def test_a_bad_value_from_a_variable_names_it(self, monkeypatch: pytest.MonkeyPatch) -> None:
        monkeypatch.setenv("INFER_LOGGER_LOG_URL", "ftp://collector/log")
        with pytest.raises(ConfigError, match="scheme must be") as info:
            load_settings()
        assert info.value.field == "INFER_LOGGER_LOG_URL (log_url)"
        monkeypatch.setenv("INFER_LOGGER_SPOOL__OVERFLOW", "explode")
        with pytest.raises(ConfigError) as info:
            load_settings(log_url=["http://a/"])  # a flag overrides the variable: not it
        assert info.value.field == "INFER_LOGGER_SPOOL__OVERFLOW (spool.overflow)"

    def test_a_yaml_value_is_not_blamed_on_a_variable_holding_other_keys(
            self, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
        cfg = tmp_path / "c.yaml"
        cfg.write_text("spool:\n  max_bytes: lots\n")
        monkeypatch.setenv("INFER_LOGGER_SPOOL", '{"dir": "sp"}')
        with pytest.raises(ConfigError) as info:
            load_settings(cfg)
        assert info.value.field == "spool.max_bytes"
        # A flag for another key of the section does not hide the variable that holds the bad one.
        monkeypatch.setenv("INFER_LOGGER_SPOOL", '{"max_bytes": "lots"}')
        with pytest.raises(ConfigError) as info:
            load_settings(spool={"dir": "sp"})
        assert info.value.field == "INFER_LOGGER_SPOOL (spool.max_bytes)"

    @pytest.mark.parametrize(("sinks", "field"), [
        ('[{"type": "http", "url": "ftp://x"}]', "sinks.0.http.url"),  # past the union's tag
        ('[{"type": "http"}]', "sinks.0.http.url"),  # missing: the entry lacking it is the variable's
    ])
    def test_a_value_the_variable_holds_names_it(self, monkeypatch: pytest.MonkeyPatch, sinks: str,
                                                 field: str) -> None:
        monkeypatch.setenv("INFER_LOGGER_SINKS", sinks)
        with pytest.raises(ConfigError) as info:
            load_settings()
        assert info.value.field == f"INFER_LOGGER_SINKS ({field})"

    @pytest.mark.parametrize(("name", "value", "example"), [
        ("INFER_LOGGER_SINKS", "file", "INFER_LOGGER_SINKS='["),
        ("INFER_LOGGER_SPOOL", "memory", "INFER_LOGGER_SPOOL__KEY="),
        ("INFER_LOGGER_ANNOTATIONS", "team=a", "INFER_LOGGER_ANNOTATIONS='{"),
    ])
    def test_a_section_that_is_not_json_names_the_variable(self, monkeypatch: pytest.MonkeyPatch, name: str,
                                                           value: str, example: str) -> None:
        monkeypatch.setenv(name, value)
        with pytest.raises(ConfigError) as info:
            load_settings()
        assert info.value.field == name and example in info.value.message

    def test_the_cli_says_so_with_exit_2(self, monkeypatch: pytest.MonkeyPatch) -> None:
        from click.testing import CliRunner

        from infer_logger.cli import main

        monkeypatch.setenv("INFER_LOGGER_SINKS", "file")
        result = CliRunner().invoke(main, ["proxy"])
        assert result.exit_code == 2 and "INFER_LOGGER_SINKS" in result.output


def test_port_0_needs_a_source_uri() -> None:
    """Any free port: every event's source said http://127.0.0.1:0/."""
    for unset in (None, ""):
        with pytest.raises(ConfigError, match="port 0") as info:
            load_settings(port=0, source_uri=unset)
        assert info.value.field == "source_uri"
    assert load_settings(port=0, source_uri="/my-model").source == "/my-model"


class TestUnknownVariables:
    """A misspelt top-level variable is refused, as a nested one is; other readers' names are not."""

    def test_an_unknown_name_is_refused_naming_it(self, monkeypatch: pytest.MonkeyPatch) -> None:
        monkeypatch.setenv("INFER_LOGGER_LOGURL", "http://broker/")
        with pytest.raises(ConfigError, match="did you mean INFER_LOGGER_LOG_URL") as info:
            load_settings()
        assert info.value.field == "INFER_LOGGER_LOGURL"

    def test_a_sections_setting_given_flat_is_pointed_to_its_section(self, monkeypatch: pytest.MonkeyPatch) -> None:
        """`INFER_LOGGER_EXPLAINER_CACHE_BYTES` was pointed to `..._RETRIES`: the nearest top-level name."""
        monkeypatch.setenv("INFER_LOGGER_MAX_BYTES", "1GiB")
        with pytest.raises(ConfigError, match="did you mean INFER_LOGGER_SPOOL__MAX_BYTES"):
            load_settings()

    @pytest.mark.parametrize("names", [
        ["INFER_LOGGER_CONFORMANCE", "INFER_LOGGER_ES_API_KEY"],  # the tests', `setup elasticsearch`'s
        ["INFER_LOGGER_BROKER_PORT", "INFER_LOGGER_EXPLAINER_NOPE"],  # the other services' own
        # Kubernetes' links to a Service named infer-logger-ui in the pod's namespace.
        ["INFER_LOGGER_UI_SERVICE_HOST", "INFER_LOGGER_UI_SERVICE_PORT_HTTP", "INFER_LOGGER_UI_PORT",
         "INFER_LOGGER_UI_PORT_80_TCP_ADDR"],
        # ... and to one named infer-logger-service (the first split, INFER_LOGGER, was taken: refused).
        ["INFER_LOGGER_SERVICE_SERVICE_HOST", "INFER_LOGGER_SERVICE_PORT", "INFER_LOGGER_SERVICE_SERVICE_PORT"],
        # ... and to infer-logger-timeout--x (a name may hold "--"): no key under the timeout.
        ["INFER_LOGGER_TIMEOUT__X_SERVICE_HOST", "INFER_LOGGER_TIMEOUT__X_PORT"],
        # ... and under a list's or a section's, which were read as a key of it and failed the start.
        ["INFER_LOGGER_SINKS__X_SERVICE_HOST", "INFER_LOGGER_SINKS__X_PORT"],
        ["INFER_LOGGER_SPOOL__X_SERVICE_HOST", "INFER_LOGGER_SPOOL__X_SERVICE_PORT"],
    ])
    def test_names_read_elsewhere_are_left_alone(self, monkeypatch: pytest.MonkeyPatch,
                                                 names: list[str]) -> None:
        for name in names:
            monkeypatch.setenv(name, "1")
        assert load_settings().port == 9081

    @pytest.mark.parametrize(("prefix", "load", "default"), [
        ("INFER_LOGGER_", "load_settings", 9081),
        ("INFER_LOGGER_BROKER_", "load_broker_settings", None),
        ("INFER_LOGGER_EXPLAINER_", "load_explainer_settings", None),
    ])
    def test_a_service_named_as_the_prefix_does_not_set_the_port(
            self, monkeypatch: pytest.MonkeyPatch, prefix: str, load: str, default: int | None) -> None:
        """A Service named infer-logger (-broker, -explainer) gives every pod of its namespace
        <PREFIX>PORT=tcp://<ip>:<port>: a service link, not the port to listen on."""
        from explainers.config import load_explainer_settings
        from pipelines.broker.settings import load_broker_settings

        loader = {"load_settings": load_settings, "load_broker_settings": load_broker_settings,
                  "load_explainer_settings": load_explainer_settings}[load]
        flags = {"predictor_url": "http://127.0.0.1:8080", "background": "dataset:iris"} if "EXPLAINER" in prefix else {}
        expected = loader(**flags).port if default is None else default
        links = {"SERVICE_HOST": "10.96.0.12", "SERVICE_PORT": "80", "PORT": "tcp://10.96.0.12:80",
                 "PORT_80_TCP": "tcp://10.96.0.12:80", "PORT_80_TCP_ADDR": "10.96.0.12",
                 "PORT_80_TCP_PORT": "80", "PORT_80_TCP_PROTO": "tcp"}
        for suffix, value in links.items():
            monkeypatch.setenv(prefix + suffix, value)
        assert loader(**flags).port == expected
        monkeypatch.setenv(prefix + "PORT", "9200")  # a port given as such still counts
        assert loader(**flags).port == 9200

    def test_a_service_named_infer_logger_component_does_not_set_the_component_port(
            self, monkeypatch: pytest.MonkeyPatch) -> None:
        """Its link INFER_LOGGER_COMPONENT_PORT=tcp://… stopped the sidecar (not an integer)."""
        monkeypatch.setenv("INFER_LOGGER_COMPONENT_SERVICE_HOST", "10.0.0.7")
        monkeypatch.setenv("INFER_LOGGER_COMPONENT_PORT", "tcp://10.0.0.7:80")
        assert load_settings().component_port == 8080
        monkeypatch.delenv("INFER_LOGGER_COMPONENT_SERVICE_HOST")
        with pytest.raises(ConfigError, match="INFER_LOGGER_COMPONENT_PORT"):  # no Service: the user's value
            load_settings()

    def test_a_link_like_port_without_its_service_is_refused(self, monkeypatch: pytest.MonkeyPatch) -> None:
        monkeypatch.setenv("INFER_LOGGER_PORT", "tcp://10.96.0.12:80")
        with pytest.raises(ConfigError, match="INFER_LOGGER_PORT"):
            load_settings()

    def test_only_the_port_is_a_link_s_name(self, monkeypatch: pytest.MonkeyPatch) -> None:
        """A link-like value of another setting is the user's: used (here refused), not dropped."""
        monkeypatch.setenv("INFER_LOGGER_SERVICE_HOST", "10.96.0.12")
        monkeypatch.setenv("INFER_LOGGER_LOG_URL", "tcp://10.96.0.12:80")
        with pytest.raises(ConfigError, match="INFER_LOGGER_LOG_URL"):
            load_settings()

    def test_a_port_name_without_its_service_is_refused(self, monkeypatch: pytest.MonkeyPatch) -> None:
        monkeypatch.setenv("INFER_LOGGER_SPOOL_PORT", "1")
        with pytest.raises(ConfigError, match="matches no setting"):
            load_settings()

    @pytest.mark.parametrize(("name", "says"), [
        # A scalar has no keys: the variable was ignored, and the default ran.
        ("INFER_LOGGER_TIMEOUT__SECONDS", "matches no setting: timeout has no keys"),
        ("INFER_LOGGER_PORT__NUMBER", "matches no setting: port has no keys"),
        ("INFER_LOGGER_PREDICTOR_URL__HOST", "matches no setting: predictor_url has no keys"),
        # Nor does pydantic-settings read a list's items one by one ("Input should be a valid list").
        ("INFER_LOGGER_LOG_URL__0", "give INFER_LOGGER_LOG_URL whole, as JSON"),
        ("INFER_LOGGER_SINKS__0__TYPE", "give INFER_LOGGER_SINKS whole, as JSON"),
    ])
    def test_a_key_under_a_setting_that_has_none_is_refused(self, monkeypatch: pytest.MonkeyPatch, name: str,
                                                             says: str) -> None:
        monkeypatch.setenv(name, "5")
        with pytest.raises(ConfigError, match=says) as info:
            load_settings()
        assert info.value.field == name

    def test_keys_under_sections_and_maps_are_read(self, monkeypatch: pytest.MonkeyPatch) -> None:
        monkeypatch.setenv("INFER_LOGGER_SPOOL__DURABILITY", "memory")
        monkeypatch.setenv("INFER_LOGGER_DELIVERY__LINGER", "1")
        monkeypatch.setenv("INFER_LOGGER_ANNOTATIONS__TEAM", "ml")
        s = load_settings()
        assert (s.spool.durability, s.delivery.linger, s.annotations) == ("memory", 1.0, {"team": "ml"})


class TestText:
    """Text settings hold text every encoder takes (Path and SecretStr values excepted)."""

    @pytest.mark.parametrize(("yaml_text", "field", "says"), [
        # A `\udcXX` escape; argv and env give the same for a byte that is not UTF-8 (surrogateescape).
        ('namespace: "caf\\udce9"\n', "namespace", "U+DCE9"),
        ('component: "a\\ud800"\n', "component", "U+D800"),
        ('annotations: {"t\\udcff": x}\n', "annotations", "holds U+DCFF"),
        ('annotations: {t: "x\\udcff"}\n', "annotations.t", "holds U+DCFF"),
        ('predictor_url: "http://p:8080/v1/models/caf\\udce9"\n', "predictor_url", "holds U+DCE9"),
        # A name that is not UTF-8 made every /readyz a 500 (its JSON could not be encoded).
        ('sinks: [{type: file, name: "f\\udcff", path: e.jsonl}]\n', "sinks.0.file.name", "cannot hold U+DCFF"),
    ])
    def test_text_that_is_not_utf8_is_refused(self, tmp_path: Path, yaml_text: str, field: str, says: str) -> None:
        """orjson refused it in every event: each request was a 500, and /readyz said ready."""
        cfg = tmp_path / "c.yaml"
        cfg.write_text(yaml_text)
        with pytest.raises(ConfigError) as info:
            load_settings(cfg)
        assert info.value.field == field
        assert says in info.value.message

    def test_a_flags_list_item_is_not_blamed_on_a_variable(self, monkeypatch: pytest.MonkeyPatch) -> None:
        """The place's list index was text, so a flag's bad item read as the variable's."""
        monkeypatch.setenv("INFER_LOGGER_LOG_URL", "file:///tmp/x.jsonl")
        with pytest.raises(ConfigError) as info:
            Settings.load(log_url=["file:///tmp/a.jsonl", "file:///tmp/caf\udce9.jsonl"])
        assert info.value.field == "log_url.1"

    def test_file_names_and_keys_that_are_not_utf8_are_taken(self, tmp_path: Path) -> None:
        """Bytes to the system (a file name) or to a digest (a Fluentd key, as Fluentd hashes it): a
        byte that is not UTF-8 is theirs to carry, and no secret is ever shown in a message."""
        cfg = tmp_path / "c.yaml"
        cfg.write_text('spool: {dir: "sp\\udce9"}\n'
                       'sinks: [{type: fluentd, host: 127.0.0.1, shared_key: "k\\udce9y"}]\n')
        settings = load_settings(cfg)
        assert str(settings.spool.dir).endswith("sp\udce9")
        assert settings.sinks[0].shared_key.get_secret_value() == "k\udce9y"  # type: ignore[union-attr]

    def test_a_variable_that_is_not_utf8_is_named(self, monkeypatch: pytest.MonkeyPatch) -> None:
        monkeypatch.setenv("INFER_LOGGER_INFERENCE_SERVICE", os.fsdecode(b"iris-\xe9"))
        with pytest.raises(ConfigError, match="U\\+DCE9") as info:
            load_settings()
        assert info.value.field == "INFER_LOGGER_INFERENCE_SERVICE (inference_service)"
        monkeypatch.setenv("INFER_LOGGER_INFERENCE_SERVICE", "iris-é")  # UTF-8: fine
        assert load_settings().inference_service == "iris-é"

    def test_a_sink_name_that_is_not_utf8_is_refused_by_the_sink_config(self, tmp_path: Path) -> None:
        """It was checked with surrogateescape, as if a byte of a file name."""
        from pydantic import ValidationError

        with pytest.raises(ValidationError, match="not UTF-8"):
            FileSinkConfig(name="f\udcff", path=tmp_path / "e.jsonl")

    @pytest.mark.parametrize(("text", "field", "char"), [
        ("inference_service: |\n  sklearn-iris\n", "inference_service", "U+000A"),  # a block scalar's newline
        ('namespace: "team\\ta"\n', "namespace", "U+0009"),
        ('component: "a\\x85"\n', "component", "U+0085"),
        ('endpoint: "\\ufdd0"\n', "endpoint", "U+FDD0"),
    ])
    def test_an_identity_a_cloudevents_string_cannot_hold_is_refused(self, tmp_path: Path, text: str, field: str,
                                                                    char: str) -> None:
        """Every event carries it: the broker refused them all (400), and each was dead-lettered."""
        cfg = tmp_path / "c.yaml"
        cfg.write_text(text)
        with pytest.raises(ConfigError) as info:
            load_settings(cfg)
        assert info.value.field == field and char in info.value.message
        with pytest.raises(ConfigError) as info:
            load_settings(**{field: "team\ta"})
        assert info.value.field == field and "U+0009" in info.value.message
        assert getattr(load_settings(**{field: "équipe a"}), field) == "équipe a"  # text beyond ASCII is fine

"""Explainer settings: the binary tensor data switch from a flag, the environment or YAML."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
from click.testing import CliRunner

from explainers.cli import explainer_command
from explainers.config import load_explainer_settings
from infer_logger.errors import ConfigError

REQUIRED = {"predictor_url": "http://127.0.0.1:8080", "background": "dataset:iris"}


class TestBinaryData:
    """On by default; flags > env > YAML."""

    def test_layers(self, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
        assert load_explainer_settings(None, **REQUIRED).binary_data is True
        config = tmp_path / "explainer.yaml"
        config.write_text("explainer:\n  binary_data: false\n")
        assert load_explainer_settings(config, **REQUIRED).binary_data is False
        monkeypatch.setenv("INFER_LOGGER_EXPLAINER_BINARY_DATA", "true")
        assert load_explainer_settings(config, **REQUIRED).binary_data is True
        assert load_explainer_settings(config, **REQUIRED, binary_data=False).binary_data is False

    @pytest.mark.parametrize("flag, expected", [("--no-binary-data", False), ("--binary-data", True),
                                                (None, None)])
    def test_cli_flag(self, monkeypatch: pytest.MonkeyPatch, flag: str | None, expected: bool | None) -> None:
        seen: dict[str, Any] = {}

        def load(config_file: Path | None = None, **flags: Any) -> Any:
            seen.update(flags)
            raise ConfigError("binary_data", "seen")  # stop before fitting anything

        monkeypatch.setattr("explainers.config.load_explainer_settings", load)
        args = ["--predictor-url", REQUIRED["predictor_url"], "--background", REQUIRED["background"]]
        result = CliRunner().invoke(explainer_command, [*args, *([flag] if flag else [])])
        assert result.exit_code == 2 and seen["binary_data"] is expected


class TestPredictorUrl:
    """Checked as the sidecar checks its own: it failed only after the fitting's retries (exit 1)."""

    # A port out of range or not a number, a host IDNA refuses: a traceback after fitting (exit 1).
    @pytest.mark.parametrize("url", ["localhost:8080", "ftp://x", "http://", "http://127.0.0.1:99999",
                                     "http://127.0.0.1:abc/", "http://ü..x/"])
    def test_not_http_is_a_config_error(self, url: str) -> None:
        with pytest.raises(ConfigError, match=r"http\(s\)://host\[:port\]") as info:
            load_explainer_settings(None, **{**REQUIRED, "predictor_url": url})
        assert info.value.field == "predictor_url"

    def test_the_cli_exits_2_naming_it(self) -> None:
        result = CliRunner().invoke(explainer_command, ["--predictor-url", "localhost:8080",
                                                        "--background", REQUIRED["background"]])
        assert result.exit_code == 2 and "predictor_url" in result.output


def test_unknown_variable_is_refused(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("INFER_LOGGER_EXPLAINER_BINARYDATA", "false")
    with pytest.raises(ConfigError, match="INFER_LOGGER_EXPLAINER_BINARY_DATA"):
        load_explainer_settings(None, **REQUIRED)


@pytest.mark.parametrize(("flags", "field"), [
    ({"model_name": "caf\udce9"}, "model_name"),
    ({"feature_names": ["a", "b\udce9", "c", "d"]}, "feature_names.1"),
])
def test_text_that_is_not_utf8_is_refused(flags: dict[str, object], field: str) -> None:
    """A byte of a flag that is not UTF-8: it started and said ready, then every explanation (or
    `GET /v1/models`) was a 500, its JSON not encodable."""
    with pytest.raises(ConfigError, match="U\\+DCE9") as info:
        load_explainer_settings(None, **{**REQUIRED, **flags})
    assert info.value.field == field


def test_help_fits_80_columns_without_breaking_words() -> None:
    out = CliRunner().invoke(explainer_command, ["--help"], terminal_width=78).output  # an 80-column terminal
    assert max(len(line) for line in out.splitlines()) < 80
    assert "diabetes, penguins)" in " ".join(out.split())  # was "pe nguins"


def test_an_empty_host_is_refused() -> None:
    """uvicorn binds "" (an unset manifest value) to every address."""
    from pydantic import ValidationError

    from explainers.config import ExplainerSettings

    with pytest.raises(ValidationError, match="host"):
        ExplainerSettings(host="")


class TestExitCodes:
    """Settings the method or the data refuse exit 2 as other config errors do, in one line; files
    that do not serve exit 1, naming the file (they were tracebacks, or exit 1 for bad values)."""

    @pytest.mark.parametrize("args, words", [
        (["--option", "nope=1"], "the configured kernel options: nope: Extra inputs are not permitted"),
        (["--param", "nsamples=0"], "the configured kernel parameters: nsamples: Input should be greater"),
        # Every request would be refused: it was exit 1, alone of the bad --params.
        (["--param", "nsamples=20000"], "the configured parameters: nsamples: 20000 is over this server's limit of"),
        (["--param", "nsamples=200", "--max-samples", "100"], "the configured parameters: nsamples: 200 is over"),
        (["--feature-names", "a,b"], "feature_names: 2 names for the 4 columns of dataset:iris"),
        (["--feature-names", "a,a,b,c"], "feature_names: 'a' named more than once"),
    ])
    def test_bad_settings_exit_2(self, tmp_path: Path, args: list[str], words: str) -> None:
        # --fit-only: had the settings passed, no server would be left serving
        result = CliRunner().invoke(explainer_command, ["--predictor-url", REQUIRED["predictor_url"],
                                                        "--background", REQUIRED["background"], "--fit-only",
                                                        "--save-artifact", str(tmp_path / "a.joblib"), *args])
        assert result.exit_code == 2 and isinstance(result.exception, SystemExit), result.output
        assert result.output.splitlines()[-1].startswith(f"infer-logger explainer: {words}"), result.output

    @pytest.mark.parametrize("value", [".inf", "1e10", ".nan"])
    def test_a_timeout_no_socket_takes_exits_2(self, tmp_path: Path, value: str) -> None:
        """`timeout: .inf` passed, then the start failed with an OverflowError traceback."""
        config = tmp_path / "explainer.yaml"
        config.write_text(f"explainer:\n  predictor_url: http://127.0.0.1:1\n  background: dataset:iris\n"
                          f"  timeout: {value}\n")
        result = CliRunner().invoke(explainer_command, ["-c", str(config), "--fit-only",
                                                        "--save-artifact", str(tmp_path / "a.joblib")])
        assert result.exit_code == 2 and isinstance(result.exception, SystemExit), result.output
        assert "timeout" in result.output.splitlines()[-1] and "Traceback" not in result.output, result.output
        assert load_explainer_settings(None, **REQUIRED, timeout=86400).timeout == 86400  # a day: the most

    @pytest.mark.parametrize("field", [{"explain_timeout": 1e10}, {"request_read_timeout": float("inf")},
                                       {"linger": float("inf")}, {"subscriber": {"linger": 1e10}},
                                       {"subscriber": {"cache_ttl": float("inf")}}])
    def test_every_duration_is_finite_and_at_most_a_day(self, field: dict[str, Any]) -> None:
        """Only `timeout` was bounded: the others took `inf`, where a timer or a socket overflowed."""
        with pytest.raises(ConfigError, match="|".join(field) + "|linger|cache_ttl"):
            load_explainer_settings(None, **REQUIRED, **field)

    def test_max_instances_is_a_flag(self) -> None:
        """The README named `--max-instances`; only YAML and env could set it."""
        result = CliRunner().invoke(explainer_command, ["--predictor-url", REQUIRED["predictor_url"],
                                                        "--background", REQUIRED["background"], "--max-instances", "0"])
        assert result.exit_code == 2 and "max_instances" in result.output, result.output

    def test_an_artifact_is_not_saved_again(self, tmp_path: Path) -> None:
        """`--fit-only --artifact a --save-artifact b` said "saved b" and wrote nothing."""
        result = CliRunner().invoke(explainer_command, ["--predictor-url", REQUIRED["predictor_url"],
                                                        "--artifact", str(tmp_path / "a.joblib"), "--fit-only",
                                                        "--save-artifact", str(tmp_path / "b.joblib")])
        assert result.exit_code == 2 and "artifact and save_artifact" in result.output, result.output

    def test_yaml_options_exit_2(self, tmp_path: Path) -> None:
        config = tmp_path / "explainer.yaml"
        config.write_text("explainer:\n  predictor_url: http://127.0.0.1:8080\n  background: dataset:iris\n"
                          "  options: {background_size: 0}\n")
        result = CliRunner().invoke(explainer_command, ["-c", str(config), "--fit-only",
                                                        "--save-artifact", str(tmp_path / "a.joblib")])
        assert result.exit_code == 2 and "the configured kernel options: background_size" in result.output

    def test_a_model_file_that_is_no_model_exits_1(self, tmp_path: Path) -> None:
        import joblib

        joblib.dump({"not": "a model"}, tmp_path / "dict.joblib")
        result = CliRunner().invoke(explainer_command, ["--model-file", str(tmp_path / "dict.joblib"),
                                                        "--background", REQUIRED["background"], "--fit-only",
                                                        "--save-artifact", str(tmp_path / "a.joblib")])
        assert result.exit_code == 1 and isinstance(result.exception, SystemExit), result.output
        assert "dict.joblib: not a model" in result.output


class TestMaxRequestBytes:
    """0 was taken, and then every request was refused 413."""

    @pytest.mark.parametrize("value", [0, "0", "0KiB"])
    def test_under_one_byte_is_a_config_error(self, value: object) -> None:
        with pytest.raises(ConfigError, match="greater than or equal to 1") as info:
            load_explainer_settings(None, **REQUIRED, max_request_bytes=value)
        assert info.value.field == "max_request_bytes"
        assert load_explainer_settings(None, **REQUIRED, max_request_bytes="1KiB").max_request_bytes == 1024

    def test_the_cli_exits_2_naming_it(self) -> None:
        result = CliRunner().invoke(explainer_command, ["--predictor-url", REQUIRED["predictor_url"],
                                                        "--background", REQUIRED["background"],
                                                        "--max-request-bytes", "0"])
        assert result.exit_code == 2 and "max_request_bytes" in result.output, result.output


class TestSubscriberSource:
    """`subscriber.source` is every explanation event's `source`: "" or a tab was taken, and every
    explanation event was then no CloudEvent (over POST /events a 200 the broker refused)."""

    @pytest.mark.parametrize("source", ["", "a\tb", "a b", "1x:y"])
    def test_no_source_a_cloudevent_takes_is_a_config_error(self, source: str) -> None:
        with pytest.raises(ConfigError, match="source") as info:
            load_explainer_settings(None, **REQUIRED, subscriber={"source": source})
        assert info.value.field == "subscriber.source"

    @pytest.mark.parametrize("source", ["infer-logger-explainer", "http://explainer.ns/", "/explainer"])
    def test_a_uri_reference_is_taken(self, source: str) -> None:
        assert load_explainer_settings(None, **REQUIRED, subscriber={"source": source}).subscriber.source == source

    def test_the_cli_exits_2_naming_it(self, tmp_path: Path) -> None:
        config = tmp_path / "explainer.yaml"
        config.write_text('explainer:\n  subscriber: {source: ""}\n')
        result = CliRunner().invoke(explainer_command, ["-c", str(config), "--predictor-url", REQUIRED["predictor_url"],
                                                        "--background", REQUIRED["background"]])
        assert result.exit_code == 2 and "subscriber.source" in result.output, result.output

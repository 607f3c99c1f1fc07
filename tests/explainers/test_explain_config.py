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

    @pytest.mark.parametrize("url", ["localhost:8080", "ftp://x", "http://"])
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

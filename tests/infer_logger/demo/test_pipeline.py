"""The quickstart's pipeline end to end: sidecar -> broker -> store and event log, and the explainer's
replies joined to the predictions in the store; and the quickstart command itself."""

from __future__ import annotations

from pathlib import Path

import httpx
import pytest

from infer_logger.store import AuditStore
from tests.explainers.conftest import serve


def test_sidecar_broker_explainer_store(tmp_path: Path) -> None:
    pytest.importorskip("shap", reason="the explain extra is not installed")
    from infer_logger.config import load_settings
    from infer_logger.demo.pipeline import quickstart_broker
    from infer_logger.demo.predictor import create_app, train_iris
    from infer_logger.server import build_app

    db = tmp_path / "audit.db"
    with serve(create_app([train_iris()])) as predictor, quickstart_broker(tmp_path, predictor, "iris") as pipe:
        assert pipe.explaining
        settings = load_settings(None, predictor_url=predictor, spool={"dir": str(tmp_path / "spool")},
                                 sinks=[{"type": "http", "url": pipe.url, "mode": "batch"}])
        with serve(build_app(settings)) as sidecar:
            v1 = httpx.post(f"{sidecar}/v1/models/iris:predict", json={"instances": [[5.1, 3.5, 1.4, 0.2]]},
                            headers={"x-request-id": "qs-1"})
            v2 = httpx.post(f"{sidecar}/v2/models/iris/infer", headers={"x-request-id": "qs-2"}, json={
                "inputs": [{"name": "input-0", "datatype": "FP64", "shape": [2, 4],
                            "data": [6.8, 2.8, 4.8, 1.4, 6.0, 3.4, 4.5, 1.6]}]})
            bad = httpx.post(f"{sidecar}/v1/models/iris:predict", json={"instances": [[1.0]]},
                             headers={"x-request-id": "qs-3"})
            assert (v1.status_code, v2.status_code, bad.status_code) == (200, 200, 400)
    with AuditStore(db, readonly=True) as store:
        records = {(r.id, r.instance): r for r in store.query(limit=None)}
    assert set(records) == {("qs-1", 0), ("qs-2", 0), ("qs-2", 1), ("qs-3", 0)}
    for key in [("qs-1", 0), ("qs-2", 0), ("qs-2", 1)]:
        explanation = records[key].explanation
        assert explanation and explanation["method"] == "kernel", key
        assert [o["name"] for o in explanation["outputs"]] == ["setosa", "versicolor", "virginica"]
    assert records[("qs-3", 0)].explanation is None and records[("qs-3", 0)].status == 400
    lines = pipe.event_log.read_bytes().splitlines()
    assert len(lines) == 3 + 3 + 2  # requests, responses, explanations of the two good calls


def test_quickstart_command(tmp_path: Path) -> None:
    from click.testing import CliRunner

    from infer_logger.cli import main

    workdir = tmp_path / "my runs" / "qs"  # the commands it prints are pasted into a shell
    result = CliRunner().invoke(main, ["quickstart", "--requests", "40", "--workdir", str(workdir)])
    assert result.exit_code == 0, result.output
    assert "predictions (rows)" in result.output
    assert f"infer-logger query --db '{workdir / 'audit.db'}' --status 400" in result.output
    with AuditStore(workdir / "audit.db", readonly=True) as store:
        assert store.summary().ids == 40


def test_quickstart_refuses_a_workdir_of_other_files(tmp_path: Path) -> None:
    from click.testing import CliRunner

    from infer_logger.cli import main

    (tmp_path / "notes.txt").write_text("mine")
    (tmp_path / "project").mkdir()
    result = CliRunner().invoke(main, ["quickstart", "--requests", "1", "--workdir", str(tmp_path)])
    assert result.exit_code == 2 and "--workdir" in result.output and "notes.txt" in result.output
    assert sorted(p.name for p in tmp_path.iterdir()) == ["notes.txt", "project"]


def test_quickstart_names_a_workdir_it_cannot_use(tmp_path: Path) -> None:
    """An OSError (here a name too long; a read-only directory as a user) was a traceback."""
    from click.testing import CliRunner

    from infer_logger.cli import main

    result = CliRunner().invoke(main, ["quickstart", "--requests", "1", "--workdir", str(tmp_path / ("a" * 300))])
    assert result.exit_code == 2 and "--workdir" in result.output and "too long" in result.output


def test_a_quickstart_rerun_removes_only_what_a_run_made(tmp_path: Path) -> None:
    from infer_logger.demo.quickstart import _fresh_workdir

    _fresh_workdir(tmp_path / "qs")  # a new directory: made and marked
    (tmp_path / "qs" / "spool").mkdir()
    (tmp_path / "qs" / "audit.db").write_text("old run")
    (tmp_path / "qs" / "notes.txt").write_text("added by the user since")
    _fresh_workdir(tmp_path / "qs")
    assert sorted(p.name for p in (tmp_path / "qs").iterdir()) == [".infer-logger-quickstart", "notes.txt"]


def test_quickstart_refuses_an_unmarked_directory_of_the_names_it_uses(tmp_path: Path) -> None:
    """`--workdir infer-logger-data`, the proxy's own data directory: its audit store and spool
    of undelivered events bear the quickstart's names, but no quickstart made them (they were deleted)."""
    from click.testing import CliRunner

    from infer_logger.cli import main

    data = tmp_path / "infer-logger-data"
    (data / "spool").mkdir(parents=True)
    (data / "spool" / "00000000000000000001.seg").write_bytes(b"undelivered")
    (data / "audit.db").write_text("the production audit store")
    result = CliRunner().invoke(main, ["quickstart", "--requests", "1", "--workdir", str(data)])
    assert result.exit_code == 2 and "--workdir" in result.output and "no quickstart made it" in result.output
    assert sorted(p.name for p in data.iterdir()) == ["audit.db", "spool"]
    assert (data / "spool" / "00000000000000000001.seg").read_bytes() == b"undelivered"


# A production pod's, and a stray one: none is the quickstart's, which runs everything itself.
_USER_ENV = {
    "INFER_LOGGER_LOG_URL": "http://broker-ingress.knative-eventing/default/default",
    "INFER_LOGGER_LOG_MODE": "request",
    "INFER_LOGGER_SPOOL__DURABILITY": "memory",
    "INFER_LOGGER_TOKEN": "x",
    "INFER_LOGGER_BROKER_TRIGGER_FILES": '["/etc/prod-triggers.yaml"]',
    "INFER_LOGGER_BROKER_MAX_EVENT_BYTES": "64KiB",
    "INFER_LOGGER_BROKER_PORT": "tcp://10.0.0.1:9082",
    "INFER_LOGGER_EXPLAINER_PARAMS": '{"nsamples": 5000}',
    "INFER_LOGGER_EXPLAINER_TOKEN": "x",
}


def test_the_quickstart_settings_read_no_environment(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The user's INFER_LOGGER_* variables: an unknown one crashed the quickstart, a LOG_URL sent
    its fake predictions to production as a second sink, and the rest changed the demo."""
    from infer_logger.demo.pipeline import broker_settings, explainer_settings
    from infer_logger.demo.quickstart import sidecar_settings

    def built() -> tuple[object, ...]:
        components = [{"type": "store", "name": "audit", "path": str(tmp_path / "audit.db")}]
        return (sidecar_settings(tmp_path, 40001, 40002, "http://127.0.0.1:40003/"),
                broker_settings(tmp_path, 40003, components, 60.0),
                explainer_settings("iris", "http://127.0.0.1:40002"))

    clean = built()
    for name, value in _USER_ENV.items():
        monkeypatch.setenv(name, value)
    assert built() == clean
    assert [sink.sink_name for sink in clean[0].all_sinks()] == ["http"]  # type: ignore[attr-defined]


def test_the_quickstart_command_reports_a_config_error(monkeypatch: pytest.MonkeyPatch) -> None:
    """A ConfigError (none is expected now: the quickstart reads no settings) is a line, not a traceback."""
    from click.testing import CliRunner

    from infer_logger.cli import main
    from infer_logger.demo import quickstart
    from infer_logger.errors import ConfigError

    def run(**_: object) -> None:
        raise ConfigError("spool.dir", "not writable")

    monkeypatch.setattr(quickstart, "run", run)
    result = CliRunner().invoke(main, ["quickstart", "--requests", "1"])
    assert result.exit_code == 2, result.output
    assert result.output.strip() == "infer-logger: config error: spool.dir: not writable"

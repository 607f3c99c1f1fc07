"""The broker as its own process (`python -m pipelines.broker`): kill -9 and restart delivers
everything that was accepted; SIGHUP reloads the trigger files and keeps the last good ones."""

from __future__ import annotations

import signal
import sys
import time
from pathlib import Path

import httpx
import pytest

from infer_logger.cloudevents.http import to_binary
from infer_logger.testing import free_port
from tests.servers import Process

from .helpers import Subscriber, event

pytestmark = pytest.mark.slow


def _broker(tmp: Path, triggers: Path, port: int) -> Process:
    args = [sys.executable, "-m", "pipelines.broker", "--port", str(port), "--dir", str(tmp / "spool"),
            "-t", str(triggers), "--log-level", "warning"]
    # A few deliveries at a time, so that a backlog is in the log when the kill comes.
    env = {"INFER_LOGGER_BROKER_PARALLELISM": "4", "INFER_LOGGER_BROKER_BATCH_SIZE": "20"}
    return Process(args, port, ready_path="/readyz", env=env, log=tmp / "broker.log")


def _post_all(url: str, count: int, prefix: str) -> list[str]:
    accepted = []
    with httpx.Client(timeout=10) as client:
        for i in range(count):
            headers, body = to_binary(event(f"{prefix}-{i}"))
            if client.post(url, headers=headers, content=body).status_code == 202:
                accepted.append(f"{prefix}-{i}")
    return accepted


def _triggers(path: Path, *urls: str) -> Path:
    path.write_text("triggers:\n" + "".join(
        f"  - {{name: t{i}, subscriber: '{url}',"
        f" delivery: {{retry: 100, backoffDelay: PT0.05S, backoffPolicy: linear}}}}\n"
        for i, url in enumerate(urls)))
    return path


def _until_delivered(subscriber: Subscriber, accepted: list[str], timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while missing := set(accepted) - {e.id for e in subscriber.events}:
        assert time.monotonic() < deadline, f"never delivered: {sorted(missing)[:10]}"
        time.sleep(0.1)


def test_kill9_and_restart_delivers_everything_accepted(tmp_path: Path) -> None:
    with Subscriber() as subscriber:
        subscriber.delay = 0.01
        triggers = _triggers(tmp_path / "triggers.yaml", subscriber.url)
        port = free_port()
        broker = _broker(tmp_path, triggers, port).start()
        try:
            accepted = _post_all(broker.url + "/", 300, "a")
            assert len(accepted) == 300
            broker.kill9()
            delivered_before = {e.id for e in subscriber.events}
            broker = _broker(tmp_path, triggers, port).start()
            accepted += _post_all(broker.url + "/", 50, "b")
            _until_delivered(subscriber, accepted, 60)
        finally:
            broker.stop()
    # The kill came with a backlog (else this test would prove little); duplicates are allowed.
    assert len(delivered_before) < 300


def test_a_stop_while_a_new_trigger_s_subscriber_is_down_keeps_its_events(tmp_path: Path) -> None:
    """A trigger attached to a fresh log is known by its checkpoint file; when a commit stopped
    writing a position equal to the loaded one, none was written, and the restarted broker took the
    trigger for a new one: it started at the tail and the events accepted meanwhile were skipped."""
    sub_port, port = free_port(), free_port()
    triggers = _triggers(tmp_path / "triggers.yaml", f"http://127.0.0.1:{sub_port}/")
    broker = _broker(tmp_path, triggers, port).start()
    try:
        accepted = _post_all(broker.url + "/", 5, "down")  # nothing listens: retried, then the stop
    finally:
        broker.stop()
    assert len(accepted) == 5
    with Subscriber(port=sub_port) as subscriber:
        broker = _broker(tmp_path, triggers, port).start()
        try:
            _until_delivered(subscriber, accepted, 30)
        finally:
            broker.stop()


def test_sighup_reloads_and_keeps_the_last_good_triggers(tmp_path: Path) -> None:
    with Subscriber() as first, Subscriber() as second:
        triggers = _triggers(tmp_path / "triggers.yaml", first.url)
        broker = _broker(tmp_path, triggers, free_port()).start()
        try:
            assert broker.proc is not None
            _triggers(triggers, first.url, second.url)
            broker.proc.send_signal(signal.SIGHUP)
            _wait_for_triggers(broker, {"default/t0", "default/t1"})
            triggers.write_text("triggers: [{name: t9, subscriber: 'http://h/', filters: [{cesql: 'AND'}]}]\n")
            broker.proc.send_signal(signal.SIGHUP)
            _wait_for_log(tmp_path / "broker.log", "trigger reload failed")
            assert _post_all(broker.url + "/", 1, "c") == ["c-0"]
            first.wait_for(1)
            second.wait_for(1)
            assert set(httpx.get(broker.url + "/readyz").json()["triggers"]) == {"default/t0", "default/t1"}
        finally:
            broker.stop()
    assert "triggers.yaml:1:" in (tmp_path / "broker.log").read_text()


def _wait_for_triggers(broker: Process, names: set[str], timeout: float = 10) -> None:
    deadline = time.monotonic() + timeout
    while set(httpx.get(broker.url + "/readyz").json()["triggers"]) != names:
        assert time.monotonic() < deadline, "the reload did not take effect"
        time.sleep(0.05)


def _wait_for_log(path: Path, text: str, timeout: float = 10) -> None:
    deadline = time.monotonic() + timeout
    while text not in path.read_text():
        assert time.monotonic() < deadline, f"{text!r} not logged"
        time.sleep(0.05)


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT])
def test_a_graceful_stop_exits_0(tmp_path: Path, sig: signal.Signals) -> None:
    """uvicorn raised the signal again once the broker had stopped cleanly: exit -15 (a SIGINT's
    KeyboardInterrupt), which a supervisor takes for a crash."""
    with Subscriber() as subscriber:
        broker = _broker(tmp_path, _triggers(tmp_path / "triggers.yaml", subscriber.url), free_port()).start()
        try:
            accepted = _post_all(broker.url + "/", 5, "a")
            _until_delivered(subscriber, accepted, 30)
        finally:
            code = broker.stop(sig)
    assert code == 0


def test_a_hangup_during_the_drain_neither_reloads_nor_kills_it(tmp_path: Path) -> None:
    """Its reload handler was removed as the stop began, and SIGHUP's default action killed the
    broker mid-drain (exit -1): the deliveries in flight cut off."""
    with Subscriber() as subscriber:
        subscriber.delay = 3.0
        triggers = _triggers(tmp_path / "triggers.yaml", subscriber.url)
        port = free_port()
        env = {"INFER_LOGGER_BROKER_DRAIN_TIMEOUT": "30"}
        broker = Process([sys.executable, "-m", "pipelines.broker", "--port", str(port), "--dir", str(tmp_path / "spool"),
                          "-t", str(triggers), "--log-level", "warning"], port, ready_path="/readyz", env=env,
                         log=tmp_path / "broker.log").start()
        try:
            _post_all(broker.url + "/", 1, "a")
            subscriber.wait_for_requests(1, 30)
            assert broker.proc is not None
            broker.proc.send_signal(signal.SIGTERM)
            time.sleep(0.5)  # the stop begun: the delivery drains
            broker.proc.send_signal(signal.SIGHUP)
            code = broker.proc.wait(60)
        finally:
            broker.stop()
    assert code == 0 and [e.id for e in subscriber.events] == ["a-0"]

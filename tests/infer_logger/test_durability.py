"""Never lose an event a client saw: sink outages, refusals, slow sinks and kill -9."""

from __future__ import annotations

import asyncio
import functools
import os
import signal
import subprocess
import threading
import time
from pathlib import Path
from typing import Any

import httpx
import orjson
import pytest

from infer_logger import events as ev
from infer_logger.cloudevents.event import CloudEvent
from infer_logger.testing import CannedPredictor, EventCollector, free_port
from tests.servers import Process, scrape, sidecar_process

pytestmark = pytest.mark.slow

V1 = {"instances": [[5.1, 3.5, 1.4, 0.2]]}


def predict(proc: Process, event_id: str) -> httpx.Response:
    return httpx.post(proc.url + "/v1/models/iris:predict", json=V1, headers={"ce-id": event_id}, timeout=10)


def ids_of(sink: EventCollector, type_: str) -> set[str]:
    return {e.id for e in sink.events if e.type == type_}


def test_sink_outage_mid_stream_then_recovery(iris_predictor: Process, tmp_path: Path) -> None:
    port = free_port()
    sink = EventCollector(port).start()
    proc = sidecar_process(iris_predictor.url, tmp_path, "--log-url", sink.url).start()
    try:
        for i in range(20):
            assert predict(proc, f"a{i}").status_code == 200
        sink.wait_for(40)
        sink.stop()  # the broker goes away mid-stream
        for i in range(20, 60):
            assert predict(proc, f"a{i}").status_code == 200  # inference unaffected
        assert httpx.get(proc.url + "/readyz").json()["ready"] is True
        back = EventCollector(port).start()  # restarted on the same address
        try:
            # The 40 spooled during the outage, retried after it (waited for by id: a re-delivery
            # of an event the first receiver had would count too).
            before = ids_of(sink, ev.RESPONSE)
            everything = {f"a{i}" for i in range(60)}
            back.wait_until(lambda events: before | {e.id for e in events if e.type == ev.RESPONSE} == everything,
                            timeout=30)
            assert "infer_logger_batches_retried_total" in scrape(proc, "infer_logger_batches_retried_total")
        finally:
            back.stop()
    finally:
        proc.stop()
        sink.stop()


def test_refused_events_are_dead_lettered_and_counted(iris_predictor: Process, tmp_path: Path) -> None:
    with EventCollector() as sink:
        sink.fail_with = 400
        proc = sidecar_process(iris_predictor.url, tmp_path, "--log-url", sink.url).start()
        try:
            assert predict(proc, "dl-1").status_code == 200
            dead = tmp_path / "spool" / "deadletter" / "http.jsonl"
            for _ in range(200):
                if dead.exists() and dead.read_bytes().count(b"\n") >= 2:
                    break
                threading.Event().wait(0.05)
            records = [orjson.loads(line) for line in dead.read_bytes().splitlines()]
            assert {r["attributes"]["id"] for r in records} == {"dl-1"}
            assert "400" in records[0]["reason"]
            needle = 'infer_logger_events_dropped_total{reason="rejected"} 2.0'
            assert needle in scrape(proc, needle)
        finally:
            proc.stop()


def test_retry_after_and_5xx_are_retried(iris_predictor: Process, tmp_path: Path) -> None:
    with EventCollector() as sink:
        sink.fail_with, sink.retry_after = 503, "0"
        proc = sidecar_process(iris_predictor.url, tmp_path, "--log-url", sink.url).start()
        try:
            predict(proc, "r-1")
            for _ in range(200):
                if sink.attempts >= 3:
                    break
                threading.Event().wait(0.05)
            sink.fail_with = None
            assert {e.id for e in sink.wait_for(2)} == {"r-1"}
        finally:
            proc.stop()


class HeldSink(EventCollector):
    """Holds every POST until `release` is set: no delivery ends before that."""

    def __init__(self) -> None:
        super().__init__()
        self.release = threading.Event()
        self.held = 0

    async def __call__(self, scope: dict[str, Any], receive: Any, send: Any) -> None:
        if scope["type"] == "http":
            self.held += 1
            while not self.release.is_set():
                await asyncio.sleep(0.02)
        await super().__call__(scope, receive, send)


def test_slow_sink_does_not_hold_requests(iris_predictor: Process, tmp_path: Path) -> None:
    # A sink that answers nothing until released, its POSTs timing out only after 600 s: a
    # response that waited for delivery would trip the 60 s hang guard.
    config = tmp_path / "sinks.yaml"
    with HeldSink() as sink:
        config.write_text(f"sinks:\n  - type: http\n    url: {sink.url}\n    timeout: 600\n")
        proc = sidecar_process(iris_predictor.url, tmp_path, "-c", str(config)).start()
        try:
            for i in range(20):
                try:
                    answer = httpx.post(proc.url + "/v1/models/iris:predict", json=V1, headers={"ce-id": f"s{i}"},
                                        timeout=60)
                except httpx.TimeoutException:
                    pytest.fail(f"s{i}: no answer within 60 s: the response waited for the held delivery")
                assert answer.status_code == 200
                if i == 0:  # the others are asked while a delivery is certainly stuck in the sink
                    deadline = time.monotonic() + 30
                    while not sink.held:
                        assert time.monotonic() < deadline, "no delivery attempted"
                        time.sleep(0.02)
            assert sink.events == []  # nothing delivered while every response was given
            sink.release.set()
            assert len(sink.wait_for(40, timeout=30)) == 40
        finally:
            sink.release.set()
            proc.stop()


def test_kill9_then_restart_delivers_everything_clients_saw(iris_predictor: Process, tmp_path: Path) -> None:
    port = free_port()
    sink = EventCollector(port)  # down at first: events can only be in the spool
    proc = sidecar_process(iris_predictor.url, tmp_path, "--log-url", sink.url).start()
    answered: list[str] = []
    stop = threading.Event()

    def load(worker: int) -> None:
        i = 0
        while not stop.is_set():
            try:
                r = predict(proc, f"k{worker}-{i}")
            except httpx.TransportError:
                return  # the sidecar died under us: this one never reached the client
            if r.status_code == 200:
                answered.append(f"k{worker}-{i}")
            i += 1

    threads = [threading.Thread(target=load, args=(w,)) for w in range(4)]
    for t in threads:
        t.start()
    while len(answered) < 100:
        threading.Event().wait(0.01)
    proc.kill9()
    stop.set()
    for t in threads:
        t.join()
    sink.start()
    again = sidecar_process(iris_predictor.url, tmp_path, "--log-url", sink.url, port=proc.port).start()
    try:
        # Not a count: events of requests cut off by the kill, and re-deliveries, add to it.
        wanted = set(answered)

        def both_halves(events: list[CloudEvent]) -> bool:
            seen = {(e.id, e.type) for e in events}
            return all((i, ev.REQUEST) in seen and (i, ev.RESPONSE) in seen for i in wanted)

        sink.wait_until(both_halves, timeout=30)
    finally:
        again.stop()
        sink.stop()


def test_memory_durability_delivers_while_running(iris_predictor: Process, tmp_path: Path) -> None:
    with EventCollector() as sink:
        proc = sidecar_process(iris_predictor.url, tmp_path, "--log-url", sink.url, "--durability", "memory").start()
        try:
            for i in range(10):
                predict(proc, f"mem{i}")
            assert len(sink.wait_for(20)) == 20
            assert not list((tmp_path / "spool").glob("*.seg"))
        finally:
            proc.stop()


@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM], ids=["SIGINT", "SIGTERM"])
def test_a_signal_to_the_whole_group_delivers_every_answered_exchange(
        tmp_path: Path, sig: int, monkeypatch: pytest.MonkeyPatch) -> None:
    """Ctrl-C in a terminal, killpg, systemd's KillMode=control-group: the signal reaches the
    delivery child too. It drained and left at once, while the sidecar still answered the requests
    in flight: their events, appended after its last read, stayed undelivered at a clean exit."""
    out = tmp_path / "events.jsonl"
    with CannedPredictor(body=b'{"predictions": [1]}') as predictor:
        predictor.delay = 2.0
        proc = sidecar_process(predictor.url, tmp_path, "--log-url", f"file://{out}")
        with monkeypatch.context() as m:  # a group of its own: the signal to it must not reach pytest
            m.setattr(subprocess, "Popen", functools.partial(subprocess.Popen, start_new_session=True))
            proc.start()
        assert proc.proc is not None
        answers: dict[str, int | None] = {}

        def ask(event_id: str) -> None:
            try:
                answers[event_id] = httpx.post(proc.url + "/v1/models/m:predict", json=V1,
                                               headers={"ce-id": event_id}, timeout=60).status_code
            except httpx.TransportError:
                answers[event_id] = None

        threads = [threading.Thread(target=ask, args=(f"g{i}",)) for i in range(10)]
        try:
            for t in threads:
                t.start()
            deadline = time.monotonic() + 30  # a hang guard
            while predictor.attempts < 10:  # all in flight at the predictor
                assert time.monotonic() < deadline, f"{predictor.attempts} requests reached the predictor"
                time.sleep(0.02)
            os.killpg(proc.proc.pid, sig)
            for t in threads:
                t.join(60)
            assert proc.proc.wait(60) == 0
        finally:
            proc.stop()
    assert answers == {f"g{i}": 200 for i in range(10)}
    seen = {(e["id"], e["type"]) for e in (orjson.loads(line) for line in out.read_bytes().splitlines())}
    assert {i for i, t in seen if t == ev.RESPONSE} == set(answers)
    assert {i for i, t in seen if t == ev.REQUEST} == set(answers)
    assert "starting a new one" not in (tmp_path / "sidecar.log").read_text()

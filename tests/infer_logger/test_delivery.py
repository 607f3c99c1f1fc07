"""The delivery process: sink workers in a child, fed by the disk spool, supervised by the sidecar."""

from __future__ import annotations

import asyncio
import importlib.util
import logging
import os
import signal
import time
from pathlib import Path

import orjson
import pytest
from prometheus_client import generate_latest

from infer_logger import delivery
from infer_logger.config import Settings, load_settings
from infer_logger.delivery import STATUS_FILE, DeliveryProcess
from infer_logger.errors import ConfigError
from infer_logger.logger import InferenceLogger, match_route
from tests.servers import Process, sidecar_process
from tests.services import stopped
from tests.waiting import until

ROUTE = match_route("POST", "/v1/models/iris:predict")


def settings(tmp_path: Path, **extra: object) -> Settings:
    base: dict[str, object] = {"spool": {"dir": str(tmp_path / "spool")},
                               "sinks": [{"type": "file", "path": str(tmp_path / "events.jsonl")}]}
    return load_settings(**{**base, **extra})


def exchange(logger: InferenceLogger, event_id: str) -> None:
    assert ROUTE is not None
    headers = {"content-type": "application/json"}
    raw = [(k.encode(), v.encode()) for k, v in headers.items()]
    ex = logger.begin(ROUTE, "/v1/models/iris:predict", headers, raw, b'{"instances": [[1]]}',
                      event_id)
    logger.end(ex, 200, "application/json", b'{"predictions": [0]}')


def child_pid(logger: InferenceLogger) -> int:
    """The pid of the logger's running delivery child."""
    assert logger.delivery is not None and logger.delivery.pid is not None
    return logger.delivery.pid


def lines(path: Path) -> list[dict[str, object]]:
    return [orjson.loads(line) for line in path.read_bytes().splitlines()] if path.exists() else []


def delivered_count(logger: InferenceLogger, sink: str = "file") -> bytes | None:
    """The sidecar's `infer_logger_events_delivered_total` for `sink`, as /metrics shows it."""
    text = generate_latest(logger.metrics.registry)
    name = b'infer_logger_events_delivered_total{sink="%s"}' % sink.encode()
    line = [ln for ln in text.splitlines() if ln.startswith(name)]
    return line[0].rpartition(b" ")[2] if line else None


def alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    # A zombie (exited, not yet reaped by its parent) counts as gone.
    return Path(f"/proc/{pid}/stat").read_text().split()[2] != "Z"


async def test_events_reach_the_sink_through_the_child(tmp_path: Path) -> None:
    logger = InferenceLogger(settings(tmp_path))
    assert logger.delivery is not None and logger.dispatcher is None
    await logger.start()
    try:
        child = logger.delivery.pid
        assert child is not None and child != os.getpid()
        for i in range(20):
            exchange(logger, f"e{i}")
        out = tmp_path / "events.jsonl"
        await until(lambda: len(lines(out)) == 40)
        assert {e["id"] for e in lines(out)} == {f"e{i}" for i in range(20)}
        await until(lambda: logger.delivery is not None and logger.delivery.status() is not None
                         and logger.sink_states() == {"file": "ok"})
        await until(lambda: b'infer_logger_events_delivered_total{sink="file"} 40.0'
                         in generate_latest(logger.metrics.registry))
        text = generate_latest(logger.metrics.registry).decode()
        assert 'infer_logger_events_accepted_total{type="request"} 20.0' in text
        assert text.count("# TYPE infer_logger_events_dropped_total counter") == 1  # one family, both halves
    finally:
        await logger.stop()
    assert not alive(child)
    assert logger.sink_states() == {"file": "down"}


async def test_a_status_report_that_cannot_be_written_does_not_stop_the_child(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    # Nor is it taken for hung: its heartbeat needs no disk.
    monkeypatch.setattr(delivery, "_HUNG", 2.0)
    blocker = (tmp_path / "spool" / STATUS_FILE).with_suffix(".tmp")
    blocker.mkdir(parents=True)  # e.g. a full disk: the report's temporary file cannot be written
    logger = InferenceLogger(settings(tmp_path, delivery={"priority": "normal"}))
    await logger.start()
    try:
        assert logger.delivery is not None
        child = logger.delivery.pid
        for i in range(10):
            exchange(logger, f"s{i}")
        await until(lambda: len(lines(tmp_path / "events.jsonl")) == 20)
        await asyncio.sleep(3.0)  # several reports failed meanwhile, for longer than _HUNG
        exchange(logger, "later")
        await until(lambda: len(lines(tmp_path / "events.jsonl")) == 22)
        assert child is not None and alive(child) and logger.delivery.pid == child
        blocker.rmdir()
        await until(lambda: logger.sink_states() == {"file": "ok"})  # reports again
    finally:
        await logger.stop()


def policy(pid: int) -> str:
    """`idle`, `low` or `normal`, as the kernel schedules the process's main thread."""
    if os.sched_getscheduler(pid) == os.SCHED_IDLE:
        return "idle"
    return "low" if os.getpriority(os.PRIO_PROCESS, pid) > os.getpriority(os.PRIO_PROCESS, 0) else "normal"


@pytest.mark.parametrize("priority", ["idle", "low", "normal"])
async def test_the_child_lowers_itself_once_caught_up(tmp_path: Path, priority: str) -> None:
    logger = InferenceLogger(settings(tmp_path, delivery={"priority": priority}))
    await logger.start()
    try:
        assert logger.delivery is not None
        pid = logger.delivery.pid
        assert pid is not None
        exchange(logger, "p1")
        await until(lambda: len(lines(tmp_path / "events.jsonl")) == 2)
        await until(lambda: policy(pid) == priority)
        await until(lambda: (logger.delivery.status() or {}).get("priority") == priority)  # type: ignore[union-attr]
    finally:
        await logger.stop()


async def test_a_lowered_child_far_behind_is_replaced_by_one_at_normal_priority(tmp_path: Path) -> None:
    from infer_logger.testing import EventCollector, free_port

    port = free_port()
    logger = InferenceLogger(settings(
        tmp_path, sinks=[{"type": "http", "url": f"http://127.0.0.1:{port}/"}],
        delivery={"priority": "idle", "catch_up_bytes": "8KiB", "backoff_max": 0.2},
    ))
    await logger.start()
    try:
        assert logger.delivery is not None
        first = child_pid(logger)
        await until(lambda: policy(first) == "idle")  # nothing to deliver yet
        for i in range(100):  # ~40 KiB the sink (down) cannot take
            exchange(logger, f"b{i}")
        await until(lambda: logger.delivery is not None and logger.delivery.pid not in (None, first))
        second = logger.delivery.pid
        assert second is not None and logger.delivery.promotions == 1
        await asyncio.sleep(1.5)
        assert policy(second) == "normal"  # still behind: it keeps its share
        with EventCollector(port) as sink:
            await until(lambda: len({e.id for e in list(sink.events)}) == 100, timeout=20)
            await until(lambda: policy(second) == "idle")  # caught up: lowered again
        assert logger.delivery.pid == second and logger.delivery.restarts == 0
    finally:
        await logger.stop()


async def test_a_caught_up_child_is_not_replaced_for_what_it_delivered(tmp_path: Path) -> None:
    # catch_up_bytes below what the segment being written holds: delivered bytes stay in it.
    logger = InferenceLogger(settings(tmp_path, delivery={"priority": "idle", "catch_up_bytes": "1KiB"}))
    await logger.start()
    try:
        assert logger.delivery is not None
        first = child_pid(logger)
        for i in range(20):
            exchange(logger, f"c{i}")
        await until(lambda: len(lines(tmp_path / "events.jsonl")) == 40)
        await until(lambda: (logger.delivery.status() or {}).get("priority") == "idle")  # type: ignore[union-attr]
        assert logger.spool.size_bytes() > 1024
        await asyncio.sleep(3.0)  # several rounds of the catch-up rule
        assert logger.delivery.pid == first and logger.delivery.promotions == 0
    finally:
        await logger.stop()


async def test_stop_drains_what_was_appended(tmp_path: Path) -> None:
    logger = InferenceLogger(settings(tmp_path))
    await logger.start()
    for i in range(200):
        exchange(logger, f"d{i}")
    await logger.stop()
    assert len(lines(tmp_path / "events.jsonl")) == 400


async def test_a_dead_child_is_replaced(tmp_path: Path) -> None:
    logger = InferenceLogger(settings(tmp_path))
    await logger.start()
    try:
        assert logger.delivery is not None
        first = child_pid(logger)
        exchange(logger, "before")
        out = tmp_path / "events.jsonl"
        await until(lambda: len(lines(out)) == 2)
        os.kill(first, signal.SIGKILL)
        exchange(logger, "meanwhile")  # spooled while no child runs
        await until(lambda: logger.delivery is not None and logger.delivery.restarts == 1)
        assert logger.delivery.pid not in (None, first)
        exchange(logger, "after")
        await until(lambda: {e["id"] for e in lines(out)} == {"before", "meanwhile", "after"})
    finally:
        await logger.stop()


async def test_no_child_is_started_once_a_stop_has_begun(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    """The server's graceful stop (answering what is in flight) comes before the logger's: a child
    that died meanwhile was replaced mid-stop ("exited with 0; starting a new one")."""
    logger = InferenceLogger(settings(tmp_path))
    await logger.start()
    try:
        assert logger.delivery is not None
        first = child_pid(logger)
        logger.begin_stop()
        os.kill(first, signal.SIGKILL)
        supervisor = logger.delivery._supervisor
        assert supervisor is not None
        with caplog.at_level(logging.ERROR, logger="infer_logger.delivery"):
            await until(lambda: supervisor.done() or "starting a new one" in caplog.text, timeout=30)
        assert "starting a new one" not in caplog.text
    finally:
        await logger.stop()
    assert logger.delivery.restarts == 0


async def test_a_hung_child_is_replaced(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                       caplog: pytest.LogCaptureFixture) -> None:
    # Alive, its loop stuck (SIGSTOP stands in): it delivered nothing more, and nothing said so.
    monkeypatch.setattr(delivery, "_HUNG", 2.0)
    logger = InferenceLogger(settings(tmp_path, delivery={"priority": "normal"}))
    await logger.start()
    first = None
    try:
        assert logger.delivery is not None
        first = child_pid(logger)
        os.kill(first, signal.SIGSTOP)
        await until(lambda: stopped(first), what="the child stopped")
        exchange(logger, "meanwhile")
        with caplog.at_level(logging.ERROR, logger="infer_logger.delivery"):
            await until(lambda: logger.delivery is not None and logger.delivery.restarts == 1, timeout=60,
                        what="the hung child replaced")
        assert logger.delivery.pid not in (None, first) and not alive(first)
        assert any(r.levelno == logging.ERROR and str(first) in r.getMessage() for r in caplog.records)
        await until(lambda: {e["id"] for e in lines(tmp_path / "events.jsonl")} == {"meanwhile"}, timeout=30)
    finally:
        if first is not None and alive(first):
            os.kill(first, signal.SIGKILL)
        await logger.stop()


async def test_a_logger_started_again_after_a_stop_works_as_a_new_one(tmp_path: Path) -> None:
    """A second start (an app's second lifespan) opens the spool again, /metrics reads that one,
    and its child is supervised (stop's flag stayed set: a dead child was never replaced)."""
    logger = InferenceLogger(settings(tmp_path))
    await logger.start()
    await logger.stop()
    await logger.start()
    try:
        assert logger.delivery is not None
        first = child_pid(logger)
        exchange(logger, "again")
        scrape = generate_latest(logger.metrics.registry).decode()
        assert "infer_logger_spool_bytes 0.0" not in scrape and "infer_logger_spool_bytes" in scrape, scrape
        os.kill(first, signal.SIGKILL)
        await until(lambda: logger.delivery is not None and logger.delivery.restarts == 1)
        exchange(logger, "after")
        await until(lambda: {e["id"] for e in lines(tmp_path / "events.jsonl")} == {"again", "after"})
    finally:
        await logger.stop()


async def test_delivery_counters_carry_over_a_replaced_child(tmp_path: Path) -> None:
    logger = InferenceLogger(settings(tmp_path))
    await logger.start()

    def delivered() -> bytes | None:
        return delivered_count(logger)

    try:
        assert logger.delivery is not None
        first = child_pid(logger)
        for i in range(5):
            exchange(logger, f"r{i}")
        await until(lambda: delivered() == b"10.0")
        # Killed once its checkpoint is saved (an idle child saves it within about 0.5 s): killed
        # before, it re-delivers the batches since the last save, at-least-once, and counts them.
        tail = logger.spool.tail()
        saved = logger.spool.checkpoint_path("file")
        await until(lambda: saved.exists() and orjson.loads(saved.read_bytes()).items() >= {
            "segment": tail.segment, "offset": tail.offset}.items())
        os.kill(first, signal.SIGKILL)
        # The supervisor may have a new child before this looks: any pid but the first one.
        await until(lambda: logger.delivery is not None and logger.delivery.pid != first)
        assert delivered() == b"10.0"  # the dead child's last counts stay shown, then carried over
        await until(lambda: logger.delivery is not None and logger.delivery.pid not in (None, first))
        exchange(logger, "after")
        await until(lambda: len(lines(tmp_path / "events.jsonl")) == 12)
        await until(lambda: delivered() == b"12.0")  # the new child's 2 on top of the 10
    finally:
        await logger.stop()


async def test_a_child_killed_right_after_a_checkpoint_save_has_counted_what_it_covers(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The checkpoint is saved every 0.2 s, the status report (the counts the sidecar shows)
    written every 0.5 s: a child killed between the two had delivered events the checkpoint
    covers, never sent (nor counted) again, that no report counted. (Here every commit saves,
    and the child stands still after each save: the kill falls between the two every time.)"""
    hook = tmp_path / "hook"
    hook.mkdir()
    (hook / "sitecustomize.py").write_text(_SAVE_THEN_STILL)
    saved = tmp_path / "saved"
    monkeypatch.setenv("SPOOL_TEST_SAVED", str(saved))
    monkeypatch.setenv("PYTHONPATH", os.pathsep.join(filter(None, [str(hook), os.environ.get("PYTHONPATH")])))
    logger = InferenceLogger(settings(tmp_path))
    await logger.start()

    def delivered() -> bytes | None:
        return delivered_count(logger)

    try:
        first = child_pid(logger)
        for i in range(5):
            exchange(logger, f"r{i}")
        tail = logger.spool.tail()
        await until(lambda: saved.exists() and saved.read_text() == f"{tail.segment},{tail.offset}")
        os.kill(first, signal.SIGKILL)
        await until(lambda: logger.delivery is not None and logger.delivery.pid not in (None, first))
        await until(lambda: delivered() == b"10.0", 10, "the 10 events the checkpoint covers counted")
        assert len(lines(tmp_path / "events.jsonl")) == 10  # not sent again
    finally:
        await logger.stop()


_SAVE_THEN_STILL = """
# Imported by the delivery child at its start (sitecustomize): every commit saves the checkpoint,
# and after a save the child stands still a while, having said where it saved.
import os
import time
from pathlib import Path

from infer_logger.spool import DiskReader

marker, init, save = Path(os.environ["SPOOL_TEST_SAVED"]), DiskReader.__init__, DiskReader._save

def every_commit(self, *args, **kwargs):
    init(self, *args, **kwargs)
    self.checkpoint_interval = 0.0

def still_after(self, now, collect=True):
    save(self, now, collect)
    marker.write_text(f"{self.position.segment},{self.position.offset}")
    time.sleep(0.5)

DiskReader.__init__, DiskReader._save = every_commit, still_after
"""


_POLL_BUG = """
# Imported by the delivery child at its start (sitecustomize): a bug ends the follower's poll
# task the first time it looks after the trigger file appears.
import os
from pathlib import Path

from infer_logger.spool import SpoolFollower

trigger, refresh = Path(os.environ["SPOOL_TEST_POLL_BUG"]), SpoolFollower.refresh

def buggy(self):
    if trigger.exists():
        trigger.unlink()
        raise RuntimeError("a bug in the poll")
    refresh(self)

SpoolFollower.refresh = buggy
"""


async def test_a_child_whose_spool_polling_died_is_replaced(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    # With its poll task gone the child would deliver nothing more, reporting every sink ok.
    hook = tmp_path / "hook"
    hook.mkdir()
    (hook / "sitecustomize.py").write_text(_POLL_BUG)
    trigger = tmp_path / "poll-bug"
    monkeypatch.setenv("SPOOL_TEST_POLL_BUG", str(trigger))
    monkeypatch.setenv("PYTHONPATH", os.pathsep.join(filter(None, [str(hook), os.environ.get("PYTHONPATH")])))
    logger = InferenceLogger(settings(tmp_path))
    await logger.start()
    try:
        assert logger.delivery is not None
        first = logger.delivery.pid
        out = tmp_path / "events.jsonl"
        exchange(logger, "before")
        await until(lambda: len(lines(out)) == 2)
        trigger.touch()
        await until(lambda: not trigger.exists())  # the child's poll task has died
        exchange(logger, "after")
        await until(lambda: logger.delivery is not None and logger.delivery.restarts == 1, timeout=30)
        assert logger.delivery.pid not in (None, first)
        await until(lambda: {e["id"] for e in lines(out)} == {"before", "after"})
    finally:
        await logger.stop()


async def test_a_child_that_cannot_be_started_is_tried_again(tmp_path: Path,
                                                            monkeypatch: pytest.MonkeyPatch) -> None:
    logger = InferenceLogger(settings(tmp_path))
    await logger.start()
    spawn = asyncio.create_subprocess_exec
    failures = [OSError(11, "Resource temporarily unavailable")]  # fork's EAGAIN, once

    async def flaky_spawn(*args: object, **kwargs: object) -> object:
        if failures:
            raise failures.pop()
        return await spawn(*args, **kwargs)

    try:
        assert logger.delivery is not None
        first = child_pid(logger)
        monkeypatch.setattr(asyncio, "create_subprocess_exec", flaky_spawn)
        os.kill(first, signal.SIGKILL)
        exchange(logger, "meanwhile")
        # The failed start is logged and tried again later (it ended the supervisor for good).
        await until(lambda: logger.delivery is not None and logger.delivery.restarts == 1, timeout=60)
        assert not failures and logger.delivery.pid not in (None, first)
        await until(lambda: {e["id"] for e in lines(tmp_path / "events.jsonl")} == {"meanwhile"})
    finally:
        await logger.stop()


async def test_stop_ends_a_replacement_still_starting(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    logger = InferenceLogger(settings(tmp_path))
    await logger.start()
    spawn = asyncio.create_subprocess_exec
    started: list[asyncio.subprocess.Process] = []

    async def recorded(*args: object, **kwargs: object) -> asyncio.subprocess.Process:
        started.append(await spawn(*args, **kwargs))  # type: ignore[arg-type]
        return started[-1]

    monkeypatch.setattr(asyncio, "create_subprocess_exec", recorded)
    try:
        assert logger.delivery is not None
        first = child_pid(logger)
        os.kill(first, signal.SIGKILL)
        await until(lambda: bool(started))  # the replacement is importing, not ready yet
    finally:
        await logger.stop()
    try:
        assert [p.returncode is not None and not alive(p.pid) for p in started] == [True]
    finally:
        for p in started:
            if p.returncode is None:
                p.kill()
                await p.wait()


@pytest.mark.skipif(importlib.util.find_spec("confluent_kafka") is None, reason="needs the kafka extra")
async def test_a_sink_the_child_cannot_build_fails_the_start(tmp_path: Path) -> None:
    bad = {"type": "kafka", "bootstrap_servers": "127.0.0.1:1", "config": {"no.such.property": "x"}}
    logger = InferenceLogger(load_settings(spool={"dir": str(tmp_path / "spool")}, sinks=[bad]))
    with pytest.raises(ConfigError) as caught:
        await logger.start()
    assert caught.value.field == "config" and "no.such.property" in caught.value.message
    logger.spool.close()


def test_memory_durability_and_inline_mode_deliver_in_process(tmp_path: Path) -> None:
    assert InferenceLogger(settings(tmp_path, delivery={"mode": "inline"})).dispatcher is not None
    memory = InferenceLogger(settings(tmp_path, spool={"dir": str(tmp_path / "m"), "durability": "memory"}))
    assert memory.delivery is None and memory.dispatcher is not None


@pytest.mark.parametrize(("overflow", "reason"), [("drop_newest", "spool_full"), ("drop_oldest", "spool_overflow")])
def test_memory_durability_holds_no_more_than_spool_max_bytes(tmp_path: Path, overflow: str, reason: str) -> None:
    # Not started: no sink takes anything, as in an outage. The cap bounds the sidecar's memory.
    memory = InferenceLogger(settings(tmp_path, max_payload_bytes="64KiB", spool={
        "dir": str(tmp_path / "m"), "durability": "memory", "max_bytes": "256KiB", "overflow": overflow}))
    assert ROUTE is not None
    body = b"x" * (64 << 10)
    for i in range(20):
        ex = memory.begin(ROUTE, "/v1/models/iris:predict", {}, [], body, f"e{i}")
        memory.end(ex, 200, "application/json", body)
    assert 0 < memory.spool.size_bytes() <= 256 << 10
    assert memory.spool.stats.dropped[reason] >= 40 - (256 << 10) // (64 << 10)
    memory.spool.close()


async def test_memory_durability_says_at_stop_what_it_loses(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    # Its events live in the sidecar's memory: "kept in the spool" at the stop was wrong.
    from infer_logger.testing import free_port

    memory = InferenceLogger(settings(
        tmp_path, sinks=[{"type": "http", "url": f"http://127.0.0.1:{free_port()}/"}],  # down
        spool={"dir": str(tmp_path / "m"), "durability": "memory"},
        delivery={"drain_timeout": 1.0, "backoff_max": 0.05}))  # retries to see the deadline come, loaded too
    await memory.start()
    for i in range(3):
        exchange(memory, f"lost{i}")
    with caplog.at_level(logging.WARNING):
        await memory.stop()
    said = [r.getMessage() for r in caplog.records]
    assert not any("kept in the spool" in m for m in said), said
    assert any("still failing at shutdown" in m and "lost" in m for m in said), said
    assert any(r.levelno == logging.ERROR and "6 events" in r.getMessage() for r in caplog.records), said


def test_the_child_leaves_with_a_killed_sidecar(iris_predictor: Process, tmp_path: Path) -> None:
    # At normal priority: an idle-priority child (the default) on a loaded machine gets the CPU to
    # notice only when nothing else wants it, however long that is; this is about the noticing.
    normal = {"INFER_LOGGER_DELIVERY__PRIORITY": "normal"}
    args = (iris_predictor.url, tmp_path, "--log-url", f"file://{tmp_path}/events.jsonl")
    proc = sidecar_process(*args, env=normal).start()
    status = tmp_path / "spool" / STATUS_FILE
    deadline = time.monotonic() + 60  # hang guards, not timings
    while not status.exists() and time.monotonic() < deadline:
        time.sleep(0.05)
    child = orjson.loads(status.read_bytes())["pid"]
    assert alive(child)
    proc.kill9()
    try:
        deadline = time.monotonic() + 60
        while alive(child) and time.monotonic() < deadline:
            time.sleep(0.05)
        assert not alive(child)
    finally:
        if alive(child):
            os.kill(child, signal.SIGKILL)
    # The next sidecar starts its own child on the same spool.
    again = sidecar_process(*args, env=normal).start()
    try:
        assert again.proc is not None
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            report = orjson.loads(status.read_bytes())
            if report["pid"] != child:
                break
            time.sleep(0.05)
        assert report["pid"] != child and alive(report["pid"])
    finally:
        again.stop()


def test_delivery_process_names_its_sinks(tmp_path: Path) -> None:
    process = DeliveryProcess(settings(tmp_path, log_url=[f"file://{tmp_path}/b.jsonl"]))
    assert process.sink_states() == {"file": "down", "file2": "down"}


def test_the_delivery_flag_keeps_the_workers_in_the_sidecar(iris_predictor: Process, tmp_path: Path) -> None:
    import httpx

    out = tmp_path / "events.jsonl"
    proc = sidecar_process(iris_predictor.url, tmp_path, "--log-url", f"file://{out}", "--delivery", "inline").start()
    try:
        assert proc.proc is not None
        answer = httpx.post(proc.url + "/v1/models/iris:predict", json={"instances": [[5.1, 3.5, 1.4, 0.2]]})
        assert answer.status_code == 200
        deadline = time.monotonic() + 10
        while len(lines(out)) < 2 and time.monotonic() < deadline:
            time.sleep(0.05)
        assert len(lines(out)) == 2
        children = Path(f"/proc/{proc.proc.pid}/task/{proc.proc.pid}/children").read_text().split()
        assert children == [] and not (tmp_path / "spool" / STATUS_FILE).exists()
    finally:
        proc.stop()


async def test_a_follower_lock_that_cannot_be_opened_fails_at_once(tmp_path: Path) -> None:
    """Only another process holding the lock is worth waiting for: a lock file it cannot open (a
    directory here, another user's in a pod) held each child's start for 30 s, then again."""
    from infer_logger.delivery import _follow
    from infer_logger.errors import SpoolBusyError, SpoolError

    (tmp_path / "follower.lock").mkdir()
    with pytest.raises(SpoolError) as caught:
        await asyncio.wait_for(_follow(tmp_path), 5)
    assert not isinstance(caught.value, SpoolBusyError) and "follower.lock" in str(caught.value)

"""The delivery process: the sink workers in a child of the sidecar, reading the spool from disk.

The sidecar's event loop then only proxies and appends; decoding the spool, encoding for the
sinks, SQLite and network I/O run in another interpreter, so none of it competes with the
request path for the GIL (in one process a sink's Python work stalls the proxy's loop). The disk
spool is the only channel: the sidecar appends, the child's `SpoolFollower` reads, keeps each
sink's checkpoint and deletes finished segments, exactly as the in-process workers would.

The child reports through a status file in the spool directory, rewritten every half second:
its sinks' health and its metric families, which the sidecar's `/readyz` and `/metrics` show;
and it sends a byte down the pipe it said ready on as often, a heartbeat that needs no disk.
It runs in a session of its own, so a signal to the sidecar's process group (Ctrl-C in a
terminal, killpg) does not reach it; SIGTERM, SIGINT and SIGHUP (systemd signals a whole cgroup)
it ignores while its parent lives: the sidecar answers the requests in flight first, and their
events must still be delivered. It exits when the sidecar says so (SIGUSR2: it drains for
`drain_timeout` first) and when its parent is gone (a `kill -9` of the sidecar: the next sidecar
starts a new child), and exits 1 when its follower stopped polling the spool (only a bug does
that). The sidecar restarts a child that dies, and kills and restarts one whose heartbeat stops
(`_HUNG`), with backoff.

    python -m infer_logger.delivery   # reads the pickled Settings on stdin; says "ready" on stdout
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import pickle
import signal
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import orjson

from infer_logger.config import Settings
from infer_logger.dispatch import Dispatcher, build_sinks
from infer_logger.errors import ConfigError, InferLoggerError, SpoolBusyError
from infer_logger.metrics import CarriedReports, Metrics, RemoteStatus, export
from infer_logger.spool import Position, SpoolFollower

log = logging.getLogger(__name__)

STATUS_FILE = "delivery.json"
_STATUS_EVERY = 0.5  # seconds between status writes in the child
_STALE = 5.0  # seconds after which the sidecar takes a silent child for gone
_LOCK_WAIT = 30.0  # seconds a new child waits for the previous one to let go of the spool
_READY = b"ready\n"
_READY_WAIT = 60.0  # seconds a child may take to import and build its sinks
_ORPHAN_DRAIN = 0.5  # seconds an orphaned child keeps delivering before it leaves
_SHORT_LIFE = 10.0  # seconds: a child that dies sooner is restarted with a growing delay
# Seconds without a heartbeat after which the sidecar takes its child for hung, kills it and
# starts a new one. Well above _STALE (when /readyz says "down"): a loop that is only slow (a
# long synchronous sink call, a busy machine) must not lose its batch in hand to a kill, and a
# child at idle priority on a saturated machine may get no CPU for a while (its replacement starts
# at normal priority, as the catch-up rule's would).
_HUNG = 30.0
_LAST_CHANCE = 2.0  # seconds more for a beat after _HUNG, before the kill
_STOP = signal.SIGUSR2  # the sidecar's "drain and leave": not SIGTERM, which a whole group or cgroup gets


class DeliveryProcess:
    """The sidecar's handle on its delivery child: start, supervise, read its status, stop."""

    def __init__(self, settings: Settings, backlog: Callable[[Position], int] | None = None) -> None:
        """`backlog(position)`: spool bytes after `position` (the writer's view), for the catch-up
        rule; the child reports the position every sink has got to."""
        self.settings = settings
        self.sink_names = [cfg.sink_name for cfg in settings.all_sinks()]
        self.status_path = Path(settings.spool.dir) / STATUS_FILE
        self.restarts = 0
        self.promotions = 0
        self.backlog = backlog
        d = settings.delivery
        self.catch_up_bytes = int(d.catch_up_bytes) if d.catch_up_bytes is not None else int(settings.spool.max_bytes) // 4
        self._proc: asyncio.subprocess.Process | None = None
        # A child started but not yet ready: stop() must end it too (it is not `_proc` yet).
        self._spawning: asyncio.subprocess.Process | None = None
        self._supervisor: asyncio.Task[None] | None = None
        self._watcher: asyncio.Task[None] | None = None
        self._promoting = False
        self._stopping = False
        self._cached: tuple[float, RemoteStatus | None] = (0.0, None)
        self._carried = CarriedReports()

    async def start(self) -> None:
        """Start the child and wait until its sinks are built: a bad sink config fails the start."""
        self._stopping = self._promoting = False  # started again after a stop (an app's second lifespan)
        self._proc = await self._spawn()
        loop = asyncio.get_running_loop()
        self._supervisor = loop.create_task(self._supervise())
        if self.backlog is not None and self.settings.delivery.priority != "normal":
            self._watcher = loop.create_task(self._watch())

    async def _spawn(self) -> asyncio.subprocess.Process:
        try:
            proc = await asyncio.create_subprocess_exec(
                sys.executable, "-m", "infer_logger.delivery", "--log-level", _log_level(),
                stdin=asyncio.subprocess.PIPE, stdout=asyncio.subprocess.PIPE,
                # Out of the sidecar's process group: Ctrl-C or a killpg is the sidecar's to handle.
                start_new_session=True,
            )
        except OSError as exc:  # out of memory, processes or file descriptors
            raise InferLoggerError(f"delivery process: cannot start it: {exc}") from None
        self._spawning = proc
        try:
            return await self._handshake(proc)
        except asyncio.CancelledError:
            if not self._stopping:  # else stop() ends it, letting it drain
                with contextlib.suppress(ProcessLookupError):
                    proc.kill()
                await proc.wait()
            raise
        finally:
            self._spawning = None

    async def _handshake(self, proc: asyncio.subprocess.Process) -> asyncio.subprocess.Process:
        """Hand the new child its settings and wait for it to say ready (or why it cannot)."""
        assert proc.stdin is not None and proc.stdout is not None
        try:
            # Pickled, not JSON: secrets (SecretStr) must reach the child unmasked.
            proc.stdin.write(pickle.dumps(self.settings))
            await proc.stdin.drain()
            proc.stdin.close()
        except OSError as exc:  # a broken pipe: it died at once
            with contextlib.suppress(ProcessLookupError):
                proc.kill()
            await proc.wait()
            raise InferLoggerError(f"delivery process: cannot hand it its settings: {exc}") from None
        try:
            line = await asyncio.wait_for(proc.stdout.readline(), _READY_WAIT)
        except TimeoutError:
            proc.kill()
            await proc.wait()
            raise InferLoggerError(f"delivery process: its sinks were not built within {_READY_WAIT:.0f}s") from None
        if line == _READY:
            return proc
        await proc.wait()
        reason = line.decode(errors="replace").strip() or f"exited with {proc.returncode} before it was ready"
        field, _, message = reason.partition("\t")
        if message:
            raise ConfigError(field, message)
        raise InferLoggerError(f"delivery process: {reason}")

    async def _supervise(self) -> None:
        delay, started = 1.0, time.monotonic()
        while True:
            assert self._proc is not None
            hung = await self._heartbeats(self._proc)
            code = await self._proc.wait()
            self._keep_final(self._proc.pid)
            if self._stopping:
                return
            if self._promoting:  # replaced on purpose (see _watch): at once, no backoff
                self._promoting = False
                await self._respawn(0.5)
                continue
            # One that keeps dying soon after its start is retried less and less often.
            delay = min(delay * 2, 30.0) if time.monotonic() - started < _SHORT_LIFE else 1.0
            if hung:
                log.error("delivery process %d gave no sign of life for %.0fs (hung, or starved of CPU at idle "
                          "priority): killed; starting a new one in %.0fs", self._proc.pid, _HUNG, delay)
            else:
                log.error("delivery process exited with %s; starting a new one in %.0fs", code, delay)
            await asyncio.sleep(delay)
            if self._stopping:  # the sidecar began to stop meanwhile
                return
            await self._respawn(delay)
            self.restarts += 1
            started = time.monotonic()

    async def _heartbeats(self, proc: asyncio.subprocess.Process) -> bool:
        """Read the child's heartbeats until it ends (False); True when none came for `_HUNG` s:
        then it was killed. Not while the sidecar stops: stop() ends it, killing it if need be."""
        assert proc.stdout is not None
        overdue = False
        while True:
            try:
                beats = await asyncio.wait_for(proc.stdout.read(4096), _LAST_CHANCE if overdue else _HUNG)
            except TimeoutError:
                if self._stopping or proc.returncode is not None:
                    continue
                if not overdue:
                    # Our clock ran while the child could not (the pod or machine frozen, then
                    # thawed, both of us with it): it beats within a moment if it only was.
                    overdue = True
                    continue
                with contextlib.suppress(ProcessLookupError):
                    proc.kill()  # SIGKILL: a stopped or stuck process takes no other signal
                return True
            overdue = False
            if not beats:  # end of the pipe: it exited
                return False

    async def _respawn(self, delay: float) -> None:
        while not self._stopping:
            try:
                self._proc = await self._spawn()
                return
            except (InferLoggerError, OSError) as exc:  # any failure: the supervisor must go on
                log.error("delivery process did not start: %s", exc)
                delay = min(delay * 2, 30.0)
                await asyncio.sleep(delay)

    async def _watch(self) -> None:
        """Catch-up rule: a lowered child that falls `catch_up_bytes` behind is replaced by one at
        normal priority (a process cannot raise its own), which lowers itself once caught up."""
        assert self.backlog is not None
        while True:
            await asyncio.sleep(1.0)
            status = self.status()
            if (status is None or status.get("priority", "normal") == "normal" or self._promoting
                    or self._stopping):
                continue
            # Measured from what the child delivered: the segment being written is never
            # deleted, so the spool's size alone would count delivered bytes (and promote an
            # idle, caught-up child every second when catch_up_bytes is below a segment).
            delivered = status.get("delivered")
            if delivered is None:
                continue
            behind = self.backlog(Position(*delivered))
            if behind > self.catch_up_bytes and self._proc is not None and self._proc.returncode is None:
                log.warning("delivery is %d bytes behind: restarting it at normal priority until it catches up",
                            behind)
                self._promoting = True
                self.promotions += 1
                self._proc.send_signal(signal.SIGUSR1)

    def begin_stop(self) -> None:
        """The sidecar is stopping (answering what is in flight first): a child that dies now is
        not replaced, nor promoted; stop() follows."""
        self._stopping = True

    async def stop(self, drain_timeout: float) -> None:
        """Let the child drain for `drain_timeout`, then stop it (what is left stays spooled)."""
        self._stopping = True
        # The one being started, if any, too: else it would live on (and hold the spool).
        procs = [p for p in (self._proc, self._spawning) if p is not None and p.returncode is None]
        for task in (self._supervisor, self._watcher):
            if task is not None:
                task.cancel()
        await asyncio.gather(*(_end(proc, drain_timeout + 5.0) for proc in procs))
        if self._proc is not None:
            self._keep_final(self._proc.pid)

    @property
    def pid(self) -> int | None:
        return self._proc.pid if self._proc is not None and self._proc.returncode is None else None

    def status(self) -> RemoteStatus | None:
        """The child's last report (read at most every 0.25 s); None when it is missing or stale."""
        if self.pid is None:
            return None
        now = time.monotonic()
        read_at, status = self._cached
        if now - read_at < 0.25:
            return status
        status = None
        with contextlib.suppress(KeyError, TypeError):
            report = self._read(self.pid)
            if report is not None and time.time() - report["at"] < _STALE:
                status = report
                self._carried.keep(report)
        self._cached = (now, status)
        return status

    def report(self) -> RemoteStatus | None:
        """The children's metrics for /metrics: counters carried over from the replaced ones, and
        the last report while no fresh one exists (`status()` says stale meanwhile)."""
        self.status()
        return self._carried.report()

    def _read(self, pid: int | None) -> RemoteStatus | None:
        """The status file's report when child `pid` wrote it (KeyError/TypeError for a bad one)."""
        with contextlib.suppress(OSError, ValueError):
            report = orjson.loads(self.status_path.read_bytes())
            return report if isinstance(report, dict) and report["pid"] == pid else None
        return None

    def _keep_final(self, pid: int) -> None:
        """Take an exited child's last report in, so its counts are carried over."""
        with contextlib.suppress(KeyError, TypeError):
            if (report := self._read(pid)) is not None:
                self._carried.keep(report)

    def sink_states(self) -> dict[str, str]:
        status = self.status()
        if status is None:
            return {name: "down" for name in self.sink_names}
        return {name: "ok" if healthy else "retrying" for name, healthy in status["sinks"].items()}


async def _end(proc: asyncio.subprocess.Process, timeout: float) -> None:
    """Stop a child (it drains first) and reap it; killed after `timeout` seconds."""
    with contextlib.suppress(ProcessLookupError):
        proc.send_signal(_STOP)  # one still importing has no handler yet: the default ends it
    try:
        await asyncio.wait_for(proc.wait(), timeout)
    except TimeoutError:
        log.error("delivery process did not stop within %.0fs: killed", timeout)
        proc.kill()
        await proc.wait()


def _log_level() -> str:
    return logging.getLevelName(logging.getLogger().getEffectiveLevel()).lower()


# -- the child -----------------------------------------------------------------------------


async def _follow(directory: Path) -> SpoolFollower:
    """The spool's follower; waits while a previous child (after a kill -9 of its parent) drains."""
    deadline = time.monotonic() + _LOCK_WAIT
    while True:
        try:
            return SpoolFollower(directory)
        except SpoolBusyError:  # not another error (a lock file it cannot open): waited 30 s for nothing
            if time.monotonic() > deadline:
                raise
            await asyncio.sleep(0.1)


def lower_priority(priority: str) -> None:
    """Lower every thread of this process (Linux schedules threads, e.g. librdkafka's, one by one)."""
    if priority == "normal":
        return
    tids = [int(t) for t in os.listdir("/proc/self/task")] if os.path.isdir("/proc/self/task") else [0]
    for tid in tids:
        with contextlib.suppress(OSError):  # a thread that just ended
            if priority == "idle" and hasattr(os, "SCHED_IDLE"):
                os.sched_setscheduler(tid, os.SCHED_IDLE, os.sched_param(0))
            else:
                os.setpriority(os.PRIO_PROCESS, tid, 19)


def _write_status(path: Path, dispatcher: Dispatcher, metrics: Metrics, priority: str) -> OSError | None:
    """Write the report; an error (e.g. a full disk) is returned: delivery goes on regardless,
    and the sidecar sees the report go stale meanwhile."""
    dispatcher.update_lag()
    floor = min((w.reader.position for w in dispatcher.workers), default=None)
    report: dict[str, Any] = {
        "pid": os.getpid(),
        "at": time.time(),
        "sinks": dispatcher.health(),
        "priority": priority,
        # Where every sink has got to: the sidecar measures the backlog from there.
        "delivered": None if floor is None else [floor.segment, floor.offset],
        **export(metrics),
    }
    tmp = path.with_suffix(".tmp")
    try:
        tmp.write_bytes(orjson.dumps(report))
        os.replace(tmp, path)
    except OSError as exc:
        return exc
    return None


async def _beat(fd: int) -> None:
    """The heartbeat: a byte down the pipe to the sidecar every `_STATUS_EVERY` s while this
    process's loop runs. No disk involved: a full disk stops the status reports, not this."""
    while True:
        with contextlib.suppress(OSError):  # the sidecar behind reading (the pipe full), or gone
            os.write(fd, b".")
        await asyncio.sleep(_STATUS_EVERY)


async def deliver(settings: Settings) -> None:
    """The child's life: build the sinks, say ready, deliver until told to stop or orphaned."""
    loop = asyncio.get_running_loop()
    stop = asyncio.Event()
    parent = os.getppid()
    drain = settings.delivery.drain_timeout

    def group_signal() -> None:
        nonlocal drain
        # Also sent to the sidecar (systemd signals the whole cgroup), which answers the requests
        # in flight, then tells us (SIGUSR2): their events are ours to deliver. Orphaned, we leave.
        if os.getppid() != parent:
            drain = min(drain, _ORPHAN_DRAIN)
            stop.set()

    for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
        loop.add_signal_handler(sig, group_signal)
    loop.add_signal_handler(_STOP, stop.set)
    # SIGUSR1: the sidecar replaces us with a child at normal priority, at once (no drain).
    leave_now = asyncio.Event()

    def replaced() -> None:
        leave_now.set()
        stop.set()

    loop.add_signal_handler(signal.SIGUSR1, replaced)
    sinks = build_sinks(settings)  # a sink that cannot be built fails the sidecar's start
    sys.stdout.buffer.write(_READY)
    sys.stdout.flush()
    pipe = os.dup(1)  # the heartbeat's (not inherited by any process we start)
    os.set_blocking(pipe, False)  # a sidecar not reading must not stop us
    os.dup2(2, 1)  # stray prints go to the log
    beating = loop.create_task(_beat(pipe))
    # After a kill -9 of the sidecar its old child may still be leaving: the new one waits here,
    # not the sidecar's start.
    follower = await _follow(Path(settings.spool.dir))
    metrics = Metrics(follower)
    dispatcher = Dispatcher.from_settings(settings, follower, metrics, sinks)
    status_path = Path(settings.spool.dir) / STATUS_FILE
    follower.start_polling()
    dispatcher.start()
    # Normal priority until the backlog is delivered, then the configured one.
    priority = "normal"
    status_error: OSError | None = None
    # Before each checkpoint save too: the 0.5 s between reports, a kill -9 lost the counts of
    # events the checkpoint had passed (never sent, nor counted, again).
    follower.before_save = lambda: _write_status(status_path, dispatcher, metrics, priority)
    try:
        while not stop.is_set():
            follower.check_polling()  # else a dead poll task would deliver nothing more, silently
            if priority != settings.delivery.priority and all(w.reader.lag() == 0 for w in dispatcher.workers):
                lower_priority(settings.delivery.priority)
                priority = settings.delivery.priority
            failed = _write_status(status_path, dispatcher, metrics, priority)
            if (failed is None) != (status_error is None):  # log the changes, not every report
                log.warning("status report %s: %s", status_path, failed or "written again")
            status_error = failed
            if os.getppid() != parent:
                # Orphaned: make way for the next sidecar's child soon; what is not delivered
                # stays spooled for it.
                log.warning("the sidecar is gone: delivery stops (the next sidecar takes over)")
                drain = min(drain, _ORPHAN_DRAIN)
                break
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(stop.wait(), _STATUS_EVERY)
    finally:
        follower.refresh()  # the sidecar appended all it will before it asked us to stop
        await dispatcher.stop(0 if leave_now.is_set() else drain)
        _write_status(status_path, dispatcher, metrics, priority)
        follower.close()
        beating.cancel()


def main(argv: list[str] | None = None) -> int:
    args = sys.argv[1:] if argv is None else argv
    level = args[args.index("--log-level") + 1] if "--log-level" in args else "info"
    logging.basicConfig(level=level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    settings = pickle.loads(sys.stdin.buffer.read())
    if not isinstance(settings, Settings):
        print("settings\tnot a Settings object on stdin", flush=True)
        return 2
    try:
        _run(settings)
    except ConfigError as exc:
        print(f"{exc.field}\t{exc.message}", flush=True)
        return 2
    except InferLoggerError as exc:
        print(str(exc).replace("\n", " "), flush=True)
        return 1
    return 0


def _run(settings: Settings) -> None:
    # uvloop when installed, as the sidecar itself runs.
    try:
        import uvloop
    except ImportError:
        asyncio.run(deliver(settings))
    else:
        uvloop.run(deliver(settings))


if __name__ == "__main__":
    sys.exit(main())

"""Sink workers: read the spool behind the request path, deliver, and only then move on.

One worker per sink, each with its own spool cursor, so a slow or dead sink holds back only
itself. A failed batch is retried with exponential backoff and full jitter until the sink takes
it; events a sink refuses for good are written to a dead-letter file with the reason, and counted.
A batch refused as a whole (for its size, or for one bad event in it) is sent again in halves first.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import logging
import random
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from infer_logger import deadletter
from infer_logger.cloudevents.event import CloudEvent
from infer_logger.config import Settings
from infer_logger.errors import RejectedError, SinkError
from infer_logger.metrics import Metrics
from infer_logger.sinks.base import Sink
from infer_logger.sinks.halving import Halving
from infer_logger.spool import BATCH_BYTES, MemoryReader, Position, SpoolReader, SpoolView

log = logging.getLogger(__name__)

@dataclass(frozen=True, slots=True)
class Backoff:
    initial: float = 0.1
    maximum: float = 5.0
    multiplier: float = 2.0
    retry_after_max: float = 60.0
    """The longest wait a receiver's Retry-After gets (it was held to `maximum`, 5 s: a receiver
    asking for 60 got 12 attempts a minute)."""

    def delay(self, attempt: int, retry_after: float | None = None) -> float:
        """Full jitter: uniform in [0, min(max, initial * multiplier**attempt)]; at least the
        receiver's Retry-After, up to `retry_after_max`."""
        try:
            ceiling = min(self.maximum, self.initial * self.multiplier ** max(0, attempt - 1))
        except OverflowError:  # attempt ~1025 at 2x (~40 min of outage): long past the maximum
            ceiling = self.maximum
        delay = random.uniform(0, ceiling)
        return max(delay, min(retry_after or 0.0, self.retry_after_max))


class SinkWorker:
    def __init__(
        self,
        name: str,
        sink: Sink,
        reader: SpoolReader,
        metrics: Metrics,
        *,
        batch_size: int = 500,
        in_flight: int = 1,
        linger: float = 0.0,
        backoff: Backoff = Backoff(),
        deadletter_dir: Path | None = None,
    ) -> None:
        self.name = name
        self.in_flight = in_flight
        self.linger = linger
        self.sink = sink
        self._send = Halving(sink).send_batch
        self.reader = reader
        self.metrics = metrics
        self.batch_size = batch_size
        self.batch_bytes = BATCH_BYTES
        self.backoff = backoff
        self.deadletter = deadletter_dir / f"{name}.jsonl" if deadletter_dir else None
        self.draining = False
        self._drain_until = 0.0  # monotonic: retries that end later are left to the next start
        # Ends a linger at shutdown. Not the reader's wake: appends set that too, and during a
        # linger each one set the worker going round its loop until the linger was over.
        self._drained = asyncio.Event()
        self.healthy = True
        # The tasks of batches that failed and are not taken yet: no new batch starts meanwhile.
        self._failing: set[asyncio.Task[Any] | None] = set()

    def drain(self, timeout: float = 0.0) -> None:
        """Deliver what is spooled and return (at shutdown), from a linger or an idle wait at once;
        a failure is retried while its backoff ends within `timeout`."""
        self._drain_until = time.monotonic() + timeout
        self.draining = True
        self._drained.set()
        self.reader.wake()

    async def _linger(self, timeout: float) -> None:
        """Wait until `drain` or `timeout` passes."""
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self._drained.wait(), timeout)

    async def run(self) -> None:
        """Deliver until drained or cancelled. A failure of the worker itself (a bug, never the
        sink's: `_deliver` retries those) is logged, marks the sink unhealthy and restarts it from
        the last commit after a backoff: the batches since are sent again, none is lost."""
        attempt = 0
        while True:
            try:
                await self._run()
                return
            except Exception:
                attempt += 1
                self.healthy = False
                log.exception("sink %s: the worker failed; restarting from the last commit", self.name)
                if self.draining:
                    return
                await asyncio.sleep(self.backoff.delay(attempt))

    async def _run(self) -> None:
        """Keep up to `in_flight` batches with the sink; commit them strictly in spool order.

        Batches are handed over in spool order, and so are their retries: once one failed, no new
        batch starts, and a failed batch is sent again only after the batches before it are done
        (a request in one batch and its response in the next, both failing as a broker stalled,
        were retried each on its own backoff, and the response landed first). What a sink took
        of a later batch before an earlier one failed stays taken: only one in flight keeps spool
        order even then.
        """
        loop = asyncio.get_running_loop()
        cursor = self.reader.position
        pending: collections.deque[tuple[asyncio.Task[bool] | None, Position]] = collections.deque()
        # After a partial batch the next one waits until `linger` has passed: per-batch costs (a
        # round trip, a transaction) dwarf per-event ones, and a lone event after a quiet
        # spell still goes out at once.
        not_before = 0.0
        try:
            while True:
                while (len(pending) < self.in_flight and not self._failing
                       and (self.draining or loop.time() >= not_before)):
                    events, end = self.reader.read(self.batch_size, cursor, max_bytes=self.batch_bytes)
                    if end == cursor:
                        break
                    cursor = end
                    # No linger when more is waiting already (a batch the byte budget cut, or appends since).
                    if len(events) < self.batch_size and not self.reader.lag(end):
                        not_before = loop.time() + self.linger
                    # No events but a new position: past a corrupt stretch; commit it in turn.
                    before = next((t for t, _ in reversed(pending) if t is not None), None)
                    task = asyncio.create_task(self._deliver(events, before)) if events else None
                    pending.append((task, end))
                too_soon = not_before - loop.time()
                if not pending:
                    # All that was read is delivered: healthy, also after a restart with no traffic since.
                    self.healthy = True
                    if self.draining:
                        return
                    # Saves a checkpoint the save interval held back (no later commit would while
                    # idle: a kill -9 hours later re-delivered the burst's last batches).
                    self.reader.commit(self.reader.position)
                    await (self._linger(too_soon) if too_soon > 0 else self.reader.wait(0.5))
                    continue
                head, end = pending[0]
                if head is not None and not head.done():
                    waits: set[asyncio.Future[Any]] = {head}
                    if len(pending) < self.in_flight and not self._failing:  # room: also wake for the next batch
                        # Draining, nothing lingers: only a batch done or an append ends the wait.
                        later = (self._linger(too_soon) if too_soon > 0 and not self.draining
                                 else self.reader.wait(0.5))
                        waits.add(asyncio.ensure_future(later))
                    _, others = await asyncio.wait(waits, return_when=asyncio.FIRST_COMPLETED)
                    for other in others - {head}:
                        other.cancel()
                    continue
                pending.popleft()
                if head is not None and not head.result():
                    self.healthy = False  # a later batch taken meanwhile said otherwise: the last status reported
                    return  # draining and the sink is still down: the spool keeps them
                self.reader.commit(end)
        finally:
            self.reader.flush()
            for task, _ in pending:
                if task is not None:
                    task.cancel()

    async def _deliver(self, events: Sequence[CloudEvent], before: asyncio.Task[bool] | None = None) -> bool:
        """Until the sink took or refused each event; False only when draining with it still failing.

        Events refused together (a batch POST answered 413 or 400) go again in halves
        (`Halving`): only an event refused alone is dead-lettered. A failure that names its
        `pending` events retries only those, and only once `before` (the batch handed over
        before this one) is done. Done means every batch before it is: a batch taken at once,
        between two that failed, let the later one's retry overtake the earlier one's.
        """
        try:
            done = await self._attempts(events, before)
        finally:
            self._failing.discard(asyncio.current_task())
        if before is not None and not before.done():
            await asyncio.wait({before})
        return done

    def _none_failing_but_this(self) -> bool:
        # With batches in flight, one taken while an earlier one backs off: the sink is not well
        # yet (/readyz flickered ready through an outage).
        return not self._failing - {asyncio.current_task()}

    async def _attempts(self, events: Sequence[CloudEvent], before: asyncio.Task[bool] | None) -> bool:
        attempt = 0
        # Once the sink refused events for good, only writing them down is tried again: asked
        # again, a sink may not refuse the same way (an explainer's exchange is settled by then).
        refused: list[tuple[CloudEvent, str]] | None = None
        taken = 0
        while True:
            started = time.perf_counter()
            failure: Exception | None = None
            if refused is None:
                try:
                    await self._send(events)
                except RejectedError as exc:
                    refused, taken = exc.refusals(events), exc.taken(events)
                except asyncio.CancelledError as exc:
                    if asyncio.current_task().cancelling():  # type: ignore[union-attr]  # ours: a stop
                        raise
                    # The sink's own (a client library cancelling a future it closed): it ended the
                    # worker, the sink still said healthy, and nothing was delivered again.
                    failure = SinkError(f"the sink's call was cancelled ({exc!r})")
                except Exception as exc:  # any failure of a sink is retried, never fatal
                    failure = exc
                    # Only events of this batch: pending ones it does not hold (another batch's,
                    # copies) had the batch taken for taken, committed, and lost.
                    pending = exc.pending_among(events) if isinstance(exc, SinkError) else None
                    if pending is not None and len(pending) < len(events):  # the others were taken: only these again
                        kept = [e for e in events if id(e) in pending]
                        self.metrics.delivered.labels(self.name).inc(len(events) - len(kept))
                        events = kept
                else:
                    self.healthy = self._none_failing_but_this()
                    self.metrics.sink_latency.labels(self.name).observe(time.perf_counter() - started)
                    self.metrics.delivered.labels(self.name).inc(len(events))
                    return True
            if refused is not None:
                try:
                    self._dead_letter(refused)
                except Exception as error:  # not written down anywhere yet: the batch stays uncommitted
                    failure = SinkError(f"cannot write dead letters to {self.deadletter}: {error}")
                else:
                    self.healthy = self._none_failing_but_this()
                    self.metrics.delivered.labels(self.name).inc(taken)
                    return True
            assert failure is not None
            attempt += 1
            self._failing.add(asyncio.current_task())
            self.healthy = False
            self.metrics.retried.labels(self.name).inc()
            delay = self.backoff.delay(attempt, getattr(failure, "retry_after", None))
            # Draining, a retry is worth it while the drain lasts (a memory spool loses the rest).
            if self.draining and time.monotonic() + delay >= self._drain_until:
                fate = ("lost with the process (durability: memory)" if isinstance(self.reader, MemoryReader)
                        else "kept in the spool")
                log.warning("sink %s still failing at shutdown (%s): %s", self.name, failure, fate)
                return False
            if attempt == 1 or attempt % 10 == 0:
                log.warning("sink %s: %s; retry %d in %.2fs", self.name, failure, attempt, delay)
            await asyncio.sleep(delay)
            if before is not None and not before.done():  # retries go in spool order too
                await asyncio.wait({before})

    def _dead_letter(self, refused: Sequence[tuple[CloudEvent, str]]) -> None:
        """Append the refused events to the sink's dead-letter file (OSError: nothing counted)."""
        if self.deadletter is not None:
            deadletter.append(self.deadletter, refused)
        self.metrics.drop("rejected", len(refused))
        log.error("sink %s refused %d events: %s", self.name, len(refused), refused[0][1])


def build_sinks(settings: Settings) -> dict[str, Sink]:
    """Every configured sink, by name (ConfigError when one cannot be built)."""
    return {cfg.sink_name: cfg.build() for cfg in settings.all_sinks()}


class Dispatcher:
    """Runs one worker per sink over one spool; stops them after draining what it can."""

    def __init__(
        self,
        spool: SpoolView,
        sinks: dict[str, Sink],
        metrics: Metrics,
        *,
        batch_size: int = 500,
        in_flight: int = 1,
        linger: float = 0.0,
        backoff: Backoff = Backoff(),
        deadletter_dir: Path | None = None,
        overrides: dict[str, tuple[int | None, int | None]] | None = None,
        destinations: dict[str, str] | None = None,
    ) -> None:
        """`overrides` maps a sink name to its own (batch_size, in_flight); None keeps the default.
        `destinations`: where each sink delivers, kept with its checkpoint (`Settings.destinations`)."""
        self.spool = spool
        self.metrics = metrics
        self.workers = []
        # Before the readers: a renamed sink finds its own set aside.
        spool.set_aside_unread({name: (destinations or {}).get(name) for name in sinks})
        for name, sink in sinks.items():
            if callable(getattr(sink, "stats", None)):
                metrics.sink_counts.watch(name, sink)
            own_batch, own_flight = (overrides or {}).get(name, (None, None))
            self.workers.append(
                SinkWorker(
                    name,
                    sink,
                    spool.reader(name, destination=(destinations or {}).get(name)),
                    metrics,
                    batch_size=own_batch or batch_size,
                    in_flight=own_flight or in_flight,
                    linger=linger,
                    backoff=backoff,
                    deadletter_dir=deadletter_dir,
                )
            )
        self._tasks: list[asyncio.Task[None]] = []

    @classmethod
    def from_settings(cls, settings: Settings, spool: SpoolView, metrics: Metrics,
                      sinks: dict[str, Sink] | None = None) -> Dispatcher:
        """The sidecar's workers: one per configured sink, built here unless given."""
        configs = settings.all_sinks()
        d = settings.delivery
        return cls(
            spool,
            build_sinks(settings) if sinks is None else sinks,
            metrics,
            batch_size=d.batch_size,
            in_flight=d.in_flight,
            linger=d.linger,
            backoff=Backoff(d.backoff_initial, d.backoff_max, retry_after_max=d.retry_after_max),
            deadletter_dir=Path(settings.spool.dir) / "deadletter",
            overrides={cfg.sink_name: (cfg.batch_size, cfg.in_flight) for cfg in configs},
            destinations=settings.destinations(),
        )

    def start(self) -> None:
        loop = asyncio.get_running_loop()
        self._tasks = [loop.create_task(w.run(), name=f"sink:{w.name}") for w in self.workers]

    async def stop(self, drain_timeout: float = 5.0) -> None:
        """Deliver what the sinks will take within `drain_timeout`; the rest stays spooled."""
        for worker in self.workers:
            worker.drain(drain_timeout)
        if self._tasks:
            _, pending = await asyncio.wait(self._tasks, timeout=drain_timeout)
            for task in pending:
                task.cancel()
            await asyncio.gather(*self._tasks, return_exceptions=True)
        for worker in self.workers:
            try:
                await worker.sink.aclose()
            except Exception:  # the others are closed still (and the caller closes the spool)
                log.exception("sink %s: closing it failed", worker.name)

    @property
    def healthy(self) -> bool:
        return all(w.healthy for w in self.workers)

    def health(self) -> dict[str, bool]:
        """Each sink's health by name: False while its batches fail and back off."""
        return {w.name: w.healthy for w in self.workers}

    def update_lag(self) -> None:
        """Set the sink lag gauges from the readers (read at scrape or report time)."""
        for worker in self.workers:
            self.metrics.sink_lag.labels(worker.name).set(worker.reader.lag())

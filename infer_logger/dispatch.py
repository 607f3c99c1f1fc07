"""Sink workers: read the spool behind the request path, deliver, and only then move on.

One worker per sink, each with its own spool cursor, so a slow or dead sink holds back only
itself. A failed batch is retried with exponential backoff and full jitter until the sink takes
it; events a sink refuses for good are written to a dead-letter file with the reason, and counted.
"""

from __future__ import annotations

import asyncio
import logging
import random
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import orjson

from infer_logger.cloudevents.event import CloudEvent
from infer_logger.errors import RejectedError
from infer_logger.events import decode_data
from infer_logger.metrics import Metrics
from infer_logger.sinks.base import Sink
from infer_logger.spool import Spool, SpoolReader

log = logging.getLogger(__name__)


@dataclass(frozen=True, slots=True)
class Backoff:
    initial: float = 0.1
    maximum: float = 30.0
    multiplier: float = 2.0

    def delay(self, attempt: int, retry_after: float | None = None) -> float:
        """Full jitter: uniform in [0, min(max, initial * multiplier**attempt)]."""
        ceiling = min(self.maximum, self.initial * self.multiplier ** max(0, attempt - 1))
        delay = random.uniform(0, ceiling)
        return max(delay, min(retry_after or 0.0, self.maximum))


class SinkWorker:
    def __init__(
        self,
        name: str,
        sink: Sink,
        reader: SpoolReader,
        metrics: Metrics,
        *,
        batch_size: int = 500,
        backoff: Backoff = Backoff(),
        deadletter_dir: Path | None = None,
    ) -> None:
        self.name = name
        self.sink = sink
        self.reader = reader
        self.metrics = metrics
        self.batch_size = batch_size
        self.backoff = backoff
        self.deadletter = deadletter_dir / f"{name}.jsonl" if deadletter_dir else None
        self.draining = False
        self.healthy = True

    async def run(self) -> None:
        while True:
            events, end = self.reader.read(self.batch_size)
            if not events:
                if end != self.reader.position:
                    self.reader.commit(end)  # moved past a corrupt stretch
                    continue
                if self.draining:
                    return
                await self.reader.wait(0.5)
                continue
            if not await self._deliver(events):
                return  # draining and the sink is still down: the spool keeps them
            self.reader.commit(end)
            self.metrics.sink_lag.labels(self.name).set(self.reader.lag())

    async def _deliver(self, events: Sequence[CloudEvent]) -> bool:
        attempt = 0
        while True:
            started = time.perf_counter()
            try:
                await self.sink.send_batch(events)
            except RejectedError as exc:
                refused = exc.events or list(events)
                self._dead_letter(refused, str(exc))
                self.metrics.delivered.labels(self.name).inc(len(events) - len(refused))
                return True
            except Exception as exc:  # any failure of a sink is retried, never fatal
                attempt += 1
                self.healthy = False
                self.metrics.retried.labels(self.name).inc()
                if self.draining:
                    log.warning("sink %s still failing at shutdown (%s): kept in the spool", self.name, exc)
                    return False
                delay = self.backoff.delay(attempt, getattr(exc, "retry_after", None))
                if attempt == 1 or attempt % 10 == 0:
                    log.warning("sink %s: %s; retry %d in %.2fs", self.name, exc, attempt, delay)
                await asyncio.sleep(delay)
                continue
            self.healthy = True
            self.metrics.sink_latency.labels(self.name).observe(time.perf_counter() - started)
            self.metrics.delivered.labels(self.name).inc(len(events))
            return True

    def _dead_letter(self, events: Sequence[CloudEvent], reason: str) -> None:
        self.metrics.drop("rejected", len(events))
        log.error("sink %s refused %d events: %s", self.name, len(events), reason)
        if self.deadletter is None:
            return
        self.deadletter.parent.mkdir(parents=True, exist_ok=True)
        with self.deadletter.open("ab") as fh:
            for event in events:
                record = {"reason": reason, "attributes": event.attributes, "data": decode_data(event)}
                fh.write(orjson.dumps(record) + b"\n")


class Dispatcher:
    """Starts a worker per sink over one spool; stops them after draining what it can."""

    def __init__(
        self,
        spool: Spool,
        sinks: dict[str, Sink],
        metrics: Metrics,
        *,
        batch_size: int = 500,
        backoff: Backoff = Backoff(),
        deadletter_dir: Path | None = None,
    ) -> None:
        self.spool = spool
        self.metrics = metrics
        self.workers = [
            SinkWorker(
                name,
                sink,
                spool.reader(name),
                metrics,
                batch_size=batch_size,
                backoff=backoff,
                deadletter_dir=deadletter_dir,
            )
            for name, sink in sinks.items()
        ]
        self._tasks: list[asyncio.Task[None]] = []

    def start(self) -> None:
        loop = asyncio.get_running_loop()
        self._tasks = [loop.create_task(w.run(), name=f"sink:{w.name}") for w in self.workers]

    async def stop(self, drain_timeout: float = 5.0) -> None:
        """Deliver what the sinks will take within `drain_timeout`; the rest stays spooled."""
        for worker in self.workers:
            worker.draining = True
            wake = getattr(worker.reader, "_event", None)
            if wake is not None:
                wake.set()
        if self._tasks:
            _, pending = await asyncio.wait(self._tasks, timeout=drain_timeout)
            for task in pending:
                task.cancel()
            await asyncio.gather(*self._tasks, return_exceptions=True)
        for worker in self.workers:
            await worker.sink.aclose()

    @property
    def healthy(self) -> bool:
        return all(w.healthy for w in self.workers)

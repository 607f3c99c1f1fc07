"""`infer-logger ingest`: one source feeding one sink, with `/healthz`, `/readyz` and `/metrics`.

The source runs beside a small FastAPI app in one event loop: it starts before the app is served
(a Forward port in use is an error at start, not a dead task behind a live process), and stops in
the app's shutdown, so SIGTERM gives the batch in hand `drain_timeout` seconds (else it stays unacked,
uncommitted: sent again) and closes the sink. A source that stops by itself stops the service, which
then exits 1. `/readyz` is 503 while the sink's last batch failed (Forward: for 10 s after it),
and while the source says it cannot read (Kafka: no broker reachable).
"""

from __future__ import annotations

import asyncio
import logging
import socket
import time
from collections.abc import AsyncIterator, Iterator, Sequence
from contextlib import asynccontextmanager
from typing import Any

from fastapi import FastAPI
from fastapi.responses import JSONResponse, Response
from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, generate_latest
from prometheus_client.core import CounterMetricFamily
from prometheus_client.registry import Collector

from infer_logger.cloudevents.event import CloudEvent
from infer_logger.errors import InferLoggerError, RejectedError
from infer_logger.server import GracefulServer, run_loop, uvicorn_config
from infer_logger.sinks.base import Sink
from pipelines.sources.base import Source
from pipelines.sources.settings import IngestSettings

log = logging.getLogger(__name__)


class Watched:
    """The sink as the source sees it, remembering whether its last batch failed (`/readyz`).

    For `hold` seconds only, when given: unready, a pod behind a Service gets no connection, so
    no batch would come to find the sink back (a Forward replica stayed out of service for good).
    A source that pulls (Kafka) retries anyway: until a batch passes."""

    def __init__(self, sink: Sink, hold: float | None = None) -> None:
        self.sink = sink
        self.hold = hold
        self._failure: str | None = None
        self._failed_at = 0.0

    @property
    def failure(self) -> str | None:
        if self._failure is not None and (self.hold is None or time.monotonic() - self._failed_at < self.hold):
            return self._failure
        return None

    async def send_batch(self, events: Sequence[CloudEvent]) -> None:
        try:
            await self.sink.send_batch(events)
        except RejectedError:  # refused for good: the sink answers
            self._failure = None
            raise
        except Exception as exc:
            self._failure, self._failed_at = f"the sink fails: {exc}", time.monotonic()
            raise
        self._failure = None

    async def aclose(self) -> None:
        await self.sink.aclose()


class Ingest:
    """A built source and its sink; `begin` runs the source, `aclose` stops it and closes both."""

    def __init__(self, settings: IngestSettings, source: Source, sink: Watched) -> None:
        self.settings = settings
        self.name = settings.source.name or settings.source.type
        self.source = source
        self.sink = sink
        self.failure: str | None = None
        self._task: asyncio.Task[None] | None = None
        self._closing = False
        self.on_stopped = lambda: None
        """Called when the source stops by itself (the service then shuts down)."""

    @classmethod
    async def open(cls, settings: IngestSettings) -> Ingest:
        """Build the sink, then the source over it (ConfigError naming the field when one cannot be)."""
        sink = Watched(settings.sink.build(), hold=10.0 if settings.source.type == "forward" else None)
        try:
            source = settings.source.build(sink)
        except BaseException:
            await sink.aclose()
            raise
        return cls(settings, source, sink)

    async def start(self) -> None:
        try:
            await self.source.start()
        except OSError as exc:  # asyncio's message names the address
            await self.aclose()
            raise InferLoggerError(f"{self.name} source: {exc}") from None

    def begin(self) -> None:
        self._task = asyncio.create_task(self.source.run(), name=f"source:{self.name}")
        self._task.add_done_callback(self._ended)

    def _ended(self, task: asyncio.Task[None]) -> None:
        if self._closing:
            return
        error = None if task.cancelled() else task.exception()
        self.failure = f"{type(error).__name__}: {error}" if error else "it stopped"
        log.error("%s source stopped by itself (%s): shutting down", self.name, self.failure)
        self.on_stopped()

    @property
    def problem(self) -> str | None:
        """Why it is not ready: not running, its source unable to read (a source with a `problem`:
        Kafka's brokers unreachable), or its sink failing (None when ready)."""
        if self._task is None or self._task.done():
            return self.failure or "not running"
        return getattr(self.source, "problem", None) or self.sink.failure

    async def aclose(self) -> None:
        """Stop the source; the batch in hand gets `drain_timeout` seconds, then is given up."""
        self._closing = True
        try:
            if not await self.source.drain(self.settings.drain_timeout):
                log.warning("%s source: the batch in hand was not taken within %gs (drain_timeout): "
                            "given up, not acked or committed (it comes again)", self.name,
                            self.settings.drain_timeout)
            if self._task is not None:
                self._task.cancel()  # done by now, unless the drain ran out
                await asyncio.gather(self._task, return_exceptions=True)
            await self.source.aclose()
        finally:
            await self.sink.aclose()


class _Counters(Collector):
    """The source's own counters, read at scrape time."""

    def __init__(self, ingest: Ingest) -> None:
        self.ingest = ingest

    def collect(self) -> Iterator[CounterMetricFamily]:
        for key, value in self.ingest.source.stats().items():
            family = CounterMetricFamily(f"infer_logger_ingest_{key}", f"The {self.ingest.settings.source.type} "
                                         f"source's {key.replace('_', ' ')}.", labels=["source"])
            family.add_metric([self.ingest.name], value)
            yield family


def create_app(ingest: Ingest) -> FastAPI:
    registry = CollectorRegistry(auto_describe=True)
    registry.register(_Counters(ingest))

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        ingest.begin()
        try:
            yield
        finally:
            await ingest.aclose()

    app = FastAPI(title="infer-logger ingest", lifespan=lifespan)

    @app.get("/healthz")
    async def healthz() -> dict[str, str]:
        return {"status": "alive"}

    @app.get("/readyz")
    async def readyz() -> JSONResponse:
        if (problem := ingest.problem) is None:
            return JSONResponse({"ready": True, "source": ingest.name})
        return JSONResponse({"ready": False, "source": ingest.name, "reason": problem}, status_code=503)

    @app.get("/metrics")
    async def metrics() -> Response:
        return Response(generate_latest(registry), media_type=CONTENT_TYPE_LATEST)

    return app


def listen(host: str, port: int) -> socket.socket:
    """The endpoints' socket, bound before anything runs: a port in use is a clear error."""
    try:
        family = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)[0][0]
        return socket.create_server((host, port), family=family)
    except OSError as exc:
        raise InferLoggerError(f"cannot listen on {host}:{port}: {exc.strerror or exc}") from None


async def main(settings: IngestSettings, *, log_level: str = "warning", banner: Any = None) -> None:
    """Serve until SIGINT/SIGTERM (or the source stops: InferLoggerError)."""
    sock = listen(settings.host, settings.port)
    try:
        ingest = await Ingest.open(settings)
        await ingest.start()
        server = GracefulServer(uvicorn_config(create_app(ingest), settings.host, settings.port,
                                               log_level=log_level))
        ingest.on_stopped = lambda: setattr(server, "should_exit", True)
        if banner is not None:
            banner(ingest, sock.getsockname()[1])
        await server.serve(sockets=[sock])
    finally:
        sock.close()
    if ingest.failure:
        raise InferLoggerError(f"the {ingest.name} source stopped: {ingest.failure}")


def serve(settings: IngestSettings, *, log_level: str = "warning", banner: Any = None) -> None:
    run_loop(main(settings, log_level=log_level, banner=banner))

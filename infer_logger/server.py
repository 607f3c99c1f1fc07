"""Running the sidecar: on its own HTTP/1.1 server (default) or under uvicorn."""

from __future__ import annotations

import asyncio
import contextlib
import importlib.util
import logging
import signal
import socket
import threading
import time
from collections.abc import Callable, Coroutine, Generator
from types import FrameType
from typing import Any, TypeVar

import uvicorn

from infer_logger.config import Settings
from infer_logger.errors import InferLoggerError
from infer_logger.httpserver import CUT_WAIT, MAX_HEAD, HttpServer, declares_body, error_reply, refuse
from infer_logger.logger import InferenceLogger
from infer_logger.proxy import Proxy

T = TypeVar("T")

log = logging.getLogger(__name__)

# SIGHUP too: a closed terminal or `kill -HUP` killed the sidecar with no graceful stop.
STOP_SIGNALS = (signal.SIGTERM, signal.SIGINT, signal.SIGHUP)


def _stop_signals() -> list[signal.Signals]:
    """STOP_SIGNALS but SIGHUP when ignored at start (`nohup`: the hangup is meant not to stop us)."""
    return [sig for sig in STOP_SIGNALS if sig != signal.SIGHUP or signal.getsignal(sig) is not signal.SIG_IGN]


def _stopped(signals: list[signal.Signals]) -> None:
    """Stopped, the loop's handlers gone: another signal in the ~0.2 s the interpreter takes to
    exit killed the process (exit -15 or -2 after a clean stop). Ignored from here on."""
    if threading.current_thread() is threading.main_thread():
        for sig in signals:
            signal.signal(sig, signal.SIG_IGN)


ANSWER_MARGIN = 5.0
"""Seconds of a stop's grace past the predictor timeout: to log and write the last answers."""


def build_app(settings: Settings) -> Proxy:
    return Proxy(InferenceLogger(settings), settings.upstream, timeout=settings.timeout,
                 max_body_bytes=int(settings.max_request_bytes), read_timeout=settings.request_read_timeout)


def uvicorn_config(app: Any, host: str, port: int, *, log_level: str = "warning") -> uvicorn.Config:
    # uvloop and httptools double uvicorn's throughput (DEPENDENCIES.md); fall back if absent.
    fast = importlib.util.find_spec("uvloop") is not None
    return uvicorn.Config(
        app,
        host=host,
        port=port,
        loop="uvloop" if fast else "asyncio",
        http=_head_limited_httptools() if importlib.util.find_spec("httptools") else "h11",
        lifespan="on",
        log_level=log_level,
        access_log=False,
        # The sidecar answers for the predictor and reads no client address: no header rewriting.
        proxy_headers=False,
        # The predictor's own Date/Server headers pass through; don't add a second pair.
        server_header=False,
        date_header=False,
    )


def _head_limited_httptools() -> type:
    """uvicorn's httptools protocol refusing a request head over `MAX_HEAD` bytes with a 431, as the
    sidecar's own server does: httptools buffers any amount, and uvicorn limits only h11's."""
    from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol

    class HeadLimited(HttpToolsProtocol):
        _in_head = True  # a connection starts with a head
        _head_size = 0

        _upgrade_with_body = False

        def on_message_complete(self) -> None:
            if self._upgrade_with_body:
                return  # its body unread: refused below
            super().on_message_complete()
            self._in_head, self._head_size = True, 0  # what follows is the next request's head

        def on_headers_complete(self) -> None:
            self._in_head = False
            if self.parser.should_upgrade() and not self._should_upgrade() and declares_body(self.headers):
                # llhttp ends the message at the head and leaves the body unread, so the app would
                # get an empty body (h2c from `curl --http2 -d`): refused instead of served so.
                self._upgrade_with_body = True
                return
            super().on_headers_complete()

        def data_received(self, data: bytes) -> None:
            if self._head_size < 0:  # refused: dropped
                return
            if self._in_head:
                self._head_size += len(data)
            super().data_received(data)
            if self.transport.is_closing():
                return
            if self._upgrade_with_body:
                self._refuse(501, "a request with a body cannot ask for an upgrade here (upgrades are not "
                                  "served): send it without Upgrade")
            elif self._in_head and self._head_size > MAX_HEAD:
                self._refuse(431, f"the request line and headers are larger than {MAX_HEAD} bytes")

        def _refuse(self, status: int, reason: str) -> None:
            self._head_size = -1  # what comes now is dropped
            if self.cycle is not None and not self.cycle.response_complete:
                # Pipelined behind an answer being written: that answer goes out whole, then the
                # connection closes (as the sidecar's own server does); the refusal would pose as it.
                self.cycle.keep_alive = False
                return
            refuse(self.transport, error_reply(status, reason))

    return HeadLimited


def serve(settings: Settings, *, log_level: str = "warning") -> None:
    """Run until SIGTERM/SIGINT/SIGHUP (a second one cuts the requests in flight off); a failed
    start raises its cause (e.g. a sink's ConfigError)."""
    app = build_app(settings)
    if settings.server == "uvicorn":
        _serve_uvicorn(app, settings, log_level)  # its capture_signals ignores them once stopped
        return
    signals = _stop_signals()
    run_loop(_serve(app, settings))
    _stopped(signals)


def run_loop(main: Coroutine[Any, Any, T]) -> T:
    """`main` on uvloop (the services' loop: it doubles what they serve), on asyncio without it."""
    try:
        import uvloop
    except ImportError:  # pragma: no cover - uvloop is a dependency on Linux/macOS
        return asyncio.run(main)
    return uvloop.run(main)


async def _serve(app: Proxy, settings: Settings) -> None:
    stop, hurry = asyncio.Event(), asyncio.Event()
    loop = asyncio.get_running_loop()

    def asked() -> None:
        if stop.is_set() and not hurry.is_set():
            log.warning("asked again to stop: the requests still in flight are cut off")
            hurry.set()
        stop.set()

    for sig in _stop_signals():
        loop.add_signal_handler(sig, asked)
    await run(app, settings.host, settings.port, stop, hurry=hurry)


async def run(app: Proxy, host: str, port: int, stop: asyncio.Event,
              listening: Callable[[], None] | None = None, *, hurry: asyncio.Event | None = None) -> None:
    """Start the sidecar, serve until `stop` is set, then drain and stop (the sinks last). The
    requests in flight get the predictor timeout to be answered, unless `hurry` is set."""
    try:
        await app.startup()  # before listening: /readyz answers only once the sinks are up
    except BaseException:
        await app.shutdown()
        raise
    server = HttpServer(app.handle, max_body_bytes=app.max_body_bytes, request_read_timeout=app.read_timeout)
    try:
        await server.start(host, port)
    except OSError as exc:
        await app.shutdown()
        raise InferLoggerError(f"cannot listen on {host}:{port}: {exc.strerror or exc}") from None
    if listening is not None:
        listening()
    try:
        await stop.wait()
    finally:
        app.begin_stop()
        # The requests already read are answered, or time out at the predictor as usual (504,
        # 502, with their response events): the grace outlasts the predictor timeout, and the
        # logger's drain, bounded, follows.
        await server.stop(grace=app.upstream.timeout + ANSWER_MARGIN, hurry=hurry)
        await app.shutdown()


async def run_uvicorn(app: Proxy, host: str, port: int, stop: asyncio.Event,
                      listening: Callable[[], None] | None = None) -> None:
    """`run`, under uvicorn (`server: uvicorn`); off the main thread uvicorn leaves signals alone."""
    server = uvicorn.Server(uvicorn_config(app, host, port))

    async def serve() -> None:
        try:
            await server.serve()
        except SystemExit:  # uvicorn's answer to a port it cannot bind: out of the loop, not a reason
            raise InferLoggerError(f"cannot listen on {host}:{port}") from None

    serving = asyncio.ensure_future(serve())
    while not server.started:
        if serving.done():  # a failed startup returns without serving
            await serving
            raise app.startup_error or InferLoggerError(f"the sidecar did not start on {host}:{port}")
        await asyncio.sleep(0.01)
    if listening is not None:
        listening()
    stopping = asyncio.ensure_future(stop.wait())
    await asyncio.wait({serving, stopping}, return_when=asyncio.FIRST_COMPLETED)
    stopping.cancel()
    app.begin_stop()
    server.should_exit = True
    await serving


class SidecarThread:
    """The sidecar on its own thread and event loop, for a process that does other things (the
    quickstart, tests), on the server `settings.server` names; signals stay with the main thread.
    A context manager: serving inside."""

    def __init__(self, settings: Settings, *, start_timeout: float = 60.0) -> None:
        self.app = build_app(settings)
        self.settings = settings
        self.start_timeout = start_timeout
        self.error: BaseException | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._stop: asyncio.Event | None = None
        self._listening = threading.Event()
        self._thread = threading.Thread(target=self._main, name="sidecar", daemon=True)

    def _main(self) -> None:
        async def main() -> None:
            self._loop, self._stop = asyncio.get_running_loop(), asyncio.Event()
            serve = run_uvicorn if self.settings.server == "uvicorn" else run
            await serve(self.app, self.settings.host, self.settings.port, self._stop, self._listening.set)

        try:
            asyncio.run(main())
        except BaseException as exc:  # handed to the caller by __enter__
            self.error = exc

    def __enter__(self) -> SidecarThread:
        self._thread.start()
        deadline = time.monotonic() + self.start_timeout
        while not self._listening.wait(0.05):
            if not self._thread.is_alive() or time.monotonic() > deadline:
                raise self.error or InferLoggerError("the sidecar did not start")
        return self

    def __exit__(self, *exc: object) -> None:
        if self._loop is not None and self._stop is not None:
            self._loop.call_soon_threadsafe(self._stop.set)
        # Bounds the stop's grace (the predictor timeout and a margin), then the drain.
        self._thread.join(timeout=self.settings.timeout + ANSWER_MARGIN + self.settings.delivery.drain_timeout + 30)


class GracefulServer(uvicorn.Server):
    """uvicorn's server exiting 0 after a graceful stop: uvicorn raises the signal it stopped on
    again once stopped (a SIGTERM killed the process after its clean stop, exit -15; a SIGINT
    raised KeyboardInterrupt through the CLI), and one more in the interpreter's exit did too."""

    @contextlib.contextmanager
    def capture_signals(self) -> Generator[None, None, None]:
        try:
            with super().capture_signals():
                try:
                    yield
                finally:
                    getattr(self, "_captured_signals", []).clear()
        finally:
            if self.should_exit:  # the loop's teardown is to come yet
                _stopped([signal.SIGINT, signal.SIGTERM])


class _StoppingServer(GracefulServer):
    """uvicorn's server, taking SIGHUP for SIGTERM (unless ignored at start: `nohup`), telling the
    logger a stop has begun, and cutting the requests in flight off at a second stop signal (uvicorn
    does at a second SIGINT only)."""

    def __init__(self, config: uvicorn.Config, app: Proxy) -> None:
        super().__init__(config)
        self.proxy = app

    def handle_exit(self, sig: int, frame: FrameType | None) -> None:
        self.proxy.begin_stop()
        if self.should_exit:
            self.force_exit = True
        super().handle_exit(signal.SIGTERM if sig == signal.SIGHUP else sig, frame)

    async def shutdown(self, sockets: list[socket.socket] | None = None) -> None:
        await super().shutdown(sockets)
        if self.force_exit:
            # uvicorn then leaves the requests in flight running and skips the lifespan's shutdown:
            # the logger's drain (a memory spool's events lost) and each cut request's response event.
            tasks = set(self.server_state.tasks)
            for task in tasks:
                task.cancel()
            if tasks:
                await asyncio.wait(tasks, timeout=CUT_WAIT)
            ran = getattr(self.lifespan, "shutdown_event", None)  # `--lifespan off` has none
            if ran is None or not ran.is_set():  # set: the second signal came during its drain
                await self.lifespan.shutdown()

    @contextlib.contextmanager
    def capture_signals(self) -> Generator[None, None, None]:
        # SIGHUP unless ignored at start (`nohup`), and uvicorn's own off the main thread (none).
        signals = _stop_signals()
        hup = threading.current_thread() is threading.main_thread() and signal.SIGHUP in signals
        previous = signal.signal(signal.SIGHUP, self.handle_exit) if hup else None
        try:
            with super().capture_signals():
                yield
        finally:
            if hup:
                signal.signal(signal.SIGHUP, previous)
            if self.should_exit:  # the loop's teardown is to come yet
                _stopped(signals)


def _serve_uvicorn(app: Proxy, settings: Settings, log_level: str) -> None:
    try:
        config = uvicorn_config(app, settings.host, settings.port, log_level=log_level)
        config.timeout_graceful_shutdown = int(settings.timeout + ANSWER_MARGIN)  # as the default server's grace
        _StoppingServer(config, app).run()
    except SystemExit:
        # uvicorn exits on a failed lifespan startup: give the CLI the reason instead.
        if app.startup_error is not None:
            raise app.startup_error from None
        raise

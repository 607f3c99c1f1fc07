"""The same logging as the sidecar, as ASGI middleware around a FastAPI/Starlette predictor.

    app.add_middleware(InferenceLoggerMiddleware, settings=load_settings(...))

The logger starts and stops with the app's lifespan, each time it runs (one that cannot start
fails the startup). The request body is read first (and replayed to the app); the response streams
through, only the part the event keeps (`max_payload_bytes`) held, and the response event is
appended before the last body chunk goes to the client.

An answer's start is held until its first body message (as GZipMiddleware and Hypercorn hold it):
an app that raises or returns before any body gets the server's 500, logged as such; one that
raises after its body began (a stream broken off) is logged as the client got it: its status, the
body as far as it went, marked truncated. (So a stream's head reaches the client with its first
chunk.)

Added with `add_middleware`, it runs inside Starlette's ServerErrorMiddleware: for an exception
the app raises before it answers, the logged response is its own 500 `{"error": "<ExceptionName>"}`,
whatever an `exception_handler(Exception)` then answers (that answer has no x-request-id either).
Wrapped around the app instead, it logs every answer as the client gets it, lifespan included:

    app = InferenceLoggerMiddleware(FastAPI(...), settings=load_settings(...))

Wrapped around an app that mounts the predictor (`Mount("/api", ...)`), whose lifespan Starlette
never runs, the inference routes are matched under the mount's prefix too.

The spool is locked by the process logging into it: each worker process (`uvicorn --workers N`)
needs its own `spool.dir`, and one that finds it taken fails its startup saying so. Workers are not
given subdirectories of one: they have no stable identity, so a subdirectory left by a worker that
does not come back (a restart with fewer workers) would never be delivered.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from typing import Any

from infer_logger import events as ev
from infer_logger.asgi import error_body, invalid_event_body, read_or_refuse, respond, route_path
from infer_logger.config import Settings
from infer_logger.errors import InvalidEventError
from infer_logger.httpserver import CUT_WAIT
from infer_logger.logger import InferenceLogger, match_route

log = logging.getLogger(__name__)

# Set in the scope an exchange's app gets, to its logger: a middleware inside with the same
# logger (the mounted app's, sharing the outer app's) passes it on, not logging it twice.
_LOGGED = "infer_logger.logged"
_OWN_KEYS = frozenset({"headers", "extensions", _LOGGED})  # the app's copy has them from us


class InferenceLoggerMiddleware:
    def __init__(self, app: Any, settings: Settings | None = None, logger: InferenceLogger | None = None):
        self.app = app
        self.settings = logger.settings if logger is not None else settings or Settings()
        self._logger = logger
        self._unstarted_said = False
        self._answering: set[asyncio.Task[Any]] = set()  # the tasks with an exchange under way

    @property
    def logger(self) -> InferenceLogger:
        """The logger, made (its spool opened and locked) on first use: normally the lifespan's
        startup, where a spool another process holds fails the startup. Starlette builds its user
        middleware on the first ASGI call, outside its lifespan handling: a SpoolError raised
        there read as "lifespan unsupported", and every request was a 500."""
        if self._logger is None:
            self._logger = InferenceLogger(self.settings)
        return self._logger

    async def __call__(self, scope: dict[str, Any], receive: Any, send: Any) -> None:
        if scope["type"] == "lifespan":
            await self.app(scope, self._lifespan_receive(receive, send), self._lifespan_send(send))
            return
        path = route_path(scope)
        # Under a prefix too: wrapped around an app that mounts the predictor (`Mount("/api", ...)`),
        # the path still holds it. The events keep the path as the client sent it.
        route = match_route(scope.get("method", ""), path, prefixed=True) if scope["type"] == "http" else None
        marked = scope.get(_LOGGED)  # logged by a middleware outside, with this logger
        if route is None or (marked is not None and (marked is self._logger or marked.settings == self.settings)):
            # The same logger (the outer app's), or one set up alike (a mounted app's, its lifespan
            # never run: saying it serves unlogged would be wrong).
            await self.app(scope, receive, send)
            return
        headers = {k.decode("latin-1"): v.decode("latin-1") for k, v in scope["headers"]}
        if ev.skip_logging(scope["headers"]):
            await self.app(scope, receive, send)
            return
        if self._logger is None or not self._logger.started:
            # No lifespan ran (a mounted app, --lifespan off, a TestClient outside `with`): events
            # appended now were never delivered, and nothing said so. Served unlogged, said once.
            if not self._unstarted_said:
                self._unstarted_said = True
                log.error("infer-logger: the logger is not running (the app's lifespan did not run: a mounted "
                          "app, --lifespan off, a TestClient outside `with`?, or has ended): its calls are "
                          "served unlogged; wrap the outer app, or run its lifespan")
            await self.app(scope, receive, send)
            return
        settings = self.settings
        body = await read_or_refuse(receive, send, int(settings.max_request_bytes), settings.request_read_timeout)
        if body is None:
            return  # refused as the sidecar refuses (413, 408), or the client went away: nothing logged
        try:  # as the sidecar does: a request that is a CloudEvent keeps its id, a malformed one is refused
            event_id = ev.cloudevent_id(headers, body) or ev.event_id(headers)
        except InvalidEventError as exc:
            refusal = invalid_event_body(exc, exc.item)
            await respond(send, 400, [(b"content-type", b"application/json")], refusal)
            return
        exchange = self.logger.begin(route, path, headers, scope["headers"], body, event_id)
        # The app (and what it echoes) sees the id that replaced it (or was made), as the client
        # does and as the sidecar's predictor does; and, as there, is asked not to compress (a
        # compressing middleware inside this one had its gzip bytes logged as JSON; with no
        # Accept-Encoding at all, any coding may do).
        dropped = (b"x-request-id", b"accept-encoding") if self.logger.logs_responses else (b"x-request-id",)
        forwarded = [(k, v) for k, v in scope["headers"] if k not in dropped]
        if self.logger.logs_responses:
            forwarded.append((b"accept-encoding", b"identity"))
        if (sent := headers.get("x-request-id")) is None or (sent != event_id and ev.read_id(sent) is None):
            forwarded.append((b"x-request-id", event_id.encode()))
        else:  # one, the events' (a client's sent twice: frameworks read the first)
            forwarded.append((b"x-request-id", sent.encode("latin-1")))
        # A file answer must come as body messages, to be logged: not as a path the server sends.
        extensions = {k: v for k, v in scope.get("extensions", {}).items()
                      if k not in ("http.response.pathsend", "http.response.zerocopysend")}
        outer, scope = scope, {**scope, "headers": forwarded, "extensions": extensions, _LOGGED: self.logger}

        def copy_back() -> None:
            # What the app sets in its scope (Starlette's router: `route`, `endpoint`, `path_params`)
            # reaches the middlewares outside, as without this one: route-labelled metrics.
            for key, value in scope.items():
                if key not in _OWN_KEYS and (key not in outer or outer[key] is not value):
                    outer[key] = value

        replayed = gone = False

        async def replay() -> dict[str, Any]:
            nonlocal replayed, gone
            if not replayed:
                replayed = True
                return {"type": "http.request", "body": body, "more_body": False}
            message = await receive()
            gone = gone or message["type"] == "http.disconnect"
            return message

        status = 500
        content_type: str | None = None
        codings: list[str] = []  # its Content-Encoding: asked for identity, an app may still compress
        kept = bytearray()  # the response's first `payload_limit` bytes: all its event keeps
        size = 0
        limit = self.logger.payload_limit
        logged = answering = bodied = False
        held: dict[str, Any] | None = None  # the answer's start, sent with its first body

        async def capture(message: dict[str, Any]) -> None:
            nonlocal status, content_type, logged, size, answering, bodied, held
            if message["type"] == "http.response.start":
                answering = True
                status = message["status"]
                message_headers = list(message.get("headers", []))
                for k, v in message_headers:
                    name = k.lower()
                    if name == b"content-type":
                        content_type = v.decode("latin-1")
                    elif name == b"content-encoding":
                        codings.append(v.decode("latin-1"))
                # The client can find the events by it, whatever id the app answered with.
                message_headers = [(k, v) for k, v in message_headers if k.lower() != b"x-request-id"]
                message_headers.append((b"x-request-id", ev.id_header(event_id, headers)))
                copy_back()  # an outer BaseHTTPMiddleware's call_next returns at the start
                # Held until the first body, as GZipMiddleware and Hypercorn hold it (uvicorn sends
                # it at once): an app failing before any body then gets the server's 500 under every
                # server, as logged; sent at once, uvicorn's client had a 200 head and a cut.
                held = {**message, "headers": message_headers}
                return
            elif message["type"] == "http.response.body" and not logged:  # once (a second final is the server's to refuse)
                bodied = True  # from here the start goes out
                chunk = message.get("body", b"")
                if len(kept) < limit:
                    kept.extend(chunk[: limit - len(kept)])
                size += len(chunk)
                if not message.get("more_body", False):
                    logged = True
                    self.logger.end(exchange, status, content_type, bytes(kept), size, encoding=", ".join(codings))
            if held is not None:
                start, held = held, None
                await send(start)
            await send(message)

        task = asyncio.current_task()
        assert task is not None  # asyncio runs each ASGI call in a task
        self._answering.add(task)
        try:
            await self.app(scope, replay, capture)
        except Exception as exc:
            if not logged:
                if bodied:  # the client left, or the app broke off: its status went out, no 500
                    # can follow; the client has the body as far as it went, and so has the log.
                    self.logger.end(exchange, status, content_type, bytes(kept), size, cut_off=True,
                                    encoding=", ".join(codings))
                else:  # the server answers 500 further out; the audit log still sees that it failed
                    reason = f'{{"error": "{type(exc).__name__}"}}'.encode()
                    self.logger.end(exchange, 500, "application/json", reason)
            raise
        except asyncio.CancelledError:
            # The server's stop (uvicorn's graceful-shutdown timeout) or an outer timeout: the
            # client gets uvicorn's 500, or its answer cut. Logged so; the cancel goes on.
            if not logged:
                if bodied:
                    self.logger.end(exchange, status, content_type, bytes(kept), size, cut_off=True,
                                    encoding=", ".join(codings))
                else:
                    cancelled = "the app was cancelled before it answered (the server stopped, or an outer timeout)"
                    self.logger.end(exchange, 500, "application/json", error_body(500, cancelled))
            raise
        finally:
            copy_back()
            self._answering.discard(task)
        if answering and not bodied and not gone:
            # A start and no body: held back, so every server answers its 500 (sent, uvicorn's
            # client had a 200 head cut off, Hypercorn's a 500: logged as a cut 200). Not so for
            # a client gone before the first body (a stream Starlette ends quietly): cut off below.
            self.logger.end(exchange, 500, "application/json",
                            error_body(500, "the app returned without a response body"))
        elif answering and not logged:
            # A stream the client left (Starlette ends it quietly): what went out, marked cut off.
            self.logger.end(exchange, status, content_type, bytes(kept), size, cut_off=True,
                            encoding=", ".join(codings))
        elif not answering:  # the server answers 500 further out (uvicorn does)
            self.logger.end(exchange, 500, "application/json", error_body(500, "the app returned without a response"))

    def _lifespan_receive(self, receive: Any, send: Any) -> Any:
        async def wrapped() -> dict[str, Any]:
            message = await receive()
            if message["type"] == "lifespan.startup":
                try:
                    await self.logger.start()
                except Exception as exc:
                    # Said here: Starlette awaits this receive outside its own error handling, so
                    # uvicorn took the raise for "lifespan unsupported" and served, logging nothing.
                    # The app's startup is not run; the error ends its lifespan.
                    await send({"type": "lifespan.startup.failed", "message": f"infer-logger: {exc}"})
                    if self._logger is not None:  # else it could not even be made
                        with contextlib.suppress(Exception):
                            await self._logger.stop()  # what did start (the spool and its lock)
                    raise
            elif message["type"] == "lifespan.shutdown":
                # uvicorn sends it as soon as it cancelled what still ran at its graceful-shutdown
                # timeout: those log their response events as they end, before the drain.
                loop = asyncio.get_running_loop()
                if answering := {t for t in self._answering if t.get_loop() is loop}:
                    await asyncio.wait(answering, timeout=CUT_WAIT)
                await self.logger.stop()
            return message

        return wrapped

    def _lifespan_send(self, send: Any) -> Any:
        async def wrapped(message: dict[str, Any]) -> None:
            if message["type"] == "lifespan.startup.failed" and self._logger is not None and self._logger.started:
                # The app's own startup failed after the logger's: stopped before the server is
                # told (it exits then), else a delivery child or sink workers were left running,
                # and the next lifespan started them again on top. Its stop is bounded (drain_timeout).
                with contextlib.suppress(Exception):
                    await self._logger.stop()
            await send(message)

        return wrapped

"""The logger sidecar: a reverse proxy in front of a predictor.

The hot path is all that matters here: requests come from `infer_logger.httpserver` (or any
ASGI server) and go to the predictor through `infer_logger.upstream`, both thin layers over
httptools (see benchmarks/proxy_throughput.py for what uvicorn and aiohttp's client cost). The
sidecar's own endpoints are `/healthz`, `/readyz` and `/metrics`; every other path goes to the
predictor, and only inference endpoints (`logger.match_route`) are logged.
"""

from __future__ import annotations

import asyncio
import logging
from typing import Any
from urllib.parse import quote, unquote_to_bytes

import orjson
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

from infer_logger import events as ev
from infer_logger.asgi import (
    error_body,
    invalid_event_body,
    read_or_refuse,
    respond,
    route_path,
    run_lifespan,
)
from infer_logger.errors import InferLoggerError, InvalidEventError
from infer_logger.httpserver import Reply, Request
from infer_logger.logger import InferenceLogger, match_route
from infer_logger.upstream import Upstream, UpstreamError

log = logging.getLogger(__name__)

Scope = dict[str, Any]

# Hop-by-hop headers (RFC 9110 §7.6.1) are the proxy's own business; content-length is recomputed.
_HOP = frozenset(
    {
        b"connection",
        b"keep-alive",
        b"proxy-connection",  # never standard, still sent by some clients (RFC 9110 7.6.1)
        b"proxy-authenticate",
        b"proxy-authorization",
        b"te",
        b"trailer",
        b"transfer-encoding",
        b"upgrade",
        b"content-length",
    }
)
# The upstream client writes its own host; the body goes with the headers, so no Expect.
_DROP_UPSTREAM = _HOP | {b"host", b"expect"}
# A HEAD answer's content-length is the GET answer's (RFC 9110 8.6), not its empty body's.
_HOP_HEAD = _HOP - {b"content-length"}
# On a logged call the predictor is asked for its answer as it is: one it compressed (for a
# client that accepts gzip, as python-requests does) was logged as gzip bytes labelled JSON, the
# predictions unreadable in the audit. Between a sidecar and its predictor bytes cost nothing.
_DROP_LOGGED = _DROP_UPSTREAM | {b"accept-encoding"}
_IDENTITY = (b"accept-encoding", b"identity")
_PLAIN_CONNECTION = frozenset({b"keep-alive", b"close"})


def _without_hop(headers: list[tuple[bytes, bytes]], drop: frozenset[bytes], *,
                 connection: bool = True) -> list[tuple[bytes, bytes]]:
    """`headers` less `drop` and less any header the `Connection` header names (RFC 9110 7.6.1:
    those are hop-by-hop too, for this connection only). `connection=False`: the caller knows
    there is none, and the headers are not searched for it (the request path)."""
    if connection:
        named = {token.strip().lower() for name, value in headers if name == b"connection"
                 for token in value.split(b",")} - _PLAIN_CONNECTION
        if named:
            drop = drop | named
    return [(k, v) for k, v in headers if k not in drop]


def end_to_end(headers: list[tuple[bytes, bytes]]) -> list[tuple[bytes, bytes]]:
    """A request's headers (lower-case names) to pass on to the next hop: less the hop-by-hop
    ones, those `Connection` names, and Host and Expect (the client sending it writes its own)."""
    return _without_hop(headers, _DROP_UPSTREAM)


_JSON = [(b"content-type", b"application/json")]


class Proxy:
    """Forward, log, answer: `handle` is the core; `infer_logger.httpserver` serves it directly,
    and the object is also an ASGI app (for uvicorn, or mounting in-process)."""

    def __init__(self, logger: InferenceLogger, upstream: str, *, timeout: float = 60.0,
                 max_body_bytes: int | None = None, read_timeout: float = 60.0) -> None:
        self.logger = logger
        self.max_body_bytes = max_body_bytes
        self.read_timeout = read_timeout
        """Seconds a request may take to arrive whole (`request_read_timeout`): then a 408."""
        self.upstream = Upstream(upstream, timeout=timeout)
        self.serving = False
        self.stopping = False
        """A server's stop has begun: a cancel now is its cut (see `begin_stop`)."""
        self.startup_error: InferLoggerError | None = None
        self._unstarted_said = False
        m = logger.metrics
        self._requests = m.requests
        self._counted: dict[tuple[bool, int], Any] = {}
        self._upstream_latency = m.upstream_latency

    async def startup(self) -> None:
        try:
            await self.logger.start()
        except InferLoggerError as exc:
            self.startup_error = exc  # for `serve`: uvicorn only says that startup failed
            raise
        self.serving = True

    def begin_stop(self) -> None:
        """The server begins its stop. Once the grace is over it cancels the requests still in
        flight: each is answered 503 and gets its response event. Any other cancel (an outer
        timeout where the proxy is mounted) goes through as usual."""
        self.stopping = True
        self.logger.begin_stop()

    async def shutdown(self) -> None:
        self.serving = False
        await self.upstream.close()
        await self.logger.stop()

    async def __call__(self, scope: Scope, receive: Any, send: Any) -> None:
        kind = scope["type"]
        if kind == "http":
            try:
                body = await read_or_refuse(receive, send, self.max_body_bytes, self.read_timeout)
            except asyncio.CancelledError:
                if not self._cut():
                    raise
                await respond(send, *_cut_off())  # the client was still sending: nothing forwarded or logged
                return
            if body is None:
                return  # refused (413, 408), or the client went away: nothing forwarded, nothing logged
            path, target = _own_path(scope)
            if scope.get("query_string"):
                target += b"?" + scope["query_string"]
            request = Request(scope["method"], path, target, scope["headers"], body)
            status, headers, out = await self.handle(request)
            await respond(send, status, headers, out, head=request.method == "HEAD")
        elif kind == "lifespan":
            await run_lifespan(receive, send, self.startup, self.shutdown)
        # websockets are not inference traffic: refuse by not accepting

    async def handle(self, request: Request) -> Reply:
        path = request.path
        if (own := _OWN.get(path)) is not None:
            return own(self)
        method, body, raw = request.method, request.body, request.headers
        headers = {k.decode("latin-1"): v.decode("latin-1") for k, v in raw}
        route = match_route(method, path)
        if route is not None and ev.skip_logging(raw):
            route = None  # proxied as it is, unlogged: a body that is no valid CloudEvent too (as the middleware)
        elif route is not None and not self.logger.started:
            self._unstarted()
            route = None
        try:
            event_id = (route and ev.cloudevent_id(headers, body)) or ev.event_id(headers)
        except InvalidEventError as exc:
            self._count(False, 400)
            return 400, list(_JSON), invalid_event_body(exc, exc.item)
        exchange = None
        if route is not None:
            exchange = self.logger.begin(route, path, headers, raw, body, event_id)

        compressed_ok = exchange is None or not self.logger.logs_responses
        forward = _without_hop(raw, _DROP_UPSTREAM if compressed_ok else _DROP_LOGGED,
                               connection="connection" in headers)
        if not compressed_ok:  # no Accept-Encoding means any coding may do (RFC 9110 12.5.3): say which
            forward.append(_IDENTITY)
        sent = headers.get("x-request-id")
        if sent is None or (sent != event_id and ev.read_id(sent) is None):  # none, or not an id: the event's
            forwarded: bytes | None = event_id.encode()
        else:
            # A name sent twice (cheap to tell) may be x-request-id: frameworks read the first, the
            # events carry the last, so the predictor gets that one only.
            forwarded = sent.encode("latin-1") if len(headers) != len(raw) else None
        if forwarded is not None:
            if sent is not None:
                forward = [(k, v) for k, v in forward if k != b"x-request-id"]
            forward.append((b"x-request-id", forwarded))
        loop = asyncio.get_running_loop()
        started = loop.time()
        try:
            answer = await self.upstream.request(method, request.target, forward, body)
            status, out_body = answer.status, answer.body
            out_headers = _without_hop(answer.headers, _HOP_HEAD if method == "HEAD" else _HOP)
            content_type = next((v.decode("latin-1") for k, v in out_headers if k == b"content-type"), None)
        except TimeoutError:
            status, content_type = 504, "application/json"
            out_body = error_body(504, f"predictor did not answer within {self.upstream.timeout:g}s")
            out_headers = list(_JSON)
        except (OSError, UpstreamError) as exc:
            status, content_type = 502, "application/json"
            out_body = error_body(502, f"predictor unreachable: {type(exc).__name__}: {exc}")
            out_headers = list(_JSON)
        except Exception as exc:  # a bug: the client still gets an answer, and the exchange its response event
            log.exception("proxying %s %s failed", method, path)
            status, content_type = 502, "application/json"
            out_body = error_body(502, f"the sidecar failed to proxy this request ({type(exc).__name__}); see its log")
            out_headers = list(_JSON)
        except asyncio.CancelledError:
            if not self._cut():
                raise
            # Answered 503 (another replica may take it), and the audit says why.
            status, content_type = 503, "application/json"
            out_headers, out_body = _cut_off()[1:]
        self._upstream_latency.observe(loop.time() - started)
        if exchange is not None:
            # Asked for identity, it may still have compressed (an answer compressed beforehand).
            coding = b", ".join(v for k, v in out_headers if k == b"content-encoding").decode("latin-1")
            self.logger.end(exchange, status, content_type, out_body, encoding=coding or None)
        self._count(exchange is not None, status)
        if exchange is not None:
            # The client can find the events by it: a predictor's own (a correlation-id middleware
            # replacing ours, an echo of the client's x-request-id beside its ce-id) named none.
            out_headers = [(k, v) for k, v in out_headers if k != b"x-request-id"]
            out_headers.append((b"x-request-id", ev.id_header(event_id, headers)))
        elif not any(k == b"x-request-id" for k, _ in out_headers):
            out_headers.append((b"x-request-id", ev.id_header(event_id, headers)))
        return status, out_headers, out_body

    def _cut(self) -> bool:
        """Whether the cancel being handled is the stop's cut, which then ends here."""
        if not self.stopping:
            return False
        if (task := asyncio.current_task()) is not None:
            task.uncancel()
        return True

    def _unstarted(self) -> None:
        """No lifespan ran (mounted in an app that runs none of its mounted apps', --lifespan off)
        or it has ended: events appended now are never delivered, and nothing said so. Served
        unlogged, said once (as the middleware does)."""
        if not self._unstarted_said:
            self._unstarted_said = True
            log.error("infer-logger: the sidecar's logger is not running (its lifespan did not run: mounted in "
                      "another app, --lifespan off?, or has ended): its calls are served unlogged; run its "
                      "startup and shutdown from the outer app's lifespan")

    def _count(self, logged: bool, status: int) -> None:
        key = (logged, status)
        if (child := self._counted.get(key)) is None:
            child = self._counted[key] = self._requests.labels("true" if logged else "false", str(status))
        child.inc()


def _cut_off() -> Reply:
    return 503, list(_JSON), error_body(503, "the sidecar stopped before the predictor answered")


def _own_path(scope: Scope) -> tuple[str, bytes]:
    """The path to route on and the one to forward (as the client wrote it), both without the
    `root_path` a mount (Starlette's Mount, uvicorn --root-path) put before them, as the
    middleware routes: mounted at /svc, /svc/v1/models/m:predict went to the predictor as such,
    and was not logged."""
    raw: bytes = scope.get("raw_path") or scope["path"].encode()
    path = route_path(scope)
    if path == scope["path"]:  # no root to take off
        return path, raw
    prefix = scope["root_path"].encode()
    if raw.startswith(prefix) and raw[len(prefix):len(prefix) + 1] in (b"", b"/"):
        raw = raw[len(prefix):]
    else:  # a root written otherwise (percent-encoded): its raw segments, however written, dropped
        wanted = prefix.rstrip(b"/").split(b"/")
        segments = raw.split(b"/", len(wanted))
        if len(segments) >= len(wanted) and all(
                unquote_to_bytes(got) == root for got, root in zip(segments[1:], wanted[1:], strict=False)):
            raw = b"/" + segments[len(wanted)] if len(segments) > len(wanted) else b""
        else:  # cannot be told apart (an encoded slash in the root): the rest, encoded again
            raw = quote(path, safe="/:@!$&'()*+,;=").encode()
    return path or "/", raw or b"/"


def _healthz(proxy: Proxy) -> Reply:
    return 200, list(_JSON), b'{"status":"ok"}'


def _readyz(proxy: Proxy) -> Reply:
    ready = proxy.logger.started and proxy.serving
    body = orjson.dumps({"ready": ready, "sinks": proxy.logger.sink_states()})
    return (200 if ready else 503), list(_JSON), body


def _metrics(proxy: Proxy) -> Reply:
    proxy.logger.update_lag()
    body = generate_latest(proxy.logger.metrics.registry)
    return 200, [(b"content-type", CONTENT_TYPE_LATEST.encode())], body


_OWN = {"/healthz": _healthz, "/readyz": _readyz, "/metrics": _metrics}

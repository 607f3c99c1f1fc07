"""The logger sidecar: a plain-ASGI reverse proxy in front of a predictor.

Plain ASGI and aiohttp's client because the hot path is all that matters here (see
DEPENDENCIES.md: httpx's client caps a Python proxy near 640 req/s, aiohttp's near 7k). The
sidecar's own endpoints are `/healthz`, `/readyz` and `/metrics`; every other path goes to the
predictor, and only inference endpoints (`logger.match_route`) are logged.
"""

from __future__ import annotations

import asyncio
import logging
from typing import Any

import aiohttp
import orjson
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

from infer_logger import events as ev
from infer_logger.asgi import read_body, respond, run_lifespan
from infer_logger.cloudevents.http import from_http_many
from infer_logger.errors import InferLoggerError, InvalidEventError
from infer_logger.logger import InferenceLogger, match_route

log = logging.getLogger(__name__)

Scope = dict[str, Any]
Message = dict[str, Any]

# Hop-by-hop headers (RFC 9110 §7.6.1) are the proxy's own business; content-length is recomputed.
_HOP = frozenset(
    {
        b"connection",
        b"keep-alive",
        b"proxy-authenticate",
        b"proxy-authorization",
        b"te",
        b"trailer",
        b"transfer-encoding",
        b"upgrade",
        b"content-length",
    }
)
_DROP_UPSTREAM = _HOP | {b"host"}
_JSON = [(b"content-type", b"application/json")]


def error_body(status: int, reason: str, **extra: str) -> bytes:
    return orjson.dumps({"error": reason, "status": status, **extra})


def cloudevent_id(headers: dict[str, str], body: bytes) -> str | None:
    """The id of a request that is itself a CloudEvent (binary or structured), else None.

    Raises InvalidEventError for a malformed one: the sidecar answers 400 rather than pass on
    what the predictor's CloudEvents handling would choke on.
    """
    if "ce-specversion" in headers or headers.get("content-type", "").startswith("application/cloudevents"):
        return from_http_many(headers, body)[0].id
    return None


class Proxy:
    """ASGI app: forward, log, answer. The logger's lifecycle follows the ASGI lifespan."""

    def __init__(self, logger: InferenceLogger, upstream: str, *, timeout: float = 60.0) -> None:
        self.logger = logger
        self.upstream = upstream.rstrip("/")
        self.timeout = timeout
        self._session: aiohttp.ClientSession | None = None
        self.startup_error: InferLoggerError | None = None
        m = logger.metrics
        self._requests = m.requests
        self._upstream_latency = m.upstream_latency

    async def startup(self) -> None:
        self._session = aiohttp.ClientSession(
            timeout=aiohttp.ClientTimeout(total=self.timeout),
            connector=aiohttp.TCPConnector(limit=0, ttl_dns_cache=300),
            auto_decompress=False,  # bodies go through untouched, compressed or not
            skip_auto_headers=("User-Agent", "Accept", "Accept-Encoding"),
        )
        try:
            await self.logger.start()
        except InferLoggerError as exc:
            self.startup_error = exc  # for `serve`: the server only says that startup failed
            raise

    async def shutdown(self) -> None:
        if self._session is not None:
            await self._session.close()
        await self.logger.stop()

    async def __call__(self, scope: Scope, receive: Any, send: Any) -> None:
        kind = scope["type"]
        if kind == "http":
            await self._http(scope, receive, send)
        elif kind == "lifespan":
            await run_lifespan(receive, send, self.startup, self.shutdown)
        # websockets are not inference traffic: refuse by not accepting


    async def _http(self, scope: Scope, receive: Any, send: Any) -> None:
        path: str = scope["path"]
        if path in _OWN:
            await _OWN[path](self, send)
            return
        method: str = scope["method"]
        body = await read_body(receive)
        raw = scope["headers"]
        headers = {k.decode("latin-1"): v.decode("latin-1") for k, v in raw}
        route = match_route(method, path)
        try:
            event_id = (route and cloudevent_id(headers, body)) or ev.event_id(headers)
        except InvalidEventError as exc:
            self._requests.labels("false", "400").inc()
            reason = error_body(400, f"invalid CloudEvent: {exc}", attribute=exc.attribute)
            await respond(send, 400, list(_JSON), reason)
            return
        exchange = None
        if route is not None and not ev.skip_logging(headers):
            pairs = [(k.decode("latin-1"), v.decode("latin-1")) for k, v in raw]
            exchange = self.logger.begin(route, path, headers, pairs, body, event_id)

        forward = [(k, v) for k, v in raw if k not in _DROP_UPSTREAM]
        if "x-request-id" not in headers:
            forward.append((b"x-request-id", event_id.encode()))
        url = self.upstream + (scope.get("raw_path") or path.encode()).decode("latin-1")
        if scope.get("query_string"):
            url += "?" + scope["query_string"].decode("latin-1")
        assert self._session is not None, "the proxy serves only between startup and shutdown"
        loop = asyncio.get_running_loop()
        started = loop.time()
        try:
            async with self._session.request(
                method,
                url,
                data=body,
                headers=[(k.decode("latin-1"), v.decode("latin-1")) for k, v in forward],
                allow_redirects=False,
            ) as resp:
                out_body = await resp.read()
                status = resp.status
                out_headers = [(k.lower(), v) for k, v in resp.raw_headers if k.lower() not in _HOP]
                content_type = resp.headers.get("Content-Type")
        except TimeoutError:
            status, content_type = 504, "application/json"
            out_body = error_body(504, f"predictor did not answer within {self.timeout:g}s")
            out_headers = list(_JSON)
        except (aiohttp.ClientError, OSError) as exc:
            status, content_type = 502, "application/json"
            out_body = error_body(502, f"predictor unreachable: {type(exc).__name__}: {exc}")
            out_headers = list(_JSON)
        self._upstream_latency.observe(loop.time() - started)
        if exchange is not None:
            self.logger.end(exchange, status, content_type, out_body)
        self._requests.labels("true" if exchange else "false", str(status)).inc()
        if not any(k == b"x-request-id" for k, _ in out_headers):
            out_headers.append((b"x-request-id", event_id.encode()))
        await respond(send, status, out_headers, out_body)


async def _healthz(proxy: Proxy, send: Any) -> None:
    await respond(send, 200, list(_JSON), b'{"status":"ok"}')


async def _readyz(proxy: Proxy, send: Any) -> None:
    ready = proxy.logger.started and proxy._session is not None
    sinks = proxy.logger.sink_states()
    body = orjson.dumps({"ready": ready, "sinks": sinks})
    await respond(send, 200 if ready else 503, list(_JSON), body)


async def _metrics(proxy: Proxy, send: Any) -> None:
    proxy.logger.update_lag()
    body = generate_latest(proxy.logger.metrics.registry)
    await respond(send, 200, [(b"content-type", CONTENT_TYPE_LATEST.encode())], body)


_OWN = {"/healthz": _healthz, "/readyz": _readyz, "/metrics": _metrics}
